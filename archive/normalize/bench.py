"""``medarchive bench normalize``: the cost of normalizing a slice, next to what it competes with, in one run.

For the CT and MR slices of a folder (every file read with pydicom, up to
``slices`` per modality, spread over the source matrices and series), one run
measures, single-threaded (OpenCV and SimpleITK set to one thread), each
figure the median of ``repeat`` interleaved runs after one warm-up call:

* ours: :func:`resample_plane` with every :class:`Interpolation`, onto the
  grid :func:`plan_plane` gives for the modality's shipped profile (CT 512 x
  512 at 500/512 mm, MR 256 x 256 at 1 mm, both pad-crop around the centre);
* the references on the same slice: JPEG-LS encoding with the archive's codec
  (what ingest spends per slice anyway), OpenCV ``resize`` (area, cubic,
  Lanczos-4) and ``warpAffine`` (cubic), SimpleITK ``ResampleImageFilter``
  (linear, B-spline) onto the same output grid;
* the whole normalization of the slice as a worker does it, catalog aside:
  :func:`normalize_series_images` (geometry, plan, resampling, derived header,
  round-trip error) and the encoding of the normalized copy with the profile's
  codec.

The shared CT is all 512 x 512, so every 512 x 512 CT slice is also measured
as a 616 x 616 slice at 0.87 mm made from it in memory (cubic spline, same
field centre): the "616² to 512² at 500 mm" case of issue 15. The ratios the
issue sets as goals (on CT, default interpolation): resampling / JPEG-LS encode
<= 0.5, whole normalization / JPEG-LS encode <= 2.5; with ``ingest``, the ingest
rate of the folder's CT with normalization on >= 0.5 x the rate without it.
"""

from __future__ import annotations

import copy
import enum
import functools
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
import SimpleITK as _sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from rich import box
from rich.console import Console
from rich.table import Table
from scipy import ndimage  # type: ignore[import-untyped]

from archive.bench import CODEC_CONFIG, cpu_model
from archive.codecs import get_codec
from archive.config import Settings
from archive.dicom.geometry import PlaneGeometry, plane_geometries
from archive.errors import ArchiveError
from archive.normalize.grid import Interpolation
from archive.normalize.pipeline import SourceImage, normalize_series_images
from archive.normalize.plan import PlanePlan, PlaneTarget, plan_plane
from archive.normalize.profiles import DEFAULT_PROFILES, NormalizeProfile
from archive.normalize.resample import resample_plane

sitk: Any = _sitk  # SWIG bindings without annotations: used untyped here

MODALITIES: Final[tuple[str, ...]] = ("CT", "MR")
SYNTHETIC_MATRIX: Final[int] = 616  # the issue's holdout-like CT: 616 x 616 at 0.87 mm
SYNTHETIC_SPACING_MM: Final[float] = 0.87
MAX_PIXELS: Final[int] = 4096 * 4096  # larger headers are broken or not what this measures: never decoded
RESAMPLE_GOAL: Final[float] = 0.5  # resampling (default interpolation) / JPEG-LS encode, at most
NORMALIZE_GOAL: Final[float] = 2.5  # whole normalization + encoding of the copy / JPEG-LS encode, at most
INGEST_GOAL: Final[float] = 0.5  # ingest rate with normalization / without, at least


class Method(str, enum.Enum):
    """One timed way of treating a slice (the JSON keys of ``ms_per_slice``)."""

    AREA = "area"
    LINEAR = "linear"
    CUBIC = "cubic"
    LANCZOS = "lanczos"
    NEAREST = "nearest"
    JPEGLS = "jpegls-encode"
    CV_AREA = "opencv-resize-area"
    CV_CUBIC = "opencv-resize-cubic"
    CV_LANCZOS = "opencv-resize-lanczos4"
    CV_WARP_CUBIC = "opencv-warpaffine-cubic"
    SITK_LINEAR = "simpleitk-linear"
    SITK_BSPLINE = "simpleitk-bspline"
    NORMALIZE = "normalize+encode"


OURS: Final[dict[Method, Interpolation]] = {m: Interpolation(m.value) for m in (
    Method.AREA, Method.LINEAR, Method.CUBIC, Method.LANCZOS, Method.NEAREST)}
LABELS: Final[dict[Method, str]] = {
    **{m: f"ours {m.value}" for m in OURS},
    Method.JPEGLS: "JPEG-LS encode (source)",
    Method.CV_AREA: "OpenCV resize area",
    Method.CV_CUBIC: "OpenCV resize cubic",
    Method.CV_LANCZOS: "OpenCV resize Lanczos-4",
    Method.CV_WARP_CUBIC: "OpenCV warpAffine cubic",
    Method.SITK_LINEAR: "SimpleITK linear",
    Method.SITK_BSPLINE: "SimpleITK B-spline",
    Method.NORMALIZE: "whole normalization + encode",
}
#: Each reference resampler next to our kernel of the same family: their mean |difference| is recorded.
COUNTERPART: Final[dict[Method, Method]] = {
    Method.CV_AREA: Method.AREA, Method.CV_CUBIC: Method.CUBIC, Method.CV_LANCZOS: Method.LANCZOS,
    Method.CV_WARP_CUBIC: Method.CUBIC, Method.SITK_LINEAR: Method.LINEAR, Method.SITK_BSPLINE: Method.CUBIC,
}
_CV_RESIZE: Final[dict[Method, int]] = {Method.CV_AREA: cv2.INTER_AREA, Method.CV_CUBIC: cv2.INTER_CUBIC,
                                        Method.CV_LANCZOS: cv2.INTER_LANCZOS4}
_SITK: Final[dict[Method, int]] = {Method.SITK_LINEAR: sitk.sitkLinear, Method.SITK_BSPLINE: sitk.sitkBSpline}

Pixels = npt.NDArray[Any]
Output = Pixels | bytes | int | Any  # Any: a SimpleITK image


@dataclass(frozen=True)
class BenchSlice:
    """One single-frame greyscale slice with usable geometry, decoded."""

    label: str  # path under the folder; "(616² made from it)" for the synthetic copies
    dataset: Dataset
    pixels: Pixels  # (rows, columns) as stored
    plane: PlaneGeometry
    synthetic: bool = False

    @property
    def modality(self) -> str:
        return str(self.dataset.get("Modality", ""))


# ------------------------------------------------------------------------------------------------- the slices


def collect_slices(folder: Path, per_modality: int) -> tuple[dict[str, list[BenchSlice]], int, Counter[str]]:
    """Up to ``per_modality`` CT and MR slices of ``folder``, round-robin over matrices, then series, then files.

    Returns (slices per modality, files read, why the others were left out).
    """
    candidates: dict[str, dict[tuple[int, int], dict[str, list[BenchSlice]]]] = {m: {} for m in MODALITIES}
    left_out: Counter[str] = Counter()
    files = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        files += 1
        found = _read_slice(path, folder, left_out)
        if found is not None:
            by_size = candidates[found.modality].setdefault(found.pixels.shape[:2], {})
            by_size.setdefault(str(found.dataset.get("SeriesInstanceUID", "")), []).append(found)
    chosen = {m: _round_robin([_round_robin(list(series.values()), per_modality) for series in sizes.values()],
                              per_modality) for m, sizes in candidates.items()}
    return chosen, files, left_out


def _round_robin(groups: Sequence[Sequence[BenchSlice]], limit: int) -> list[BenchSlice]:
    out: list[BenchSlice] = []
    depth = 0
    while len(out) < limit and any(depth < len(g) for g in groups):
        out.extend(g[depth] for g in groups if depth < len(g))
        depth += 1
    return out[:limit]


def _read_slice(path: Path, folder: Path, left_out: Counter[str]) -> BenchSlice | None:
    try:
        ds = pydicom.dcmread(path)
    except Exception:  # noqa: BLE001 -- not DICOM, or broken past reading: left out, counted
        left_out["not readable as DICOM"] += 1
        return None
    modality = str(ds.get("Modality", ""))
    if modality not in MODALITIES or "PixelData" not in ds:
        left_out["not a CT or MR image"] += 1
        return None
    if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        left_out["multi-frame or colour"] += 1
        return None
    if int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) > MAX_PIXELS:
        left_out["matrix too large"] += 1
        return None
    planes = plane_geometries(ds)
    plane = planes[0] if planes else None
    if plane is None or plane.spacing is None or plane.orientation is None or plane.position is None:
        left_out["no pixel spacing, orientation or position"] += 1
        return None
    try:
        pixels = np.ascontiguousarray(ds.pixel_array)
    except Exception:  # noqa: BLE001 -- any decoding failure (codec missing, truncated data) leaves the file out, never the run
        left_out["pixels not decodable"] += 1
        return None
    if pixels.shape != (plane.rows, plane.columns) or pixels.dtype.kind not in "iu":
        left_out["pixels not integer (rows, columns)"] += 1
        return None
    return BenchSlice(str(path.relative_to(folder)), ds, pixels, plane)


def synthetic_616(source: BenchSlice) -> BenchSlice:
    """``source`` as a 616 x 616 slice at 0.87 mm around the same field centre (cubic spline, made in memory).

    Outside the source field: the source's minimum (its padding). The header
    gets the new matrix, spacing and Image Position and new UIDs, so the
    geometry is read back from DICOM like any other slice's.
    """
    ds = copy.deepcopy(source.dataset)
    plane = source.plane
    assert plane.spacing is not None
    size, mm = SYNTHETIC_MATRIX, SYNTHETIC_SPACING_MM
    steps = (mm / plane.spacing[0], mm / plane.spacing[1])
    starts = ((plane.rows - 1) / 2 - (size - 1) / 2 * steps[0], (plane.columns - 1) / 2 - (size - 1) / 2 * steps[1])
    low, high = int(source.pixels.min()), int(source.pixels.max())
    made = ndimage.affine_transform(source.pixels.astype(np.float32), np.array(steps), offset=np.array(starts),
                                    output_shape=(size, size), order=3, mode="constant", cval=float(low))
    pixels = np.clip(np.rint(made), low, high).astype(source.pixels.dtype)
    corner = plane.pixel_to_patient(starts[0], starts[1])
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [mm, mm]
    ds.ImagePositionPatient = [round(float(v), 6) for v in corner]
    entropy = [str(source.dataset.get("SOPInstanceUID", source.label)), "bench-616"]
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*entropy, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[*entropy, "instance"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    return BenchSlice(f"{source.label} ({size}² at {mm} mm made from it)", ds, pixels, plane_geometries(ds)[0],
                      synthetic=True)


# ------------------------------------------------------------------------------------------------- per slice


def shipped_profile(modality: str) -> NormalizeProfile:
    for profile in DEFAULT_PROFILES:
        if modality in profile.modalities and not profile.keep:
            return profile
    raise ArchiveError(f"no shipped normalization profile for {modality}")


@dataclass
class SliceRun:
    """What one slice measured."""

    slice: BenchSlice
    plan: PlanePlan
    default: Interpolation
    ms: dict[Method, float]
    agreement: dict[Method, float]  # mean |reference - ours of the same family|, modality units, over the field


def _shrinking(plan: PlanePlan) -> bool:
    return min(plan.scale) >= 1.0 - 1e-9


def _methods(item: BenchSlice, plan: PlanePlan, profile: NormalizeProfile, version: str
             ) -> dict[Method, Callable[[], Output]]:
    """The timed calls for one slice, everything they need prepared beforehand."""
    pixels = item.pixels
    pad = int(pixels.min())
    codec = get_codec(dict(CODEC_CONFIG))
    calls: dict[Method, Callable[[], Output]] = {}
    for method, kernel in OURS.items():
        calls[method] = functools.partial(resample_plane, pixels, plan.rows, plan.columns, kernel, pad_value=pad)
    calls[Method.JPEGLS] = lambda: codec.encode(pixels)
    for method, flag in _CV_RESIZE.items():
        calls[method] = functools.partial(_cv_resize, pixels, plan, flag, pad)
    warp = np.array([[plan.columns.step, 0.0, plan.columns.start], [0.0, plan.rows.step, plan.rows.start]])
    size = (plan.columns.size, plan.rows.size)
    calls[Method.CV_WARP_CUBIC] = lambda: cv2.warpAffine(
        pixels, warp, size, flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
        borderValue=float(pad))
    image, reference = _sitk_grid(item, plan)
    for method, interpolator in _SITK.items():
        calls[method] = _sitk_call(image, reference, interpolator, pad)
    calls[Method.NORMALIZE] = _normalize_call(item, profile, version)
    return calls


def _cv_resize(pixels: Pixels, plan: PlanePlan, flag: int, pad: int) -> Pixels:
    """``cv2.resize`` to the plan's scale (whole pixels), then padded or cropped around the centre to the matrix."""
    height = max(1, round(pixels.shape[0] / plan.rows.step))
    width = max(1, round(pixels.shape[1] / plan.columns.step))
    resized = cv2.resize(pixels, (width, height), interpolation=flag)
    out = np.full((plan.rows.size, plan.columns.size), pad, dtype=pixels.dtype)
    rows_to, rows_from = _centre_slices(height, plan.rows.size)
    cols_to, cols_from = _centre_slices(width, plan.columns.size)
    out[rows_to, cols_to] = resized[rows_from, cols_from]
    return out


def _centre_slices(have: int, want: int) -> tuple[slice, slice]:
    """(into the output, from the input) so that both centres meet, to the nearest pixel."""
    shift = math.floor((want - have) / 2 + 0.5)  # output index of input index 0
    start = max(0, shift)
    stop = min(want, shift + have)
    return slice(start, stop), slice(start - shift, stop - shift)


def _sitk_grid(item: BenchSlice, plan: PlanePlan) -> tuple[Any, Any]:
    """The slice and the plan's output grid as 2-D SimpleITK images in the plane's own frame.

    Axes: the row direction and the column direction (identity direction);
    origins: each Image Position projected on them; spacings from DICOM. A
    3-D one-slice image would be the same geometry at twice the B-spline cost.
    """
    plane, out = item.plane, plan.output
    assert plane.spacing is not None and plane.position is not None
    assert out.spacing is not None and out.position is not None
    axes = np.stack([plane.row_direction(), plane.column_direction()])
    image = sitk.GetImageFromArray(item.pixels)
    image.SetSpacing((plane.spacing[1], plane.spacing[0]))
    image.SetOrigin(tuple(float(v) for v in axes @ np.asarray(plane.position)))
    reference = sitk.Image(out.columns, out.rows, image.GetPixelID())
    reference.SetSpacing((out.spacing[1], out.spacing[0]))
    reference.SetOrigin(tuple(float(v) for v in axes @ np.asarray(out.position)))
    return image, reference


def _sitk_call(image: Any, reference: Any, interpolator: int, pad: int) -> Callable[[], Any]:
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(reference)
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(float(pad))
    resampler.SetNumberOfThreads(1)
    return lambda: resampler.Execute(image)  # an Image: the copy into NumPy is not timed


def _normalize_call(item: BenchSlice, profile: NormalizeProfile, version: str) -> Callable[[], int]:
    """Normalize the slice as a one-instance series and encode the copy with the profile's codec."""
    source = SourceImage(item.dataset, item.pixels[np.newaxis], str(item.dataset.SOPInstanceUID))
    codec = get_codec(dict(profile.codec or CODEC_CONFIG))
    dtype = item.pixels.dtype.newbyteorder("<")

    def run() -> int:
        made = normalize_series_images([source], profile, version=version)
        if made.skipped or not made.images:
            raise ArchiveError(f"{item.label}: not normalized: {made.skipped or 'no image made'}")
        encoded = 0
        for image in made.images:
            ds = image.dataset
            frame = np.frombuffer(ds.PixelData, dtype=dtype).reshape(int(ds.Rows), int(ds.Columns))
            encoded += len(codec.encode(frame))
        return encoded

    return run


def _agreement(item: BenchSlice, plan: PlanePlan, outputs: dict[Method, Pixels]) -> dict[Method, float]:
    """Mean |reference - ours| over the output pixels whose centre lies inside the source, in modality units."""
    inside_rows = _inside(plan.rows.start + np.arange(plan.rows.size) * plan.rows.step, item.plane.rows)
    inside_cols = _inside(plan.columns.start + np.arange(plan.columns.size) * plan.columns.step, item.plane.columns)
    mask = np.outer(inside_rows, inside_cols)
    slope = abs(float(item.dataset.get("RescaleSlope", 1) or 1))
    if not mask.any():
        return {}
    return {method: slope * float(np.mean(np.abs(np.asarray(outputs[method], dtype=np.float64)[mask]
                                                  - np.asarray(outputs[ours], dtype=np.float64)[mask])))
            for method, ours in COUNTERPART.items()}


def _inside(index: npt.NDArray[Any], size: int) -> npt.NDArray[np.bool_]:
    return (index >= 0) & (index <= size - 1)


def measure_slice(item: BenchSlice, repeat: int, version: str) -> SliceRun:
    """Every method on one slice: one warm-up call each, then ``repeat`` interleaved rounds; medians in ms."""
    profile = shipped_profile(item.modality)
    target = PlaneTarget(rows=profile.rows, columns=profile.columns, spacing_mm=profile.spacing_mm, fit=profile.fit,
                         allow_upsample=True)
    plan = plan_plane(item.plane, target)
    if plan.upsamples and not profile.allow_upsample:  # measured anyway: the shipped profile would leave it alone
        profile = replace(profile, allow_upsample=True)
    calls = _methods(item, plan, profile, version)
    outputs = {method: call() for method, call in calls.items()}  # warm-up: weight caches, lazy imports
    runs: dict[Method, list[float]] = {method: [] for method in calls}
    for _ in range(repeat):
        for method, call in calls.items():
            started = time.perf_counter()
            call()
            runs[method].append((time.perf_counter() - started) * 1000.0)
    arrays = {m: sitk.GetArrayFromImage(v) if isinstance(v, _sitk.Image) else v for m, v in outputs.items()
              if isinstance(v, (np.ndarray, _sitk.Image))}
    return SliceRun(item, plan, profile.interpolation_for(_shrinking(plan), False),
                    {m: statistics.median(v) for m, v in runs.items()}, _agreement(item, plan, arrays))


@contextmanager
def single_threaded() -> Iterator[None]:
    """OpenCV and SimpleITK on one thread for the run (ours and JPEG-LS are single-threaded anyway)."""
    cv_threads = cv2.getNumThreads()
    itk_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    cv2.setNumThreads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(cv_threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)


# ------------------------------------------------------------------------------------------------- per case


def _case_key(run: SliceRun) -> tuple[str, int, int, bool, bool]:
    return (run.slice.modality, run.slice.plane.rows, run.slice.plane.columns, run.slice.synthetic,
            _shrinking(run.plan))


def summarize_case(runs: Sequence[SliceRun]) -> dict[str, Any]:
    """One modality x source matrix x (shrink or enlarge): medians over its slices, ratios from those medians."""
    first = runs[0]
    modality, rows, columns, synthetic, shrinking = _case_key(first)
    ms = {m.value: statistics.median(r.ms[m] for r in runs) for m in Method}
    default = first.default
    resample_ratio = ms[default.value] / ms[Method.JPEGLS.value]
    normalize_ratio = ms[Method.NORMALIZE.value] / ms[Method.JPEGLS.value]
    spacings = [s for r in runs if r.slice.plane.spacing for s in r.slice.plane.spacing]
    steps = [s for r in runs for s in r.plan.scale]
    out = first.plan.output
    name = f"{modality} {rows}×{columns}" + (" (made)" if synthetic else "") + (" shrink" if shrinking else " enlarge")
    return {
        "name": name,
        "modality": modality,
        "source": {"rows": rows, "columns": columns, "spacing_mm": [min(spacings), max(spacings)],
                   "synthetic": synthetic},
        "target": {"rows": out.rows, "columns": out.columns, "spacing_mm": out.spacing[0] if out.spacing else None},
        "scale": [min(steps), max(steps)],
        "shrinking": shrinking,
        "slices": len(runs),
        "files": [r.slice.label for r in runs],
        "default_interpolation": default.value,
        "ms_per_slice": ms,
        "agreement": {m.value: statistics.median(r.agreement[m] for r in runs if m in r.agreement)
                      for m in COUNTERPART if any(m in r.agreement for r in runs)},
        "agreement_units": "HU" if modality == "CT" else "stored values x Rescale Slope",
        "ratios": {"resample_over_jpegls": resample_ratio, "normalize_over_jpegls": normalize_ratio},
        "goals": {
            "resample_over_jpegls": {"at_most": RESAMPLE_GOAL, "met": resample_ratio <= RESAMPLE_GOAL},
            "normalize_over_jpegls": {"at_most": NORMALIZE_GOAL, "met": normalize_ratio <= NORMALIZE_GOAL},
        },
        "goal_applies": modality == "CT" and rows >= 512 and columns >= 512,
    }


# ------------------------------------------------------------------------------------------------- ingest on / off


def ingest_comparison(files: Sequence[Path], folder: Path, *, repeat: int, jobs: int, workdir: Path | None,
                      say: Callable[[str], None]) -> dict[str, Any]:
    """``ingest_paths`` on a copy of ``files`` into fresh homes, normalization off then on, interleaved, best of."""
    from archive.services.ingest import ingest_paths
    from archive.services.runtime import Archive

    best: dict[bool, dict[str, Any]] = {}
    runs: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="medarchive-bench-normalize-", dir=workdir) as tmp:
        inbox = Path(tmp) / "ct"
        inbox.mkdir()
        for index, path in enumerate(files):
            shutil.copyfile(path, inbox / f"{index:04d}-{path.name}")
        for attempt in range(repeat):
            for normalize in (False, True):
                say(f"ingest {attempt + 1}/{repeat}: {len(files)} CT files, normalization {'on' if normalize else 'off'}")
                home = Path(tmp) / f"home-{int(normalize)}-{attempt}"
                settings = Settings.load(environ={}, home=home, normalize=normalize)
                archive = Archive.open(settings)
                try:
                    started = time.perf_counter()
                    report = ingest_paths(archive, [inbox], codec_config=dict(CODEC_CONFIG), jobs=jobs)
                    seconds = time.perf_counter() - started
                finally:
                    archive.close()
                shutil.rmtree(home, ignore_errors=True)
                runs[normalize].append(seconds)
                if normalize not in best or seconds < best[normalize]["seconds"]:
                    outcomes = Counter(n.outcome.value for n in report.normalized)
                    best[normalize] = {"seconds": seconds, "instances": report.instances,
                                       "instances_per_s": report.instances / seconds if seconds > 0 else None,
                                       "normalized_series": dict(outcomes),
                                       "normalized_instances": sum(n.instances for n in report.normalized)}
    off, on = best[False], best[True]
    ratio = on["instances_per_s"] / off["instances_per_s"] if on["instances_per_s"] and off["instances_per_s"] \
        else None
    return {"folder": str(folder.resolve()), "files": len(files), "jobs": jobs, "repeat": repeat,
            "codec": dict(CODEC_CONFIG), "off": off | {"runs_s": runs[False]}, "on": on | {"runs_s": runs[True]},
            "ratio": ratio, "goal": {"at_least": INGEST_GOAL, "met": ratio is not None and ratio >= INGEST_GOAL}}


def ct_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` whose header says CT."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
            continue
        if str(ds.get("Modality", "")) == "CT":
            found.append(path)
    return found


# ------------------------------------------------------------------------------------------------- the run


def run_normalize_benchmark(
    folder: Path,
    *,
    slices: int = 20,
    repeat: int = 7,
    ingest: bool = False,
    ingest_repeat: int = 3,
    jobs: int = 1,
    workdir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure every method on up to ``slices`` CT and MR slices of ``folder`` (and ingest on/off); JSON-able."""
    from archive.services.normalization import software_version

    folder = Path(folder)
    if not folder.is_dir():
        raise ArchiveError(f"not a folder: {folder}")
    if slices < 1 or repeat < 1 or ingest_repeat < 1 or jobs < 1:
        raise ArchiveError("--slices, --repeat, --ingest-repeat and --jobs must be at least 1")
    if workdir is not None and not Path(workdir).is_dir():
        raise ArchiveError(f"--workdir: not a folder: {workdir}")
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    say(f"reading {folder}")
    chosen, files, left_out = collect_slices(folder, slices)
    items = [*chosen["CT"], *(synthetic_616(s) for s in chosen["CT"] if s.pixels.shape == (512, 512)), *chosen["MR"]]
    if not items:
        raise ArchiveError(f"no CT or MR slice with pixel spacing, orientation and position under {folder}")
    version = software_version()
    measured: list[SliceRun] = []
    with single_threaded():
        for index, item in enumerate(items):
            say(f"slice {index + 1}/{len(items)}: {item.label}")
            measured.append(measure_slice(item, repeat, version))
    groups: dict[tuple[str, int, int, bool, bool], list[SliceRun]] = defaultdict(list)
    for run in measured:
        groups[_case_key(run)].append(run)
    cases = [summarize_case(groups[key]) for key in sorted(groups, key=lambda k: (k[0], k[3], -k[1] * k[2], not k[4]))]
    result: dict[str, Any] = {
        "benchmark": "normalize",
        "folder": str(folder.resolve()),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "threads": 1,
        "machine": {"cpu_model": cpu_model(), "python": sys.version.split()[0], "platform": platform.platform(),
                    "opencv": cv2.__version__, "simpleitk": sitk.Version.VersionString()},
        "software_version": version,
        "repeat": repeat,
        "slices_per_modality": slices,
        "files_read": files,
        "left_out": dict(left_out),
        "methods": {m.value: LABELS[m] for m in Method},
        "cases": cases,
        "ingest": None,
        "notes": NOTES,
    }
    if ingest:
        cts = ct_files(folder)
        if not cts:
            raise ArchiveError(f"--ingest: no CT file under {folder}")
        result["ingest"] = ingest_comparison(cts, folder, repeat=ingest_repeat, jobs=jobs, workdir=workdir, say=say)
    result["seconds"] = time.perf_counter() - started
    return result


NOTES: Final[list[str]] = [
    ("ms per slice: per slice the median of the interleaved runs (after one warm-up call, so weights are cached as "
     "for the slices of a series), per case the median over its slices; one thread everywhere"),
    ("target: the modality's shipped profile (CT 512×512 at 500/512 mm, MR 256×256 at 1 mm, pad-crop around the "
     "field centre); slices the shipped profile would not enlarge are measured with allow_upsample on"),
    ("OpenCV resize: to the plan's scale rounded to whole pixels, then padded/cropped around the centre (within a "
     "pixel of the plan's grid); warpAffine and SimpleITK: exactly the plan's grid; SimpleITK: 2-D images in the "
     "plane's frame (spacing, origin and output grid from DICOM), the filter's Execute only"),
    ("whole normalization: normalize_series_images on the slice as a one-instance series (geometry, plan, "
     "resampling, derived header, round-trip error) plus encoding the copy with the profile's codec; no catalog"),
    "agreement: mean |reference - ours of the same family| over output pixels inside the source field",
    (f"goals (issue 15, CT 512² and larger, default interpolation): resampling <= {RESAMPLE_GOAL} × JPEG-LS "
     f"encode, whole normalization <= {NORMALIZE_GOAL} × JPEG-LS encode; ingest with normalization >= "
     f"{INGEST_GOAL} × without"),
]


# ------------------------------------------------------------------------------------------------- printing


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.2f}" if value < 10 else f"{value:.1f}")


def print_normalize_benchmark(result: dict[str, Any], console: Console) -> None:
    """One column per case, one row per method; then the ratios against the goals, ingest, notes."""
    console.print(f"[bold]Normalization benchmark[/bold] of {result['folder']}  {result['when']}")
    console.print(f"{result['cores']} core(s), {result['machine']['cpu_model']}, 1 thread; Python "
                  f"{result['machine']['python']}, OpenCV {result['machine']['opencv']}, SimpleITK "
                  f"{result['machine']['simpleitk']}; median of {result['repeat']}; up to "
                  f"{result['slices_per_modality']} slices per modality", highlight=False)
    cases = result["cases"]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title="ms per slice")
    table.add_column("method", no_wrap=True)
    for case in cases:
        table.add_column(f"{case['name']}\n{case['slices']} sl → {case['target']['rows']}²", justify="right")
    for method, label in result["methods"].items():
        marks = [" *" if method == case["default_interpolation"] else "" for case in cases]
        table.add_row(label, *(_ms(case["ms_per_slice"][method]) + mark for case, mark in zip(cases, marks)))
    console.print(table)
    console.print("* the default interpolation of the case (area when shrinking, cubic when enlarging)")
    for case in cases:
        ratios, goals = case["ratios"], case["goals"]
        verdict = [f"{'met' if goals[key]['met'] else 'not met'}" for key in ("resample_over_jpegls",
                                                                               "normalize_over_jpegls")]
        scope = "" if case["goal_applies"] else " (goal stated for CT 512² and larger)"
        console.print(f"{case['name']}: resampling ({case['default_interpolation']}) / JPEG-LS = "
                      f"{ratios['resample_over_jpegls']:.2f} (goal <= {RESAMPLE_GOAL}: {verdict[0]}); whole "
                      f"normalization / JPEG-LS = {ratios['normalize_over_jpegls']:.2f} (goal <= {NORMALIZE_GOAL}: "
                      f"{verdict[1]}){scope}; spacing {case['source']['spacing_mm'][0]:.3g}–"
                      f"{case['source']['spacing_mm'][1]:.3g} mm", highlight=False)
        agreement = ", ".join(f"{result['methods'][m]} {v:.1f}" for m, v in case["agreement"].items())
        console.print(f"  mean |reference − ours| ({case['agreement_units']}): {agreement}", highlight=False)
    ingest = result.get("ingest")
    if ingest:
        off, on = ingest["off"], ingest["on"]
        console.print(f"ingest of {ingest['files']} CT files (jobs={ingest['jobs']}, best of {ingest['repeat']}): "
                      f"normalization off {off['instances_per_s']:.1f} inst/s, on {on['instances_per_s']:.1f} inst/s "
                      f"({on['normalized_instances']} normalized instances; series {on['normalized_series']}); "
                      f"ratio {ingest['ratio']:.2f} (goal >= {INGEST_GOAL}: "
                      f"{'met' if ingest['goal']['met'] else 'not met'})", highlight=False)
    if result["left_out"]:
        console.print("left out: " + ", ".join(f"{why} {n}" for why, n in result["left_out"].items()),
                      highlight=False)
    for note in result["notes"]:
        console.print(f"• {note}", markup=False)
