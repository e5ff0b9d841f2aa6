"""k-means quantization: intensities (grayscale) or colours (RGB) to k centroids.

Why this shape: the naive version (ANCHORS.md: index map + zstd) costs 1.09 bpp
at k = 16 on CT and 130-270 ms a slice. Here

* grayscale uses *exact* 1-D k-means on the histogram (Ckmeans.1d.dp through
  ``ckwrap``: an O(k*L) dynamic programme over the L distinct levels, weighted
  by their counts), so a 512^2 CT slice at k = 64 takes ~10 ms and the result
  is the optimum, not a local one;
* colour uses scikit-learn k-means++ with a fixed seed: ``MiniBatchKMeans``
  on a fixed pseudo-random sample of 65,536 pixels, or -- when the frame has
  at most that many distinct colours, as ultrasound and secondary captures
  do (hundreds) -- ``KMeans`` on the distinct colours weighted by their
  counts, which is k-means of every pixel and 10-20x faster;
* centroids are rounded to integers and every pixel is (re)assigned to its
  nearest integer centroid, so the palette is stored as integers, decoding is
  a table look-up (exact on any machine) and the reported WCSS is exactly the
  squared error of the reconstruction;
* palette entries are sorted (by intensity, or by luma for colour), so the
  index map is a smooth posterized image, coded losslessly with JPEG-LS at
  the real bit depth of k (and/or JPEG-XL, config ``index_codec``).

k comes from the configuration in exactly one of three spellings:
``{"id": "kmeans", "k": 64}`` (also the default, ``{"id": "kmeans"}``),
``{"id": "kmeans", "max_rmse": 8.0}`` (the smallest k in 1..max_k whose
WCSS / N <= max_rmse^2, N = number of samples: pixels, times 3 for colour),
or ``{"id": "kmeans", "elbow": true}`` (the elbow of WCSS(k) over k in
1..max_k: the k farthest below the chord of the normalised curve).

``fit(frames)`` builds one palette for a series (a context blob); frames
encoded with it store only their index map.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, cast

import imagecodecs
import jpeg_ls
import numpy as np
import numpy.typing as npt

from archive.codecs._pixels import Pixels, validate_pixels
from archive.codecs.base import (
    Codec,
    CodecConfig,
    EncodedPayload,
    _strip,
    check_int,
    dist_version,
)
from archive.codecs.frame import FrameHeader
from archive.errors import CodecError

I64 = npt.NDArray[np.int64]

DEFAULT_K: Final = 64
MAX_K: Final = 65536  # the index map is at most 16 bits
COLOUR_SAMPLE: Final = 65536  # pixels MiniBatchKMeans sees; fixed so the palette is reproducible
SEED: Final = 0
INDEX_CODECS: Final = ("jpegls", "jpegxl", "smallest")
_JXL_EFFORT: Final = 3  # effort 3: ~2 % smaller than JPEG-LS on CT index maps at ~2x its time
_MAX_DIM: Final = 65535  # pyjpegls / JPEG-LS limit on rows and columns

_FORMAT: Final = 1
_GRAY, _COLOUR = 0, 1
_CODER_IDS: Final = {"jpegls": 0, "jpegxl": 1}
_CODER_NAMES: Final = {v: k for k, v in _CODER_IDS.items()}
_HEAD = struct.Struct("<BBBBII")  # format, kind, index coder, flags, palette length n, palette block bytes
_CTX_MAGIC: Final = b"KMCX"
_CTX_HEAD = struct.Struct("<4sBBI")  # magic, format, kind, palette length n
_PAL_HEAD = struct.Struct("<Bq")  # 0 raw / 1 zstd, base value
_FLAG_CONTEXT: Final = 1


@dataclass(frozen=True)
class KMeansConfig(CodecConfig):
    """At most one of ``k``, ``max_rmse``, ``elbow``; none of them means k = 64.

    ``max_k`` bounds the automatic choices; ``index_codec`` is how the index
    map is coded ("smallest" tries JPEG-LS and JPEG-XL and keeps the smaller).
    """

    k: int | None = None
    max_rmse: float | None = None
    elbow: bool = False
    max_k: int = 256
    index_codec: str = "jpegls"

    def validate(self) -> None:
        if self.k is not None:
            check_int("kmeans k", self.k, 1, MAX_K)
        if self.max_rmse is not None:
            value = self.max_rmse
            if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
                raise CodecError(f"kmeans max_rmse must be a finite number >= 0, got {value!r}")
        if type(self.elbow) is not bool:
            raise CodecError(f"kmeans elbow must be true or false, got {self.elbow!r}")
        chosen = [name for name, on in (("k", self.k is not None), ("max_rmse", self.max_rmse is not None),
                                        ("elbow", self.elbow)) if on]
        if len(chosen) > 1:
            raise CodecError(f"kmeans takes one of k, max_rmse, elbow; got {chosen}")
        check_int("kmeans max_k", self.max_k, 2, MAX_K)
        if self.index_codec not in INDEX_CODECS:
            raise CodecError(f"kmeans index_codec must be one of {INDEX_CODECS}, got {self.index_codec!r}")


# -- grayscale: exact 1-D k-means on the histogram ------------------------------------------------------------------


def histogram(arr: Pixels) -> tuple[I64, I64]:
    """Distinct values (ascending) and their counts: bincount, far faster than np.unique."""
    lo = int(arr.min())
    counts = np.bincount(np.subtract(arr, lo, dtype=np.int64).ravel())
    present = np.flatnonzero(counts)
    return (present + lo).astype(np.int64), counts[present].astype(np.int64)


def assign_gray(values: I64, palette: I64) -> I64:
    """Index of the nearest entry of a sorted integer palette (ties to the lower), in exact integer arithmetic."""
    if len(palette) == 1:
        return np.zeros(len(values), np.int64)
    doubled_midpoints = palette[:-1] + palette[1:]
    return np.searchsorted(doubled_midpoints, 2 * values, side="left").astype(np.int64)


def _compact(palette: I64, labels: I64) -> tuple[I64, I64]:
    """Drop palette entries no value maps to (rounding can empty a cluster), renumbering labels."""
    used = np.zeros(len(palette), bool)
    used[labels] = True
    if used.all():
        return palette, labels
    renumber = np.cumsum(used) - 1
    return palette[used], renumber[labels]


def gray_quantize(levels: I64, counts: I64, k: int) -> tuple[I64, I64, int]:
    """Optimal k-means of the weighted levels, centroids rounded to integers.

    Returns (palette ascending, label of each level, WCSS as an exact int).
    """
    if k >= len(levels):
        palette = levels.copy()
        labels = np.arange(len(levels), dtype=np.int64)
    else:
        import ckwrap  # compiled Ckmeans.1d.dp, loaded only when used

        result = ckwrap.ckmeans(levels.astype(np.float64), k, weights=counts.astype(np.float64), method="linear")
        cluster = np.asarray(result.labels, dtype=np.int64)
        n = int(cluster.max()) + 1
        sums = np.zeros(n, np.int64)
        np.add.at(sums, cluster, counts * levels)
        sizes = np.bincount(cluster, weights=counts, minlength=n).astype(np.int64)
        # round(sum / size) exactly, in integers (floor of x + 1/2)
        palette = np.unique((2 * sums + sizes) // (2 * sizes))
        labels = assign_gray(levels, palette)
        palette, labels = _compact(palette, labels)
    err = levels - palette[labels]
    return palette, labels, int(np.dot(counts, err * err))


# -- colour: scikit-learn k-means++ with a fixed seed -------------------------------------------------------------------


def _colour_keys(arr: Pixels) -> I64:
    """One int64 per pixel packing its three (offset-to-unsigned) samples, 16 bits each."""
    shifted = np.subtract(arr.reshape(-1, 3), int(np.iinfo(arr.dtype).min), dtype=np.int64)
    keys: I64 = (shifted[:, 0] << 32) | (shifted[:, 1] << 16) | shifted[:, 2]
    return keys


def _keys_to_colours(keys: I64, dtype: np.dtype[Any]) -> I64:
    colours = np.stack([keys >> 32, (keys >> 16) & 0xFFFF, keys & 0xFFFF], axis=1) + int(np.iinfo(dtype).min)
    return colours.astype(np.int64)


def _colour_table(arr: Pixels) -> tuple[I64, I64, I64]:
    """Distinct colours (u, 3), their counts, and each pixel's row in that table."""
    ukeys, inverse, counts = np.unique(_colour_keys(arr), return_inverse=True, return_counts=True)
    return _keys_to_colours(ukeys, arr.dtype), counts.astype(np.int64), inverse.astype(np.int64).ravel()


def _luma_order(palette: I64) -> I64:
    """Palette sorted by integer luma (ties by the colour itself): neighbours in the image get near indices."""
    luma = palette @ np.array([299, 587, 114], np.int64)
    order = np.lexsort((palette[:, 2], palette[:, 1], palette[:, 0], luma))
    return palette[order]


def assign_colour(colours: I64, palette: I64) -> I64:
    """Nearest palette entry of each colour (float64 on integers < 2^53: exact, chunked to bound memory)."""
    p = palette.astype(np.float64)
    pn = (p * p).sum(axis=1)
    out = np.empty(len(colours), np.int64)
    step = max(1, (1 << 22) // max(1, len(palette)))
    for start in range(0, len(colours), step):
        c = colours[start : start + step].astype(np.float64)
        d = pn[None, :] - 2.0 * (c @ p.T)  # |c|^2 is the same for every entry
        out[start : start + step] = np.argmin(d, axis=1)
    return out


def colour_source(arrs: Sequence[Pixels], size: int = COLOUR_SAMPLE) -> tuple[I64, I64]:
    """What k-means is fitted on: (colours (m, 3), weights).

    When the frames hold at most ``size`` distinct colours (ultrasound, secondary captures: hundreds), they
    are those colours weighted by their counts -- exactly k-means of every pixel, at a fraction of the cost.
    Otherwise a fixed pseudo-random sample of ``size`` pixels, spread over the frames by their sizes, weight 1.
    """
    dtype = arrs[0].dtype
    ukeys, counts = np.unique(np.concatenate([_colour_keys(a) for a in arrs]), return_counts=True)
    if len(ukeys) <= size:
        return _keys_to_colours(ukeys, dtype), counts.astype(np.int64)
    rng = np.random.default_rng(SEED)
    total = sum(a.shape[0] * a.shape[1] for a in arrs)
    parts = []
    for a in arrs:
        flat = a.reshape(-1, 3)
        take = min(len(flat), max(1, round(size * len(flat) / total)))
        parts.append(flat[np.sort(rng.choice(len(flat), size=take, replace=False))].astype(np.int64))
    sample = np.concatenate(parts)
    return sample, np.ones(len(sample), np.int64)


def colour_palette(colours: I64, weights: I64, k: int, dtype: np.dtype[Any]) -> I64:
    """At most k integer colours, sorted by luma: k-means++ with a fixed seed, centres rounded and clipped.

    Weighted distinct colours (few) go to Lloyd's ``KMeans`` (exact k-means of all pixels, fast on
    hundreds of points); a pixel sample goes to ``MiniBatchKMeans``.
    """
    distinct = np.unique(colours, axis=0)
    if len(distinct) <= k:
        return _luma_order(distinct)
    from sklearn.cluster import (  # heavy import, only when colour is coded
        KMeans,
        MiniBatchKMeans,
    )

    x = colours.astype(np.float64)
    if len(distinct) == len(colours) and int(weights.max()) > 1:
        km: Any = KMeans(n_clusters=k, init="k-means++", n_init=3, random_state=SEED)
        km.fit(x, sample_weight=weights.astype(np.float64))
    else:
        km = MiniBatchKMeans(n_clusters=k, init="k-means++", n_init=3, random_state=SEED, batch_size=4096,
                             max_iter=100)
        km.fit(x)
    info = np.iinfo(dtype)
    centres = np.clip(np.rint(km.cluster_centers_), info.min, info.max).astype(np.int64)
    return _luma_order(np.unique(centres, axis=0))


def colour_quantize(colours: I64, counts: I64, palette: I64) -> tuple[I64, I64, int]:
    """Assign distinct colours to the palette: (palette, label per colour, exact WCSS)."""
    labels = assign_colour(colours, palette)
    palette, labels = _compact(palette, labels)
    err = colours - palette[labels]
    return palette, labels, int(np.dot(counts, (err * err).sum(axis=1)))


# -- choosing k -------------------------------------------------------------------------------------------------------


def elbow_grid(max_k: int) -> list[int]:
    """k values the elbow is looked for on: every k up to 8, then 4 steps per doubling (the elbow is at small k)."""
    ks = list(range(1, min(max_k, 8) + 1))
    k = 8
    while k < max_k:
        k = min(max_k, k + max(1, k // 4))
        ks.append(k)
    return ks


def elbow_k(ks: Sequence[int], wcss: Sequence[float]) -> int:
    """The k farthest below the chord from the first to the last point of the normalised WCSS curve."""
    if len(ks) < 3 or wcss[0] <= 0:
        return ks[0] if wcss[0] <= 0 else ks[-1]
    x = (np.asarray(ks, np.float64) - ks[0]) / (ks[-1] - ks[0])
    y = np.asarray(wcss, np.float64) / wcss[0]
    chord = y[0] + (y[-1] - y[0]) * x
    return int(ks[int(np.argmax(chord - y))])


def smallest_k(wcss_of: Callable[[int], float], target: float, max_k: int) -> int:
    """Smallest k in 1..max_k with wcss_of(k) <= target (doubling, then bisection), or max_k if none."""
    if wcss_of(1) <= target:
        return 1
    lo, hi = 1, 2  # invariant: wcss(lo) > target
    while hi < max_k and wcss_of(hi) > target:
        lo, hi = hi, min(max_k, 2 * hi)
    if wcss_of(hi) > target:
        return max_k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if wcss_of(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


# -- the payload ------------------------------------------------------------------------------------------------------


def _pack_palette(palette: I64, kind: int) -> bytes:
    """Small: ascending gray levels as uint16 gaps, colours as uint16 offsets from their minimum.

    The 16-bit values are split into a high-byte plane and a low-byte plane before zstd (high bytes are
    mostly zero: ~25 % smaller than zstd of the interleaved bytes on MR palettes); raw when that is smaller.
    """
    base = int(palette.min()) if kind == _COLOUR else int(palette[0])
    values = (np.diff(palette) if kind == _GRAY else (palette - base).ravel()).astype("<u2")
    body = values.tobytes()
    planes = values.view(np.uint8).reshape(-1, 2).T.copy().tobytes()[::-1]  # high plane first (reversed)
    packed = bytes(imagecodecs.zstd_encode(planes, level=19)) if body else b""
    if body and len(packed) < len(body):
        return _PAL_HEAD.pack(1, base) + packed
    return _PAL_HEAD.pack(0, base) + body


def _unpack_palette(block: bytes, kind: int, n: int) -> I64:
    if len(block) < _PAL_HEAD.size:
        raise CodecError("kmeans palette block truncated")
    method, base = _PAL_HEAD.unpack_from(block)
    body = block[_PAL_HEAD.size :]
    count = n - 1 if kind == _GRAY else 3 * n
    if method == 1:
        try:
            planes = bytes(imagecodecs.zstd_decode(body))
        except Exception as exc:
            raise CodecError(f"kmeans palette failed to decode: {exc}") from exc
        if len(planes) != 2 * count:
            raise CodecError("kmeans palette has the wrong length")
        body = np.frombuffer(planes[::-1], np.uint8).reshape(2, count).T.copy().tobytes()
    elif method != 0:
        raise CodecError(f"kmeans palette method {method} unknown")
    if len(body) != 2 * count:
        raise CodecError("kmeans palette has the wrong length")
    values: I64 = np.frombuffer(body, "<u2").astype(np.int64)
    if kind == _GRAY:
        return np.concatenate([np.array([base], np.int64), base + np.cumsum(values)])
    palette: I64 = (values + base).reshape(n, 3)
    return palette


def _encode_index(index: Pixels, coder: str) -> tuple[int, bytes]:
    """The index map as a lossless image at its real bit depth; (coder id, codestream).

    The map is uint8 whenever its maximum is below 256: pyjpegls 1.5.1 corrupts uint16 buffers whose
    maximum is below 256 (ANCHORS.md), and the bit depth must match the buffer's sample size.
    """
    top = int(index.max())
    index = np.ascontiguousarray(index, dtype=np.uint8 if top < 256 else np.uint16)
    bits = max(2, top.bit_length())
    rows, cols = index.shape
    out: dict[int, bytes] = {}
    if coder in ("jpegls", "smallest"):
        try:
            out[0] = bytes(jpeg_ls.encode_buffer(index.tobytes(), rows, cols, 1, bits, 0, 0))
        except RuntimeError as exc:
            if "too small" not in str(exc):  # pyjpegls' output buffer on tiny frames (see jpegls.py)
                raise
            out[0] = bytes(imagecodecs.jpegls_encode(index))
    if coder in ("jpegxl", "smallest"):
        out[1] = bytes(imagecodecs.jpegxl_encode(index, lossless=True, effort=_JXL_EFFORT, bitspersample=bits,
                                                 numthreads=1))
    best = min(out, key=lambda c: len(out[c]))
    return best, out[best]


def _decode_index(coder: int, data: bytes) -> Pixels:
    if coder not in _CODER_NAMES:
        raise CodecError(f"kmeans index coder {coder} unknown")
    try:
        if coder == 0:
            return imagecodecs.jpegls_decode(data)
        return imagecodecs.jpegxl_decode(data, numthreads=1)
    except Exception as exc:  # the C library's own error on a corrupt codestream
        raise CodecError(f"kmeans index map failed to decode: {exc}") from exc


def pack_context(palette: I64, kind: int) -> bytes:
    """The series palette as a context blob."""
    return _CTX_HEAD.pack(_CTX_MAGIC, _FORMAT, kind, len(palette)) + _pack_palette(palette, kind)


def unpack_context(context: bytes) -> tuple[int, I64]:
    """(kind, palette) of a context blob made by ``fit``."""
    if len(context) < _CTX_HEAD.size:
        raise CodecError("kmeans context blob truncated")
    magic, fmt, kind, n = _CTX_HEAD.unpack_from(context)
    if magic != _CTX_MAGIC or fmt != _FORMAT or kind not in (_GRAY, _COLOUR) or not 1 <= n <= MAX_K:
        raise CodecError("not a kmeans context blob")
    palette: I64 = _unpack_palette(context[_CTX_HEAD.size :], kind, n)
    return kind, palette


# -- the codec --------------------------------------------------------------------------------------------------------


class KMeansCodec(Codec):
    """Intensity / colour quantization to k integer centroids; lossy with no per-pixel bound."""

    codec_id: ClassVar[str] = "kmeans"
    config_class: ClassVar[type[CodecConfig]] = KMeansConfig
    __slots__ = ()

    @property
    def config(self) -> KMeansConfig:
        return cast(KMeansConfig, self._config)

    @property
    def max_error(self) -> int | None:
        return None

    # -- choosing the palette --

    def _gray(self, levels: I64, counts: I64) -> tuple[I64, I64, int]:
        cfg = self.config
        cache: dict[int, tuple[I64, I64, int]] = {}

        def run(k: int) -> tuple[I64, I64, int]:
            k = min(k, len(levels))
            if k not in cache:
                cache[k] = gray_quantize(levels, counts, k)
            return cache[k]

        max_k = min(cfg.max_k, len(levels))
        if cfg.max_rmse is not None:
            target = float(cfg.max_rmse) ** 2 * int(counts.sum())
            return run(smallest_k(lambda k: run(k)[2], target, max_k))
        if cfg.elbow:
            ks = elbow_grid(max_k)
            return run(elbow_k(ks, [run(k)[2] for k in ks]))
        return run(cfg.k if cfg.k is not None else DEFAULT_K)

    def _colour_palette(self, arrs: Sequence[Pixels]) -> I64:
        cfg = self.config
        dtype = arrs[0].dtype
        colours, weights = colour_source(arrs)
        if cfg.max_rmse is None and not cfg.elbow:
            return colour_palette(colours, weights, cfg.k if cfg.k is not None else DEFAULT_K, dtype)
        # WCSS of each candidate k is measured on what k-means saw: all pixels, or the sample
        cache: dict[int, tuple[I64, int]] = {}

        def run(k: int) -> tuple[I64, int]:
            if k not in cache:
                palette = colour_palette(colours, weights, k, dtype)
                cache[k] = (palette, colour_quantize(colours, weights, palette)[2])
            return cache[k]

        max_k = min(cfg.max_k, len(colours))
        if cfg.max_rmse is not None:
            target = float(cfg.max_rmse) ** 2 * 3 * int(weights.sum())
            return run(smallest_k(lambda k: run(k)[1], target, max_k))[0]
        ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if k < max_k] + [max_k]
        return run(elbow_k(ks, [run(k)[1] for k in ks]))[0]

    def fit(self, frames: Sequence[Pixels]) -> bytes | None:
        """One palette for a series: k-means of the pooled histogram (gray) or of a pooled sample (colour)."""
        arrs = [validate_pixels(f) for f in frames]
        if not arrs:
            raise CodecError("kmeans fit needs at least one frame")
        kinds = {_kind(a) for a in arrs}
        if None in kinds or len(kinds) != 1 or len({a.dtype for a in arrs}) != 1:
            raise CodecError("kmeans fit needs frames of one kind (all gray or all RGB) and one dtype")
        kind = kinds.pop()
        assert kind is not None
        if kind == _COLOUR:
            return pack_context(self._colour_palette(arrs), kind)
        hists = [histogram(a) for a in arrs]
        all_levels = np.concatenate([h[0] for h in hists])
        levels, inverse = np.unique(all_levels, return_inverse=True)
        counts = np.bincount(inverse.ravel(), weights=np.concatenate([h[1] for h in hists])).astype(np.int64)
        palette, _, _ = self._gray(levels.astype(np.int64), counts)
        return pack_context(palette, kind)

    # -- coding --

    def _encode_payload(self, arr: Pixels, context: bytes | None) -> EncodedPayload | None:
        kind = _kind(arr)
        if kind is None or arr.shape[0] > _MAX_DIM or arr.shape[1] > _MAX_DIM:
            return None
        if context is not None:
            ctx_kind, palette = unpack_context(context)
            if ctx_kind != kind:
                raise CodecError("kmeans context palette is for the other kind of frame (gray vs colour)")
            info = np.iinfo(arr.dtype)
            if int(palette.min()) < info.min or int(palette.max()) > info.max:
                raise CodecError(f"kmeans context palette does not fit {arr.dtype}")
        if kind == _GRAY:
            levels, counts = histogram(arr)
            if context is None:
                palette, labels, wcss = self._gray(levels, counts)
            else:
                labels = assign_gray(levels, palette)
                err = levels - palette[labels]
                wcss = int(np.dot(counts, err * err))
            lut_dtype = np.uint8 if len(palette) <= 256 else np.uint16
            lut = np.zeros(int(levels[-1] - levels[0]) + 1, lut_dtype)
            lut[levels - levels[0]] = labels
            index = lut[np.subtract(arr, int(levels[0]), dtype=np.int64)]
        else:
            colours, counts, inverse = _colour_table(arr)
            if context is None:
                palette = self._colour_palette([arr])
            if context is None:
                palette, labels, wcss = colour_quantize(colours, counts, palette)  # drops unused entries
            else:
                labels = assign_colour(colours, palette)  # keeps the context's numbering
                err = colours - palette[labels]
                wcss = int(np.dot(counts, (err * err).sum(axis=1)))
            lut_dtype = np.uint8 if len(palette) <= 256 else np.uint16
            index = labels.astype(lut_dtype)[inverse].reshape(arr.shape[:2])
        n = len(palette)
        coder, index_bytes = _encode_index(index, self.config.index_codec)
        palette_block = b"" if context is not None else _pack_palette(palette, kind)
        flags = _FLAG_CONTEXT if context is not None else 0
        payload = _HEAD.pack(_FORMAT, kind, coder, flags, n, len(palette_block)) + palette_block + index_bytes
        stats = {
            "k": n,
            "wcss": float(wcss),
            "palette_bytes": len(palette_block),
            "index_bytes": len(index_bytes),
            "index_codec": _CODER_NAMES[coder],
        }
        return EncodedPayload(payload, arr.dtype, 0, uses_context=context is not None, stats=stats)

    @classmethod
    def decode_payload(cls, payload: bytes, header: FrameHeader, context: bytes | None) -> Pixels:
        if len(payload) < _HEAD.size:
            raise CodecError("kmeans payload truncated")
        fmt, kind, coder, flags, n, pal_len = _HEAD.unpack_from(payload)
        if fmt != _FORMAT or kind not in (_GRAY, _COLOUR) or not 1 <= n <= MAX_K:
            raise CodecError("kmeans payload header is invalid")
        start = _HEAD.size
        if flags & _FLAG_CONTEXT:
            if context is None:
                raise CodecError("kmeans payload needs its context palette")
            ctx_kind, palette = unpack_context(context)
            if ctx_kind != kind or len(palette) != n:
                raise CodecError("kmeans context palette does not match the payload")
        else:
            palette = _unpack_palette(payload[start : start + pal_len], kind, n)
        index = _decode_index(coder, payload[start + pal_len :])
        if index.shape != tuple(header.shape[:2]) or index.dtype.kind != "u":
            raise CodecError(f"kmeans index map decoded to {index.dtype} {index.shape}, expected {header.shape[:2]}")
        if int(index.max()) >= n:
            raise CodecError("kmeans index map refers past the palette")
        info = np.iinfo(header.payload_dtype)
        if int(palette.min()) < info.min or int(palette.max()) > info.max:
            raise CodecError("kmeans palette values fall outside the frame dtype")
        table = palette.astype(header.payload_dtype)
        out = table[index]
        if out.shape != tuple(header.shape):
            raise CodecError(f"kmeans decoded shape {out.shape}, header says {header.shape}")
        return out

    def _library_versions(self) -> dict[str, str]:
        return {
            "ckwrap": dist_version("ckwrap"),
            "scikit-learn": dist_version("scikit-learn"),
            "charls": _strip(imagecodecs.jpegls_version()),
            "pyjpegls": dist_version("pyjpegls"),
            "libjxl": _strip(imagecodecs.jpegxl_version()),
        }


def _kind(arr: Pixels) -> int | None:
    if arr.ndim == 2:
        return _GRAY
    if arr.ndim == 3 and arr.shape[2] == 3:
        return _COLOUR
    return None
