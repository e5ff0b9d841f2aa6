"""The "bounded" codec: any inner codec plus a quantized residual, |error| <= N guaranteed.

``{"id": "bounded", "inner": {...any codec config...}, "max_error": N}``

Why a wrapper: the mission's lossy methods (pca, kmeans) promise no per-pixel
bound, and an archive needs one. Encoding runs the inner codec, decodes its
bytes exactly as a reader will (decoding is deterministic by contract: integer
arithmetic, CRC-checked) and codes what is left with step 2N + 1, whichever
of two ways is smaller (see :mod:`archive.codecs._residual`): JPEG-LS lossless
on the residual quantized against the inner reconstruction, or a context model
that quantizes the error of a prediction using the inner reconstruction as
side information. Either way every pixel ends within N of the original (N = 0
is lossless), and the encoder checks it before returning.

Payload (little-endian)::

    u8 format (1) | u8 residual coder | u16 N | u32 inner length
    inner frame container (a complete frame: its own header, CRCs, context digest)
    residual bytes

A frame whose inner codec used a context blob (a series basis or palette)
names the same blob, and decoding hands it down. A bounded inner is refused:
only the outer bound counts, so the nesting would buy nothing.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, cast

import numpy as np

from archive.codecs import _residual
from archive.codecs._pixels import Pixels
from archive.codecs.base import (
    Codec,
    CodecConfig,
    EncodedPayload,
    check_int,
    dist_version,
)
from archive.codecs.frame import FrameHeader, decode_frame, read_frame_header
from archive.errors import CodecError

_FORMAT: Final = 1
_HEAD: Final = struct.Struct("<BBHI")  # format, residual coder, N, inner length
MAX_ERROR_LIMIT: Final = 32767  # step 2N + 1 fits 16 bits


@dataclass(frozen=True)
class BoundedConfig(CodecConfig):
    """``inner``: the inner codec's config (a JSON dict, required); ``max_error``: N >= 0."""

    inner: dict[str, Any] | None = None
    max_error: int = 0

    def validate(self) -> None:
        check_int("max_error", self.max_error, 0, MAX_ERROR_LIMIT)
        if not isinstance(self.inner, Mapping):
            raise CodecError(
                f"bounded needs an 'inner' codec config (a dict), got {self.inner!r}"
            )
        if self.inner.get("id") == BoundedCodec.codec_id:
            raise CodecError("bounded cannot wrap bounded: only the outer bound counts")
        from archive.codecs.registry import get_codec

        inner = get_codec(self.inner)  # raises CodecError on a bad inner config
        if not type(inner).deterministic:
            raise CodecError(f"bounded cannot wrap {inner.codec_id!r}: its reconstruction may differ by a unit on "
                             "another machine, so no bound on the residual could be promised")
        try:
            json.dumps(self.inner, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise CodecError(f"bounded 'inner' must be JSON: {exc}") from exc

    def __post_init__(self) -> None:
        super().__post_init__()
        # a private copy: the caller's dict may change later, the frozen config must not
        object.__setattr__(self, "inner", json.loads(json.dumps(self.inner)))

    def __hash__(self) -> int:  # the inner dict is not hashable; its canonical JSON is
        return hash((json.dumps(self.inner, sort_keys=True), self.max_error))


class BoundedCodec(Codec):
    codec_id: ClassVar[str] = "bounded"
    config_class: ClassVar[type[CodecConfig]] = BoundedConfig
    __slots__ = ()

    @property
    def config(self) -> BoundedConfig:
        return cast(BoundedConfig, self._config)

    @property
    def max_error(self) -> int | None:
        return self.config.max_error

    @property
    def inner(self) -> Codec:
        """The inner codec (built from the validated config)."""
        from archive.codecs.registry import get_codec

        assert self.config.inner is not None  # validated
        return get_codec(self.config.inner)

    def fit(self, frames: Sequence[Pixels]) -> bytes | None:
        """The inner codec's shared side information: the residual needs none."""
        return self.inner.fit(frames)

    def _encode_payload(
        self, arr: Pixels, context: bytes | None
    ) -> EncodedPayload | None:
        n = self.config.max_error
        inner_bytes, inner_stats = self.inner.encode_with_stats(arr, context)
        inner_header = read_frame_header(inner_bytes)
        inner_context = context if inner_header.context_sha256 is not None else None
        recon = decode_frame(inner_bytes, inner_context)
        _check_inner(recon, arr.dtype, arr.shape)
        coder, residual, out = _residual.encode_residual(arr, recon, n)
        worst = int(np.abs(np.subtract(out, arr, dtype=np.int64)).max())
        if (
            worst > n
        ):  # cannot happen (clipping only moves toward the original); never store a broken promise
            raise CodecError(
                f"bounded: reconstruction error {worst} exceeds max_error {n}"
            )
        payload = (
            _HEAD.pack(_FORMAT, coder, n, len(inner_bytes)) + inner_bytes + residual
        )
        stats: dict[str, Any] = {
            "inner_codec": inner_header.codec_id,
            "inner_bytes": len(inner_bytes),
            "residual_bytes": len(residual),
            "residual_coder": _residual.CODER_NAMES[coder],
            "max_error": n,
            "measured_max_error": worst,
            "inner_stats": dict(inner_stats),
        }
        return EncodedPayload(
            payload,
            arr.dtype,
            0,
            uses_context=inner_header.context_sha256 is not None,
            stats=stats,
        )

    @classmethod
    def decode_payload(
        cls, payload: bytes, header: FrameHeader, context: bytes | None
    ) -> Pixels:
        if len(payload) < _HEAD.size:
            raise CodecError("bounded: truncated payload")
        fmt, coder, n, inner_length = _HEAD.unpack_from(payload)
        if fmt != _FORMAT:
            raise CodecError(f"bounded: unknown payload format {fmt}")
        if n > MAX_ERROR_LIMIT:
            raise CodecError(f"bounded: payload gives max_error {n}")
        end = _HEAD.size + inner_length
        if end > len(payload):
            raise CodecError("bounded: truncated inner frame")
        inner_bytes = payload[_HEAD.size : end]
        inner_header = read_frame_header(inner_bytes)
        if inner_header.codec_id == cls.codec_id:
            raise CodecError("bounded: payload nests a bounded frame")
        if inner_header.context_sha256 != header.context_sha256:
            raise CodecError(
                "bounded: inner frame names another context than the outer frame"
            )
        recon = decode_frame(inner_bytes, context)
        _check_inner(recon, header.dtype, header.shape)
        return _residual.decode_residual(coder, payload[end:], recon, n, header.dtype)

    def _library_versions(self) -> dict[str, str]:
        return {
            "constriction": dist_version("constriction"),
            "pyjpegls": dist_version("pyjpegls"),
            **{f"inner:{k}": v for k, v in self.inner.library_versions().items()},
        }


def _check_inner(recon: Pixels, dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
    if recon.shape != tuple(shape) or recon.dtype.newbyteorder("<") != np.dtype(
        dtype
    ).newbyteorder("<"):
        raise CodecError(
            f"bounded: inner frame decodes to {recon.dtype} {recon.shape}, expected {dtype} {shape}"
        )
