"""``medarchive bench rd DIR``: rate-distortion of the lossy codecs next to the anchors, in one run.

On the stored values of the CT and MR slices of a folder (``iter_frames``: the
values ``pixel_array`` gives, no rescale), grouped by modality, one run
measures, single-threaded:

* ours: ``pca`` at several explained-variance targets (block 8 and per-image,
  block 0), ``kmeans`` at several k, ``bounded(pca 0.98)`` and
  ``bounded(kmeans 64)`` at several N, and pca with a per-series basis
  (``fit``) when the codec offers one -- the rate then carries the context
  blob divided among the series' instances;
* the anchors on the same images: JPEG 2000 9/7 at target rates (OpenJPEG's
  ``level`` is a PSNR target, so it is searched per image by bisection),
  JPEG-LS near-lossless at the same N (per image the smaller of CharLS via
  imagecodecs and pyjpegls at the real bit depth, offset-mapped to unsigned as
  :mod:`archive.codecs.jpegls` does), and the lossless codecs.

Rates count every byte a decoder needs: our frame container, or the bare
codestream of an anchor, plus shared context. Decoding is timed and checked in
a fresh process (``python -m archive.bench_rd --decode``) from the bytes
written to ``out_dir/tmp``, so nothing cached at encode time helps; that
process computes the metrics: PSNR with peak 2^BitsStored - 1 and with peak
max - min of the original, max |error|, SSIM (scikit-image). Times are ms per
512 x 512 slice-equivalent (total ms * 512^2 / total pixels). A codec not yet
registered is reported as not available.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import imagecodecs
import jpeg_ls
import numpy as np
import numpy.typing as npt
from rich import box
from rich.console import Console
from rich.table import Table
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped, unused-ignore]

import archive
from archive.codecs import get_codec, read_frame_header, registered_codecs
from archive.codecs._pixels import offset_to_unsigned
from archive.codecs.base import Codec, dist_version
from archive.codecs.frame import pixel_crc32
from archive.bench_rd_decode import _json_safe, decode_manifest
from archive.bench_rd_plots import write_learned_plots, write_plots
from archive.errors import ArchiveError, CodecError

if TYPE_CHECKING:
    from archive.bench_learned import LearnedGrid

Pixels = npt.NDArray[Any]

MODALITIES: Final[tuple[str, ...]] = ("CT", "MR")
#: Sub-folders left out by default: bad input, and the classic samples (a lossy-JPEG CT, odd encodings) that
#: ANCHORS.md leaves out -- its CT is the 36 chest slices, its MR the three mr-* series.
SKIPPED_DIRS: Final[tuple[str, ...]] = ("broken", "misc-barre")
SLICE_PIXELS: Final[int] = 512 * 512
LOSSLESS_IDS: Final[tuple[str, ...]] = ("jpegls", "jpeg2000", "htj2k", "jpegxl", "zstd")
BOUNDED_INNERS: Final[tuple[tuple[str, dict[str, Any]], ...]] = (
    ("pca", {"id": "pca", "variance": 0.98}), ("kmeans", {"id": "kmeans", "k": 64}))
PCA_BLOCKS: Final[tuple[int, ...]] = (8, 0)
FIT_VARIANCE: Final[float] = 0.98
GOAL_RATIO: Final[float] = 1.10  # better bounded bpp / JPEG-LS near-lossless bpp at the same N, at most
GOAL_ENCODE_MS: Final[float] = 50.0  # pca 0.98 and kmeans 64 encode, ms per 512^2 slice, below
J2K_STEPS: Final[int] = 12  # search steps on OpenJPEG's PSNR target (dB) once bracketed
J2K_BRACKET_DB: Final[float] = 4.0
J2K_TOLERANCE: Final[float] = 0.02  # the chosen codestream is within 2 % under the target rate (when reachable)
J2K_LEVELS: Final[tuple[float, float]] = (5.0, 160.0)
ELBOW_KS: Final[tuple[int, ...]] = (2, 4, 8, 16, 32, 64, 128, 256)
ELBOW_IMAGES: Final[int] = 3  # images per modality in the WCSS elbow plot
NOTES: Final[tuple[str, ...]] = (
    ("bpp = 8 x (frame container or bare codestream + shared context / instances of its series) / pixels, "
     "mean over images; PSNR, range PSNR, SSIM: means over the images not decoded exactly"),
    "PSNR peak 2^BitsStored - 1; range PSNR peak = max - min of the original image",
    ("ms per 512² slice-equivalent = total ms x 512² / total pixels; encoding single-threaded (threadpoolctl), "
     "decoding in a fresh process from the stored bytes; series-fit rows include fit time / instances"),
    ("JPEG 2000: OpenJPEG 9/7, per image the highest PSNR target (dB, bisection) whose codestream fits the rate, "
     "in the better (lower MSE) of the stored sample type and unsigned at the real bit depth"),
    ("JPEG-LS near: per image the smaller of CharLS (imagecodecs) and pyjpegls at the real bit depth, "
     "offset-mapped to unsigned; lossless rows: the archive's codecs, frame container included"),
    "bounded rows: inner bpp = bytes the inner codec spends, residual bpp = the quantized residual (codec stats)",
)


# ------------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class RdImage:
    """One greyscale frame of stored values."""

    label: str  # path under the folder (#frame for multi-frame)
    series: str  # SeriesInstanceUID: the unit a per-series fit works on
    pixels: Pixels
    bits_stored: int

    @property
    def n_pixels(self) -> int:
        return int(self.pixels.size)

    @property
    def peak(self) -> int:
        return (1 << self.bits_stored) - 1


def load_images(folder: Path, slices: int | None = None, skip: Sequence[str] = SKIPPED_DIRS,
                ) -> tuple[dict[str, list[RdImage]], dict[str, int]]:
    """Greyscale CT and MR frames under ``folder`` by modality (``slices`` per modality, spread evenly) and why
    the other files were left out (counts)."""
    # imported here: the fresh decoding process imports this module and needs neither the catalog nor pydicom
    from archive.services.ingest import discover

    found: dict[str, list[RdImage]] = {m: [] for m in MODALITIES}
    left_out: dict[str, int] = {}
    files, _hidden = discover([folder])
    for path in files:
        relative = path.relative_to(folder)
        if relative.parts and relative.parts[0] in skip:
            left_out[f"in {relative.parts[0]}/"] = left_out.get(f"in {relative.parts[0]}/", 0) + 1
            continue
        why = _read_into(path, str(relative), found)
        if why:
            left_out[why] = left_out.get(why, 0) + 1
    chosen = {m: _spread(images, slices) for m, images in found.items() if images}
    return chosen, left_out


def _read_into(path: Path, label: str, found: dict[str, list[RdImage]]) -> str | None:
    from archive.dicom.reader import iter_frames, read_instance
    from archive.kinds import StorageMode

    try:
        parsed = read_instance(path)
    except ArchiveError:
        return "not readable"
    modality = str(parsed.dataset.get("Modality", ""))
    if modality not in found:
        return "not CT or MR"
    if parsed.mode is not StorageMode.PIXELS or parsed.layout is None:
        return "no encodable pixels"
    if parsed.layout.samples_per_pixel != 1:
        return "colour"
    try:
        frames = [np.ascontiguousarray(f) for f in iter_frames(parsed)]
    except ArchiveError:
        return "pixels not decodable"
    for index, frame in enumerate(frames):
        name = label if len(frames) == 1 else f"{label}#{index}"
        found[modality].append(RdImage(name, parsed.series_uid, frame, parsed.layout.bits_stored))
    return None


def _spread(images: list[RdImage], count: int | None) -> list[RdImage]:
    if count is None or count >= len(images):
        return images
    if count <= 0:
        return []
    picks = sorted({round(i) for i in np.linspace(0, len(images) - 1, count)})
    return [images[i] for i in picks]


# ------------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class RowSpec:
    """One table row: a method and its parameter."""

    family: str  # plot line: "pca b8", "kmeans", "bounded(pca)", "JPEG 2000", "JPEG-LS near", "lossless"
    method: str
    parameter: str
    kind: str  # "ours", "ours-fit", "j2k", "jls-near"
    config: Mapping[str, Any] | None = None
    target: float | None = None  # j2k target bpp
    bound: int | None = None  # promised max |error| (0 = lossless)
    anchor: bool = False


def row_specs(bounds: Sequence[int], variances: Sequence[float], ks: Sequence[int],
              j2k_rates: Sequence[float]) -> list[RowSpec]:
    """Every row of the grid, ours first, then the anchors."""
    rows: list[RowSpec] = []
    for block in PCA_BLOCKS:
        for v in variances:
            rows.append(RowSpec(f"pca b{block}", f"pca block {block}", f"variance {v:g}", "ours",
                                {"id": "pca", "variance": v, "block": block}))
    for block in PCA_BLOCKS:
        rows.append(RowSpec(f"pca b{block} series", f"pca block {block} series fit", f"variance {FIT_VARIANCE:g}",
                            "ours-fit", {"id": "pca", "variance": FIT_VARIANCE, "block": block}))
    for k in ks:
        rows.append(RowSpec("kmeans", "kmeans", f"k {k}", "ours", {"id": "kmeans", "k": k}))
    for name, inner in BOUNDED_INNERS:
        label = f"bounded({name} {inner.get('variance', inner.get('k'))})"
        for n in bounds:
            rows.append(RowSpec(f"bounded({name})", label, f"N {n}", "ours",
                                {"id": "bounded", "inner": dict(inner), "max_error": n}, bound=n))
    for n in bounds:  # what a lossy policy runs: the pca basis fitted once per series (its bytes shared)
        rows.append(RowSpec("bounded(pca) series", "bounded(pca 0.98) series fit", f"N {n}", "ours-fit",
                            {"id": "bounded", "inner": {"id": "pca", "variance": FIT_VARIANCE}, "max_error": n},
                            bound=n))
    for rate in j2k_rates:
        rows.append(RowSpec("JPEG 2000", "JPEG 2000 9/7", f"{rate:g} bpp", "j2k", target=rate, anchor=True))
    for n in bounds:
        rows.append(RowSpec("JPEG-LS near", "JPEG-LS near-lossless", f"N {n}", "jls-near", bound=n, anchor=True))
    for codec_id in LOSSLESS_IDS:
        rows.append(RowSpec("lossless", f"{codec_id} lossless", "-", "ours", {"id": codec_id}, bound=0,
                            anchor=True))
    return rows


@dataclass
class Encoded:
    """One image's stored form."""

    data: bytes
    decoder: str  # "frame", "j2k", "jpegls"
    encode_ms: float
    offset: int = 0  # decoded = codestream value + offset (anchors)
    context: str | None = None  # file name of the shared context blob
    context_share: float = 0.0  # bytes of that blob charged to this image
    stats: dict[str, Any] = field(default_factory=dict)
    actual: str = ""  # codec that produced the bytes
    crc32: int | None = None  # of the reconstruction, when the encoding side decoded it


class Unavailable(Exception):
    """A row that cannot be measured here (codec not registered, no fit): reported, not fatal."""


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = call()
    return out, (time.perf_counter() - started) * 1000.0


def _codec(config: Mapping[str, Any]) -> Codec:
    wanted = {str(config["id"])}
    inner = config.get("inner")
    if isinstance(inner, Mapping):
        wanted.add(str(inner.get("id")))
    missing = sorted(wanted - set(registered_codecs()))
    if missing:
        raise Unavailable(f"not available: codec {', '.join(missing)} not registered")
    try:
        return get_codec(dict(config))
    except CodecError as exc:
        raise Unavailable(f"not available: {exc}") from exc


def _encode_ours(codec: Codec, pixels: Pixels, context: bytes | None) -> tuple[bytes, dict[str, Any]]:
    data, stats = codec.encode_with_stats(pixels, context)
    return data, dict(stats)


def encode_ours(spec: RowSpec, images: Sequence[RdImage], contexts: dict[str, bytes]) -> list[Encoded]:
    """Our codec on every image (one warm-up encode first); a per-series fit for ``ours-fit`` rows."""
    assert spec.config is not None
    codec = _codec(spec.config)
    fit_share: dict[str, tuple[str, float, float]] = {}  # series -> (context file, bytes share, fit ms share)
    by_series: dict[str, bytes | None] = {}
    if spec.kind == "ours-fit":
        groups: dict[str, list[RdImage]] = {}
        for image in images:
            groups.setdefault(f"{image.series}|{image.pixels.shape}", []).append(image)
        codec.fit([images[0].pixels])  # warm-up
        for key, members in groups.items():
            fit_started = time.perf_counter()
            context = codec.fit([m.pixels for m in members])
            fit_ms = (time.perf_counter() - fit_started) * 1000.0
            if context is None:
                raise Unavailable("not available: fit() returns no context for this codec")
            name = f"ctx-{zlib.crc32(context):08x}-{len(context)}.bin"
            contexts[name] = bytes(context)
            by_series[key] = bytes(context)
            fit_share[key] = (name, len(context) / len(members), fit_ms / len(members))
    _encode_ours(codec, images[0].pixels, by_series.get(f"{images[0].series}|{images[0].pixels.shape}"))
    out: list[Encoded] = []
    for image in images:
        key = f"{image.series}|{image.pixels.shape}"
        started = time.perf_counter()
        data, stats = _encode_ours(codec, image.pixels, by_series.get(key))
        ms = (time.perf_counter() - started) * 1000.0
        context_name: str | None = None
        share = extra_ms = 0.0
        if key in fit_share:
            context_name, share, extra_ms = fit_share[key]
        out.append(Encoded(data, "frame", ms + extra_ms, context=context_name, context_share=share, stats=stats,
                           actual=read_frame_header(data).codec_id))
    return out


#: imagecodecs' stub types ``level`` as int; OpenJPEG takes a fractional PSNR target (dB), which the search needs.
_jpeg2k_encode: Any = imagecodecs.jpeg2k_encode


def _j2k(pixels: Pixels, level: float, bits: int | None = None) -> bytes:
    return bytes(_jpeg2k_encode(pixels, level=level, codecformat="J2K", reversible=False, numthreads=1,
                                bitspersample=bits))


def encode_j2k(target_bpp: float, image: RdImage, guess: float | None = None) -> Encoded:
    """JPEG 2000 9/7 at ``target_bpp``, in the better of two sample representations for this image (the lower
    MSE): the stored type, and -- for non-negative values narrower than the type -- unsigned at the real bit depth.
    At low rates the representation decides the DC level (mid-range of the declared precision): 16-bit precision
    on 12-bit MR costs JPEG 2000 up to 25 dB below 0.3 bpp, while signed types suit zero backgrounds."""
    pixels = image.pixels
    bits = max(1, int(pixels.max()).bit_length())
    candidates = [_encode_j2k_as(target_bpp, image, pixels, None, guess)]
    if int(pixels.min()) >= 0 and bits < 8 * pixels.dtype.itemsize:
        unsigned = pixels.astype(np.uint8 if bits <= 8 else np.uint16)
        candidates.append(_encode_j2k_as(target_bpp, image, unsigned, bits, guess))
    for item in candidates:
        diff = imagecodecs.jpeg2k_decode(item.data).astype(np.int64) - pixels.astype(np.int64)
        item.stats["mse"] = float(np.mean(diff.astype(np.float64) ** 2))
    return min(candidates, key=lambda item: (len(item.data) > target_bpp * image.n_pixels / 8.0, item.stats["mse"]))


def _encode_j2k_as(target_bpp: float, image: RdImage, samples: Pixels, bits: int | None,
                   guess: float | None) -> Encoded:
    """The highest PSNR target (dB) whose codestream of ``samples`` fits ``target_bpp``: OpenJPEG's ``level`` is
    a quality, not a rate. The target is bracketed from ``guess`` (the previous image's level) and found by regula
    falsi on log(size), stopping within ``J2K_TOLERANCE`` under the budget; the lowest level when nothing fits.
    The reported time is one encode at the chosen target."""
    budget = target_bpp * image.n_pixels / 8.0
    sizes: dict[float, int] = {}

    def size(level: float) -> float:  # log(bytes / budget): < 0 fits
        data = _j2k(samples, level, bits)
        sizes[level] = len(data)
        return math.log(len(data) / budget)

    low, high = J2K_LEVELS
    level = min(max(guess if guess is not None else 60.0, low), high)
    f = size(level)
    step = J2K_BRACKET_DB if f < 0 else -J2K_BRACKET_DB
    a, fa = level, f  # grow the bracket until the sign changes
    while True:
        b = min(max(a + step, low), high)
        fb = size(b)
        if (fa < 0) != (fb < 0) or b in (low, high):
            break
        a, fa = b, fb
    if (fa < 0) != (fb < 0):
        side = 0
        for _ in range(J2K_STEPS):
            best = max((lv for lv, n in sizes.items() if n <= budget), default=None)
            if best is not None and sizes[best] >= (1.0 - J2K_TOLERANCE) * budget:
                break
            c = b - fb * (b - a) / (fb - fa)
            if not min(a, b) < c < max(a, b):
                c = (a + b) / 2.0
            fc = size(c)
            if (fc < 0) == (fb < 0):
                b, fb = c, fc
                if side == -1:
                    fa /= 2.0  # Illinois: keep the stale end from stalling the search
                side = -1
            else:
                a, fa = c, fc
                if side == 1:
                    fb /= 2.0
                side = 1
    fitting = [lv for lv, n in sizes.items() if n <= budget]
    chosen = max(fitting) if fitting else low
    data, ms = _timed(lambda: _j2k(samples, chosen, bits))
    return Encoded(data, "j2k", ms, stats={"level_db": chosen, "search_encodes": len(sizes), "bits": bits or 0},
                   actual="jpeg2k")


def encode_jls_near(n: int, image: RdImage) -> Encoded:
    """JPEG-LS NEAR = n: the smaller of CharLS through imagecodecs and pyjpegls at the real bit depth, each
    decoded here and kept only when it holds the bound (pyjpegls can write broken streams)."""
    mapped, offset, bits = offset_to_unsigned(image.pixels)
    rows, cols = mapped.shape
    candidates: list[tuple[bytes, float, str]] = []
    side: dict[str, Any] = {}
    encoders: tuple[tuple[str, Callable[[], bytes]], ...] = (
        ("charls (imagecodecs)", lambda: bytes(imagecodecs.jpegls_encode(mapped, level=n))),
        ("pyjpegls", lambda: bytes(jpeg_ls.encode_buffer(mapped.tobytes(), rows, cols, 1, max(2, bits), n))),
    )
    for name, encoder in encoders:
        try:  # a NEAR out of range for a narrow image, pyjpegls' too-small buffer on tiny frames: the other may do
            data, ms = _timed(encoder)
        except Exception as exc:  # noqa: BLE001 -- recorded with the row's stats
            side[name] = f"{type(exc).__name__}: {exc}"
            continue
        candidates.append((data, ms, name))
        side[f"bpp {name}"] = 8.0 * len(data) / image.n_pixels  # each encoder's own rate, for ANCHORS
    best: Encoded | None = None
    for data, ms, name in candidates:
        decoded = np.add(imagecodecs.jpegls_decode(data), offset, dtype=np.int64)
        if decoded.shape != image.pixels.shape or np.abs(decoded - image.pixels).max() > n:
            continue
        if best is None or len(data) < len(best.data):
            best = Encoded(data, "jpegls", ms, offset=offset, stats={"encoder": name, **side}, actual=name,
                           crc32=pixel_crc32(decoded.astype(image.pixels.dtype)))
    if best is None:
        raise Unavailable(f"JPEG-LS NEAR={n} failed on {image.label}")
    return best


def encode_row(spec: RowSpec, images: Sequence[RdImage], contexts: dict[str, bytes]) -> list[Encoded]:
    """Every image of one row, encoding single-threaded."""
    with threadpool_limits(1):
        if spec.kind in ("ours", "ours-fit"):
            return encode_ours(spec, images, contexts)
        if spec.kind == "j2k":
            assert spec.target is not None
            out: list[Encoded] = []
            guess: float | None = None
            for image in images:
                out.append(encode_j2k(spec.target, image, guess))
                guess = float(out[-1].stats["level_db"])
            return out
        assert spec.bound is not None
        return [encode_jls_near(spec.bound, image) for image in images]


# ------------------------------------------------------------------------------------------------- decoding


def _write_manifest(folder: Path, images: Sequence[RdImage], encoded: Mapping[int, list[Encoded]],
                    contexts: Mapping[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {f"i{i}": image.pixels for i, image in enumerate(images)}
    np.savez(folder / "originals.npz", **arrays)
    for name, context in contexts.items():
        (folder / name).write_bytes(context)
    rows = []
    for index, items in encoded.items():
        start = 0
        listed = []
        for i, item in enumerate(items):
            listed.append({"image": i, "start": start, "length": len(item.data), "decoder": item.decoder,
                           "offset": item.offset, "context": item.context, "actual": item.actual})
            start += len(item.data)
        blob = f"row-{index}.bin"
        (folder / blob).write_bytes(b"".join(item.data for item in items))
        rows.append({"index": index, "blob": blob, "items": listed})
    manifest = {"originals": "originals.npz", "contexts": sorted(contexts),
                "images": [{"label": im.label, "peak": im.peak} for im in images], "rows": rows}
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def _decode_fresh(manifest: Path) -> dict[str, Any]:
    """``decode_manifest`` in a new interpreter, single-threaded libraries."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    root = str(Path(archive.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    result_path = manifest.with_name("decoded.json")
    done = subprocess.run([sys.executable, "-m", "archive.bench_rd_decode", "--decode", str(manifest),
                           "--result", str(result_path)], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise ArchiveError(f"decode process failed ({done.returncode}): {done.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(result_path.read_text())
    return out


# ------------------------------------------------------------------------------------------------- summary


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def _split_bytes(stats: Mapping[str, Any]) -> tuple[int, int] | None:
    """(inner bytes, residual bytes) from a bounded codec's stats, whatever the exact key names."""
    inner = residual = None
    for key, value in stats.items():
        low = key.lower()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "byte" in low:
            if "inner" in low and inner is None:
                inner = int(value)
            elif "resid" in low and residual is None:
                residual = int(value)
    return (inner, residual) if inner is not None and residual is not None else None


def summarise(spec: RowSpec, images: Sequence[RdImage], encoded: Sequence[Encoded],
              decoded: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row of the result: means over images, pooled ms per 512^2 slice."""
    pixels = sum(im.n_pixels for im in images)
    bpp = [8.0 * (len(e.data) + e.context_share) / im.n_pixels for e, im in zip(encoded, images, strict=True)]
    errors = [d["error"] for d in decoded if "error" in d]
    good = [d for d in decoded if "error" not in d]
    row: dict[str, Any] = {
        "family": spec.family, "method": spec.method, "parameter": spec.parameter, "anchor": spec.anchor,
        "config": dict(spec.config) if spec.config else None, "bound": spec.bound, "status": "ok",
        "images": len(images),
        "bpp": _mean(bpp),
        "container_bpp": _mean(8.0 * len(e.data) / im.n_pixels for e, im in zip(encoded, images, strict=True)),
        "context_bpp": _mean(8.0 * e.context_share / im.n_pixels for e, im in zip(encoded, images, strict=True)),
        "psnr": _mean(d["psnr"] for d in good),
        "range_psnr": _mean(d["range_psnr"] for d in good),
        "exact_images": sum(1 for d in good if d["max_error"] == 0),
        "max_error": max((d["max_error"] for d in good), default=None),
        "mean_max_error": _mean(float(d["max_error"]) for d in good),
        "ssim": _mean(d["ssim"] for d in good),
        "encode_ms_per_slice": sum(e.encode_ms for e in encoded) * SLICE_PIXELS / pixels,
        "decode_ms_per_slice": (sum(d["decode_ms"] for d in good) * SLICE_PIXELS / pixels) if good else None,
        "decode_errors": errors[:5], "decode_error_count": len(errors),
        "crc_mismatches": sum(1 for e, d in zip(encoded, decoded, strict=True)
                              if e.crc32 is not None and "crc32" in d and d["crc32"] != e.crc32),
        "actual_codecs": sorted({e.actual for e in encoded}),
    }
    if errors and not good:
        row["status"] = f"decode failed: {errors[0]}"
    if spec.bound is not None:
        row["bound_held"] = not errors and all(d["max_error"] <= spec.bound for d in good)
    if spec.kind == "j2k":
        row["target_bpp"] = spec.target
    splits = [_split_bytes(e.stats) for e in encoded]
    if spec.config and spec.config.get("id") == "bounded" and all(s is not None for s in splits):
        row["inner_bpp"] = _mean(8.0 * s[0] / im.n_pixels for s, im in zip(splits, images, strict=True) if s)
        row["residual_bpp"] = _mean(8.0 * s[1] / im.n_pixels for s, im in zip(splits, images, strict=True) if s)
    numeric = _numeric_stats([e.stats for e in encoded])
    if numeric:
        row["stats_mean"] = numeric
    return row


def _numeric_stats(stats: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means of the numeric stats the codec reported (components kept, variance explained, k, wcss ...)."""
    keys = {k for s in stats for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: float(np.mean([float(s[k]) for s in stats if k in s])) for k in sorted(keys)}


def evaluate_goals(rows: Sequence[Mapping[str, Any]], bounds: Sequence[int]) -> list[dict[str, Any]]:
    """The issue's goals per modality: bounded within 10 % of JPEG-LS near-lossless, encode < 50 ms, bound held."""
    goals: list[dict[str, Any]] = []
    by_key = {(r["modality"], r["method"], r["parameter"]): r for r in rows}
    for modality in sorted({r["modality"] for r in rows}):
        for n in bounds:
            anchor = by_key.get((modality, "JPEG-LS near-lossless", f"N {n}"))
            methods = [f"bounded({name} {inner.get('variance', inner.get('k'))})" for name, inner in BOUNDED_INNERS]
            methods.append("bounded(pca 0.98) series fit")
            ours = [r for r in (by_key.get((modality, method, f"N {n}")) for method in methods)
                    if r is not None and r["status"] == "ok" and r["bpp"] is not None]
            best = min(ours, key=lambda r: r["bpp"]) if ours else None
            ratio = best["bpp"] / anchor["bpp"] if best and anchor and anchor.get("bpp") else None
            goals.append({"modality": modality, "goal": f"bounded N={n} bpp <= {GOAL_RATIO:.2f} x JPEG-LS near",
                          "value": ratio, "by": best["method"] if best else None,
                          "passed": None if ratio is None else ratio <= GOAL_RATIO})
        for method, parameter in (("pca block 8", "variance 0.98"), ("pca block 0", "variance 0.98"),
                                  ("kmeans", "k 64")):
            row = by_key.get((modality, method, parameter))
            ms = row.get("encode_ms_per_slice") if row and row["status"] == "ok" else None
            goals.append({"modality": modality, "goal": f"{method} {parameter} encode < {GOAL_ENCODE_MS:g} ms/512²",
                          "value": ms, "by": method, "passed": None if ms is None else ms < GOAL_ENCODE_MS})
        bounded = [r for r in rows if r["modality"] == modality and r.get("bound") and r["status"] == "ok"]
        goals.append({"modality": modality, "goal": "max error <= N on every image (bounded, JPEG-LS near)",
                      "value": sum(1 for r in bounded if not r.get("bound_held")), "by": "rows failing",
                      "passed": all(r.get("bound_held") for r in bounded) if bounded else None})
    return goals


# ------------------------------------------------------------------------------------------------- the run


def codec_sources_digest() -> str:
    """sha256 over the codec modules' sources: a change between encoding and the decoding process (codecs being
    edited during a run) would show as decode failures, and is flagged instead of misread."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((Path(archive.__file__).parent / "codecs").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def machine_info() -> dict[str, Any]:
    """Where the figures come from."""
    from archive.bench import cpu_model

    libraries = {"imagecodecs": str(imagecodecs.__version__), "charls": str(imagecodecs.jpegls_version()),
                 "openjpeg": str(imagecodecs.jpeg2k_version()), "openjph": str(imagecodecs.htj2k_version()),
                 "libjxl": str(imagecodecs.jpegxl_version()), "zstd": str(imagecodecs.zstd_version()),
                 "numpy": np.__version__}
    for dist in ("pyjpegls", "scikit-image", "scikit-learn", "matplotlib", "constriction", "ckwrap", "pydicom",
                 "threadpoolctl"):
        libraries[dist] = dist_version(dist)
    return {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "libraries": libraries}


def run_rd_benchmark(
    folder: Path,
    *,
    out_dir: Path,
    slices: int | None = None,
    bounds: Sequence[int] = (1, 2, 4, 8),
    variances: Sequence[float] = (0.95, 0.98, 0.999),
    ks: Sequence[int] = (16, 64, 256),
    j2k_rates: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
    learned: LearnedGrid | None = None,
    lossy: bool = True,
    fresh_process_decode: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure every row on the CT and MR of ``folder``; write rd.json and the plots to ``out_dir``; a JSON-able
    dict. ``learned``: also the learned codecs on the validation split (:mod:`archive.bench_learned`);
    ``lossy=False`` leaves out the grid above (only the learned part runs)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArchiveError(f"not a folder: {folder}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    sources = codec_sources_digest()
    say(f"reading {folder}")
    everything, left_out = load_images(folder, None)
    groups = {m: _spread(ims, slices) for m, ims in everything.items()} if lossy else {}
    specs = row_specs(bounds, variances, ks, j2k_rates)
    rows: list[dict[str, Any]] = []
    decode_pids: list[int] = []
    tmp = out_dir / "tmp"
    for modality, images in groups.items():
        encoded: dict[int, list[Encoded]] = {}
        contexts: dict[str, bytes] = {}
        status: dict[int, str] = {}
        for index, spec in enumerate(specs):
            say(f"{modality}: encoding {spec.method} {spec.parameter} ({len(images)} images)")
            try:
                encoded[index] = encode_row(spec, images, contexts)
            except Unavailable as exc:
                status[index] = str(exc)
            except (ArchiveError, ValueError, RuntimeError) as exc:
                status[index] = f"failed: {type(exc).__name__}: {exc}"
        say(f"{modality}: decoding {len(encoded)} rows in a fresh process")
        manifest = _write_manifest(tmp / modality, images, encoded, contexts)
        decoded = _decode_fresh(manifest) if fresh_process_decode else decode_manifest(manifest)
        decode_pids.append(int(decoded["pid"]))
        by_index = {r["index"]: r["items"] for r in decoded["rows"]}
        for index, spec in enumerate(specs):
            if index in encoded:
                row = summarise(spec, images, encoded[index], by_index[index])
            else:
                row = {"family": spec.family, "method": spec.method, "parameter": spec.parameter,
                       "anchor": spec.anchor, "config": dict(spec.config) if spec.config else None,
                       "bound": spec.bound, "status": status[index]}
            row["modality"] = modality
            rows.append(row)
    learned_part: dict[str, Any] | None = None
    if learned is not None:
        from archive.bench_learned import run_learned

        learned_part = run_learned(folder, out_dir, learned, fresh_process_decode=fresh_process_decode,
                                   loaded=everything, progress=say)
    shutil.rmtree(tmp, ignore_errors=True)
    elbow = wcss_elbow(groups)
    result: dict[str, Any] = {
        "benchmark": "rd",
        "folder": str(folder.resolve()),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "images": {m: {"count": len(ims), "pixels": sum(im.n_pixels for im in ims),
                       "shapes": sorted({f"{im.pixels.shape[0]}x{im.pixels.shape[1]}" for im in ims}),
                       "bits_stored": sorted({im.bits_stored for im in ims})} for m, ims in groups.items()},
        "left_out": left_out,
        "grid": {"bounds": list(bounds), "variances": list(variances), "ks": list(ks), "j2k_rates": list(j2k_rates),
                 "slices": slices, "lossy": lossy},
        "decode": {"fresh_process": fresh_process_decode, "pids": decode_pids, "parent_pid": os.getpid()},
        "codec_sources_changed_during_run": codec_sources_digest() != sources,
        "rows": rows,
        "goals": evaluate_goals(rows, bounds),
        "wcss_elbow": elbow,
        "notes": list(NOTES),
        "learned": learned_part,
    }
    result["plots"] = [str(p.name) for p in write_plots(result, out_dir)] if lossy else []
    if learned_part is not None:
        result["plots"] += [p.name for p in write_learned_plots(learned_part, out_dir)]
    result["seconds"] = time.perf_counter() - started
    clean = _json_safe(result)
    (out_dir / "rd.json").write_text(json.dumps(clean, indent=1))
    out: dict[str, Any] = clean
    return out


def wcss_elbow(groups: Mapping[str, Sequence[RdImage]]) -> list[dict[str, Any]]:
    """WCSS against k for a few images per modality: exact 1-D k-means on the histogram (Ckmeans.1d.dp)."""
    import ckwrap

    curves: list[dict[str, Any]] = []
    for modality, images in groups.items():
        for image in _spread(list(images), ELBOW_IMAGES):
            values, counts = np.unique(image.pixels, return_counts=True)
            ks = [k for k in ELBOW_KS if k <= len(values)]
            wcss = [float(np.sum(ckwrap.ckmeans(values.astype(np.float64), k, weights=counts.astype(np.float64))
                                 .withinss)) for k in ks]
            curves.append({"modality": modality, "image": image.label, "k": ks, "wcss": wcss,
                           "pixels": image.n_pixels})
    return curves


# ------------------------------------------------------------------------------------------------- plots


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def print_rd_benchmark(result: Mapping[str, Any], console: Console) -> None:
    """One table per modality, then the goals, the plots and what the figures mean."""
    machine = result["machine"]
    console.print(f"[bold]Rate-distortion benchmark[/bold] of {result['folder']}  {result['when']}")
    console.print(f"{machine['cpus_usable']} core(s), {machine['cpu_model']}; Python {machine['python']}; "
                  f"decoded in a fresh process: {result['decode']['fresh_process']} "
                  f"(pids {result['decode']['pids']}, parent {result['decode']['parent_pid']}); "
                  f"{result['seconds']:.0f} s", markup=False)
    for modality, facts in result["images"].items():
        console.print(f"{modality}: {facts['count']} images, {', '.join(facts['shapes'])}, "
                      f"BitsStored {facts['bits_stored']}", markup=False)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title=modality)
        table.add_column("method", no_wrap=True)
        table.add_column("param", no_wrap=True)
        for column in ("bpp", "inner\nbpp", "resid\nbpp", "PSNR", "range\nPSNR", "max\nerr", "mean\nmax err",
                       "SSIM", "enc ms\n/512²", "dec ms\n/512²", "bound"):
            table.add_column(column, justify="right", no_wrap=True)
        for row in result["rows"]:
            if row["modality"] != modality:
                continue
            method = row["method"] + (" *" if row["anchor"] else "")
            if row["status"] != "ok":
                table.add_row(method, row["parameter"], row["status"][:70])
                continue
            psnr = _f(row["psnr"], 1) if row["exact_images"] < row["images"] else "exact"
            table.add_row(method, row["parameter"], _f(row["bpp"], 3), _f(row.get("inner_bpp"), 3),
                          _f(row.get("residual_bpp"), 3), psnr, _f(row["range_psnr"], 1), _f(row["max_error"]),
                          _f(row["mean_max_error"], 1), _f(row["ssim"], 4), _f(row["encode_ms_per_slice"], 1),
                          _f(row["decode_ms_per_slice"], 1), _f(row.get("bound_held")))
        console.print(table)
        odd = [r for r in result["rows"] if r["modality"] == modality and r["status"] == "ok"
               and (r["decode_error_count"] or r["crc_mismatches"])]
        for row in odd:
            console.print(f"  {row['method']} {row['parameter']}: {row['decode_error_count']} decode errors "
                          f"{row['decode_errors']}, {row['crc_mismatches']} CRC mismatches", markup=False)
    if result.get("codec_sources_changed_during_run"):
        console.print("[bold red]The codec sources changed during this run: figures of our codecs are not "
                      "trustworthy, run again.[/bold red]")
    if result["rows"]:
        console.print("[bold]Goals[/bold]")
    for goal in result["goals"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[goal["passed"]]
        console.print(f"  {goal['modality']}: {goal['goal']}: {_f(goal['value'], 3)} ({goal['by']}) -> {verdict}",
                      markup=False)
    if result["rows"]:
        for note in result["notes"]:
            console.print(f"• {note}", markup=False)
    if result.get("learned") is not None:
        from archive.bench_learned import print_learned

        print_learned(result["learned"], console)
    console.print(f"plots: {', '.join(result['plots'])}; JSON: rd.json", markup=False)
    console.print("• * = anchor, measured in the same run on the same images", markup=False)
