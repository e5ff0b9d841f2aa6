"""The synthetic generators must be right before anything is tested with them: geometry checked from the headers.

The oracles here recompute positions from the written DICOM with plain numpy (PS3.3 C.7.6.2.1.1), not with the
generators' own helpers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage  # type: ignore[import-untyped]

from tests import synthetic
from tests.conftest import shared_data


def _read(path: Path) -> Dataset:
    """Read strictly as Part 10: preamble, DICM prefix and file meta must be there."""
    with path.open("rb") as handle:
        assert handle.read(132)[128:] == b"DICM", path
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    return ds


def _vec(values: object) -> np.ndarray:
    return np.asarray([float(v) for v in values], dtype=np.float64)  # type: ignore[attr-defined]


def _centre(ds: Dataset) -> np.ndarray:
    iop, ipp, (sr, sc) = _vec(ds.ImageOrientationPatient), _vec(ds.ImagePositionPatient), _vec(ds.PixelSpacing)
    centre: np.ndarray = ipp + iop[:3] * sc * (int(ds.Columns) - 1) / 2 + iop[3:] * sr * (int(ds.Rows) - 1) / 2
    return centre


def _hu(ds: Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _quiet_patch(hu: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the soft-tissue patch (mean -150..150 HU) with the lowest standard deviation."""
    best: tuple[float, int, int] | None = None
    for r in range(0, hu.shape[0] - size, size // 2):
        for c in range(0, hu.shape[1] - size, size // 2):
            patch = hu[r:r + size, c:c + size]
            if -150 < patch.mean() < 150 and patch.min() > -500 and (best is None or patch.std() < best[0]):
                best = (float(patch.std()), r, c)
    assert best is not None and best[0] < 30, best
    return best[1], best[2]


def _bilinear_at(source: Dataset, out: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Source HU linearly interpolated at each output pixel's patient position, and where that lies in the source."""
    iop, ipp, (sr, sc) = _vec(out.ImageOrientationPatient), _vec(out.ImagePositionPatient), _vec(out.PixelSpacing)
    rows, columns = np.mgrid[0:out.Rows, 0:out.Columns]
    points = ipp + columns[..., None] * sc * iop[:3] + rows[..., None] * sr * iop[3:]
    s_iop, s_ipp, (s_sr, s_sc) = (_vec(source.ImageOrientationPatient), _vec(source.ImagePositionPatient),
                                  _vec(source.PixelSpacing))
    r, c = (points - s_ipp) @ s_iop[3:] / s_sr, (points - s_ipp) @ s_iop[:3] / s_sc
    inside = (r >= 0) & (r <= source.Rows - 1) & (c >= 0) & (c <= source.Columns - 1)
    return ndimage.map_coordinates(_hu(source), [r, c], order=1, mode="nearest"), inside


@pytest.mark.parametrize(("matrix", "spacing"), [(568, 0.78), (616, 0.87)])
def test_resampled_ct_keeps_field_centre_and_hu(tmp_path: Path, matrix: int, spacing: float) -> None:
    source = pydicom.dcmread(synthetic.default_ct_source())
    [path] = synthetic.resampled_ct(tmp_path / "out", matrix=matrix, spacing_mm=spacing)
    out = _read(path)

    assert (out.Rows, out.Columns) == (matrix, matrix)
    assert _vec(out.PixelSpacing).tolist() == [spacing, spacing]
    for keyword in ("RescaleSlope", "RescaleIntercept", "BitsStored", "PixelRepresentation", "FrameOfReferenceUID"):
        assert out[keyword].value == source[keyword].value, keyword
    assert out.SOPInstanceUID != source.SOPInstanceUID and out.StudyInstanceUID != source.StudyInstanceUID
    assert np.abs(_centre(out) - _centre(source)).max() < 1e-3

    # A quiet 20 mm soft-tissue patch, found in the source and located in the output through patient coordinates.
    src_spacing = float(source.PixelSpacing[0])
    size = round(20 / src_spacing)
    r0, c0 = _quiet_patch(_hu(source), size)
    src_ipp, out_ipp = _vec(source.ImagePositionPatient), _vec(out.ImagePositionPatient)
    low = src_ipp + np.array([c0, r0, 0]) * src_spacing  # axial: rows go +y, columns +x
    high = src_ipp + np.array([c0 + size - 1, r0 + size - 1, 0]) * src_spacing
    first = np.ceil((low - out_ipp) / spacing).astype(int)
    last = np.floor((high - out_ipp) / spacing).astype(int)
    source_patch = _hu(source)[r0:r0 + size, c0:c0 + size]
    out_patch = _hu(out)[first[1]:last[1] + 1, first[0]:last[0] + 1]
    assert out_patch.size > 0.8 * source_patch.size * (src_spacing / spacing) ** 2
    assert abs(out_patch.mean() - source_patch.mean()) < 3.0
    assert abs(out_patch.std() - source_patch.std()) < 5.0

    # Every output pixel against a bilinear oracle sampled at its patient position: catches any misregistration
    # (a one-pixel shift gives ~40 HU mean difference over the body, the cubic-vs-linear difference ~6 HU).
    expected, inside = _bilinear_at(source, out)
    difference = np.abs(_hu(out) - expected)[inside & (expected > -500)]
    assert np.median(difference) < 5.0 and difference.mean() < 12.0, (np.median(difference), difference.mean())

    if matrix * spacing > source.Columns * src_spacing:  # padded: the corner lies outside the source field
        assert out.pixel_array[0, 0] == source.pixel_array.min()


def test_ct_stack_positions_follow_the_normal(tmp_path: Path) -> None:
    paths = synthetic.ct_stack(tmp_path / "stack", slices=5, spacing_mm=2.5)
    stack = [_read(p) for p in paths]
    iop = _vec(stack[0].ImageOrientationPatient)
    normal = np.cross(iop[:3], iop[3:])
    ipps = np.array([_vec(ds.ImagePositionPatient) for ds in stack])
    steps = np.diff(ipps, axis=0)
    np.testing.assert_allclose(steps, np.tile(2.5 * normal, (4, 1)), atol=1e-4)
    assert [ds.InstanceNumber for ds in stack] == [1, 2, 3, 4, 5]
    assert len({ds.SOPInstanceUID for ds in stack}) == 5
    assert len({(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) for ds in stack}) == 1
    np.testing.assert_array_equal(stack[1].pixel_array, np.roll(stack[0].pixel_array, 1, axis=0))
    assert not np.array_equal(stack[1].pixel_array, stack[0].pixel_array)


def test_ct_stack_tilt_shears_along_the_column_direction(tmp_path: Path) -> None:
    stack = [_read(p) for p in synthetic.ct_stack(tmp_path / "tilt", slices=4, spacing_mm=3.0, tilt_deg=15.0)]
    iop = _vec(stack[0].ImageOrientationPatient)
    row, column, normal = iop[:3], iop[3:], np.cross(iop[:3], iop[3:])
    offsets = np.array([_vec(ds.ImagePositionPatient) for ds in stack]) - _vec(stack[0].ImagePositionPatient)
    np.testing.assert_allclose(offsets @ normal, [0.0, 3.0, 6.0, 9.0], atol=1e-4)
    np.testing.assert_allclose(offsets @ column, np.array([0.0, 3.0, 6.0, 9.0]) * math.tan(math.radians(15)), atol=1e-4)
    np.testing.assert_allclose(offsets @ row, 0.0, atol=1e-4)
    assert {float(ds.GantryDetectorTilt) for ds in stack} == {15.0}


@pytest.mark.parametrize(("uneven", "duplicate", "gaps"), [
    (True, False, [2.0, 2.0, 4.0, 2.0, 2.0]),
    (False, True, [2.0, 2.0, 0.0, 2.0, 2.0]),
])
def test_ct_stack_uneven_and_duplicate(tmp_path: Path, uneven: bool, duplicate: bool, gaps: list[float]) -> None:
    paths = synthetic.ct_stack(tmp_path / "s", slices=6, spacing_mm=2.0, uneven=uneven, duplicate=duplicate)
    stack = [_read(p) for p in paths]
    positions = [float(_vec(ds.ImagePositionPatient)[2]) for ds in stack]  # axial: the normal is +z
    np.testing.assert_allclose(np.diff(positions), gaps, atol=1e-4)
    if duplicate:
        np.testing.assert_array_equal(stack[2].pixel_array, stack[3].pixel_array)
        assert stack[2].SOPInstanceUID != stack[3].SOPInstanceUID


def test_ct_stack_other_matrix_keeps_the_field_centre(tmp_path: Path) -> None:
    source = pydicom.dcmread(synthetic.default_ct_source())
    [path] = synthetic.ct_stack(tmp_path / "m", slices=1, spacing_mm=1.0, matrix=568, pixel_mm=0.78)
    out = _read(path)
    assert (out.Rows, out.Columns, float(out.PixelSpacing[0])) == (568, 568, 0.78)
    assert np.abs(_centre(out) - _centre(source)).max() < 1e-3


def test_uids_are_deterministic_per_arguments_and_folder_name(tmp_path: Path) -> None:
    def uids(folder: Path, spacing: float) -> list[str]:
        return [str(_read(p).SOPInstanceUID) for p in synthetic.ct_stack(folder, slices=2, spacing_mm=spacing)]

    first = uids(tmp_path / "a" / "x", 2.0)
    assert uids(tmp_path / "b" / "x", 2.0) == first
    assert set(uids(tmp_path / "y", 2.0)).isdisjoint(first)
    assert set(uids(tmp_path / "a" / "x", 3.0)).isdisjoint(first)


@pytest.mark.parametrize("axis", [(1.0, 0.0), (1.0, 1.0)])
def test_oblique_mr_is_a_rigid_rotation(tmp_path: Path, axis: tuple[float, float]) -> None:
    angle = 20.0
    paths = synthetic.oblique_mr(tmp_path / "mr", angle_deg=angle, axis=axis, slices=12)
    stack = [_read(p) for p in paths]
    sources = [pydicom.dcmread(p) for p in sorted((shared_data() / synthetic.MR_SERIES).glob("*.dcm"))[:12]]
    iop = _vec(stack[0].ImageOrientationPatient)
    row, column = iop[:3], iop[3:]
    assert abs(np.linalg.norm(row) - 1) < 1e-6 and abs(np.linalg.norm(column) - 1) < 1e-6 and abs(row @ column) < 1e-6
    assert all(np.allclose(_vec(ds.ImageOrientationPatient), iop, atol=1e-9) for ds in stack)
    source_iop = _vec(sources[0].ImageOrientationPatient)
    old_normal, normal = np.cross(source_iop[:3], source_iop[3:]), np.cross(row, column)
    assert math.degrees(math.acos(np.clip(old_normal @ normal, -1, 1))) == pytest.approx(angle, abs=1e-3)
    if axis == (1.0, 1.0):  # double oblique: neither in-plane direction stays where it was
        assert abs(row @ source_iop[:3]) < 0.999 and abs(column @ source_iop[3:]) < 0.999

    ipps = np.array([_vec(ds.ImagePositionPatient) for ds in stack])
    steps = np.diff(ipps, axis=0)
    np.testing.assert_allclose(steps @ normal, 3.0, atol=1e-3)  # the source gap, now along the new normal
    np.testing.assert_allclose(steps - np.outer(steps @ normal, normal), 0.0, atol=1e-3)  # no shear
    old_centre = (_centre(sources[0]) + _centre(sources[-1])) / 2
    np.testing.assert_allclose((_centre(stack[0]) + _centre(stack[-1])) / 2, old_centre, atol=1e-3)
    for ds, src in zip(stack, sources, strict=True):
        np.testing.assert_array_equal(ds.pixel_array, src.pixel_array)
    assert stack[0].FrameOfReferenceUID != sources[0].FrameOfReferenceUID
    assert not any(element.tag.is_private for element in stack[0])


@pytest.mark.parametrize("zero", [False, True])
def test_without_spacing(tmp_path: Path, zero: bool) -> None:
    [path] = synthetic.without_spacing(tmp_path / "w", zero=zero)
    ds = _read(path)
    if zero:
        assert _vec(ds.PixelSpacing).tolist() == [0.0, 0.0]
    else:
        assert "PixelSpacing" not in ds
    assert "ImagePositionPatient" in ds and ds.pixel_array.shape == (512, 512)


def test_projection_has_detector_spacing_only(tmp_path: Path) -> None:
    [path] = synthetic.projection(tmp_path / "dx")
    ds = _read(path)
    assert ds.Modality == "DX" and ds.SOPClassUID == synthetic.DX_SOP_CLASS
    for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        assert keyword not in ds
    assert _vec(ds.ImagerPixelSpacing).tolist() == [0.143, 0.143]
    assert float(ds.EstimatedRadiographicMagnificationFactor) == 1.1
    assert (ds.BitsStored, ds.PixelRepresentation, ds.PhotometricInterpretation) == (12, 0, "MONOCHROME2")
    pixels = ds.pixel_array
    assert pixels.shape == (1536, 1024) and pixels.max() <= 4095 and pixels.std() > 100


@pytest.mark.parametrize(("scale", "calibrated"), [(1, False), (2, True)])
def test_mammography(tmp_path: Path, scale: int, calibrated: bool) -> None:
    [path] = synthetic.mammography(tmp_path / "mg", scale=scale, calibrated=calibrated)
    ds = _read(path)
    assert ds.Modality == "MG" and "ImageOrientationPatient" not in ds
    assert ds.pixel_array.shape == (512 * scale, 512 * scale)
    assert _vec(ds.ImagerPixelSpacing).tolist() == [0.5 / scale, 0.5 / scale]
    assert ("PixelSpacing" in ds) is calibrated
    if calibrated:
        assert _vec(ds.PixelSpacing).tolist() == [0.25 / scale, 0.25 / scale]


def test_study_of_shared_and_separate_studies(tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.8.498.1"
    paths = synthetic.projection(tmp_path / "a", study_uid=study) + synthetic.without_spacing(tmp_path / "b", study_uid=study)
    assert synthetic.study_of(paths) == study
    other = synthetic.without_spacing(tmp_path / "c")
    assert synthetic.study_of(other) != study
    with pytest.raises(ValueError, match="2 studies"):
        synthetic.study_of(paths + other)
