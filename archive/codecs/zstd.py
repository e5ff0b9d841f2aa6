"""zstd on the raw little-endian sample bytes: the universal fallback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

from archive.codecs._pixels import Pixels, zstd_decode_raw, zstd_encode_raw
from archive.codecs.base import Codec, CodecConfig, EncodedPayload, check_int
from archive.codecs.frame import FrameHeader


@dataclass(frozen=True)
class ZstdConfig(CodecConfig):
    level: int = 19

    def validate(self) -> None:
        check_int("zstd level", self.level, 1, 22)


class ZstdCodec(Codec):
    codec_id: ClassVar[str] = "zstd"
    config_class: ClassVar[type[CodecConfig]] = ZstdConfig
    __slots__ = ()

    @property
    def config(self) -> ZstdConfig:
        return cast(ZstdConfig, self._config)

    def _encode_payload(self, arr: Pixels, context: bytes | None) -> EncodedPayload | None:
        return EncodedPayload(zstd_encode_raw(arr, self.config.level), arr.dtype)

    @classmethod
    def decode_payload(cls, payload: bytes, header: FrameHeader, context: bytes | None) -> Pixels:
        return zstd_decode_raw(payload, header.payload_dtype, header.shape)
