"""``learned``: a learned predictive codec, lossless (``max_error`` 0) or near-lossless (|error| <= N).

A small integer MLP per coarse-to-fine phase predicts each pixel's mean and scale from the pixels
already decoded; residuals (quantized with step 2N + 1 when N > 0) are range coded with constriction
under fixed integer tables of the shipped bundle. Inference is exact integer arithmetic, so the codec
is deterministic on any machine and thread count (see :mod:`archive.learned.predictive`). torch is
not needed here: the bundle is read with safetensors' numpy loader.

The payload names the bundle and the first 8 bytes of its weights' SHA-256: decoding with other
weights is a CodecError, never other pixels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, cast

import numpy as np

from archive.codecs._pixels import Pixels
from archive.codecs.base import (
    Codec,
    CodecConfig,
    EncodedPayload,
    check_int,
    dist_version,
)
from archive.codecs.frame import FrameHeader
from archive.errors import CodecError
from archive.learned import predictive
from archive.learned.bundle import MODELS_DIR, load_bundle

DEFAULT_MODEL = "learned-v1"


@dataclass(frozen=True)
class LearnedConfig(CodecConfig):
    """``max_error`` 0 is lossless; N > 0 bounds every pixel's error by N. ``model``: a shipped bundle name."""

    max_error: int = 0
    model: str = DEFAULT_MODEL

    def validate(self) -> None:
        check_int("max_error", self.max_error, 0, 255)
        if not isinstance(self.model, str) or not self.model.replace("-", "").replace("_", "").isalnum() \
                or not (MODELS_DIR / self.model).is_dir():
            raise CodecError(f"learned: no shipped model bundle {self.model!r}")


@functools.cache
def int_model(name: str) -> predictive.IntModel:
    """The bundle's integer model (cached per process)."""
    bundle = load_bundle(name)
    if bundle.manifest.get("model") != "learned":
        raise CodecError(f"bundle {name!r} is not a learned predictive model")
    return predictive.model_from_tensors(bundle.tensors, bytes.fromhex(bundle.weights_sha256)[:8])


class LearnedCodec(Codec):
    codec_id: ClassVar[str] = "learned"
    config_class: ClassVar[type[CodecConfig]] = LearnedConfig
    deterministic: ClassVar[bool] = True
    __slots__ = ()

    @property
    def config(self) -> LearnedConfig:
        return cast(LearnedConfig, self._config)

    @property
    def max_error(self) -> int:
        return self.config.max_error

    def _encode_payload(self, arr: Pixels, context: bytes | None) -> EncodedPayload | None:
        if arr.ndim != 2 or arr.dtype.kind not in "ui" or arr.dtype.itemsize > 2:
            return None
        model = int_model(self.config.model)
        payload, stats = predictive.encode_image(model, self.config.model, arr.astype(np.int64),
                                                 self.config.max_error)
        return EncodedPayload(payload, arr.dtype, 0, stats={"model": self.config.model, **stats})

    @classmethod
    def decode_payload(cls, payload: bytes, header: FrameHeader, context: bytes | None) -> Pixels:
        name, fields, _pos = predictive.read_head(payload)
        if len(header.shape) != 2 or tuple(fields[3:5]) != header.shape:
            raise CodecError(f"learned payload shape {tuple(fields[3:5])} does not match the frame {header.shape}")
        try:
            model = int_model(name)
        except (CodecError, OSError, KeyError) as exc:
            raise CodecError(f"learned payload needs model {name!r}, which cannot be loaded: {exc}") from exc
        decoded = predictive.decode_image(model, payload)
        info = np.iinfo(header.payload_dtype)
        if decoded.min() < info.min or decoded.max() > info.max:
            raise CodecError("learned payload decodes outside its dtype (corrupt data)")
        return decoded.astype(header.payload_dtype.newbyteorder("="))

    def _library_versions(self) -> dict[str, str]:
        model = int_model(self.config.model)
        return {"constriction": dist_version("constriction"), "model": f"{self.config.model}@{model.digest.hex()[:12]}"}
