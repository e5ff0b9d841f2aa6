"""Separable resampling by sparse weight matrices: one matrix per axis, applied as two CSR products.

A plane resample is ``W_rows @ image @ W_columns.T``. Each matrix holds, for
every output sample, the weights of the source samples it reads, so the
kernel, the antialiasing (Pillow's rule: for shrinking the kernel support is
stretched by the step) and the edge handling (weights renormalised over the
part of the support inside the source) are decided once, when the matrix is
built and cached, and the per-slice work is two memory-bound CSR products in
float32. ``coverage`` is the fraction of a sample's unnormalised kernel weight
that fell inside the source; output samples with less than half are padding.

Kernels: Keys, "Cubic convolution interpolation for digital image processing",
IEEE TASSP 29(6), 1981 (a = -0.5); Lanczos-3 as in Pillow and OpenCV.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import scipy.sparse  # type: ignore[import-untyped]

from archive.normalize.grid import AxisMap, Interpolation

FloatArray = npt.NDArray[np.floating]
SampleT = TypeVar("SampleT", bound=np.generic)

_RADIUS = {Interpolation.LINEAR: 1.0, Interpolation.CUBIC: 2.0, Interpolation.LANCZOS: 3.0}
_KEYS_A = -0.5
_COVERAGE_MIN = 0.5  # output samples with less of their kernel inside the source are padding
_BAND = 16  # source rows per band in _swap (measured: 16 is best for 512 to 1024 float32 rows)
_SLICE_KERNELS = frozenset({Interpolation.LINEAR, Interpolation.NEAREST, Interpolation.AREA})


@dataclass(frozen=True)
class RoundTripError:
    """Normalized image resampled back onto the source grid, against the source, in the arrays' units."""

    rmse: float  # NaN when no source pixel is covered
    max_abs: float  # NaN when no source pixel is covered
    pixels: int  # source samples compared (all samples of colour pixels counted)


# ---------------------------------------------------------------------------------------------- weights


def _kernel(kernel: Interpolation, t: FloatArray) -> FloatArray:
    """The continuous kernel at offsets ``t`` (source samples, already divided by the stretch)."""
    a = np.abs(t)
    if kernel is Interpolation.LINEAR:
        return np.maximum(0.0, 1.0 - a)
    if kernel is Interpolation.CUBIC:
        near = ((_KEYS_A + 2.0) * a - (_KEYS_A + 3.0)) * a * a + 1.0
        far = ((a - 5.0) * a + 8.0) * a * _KEYS_A - 4.0 * _KEYS_A
        return np.where(a <= 1.0, near, np.where(a < 2.0, far, 0.0))
    if kernel is Interpolation.LANCZOS:
        return np.where(a < 3.0, np.sinc(t) * np.sinc(t / 3.0), 0.0)
    raise ValueError(f"{kernel} is not a continuous kernel")


def _raw_weights(
    centres: FloatArray, widths: FloatArray, kernel: Interpolation
) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """Source indices (may lie outside the source) and unnormalised weights, one row per output sample.

    ``widths`` is each output sample's footprint in source samples (the step).
    """
    centres = centres[:, None]
    if kernel is Interpolation.NEAREST:
        index = np.floor(centres + 0.5).astype(np.int64)  # round half up
        return index, np.ones(index.shape)
    if kernel is Interpolation.AREA:
        lo = centres - widths[:, None] / 2.0
        hi = centres + widths[:, None] / 2.0
        taps = int(np.ceil(np.max(widths))) + 2
        index = np.floor(lo + 0.5).astype(np.int64) + np.arange(taps)
        overlap = np.minimum(hi, index + 0.5) - np.maximum(lo, index - 0.5)
        return index, np.maximum(overlap, 0.0)
    stretch = np.maximum(widths, 1.0)[:, None]  # antialias when shrinking, as Pillow does
    support = _RADIUS[kernel] * stretch
    taps = int(np.ceil(2.0 * np.max(support))) + 2
    index = np.floor(centres - support).astype(np.int64) + np.arange(taps)
    return index, _kernel(kernel, (index - centres) / stretch)


def _weight_matrix(
    source_size: int, centres: FloatArray, widths: FloatArray, kernel: Interpolation
) -> tuple[scipy.sparse.csr_matrix, FloatArray]:
    """The normalised CSR weights (float64) and the coverage of every output sample."""
    index, raw = _raw_weights(centres, widths, kernel)
    if kernel is Interpolation.NEAREST:
        # the nearest pixel's box [x - 0.5, x + 0.5]: the same coverage AREA has at step 1
        lo, hi = centres - 0.5, centres + 0.5
        coverage = np.clip(np.minimum(hi, source_size - 0.5) - np.maximum(lo, -0.5), 0.0, 1.0)
        np.clip(index, 0, source_size - 1, out=index)
        raw = np.where(coverage[:, None] > 0.0, raw, 0.0)
    else:
        inside = (index >= 0) & (index < source_size)
        total = raw.sum(axis=1)
        inside_sum = np.where(inside, raw, 0.0).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            coverage = np.clip(np.where(total > 0.0, inside_sum / total, 0.0), 0.0, 1.0)
            # a support whose inside part sums to ~0 (a cubic's negative lobe) has no usable value
            usable = inside_sum > 1e-6 * np.maximum(total, 1e-12)
            raw = np.where(inside & usable[:, None], raw / np.where(usable, inside_sum, 1.0)[:, None], 0.0)
    rows = np.broadcast_to(np.arange(index.shape[0])[:, None], index.shape)
    keep = raw != 0.0
    matrix = scipy.sparse.csr_matrix(
        (raw[keep], (rows[keep], index[keep])), shape=(index.shape[0], source_size), dtype=np.float64
    )
    matrix.sum_duplicates()
    matrix.sort_indices()
    return matrix, coverage


def _check_axis(source_size: int, axis: AxisMap) -> None:
    if source_size < 1 or axis.size < 1:
        raise ValueError(f"bad axis sizes: source {source_size}, output {axis.size}")
    if not (math.isfinite(axis.step) and math.isfinite(axis.start)) or axis.step == 0.0:
        raise ValueError(f"bad axis map {axis}: step must be finite and non-zero")


@functools.lru_cache(maxsize=256)
def _cached(source_size: int, axis: AxisMap, kernel: Interpolation) -> tuple[scipy.sparse.csr_matrix, FloatArray]:
    _check_axis(source_size, axis)
    centres = axis.start + np.arange(axis.size, dtype=np.float64) * axis.step
    widths = np.full(axis.size, abs(axis.step))
    matrix, coverage = _weight_matrix(source_size, centres, widths, Interpolation(kernel))
    coverage.setflags(write=False)
    return matrix, coverage


@functools.lru_cache(maxsize=256)
def _cached_as(source_size: int, axis: AxisMap, kernel: Interpolation, dtype: str) -> scipy.sparse.csr_matrix:
    return _cached(source_size, axis, kernel)[0].astype(dtype)


@functools.lru_cache(maxsize=64)
def _outside(
    size_r: int, rows: AxisMap, size_c: int, columns: AxisMap, kernel: Interpolation
) -> npt.NDArray[np.bool_] | None:
    """The (rows, columns) mask of padding samples (coverage product < 0.5), None when there is none."""
    cov_rows, cov_cols = _cached(size_r, rows, kernel)[1], _cached(size_c, columns, kernel)[1]
    if float(cov_rows.min()) * float(cov_cols.min()) >= _COVERAGE_MIN:
        return None
    mask = np.outer(cov_rows, cov_cols) < _COVERAGE_MIN
    mask.setflags(write=False)
    return mask


def axis_weights(
    source_size: int, axis: AxisMap, kernel: Interpolation
) -> tuple[scipy.sparse.csr_matrix, FloatArray]:
    """(axis.size x source_size) float32 weights, rows summing to 1 over the source, and each row's coverage.

    Cached per (source_size, axis, kernel): treat the returned objects as read-only.
    """
    return _cached_as(source_size, axis, kernel, "float32"), _cached(source_size, axis, kernel)[1]


# ---------------------------------------------------------------------------------------------- applying


def _work_dtype(dtype: np.dtype[Any]) -> str:
    """float32 unless that would lose input precision (float64, 32/64-bit integers)."""
    if dtype.kind == "f" and dtype.itemsize > 4 or dtype.kind in "iu" and dtype.itemsize >= 4:
        return "float64"
    return "float32"


def _apply(matrix: scipy.sparse.csr_matrix, work: FloatArray) -> FloatArray:
    """``matrix`` applied along the leading axis of a C-contiguous array."""
    flat = work.reshape(work.shape[0], -1)
    out: FloatArray = np.asarray(matrix @ flat)
    return out.reshape((matrix.shape[0],) + work.shape[1:])


def _swap(array: npt.NDArray[np.generic], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    """The first two axes swapped into a new C-contiguous array of ``dtype``.

    Copied in bands of ``_BAND`` source rows: a plain transpose reads with the row stride, and a
    power-of-two stride (512 float32 = 2 KiB) thrashes the cache, making it 4x slower.
    """
    out = np.empty((array.shape[1], array.shape[0]) + array.shape[2:], dtype=dtype)
    for start in range(0, array.shape[0], _BAND):
        out[:, start : start + _BAND] = array[start : start + _BAND].swapaxes(0, 1)
    return out


def _separable(
    image: npt.NDArray[np.generic],
    matrices: tuple[scipy.sparse.csr_matrix, scipy.sparse.csr_matrix],
    dtype: str,
) -> tuple[FloatArray, bool]:
    """Rows and columns matrices applied to an (R, C) plane, the cheaper order first.

    Returns the result and whether its first two axes are swapped (columns, rows), so that the
    caller swaps them once, fused with its final cast.
    """
    w_rows, w_cols = matrices
    rows_first = w_rows.nnz * image.shape[1] + w_cols.nnz * w_rows.shape[0]
    cols_first = w_cols.nnz * image.shape[0] + w_rows.nnz * w_cols.shape[0]
    if rows_first <= cols_first:
        work = _apply(w_rows, np.ascontiguousarray(image, dtype=dtype))
        return _apply(w_cols, _swap(work, dtype)), True
    work = _apply(w_cols, _swap(image, dtype))
    return _apply(w_rows, _swap(work, dtype)), False


def _finish(
    work: FloatArray,
    swapped: bool,
    out_dtype: np.dtype[Any],
    value_range: tuple[float, float] | None,
) -> npt.NDArray[Any]:
    """Round and clip in place, then one cast (fused with the swap back to (rows, columns) if needed)."""
    if out_dtype.kind in "iu":
        info = np.iinfo(out_dtype)
        lo, hi = value_range if value_range is not None else (float(info.min), float(info.max))
        np.rint(work, out=work)
        np.clip(work, max(lo, float(info.min)), min(hi, float(info.max)), out=work)
    elif value_range is not None:
        np.clip(work, value_range[0], value_range[1], out=work)
    return _swap(work, out_dtype) if swapped else np.ascontiguousarray(work, dtype=out_dtype)


def _plane(
    image: npt.NDArray[Any],
    matrices: tuple[scipy.sparse.csr_matrix, scipy.sparse.csr_matrix],
    dtype: str,
    out_dtype: np.dtype[Any],
    value_range: tuple[float, float] | None,
) -> npt.NDArray[Any]:
    """One (R, C[, S]) plane resampled and finished; colour channel by channel (measured 3x faster than
    swapping axes with a trailing S of 3, whose 3-element inner loops are slow in NumPy)."""
    if image.ndim == 2:
        return _finish(*_separable(image, matrices, dtype), out_dtype, value_range)
    out = np.empty((matrices[0].shape[0], matrices[1].shape[0], image.shape[2]), dtype=out_dtype)
    for sample in range(image.shape[2]):
        out[..., sample] = _finish(*_separable(image[..., sample], matrices, dtype), out_dtype, value_range)
    return out


def _check_pad(pad_value: float, dtype: np.dtype[Any]) -> None:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not (info.min <= pad_value <= info.max) or pad_value != int(pad_value):
            raise ValueError(f"pad value {pad_value} does not fit {dtype}")
    elif dtype.kind != "f":
        raise TypeError(f"cannot resample {dtype} samples")


def resample_plane(
    image: npt.NDArray[SampleT],
    rows: AxisMap,
    columns: AxisMap,
    kernel: Interpolation,
    *,
    pad_value: float,
    value_range: tuple[float, float] | None = None,
    frames: bool = False,
) -> npt.NDArray[SampleT]:
    """Resample (R, C[, S]) or, with ``frames``, (N, R, C[, S]) onto the grid the two maps describe.

    Same dtype out; integers rounded (np.rint) and clipped to ``value_range`` (default: the dtype's
    range); samples whose coverage (rows x columns) is under 0.5 are ``pad_value``, written as given.
    """
    kernel = Interpolation(kernel)
    first = 1 if frames else 0
    if image.ndim not in (first + 2, first + 3):
        raise ValueError(f"expected {'(N, R, C[, S])' if frames else '(R, C[, S])'}, got shape {image.shape}")
    _check_pad(pad_value, image.dtype)
    dtype = _work_dtype(image.dtype)
    size_r, size_c = image.shape[first], image.shape[first + 1]
    matrices = _cached_as(size_r, rows, kernel, dtype), _cached_as(size_c, columns, kernel, dtype)
    if frames:  # frame by frame: the weights are shared, the intermediates stay in cache
        out = np.empty((image.shape[0], rows.size, columns.size) + image.shape[3:], dtype=image.dtype)
        for frame in range(image.shape[0]):
            out[frame] = _plane(image[frame], matrices, dtype, image.dtype, value_range)
    else:
        out = _plane(image, matrices, dtype, image.dtype, value_range)
    outside = _outside(size_r, rows, size_c, columns, kernel)
    if outside is not None:  # broadcast over frames and samples
        where = outside.reshape(outside.shape + (1,) * (out.ndim - first - 2))
        np.copyto(out, np.asarray(pad_value, dtype=out.dtype), where=where)
    return out


def _slice_axis(
    source_positions: FloatArray, target_positions: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Fractional source indices of the targets and their footprints (the local target spacing) in source slices."""
    index = np.arange(source_positions.size, dtype=np.float64)

    def to_index(mm: FloatArray) -> FloatArray:
        first_gap = source_positions[1] - source_positions[0]
        last_gap = source_positions[-1] - source_positions[-2]
        inner = np.interp(mm, source_positions, index)
        below = (mm - source_positions[0]) / first_gap
        above = index[-1] + (mm - source_positions[-1]) / last_gap
        return np.where(mm < source_positions[0], below, np.where(mm > source_positions[-1], above, inner))

    if target_positions.size >= 2:
        spacing = np.gradient(target_positions)
    else:
        spacing = np.array([np.median(np.diff(source_positions))])
    centres = to_index(target_positions)
    widths = to_index(target_positions + spacing / 2.0) - to_index(target_positions - spacing / 2.0)
    return centres, np.abs(widths)


def resample_slices(
    volume: npt.NDArray[SampleT],
    source_positions: npt.ArrayLike,
    target_positions: npt.ArrayLike,
    kernel: Interpolation,
    *,
    pad_value: float,
    value_range: tuple[float, float] | None = None,
) -> tuple[npt.NDArray[SampleT], list[list[int]]]:
    """Resample a stack (N, R, C[, S]) across slices at ``target_positions`` (mm along the normal).

    LINEAR interpolates between neighbours (its support stretched when the target spacing is coarser),
    AREA averages the slab of the target spacing, NEAREST picks a slice. Returns the new stack and, per
    output slice, the source slices it was computed from (empty for padding).
    """
    kernel = Interpolation(kernel)
    if kernel not in _SLICE_KERNELS:
        allowed = sorted(k.value for k in _SLICE_KERNELS)
        raise ValueError(f"across slices only {allowed} are allowed, not {kernel.value}")
    source = np.asarray(source_positions, dtype=np.float64).ravel()
    target = np.asarray(target_positions, dtype=np.float64).ravel()
    if volume.ndim not in (3, 4) or source.size != volume.shape[0]:
        raise ValueError(f"volume {volume.shape} and {source.size} source positions do not match")
    if source.size < 2 or not np.all(np.diff(source) > 0.0) or not np.all(np.isfinite(target)):
        raise ValueError("need at least two strictly ascending source positions and finite targets")
    _check_pad(pad_value, volume.dtype)
    centres, widths = _slice_axis(source, target)
    matrix, coverage = _weight_matrix(source.size, centres, widths, kernel)
    dtype = _work_dtype(volume.dtype)
    work = _apply(matrix.astype(dtype), np.ascontiguousarray(volume, dtype=dtype))
    out = _finish(work, False, volume.dtype, value_range)
    padded = coverage < _COVERAGE_MIN
    out[padded] = pad_value
    contributors = [
        [] if padded[k] else [int(i) for i in matrix.indices[matrix.indptr[k] : matrix.indptr[k + 1]]]
        for k in range(target.size)
    ]
    return out, contributors


# ---------------------------------------------------------------------------------------------- round trip


def _band(keep: npt.NDArray[np.bool_]) -> slice | npt.NDArray[np.intp]:
    """A slice when the kept indices are one contiguous run (the usual case), else the index array."""
    where = np.flatnonzero(keep)
    if where.size and where[-1] - where[0] + 1 == where.size:
        return slice(int(where[0]), int(where[-1]) + 1)
    return where


def round_trip_error(
    source: npt.NDArray[np.generic],
    normalized: npt.NDArray[np.generic],
    rows: AxisMap,
    columns: AxisMap,
    *,
    normalized_coverage_min: float = 0.999,
) -> RoundTripError:
    """Resample ``normalized`` back onto the source grid (inverse maps, LINEAR, float64) and compare.

    A normalized pixel counts as inside the field when its whole footprint lies in the source (so
    padding and edge-extrapolated pixels are left out); a source pixel is compared when its LINEAR
    support lies in the normalized image and reads only such pixels (both to ``normalized_coverage_min``).
    ``rows``/``columns`` are the maps that produced ``normalized`` from ``source``.
    """
    if source.ndim not in (2, 3) or normalized.shape[2:] != source.shape[2:]:
        raise ValueError(f"source {source.shape} and normalized {normalized.shape} are not planes of one kind")
    if normalized.shape[:2] != (rows.size, columns.size):
        raise ValueError(f"normalized {normalized.shape} does not match the maps ({rows.size}, {columns.size})")
    valid_r = _cached(source.shape[0], rows, Interpolation.AREA)[1] >= normalized_coverage_min
    valid_c = _cached(source.shape[1], columns, Interpolation.AREA)[1] >= normalized_coverage_min
    back_rows, back_cols = rows.inverse(source.shape[0]), columns.inverse(source.shape[1])
    w_rows, cov_rows = _cached(rows.size, back_rows, Interpolation.LINEAR)
    w_cols, cov_cols = _cached(columns.size, back_cols, Interpolation.LINEAR)
    # the share of each back-sampled value that comes from valid normalized pixels, per axis
    share_rows = w_rows @ valid_r.astype(np.float64)
    share_cols = w_cols @ valid_c.astype(np.float64)
    keep_r = (cov_rows >= normalized_coverage_min) & (share_rows >= normalized_coverage_min)
    keep_c = (cov_cols >= normalized_coverage_min) & (share_cols >= normalized_coverage_min)
    if not keep_r.any() or not keep_c.any():
        return RoundTripError(rmse=math.nan, max_abs=math.nan, pixels=0)
    valid = (valid_r[:, None] & valid_c[None, :]).reshape((rows.size, columns.size) + (1,) * (normalized.ndim - 2))
    # float32 throughout: this is a recorded statistic (float32 keeps 24 bits, ample for 16-bit samples)
    masked = np.where(valid, np.asarray(normalized, dtype=np.float32), np.float32(0.0))
    weights = (_cached_as(rows.size, back_rows, Interpolation.LINEAR, "float32"),
               _cached_as(columns.size, back_cols, Interpolation.LINEAR, "float32"))
    pick: Any = (_band(keep_r), _band(keep_c))  # a rectangle in practice: slices, not fancy indexing
    if not isinstance(pick[0], slice) and not isinstance(pick[1], slice):
        pick = np.ix_(pick[0], pick[1])
    back = _plane(masked, weights, "float32", np.dtype(np.float32), None)[pick]
    # the weighted mean over valid normalized pixels: divide by the weight they carried (separable)
    share = np.outer(share_rows[keep_r], share_cols[keep_c]).astype(np.float32)
    share = share.reshape(back.shape[:2] + (1,) * (back.ndim - 2))
    diff = np.divide(back, share, out=back)
    diff -= np.asarray(source)[pick]
    diff = diff.ravel()
    return RoundTripError(
        rmse=math.sqrt(float(np.dot(diff, diff)) / diff.size), max_abs=float(np.max(np.abs(diff))), pixels=int(diff.size)
    )
