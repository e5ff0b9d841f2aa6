"""Normalization end to end through a real archive: millimetres, HU and references survive, checked independently.

Nothing here is compared against the code under test. Field centres come from
Image Position / Orientation / Pixel Spacing as pydicom reads them; pixels are
compared with SimpleITK's own linear resampling of the original onto the grid
the normalized header declares (both files read by SimpleITK), with figures
that a flipped, shifted or blank image fails by far; NIfTI affines are
compared with what SimpleITK and dcm2niix make of the retrieved normalized
DICOM. Sources: the shared CT slice (512 x 512 at 0.826 mm, Pixel Padding
Value -2000) and synthetic copies from tests/synthetic.py.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from scipy import ndimage  # type: ignore[import-untyped]

from archive.config import Settings
from archive.kinds import NormalizeOutcome, Variant
from archive.normalize.grid import Interpolation
from archive.normalize.profiles import DEFAULT_PROFILES, NormalizeProfile
from archive.services.export import export_series
from archive.services.ingest import ingest_paths
from archive.services.normalization import SeriesNormalization
from archive.services.query import show_study
from archive.services.retrieve import retrieve
from archive.services.runtime import Archive
from tests import synthetic

CT_SPACING = 500 / 512
HALF_TARGET_PIXEL = CT_SPACING / 2
# Normalized CT (area shrink) vs SimpleITK linear resampling over the body: measured median 0.6-0.9 HU,
# 95th percentile 7-13 HU. A one-pixel shift gives a median of 15 HU and a 95th percentile of 210 HU.
MEDIAN_HU_TOLERANCE = 3.0
P95_HU_TOLERANCE = 25.0
DCM2NIIX = Path("/usr/bin/dcm2niix")


# --- helpers: geometry from the headers, as pydicom reads them --------------------------------------------------------


def _open(root: Path, profiles: tuple[NormalizeProfile, ...] | None = None) -> Archive:
    settings = Settings.load(environ={}, home=root / "home", normalize=True, normalize_profiles=profiles)
    return Archive.open(settings)


def _profiles(name: str, **changes: Any) -> tuple[NormalizeProfile, ...]:
    """The shipped profiles with one changed (``dataclasses.replace``)."""
    return tuple(replace(p, **changes) if p.name == name else p for p in DEFAULT_PROFILES)


def _vector(values: Any) -> np.ndarray:
    return np.array([float(v) for v in values], dtype=np.float64)


def _directions(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction (increasing column), column direction (increasing row), normal."""
    iop = _vector(ds.ImageOrientationPatient)
    return iop[:3], iop[3:], np.cross(iop[:3], iop[3:])


def _index_of(ds: Dataset, point: np.ndarray) -> tuple[float, float]:
    """(row, column) index of an in-plane patient point."""
    row_dir, col_dir, _ = _directions(ds)
    offset = point - _vector(ds.ImagePositionPatient)
    spacing = _vector(ds.PixelSpacing)
    return float(offset @ col_dir / spacing[0]), float(offset @ row_dir / spacing[1])


def _hu(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.pixel_array, dtype=np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _series_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def _retrieve(archive: Archive, study_uid: str, out: Path, variant: Variant) -> list[Path]:
    return [f.path for f in retrieve(archive, study_uid, out, variant=variant).files]


def _derivation(archive: Archive, study_uid: str) -> dict[str, Any]:
    """The catalog's record of the study's one normalized series."""
    derived = [s for s in show_study(archive, study_uid)["series"] if s["derived_from"]]
    assert len(derived) == 1, derived
    record: dict[str, Any] = derived[0]["derivation"]
    return record


def _by_study(report_normalized: list[SeriesNormalization]) -> dict[str, SeriesNormalization]:
    return {n.study_uid: n for n in report_normalized}


def _sitk_on_grid(original: Path, normalized: Path, outside: float) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK's linear resampling of ``original`` onto ``normalized``'s grid, and the normalized pixels.

    Both files are read by SimpleITK (GDCM): origin, spacing and direction come from their headers and
    the values are modality units (Rescale applied), so the grid is the one any viewer would use.
    """
    source = sitk.ReadImage(str(original), sitk.sitkFloat32)
    grid = sitk.ReadImage(str(normalized), sitk.sitkFloat32)
    expected = sitk.Resample(source, grid, sitk.Transform(), sitk.sitkLinear, outside, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(expected)[0], sitk.GetArrayFromImage(grid)[0]


def _disagreement(candidate: np.ndarray, expected: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Median and 95th percentile of |candidate - expected| over ``mask``."""
    diff = np.abs(candidate[mask] - expected[mask])
    return float(np.median(diff)), float(np.percentile(diff, 95))


# --- 1. CT of three scanners to 512 x 512 over 500 mm -----------------------------------------------------------------


@dataclass
class CtCase:
    original: Path
    normalized: Path
    result: SeriesNormalization
    derivation: dict[str, Any]
    pad_hu: float | None  # what the padded border must hold; None where the source field is wider than 500 mm


CT_CASES = ("shared-512", "scanner-568", "scanner-616", "no-padding-value")


@pytest.fixture(scope="module")
def ct_cases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, CtCase]]:
    """The shared 512² slice and synthetic 568² at 0.78 mm and 616² at 0.87 mm, ingested with the shipped profiles."""
    root = tmp_path_factory.mktemp("ct")
    incoming = root / "incoming"
    (incoming / "shared-512").mkdir(parents=True)
    shutil.copyfile(synthetic.default_ct_source(), incoming / "shared-512" / "000.dcm")
    synthetic.resampled_ct(incoming / "scanner-568", matrix=568, spacing_mm=0.78)
    synthetic.resampled_ct(incoming / "scanner-616", matrix=616, spacing_mm=0.87)
    (bare,) = synthetic.resampled_ct(incoming / "no-padding-value", matrix=568, spacing_mm=0.78)
    ds = pydicom.dcmread(bare)
    del ds.PixelPaddingValue
    ds.save_as(bare)
    study_of = {name: synthetic.study_of(_series_files(incoming / name)) for name in CT_CASES}
    archive = _open(root)
    try:
        report = ingest_paths(archive, [incoming])
        results = _by_study(report.normalized)
        source_pad_hu = -2000.0 - 1024.0  # the shared slice's Pixel Padding Value, in HU
        pads = {"shared-512": source_pad_hu, "scanner-568": source_pad_hu, "scanner-616": None,
                "no-padding-value": -1024.0}
        cases = {}
        for name, study in study_of.items():
            (original,) = _retrieve(archive, study, root / "out" / name / "original", Variant.ORIGINAL)
            (normalized,) = _retrieve(archive, study, root / "out" / name / "normalized", Variant.NORMALIZED)
            cases[name] = CtCase(original, normalized, results[study], _derivation(archive, study), pads[name])
        yield cases
    finally:
        archive.close()


@pytest.mark.parametrize("name", CT_CASES)
def test_ct_field_centre_and_field_of_view(ct_cases: dict[str, CtCase], name: str) -> None:
    case = ct_cases[name]
    assert case.result.outcome is NormalizeOutcome.NORMALIZED and case.result.profile == "ct", case.result
    original, normalized = pydicom.dcmread(case.original), pydicom.dcmread(case.normalized)
    assert (normalized.Rows, normalized.Columns) == (512, 512)
    assert _vector(normalized.PixelSpacing) == pytest.approx([CT_SPACING, CT_SPACING], abs=1e-6)
    assert normalized.Rows * float(normalized.PixelSpacing[0]) == pytest.approx(500.0, abs=1e-3)
    assert normalized.Columns * float(normalized.PixelSpacing[1]) == pytest.approx(500.0, abs=1e-3)
    assert _vector(normalized.ImageOrientationPatient) == pytest.approx(_vector(original.ImageOrientationPatient))
    shift = np.linalg.norm(synthetic.field_centre(normalized) - synthetic.field_centre(original))
    assert shift < HALF_TARGET_PIXEL, f"field centre moved {shift:.4f} mm"
    assert shift < 1e-3  # measured 0 to 4e-14 mm
    target = case.derivation["target_geometry"]
    assert (target["rows"], target["columns"]) == (512, 512)
    assert target["position"] == pytest.approx(_vector(normalized.ImagePositionPatient), abs=1e-4)
    assert target["spacing"] == pytest.approx([CT_SPACING, CT_SPACING])


@pytest.mark.parametrize("name", CT_CASES)
def test_ct_stays_in_hounsfield_units_and_pads_with_the_declared_value(ct_cases: dict[str, CtCase], name: str) -> None:
    case = ct_cases[name]
    original, normalized = pydicom.dcmread(case.original), pydicom.dcmread(case.normalized)
    for keyword in ("RescaleSlope", "RescaleIntercept", "BitsStored", "BitsAllocated", "PixelRepresentation"):
        assert float(normalized[keyword].value) == float(original[keyword].value), keyword
    hu = _hu(normalized)
    # pixel centres more than one source pixel outside the source field: nothing of the source reaches them
    rows, columns = np.mgrid[0:512, 0:512].astype(np.float64)
    row_dir, col_dir, _ = _directions(normalized)
    points = (_vector(normalized.ImagePositionPatient)[:, None, None]
              + (columns * CT_SPACING)[None] * row_dir[:, None, None] + (rows * CT_SPACING)[None] * col_dir[:, None, None])
    src_row_dir, src_col_dir, _ = _directions(original)
    offsets = points - _vector(original.ImagePositionPatient)[:, None, None]
    spacing = _vector(original.PixelSpacing)
    src_r = np.tensordot(src_col_dir, offsets, axes=1) / spacing[0]
    src_c = np.tensordot(src_row_dir, offsets, axes=1) / spacing[1]
    outside = (src_r < -1.5) | (src_r > original.Rows + 0.5) | (src_c < -1.5) | (src_c > original.Columns + 0.5)
    pad_crop = case.derivation["transform"]["plane"]["pad_crop"]
    if case.pad_hu is None:
        assert not outside.any() and all(v < 0 for v in pad_crop.values()), pad_crop  # 536 mm field: cropped
        return
    assert all(v > 0 for v in pad_crop.values()), pad_crop
    assert outside.sum() > 20_000  # a 423 or 443 mm field in a 500 mm square
    assert np.unique(hu[outside]).tolist() == [case.pad_hu]
    stored_pad = (case.pad_hu - float(original.RescaleIntercept)) / float(original.RescaleSlope)
    assert int(normalized.PixelPaddingValue) == stored_pad


@functools.cache
def _uniform_point() -> np.ndarray:
    """Patient coordinates of the most uniform soft-tissue disk of the shared slice (found once, by statistics)."""
    ds = pydicom.dcmread(synthetic.default_ct_source())
    hu = _hu(ds)
    size = 25  # ~20 mm
    mean = ndimage.uniform_filter(hu, size)
    std = np.sqrt(np.maximum(ndimage.uniform_filter(hu * hu, size) - mean * mean, 0))
    candidates = np.where((mean > 0) & (mean < 100), std, np.inf)
    candidates[:size, :], candidates[-size:, :], candidates[:, :size], candidates[:, -size:] = (np.inf,) * 4
    r, c = np.unravel_index(int(np.argmin(candidates)), candidates.shape)
    row_dir, col_dir, _ = _directions(ds)
    spacing = _vector(ds.PixelSpacing)
    point: np.ndarray = _vector(ds.ImagePositionPatient) + c * spacing[1] * row_dir + r * spacing[0] * col_dir
    return point


def _disk(ds: Dataset, centre: np.ndarray, radius_mm: float) -> np.ndarray:
    """HU of the pixels whose centres lie within ``radius_mm`` of the in-plane point ``centre``."""
    r0, c0 = _index_of(ds, centre)
    spacing = _vector(ds.PixelSpacing)
    rows, columns = np.mgrid[0:int(ds.Rows), 0:int(ds.Columns)]
    inside = ((rows - r0) * spacing[0]) ** 2 + ((columns - c0) * spacing[1]) ** 2 <= radius_mm ** 2
    values: np.ndarray = _hu(ds)[inside]
    return values


@pytest.mark.parametrize("name", CT_CASES)
def test_ct_uniform_region_keeps_its_statistics(ct_cases: dict[str, CtCase], name: str) -> None:
    case = ct_cases[name]
    original, normalized = pydicom.dcmread(case.original), pydicom.dcmread(case.normalized)
    centre = _uniform_point()
    before, after = _disk(original, centre, 8.0), _disk(normalized, centre, 8.0)
    assert before.size > 250 and after.size > 200
    assert 0 < before.mean() < 150  # soft tissue, not air or padding
    assert abs(after.mean() - before.mean()) < 2.0, (before.mean(), after.mean())
    # area averaging of ~1.2-1.5 source pixels lowers noise a little, never raises it
    assert 0.6 * before.std() < after.std() <= 1.05 * before.std(), (before.std(), after.std())


@pytest.mark.parametrize("name", CT_CASES)
def test_ct_pixels_agree_with_simpleitk_and_a_flip_or_shift_would_not(ct_cases: dict[str, CtCase], name: str) -> None:
    case = ct_cases[name]
    expected, got = _sitk_on_grid(case.original, case.normalized, outside=-10_000.0)
    body = expected > -500.0  # soft tissue and bone of the resampled original
    assert body.sum() > 30_000
    median, p95 = _disagreement(got, expected, body)
    assert median < MEDIAN_HU_TOLERANCE and p95 < P95_HU_TOLERANCE, (median, p95)
    wrong = {
        "flipped rows": np.flip(got, 0), "flipped columns": np.flip(got, 1), "rotated 90": np.rot90(got),
        "shifted 1 row": np.roll(got, 1, 0), "shifted 2 columns": np.roll(got, 2, 1),
        "blank": np.full_like(got, -1024.0),
    }
    for label, image in wrong.items():
        bad_median, bad_p95 = _disagreement(image, expected, body)
        assert bad_p95 > 4 * P95_HU_TOLERANCE, (label, bad_median, bad_p95)  # measured >= 208 HU
        if label != "shifted 1 row" and label != "shifted 2 columns":
            assert bad_median > 30 * MEDIAN_HU_TOLERANCE, (label, bad_median)  # measured >= 150 HU


# --- 3. shrink then enlarge: the recorded error is what a round trip costs --------------------------------------------


def test_shrink_then_enlarge_round_trip_has_the_recorded_bounded_error(
    ct_cases: dict[str, CtCase], tmp_path: Path
) -> None:
    """The normalized shared slice, archived again as an original, enlarged back onto the original grid."""
    case = ct_cases["shared-512"]
    original = pydicom.dcmread(case.original)
    shrink_rmse, shrink_max = case.derivation["rmse"], case.derivation["max_abs_error"]
    assert 20.0 < shrink_rmse < 100.0 and 300.0 < shrink_max < 2000.0, (shrink_rmse, shrink_max)  # measured 60, 1382
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    shutil.copyfile(case.normalized, incoming / "normalized.dcm")
    source_spacing = float(original.PixelSpacing[0])
    profiles = _profiles("ct", spacing_mm=source_spacing, allow_upsample=True)
    archive = _open(tmp_path, profiles)
    try:
        report = ingest_paths(archive, [incoming])
        (result,) = report.normalized
        assert result.outcome is NormalizeOutcome.NORMALIZED, result
        study = str(pydicom.dcmread(case.normalized, stop_before_pixels=True).StudyInstanceUID)
        record = _derivation(archive, study)
        (back,) = _retrieve(archive, study, tmp_path / "back", Variant.NORMALIZED)
    finally:
        archive.close()
    assert record["interpolation"] == Interpolation.CUBIC.value
    enlarge_rmse, enlarge_max = record["rmse"], record["max_abs_error"]
    # enlarging, the recorded error is the way back (linear, onto the 0.977 mm grid): measured 25.5 HU, 515 HU
    assert 5.0 < enlarge_rmse < 40.0 and 100.0 < enlarge_max < 800.0, (enlarge_rmse, enlarge_max)
    restored = pydicom.dcmread(back)
    # the original grid exactly: same matrix, spacing and corner
    assert (restored.Rows, restored.Columns) == (original.Rows, original.Columns)
    assert _vector(restored.PixelSpacing) == pytest.approx(_vector(original.PixelSpacing), abs=1e-6)
    assert _vector(restored.ImagePositionPatient) == pytest.approx(_vector(original.ImagePositionPatient), abs=1e-3)
    diff = _hu(restored) - _hu(original)
    rmse, max_abs = float(np.sqrt(np.mean(diff ** 2))), float(np.abs(diff).max())
    assert 0 < rmse and 0 < max_abs
    # the first step's record predicts what the round trip costs (it resamples back linearly, this is cubic):
    # measured 52.5 HU RMSE and 1302 HU at most, against 59.6 and 1382 HU recorded
    assert 0.7 * shrink_rmse < rmse < 1.2 * shrink_rmse, (rmse, shrink_rmse)
    assert max_abs < 1.2 * shrink_max, (max_abs, shrink_max)


# --- 2. oblique MR, across slices ---------------------------------------------------------------------------------


MR_SLICES = 8
MR_SLICE_SPACING = 1.5


def test_oblique_mr_is_skipped_by_the_shipped_profile_as_upsampling(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    synthetic.oblique_mr(incoming / "mr", slices=MR_SLICES)
    archive = _open(tmp_path, _profiles("mr", enabled=True, slice_spacing_mm=MR_SLICE_SPACING))
    try:
        (result,) = ingest_paths(archive, [incoming]).normalized
        series = show_study(archive, result.study_uid)["series"]
    finally:
        archive.close()
    assert result.outcome is NormalizeOutcome.SKIPPED and result.profile == "mr", result
    assert "3.28125" in result.reason and "allow_upsample" in result.reason, result.reason
    assert [s["derived_from"] for s in series] == [None]  # nothing derived


def test_oblique_mr_resampled_in_plane_and_across_slices(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    originals = synthetic.oblique_mr(incoming / "mr", angle_deg=20.0, axis=(1.0, 1.0), slices=MR_SLICES)
    profiles = _profiles("mr", enabled=True, slice_spacing_mm=MR_SLICE_SPACING, allow_upsample=True,
                         enlarge=Interpolation.LINEAR)
    archive = _open(tmp_path, profiles)
    try:
        (result,) = ingest_paths(archive, [incoming]).normalized
        record = _derivation(archive, result.study_uid)
        files = _retrieve(archive, result.study_uid, tmp_path / "normalized", Variant.NORMALIZED)
    finally:
        archive.close()
    assert result.outcome is NormalizeOutcome.NORMALIZED, result
    assert record["across_slices"] is True and record["warnings"] == [], record["warnings"]
    sources = [pydicom.dcmread(p) for p in originals]
    row_dir, _, normal = _directions(sources[0])
    assert abs(normal[2]) < 0.95 and abs(row_dir[0]) < 0.99  # really oblique
    source_centres = np.array([synthetic.field_centre(ds) for ds in sources])
    first = source_centres[0]
    along = (source_centres - first) @ normal
    assert along == pytest.approx(np.arange(MR_SLICES) * 3.0, abs=1e-3)  # sorted stack, 3 mm apart
    derived = sorted((pydicom.dcmread(p) for p in files), key=lambda ds: float(_vector(ds.ImagePositionPatient) @ normal))
    expected_count = round((MR_SLICES - 1) * 3.0 / MR_SLICE_SPACING) + 1
    assert len(derived) == expected_count
    source_uids = {str(ds.SOPInstanceUID) for ds in sources}
    for k, ds in enumerate(derived):
        assert _vector(ds.ImageOrientationPatient) == pytest.approx(_vector(sources[0].ImageOrientationPatient),
                                                                   abs=1e-6)
        assert (ds.Rows, ds.Columns) == (256, 256)
        assert _vector(ds.PixelSpacing) == pytest.approx([1.0, 1.0])
        assert float(ds.SpacingBetweenSlices) == pytest.approx(MR_SLICE_SPACING)
        centre = synthetic.field_centre(ds)
        # the field centre lies on the line of the source centres, k * 1.5 mm from the first
        assert np.linalg.norm(centre - (first + k * MR_SLICE_SPACING * normal)) < 0.5, (k, centre)
        references = {str(item.ReferencedSOPInstanceUID) for item in ds.SourceImageSequence}
        assert references and references <= source_uids
    # a derived slice where a source slice lies is SimpleITK's in-plane resampling of that slice
    for j in (0, 3, MR_SLICES - 1):
        match = next(p for p, ds in zip(files, (pydicom.dcmread(f) for f in files))
                     if abs((synthetic.field_centre(ds) - source_centres[j]) @ normal) < 1e-3)
        expected, got = _sitk_on_grid(originals[j], match, outside=-1e6)
        inside = expected > -1e5
        inside = ndimage.binary_erosion(inside, iterations=3)  # the edge pixels: kernels differ at the border
        median, p95 = _disagreement(got, expected, inside)
        # both linear on the same grid: only the rounding to stored values (slope 2) differs; measured 0.5 and 0.95
        assert median < 1.0 and p95 < 2.0, (j, median, p95)
        assert _disagreement(np.flip(got, 1), expected, inside)[0] > 500.0  # measured >= 837


# --- 4. stacks and images that cannot be resampled as asked: a warning and a defined behaviour -------------------


WARNING_CASES = {
    "even": None,  # the control: resampled across slices, no warning
    "tilt": "tilt",
    "uneven": "slice gaps range from 2.500 to 5.000 mm",
    "duplicate": "share a position",
    "no-spacing": "no pixel spacing",
    "zero-spacing": "no pixel spacing",
}


@pytest.fixture(scope="module")
def warning_cases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[list[Path], Any, Any, list[Path]]]]:
    """Each case a study of its own, normalized to 256² at 500/256 mm and asked for 2 mm slices."""
    root = tmp_path_factory.mktemp("warnings")
    incoming = root / "incoming"
    made = {
        "even": synthetic.ct_stack(incoming / "even", slices=4, spacing_mm=2.5, matrix=256),
        "tilt": synthetic.ct_stack(incoming / "tilt", slices=4, spacing_mm=2.5, matrix=256, tilt_deg=15.0),
        "uneven": synthetic.ct_stack(incoming / "uneven", slices=4, spacing_mm=2.5, matrix=256, uneven=True),
        "duplicate": synthetic.ct_stack(incoming / "duplicate", slices=4, spacing_mm=2.5, matrix=256, duplicate=True),
        "no-spacing": synthetic.without_spacing(incoming / "no-spacing"),
        "zero-spacing": synthetic.without_spacing(incoming / "zero-spacing", zero=True),
    }
    archive = _open(root, _profiles("ct", rows=256, columns=256, spacing_mm=500 / 256, slice_spacing_mm=2.0))
    try:
        results = _by_study(ingest_paths(archive, [incoming]).normalized)
        cases = {}
        for name, paths in made.items():
            study = synthetic.study_of(paths)
            out = _retrieve(archive, study, root / "out" / name, Variant.NORMALIZED)
            cases[name] = (paths, results[study], _derivation(archive, study), out)
        yield cases
    finally:
        archive.close()


@pytest.mark.parametrize("name", list(WARNING_CASES))
def test_unsafe_stacks_and_missing_spacing_warn_and_behave_as_defined(
    warning_cases: dict[str, tuple[list[Path], Any, Any, list[Path]]], name: str
) -> None:
    originals, result, record, files = warning_cases[name]
    assert result.outcome is NormalizeOutcome.NORMALIZED, result
    expected = WARNING_CASES[name]
    sources = [pydicom.dcmread(p) for p in originals]
    derived = [pydicom.dcmread(p) for p in files]
    assert all((ds.Rows, ds.Columns) == (256, 256) for ds in derived)
    if expected is None:
        assert record["warnings"] == [] and record["across_slices"] is True
        _, _, normal = _directions(sources[0])
        first = float(_vector(sources[0].ImagePositionPatient) @ normal)
        derived.sort(key=lambda ds: float(_vector(ds.ImagePositionPatient) @ normal))
        along = [float(_vector(ds.ImagePositionPatient) @ normal) - first for ds in derived]
        assert along == pytest.approx([0.0, 2.0, 4.0, 6.0], abs=1e-3)  # within the 7.5 mm the stack spans
        assert all(float(ds.SpacingBetweenSlices) == pytest.approx(2.0) for ds in derived)
        # the first derived slice lies on the first source slice: SimpleITK's in-plane resampling of it
        path_of = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
        expected_hu, got = _sitk_on_grid(originals[0], path_of[str(derived[0].SOPInstanceUID)], -10_000.0)
        body = expected_hu > -500.0
        assert body.sum() > 5_000
        median, p95 = _disagreement(got, expected_hu, body)  # measured 1.2 and 17.6 HU (a 2.4x shrink)
        assert median < 2 * MEDIAN_HU_TOLERANCE and p95 < 2 * P95_HU_TOLERANCE, (median, p95)
        return
    assert any(expected in w.lower() for w in record["warnings"]), record["warnings"]
    assert any(expected in w.lower() for w in result.warnings), result.warnings
    assert record["across_slices"] is False
    assert len(derived) == len(sources)  # in-plane only: one derived image per source image
    if "spacing" in name:
        (source,), (ds,) = sources, derived
        assert "PixelSpacing" not in ds and record["target_geometry"]["spacing"] is None
        assert record["target_geometry"]["spacing_kind"] == "none"
        # scaled by matrix only: 512 -> 256 is the mean of each 2 x 2 block, to the rounding of stored values
        blocks = np.asarray(source.pixel_array, dtype=np.float64).reshape(256, 2, 256, 2).mean(axis=(1, 3))
        assert np.abs(ds.pixel_array - blocks).max() <= 0.5 + 1e-9
        return
    # in-plane only: each derived slice keeps its own source's field centre and slice position (the tilt's shear too)
    centres = sorted(synthetic.field_centre(ds).tolist() for ds in derived)
    expected_centres = sorted(synthetic.field_centre(ds).tolist() for ds in sources)
    assert np.abs(np.array(centres) - np.array(expected_centres)).max() < 500 / 256 / 2
    assert all("SpacingBetweenSlices" not in ds or float(ds.SpacingBetweenSlices) != 2.0 for ds in derived)


# --- 5. retrieved normalized images are DERIVED and reference their sources --------------------------------------


@pytest.mark.parametrize("name", ["shared-512", "scanner-616"])
def test_retrieved_normalized_images_are_derived_and_reference_their_sources(
    ct_cases: dict[str, CtCase], name: str
) -> None:
    case = ct_cases[name]
    original, normalized = pydicom.dcmread(case.original), pydicom.dcmread(case.normalized)
    assert list(normalized.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert normalized.StudyInstanceUID == original.StudyInstanceUID
    assert normalized.SeriesInstanceUID != original.SeriesInstanceUID
    assert normalized.SOPInstanceUID != original.SOPInstanceUID
    assert normalized.SeriesInstanceUID == case.result.derived_series_uid
    assert "ct" in str(normalized.DerivationDescription)
    (source,) = normalized.SourceImageSequence
    assert source.ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert source.ReferencedSOPClassUID == original.SOPClassUID
    assert original.SeriesInstanceUID in {str(item.SeriesInstanceUID) for item in normalized.ReferencedSeriesSequence}


# --- 6. NIfTI export: the affine SimpleITK and dcm2niix compute from the normalized DICOM -------------------------


def _nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file's voxels (scl_slope / scl_inter applied: modality units) and its affine, as nibabel reads them."""
    image = nib.load(str(path))
    assert isinstance(image, nib.Nifti1Image)
    return np.asarray(image.dataobj, dtype=np.float64), np.asarray(image.affine, dtype=np.float64)


def _corners(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates of the 8 corner voxel centres, sorted so that two volumes' sets can be compared."""
    ijk = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = (affine @ ijk.T).T[:, :3]
    return np.array(sorted(world.round(3).tolist()))


def _voxel_map(affine_from: np.ndarray, affine_to: np.ndarray) -> np.ndarray:
    """The voxel-to-voxel map between two grids; a signed permutation with integer offsets when they coincide."""
    mapping: np.ndarray = np.linalg.inv(affine_to) @ affine_from
    return mapping


def _same_voxels(data_from: np.ndarray, affine_from: np.ndarray, data_to: np.ndarray, affine_to: np.ndarray) -> None:
    """Every voxel of one volume holds the value of the voxel at the same world position in the other."""
    mapping = _voxel_map(affine_from, affine_to)
    assert np.abs(mapping - np.rint(mapping)).max() < 0.5, mapping  # within half a voxel
    mapping = np.rint(mapping)
    ijk = np.indices(data_from.shape).reshape(3, -1)
    target = (mapping[:3, :3] @ ijk + mapping[:3, 3:]).astype(int)
    assert target.min() >= 0 and all(target[a].max() < data_to.shape[a] for a in range(3)), "grids do not coincide"
    np.testing.assert_allclose(data_from.reshape(-1), data_to[tuple(target)], atol=1e-3)


def test_nifti_export_has_the_affine_of_the_normalized_dicom_series(tmp_path: Path) -> None:
    if not DCM2NIIX.is_file():
        pytest.fail(f"{DCM2NIIX} is missing (Debian package dcm2niix)")
    incoming = tmp_path / "incoming"
    originals = synthetic.ct_stack(incoming / "stack", slices=5, spacing_mm=2.5, tilt_deg=0.0)
    study = synthetic.study_of(originals)
    archive = _open(tmp_path)
    try:
        (result,) = ingest_paths(archive, [incoming]).normalized
        files = _retrieve(archive, study, tmp_path / "normalized", Variant.NORMALIZED)
        (exported,) = export_series(archive, [study], tmp_path / "export", variant=Variant.NORMALIZED,
                                    file_format="nifti")
    finally:
        archive.close()
    assert result.outcome is NormalizeOutcome.NORMALIZED and len(files) == 5
    series_dir = files[0].parent
    assert {p.parent for p in files} == {series_dir}
    # SimpleITK reads the retrieved normalized series; its LPS geometry turned into RAS
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir)))
    image = reader.Execute()
    assert image.GetSize() == (512, 512, 5)
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    sitk_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    sitk_xyz = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)).astype(np.float64)
    assert image.GetSpacing() == pytest.approx((CT_SPACING, CT_SPACING, 2.5), abs=1e-4)

    data, affine = _nifti(exported.path)  # HU
    assert data.shape == (512, 512, 5)
    np.testing.assert_allclose(affine, sitk_ras, atol=1e-3)
    _same_voxels(data, affine, sitk_xyz, sitk_ras)

    out = tmp_path / "dcm2niix"
    out.mkdir()
    run = subprocess.run([str(DCM2NIIX), "-z", "n", "-b", "n", "-f", "volume", "-o", str(out), str(series_dir)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    (made,) = sorted(out.glob("*.nii"))
    theirs, their_affine = _nifti(made)
    half_voxel = np.array([CT_SPACING, CT_SPACING, 2.5]) / 2
    corner_gap = np.abs(_corners(affine, data.shape) - _corners(their_affine, theirs.shape))
    assert (corner_gap.max(axis=0) < half_voxel.max()).all(), corner_gap.max(axis=0)
    _same_voxels(data, affine, theirs, their_affine)


# --- 7. projection radiographs and mammography ---------------------------------------------------------------------


def test_projection_keeps_imager_pixel_spacing_and_its_calibration(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    (dx_path,) = synthetic.projection(incoming / "dx")
    source = pydicom.dcmread(dx_path)
    archive = _open(tmp_path, _profiles("projection", enabled=True, rows=1024, columns=1024))
    try:
        (result,) = ingest_paths(archive, [incoming]).normalized
        (derived_path,) = _retrieve(archive, result.study_uid, tmp_path / "normalized", Variant.NORMALIZED)
        record = _derivation(archive, result.study_uid)
    finally:
        archive.close()
    assert result.outcome is NormalizeOutcome.NORMALIZED and result.profile == "projection", result
    ds = pydicom.dcmread(derived_path)
    assert "PixelSpacing" not in ds and "ImagePositionPatient" not in ds and "ImageOrientationPatient" not in ds
    source_mm = float(source.ImagerPixelSpacing[0])  # 0.143 mm, 1536 rows x 1024 columns
    scaled = source.Rows * source_mm / 1024  # scale to fit: the long side decides
    assert (ds.Rows, ds.Columns) == (1024, 1024)
    assert _vector(ds.ImagerPixelSpacing) == pytest.approx([scaled, scaled], rel=1e-6)
    # the detector field along the long side is kept: same millimetres at the detector
    assert ds.Rows * float(ds.ImagerPixelSpacing[0]) == pytest.approx(source.Rows * source_mm, abs=scaled / 2)
    for keyword in ("EstimatedRadiographicMagnificationFactor", "DistanceSourceToDetector", "DistanceSourceToPatient"):
        assert float(ds[keyword].value) == float(source[keyword].value), keyword
    assert record["target_geometry"]["spacing_kind"] == "detector"
    # independent reference: the source padded to a centred 1536 x 1536 square with 0, OpenCV's area resize by
    # exactly 1.5; compared where the output pixels lie wholly inside the 1024 source columns (682.7 output columns)
    side = (source.Rows - source.Columns) // 2
    square = np.pad(source.pixel_array.astype(np.float32), ((0, 0), (side, side)))
    reference = cv2.resize(square, (1024, 1024), interpolation=cv2.INTER_AREA)
    width = source.Columns * source_mm / scaled
    left, right = int(np.ceil((1024 - width) / 2)) + 1, int(np.floor((1024 + width) / 2)) - 1
    got = ds.pixel_array.astype(np.float64)
    assert np.abs(got[:, left:right] - reference[:, left:right]).max() <= 0.5 + 1e-3  # rounding to stored values
    assert np.all(got[:, :left - 2] == 0) and np.all(got[:, right + 2:] == 0)  # padded with 0 (MONOCHROME2 black)
    assert np.median(np.abs(np.flip(got, 1) - reference)[:, left:right]) > 20.0  # measured 47


def test_projection_profile_as_shipped_does_not_enlarge(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    synthetic.projection(incoming / "dx")
    archive = _open(tmp_path, _profiles("projection", enabled=True))
    try:
        (result,) = ingest_paths(archive, [incoming]).normalized
    finally:
        archive.close()
    assert result.outcome is NormalizeOutcome.SKIPPED and "allow_upsample" in result.reason, result


def test_mammography_is_not_normalized_by_default(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    synthetic.mammography(incoming / "mg")
    archive = _open(tmp_path, _profiles("projection", enabled=True, modalities=("CR", "DX", "MG")))
    try:
        (result,) = ingest_paths(archive, [incoming]).normalized
        series = show_study(archive, result.study_uid)["series"]
    finally:
        archive.close()
    assert result.modality == "MG" and result.outcome is NormalizeOutcome.NOT_MATCHED, result
    assert "mammography" in result.reason and "keeps" in result.reason, result.reason
    assert [s["derived_from"] for s in series] == [None]
