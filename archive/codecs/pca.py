"""``pca``: principal component analysis as a transform coder (lossy, no per-pixel bound).

Two modes. ``block = B`` (default 8): a KLT on non-overlapping BxB patches (edge
blocks padded by replication), the way a transform coder uses PCA. ``block = 0``:
the classic per-image PCA, rows as samples, keep k components.

How much to keep comes from exactly one target (``variance`` by default 0.98,
``components``, ``psnr`` or ``bpp``). The variance target is read as a
distortion target, MSE = (1 - variance) x total variance, and met by reverse
water-filling over the eigenvalues: a level theta (per coefficient), components
with eigenvalue above it kept (so the kept share of variance is >= the target),
and one uniform quantizer step sqrt(12 theta) for every kept coefficient
(equal steps are MSE-optimal after an orthonormal transform). ``components = k``
puts the level at the (k+1)-th eigenvalue; ``psnr`` sets the MSE from
peak = 2^bits - 1 with bits the bit length of the frame's value range
(max - min), since DICOM BitsStored is unknown to a codec and often overstates
the range; ``bpp`` bisects the level until the payload fits the budget.

Quantization is a dead-zone uniform quantizer (rounding offset 0.5 for the
first component, which carries the smooth DC-like signal, DEADZONE_ROUNDING for
the others), reconstruction at q x step. Per component the coder picks no,
horizontal or vertical DPCM of the coefficient grid, and codes components in
order with contexts from the activity already decoded in the same block
(:mod:`._entropy`, constriction range coding with integer tables in the stream).

The basis is fitted per frame and stored in the payload, rounded to integers
with a precision chosen from the target (counted in the rate); or fitted per
series by :meth:`PcaCodec.fit`, whose context blob (integer mean + full integer
basis) the payload then references. Decoding is integer only: int64 matmul of
the quantized coefficients with the integer basis, rounding shift, clip, so the
bits are the same on any machine and thread count.

Colour (rows, cols, 3) frames are not taken (``None``: the zstd fallback).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import numpy as np
import numpy.typing as npt

from archive.codecs._entropy import SymbolReader, SymbolWriter, get_varint, put_varint
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

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

DEFAULT_VARIANCE = 0.98
#: rounding offset of the dead-zone quantizer for components after the first
DEADZONE_ROUNDING = 0.35
#: step is stored in 1/16 units
_STEP_FRAC_BITS = 4
#: basis precision of a series context (bits after the binary point)
_CONTEXT_BASIS_BITS = 15
_MAGIC = b"PC"
_CONTEXT_MAGIC = b"PCX1"
_VERSION = 1
_FLAG_CONTEXT = 1
_MAX_BLOCK = 32
_MAX_ROW_DIM = 4096  # block = 0: the basis is cols x cols
#: activity thresholds of the coding contexts (|q| summed over earlier components, own block and neighbours)
_ACTIVITY_EDGES = np.array([1, 3, 6, 12, 24, 48, 96], dtype=np.int64)
_N_CTX = len(_ACTIVITY_EDGES) + 1
_TARGETS = ("variance", "components", "psnr", "bpp")


@dataclass(frozen=True)
class PcaConfig(CodecConfig):
    """At most one target: variance share, components k, PSNR (dB) or bits per pixel; none means variance 0.98."""

    variance: float | None = None
    components: int | None = None
    psnr: float | None = None
    bpp: float | None = None
    block: int = 8

    def validate(self) -> None:
        given = [name for name in _TARGETS if getattr(self, name) is not None]
        if len(given) > 1:
            raise CodecError(f"pca takes exactly one target, got {given}")
        check_int("block", self.block, 0, _MAX_BLOCK)
        if self.block == 1:
            raise CodecError("block must be 0 (per-image PCA) or 2..32")
        if self.variance is not None:
            _check_float("variance", self.variance, 0.0, 1.0, open_hi=True)
        if self.components is not None:
            check_int("components", self.components, 1, 1 << 16)
        if self.psnr is not None:
            _check_float("psnr", self.psnr, 1.0, 200.0)
        if self.bpp is not None:
            _check_float("bpp", self.bpp, 0.001, 32.0)

    def target(self) -> tuple[str, float]:
        for name in _TARGETS:
            value = getattr(self, name)
            if value is not None:
                return name, float(value)
        return "variance", DEFAULT_VARIANCE


def _check_float(name: str, value: object, lo: float, hi: float, *, open_hi: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(cast(float, value))
        ok = lo < v < hi if open_hi else lo <= v <= hi
    if not ok:
        raise CodecError(f"{name} must be a number in {lo}..{hi}, got {value!r}")


# -- geometry -------------------------------------------------------------------


def _grid(shape: tuple[int, int], block: int) -> tuple[int, int, int]:
    """(ny, nx, d): the coefficient grid and the vector dimension of a mode."""
    rows, cols = shape
    if block == 0:
        return rows, 1, cols
    return -(-rows // block), -(-cols // block), block * block


def to_vectors(arr: Pixels, block: int) -> F64:
    """Frame -> (n, d) sample vectors: rows (block 0) or raster-ordered BxB patches, edge-padded."""
    a = arr.astype(np.float64)
    if block == 0:
        return a
    ny, nx, d = _grid(arr.shape, block)
    pad = ((0, ny * block - arr.shape[0]), (0, nx * block - arr.shape[1]))
    a = np.pad(a, pad, mode="edge")
    return a.reshape(ny, block, nx, block).transpose(0, 2, 1, 3).reshape(ny * nx, d)


def from_vectors(vec: I64, shape: tuple[int, int], block: int) -> I64:
    if block == 0:
        return vec
    ny, nx, _ = _grid(shape, block)
    full = vec.reshape(ny, nx, block, block).transpose(0, 2, 1, 3).reshape(ny * block, nx * block)
    return full[: shape[0], : shape[1]]


# -- choosing components and step -------------------------------------------------


def water_level(eig: F64, total_distortion: float) -> float:
    """Reverse water-filling: theta with sum(min(eig, theta)) = total_distortion (per vector)."""
    lam = np.sort(np.maximum(eig, 0.0))
    if total_distortion >= lam.sum():
        return float(lam[-1]) if lam.size else 0.0
    # sum(min(lam, t)) is piecewise linear in t: walk the sorted eigenvalues
    below = np.concatenate(([0.0], np.cumsum(lam)))
    for i, t in enumerate(lam):
        # theta in [lam[i-1], lam[i]]: sum = below[i] + (n - i) * theta
        theta = (total_distortion - below[i]) / (lam.size - i)
        if theta <= t:
            return float(max(theta, 1e-12))
    return float(lam[-1])


def basis_bits(eig: F64, theta: float, d: int) -> I64:
    """Bits of precision per basis row: rounding row i adds eig_i 2^-2b / 12 per pixel, kept below theta / 4d."""
    ratio = np.maximum(eig * d / (3.0 * max(theta, 1e-12)), 2.0)
    return np.clip(np.ceil(0.5 * np.log2(ratio)), 2, 15).astype(np.int64)


def common_basis(rows: I64, row_bits: I64) -> tuple[I64, int]:
    """Rows with their own precision -> one integer matrix at the largest precision (exact shifts)."""
    top = int(row_bits.max(initial=0))
    return rows << (top - row_bits)[:, None], top


def dtype_limits(dtype: np.dtype[Any]) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


# -- coefficient coding ---------------------------------------------------------


def _dpcm(grid: I64, mode: int) -> I64:
    """Residual of a (ny, nx) grid: 0 none, 1 left neighbour (first column from above), 2 upper neighbour."""
    if mode == 0:
        return grid
    g = grid if mode == 1 else grid.T
    r = g.copy()
    r[:, 1:] = g[:, 1:] - g[:, :-1]
    r[1:, 0] = g[1:, 0] - g[:-1, 0]
    return r if mode == 1 else r.T


def _undpcm(res: I64, mode: int) -> I64:
    if mode == 0:
        return res
    r = (res if mode == 1 else res.T).copy()
    r[:, 0] = np.cumsum(r[:, 0])
    g = np.cumsum(r, axis=1)
    return g if mode == 1 else g.T


def _cost(values: I64) -> float:
    """A cheap proxy of coded size: sum of log2(1 + |v|)."""
    return float(np.log2(1.0 + np.abs(values)).sum())


def _contexts(activity: I64, ny: int, nx: int) -> I64:
    """Context of each block: its own activity in earlier components (weight 2) plus its 4 neighbours' (1/2)."""
    g = activity.reshape(ny, nx)
    p = np.pad(g, 1, mode="edge")
    nb = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    score = 4 * g + nb
    return np.searchsorted(_ACTIVITY_EDGES * 2, score.ravel(), side="right").astype(np.int64)


def encode_coefficients(writer: SymbolWriter, q: I64, ny: int, nx: int) -> bytes:
    """Code the (n, k) quantized coefficients; returns the per-component DPCM modes."""
    n, k = q.shape
    modes = bytearray()
    activity = np.zeros(n, np.int64)
    for i in range(k):
        grid = q[:, i].reshape(ny, nx)
        options = [0, 1, 2] if nx > 1 else [0, 2]
        residuals = {m: _dpcm(grid, m) for m in options}
        mode = min(options, key=lambda m: _cost(residuals[m]))
        modes.append(mode)
        ctx = _contexts(activity, ny, nx) if i else None
        writer.write(residuals[mode], ctx, _N_CTX if i else 1)
        if i:
            activity += np.minimum(np.abs(q[:, i]), 1 << 20)
    return bytes(modes)


def decode_coefficients(reader: SymbolReader, modes: bytes, ny: int, nx: int) -> I64:
    n = ny * nx
    k = len(modes)
    q = np.zeros((n, k), np.int64)
    activity = np.zeros(n, np.int64)
    for i, mode in enumerate(modes):
        if mode > 2:
            raise CodecError("pca payload corrupt (dpcm mode)")
        res = reader.read(_contexts(activity, ny, nx), _N_CTX) if i else reader.read(n)
        q[:, i] = _undpcm(res.reshape(ny, nx), mode).ravel()
        if i:
            activity += np.minimum(np.abs(q[:, i]), 1 << 20)
    return q


# -- reconstruction (the only part the decoder runs: integers only) ---------------


def reconstruct(q: I64, step16: int, basis: I64, bits: int, mean: I64, lo: int, hi: int) -> I64:
    """x = mean + round(q * step * basis / 2^bits): int64 matmul, arithmetic shift, clip."""
    shift = bits + _STEP_FRAC_BITS
    acc = np.matmul(q * np.int64(step16), basis)
    acc = (acc + (np.int64(1) << (shift - 1))) >> shift
    out: I64 = np.clip(acc + mean[None, :], lo, hi)
    return out


# -- the codec --------------------------------------------------------------------


@dataclass(frozen=True)
class _Fit:
    """Basis and eigenvalues used to encode one frame."""

    mean: I64  # (d,) integers
    basis: I64  # (m, d) integer rows, scaled by 2^bits
    bits: int
    eig: F64  # (m,) variance of each row's coefficient on this frame
    from_context: bool


def _fit_frame(x: F64) -> tuple[I64, F64, F64]:
    """Integer mean, eigenvalues (descending) and unit eigenvectors (rows) of the sample vectors."""
    mean = np.rint(x.mean(axis=0)).astype(np.int64)
    xc = x - mean
    cov = (xc.T @ xc) / max(1, x.shape[0])
    eig, vec = np.linalg.eigh(cov)
    order = np.argsort(eig)[::-1]
    eig = np.maximum(eig[order], 0.0)
    vec = vec[:, order].T
    # a fixed sign per eigenvector (largest entry positive) keeps the coefficients' signs stable
    sign = np.sign(vec[np.arange(vec.shape[0]), np.abs(vec).argmax(axis=1)])
    return mean, eig, vec * sign[:, None]


def _encode(
    arr: Pixels, cfg: PcaConfig, context: bytes | None, theta_override: float | None = None
) -> tuple[bytes, dict[str, Any]]:
    """One encode at the configured target (or at a given water level, for the bpp search)."""
    block = cfg.block
    shape = (int(arr.shape[0]), int(arr.shape[1]))
    ny, nx, d = _grid(shape, block)
    x = to_vectors(arr, block)
    if context is not None:
        cblock, cmean, cbasis, cbits = parse_context(context)
        if cblock != block or cmean.size != d:
            raise CodecError(f"pca context is for block {cblock} / dimension {cmean.size}, not {block} / {d}")
        xc = x - cmean
        coef = xc @ (cbasis.astype(np.float64) / float(1 << cbits)).T
        eig = (coef**2).mean(axis=0)
        fit = _Fit(cmean, cbasis, cbits, eig, True)
        unit_rows: F64 | None = None
    else:
        mean, eig, unit_rows = _fit_frame(x)
        fit = _Fit(mean, np.zeros((0, d), np.int64), 0, eig, False)
        coef = None
    total = float(eig.sum())
    name, value = cfg.target()
    if theta_override is not None:
        theta = theta_override
    elif name == "variance":
        theta = water_level(eig, (1.0 - value) * total)
    elif name == "psnr":
        span = int(arr.max()) - int(arr.min())
        peak = float((1 << max(1, span.bit_length())) - 1)
        theta = water_level(eig, d * peak * peak / 10.0 ** (value / 10.0))
    elif name == "components":
        srt = np.sort(eig)[::-1]
        kk = int(value)
        theta = float(srt[kk]) if kk < srt.size else float(srt[-1]) * 0.5
    else:
        raise CodecError("bpp target is searched by the caller")
    theta = max(theta, 1e-6)
    if fit.from_context:
        above = np.flatnonzero(eig > theta)
        k = int(above[-1]) + 1 if above.size else 1
    else:
        k = max(1, int((eig > theta).sum()))
        if name == "components":
            k = min(int(value), d)
    step = math.sqrt(12.0 * theta)
    step16 = max(1, round(step * (1 << _STEP_FRAC_BITS)))
    step = step16 / float(1 << _STEP_FRAC_BITS)
    row_bits = np.zeros(0, np.int64)
    rows = np.zeros((0, d), np.int64)
    if not fit.from_context:
        assert unit_rows is not None
        row_bits = basis_bits(eig[:k], theta, d)
        rows = np.rint(unit_rows[:k] * (np.int64(1) << row_bits)[:, None]).astype(np.int64)
        basis, bits = common_basis(rows, row_bits)
        fit = _Fit(fit.mean, basis, bits, eig, False)
        vhat = basis.astype(np.float64) / float(1 << bits)
        # least-squares coefficients on the rounded (not exactly orthonormal) basis
        coef = np.asarray(np.linalg.solve(vhat @ vhat.T, vhat @ (x - fit.mean).T).T, dtype=np.float64)
    assert coef is not None
    c = coef[:, :k] / step
    rounding = np.full(k, DEADZONE_ROUNDING)
    rounding[0] = 0.5
    q = (np.sign(c) * np.floor(np.abs(c) + rounding)).astype(np.int64)

    writer = SymbolWriter()
    head = bytearray(_MAGIC)
    head += struct.pack("<BBBB", _VERSION, _FLAG_CONTEXT if fit.from_context else 0, block, fit.bits)
    put_varint(head, k)
    put_varint(head, step16)
    if not fit.from_context:
        head += row_bits.astype(np.uint8).tobytes()
        writer.write(np.diff(fit.mean, prepend=0))
        writer.write(rows)
    side_bytes = len(writer.finish()) if not fit.from_context else 0
    modes = encode_coefficients(writer, q, ny, nx)
    head += modes
    body = writer.finish()
    payload = bytes(head) + body
    kept = float(eig[:k].sum())
    stats: dict[str, Any] = {
        "components": k,
        "variance_explained": kept / total if total > 0 else 1.0,
        "step": step,
        "block": block,
        "basis_bytes": side_bytes,
        "coefficient_bytes": len(payload) - side_bytes,
        "uses_context": fit.from_context,
    }
    return payload, stats


def decode_pca_payload(payload: bytes, shape: tuple[int, int], dtype: np.dtype[Any], context: bytes | None) -> Pixels:
    """Integer-only decoder of a pca payload (shape and dtype come from the frame header)."""
    if len(payload) < 6 or payload[:2] != _MAGIC:
        raise CodecError("not a pca payload")
    version, flags, block, bits = struct.unpack_from("<BBBB", payload, 2)
    if version != _VERSION or flags & ~_FLAG_CONTEXT or block == 1 or block > _MAX_BLOCK or bits > 15:
        raise CodecError("pca payload header corrupt")
    k, pos = get_varint(payload, 6)
    step16, pos = get_varint(payload, pos)
    ny, nx, d = _grid(shape, block)
    if not 1 <= k <= d or not 1 <= step16 < (1 << 40) or pos + k > len(payload):
        raise CodecError("pca payload header corrupt")
    row_bits = np.zeros(0, np.int64)
    if not flags & _FLAG_CONTEXT:
        row_bits = np.frombuffer(payload[pos : pos + k], np.uint8).astype(np.int64)
        pos += k
        if row_bits.size != k or row_bits.max(initial=0) > 15 or row_bits.min(initial=1) < 1:
            raise CodecError("pca payload header corrupt (basis bits)")
    if pos + k > len(payload):
        raise CodecError("pca payload truncated")
    modes = payload[pos : pos + k]
    reader = SymbolReader(payload[pos + k :])
    if flags & _FLAG_CONTEXT:
        if context is None:
            raise CodecError("pca payload needs its series context (basis)")
        cblock, mean, cbasis, bits = parse_context(context)
        if cblock != block or mean.size != d or cbasis.shape[0] < k:
            raise CodecError("pca context does not match the payload")
        basis = cbasis[:k]
    else:
        mean = np.cumsum(reader.read(d))
        rows = reader.read(d * k).reshape(k, d)
        if np.any(np.abs(rows) > (np.int64(2) << row_bits)[:, None]) or np.abs(mean).max(initial=0) > (1 << 17):
            raise CodecError("pca payload corrupt (basis)")
        basis, top = common_basis(rows, row_bits)
        if top != bits:
            raise CodecError("pca payload header corrupt (basis bits)")
    q = decode_coefficients(reader, bytes(modes), ny, nx)
    if np.abs(q).max(initial=0) > (1 << 30):
        raise CodecError("pca payload corrupt (coefficients)")
    lo, hi = dtype_limits(dtype)
    vec = reconstruct(q, step16, basis, bits, mean, lo, hi)
    return from_vectors(vec, shape, block).astype(dtype)


def make_context(frames: Sequence[Pixels], block: int) -> bytes:
    """Fit one integer mean and full integer basis on all frames of a series (block 0: same width needed)."""
    if not frames:
        raise CodecError("pca fit needs at least one frame")
    vecs = []
    for f in frames:
        a = np.asarray(f)
        if a.ndim != 2 or a.dtype.kind not in "ui":
            raise CodecError("pca fit takes 2-D integer frames")
        vecs.append(to_vectors(a, block))
    d = vecs[0].shape[1]
    if any(v.shape[1] != d for v in vecs):
        raise CodecError("pca fit with block 0 needs frames of one width")
    if d > _MAX_ROW_DIM:
        raise CodecError("pca fit: frame too wide for block 0")
    x = np.concatenate(vecs)
    mean, _eig, rows = _fit_frame(x)
    basis = np.rint(rows * (1 << _CONTEXT_BASIS_BITS)).astype("<i4")
    return (
        _CONTEXT_MAGIC
        + struct.pack("<BHB", block, d, _CONTEXT_BASIS_BITS)
        + mean.astype("<i4").tobytes()
        + basis.tobytes()
    )


def parse_context(context: bytes) -> tuple[int, I64, I64, int]:
    """(block, mean, basis rows, basis bits) from a context blob."""
    if len(context) < 8 or context[:4] != _CONTEXT_MAGIC:
        raise CodecError("not a pca context blob")
    block, d, bits = struct.unpack_from("<BHB", context, 4)
    if len(context) != 8 + 4 * d + 4 * d * d or bits > 15 or d == 0:
        raise CodecError("pca context blob corrupt")
    mean = np.frombuffer(context, "<i4", d, 8).astype(np.int64)
    basis = np.frombuffer(context, "<i4", d * d, 8 + 4 * d).astype(np.int64).reshape(d, d)
    return block, mean, basis, bits


class PcaCodec(Codec):
    """Block (KLT) or per-image PCA, quantized and entropy coded; lossy, no per-pixel bound."""

    codec_id: ClassVar[str] = "pca"
    config_class: ClassVar[type[CodecConfig]] = PcaConfig
    __slots__ = ()

    @property
    def config(self) -> PcaConfig:
        return cast(PcaConfig, self._config)

    @property
    def max_error(self) -> int | None:
        return None

    def fit(self, frames: Sequence[Pixels]) -> bytes | None:
        """A series basis (integer mean + all components) for ``encode(frame, context)``."""
        return make_context(frames, self.config.block)

    def _encode_payload(self, arr: Pixels, context: bytes | None) -> EncodedPayload | None:
        if arr.ndim != 2:
            return None  # colour: zstd fallback
        if self.config.block == 0 and (arr.shape[1] > _MAX_ROW_DIM or arr.shape[0] < 2):
            return None
        payload, stats = self.encode_payload_bytes(arr, context)
        return EncodedPayload(payload, arr.dtype, 0, uses_context=context is not None, stats=stats)

    def encode_payload_bytes(self, arr: Pixels, context: bytes | None = None) -> tuple[bytes, dict[str, Any]]:
        """The payload and stats for one 2-D frame (the bpp target searches the water level)."""
        name, value = self.config.target()
        if name != "bpp":
            return _encode(arr, self.config, context)
        budget = value * arr.size / 8.0
        lo_t, hi_t = 1e-3, float(np.var(arr.astype(np.float64))) * arr.size + 1.0
        best: tuple[bytes, dict[str, Any]] | None = None
        for _ in range(24):
            mid = math.sqrt(lo_t * hi_t)
            payload, stats = _encode(arr, self.config, context, theta_override=mid)
            if len(payload) <= budget:
                best, hi_t = (payload, stats), mid
            else:
                lo_t = mid
            if hi_t / lo_t < 1.05:
                break
        if best is None:
            best = _encode(arr, self.config, context, theta_override=hi_t)
        return best

    @classmethod
    def decode_payload(cls, payload: bytes, header: FrameHeader, context: bytes | None) -> Pixels:
        if len(header.shape) != 2:
            raise CodecError("pca payloads are 2-D")
        shape = (int(header.shape[0]), int(header.shape[1]))
        return decode_pca_payload(payload, shape, header.dtype, context)

    def _library_versions(self) -> dict[str, str]:
        return {"constriction": dist_version("constriction")}
