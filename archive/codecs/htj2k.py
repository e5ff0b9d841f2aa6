"""High-throughput JPEG 2000 (OpenJPH) lossless, raw J2K codestream.

``reversible=True`` selects the 5/3 wavelet (lossless); OpenJPH takes int8 and
int16 directly and is single-threaded. Colour uses the reversible colour
transform (``rgb=True``), which roughly halves the size on ultrasound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

import imagecodecs

from archive.codecs._pixels import Pixels, is_gray_or_rgb
from archive.codecs.base import Codec, CodecConfig, EncodedPayload, _strip
from archive.codecs.frame import FrameHeader


@dataclass(frozen=True)
class Htj2kConfig(CodecConfig):
    """HTJ2K lossless has no parameters."""


class Htj2kCodec(Codec):
    codec_id: ClassVar[str] = "htj2k"
    config_class: ClassVar[type[CodecConfig]] = Htj2kConfig
    __slots__ = ()

    @property
    def config(self) -> Htj2kConfig:
        return cast(Htj2kConfig, self._config)

    def _encode_payload(self, arr: Pixels, context: bytes | None) -> EncodedPayload | None:
        if not is_gray_or_rgb(arr):
            return None
        payload = imagecodecs.htj2k_encode(arr, reversible=True, planar=False, rgb=arr.ndim == 3)
        return EncodedPayload(bytes(payload), arr.dtype)

    @classmethod
    def decode_payload(cls, payload: bytes, header: FrameHeader, context: bytes | None) -> Pixels:
        return imagecodecs.htj2k_decode(payload, planar=False)

    def _library_versions(self) -> dict[str, str]:
        return {"openjph": _strip(imagecodecs.htj2k_version())}
