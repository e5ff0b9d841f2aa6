"""Lossless frame codecs: JPEG-LS (default), JPEG 2000, HTJ2K, JPEG-XL, zstd.

Every encoded frame is a self-describing container (:mod:`.frame`) naming the
codec that actually produced it, so ``decode_frame`` needs no configuration.
"""

from __future__ import annotations

from typing import Any, Final

from archive.codecs.base import Codec
from archive.codecs.frame import FrameHeader, decode_frame, read_frame_header
from archive.codecs.registry import get_codec, register_codec, registered_codecs, uses_learned_codec

DEFAULT_CODEC_CONFIG: Final[dict[str, Any]] = {"id": "jpegls"}

__all__ = [
    "DEFAULT_CODEC_CONFIG",
    "Codec",
    "FrameHeader",
    "decode_frame",
    "get_codec",
    "read_frame_header",
    "register_codec",
    "registered_codecs",
    "uses_learned_codec",
]
