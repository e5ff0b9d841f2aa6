"""JPEG-XL lossless (libjxl, modular mode).

libjxl takes unsigned samples only: the frame minimum is subtracted (uint8
when the range fits in 8 bits, else uint16) and ``bitspersample`` is the real
bit depth of the mapped range. ``effort`` trades speed for size (ANCHORS:
e7 4.48 bpp at ~5 MB/s, e3 4.59 bpp at ~44 MB/s on CT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

import imagecodecs

from archive.codecs._pixels import Pixels, is_gray_or_rgb, offset_to_unsigned
from archive.codecs.base import Codec, CodecConfig, EncodedPayload, _strip, check_int
from archive.codecs.frame import FrameHeader


@dataclass(frozen=True)
class JpegXLConfig(CodecConfig):
    effort: int = 7

    def validate(self) -> None:
        check_int("jpegxl effort", self.effort, 1, 9)


class JpegXLCodec(Codec):
    codec_id: ClassVar[str] = "jpegxl"
    config_class: ClassVar[type[CodecConfig]] = JpegXLConfig
    __slots__ = ()

    @property
    def config(self) -> JpegXLConfig:
        return cast(JpegXLConfig, self._config)

    def _encode_payload(self, arr: Pixels, context: bytes | None) -> EncodedPayload | None:
        if not is_gray_or_rgb(arr):
            return None
        mapped, offset, bits = offset_to_unsigned(arr)
        payload = imagecodecs.jpegxl_encode(
            mapped,
            lossless=True,
            effort=self.config.effort,
            bitspersample=bits,
            planar=False,
            numthreads=1,
        )
        return EncodedPayload(bytes(payload), mapped.dtype, offset)

    @classmethod
    def decode_payload(cls, payload: bytes, header: FrameHeader, context: bytes | None) -> Pixels:
        return imagecodecs.jpegxl_decode(payload, numthreads=1)

    def _library_versions(self) -> dict[str, str]:
        return {"libjxl": _strip(imagecodecs.jpegxl_version())}
