"""Codec lookup by id. Built-ins are listed explicitly in ``BUILTIN_CODECS``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from archive.codecs.base import Codec
from archive.codecs.fragment import FragmentCodec
from archive.codecs.htj2k import Htj2kCodec
from archive.codecs.jpeg2000 import Jpeg2000Codec
from archive.codecs.jpegls import JpegLSCodec
from archive.codecs.jpegxl import JpegXLCodec
from archive.codecs.zstd import ZstdCodec
from archive.errors import CodecError

BUILTIN_CODECS: tuple[type[Codec], ...] = (
    JpegLSCodec,
    Jpeg2000Codec,
    Htj2kCodec,
    JpegXLCodec,
    ZstdCodec,
)

_REGISTRY: dict[str, type[Codec]] = {cls.codec_id: cls for cls in BUILTIN_CODECS}
# decodes original lossless fragments kept at ingest; not configurable, so not a built-in codec
_REGISTRY[FragmentCodec.codec_id] = FragmentCodec

C = TypeVar("C", bound=type[Codec])


def register_codec(cls: C) -> C:
    """Register a codec class under its ``codec_id`` (usable as a decorator).

    Re-registering the same class is a no-op; a different class under an id
    already taken is refused.
    """
    if not (isinstance(cls, type) and issubclass(cls, Codec)):
        raise CodecError(f"{cls!r} is not a Codec subclass")
    codec_id = getattr(cls, "codec_id", None)
    if not isinstance(codec_id, str) or not codec_id or not codec_id.isascii() or len(codec_id) > 255:
        raise CodecError(f"{cls.__name__} has no valid codec_id")
    existing = _REGISTRY.get(codec_id)
    if existing is not None and existing is not cls:
        raise CodecError(f"codec id {codec_id!r} is already registered to {existing.__name__}")
    _REGISTRY[codec_id] = cls
    return cls


def registered_codecs() -> list[str]:
    """Ids of every registered codec, sorted."""
    return sorted(_REGISTRY)


def codec_class(codec_id: str) -> type[Codec]:
    try:
        return _REGISTRY[codec_id]
    except KeyError:
        raise CodecError(f"unknown codec id {codec_id!r}; known: {registered_codecs()}") from None


def get_codec(config: Mapping[str, Any]) -> Codec:
    """Build a codec from a config dict; ``config["id"]`` picks the class."""
    if not isinstance(config, Mapping):
        raise CodecError(f"codec config must be a mapping, not {type(config).__name__}")
    codec_id = config.get("id")
    if not isinstance(codec_id, str):
        raise CodecError(f"codec config needs a string 'id', got {codec_id!r}")
    return codec_class(codec_id).from_config(config)
