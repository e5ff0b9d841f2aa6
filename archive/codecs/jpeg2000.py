"""JPEG 2000 lossless (reversible 5/3, OpenJPEG), raw J2K codestream.

OpenJPEG takes int8/int16 directly, so samples are stored natively (no
offset); ``bitspersample`` is the real bit depth of the frame's values. On
the CT set this is as small as the offset-to-unsigned mapping (4.842 vs
4.843 bpp) and keeps the codestream a plain image of the original values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

import imagecodecs

from archive.codecs._pixels import Pixels, is_gray_or_rgb, native_bits
from archive.codecs.base import Codec, CodecConfig, EncodedPayload, _strip
from archive.codecs.frame import FrameHeader


@dataclass(frozen=True)
class Jpeg2000Config(CodecConfig):
    """JPEG 2000 lossless has no parameters."""


class Jpeg2000Codec(Codec):
    codec_id: ClassVar[str] = "jpeg2000"
    config_class: ClassVar[type[CodecConfig]] = Jpeg2000Config
    __slots__ = ()

    @property
    def config(self) -> Jpeg2000Config:
        return cast(Jpeg2000Config, self._config)

    def _encode_payload(self, arr: Pixels, context: bytes | None) -> EncodedPayload | None:
        if not is_gray_or_rgb(arr):
            return None
        payload = imagecodecs.jpeg2k_encode(
            arr,
            level=0,  # a PSNR target in dB; 0 with reversible=True is lossless
            codecformat="J2K",
            planar=False,
            bitspersample=native_bits(arr),
            reversible=True,
            numthreads=1,
        )
        return EncodedPayload(bytes(payload), arr.dtype)

    @classmethod
    def decode_payload(cls, payload: bytes, header: FrameHeader, context: bytes | None) -> Pixels:
        return imagecodecs.jpeg2k_decode(payload, planar=False, numthreads=1)

    def _library_versions(self) -> dict[str, str]:
        return {"openjpeg": _strip(imagecodecs.jpeg2k_version())}
