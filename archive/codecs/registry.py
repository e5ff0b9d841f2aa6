"""Codec lookup by id. Built-ins are named in ``BUILTIN_CODECS`` and imported when first used.

Registration is lazy (id -> "module:Class") so that a heavy codec (scikit-learn,
constriction, later PyTorch) costs nothing to a process that never uses it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Final, TypeVar

from archive.codecs.base import Codec
from archive.errors import CodecError

#: Every built-in codec, by id: "module:Class". The lossless standard codecs come first.
BUILTIN_CODECS: Final[dict[str, str]] = {
    "jpegls": "archive.codecs.jpegls:JpegLSCodec",
    "jpeg2000": "archive.codecs.jpeg2000:Jpeg2000Codec",
    "htj2k": "archive.codecs.htj2k:Htj2kCodec",
    "jpegxl": "archive.codecs.jpegxl:JpegXLCodec",
    "zstd": "archive.codecs.zstd:ZstdCodec",
    "pca": "archive.codecs.pca:PcaCodec",
    "kmeans": "archive.codecs.kmeans:KMeansCodec",
    "bounded": "archive.codecs.bounded:BoundedCodec",
    "auto": "archive.codecs.auto:AutoCodec",
    # learned codecs (archive/learned): their workers can take a queue of their own (setting learned_queue)
    "learned": "archive.codecs.learned:LearnedCodec",
    "gan": "archive.codecs.gan:GanCodec",
    # decodes original lossless fragments kept at ingest; not configurable (from_config refuses)
    "dicom-fragment": "archive.codecs.fragment:FragmentCodec",
}

#: Codecs that run a learned model: their work goes to the learned queue (see :class:`archive.kinds.Lane`).
LEARNED_CODECS: Final[frozenset[str]] = frozenset({"learned", "gan"})

#: The lossless standard codecs, in the order a trial lists them.
LOSSLESS_STANDARD: Final[tuple[str, ...]] = ("jpegls", "jpeg2000", "htj2k", "jpegxl", "zstd")

_LOADED: dict[str, type[Codec]] = {}
_EXTRA: dict[str, type[Codec]] = {}

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
    existing = _EXTRA.get(codec_id) or (codec_class(codec_id) if codec_id in BUILTIN_CODECS else None)
    if existing is not None and existing is not cls:
        raise CodecError(f"codec id {codec_id!r} is already registered to {existing.__name__}")
    _EXTRA[codec_id] = cls
    return cls


def registered_codecs() -> list[str]:
    """Ids of every registered codec (built-in or registered), sorted; nothing is imported."""
    return sorted(set(BUILTIN_CODECS) | set(_EXTRA))


def codec_class(codec_id: str) -> type[Codec]:
    """The class of a codec id, importing its module on first use."""
    cls = _LOADED.get(codec_id) or _EXTRA.get(codec_id)
    if cls is not None:
        return cls
    target = BUILTIN_CODECS.get(codec_id)
    if target is None:
        raise CodecError(f"unknown codec id {codec_id!r}; known: {registered_codecs()}")
    module_name, _, class_name = target.partition(":")
    try:
        loaded = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise CodecError(f"codec {codec_id!r} is not available: {exc}") from exc
    _LOADED[codec_id] = loaded
    return loaded  # type: ignore[no-any-return]


def uses_learned_codec(config: object) -> bool:
    """Whether a codec config runs a learned model anywhere (as itself, a bounded inner or an auto candidate)."""
    if isinstance(config, Mapping):
        if config.get("id") in LEARNED_CODECS:
            return True
        return any(uses_learned_codec(v) for k, v in config.items() if k in ("inner", "candidates"))
    if isinstance(config, (list, tuple)):
        return any(uses_learned_codec(c) for c in config)
    return False


def get_codec(config: Mapping[str, Any]) -> Codec:
    """Build a codec from a config dict; ``config["id"]`` picks the class."""
    if not isinstance(config, Mapping):
        raise CodecError(f"codec config must be a mapping, not {type(config).__name__}")
    codec_id = config.get("id")
    if not isinstance(codec_id, str):
        raise CodecError(f"codec config needs a string 'id', got {codec_id!r}")
    return codec_class(codec_id).from_config(config)
