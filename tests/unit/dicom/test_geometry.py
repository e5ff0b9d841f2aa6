"""Plane geometry read from real DICOM (CT, MR, enhanced multi-frame, mammography) and from malformed headers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from archive.dicom.geometry import PlaneGeometry, plane_geometries
from archive.normalize.grid import SpacingKind
from tests.conftest import shared_data

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _copy_read(relative: str, tmp_path: Path) -> Dataset:
    target = tmp_path / Path(relative).name
    shutil.copyfile(shared_data() / relative, target)
    return pydicom.dcmread(target, stop_before_pixels=True)


def test_real_ct_axial_slice(tmp_path: Path) -> None:
    ds = _copy_read("ct-chest-tcia/A002304/axial/19001231-076.dcm", tmp_path)
    [plane] = plane_geometries(ds)
    assert (plane.rows, plane.columns) == (512, 512)
    assert plane.spacing == (0.826172, 0.826172) and plane.spacing_kind is SpacingKind.PATIENT
    assert plane.orientation == AXIAL
    assert plane.position == (-174.8, -187.3, -194.75)
    assert plane.frame_of_reference_uid == ds.FrameOfReferenceUID
    half = 255.5 * 0.826172
    centre = plane.centre()
    assert centre is not None
    np.testing.assert_allclose(centre, [-174.8 + half, -187.3 + half, -194.75], atol=1e-9)
    assert plane.slice_position() == pytest.approx(-194.75, abs=1e-9)
    assert plane.field_mm() == pytest.approx((512 * 0.826172, 512 * 0.826172), abs=1e-9)


def test_real_mr_slice_with_near_zero_cosines(tmp_path: Path) -> None:
    ds = _copy_read("mr-siemens-prisma/8_gre_fm_siemens_baseline/001_e2_ph.dcm", tmp_path)
    [plane] = plane_geometries(ds)
    assert plane.spacing == (3.28125, 3.28125) and (plane.rows, plane.columns) == (64, 64)
    assert plane.orientation is not None
    np.testing.assert_allclose(plane.orientation, [1, 4.897e-12, 0, -4.897e-12, 1, 0], atol=1e-15)
    np.testing.assert_allclose(plane.normal(), [0, 0, 1], atol=1e-12)
    assert plane.slice_position() == pytest.approx(-134.21807861328, abs=1e-6)


def test_enhanced_multiframe_functional_groups(tmp_path: Path) -> None:
    """A real SEG: spacing and orientation in the Shared groups, one position per frame in the Per-frame groups."""
    ds = _copy_read("misc-barre/MR_UnspecifiedLength.dcm", tmp_path)
    assert "PixelSpacing" not in ds and "ImageOrientationPatient" not in ds  # only in the functional groups
    planes = plane_geometries(ds)
    assert len(planes) == 27
    assert all(p.spacing == (0.78125, 0.78125) and p.orientation == (0, 1, 0, 0, 0, -1) for p in planes)
    assert planes[0].position == pytest.approx((95.6999969482, -116.4093742371, 123.609375))
    assert planes[5].position == pytest.approx((85.6999969482, -116.4093742371, 123.609375))
    assert planes[5].slice_position() == pytest.approx(-85.6999969482)  # normal (-1, 0, 0)


def test_enhanced_mr_stripped_of_its_groups_has_frames_without_geometry(tmp_path: Path) -> None:
    """pydicom's emri_small.dcm: Enhanced MR Image Storage, 10 frames, no functional groups left at all."""
    target = tmp_path / "emri_small.dcm"
    shutil.copyfile(str(get_testdata_file("emri_small.dcm")), target)
    planes = plane_geometries(pydicom.dcmread(target, stop_before_pixels=True))
    assert len(planes) == 10 and all((p.rows, p.columns) == (64, 64) for p in planes)
    assert all(p.spacing is None and p.spacing_kind is SpacingKind.NONE and p.orientation is None for p in planes)


def test_per_frame_groups_override_shared_ones() -> None:
    ds = _image(rows=4, columns=6)
    ds.NumberOfFrames = 3
    shared = Dataset()
    shared.PixelMeasuresSequence = [_item(PixelSpacing=[0.5, 0.5])]
    shared.PlaneOrientationSequence = [_item(ImageOrientationPatient=[0, 2, 0, 0, 0, -3])]  # not unit: normalised
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for z in range(3):
        frame = Dataset()
        frame.PlanePositionSequence = [_item(ImagePositionPatient=[0, 0, 2.0 * z])]
        if z == 2:
            frame.PixelMeasuresSequence = [_item(PixelSpacing=[0.7, 0.9])]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    planes = plane_geometries(ds)
    assert [p.spacing for p in planes] == [(0.5, 0.5), (0.5, 0.5), (0.7, 0.9)]
    assert [p.position for p in planes] == [(0, 0, 0), (0, 0, 2), (0, 0, 4)]
    assert all(p.orientation == (0, 1, 0, 0, 0, -1) for p in planes)


def test_classic_multiframe_repeats_one_geometry() -> None:
    ds = _image(rows=4, columns=4, PixelSpacing=[1, 1], ImageOrientationPatient=list(AXIAL),
                ImagePositionPatient=[1, 2, 3])
    ds.NumberOfFrames = "5"
    planes = plane_geometries(ds)
    assert len(planes) == 5 and len(set(planes)) == 1 and planes[0].position == (1, 2, 3)


def test_mammography_keeps_detector_spacing(tmp_path: Path) -> None:
    """Imager Pixel Spacing 0.5 wins over the calibrated Pixel Spacing 0.25 of this projection image."""
    ds = _copy_read("misc-barre/MG_Explicit_Little.dcm", tmp_path)
    assert [float(v) for v in ds.PixelSpacing] == [0.25, 0.25] and "ImageOrientationPatient" not in ds
    [plane] = plane_geometries(ds)
    assert plane.spacing == (0.5, 0.5) and plane.spacing_kind is SpacingKind.DETECTOR
    assert plane.orientation is None and plane.position is None and plane.centre() is None


def test_oblique_centre_and_normal_by_hand() -> None:
    row, column = (0.6, 0.8, 0.0), (0.48, -0.36, 0.8)  # orthonormal, oblique to every axis but one
    plane = PlaneGeometry(rows=3, columns=5, spacing=(2.0, 1.0), spacing_kind=SpacingKind.PATIENT,
                          orientation=(*row, *column), position=(10.0, 20.0, 30.0), frame_of_reference_uid=None)
    # centre index (1, 2): IPP + 2 columns * 1 mm * row + 1 row * 2 mm * column
    np.testing.assert_allclose(plane.centre(), [10 + 1.2 + 0.96, 20 + 1.6 - 0.72, 30 + 1.6], atol=1e-12)
    np.testing.assert_allclose(plane.normal(), [0.64, -0.48, -0.6], atol=1e-12)
    assert plane.slice_position() == pytest.approx(6.4 - 9.6 - 18.0, abs=1e-12)
    moved = plane.moved_to(5.0)
    assert moved.slice_position() == pytest.approx(5.0, abs=1e-12)
    np.testing.assert_allclose(moved.pixel_to_patient(0, 0) - plane.pixel_to_patient(0, 0),
                               26.2 * plane.normal(), atol=1e-12)


def test_as_dict_is_json_and_reads_back() -> None:
    plane = PlaneGeometry(rows=3, columns=5, spacing=(0.7, 0.9), spacing_kind=SpacingKind.PATIENT,
                          orientation=AXIAL, position=(1.0, 2.0, 3.0), frame_of_reference_uid="1.2.3")
    assert PlaneGeometry.from_dict(json.loads(json.dumps(plane.as_dict()))) == plane
    bare = PlaneGeometry(rows=3, columns=5, spacing=None, spacing_kind=SpacingKind.NONE,
                         orientation=None, position=None, frame_of_reference_uid=None)
    assert PlaneGeometry.from_dict(json.loads(json.dumps(bare.as_dict()))) == bare
    with pytest.raises(ValueError, match="Orientation"):
        bare.normal()
    with pytest.raises(ValueError, match="Position"):
        bare.pixel_to_patient(0, 0)


@pytest.mark.parametrize("spacing", [[0, 0.5], [-0.5, 0.5], ["nan", 0.5], [0.5], "abc\\0.5", [0.5, "inf"]])
def test_unusable_spacing_is_none(spacing: str | list[object]) -> None:
    [plane] = plane_geometries(_raw(PixelSpacing=spacing))
    assert plane.spacing is None and plane.spacing_kind is SpacingKind.NONE
    assert plane.orientation == AXIAL  # the rest is still read


@pytest.mark.parametrize("orientation", [[0, 0, 0, 0, 1, 0], [1, 0, 0, 1, 0, 0], [1, 0, 0, 0.2, 1, 0],
                                         [1, 0, 0, 0, 1], "1\\0\\0\\0\\x\\0", [1, 0, 0, 0, "nan", 0]])
def test_degenerate_orientation_is_none(orientation: str | list[object]) -> None:
    [plane] = plane_geometries(_raw(ImageOrientationPatient=orientation))
    assert plane.orientation is None and plane.slice_position() is None and plane.centre() is None
    assert plane.spacing == (0.5, 0.5) and plane.position == (1.0, 2.0, 3.0)


def test_malformed_bytes_never_raise() -> None:
    ds = _raw()
    ds._dict[Tag(0x00200032)] = RawDataElement(Tag(0x00200032), "DS", 7, b"1\\nan\\", 0, True, True)
    ds._dict[Tag(0x00280008)] = RawDataElement(Tag(0x00280008), "IS", 3, b"x-1", 0, True, True)
    [plane] = plane_geometries(ds)
    assert plane.position is None and plane.spacing == (0.5, 0.5)
    ds._dict[Tag(0x00280010)] = RawDataElement(Tag(0x00280010), "US", 1, b"\x01", 0, True, True)  # odd length
    assert plane_geometries(ds) == []  # no readable Rows: no image
    assert plane_geometries(Dataset()) == []


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _image(rows: int, columns: int, **values: object) -> Dataset:
    ds = _item(**values)
    ds.Rows, ds.Columns = rows, columns
    return ds


def _raw(**override: str | list[object]) -> Dataset:
    """An axial 4x4 image whose DS values are given as raw bytes, so malformed ones reach the reader untouched."""
    values: dict[str, str | list[object]] = {"PixelSpacing": [0.5, 0.5], "ImageOrientationPatient": list(AXIAL),
                                 "ImagePositionPatient": [1, 2, 3], **override}
    ds = _image(rows=4, columns=4)
    for keyword, value in values.items():
        text = value if isinstance(value, str) else "\\".join(str(v) for v in value)
        tag = Tag(keyword)
        ds._dict[tag] = RawDataElement(tag, "DS", len(text), text.encode(), 0, True, True)
    return ds
