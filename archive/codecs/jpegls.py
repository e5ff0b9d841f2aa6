"""JPEG-LS (CharLS) lossless: the archive default.

Encoding goes through pyjpegls with the REAL bit depth of the offset-mapped
data (imagecodecs' encoder always writes P = 16 for uint16 input, which costs
15-20 % on 12-bit MR). Samples are mapped to unsigned by subtracting the frame
minimum and stored as uint8 whenever the range fits in 8 bits: that also
sidesteps pyjpegls 1.5.1 corrupting uint16 buffers whose maximum is < 256.
Colour uses line interleave (ILV 1): smallest of the three modes on the
colour images we measured. Decoding uses imagecodecs (same CharLS, faster).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, cast

import imagecodecs
import jpeg_ls

from archive.codecs._pixels import Pixels, is_gray_or_rgb, offset_to_unsigned
from archive.codecs.base import Codec, CodecConfig, EncodedPayload, _strip, check_int, dist_version
from archive.codecs.frame import FrameHeader

_MAX_DIM = 65535  # pyjpegls limit on rows and columns
_ILV_LINE = 1


@dataclass(frozen=True)
class JpegLSConfig(CodecConfig):
    """``near`` = 0 is lossless; N > 0 is JPEG-LS near-lossless: every sample within N of the original."""

    near: int = 0

    def validate(self) -> None:
        check_int("near", self.near, 0, 255)


class JpegLSCodec(Codec):
    codec_id: ClassVar[str] = "jpegls"
    config_class: ClassVar[type[CodecConfig]] = JpegLSConfig
    __slots__ = ()

    @property
    def config(self) -> JpegLSConfig:
        return cast(JpegLSConfig, self._config)

    @property
    def max_error(self) -> int:
        return self.config.near

    def get_config(self) -> dict[str, Any]:
        """``{"id": "jpegls"}`` for the lossless default, as stored encodings have always recorded it."""
        return {"id": self.codec_id} if self.config.near == 0 else super().get_config()

    def _encode_payload(self, arr: Pixels, context: bytes | None) -> EncodedPayload | None:
        if not is_gray_or_rgb(arr):
            return None
        rows, cols = arr.shape[0], arr.shape[1]
        if rows > _MAX_DIM or cols > _MAX_DIM:
            return None
        mapped, offset, bits = offset_to_unsigned(arr)
        samples = 1 if arr.ndim == 2 else 3
        try:
            # Pixel-interleaved input is what CharLS wants for ILV 1 and 2
            # (pyjpegls' docstring claims colour-by-line input for ILV 1: wrong).
            payload = jpeg_ls.encode_buffer(
                mapped.tobytes(), rows, cols, samples, max(2, bits), self.config.near, 0 if samples == 1 else _ILV_LINE
            )
        except RuntimeError as exc:
            # pyjpegls sizes its output buffer at 2x the raw input; for tiny
            # frames the JPEG-LS header alone does not fit. imagecodecs' CharLS
            # has no such limit (it writes P = 8 or 16, irrelevant at this size).
            if "too small" not in str(exc):
                raise
            payload = imagecodecs.jpegls_encode(mapped, level=self.config.near or None)
        return EncodedPayload(bytes(payload), mapped.dtype, offset)

    @classmethod
    def decode_payload(cls, payload: bytes, header: FrameHeader, context: bytes | None) -> Pixels:
        return imagecodecs.jpegls_decode(payload)

    def _library_versions(self) -> dict[str, str]:
        return {"charls": _strip(imagecodecs.jpegls_version()), "pyjpegls": dist_version("pyjpegls")}
