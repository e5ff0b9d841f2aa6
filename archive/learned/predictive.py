"""The learned predictive coder: coarse-to-fine contexts, exact integer MLP inference, binned range coding.

Why this shape: decoding must be a few vectorised numpy steps (not a loop per pixel) and must give
the same bits on every machine and thread count, so

* the image is coded coarse to fine (interpolative): the coarsest level (``base``) by a small
  DPCM, then per level three phases (B = odd/odd, C = even/odd, D = odd/even positions of the
  level grid), each one vectorised step over all its pixels, from the neighbours already known;
* the network is a 3-layer MLP per phase whose weights are integers (fixed point); each layer is
  a float64 matrix product of integer-valued operands, exact and order-independent while every
  sum stays below 2^53 (bounded below by clipping, see :func:`mlp`), then a floor division by a
  power of two (exact in float64);
* probabilities come from fixed INTEGER frequency tables, one per scale bin (1/8 octave), stored
  in the bundle; no transcendental function runs at decode time.

For ``max_error`` N > 0 the residual is quantized with step 2N + 1 (as JPEG-LS does) and the
reconstruction is the context of later pixels, so ``|x - x^| <= N`` holds by construction.
The module needs numpy and constriction only (torch trains, see ``train_learned``).
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from typing import Any, Final

import constriction
import numpy as np
import numpy.typing as npt

from archive.codecs._entropy import get_varint, pack_bits, put_varint, unpack_bits, unzigzag, zigzag
from archive.errors import CodecError

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

FORMAT_VERSION: Final[int] = 1
MAX_LEVELS: Final[int] = 5  # pyramid levels above the base (level 0 = full resolution)
MIN_BASE: Final[int] = 4  # the base keeps at least this many pixels on its short side
PAD: Final[int] = 3  # reflect padding of a level grid (keeps parity: known cells stay known)

#: phase name -> (row parity, column parity) inside a level grid
PHASES: Final[tuple[tuple[int, int], ...]] = ((1, 1), (0, 1), (1, 0))
PHASE_NAMES: Final[tuple[str, ...]] = ("B", "C", "D")

IN_SCALE: Final[int] = 16  # inputs and activations are integers in units of 1/16
W_SHIFT: Final[int] = 12  # weights are integers in units of 1/4096
OUT_SCALE: Final[int] = 4096  # outputs (mean offset, log2 scale factor) in units of 1/4096
#: units of each layer's accumulator (and of its stored bias): 2^(4 + W), 2^(4 + 2W), 2^(8 + W)
BIAS_UNITS: Final[tuple[int, int, int]] = (4 + W_SHIFT, 4 + 2 * W_SHIFT, 8 + W_SHIFT)
HIDDEN: Final[int] = 48
FEATURE_CLIP: Final[int] = 1024  # |input| bound (64 local scales)
H1_CLIP: Final[float] = float(1 << 31)  # first hidden layer's bound (units 2^-16)
H2_CLIP: Final[float] = float(1 << 24)  # second hidden layer's bound (units 2^-8)
BIAS_CLIP: Final[int] = 1 << 36
OUT_CLIP: Final[int] = 1 << 22
WEIGHT_CLIP: Final[int] = (1 << 15) - 1

#: scale bins: bin k holds log2(sigma) in [(k + L8_MIN) / 8, (k + L8_MIN + 1) / 8)
L8_MIN: Final[int] = -48
N_BINS: Final[int] = 184
DIRECT: Final[int] = 48  # magnitude buckets coded as symbols of their own; larger ones escape
ESCAPES: Final[int] = 34  # escape symbols: DIRECT + bit length - 1 of the excess
ALPHABET: Final[int] = DIRECT + ESCAPES
TABLE_TOTAL: Final[int] = 1 << 20
TABLE_SETS: Final[int] = 2
assert N_BINS <= 256  # bins are sorted as uint8
assert HIDDEN <= 64  # the exactness bound of mlp()


def _known_offsets(parity: tuple[int, int], radius2: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) within ``radius2`` whose cell is already decoded at this phase, nearest first."""
    py, px = parity
    out = []
    for dy in range(-PAD, PAD + 1):
        for dx in range(-PAD, PAD + 1):
            if dy * dy + dx * dx > radius2 or (dy, dx) == (0, 0):
                continue
            ry, rx = (py + dy) % 2, (px + dx) % 2
            known = (ry, rx) == (0, 0)  # A: the coarser level
            if parity in ((0, 1), (1, 0)):
                known = known or (ry, rx) == (1, 1)  # B
            if parity == (1, 0):
                known = known or (ry, rx) == (0, 1)  # C
            if known:
                out.append((dy, dx))
    out.sort(key=lambda o: (o[0] * o[0] + o[1] * o[1], o))
    return out


#: neighbours gathered per phase (B: 12 A pixels; C: 16; D: 28), the first 4 are the nearest
OFFSETS: Final[tuple[tuple[tuple[int, int], ...], ...]] = tuple(
    tuple(_known_offsets(p, 10)) for p in PHASES
)
N_EXTRA: Final[int] = 2 + MAX_LEVELS  # log local scale, position in the value range, level one-hot (last)
#: nearest known neighbours whose interpolation error |x^ - anchor| is an input (a local noise measure)
N_ERR: Final[int] = 0


def n_inputs(phase: int) -> int:
    return len(OFFSETS[phase]) + N_ERR + N_EXTRA


def _l8_thresholds() -> IntArray:
    """thr[k] = the smallest integer s with s^8 >= 2^k (exact, Python integers)."""
    out = []
    for k in range(8 * 24):
        s = max(1, round(2 ** (k / 8)))
        while s**8 < 2**k:
            s += 1
        while s > 1 and (s - 1) ** 8 >= 2**k:
            s -= 1
        out.append(s)
    return np.array(out, np.int64)


_L8_THR: Final[IntArray] = _l8_thresholds()


_L8_LUT_SIZE: Final[int] = 1 << 14
_L8_LUT: Final[IntArray] = (np.searchsorted(_L8_THR, np.arange(_L8_LUT_SIZE), side="right") - 1).astype(np.int64)


def log2x8(s: IntArray) -> IntArray:
    """floor(8 * log2(s)) for integers s >= 1, exactly (a table look-up and search, no libm)."""
    s = np.asarray(s, np.int64)
    out: IntArray = _L8_LUT[np.minimum(s, _L8_LUT_SIZE - 1)]
    big = np.flatnonzero(s >= _L8_LUT_SIZE)
    if big.size:
        out[big] = np.searchsorted(_L8_THR, s[big], side="right") - 1
    return out


def levels_for(rows: int, cols: int) -> int:
    """Pyramid levels for an image: the base keeps >= MIN_BASE pixels a side; 0 for small images."""
    short = min(rows, cols)
    if short < 2 * MIN_BASE:
        return 0
    return min(MAX_LEVELS, math.floor(math.log2(short / MIN_BASE)))


def bin_shift(k: IntArray | int) -> Any:
    """Low bits of a magnitude sent raw in bin k (keeps the coded bucket's scale at 4-8)."""
    return np.maximum(0, (np.asarray(k) + L8_MIN) // 8 - 2)


# -- model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntModel:
    """Integer weights of the three phase MLPs and the frequency tables, as float64/int64 arrays.

    Per phase: (W1 without the level columns, W1's level columns, b1, W2, b2, W3, b3); biases are
    columns so they broadcast over pixels.
    """

    layers: tuple[tuple[FloatArray, ...], ...]
    tables: IntArray  # (TABLE_SETS, N_BINS, ALPHABET) frequencies, each >= 1: set 0 lossless, set 1 N > 0
    digest: bytes  # first 8 bytes of the weights' SHA-256


TENSOR_NAMES: Final[tuple[str, ...]] = ("w1", "b1", "w2", "b2", "w3", "b3")


def model_from_tensors(tensors: dict[str, npt.NDArray[Any]], digest: bytes) -> IntModel:
    """Build the integer model from bundle tensors (``phase{p}.w1`` ... ``tables``), checking shapes and bounds."""
    layers = []
    for p in range(len(PHASES)):
        sizes = [n_inputs(p), HIDDEN, HIDDEN, 2]
        arrays: list[FloatArray] = []
        for j in range(3):
            w = np.asarray(tensors[f"phase{p}.w{j + 1}"], np.int64)
            b = np.asarray(tensors[f"phase{p}.b{j + 1}"], np.int64)
            if w.shape != (sizes[j + 1], sizes[j]) or b.shape != (sizes[j + 1],):
                raise CodecError(f"model tensor phase{p}.w{j + 1} has shape {w.shape}")
            if np.abs(w).max(initial=0) > WEIGHT_CLIP or np.abs(b).max(initial=0) > BIAS_CLIP:
                raise CodecError("model weights out of the exact-inference bound")
            wf = w.astype(np.float64)
            if j == 0:
                arrays += [np.ascontiguousarray(wf[:, : sizes[0] - MAX_LEVELS]),
                           np.ascontiguousarray(wf[:, sizes[0] - MAX_LEVELS :])]
            else:
                arrays.append(np.ascontiguousarray(wf))
            arrays.append(b.astype(np.float64)[:, None])
        layers.append(tuple(arrays))
    tables = np.asarray(tensors["tables"], np.int64)
    if tables.shape != (TABLE_SETS, N_BINS, ALPHABET) or tables.min() < 1:
        raise CodecError("model frequency tables malformed")
    return IntModel(tuple(layers), tables, digest)


def make_tables() -> IntArray:
    """Integer tables from a discretised logistic per bin, (N_BINS, ALPHABET): the prior of each set
    (computed when a bundle is written, never at decode time)."""
    tables = np.zeros((N_BINS, ALPHABET), np.int64)
    for k in range(N_BINS):
        sigma = 2.0 ** ((k + L8_MIN + 0.5) / 8)
        sh = int(bin_shift(k))

        def cdf_abs(m: npt.NDArray[Any], sigma: float = sigma) -> npt.NDArray[np.float64]:
            """P(|r| <= m) for a logistic of scale sigma centred on 0, m >= -1."""
            out: npt.NDArray[np.float64] = np.where(m < 0, 0.0, np.tanh((m + 0.5) / (2 * sigma)))
            return out

        edges_direct = (np.arange(DIRECT + 1, dtype=np.float64) * (1 << sh)) - 1
        p = np.diff(cdf_abs(edges_direct))
        lo_h = DIRECT - 1 + 2.0 ** np.arange(ESCAPES)  # first bucket of each escape
        hi_h = DIRECT - 1 + 2.0 ** np.arange(1, ESCAPES + 1)
        pe = np.subtract(cdf_abs(hi_h * (1 << sh) - 1), cdf_abs(lo_h * (1 << sh) - 1))
        probs = np.concatenate([p, pe])
        probs = np.maximum(probs, 0.0) / max(probs.sum(), 1e-300)
        tables[k] = np.maximum(1, np.round(probs * TABLE_TOTAL)).astype(np.int64)
    return tables


@functools.lru_cache(maxsize=8)
def _categoricals(digest: bytes, table_set: int, tables_bytes: bytes) -> tuple[Any, ...]:
    """One constriction model per bin, built from the integer tables (ratio of integers: exact)."""
    tables = np.frombuffer(tables_bytes, np.int64).reshape(N_BINS, ALPHABET)
    out = []
    for k in range(N_BINS):
        f = tables[k].astype(np.float64)
        out.append(constriction.stream.model.Categorical(f / f.sum(), perfect=False))
    return tuple(out)


def table_set(max_error: int) -> int:
    """Lossless residuals and quantized ones have tables of their own."""
    return 1 if max_error else 0


def categoricals(model: IntModel, max_error: int) -> tuple[Any, ...]:
    t = table_set(max_error)
    return _categoricals(model.digest, t, np.ascontiguousarray(model.tables[t]).tobytes())


def table_costs(model: IntModel, max_error: int) -> FloatArray:
    """-log2 p per (bin, symbol): the encoder's estimate when it picks the base bin (never used to decode)."""
    t = model.tables[table_set(max_error)].astype(np.float64)
    out: FloatArray = -np.log2(t / t.sum(axis=1, keepdims=True))
    return out


# -- contexts and inference ------------------------------------------------------------------------


def gather(level_grid: IntArray, err_grid: IntArray, phase: int, level: int, lo: int, hi: int
           ) -> tuple[FloatArray, IntArray, IntArray]:
    """Integer inputs (float64 holding integers, one column per pixel), anchor and local scale of one phase.

    ``level_grid`` holds the decoded values of the level (unknown cells hold anything). The anchor is
    the mean of the 4 nearest known neighbours, the scale s = 1 + mean |neighbour - anchor|; inputs are
    the neighbours relative to the anchor in units of s/16, clipped, then the interpolation errors of
    the nearest neighbours (``err_grid``, same units). Every step is float64 arithmetic on
    integers below 2^40 whose result is floored: exact (a correctly rounded quotient of integers below
    2^53 never crosses an integer), so it equals the integer formula on any machine.
    """
    rows, cols = level_grid.shape
    py, px = PHASES[phase]
    grid = np.pad(level_grid.astype(np.float64), PAD, mode="reflect")
    h, w = rows // 2, cols // 2
    offs = OFFSETS[phase]
    k = len(offs)
    feats = np.empty((k + N_ERR + N_EXTRA, h * w), np.float64)
    diff = feats[:k]
    errs = feats[k : k + N_ERR]
    egrid = np.pad(err_grid.astype(np.float64), PAD, mode="reflect") if N_ERR else err_grid
    for i, (dy, dx) in enumerate(offs[:N_ERR]):
        y0, x0 = PAD + py + dy, PAD + px + dx
        errs[i].reshape(h, w)[...] = egrid[y0 : y0 + 2 * h : 2, x0 : x0 + 2 * w : 2]
    for i, (dy, dx) in enumerate(offs):
        y0, x0 = PAD + py + dy, PAD + px + dx
        diff[i].reshape(h, w)[...] = grid[y0 : y0 + 2 * h : 2, x0 : x0 + 2 * w : 2]
    anchor = np.floor((diff[0] + diff[1] + diff[2] + diff[3] + 2.0) * 0.25)
    diff -= anchor
    s = 1.0 + np.floor(np.abs(diff).sum(axis=0) / k)
    diff /= s * (1.0 / IN_SCALE)  # = floor(16 diff / s) after the floor: s / 16 is exact
    np.floor(diff, out=diff)
    np.clip(diff, -FEATURE_CLIP, FEATURE_CLIP, out=diff)
    errs *= IN_SCALE
    errs /= s
    np.floor(errs, out=errs)
    np.clip(errs, 0, FEATURE_CLIP, out=errs)
    k += N_ERR
    s_int = s.astype(np.int64)
    anchor_int = anchor.astype(np.int64)
    feats[k] = np.clip(2 * log2x8(s_int), 0, FEATURE_CLIP)
    span = max(1, hi - lo + 1)
    feats[k + 1] = ((anchor_int - lo) * (4 * IN_SCALE)) // span
    feats[k + 2 :] = 0.0  # the level one-hot: the codec folds it into the first bias (see mlp)
    feats[k + 2 + level] = IN_SCALE
    return feats, anchor_int, s_int


def mlp(model: IntModel, phase: int, feats: FloatArray, level: int) -> tuple[IntArray, IntArray]:
    """Exact integer MLP: (mean offset, log2 scale factor), both in units of 1/4096.

    The level one-hot is constant within a call: it is folded into the first bias. Units: inputs 2^-4,
    weights 2^-12, first hidden layer 2^-16 (not rounded), second 2^-8 (floored), outputs 2^-12
    (floored); see BIAS_UNITS. Bounds: |input| <= 2^10, |w| < 2^15, <= 40 inputs, |b| <= 2^36:
    layer 1 is clipped to 2^31; with HIDDEN <= 64, layer 2 sums < 64 * 2^31 * 2^15 + 2^36 < 2^53, its
    activations are clipped to 2^24; layer 3 sums < 64 * 2^24 * 2^15 + 2^36 < 2^46. Every float64 product and partial
    sum is therefore an exact integer whatever the summation order (BLAS kernel, thread count), and
    the floor divisions by powers of two are exact.
    """
    w1, w1_level, b1, w2, b2, w3, b3 = model.layers[phase]
    k = w1.shape[1]
    acc = w1 @ feats[:k]
    acc += b1 + w1_level[:, level : level + 1] * IN_SCALE
    h1 = np.clip(acc, 0.0, H1_CLIP, out=acc)
    acc = w2 @ h1
    acc += b2
    acc *= 2.0 ** -(BIAS_UNITS[1] - 8)
    np.floor(acc, out=acc)
    h2 = np.clip(acc, 0.0, H2_CLIP, out=acc)
    acc = w3 @ h2
    acc += b3
    acc *= 2.0 ** -(BIAS_UNITS[2] - 12)
    np.floor(acc, out=acc)
    out = np.clip(acc, -float(OUT_CLIP), float(OUT_CLIP), out=acc).astype(np.int64)
    return out[0], out[1]


def predict(model: IntModel, phase: int, level: int, feats: FloatArray, anchor: IntArray, s: IntArray,
            lo: int, hi: int, max_error: int) -> tuple[IntArray, IntArray]:
    """Integer prediction (clipped to [lo, hi]) and scale bin of every pixel of a phase."""
    mu, lsig = mlp(model, phase, feats, level)
    pred = np.clip(anchor + ((mu * s + OUT_SCALE // 2) >> 12), lo, hi)
    l8 = log2x8(s) + ((lsig * 8 + OUT_SCALE // 2) >> 12)
    if max_error:
        l8 = l8 - int(log2x8(np.array([2 * max_error + 1]))[0])
    bins = np.clip(l8 - L8_MIN, 0, N_BINS - 1)
    return pred, bins


def quantize(r: IntArray, max_error: int) -> IntArray:
    """JPEG-LS style residual quantization (step 2N + 1); identity for N = 0."""
    if not max_error:
        return r
    step = 2 * max_error + 1
    out: IntArray = np.sign(r) * ((np.abs(r) + max_error) // step)
    return out


def reconstruct(pred: IntArray, q: IntArray, lo: int, hi: int, max_error: int) -> IntArray:
    out: IntArray = np.clip(pred + q * (2 * max_error + 1), lo, hi)
    return out


# -- bits ----------------------------------------------------------------------------------------


class BitWriter:
    """Fields of given bit widths, MSB first, packed once at the end."""

    def __init__(self) -> None:
        self._values: list[IntArray] = []
        self._widths: list[IntArray] = []

    def write(self, values: IntArray, widths: IntArray) -> None:
        self._values.append(np.asarray(values, np.int64).ravel())
        self._widths.append(np.asarray(widths, np.int64).ravel())

    def finish(self) -> bytes:
        if not self._values:
            return b""
        return pack_bits(np.concatenate(self._values), np.concatenate(self._widths))


class BitReader:
    """Mirror of :class:`BitWriter`: the same widths, in the same order."""

    def __init__(self, data: bytes) -> None:
        self._bits = np.unpackbits(np.frombuffer(data, np.uint8)).astype(np.int64)
        self._pos = 0

    def read(self, widths: IntArray) -> IntArray:
        try:
            out, self._pos = unpack_bits(self._bits, self._pos, np.asarray(widths, np.int64).ravel())
        except CodecError as exc:
            raise CodecError("learned payload truncated (raw bits)") from exc
        return out


def _bit_length(v: IntArray) -> IntArray:
    """Exact bit length of positive integers (float log2 corrected at powers of two)."""
    nb = np.floor(np.log2(np.maximum(v, 1).astype(np.float64))).astype(np.int64) + 1
    nb = np.where((np.int64(1) << np.minimum(nb, 62)) <= v, nb + 1, nb)
    nb = np.where((np.int64(1) << np.maximum(nb - 1, 0)) > v, nb - 1, nb)
    return nb


def fold_bounds(pred: IntArray, lo: int, hi: int, max_error: int) -> tuple[IntArray, IntArray]:
    """Where the value range cuts one side of the residual off: (two-sided limit t, one-sided side +1/-1).

    q >= -(pred - lo + N) // (2N + 1) and q <= (hi - pred + N) // (2N + 1); beyond t = the smaller of
    the two only one sign is possible, so magnitudes there are folded in pairs (the bit that would have
    been the sign tells the two apart): a pixel at the bottom of the range costs no sign bit and its
    one-sided distribution is coded at half the scale (CALIC-style error remapping).
    """
    step = 2 * max_error + 1
    down = (pred - lo + max_error) // step
    up = (hi - pred + max_error) // step
    t: IntArray = np.minimum(down, up)
    side: IntArray = np.where(down < up, 1, -1)
    return t, side


def symbolize(q: IntArray, bins: IntArray, t: IntArray | None = None
              ) -> tuple[IntArray, list[tuple[IntArray, IntArray]]]:
    """Residuals -> range-coded symbols and raw fields (escape bits, low bits, sign or fold bits), in stream order.

    ``t`` (from :func:`fold_bounds`): magnitudes above it are one-sided and folded in pairs.
    """
    m = np.abs(q)
    bit = (q < 0).astype(np.int64)
    if t is not None:
        j = m - t
        one = j > 0
        m = np.where(one, t + (j + 1) // 2, m)
        bit = np.where(one, (j + 1) % 2, bit)
    sh = bin_shift(bins)
    h = m >> sh
    low = m & ((np.int64(1) << sh) - 1)
    escaped = h >= DIRECT
    excess = np.where(escaped, h - DIRECT + 1, 1)
    nb = _bit_length(excess) - 1
    if int(nb.max(initial=0)) >= ESCAPES:
        raise CodecError("residual too large for the learned coder")
    sym = np.where(escaped, DIRECT + nb, h)
    extra = np.where(escaped, excess - (np.int64(1) << nb), 0)
    ew = np.where(escaped, nb, 0)
    nonzero = m != 0
    fields = [(extra, ew), (low, sh), (bit[nonzero], np.ones(int(nonzero.sum()), np.int64))]
    return sym, fields


def desymbolize(sym: IntArray, bins: IntArray, bits: BitReader, t: IntArray | None = None,
                side: IntArray | None = None) -> IntArray:
    """Mirror of :func:`symbolize`."""
    sh = bin_shift(bins)
    escaped = sym >= DIRECT
    nb = np.where(escaped, sym - DIRECT, 0)
    extra = bits.read(nb)
    h = np.where(escaped, (np.int64(1) << nb) + extra + DIRECT - 1, sym)
    low = bits.read(sh)
    m: IntArray = (h << sh) | low
    nz = np.flatnonzero(m)
    bit = np.zeros(m.size, np.int64)
    bit[nz] = bits.read(np.ones(nz.size, np.int64))
    q: IntArray = np.where(bit == 1, -m, m)
    if t is not None and side is not None:
        one = m > t
        q = np.where(one, side * (t + 2 * (m - t) - 1 + bit), q)
    return q


def encode_groups(coder: Any, cats: tuple[Any, ...], sym: IntArray, bins: IntArray) -> None:
    """Range code symbols grouped by bin (the decoder knows every bin before it decodes a group)."""
    order = np.argsort(bins.astype(np.uint8), kind="stable")  # radix sort: bins < 256
    counts = np.bincount(bins, minlength=N_BINS)
    s = sym[order].astype(np.int32)
    start = 0
    for k in np.flatnonzero(counts):
        n = int(counts[k])
        coder.encode(s[start : start + n], cats[k])
        start += n


def decode_groups(decoder: Any, cats: tuple[Any, ...], bins: IntArray) -> IntArray:
    order = np.argsort(bins.astype(np.uint8), kind="stable")
    counts = np.bincount(bins, minlength=N_BINS)
    out = np.empty(bins.size, np.int64)
    sorted_sym = np.empty(bins.size, np.int64)
    start = 0
    for k in np.flatnonzero(counts):
        n = int(counts[k])
        sorted_sym[start : start + n] = decoder.decode(cats[k], n)
        start += n
    out[order] = sorted_sym
    return out


# -- base (coarsest level): DPCM, one bin chosen by the encoder ------------------------------------------


def _base_walk(base: IntArray | None, shape: tuple[int, int], lo: int, hi: int, max_error: int,
               q_in: IntArray | None) -> tuple[IntArray, IntArray]:
    """Row 0 left to right, then each row from the one above; returns (q, reconstruction).

    Encoding gives ``base``; decoding gives ``q_in`` (then ``base`` is None).
    """
    rows, cols = shape
    rec = np.zeros(shape, np.int64)
    q = np.zeros(shape, np.int64) if q_in is None else q_in
    mid = lo + (hi - lo) // 2
    lossless = max_error == 0
    if lossless and base is not None:  # no feedback: vectorised
        pred = np.empty(shape, np.int64)
        pred[0, 0] = mid
        pred[0, 1:] = base[0, :-1]
        pred[1:] = base[:-1]
        return base - pred, base.copy()
    if lossless:
        rec[0] = mid + np.cumsum(q[0])
        rec[1:] = rec[0] + np.cumsum(q[1:], axis=0)
        return q, np.clip(rec, lo, hi)
    step = 2 * max_error + 1
    prev = mid
    for j in range(cols):
        if base is not None:
            r = int(base[0, j]) - prev
            q[0, j] = (1 if r > 0 else -1) * ((abs(r) + max_error) // step) if r else 0
        prev = min(hi, max(lo, prev + int(q[0, j]) * step))
        rec[0, j] = prev
    for i in range(1, rows):
        pred = rec[i - 1]
        if base is not None:
            q[i] = quantize(base[i] - pred, max_error)
        rec[i] = reconstruct(pred, q[i], lo, hi, max_error)
    return q, rec


def base_error(rec: IntArray, lo: int, hi: int) -> IntArray:
    """|x^ - DPCM prediction| of the base, the error inputs of the first level's A pixels."""
    pred = np.empty_like(rec)
    pred[0, 0] = lo + (hi - lo) // 2
    pred[0, 1:] = rec[0, :-1]
    pred[1:] = rec[:-1]
    out: IntArray = np.abs(rec - pred)
    return out


def interpolation_error(values: IntArray, anchor: IntArray) -> IntArray:
    out: IntArray = np.abs(values - anchor)
    return out


# -- whole image -------------------------------------------------------------------------------------------

_HEAD = struct.Struct("<B8s")  # format version, first 8 bytes of the weights' SHA-256
#: then unsigned LEB128 varints: max_error, rows, cols, levels, zigzag(lo), zigzag(hi), base bin, range-coder bytes
_N_VARINTS = 8


def encode_image(model: IntModel, name: str, image: IntArray, max_error: int,
                 sink: list[tuple[IntArray, IntArray]] | None = None) -> tuple[bytes, dict[str, Any]]:
    """Payload of a 2-D integer image (values of any supported dtype, as int64).

    ``sink`` (training only) receives the (symbols, bins) of every phase, to fit the tables.
    """
    rows, cols = image.shape
    lo, hi = int(image.min()), int(image.max())
    levels = levels_for(rows, cols)
    unit = 1 << levels
    prows, pcols = -(-rows // unit) * unit, -(-cols // unit) * unit
    padded = np.pad(image, ((0, prows - rows), (0, pcols - cols)), mode="edge").astype(np.int64)
    name_raw = name.encode("ascii")
    coder = constriction.stream.queue.RangeEncoder()
    bits = BitWriter()
    base_bin = 0
    base_bytes = 0
    if hi > lo:
        cats = categoricals(model, max_error)
        base = padded[::unit, ::unit]
        q, rec = _base_walk(base, base.shape, lo, hi, max_error, None)
        base_bin = _best_bin(model, q.ravel(), max_error)
        bins0 = np.full(q.size, base_bin, np.int64)
        sym, fields = symbolize(q.ravel(), bins0)
        encode_groups(coder, cats, sym, bins0)
        for f in fields:
            bits.write(*f)
        base_bytes = 4 * coder.num_words() + int(sum(int(w.sum()) for _, w in fields)) // 8
        err = base_error(rec, lo, hi)
        for level in range(levels - 1, -1, -1):
            step = 1 << level
            target = padded[::step, ::step]
            grid = np.zeros(target.shape, np.int64)
            grid[0::2, 0::2] = rec
            egrid = np.zeros(target.shape, np.int64)
            egrid[0::2, 0::2] = err
            for phase, (py, px) in enumerate(PHASES):
                feats, anchor, s = gather(grid, egrid, phase, level, lo, hi)
                pred, bins = predict(model, phase, level, feats, anchor, s, lo, hi, max_error)
                x = target[py::2, px::2].ravel()
                q = quantize(x - pred, max_error)
                t, _side = fold_bounds(pred, lo, hi, max_error)
                xhat = reconstruct(pred, q, lo, hi, max_error)
                grid[py::2, px::2] = xhat.reshape(grid[py::2, px::2].shape)
                egrid[py::2, px::2] = interpolation_error(xhat, anchor).reshape(grid[py::2, px::2].shape)
                sym, fields = symbolize(q, bins, t)
                if sink is not None:
                    sink.append((sym, bins))
                encode_groups(coder, cats, sym, bins)
                for f in fields:
                    bits.write(*f)
            rec, err = grid, egrid
    words = coder.get_compressed().astype("<u4").tobytes()
    raw = bits.finish()
    out = bytearray([len(name_raw)]) + name_raw
    out += _HEAD.pack(FORMAT_VERSION, model.digest)
    for value in (max_error, rows, cols, levels, zigzag(lo), zigzag(hi), base_bin, len(words)):
        put_varint(out, value)
    out += words + raw
    stats = {"levels": levels, "base_bytes": base_bytes, "bytes": len(out)}
    return bytes(out), stats


def read_head(payload: bytes) -> tuple[str, tuple[Any, ...], int]:
    """(model name, header fields, offset of the coded data); CodecError on a short payload.

    Fields: version, digest, max_error, rows, cols, levels, lo, hi, base bin, range-coder bytes.
    """
    if len(payload) < 1 or len(payload) < 1 + payload[0] + _HEAD.size + _N_VARINTS:
        raise CodecError("learned payload truncated (header)")
    n = payload[0]
    try:
        name = payload[1 : 1 + n].decode("ascii")
    except UnicodeDecodeError as exc:
        raise CodecError("learned payload names no model") from exc
    version, digest = _HEAD.unpack_from(payload, 1 + n)
    pos = 1 + n + _HEAD.size
    values = []
    for _ in range(_N_VARINTS):
        value, pos = get_varint(payload, pos)
        values.append(value)
    values[4], values[5] = unzigzag(values[4]), unzigzag(values[5])
    return name, (version, digest, *values), pos


def decode_image(model: IntModel, payload: bytes) -> IntArray:
    """Inverse of :func:`encode_image` (the caller has checked the model name)."""
    _name, fields, pos = read_head(payload)
    version, digest, max_error, rows, cols, levels, lo, hi, base_bin, n_words = fields
    if version != FORMAT_VERSION:
        raise CodecError(f"learned payload format {version} is not readable here")
    if digest != model.digest:
        raise CodecError(f"learned payload needs weights {digest.hex()}, the bundle has {model.digest.hex()}")
    if levels != levels_for(rows, cols) or lo > hi or not 0 <= base_bin < N_BINS or rows == 0 or cols == 0 \
            or max_error > 255 or lo < -(1 << 15) or hi >= 1 << 16:
        raise CodecError("learned payload header is inconsistent")
    if n_words % 4 or pos + n_words > len(payload):
        raise CodecError("learned payload truncated (range coder words)")
    if hi == lo:
        return np.full((rows, cols), lo, np.int64)
    words = np.frombuffer(payload[pos : pos + n_words], "<u4").astype(np.uint32)
    bits = BitReader(payload[pos + n_words :])
    decoder = constriction.stream.queue.RangeDecoder(words)
    cats = categoricals(model, max_error)
    unit = 1 << levels
    prows, pcols = -(-rows // unit) * unit, -(-cols // unit) * unit
    try:
        bshape = (prows // unit, pcols // unit)
        bins0 = np.full(bshape[0] * bshape[1], base_bin, np.int64)
        sym = decode_groups(decoder, cats, bins0)
        q = desymbolize(sym, bins0, bits).reshape(bshape)
        _q, rec = _base_walk(None, bshape, lo, hi, max_error, q)
        err = base_error(rec, lo, hi)
        for level in range(levels - 1, -1, -1):
            step = 1 << level
            grid = np.zeros((prows // step, pcols // step), np.int64)
            grid[0::2, 0::2] = rec
            egrid = np.zeros(grid.shape, np.int64)
            egrid[0::2, 0::2] = err
            for phase, (py, px) in enumerate(PHASES):
                feats, anchor, s = gather(grid, egrid, phase, level, lo, hi)
                pred, bins = predict(model, phase, level, feats, anchor, s, lo, hi, max_error)
                sym = decode_groups(decoder, cats, bins)
                t, side = fold_bounds(pred, lo, hi, max_error)
                q = desymbolize(sym, bins, bits, t, side)
                xhat = reconstruct(pred, q, lo, hi, max_error)
                grid[py::2, px::2] = xhat.reshape(grid[py::2, px::2].shape)
                egrid[py::2, px::2] = interpolation_error(xhat, anchor).reshape(grid[py::2, px::2].shape)
            rec, err = grid, egrid
    except (ValueError, RuntimeError, AssertionError, IndexError) as exc:
        raise CodecError(f"learned payload corrupt: {exc}") from exc
    return rec[:rows, :cols]


def _best_bin(model: IntModel, q: IntArray, max_error: int) -> int:
    """The bin that codes the base residuals in the fewest bits (encoder-side choice, stored)."""
    costs = table_costs(model, max_error)
    best, best_cost = 0, math.inf
    for k in range(N_BINS):
        bins = np.full(q.size, k, np.int64)
        sym, fields = symbolize(q, bins)
        cost = float(costs[k, sym].sum()) + sum(int(w.sum()) for _, w in fields)
        if cost < best_cost:
            best, best_cost = k, cost
    return best
