"""The codec contract, in the spirit of numcodecs, kept small and typed.

A codec turns one frame -- a 2-D (rows, cols) or colour (rows, cols, 3) array
of uint8, int8, uint16 or int16 -- into a self-describing frame container
(see :mod:`archive.codecs.frame`) and back. Codecs are immutable and
configured by a frozen dataclass; ``get_config``/``from_config`` round-trip
through JSON.

Whether a codec is lossless is a property of its configuration
(``max_error``: 0 lossless, N a promised per-pixel bound, None no bound). A
codec may fit shared side information on many frames (``fit``: a basis, a
codebook); that *context* blob is handed back to ``encode`` and ``decode``
and named by digest in every frame that needs it, so codecs stay bytes in,
bytes out.

Subclasses implement ``_encode_payload`` (return ``None`` when the input is
one the library cannot take: the base class then falls back to zstd and
records "zstd" as the actual codec) and the classmethod ``decode_payload``.
For a lossy codec the base class decodes the payload once at encode time and
records the CRC of that reconstruction, so decoding on any machine is checked
against it.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib.metadata
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import imagecodecs
import numpy as np

from archive.codecs._pixels import (
    FALLBACK_ZSTD_LEVEL,
    Pixels,
    validate_pixels,
    zstd_encode_raw,
)
from archive.codecs.frame import VERSION, FrameHeader, decode_frame, pack_frame, pixel_crc32, unmap
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
    uses_context: bool = False  # the payload decodes only with the context blob given to encode
    stats: Mapping[str, Any] = field(default_factory=dict)  # what the codec chose (components, k, bytes per part)


class Codec(abc.ABC):
    """A lossless (or not) frame codec. Immutable; equal when configs are equal."""

    codec_id: ClassVar[str]
    config_class: ClassVar[type[CodecConfig]]
    #: decoding gives the same bits on any machine and thread count (the container then checks them)
    deterministic: ClassVar[bool] = True

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

    @property
    def max_error(self) -> int | None:
        """The promised per-pixel bound: 0 for a lossless configuration, None when nothing is promised."""
        return 0

    @property
    def lossless(self) -> bool:
        return self.max_error == 0

    def fit(self, frames: Sequence[Pixels]) -> bytes | None:
        """Shared side information fitted on many frames (a series), or None when the codec has none."""
        return None

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

    def encode(self, pixels: Pixels, context: bytes | None = None) -> bytes:
        """Encode one frame into a self-describing frame container."""
        return self.encode_with_stats(pixels, context)[0]

    def encode_with_stats(self, pixels: Pixels, context: bytes | None = None) -> tuple[bytes, dict[str, Any]]:
        """Encode one frame; also return what the codec chose for it (components kept, k, bytes per part)."""
        arr = validate_pixels(pixels)
        encoded: EncodedPayload | None
        codec_id = self.codec_id
        try:
            encoded = self._encode_payload(arr, context)
        except CodecError:
            raise
        except Exception as exc:  # a library refused valid input: fall back, loudly
            _log.warning("%s failed on %s %s (%s); falling back to zstd", codec_id, arr.dtype, arr.shape, exc)
            encoded = None
        lossy = False
        if encoded is None:
            codec_id = "zstd"
            encoded = EncodedPayload(zstd_encode_raw(arr, FALLBACK_ZSTD_LEVEL), arr.dtype)
        else:
            lossy = not self.lossless
        context_sha256 = hashlib.sha256(context).hexdigest() if encoded.uses_context and context is not None else None
        if encoded.uses_context and context is None:
            raise CodecError(f"{codec_id} says its payload uses a context, but none was given")
        reconstruction_crc = None
        if lossy and self.deterministic:  # one decode now: every later decode must give these bits
            header = FrameHeader(codec_id=codec_id, dtype=arr.dtype, shape=arr.shape, offset=encoded.offset,
                                 payload_dtype=encoded.payload_dtype.newbyteorder("<"), header_length=0,
                                 version=VERSION, lossy=True, context_sha256=context_sha256)
            try:
                decoded = type(self).decode_payload(encoded.payload, header, context if context_sha256 else None)
                reconstruction_crc = pixel_crc32(unmap(decoded, header, check=False))
            except Exception as exc:  # a payload its own decoder refuses is never stored: lossless instead
                _log.warning("%s cannot decode its own payload for %s %s (%s); falling back to zstd",
                             codec_id, arr.dtype, arr.shape, exc)
                codec_id, lossy, context_sha256 = "zstd", False, None
                encoded = EncodedPayload(zstd_encode_raw(arr, FALLBACK_ZSTD_LEVEL), arr.dtype)
        frame = pack_frame(
            codec_id=codec_id,
            pixels=arr,
            offset=encoded.offset,
            payload_dtype=encoded.payload_dtype,
            payload=encoded.payload,
            lossy=lossy,
            deterministic=self.deterministic,
            reconstruction_crc32=reconstruction_crc,
            context_sha256=context_sha256,
        )
        return frame, dict(encoded.stats)

    def decode(self, data: bytes, context: bytes | None = None) -> Pixels:
        """Decode a frame container (whichever codec actually produced it)."""
        return decode_frame(data, context)

    @abc.abstractmethod
    def _encode_payload(self, arr: Pixels, context: bytes | None) -> EncodedPayload | None:
        """Encode a validated, C-contiguous little-endian frame, or return None."""

    @classmethod
    @abc.abstractmethod
    def decode_payload(cls, payload: bytes, header: FrameHeader, context: bytes | None) -> Pixels:
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
