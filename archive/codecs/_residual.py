"""Residual quantization and lossless residual coding for the "bounded" codec.

The bounded codec takes ``r = original - inner_reconstruction`` and quantizes
it with step ``2N + 1`` so that every pixel lands within ``N`` of the
original. The quantized residual ``q`` is then coded losslessly by one of two
coders, whichever is smaller on the frame:

* ``jpegls``: JPEG-LS lossless (pyjpegls, real bit depth) on ``q`` mapped to
  unsigned. Good when the residual still has spatial structure (a crude inner
  codec), because JPEG-LS predicts from neighbours.
* ``context``: near-lossless DPCM with the inner reconstruction as side
  information, range coded with constriction through adaptive per-context
  categorical counts. Each pixel is predicted from the reconstructed residual
  around it and from the inner reconstruction in every direction (the decoder
  holds all of it), by least-squares weights fitted per class of inner
  gradient and stored in the payload; the error is quantized against that
  prediction. When the inner reconstruction is a smooth, noise-free
  approximation the residual is close to white scanner noise: the weights go
  to ~0 and the coder spends ~the entropy of the noise (JPEG-LS, predicting
  from noisy neighbours, pays ~1.4x the noise sigma); when the residual is
  structured, it predicts; a JPEG-LS-style bias cancellation per context
  removes what the linear predictor leaves locally. The context (which
  distribution) comes from the magnitude of the neighbouring errors and the
  local gradient of the inner and of the reconstruction (edges carry more
  residual).

Everything the decoder computes is integer arithmetic. The only floats are
the integer symbol counts handed to constriction's ``Categorical``
(``perfect=False``), whose fixed-point quantization uses only IEEE basic
operations on integer-valued float64 (< 2^53): identical on every machine for
one constriction version. The frame container's reconstruction CRC guards
against a library whose quantization differs.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from typing import Any, Final

import constriction
import imagecodecs
import jpeg_ls
import numpy as np
import numpy.typing as npt

from archive.codecs._pixels import Pixels, offset_to_unsigned
from archive.errors import CodecError

IntArray = npt.NDArray[np.int64]

CODER_JPEGLS: Final = 0
CODER_CONTEXT: Final = 1
CODER_NAMES: Final[dict[int, str]] = {CODER_JPEGLS: "jpegls", CODER_CONTEXT: "context"}

# -- symbol alphabet of the context coder ------------------------------------
# |v| < _T is a symbol of its own; larger magnitudes are an escape class k
# (sign kept) followed by k raw bits: m = |v| - _T, m + 1 in [2^k, 2^(k+1)).
_T: Final = 10
_CLASSES: Final = 18  # |v| up to _T + 2^18 - 2: beyond any 16-bit residual
_SMALL: Final = 2 * _T - 1
_NSYM: Final = _SMALL + 2 * _CLASSES

# -- contexts ------------------------------------------------------------------
# Activity of the neighbouring quantized errors (2|W| + 2|N| + |NW| + |NE|, in
# steps) and gradient of the inner reconstruction (in steps), each on a
# log-like scale.
_ACT_EDGES: Final = np.array(
    [1, 2, 3, 4, 5, 7, 9, 12, 16, 22, 30, 42, 60, 90], dtype=np.int64
)
_GRAD_EDGES: Final = np.array([1, 2, 3, 5, 8, 13, 21, 40], dtype=np.int64)
_NGRAD: Final = len(_GRAD_EDGES) + 1
_NCTX: Final = (len(_ACT_EDGES) + 1) * _NGRAD

# Adaptive counts: every symbol starts at 1, an observation adds _INC, and a
# context's counts halve when their total passes _LIMIT (tracks local change).
_INC: Final = 24
_LIMIT: Final = 1 << 16

_PLANE_JLS: Final = struct.Struct("<qI")  # offset, codestream length


# -- quantization ----------------------------------------------------------------


def dtype_range(dtype: np.dtype[Any]) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def quantize(original: Pixels, inner: Pixels, max_error: int) -> IntArray:
    """q = sign(r) * floor((|r| + N) / (2N + 1)) with r = original - inner."""
    r = np.subtract(original, inner, dtype=np.int64)
    step = 2 * max_error + 1
    q: IntArray = np.sign(r) * ((np.abs(r) + max_error) // step)
    return q


def reconstruct(
    inner: Pixels, q: IntArray, max_error: int, dtype: np.dtype[Any]
) -> Pixels:
    """inner + q * (2N + 1), clipped into the dtype's range.

    Clipping never breaks the bound: the original lies inside the range, so
    projecting a value within N of it onto the range moves it closer.
    """
    lo, hi = dtype_range(dtype)
    wide = np.add(inner, q * (2 * max_error + 1), dtype=np.int64)
    out: Pixels = np.clip(wide, lo, hi).astype(dtype)
    return out


# -- planes ---------------------------------------------------------------------


def _planes(arr: npt.NDArray[Any]) -> list[npt.NDArray[Any]]:
    """A 2-D frame is one plane; a (rows, cols, s) frame is s planes."""
    if arr.ndim == 2:
        return [arr]
    return [np.ascontiguousarray(arr[:, :, i]) for i in range(arr.shape[2])]


def _stack(planes: list[IntArray], shape: tuple[int, ...]) -> IntArray:
    if len(shape) == 2:
        return planes[0]
    return np.stack(planes, axis=2)


# -- JPEG-LS residual coder --------------------------------------------------------


def _jpegls_plane(q: IntArray) -> bytes | None:
    lo, hi = int(q.min()), int(q.max())
    if hi - lo > 0xFFFF:
        return None  # does not fit 16-bit JPEG-LS samples
    mapped, offset, bits = offset_to_unsigned(q)
    rows, cols = q.shape
    try:
        stream = bytes(
            jpeg_ls.encode_buffer(mapped.tobytes(), rows, cols, 1, max(2, bits), 0, 0)
        )
    except RuntimeError as exc:
        if "too small" not in str(
            exc
        ):  # pyjpegls' output buffer is 2x raw: too small on tiny frames
            raise
        stream = bytes(imagecodecs.jpegls_encode(mapped))
    return _PLANE_JLS.pack(offset, len(stream)) + stream


def encode_jpegls(q: IntArray) -> bytes | None:
    """JPEG-LS lossless of each plane of q (None when a plane spans > 16 bits)."""
    parts = []
    for plane in _planes(q):
        part = _jpegls_plane(plane)
        if part is None:
            return None
        parts.append(part)
    return b"".join(parts)


def decode_jpegls(data: bytes, shape: tuple[int, ...]) -> IntArray:
    planes: list[IntArray] = []
    pos = 0
    nplanes = 1 if len(shape) == 2 else shape[2]
    for _ in range(nplanes):
        if pos + _PLANE_JLS.size > len(data):
            raise CodecError("bounded: truncated JPEG-LS residual")
        offset, length = _PLANE_JLS.unpack_from(data, pos)
        pos += _PLANE_JLS.size
        if pos + length > len(data):
            raise CodecError("bounded: truncated JPEG-LS residual")
        plane = np.asarray(imagecodecs.jpegls_decode(data[pos : pos + length]))
        pos += length
        if plane.shape != shape[:2]:
            raise CodecError(
                f"bounded: residual plane has shape {plane.shape}, expected {shape[:2]}"
            )
        planes.append(plane.astype(np.int64) + offset)
    if pos != len(data):
        raise CodecError("bounded: trailing bytes after the JPEG-LS residual")
    return _stack(planes, shape)


# -- context-model residual coder ---------------------------------------------------
# Near-lossless DPCM with the inner reconstruction as side information: each
# pixel is predicted from the already reconstructed residual around it (W, N,
# NW, NE) and from the inner reconstruction in every direction, by a linear
# predictor per class of inner gradient whose integer weights the encoder fits
# by least squares and stores (12 x int16 per class). The prediction error is
# quantized with step 2N + 1 against that prediction (not against the inner's
# grid, which would add the rounding of the prediction to every error): for a
# white residual the weights go to zero and the coder codes the noise itself,
# for a structured one it predicts like JPEG-LS. Pixels are coded in
# wavefronts t = x + 2y: every causal neighbour of a front lies on an earlier
# one, so each front is one vectorized numpy step and one batched
# constriction call.
_NFEAT: Final = 12
# bias cancellation (as JPEG-LS): the mean error per context of gradient signs
# (27) and activity level, over the last ~_BMAX uses, is added to the
# prediction, at most one step either way
_BMAX: Final = 64
_NBIAS: Final = 27 * (len(_ACT_EDGES) + 1)
# features that depend on the reconstructed residual (the rest on the inner only)
_NRES: Final = 6
# weights are fixed point with 10 fractional bits
_WSHIFT: Final = 10
_WLIM: Final = (1 << 15) - 1
# at most one predictor per inner-gradient level (levels >= 5 share one), and
# one per 16384 pixels: 512^2 gets 6, 96^2 and 64^2 get 1 (each costs 24 bytes)
_NCLASS: Final = 6
_CLASS_PIXELS: Final = 16384
# |error| kept for the activity context is capped
_CAP: Final = 1 << 20
# activity -> context row offset and gradient -> level, by table look-up
_ACT_LUT: Final = np.searchsorted(_ACT_EDGES, np.arange(256), side="right") * _NGRAD
_GRAD_LUT: Final = np.searchsorted(_GRAD_EDGES, np.arange(256), side="right")


def _to_symbols(v: IntArray) -> tuple[IntArray, IntArray, IntArray]:
    """Signed values -> (symbol, escape class k or -1, k extra bits)."""
    mag = np.abs(v)
    small = mag < _T
    m1 = np.where(small, 1, mag - _T + 1)  # m + 1 >= 1
    k = np.zeros_like(m1)
    # bit_length(m1) - 1, exact integer arithmetic
    x = m1.copy()
    for shift in (16, 8, 4, 2, 1):
        big = x >= (1 << shift)
        k += np.where(big, shift, 0)
        x = np.where(big, x >> shift, x)
    extra = m1 - (np.int64(1) << k)
    sym = np.where(small, v + (_T - 1), _SMALL + 2 * k + (v < 0))
    return sym, np.where(small, -1, k), extra


def _from_symbols(sym: IntArray, extra: IntArray) -> IntArray:
    small = sym < _SMALL
    esc = sym - _SMALL
    k = esc >> 1
    mag = _T - 1 + (np.int64(1) << k) + extra
    return np.where(small, sym - (_T - 1), np.where(esc & 1, -mag, mag))


def _med(a: IntArray, b: IntArray, c: IntArray) -> IntArray:
    """LOCO-I median edge detector (the JPEG-LS predictor)."""
    hi = np.maximum(a, b)
    lo = np.minimum(a, b)
    out: IntArray = np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))
    return out


def _features(rpad: IntArray, ipad: IntArray, ys: IntArray, xs: IntArray) -> IntArray:
    """Predictor inputs at pixels (ys, xs): shape (n, _NFEAT), int64.

    ``rpad`` is the reconstructed residual with one zero row above and one zero
    column each side; ``ipad`` the inner reconstruction edge-padded by one.
    """
    py, px = ys + 1, xs + 1
    r_w, r_n = rpad[py, px - 1], rpad[py - 1, px]
    r_nw, r_ne = rpad[py - 1, px - 1], rpad[py - 1, px + 1]
    c = ipad[py, px]
    i_w, i_n, i_nw = ipad[py, px - 1], ipad[py - 1, px], ipad[py - 1, px - 1]
    i_ne, i_e, i_s = ipad[py - 1, px + 1], ipad[py, px + 1], ipad[py + 1, px]
    cols = [
        r_w,
        r_n,
        r_nw,
        r_ne,
        _med(r_w, r_n, r_nw),
        _med(i_w + r_w, i_n + r_n, i_nw + r_nw) - c,
        i_w - c,
        i_n - c,
        i_nw - c,
        i_ne - c,
        i_e - c,
        i_s - c,
    ]
    return np.stack(cols, axis=1)


def _n_classes(shape: tuple[int, ...]) -> int:
    """How many predictors a plane stores (each costs 24 bytes): fewer on small planes."""
    return max(1, min(_NCLASS, shape[0] * shape[1] // _CLASS_PIXELS))


def _fit_weights(original: IntArray, inner: IntArray, max_error: int) -> IntArray:
    """Least-squares predictor per class (encoder only: floats are fine here).

    The features are taken from a near-lossless stand-in for the
    reconstruction the decoder will see (the residual quantized on the inner's
    grid: errors uniform in [-N, N]), so the weights allow for that noise.
    """
    rows, cols = inner.shape
    nclass = _n_classes(inner.shape)
    cls = np.minimum(_grad_levels(inner, 2 * max_error + 1), nclass - 1)
    proxy = quantize(original, inner, max_error) * (2 * max_error + 1)
    rpad = np.zeros((rows + 1, cols + 2), dtype=np.int64)
    rpad[1:, 1:-1] = proxy
    ipad = np.pad(inner, 1, mode="edge")
    ys, xs = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
    feats = _features(rpad, ipad, ys, xs).astype(np.float64)
    target = (original - inner).ravel().astype(np.float64)
    flat = cls.ravel()
    weights = np.zeros((nclass, _NFEAT), dtype=np.int64)
    for k in range(nclass):
        m = flat == k
        if int(m.sum()) < 4 * _NFEAT:
            continue
        w, *_ = np.linalg.lstsq(feats[m], target[m], rcond=None)
        if np.all(np.isfinite(w)):
            weights[k] = np.clip(np.round(w * (1 << _WSHIFT)), -_WLIM, _WLIM).astype(
                np.int64
            )
    return weights


def _fronts(rows: int, cols: int) -> list[tuple[IntArray, IntArray]]:
    """Pixels of each wavefront t = x + 2y, in coding order."""
    out = []
    for t in range(cols + 2 * (rows - 1)):
        ys = np.arange(
            max(0, (t - cols + 2) // 2), min(rows - 1, t // 2) + 1, dtype=np.int64
        )
        out.append((ys, t - 2 * ys))
    return out


def _grad_levels(inner: IntArray, step: int) -> IntArray:
    """Quantized local gradient of the inner reconstruction, in quantizer steps."""
    p = np.pad(inner, 1, mode="edge")
    g = np.abs(p[1:-1, 2:] - p[1:-1, :-2]) + np.abs(p[2:, 1:-1] - p[:-2, 1:-1])
    levels: IntArray = np.searchsorted(
        _GRAD_EDGES, g // (2 * step), side="right"
    ).astype(np.int64)
    return levels


class _Wavefront:
    """Tables shared, step for step, by the encoder and the decoder of one plane.

    Everything that depends only on the inner reconstruction (its share of the
    prediction, the gradient context, neighbour addresses) is computed once for
    the whole plane and laid out in coding order, so a front costs a few slices.
    """

    def __init__(
        self, inner: IntArray, max_error: int, dtype: np.dtype[Any], weights: IntArray
    ) -> None:
        rows, cols = inner.shape
        self.shape = (rows, cols)
        self.step = 2 * max_error + 1
        self.lo, self.hi = dtype_range(dtype)
        ipad = np.pad(inner, 1, mode="edge")
        ys, xs = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
        t = xs + 2 * ys
        order = np.lexsort((ys, t))  # by front, then by row
        ys, xs, t = ys[order], xs[order], t[order]
        self.bounds = np.flatnonzero(np.diff(t, prepend=-1, append=t[-1] + 1)).tolist()
        self.order = order
        glev = _grad_levels(inner, self.step)[ys, xs]
        cls = np.minimum(glev, weights.shape[0] - 1)
        self.glev = glev
        w = weights[cls]  # (n, _NFEAT) in coding order
        self.wr = [np.ascontiguousarray(w[:, j]) for j in range(_NRES)]
        py, px = ys + 1, xs + 1
        self.c = ipad[py, px]
        i_w, i_n, i_nw = ipad[py, px - 1], ipad[py - 1, px], ipad[py - 1, px - 1]
        i_ne, i_e, i_s = ipad[py - 1, px + 1], ipad[py, px + 1], ipad[py + 1, px]
        self.i_w, self.i_n, self.i_nw, self.i_ne = i_w, i_n, i_nw, i_ne
        static = [i_w, i_n, i_nw, i_ne, i_e, i_s]
        self.pre = sum(
            (w[:, _NRES + j] * (f - self.c) for j, f in enumerate(static)),
            np.zeros_like(self.c),
        )
        self.pre += 1 << (_WSHIFT - 1)
        width = cols + 2
        self.at = py * width + px  # address in the padded residual / error planes
        self.r = np.zeros(
            (rows + 1) * width + 1, dtype=np.int64
        )  # reconstructed residual
        self.e = np.zeros_like(self.r)  # |quantized prediction error|
        self.width = width
        self.counts = np.ones((_NCTX, _NSYM), dtype=np.float64)  # integer-valued, exact
        self.bsum = np.zeros(_NBIAS, dtype=np.int64)  # bias cancellation state
        self.bn = np.ones(_NBIAS, dtype=np.int64)
        self._bctx = self._raw = np.zeros(
            0, dtype=np.int64
        )  # set by predict, used by store
        self.totals = np.full(_NCTX, float(_NSYM))

    def fronts(self) -> Iterator[slice]:
        for a, b in itertools.pairwise(self.bounds):
            yield slice(a, b)

    def predict(self, s: slice) -> tuple[IntArray, IntArray]:
        """(prediction in the image domain, context index) for one front."""
        at = self.at[s]
        width = self.width
        r, e = self.r, self.e
        r_w, r_n, r_nw, r_ne = (
            r[at - 1],
            r[at - width],
            r[at - width - 1],
            r[at - width + 1],
        )
        c = self.c[s]
        med_r = _med(r_w, r_n, r_nw)
        med_x = _med(self.i_w[s] + r_w, self.i_n[s] + r_n, self.i_nw[s] + r_nw) - c
        wr = self.wr
        acc = (
            self.pre[s]
            + wr[0][s] * r_w
            + wr[1][s] * r_n
            + wr[2][s] * r_nw
            + wr[3][s] * r_ne
        )
        acc += wr[4][s] * med_r + wr[5][s] * med_x
        act = 2 * (e[at - 1] + e[at - width]) + e[at - width - 1] + e[at - width + 1]
        # gradient level: the larger of the inner's and the reconstruction's around the pixel
        x_w, x_n, x_nw = self.i_w[s] + r_w, self.i_n[s] + r_n, self.i_nw[s] + r_nw
        x_ne = self.i_ne[s] + r_ne
        grec = (np.abs(x_ne - x_n) + np.abs(x_n - x_nw) + np.abs(x_nw - x_w)) // (
            2 * self.step
        )
        level = np.maximum(
            self.glev[s], _GRAD_LUT[np.minimum(grec, _GRAD_LUT.size - 1)]
        )
        ctx = _ACT_LUT[np.minimum(act, _ACT_LUT.size - 1)] + level
        # the original lies in the dtype range: a prediction clipped into it is never worse,
        # and it keeps every error within 16 bits (the escape classes' reach)
        raw = c + (acc >> _WSHIFT)
        t = self.step
        signs = (
            (np.sign((x_ne - x_n) // t) + 1) * 9
            + (np.sign((x_n - x_nw) // t) + 1) * 3
            + (np.sign((x_nw - x_w) // t) + 1)
        )
        bctx = signs + 27 * (ctx // _NGRAD)
        n = self.bn[bctx]
        corr = np.clip((2 * self.bsum[bctx] + n) // (2 * n), -t, t)
        self._bctx, self._raw = bctx, raw
        pred: IntArray = np.clip(raw + corr, self.lo, self.hi)
        return pred, ctx

    def store(
        self, s: slice, pred: IntArray, qe: IntArray, ctx: IntArray, sym: IntArray
    ) -> IntArray:
        """Reconstruct a front from its quantized errors, remember it, adapt the counts."""
        xhat: IntArray = np.clip(pred + qe * self.step, self.lo, self.hi)
        at = self.at[s]
        self.r[at] = xhat - self.c[s]
        self.e[at] = np.minimum(np.abs(qe), _CAP)
        np.add.at(self.bsum, self._bctx, xhat - self._raw)
        np.add.at(self.bn, self._bctx, 1)
        big = np.flatnonzero(self.bn > _BMAX)
        if big.size:
            self.bn[big] = (self.bn[big] + 1) >> 1
            self.bsum[big] = self.bsum[big] // 2
        np.add.at(self.counts, (ctx, sym), float(_INC))
        np.add.at(self.totals, ctx, float(_INC))
        full = np.flatnonzero(self.totals > _LIMIT)
        if full.size:
            halved = np.floor((self.counts[full] + 1.0) / 2.0)
            self.counts[full] = halved
            self.totals[full] = halved.sum(axis=1)
        return xhat

    def image(self, values: IntArray) -> IntArray:
        """Coding order -> (rows, cols)."""
        out = np.empty(values.shape, dtype=np.int64)
        out[self.order] = values
        return out.reshape(self.shape)


def encode_context(
    original: Pixels, inner: Pixels, max_error: int
) -> tuple[bytes, Pixels]:
    """Code every plane: (bytes, the reconstruction the decoder will compute)."""
    dtype = original.dtype
    enc = constriction.stream.queue.RangeEncoder()
    cat = constriction.stream.model.Categorical(perfect=False)
    uniform = constriction.stream.model.Uniform()
    head = bytearray()
    recon_planes: list[IntArray] = []
    for xp, ip in zip(_planes(original), _planes(inner), strict=True):
        x64 = xp.astype(np.int64)
        i64 = ip.astype(np.int64)
        weights = _fit_weights(x64, i64, max_error)
        head += weights.astype("<i2").tobytes()
        state = _Wavefront(i64, max_error, dtype, weights)
        xs = x64.ravel()[state.order]
        rec = np.empty_like(xs)
        for s in state.fronts():
            pred, ctx = state.predict(s)
            err = xs[s] - pred
            qe = np.sign(err) * ((np.abs(err) + max_error) // state.step)
            sym, k, extra = _to_symbols(qe)
            enc.encode(sym.astype(np.int32), cat, state.counts[ctx])
            esc = k > 0
            if esc.any():
                enc.encode(
                    extra[esc].astype(np.int32),
                    uniform,
                    (np.int64(1) << k[esc]).astype(np.int32),
                )
            rec[s] = state.store(s, pred, qe, ctx, sym)
        recon_planes.append(state.image(rec))
    words: npt.NDArray[np.uint32] = np.asarray(enc.get_compressed(), dtype="<u4")
    recon: Pixels = _stack(recon_planes, original.shape).astype(dtype)
    return bytes(head) + words.tobytes(), recon


def decode_context(
    data: bytes, inner: Pixels, max_error: int, dtype: np.dtype[Any]
) -> Pixels:
    """Invert :func:`encode_context` (integer arithmetic only)."""
    planes = _planes(inner)
    nclass = _n_classes(inner.shape)
    wbytes = len(planes) * nclass * _NFEAT * 2
    if len(data) < wbytes or (len(data) - wbytes) % 4:
        raise CodecError("bounded: context residual has a bad length")
    weights = np.frombuffer(data[:wbytes], dtype="<i2").astype(np.int64)
    weights = weights.reshape(len(planes), nclass, _NFEAT)
    dec = constriction.stream.queue.RangeDecoder(
        np.frombuffer(data[wbytes:], dtype="<u4").astype(np.uint32)
    )
    cat = constriction.stream.model.Categorical(perfect=False)
    uniform = constriction.stream.model.Uniform()
    recon_planes: list[IntArray] = []
    for ip, w in zip(planes, weights, strict=True):
        state = _Wavefront(ip.astype(np.int64), max_error, dtype, w)
        rec = np.empty(ip.size, dtype=np.int64)
        for s in state.fronts():
            pred, ctx = state.predict(s)
            sym = np.asarray(dec.decode(cat, state.counts[ctx]), dtype=np.int64)
            kk = np.where(sym >= _SMALL, (sym - _SMALL) >> 1, 0)
            extra = np.zeros(sym.shape, dtype=np.int64)
            esc = kk > 0
            if esc.any():
                sizes = (np.int64(1) << kk[esc]).astype(np.int32)
                extra[esc] = np.asarray(dec.decode(uniform, sizes), dtype=np.int64)
            qe = _from_symbols(sym, extra)
            rec[s] = state.store(s, pred, qe, ctx, sym)
        recon_planes.append(state.image(rec))
    out: Pixels = _stack(recon_planes, inner.shape).astype(dtype)
    return out


# -- choice ------------------------------------------------------------------------


def encode_residual(
    original: Pixels, inner: Pixels, max_error: int
) -> tuple[int, bytes, Pixels]:
    """Code the frame with both coders and keep the smaller: (coder id, bytes, reconstruction)."""
    ctx, ctx_recon = encode_context(original, inner, max_error)
    q = quantize(original, inner, max_error)
    jls = encode_jpegls(q)
    if jls is not None and len(jls) < len(ctx):
        return CODER_JPEGLS, jls, reconstruct(inner, q, max_error, original.dtype)
    return CODER_CONTEXT, ctx, ctx_recon


def decode_residual(
    coder: int, data: bytes, inner: Pixels, max_error: int, dtype: np.dtype[Any]
) -> Pixels:
    """The reconstruction from a residual coded by ``coder``."""
    if coder == CODER_JPEGLS:
        return reconstruct(inner, decode_jpegls(data, inner.shape), max_error, dtype)
    if coder == CODER_CONTEXT:
        return decode_context(data, inner, max_error, dtype)
    raise CodecError(f"bounded: unknown residual coder {coder}")
