"""The codec contract, in the spirit of numcodecs, kept small and typed.

A codec turns one frame -- a 2-D (rows, cols) or colour (rows, cols, 3) array
of uint8, int8, uint16 or int16 -- into a self-describing frame container
(see :mod:`archive.codecs.frame`) and back, bit-exactly. Codecs are immutable
and configured by a frozen dataclass; ``get_config``/``from_config`` round-trip
through JSON.

Subclasses implement ``_encode_payload`` (return ``None`` when the input is
one the library cannot take: the base class then falls back to zstd and
records "zstd" as the actual codec) and the classmethod ``decode_payload``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib.metadata
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import imagecodecs
import numpy as np

from archive.codecs._pixels import (
    FALLBACK_ZSTD_LEVEL,
    Pixels,
    validate_pixels,
    zstd_encode_raw,
)
from archive.codecs.frame import FrameHeader, decode_frame, pack_frame
from archive.errors import CodecError

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodecConfig:
    """Base of every codec's frozen parameter dataclass."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise CodecError on a bad parameter. Subclasses extend this."""


def check_int(name: str, value: object, lo: int, hi: int) -> None:
    """Config helper: ``value`` must be a real int (not bool) in [lo, hi]."""
    if type(value) is not int or not lo <= value <= hi:
        raise CodecError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")


@dataclass(frozen=True)
class EncodedPayload:
    """What a codec produced for one frame, before it is wrapped."""

    payload: bytes
    payload_dtype: np.dtype[Any]
    offset: int = 0


class Codec(abc.ABC):
    """A lossless (or not) frame codec. Immutable; equal when configs are equal."""

    codec_id: ClassVar[str]
    lossless: ClassVar[bool]
    config_class: ClassVar[type[CodecConfig]]

    __slots__ = ("_config",)
    _config: CodecConfig

    def __init__(self, config: CodecConfig | None = None) -> None:
        if config is None:
            config = self.config_class()
        if type(config) is not self.config_class:
            raise CodecError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        object.__setattr__(self, "_config", config)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @property
    def config(self) -> CodecConfig:
        """The frozen parameter dataclass (subclasses narrow the type)."""
        return self._config

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and type(other) is type(self) and other._config == self._config

    def __hash__(self) -> int:
        return hash((type(self), self._config))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self._config).items())
        return f"{type(self).__name__}({params})"

    # -- configuration -----------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        """JSON-serialisable config: {"id": codec_id, **parameters}."""
        return {"id": self.codec_id, **dataclasses.asdict(self._config)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """Build a codec from ``get_config()`` output; unknown keys are rejected."""
        if not isinstance(config, Mapping):
            raise CodecError(f"codec config must be a mapping, not {type(config).__name__}")
        if "id" in config and config["id"] != cls.codec_id:
            raise CodecError(f"config id {config['id']!r} does not match codec {cls.codec_id!r}")
        params = {k: v for k, v in config.items() if k != "id"}
        known = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise CodecError(f"unknown parameter(s) for codec {cls.codec_id!r}: {unknown}")
        return cls(cls.config_class(**params))

    def library_versions(self) -> dict[str, str]:
        """Versions of the libraries this codec (and its zstd fallback) uses."""
        return {
            "imagecodecs": str(imagecodecs.__version__),
            "numpy": np.__version__,
            "zstd": _strip(imagecodecs.zstd_version()),
            **self._library_versions(),
        }

    def _library_versions(self) -> dict[str, str]:
        return {}

    # -- coding -------------------------------------------------------------

    def encode(self, pixels: Pixels) -> bytes:
        """Encode one frame into a self-describing frame container."""
        arr = validate_pixels(pixels)
        encoded: EncodedPayload | None
        codec_id = self.codec_id
        try:
            encoded = self._encode_payload(arr)
        except CodecError:
            raise
        except Exception as exc:  # a library refused valid input: fall back, loudly
            _log.warning("%s failed on %s %s (%s); falling back to zstd", codec_id, arr.dtype, arr.shape, exc)
            encoded = None
        if encoded is None:
            codec_id = "zstd"
            encoded = EncodedPayload(zstd_encode_raw(arr, FALLBACK_ZSTD_LEVEL), arr.dtype)
        return pack_frame(
            codec_id=codec_id,
            pixels=arr,
            offset=encoded.offset,
            payload_dtype=encoded.payload_dtype,
            payload=encoded.payload,
        )

    def decode(self, data: bytes) -> Pixels:
        """Decode a frame container (whichever codec actually produced it)."""
        return decode_frame(data)

    @abc.abstractmethod
    def _encode_payload(self, arr: Pixels) -> EncodedPayload | None:
        """Encode a validated, C-contiguous little-endian frame, or return None."""

    @classmethod
    @abc.abstractmethod
    def decode_payload(cls, payload: bytes, header: FrameHeader) -> Pixels:
        """Decode this codec's payload to an array of header.payload_dtype/shape."""


def _strip(version: str) -> str:
    """'charls 2.4.3' -> '2.4.3'."""
    return version.rsplit(" ", 1)[-1]


@functools.cache
def dist_version(name: str) -> str:
    """An installed distribution's version (cached: a metadata look-up costs about a millisecond)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
