"""Derived headers on real images: written as Part 10, read back, and checked element by element."""

from __future__ import annotations

import copy
import dataclasses
import io
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from archive.dicom.derive import (
    attach_pixels,
    derive_header,
    derived_instance_uid,
    derived_series_uid,
    params_sha256,
)
from archive.dicom.geometry import PlaneGeometry, plane_geometries
from archive.normalize.grid import Interpolation, SpacingKind
from tests.conftest import shared_data

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
SERIES_UID = "2.25.1111"
INSTANCE_UID = "2.25.2222"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
PARAMS = {"profile": "ct", "rows": 512, "columns": 512, "spacing_mm": 0.9765625, "interpolation": Interpolation.AREA}


def _read(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def _shared(tmp_path: Path, relative: str) -> Dataset:
    """A private copy of one shared file, read."""
    target = tmp_path / Path(relative).name
    target.write_bytes((shared_data() / relative).read_bytes())
    return _read(target)


def _testfile(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return pydicom.dcmread(path)


def _position(plane: PlaneGeometry) -> np.ndarray:
    assert plane.position is not None
    return np.asarray(plane.position, dtype=np.float64)


def _moved(plane: PlaneGeometry, offset: np.ndarray, **changes: object) -> PlaneGeometry:
    """``plane`` with its first pixel moved by ``offset`` (LPS mm) and other fields changed."""
    x, y, z = (float(v) for v in _position(plane) + offset)
    return dataclasses.replace(plane, position=(x, y, z), **changes)  # type: ignore[arg-type]


def _round_trip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _derive(source: Dataset, planes: Sequence[PlaneGeometry], sources: Sequence[Dataset] | None = None,
            **changes: object) -> Dataset:
    arguments: dict[str, object] = {
        "series_uid": SERIES_UID,
        "sop_instance_uid": INSTANCE_UID,
        "sources": sources if sources is not None else [source],
        "profile": "test",
        "description": "AREA 512x512 -> 400x400, pad-crop",
        "series_number": 1001,
        "series_description": "normalized",
        "instance_number": 7,
    }
    return derive_header(source, planes=planes, **{**arguments, **changes})  # type: ignore[arg-type]


def _pattern(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    info = np.iinfo(dtype)
    values = np.arange(int(np.prod(shape)), dtype=np.int64) % min(int(info.max), 4000)
    return values.reshape(shape).astype(dtype)


def _check_derived(derived: Dataset, source: Dataset, sources: Sequence[Dataset]) -> None:
    """What every derived instance must say, whatever the modality."""
    assert derived.SOPInstanceUID == INSTANCE_UID == derived.file_meta.MediaStorageSOPInstanceUID
    assert derived.SeriesInstanceUID == SERIES_UID
    assert derived.StudyInstanceUID == source.StudyInstanceUID
    assert derived.SOPClassUID == source.SOPClassUID == derived.file_meta.MediaStorageSOPClassUID
    assert derived.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    if source.SOPClassUID == SEGMENTATION:
        assert list(derived.ImageType) == ["DERIVED", "PRIMARY"]  # the only Image Type a SEG may have
    else:
        assert list(derived.ImageType) == ["DERIVED", "SECONDARY", *list(source.ImageType)[2:]]
    assert derived.SeriesNumber == 1001 and derived.InstanceNumber == 7
    assert derived.SeriesDescription == "normalized"
    assert derived.DerivationDescription.startswith("medarchive profile test: AREA")
    code = derived.DerivationCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113085", "DCM")
    assert [item.ReferencedSOPInstanceUID for item in derived.SourceImageSequence] == [s.SOPInstanceUID for s in sources]
    for item in derived.SourceImageSequence:
        assert item.ReferencedSOPClassUID == source.SOPClassUID
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
    series = {item.SeriesInstanceUID: item for item in derived.ReferencedSeriesSequence}
    assert source.SeriesInstanceUID in series
    referenced = {item.ReferencedSOPInstanceUID for item in series[source.SeriesInstanceUID].ReferencedInstanceSequence}
    assert {s.SOPInstanceUID for s in sources} <= referenced
    for keyword in ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PhotometricInterpretation",
                    "RescaleSlope", "RescaleIntercept", "LossyImageCompression", "BurnedInAnnotation"):
        assert derived.get(keyword) == source.get(keyword), keyword
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "IconImageSequence"):
        assert keyword not in derived, keyword
    assert not [tag for tag in list(derived.keys()) if 0x6000 <= tag.group <= 0x601E]  # overlays describe the old pixels
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "ImagePositionPatient", "SliceLocation", "SliceThickness",
                    "SpacingBetweenSlices"):
        if keyword in derived:
            raw = derived[keyword].value
            for text in (raw if isinstance(raw, Sequence) and not isinstance(raw, str) else [raw]):
                assert len(str(text)) <= 16, (keyword, text)  # DS (PS3.5 6.2)


def test_params_hash_is_canonical() -> None:
    assert params_sha256(PARAMS) == params_sha256(dict(reversed(list(PARAMS.items()))))
    assert params_sha256(PARAMS) == params_sha256({**PARAMS, "interpolation": "area"})  # Enums hash as their values
    assert params_sha256(PARAMS) != params_sha256({**PARAMS, "spacing_mm": 0.9765626})
    assert re.fullmatch(r"[0-9a-f]{64}", params_sha256(PARAMS))
    with pytest.raises(TypeError):
        params_sha256({"path": Path("/x")})


def test_derived_uids_are_deterministic_valid_and_distinct() -> None:
    source = "1.3.6.1.4.1.14519.5.2.1.99.1071.22924751370519716386594233678631"
    sha = params_sha256(PARAMS)
    uid = derived_instance_uid(source, sha, "1.0")
    assert uid == derived_instance_uid(source, sha, "1.0")
    others = {
        derived_instance_uid(source, params_sha256({**PARAMS, "rows": 256}), "1.0"),
        derived_instance_uid(source, sha, "1.1"),
        derived_instance_uid(source + "1", sha, "1.0"),
        derived_instance_uid(source, sha, "1.0", index=0),
        derived_instance_uid(source, sha, "1.0", index=1),
        derived_series_uid(source, sha, "1.0"),
    }
    assert uid not in others and len(others) == 6
    for value in {uid, *others}:
        assert len(value) <= 64 and UID_PATTERN.fullmatch(value), value


def test_ct_in_plane(tmp_path: Path) -> None:
    source = _shared(tmp_path, "ct-chest-tcia/A002304/axial/19001231-076.dcm")
    source.SmallestImagePixelValue = 0  # pixel-dependent elements the derived image must not inherit
    source.add_new(0x60003000, "OW", b"\x00" * 8)
    before = copy.deepcopy(source)
    original = plane_geometries(source)[0]
    assert original.spacing_kind is SpacingKind.PATIENT
    plane = _moved(original, np.array([-20.0, -10.5, 0.0]), rows=400, columns=400, spacing=(1.25, 1.25))
    position = _position(plane)
    derived = _derive(source, [plane], pad_value=-1024)
    assert "PixelData" not in derived
    pixels = _pattern((400, 400), "<i2") - 1024
    attach_pixels(derived, pixels)
    back = _round_trip(derived)

    _check_derived(back, source, [source])
    assert source == before  # the source is left as it was
    assert (back.Rows, back.Columns) == (400, 400) and "NumberOfFrames" not in back
    assert [float(v) for v in back.PixelSpacing] == [1.25, 1.25]
    assert np.allclose([float(v) for v in back.ImagePositionPatient], position, atol=1e-6)
    assert list(back.ImageOrientationPatient) == list(source.ImageOrientationPatient)
    assert back.SliceLocation == source.SliceLocation  # in-plane: unmoved along the normal
    assert back.SliceThickness == source.SliceThickness  # not given: kept
    assert back.PixelPaddingValue == -1024 and back["PixelPaddingValue"].VR == "SS"
    assert Tag(0x60003000) not in back and "SmallestImagePixelValue" not in back
    assert back.pixel_array.dtype == np.int16 and np.array_equal(back.pixel_array, pixels)
    assert plane_geometries(back) == [dataclasses.replace(plane, orientation=original.orientation)]
    assert any(element.tag.is_private for element in back)  # private headers travel with the copy


def test_mr_resampled_across_slices(tmp_path: Path) -> None:
    folder = "mr-siemens-prisma/8_gre_fm_siemens_baseline"
    sources = [_shared(tmp_path, f"{folder}/{index:03d}_e2_ph.dcm") for index in (1, 2, 3)]
    source = sources[1]
    original = plane_geometries(source)[0]
    shift = 1.5
    plane = _moved(original, shift * original.normal(), rows=32, columns=48, spacing=(2.0, 2.0))
    derived = _derive(source, [plane], sources, slice_thickness=2.0, spacing_between_slices=2.0, pad_value=0)
    pixels = _pattern((32, 48), "<u2")
    attach_pixels(derived, pixels)
    back = _round_trip(derived)

    _check_derived(back, source, sources)
    assert len(back.SourceImageSequence) == 3 and len(back.ReferencedSeriesSequence) == 1
    assert float(back.SliceLocation) == pytest.approx(float(source.SliceLocation) + shift, abs=1e-4)
    assert float(back.SliceThickness) == 2.0 and float(back.SpacingBetweenSlices) == 2.0
    assert back.PixelPaddingValue == 0 and back["PixelPaddingValue"].VR == "US"
    assert [float(v) for v in back.PixelSpacing] == [2.0, 2.0]
    assert np.allclose(_position(plane_geometries(back)[0]), _position(plane), atol=1e-4)
    assert np.array_equal(back.pixel_array, pixels)


def test_mammography_keeps_detector_spacing(tmp_path: Path) -> None:
    source = _shared(tmp_path, "misc-barre/MG_Explicit_Little.dcm")
    original = plane_geometries(source)[0]
    assert original.spacing_kind is SpacingKind.DETECTOR and original.spacing == (0.5, 0.5)
    plane = dataclasses.replace(original, rows=256, columns=200, spacing=(1.0, 1.25))
    derived = _derive(source, [plane])
    pixels = _pattern((256, 200), "u1")
    attach_pixels(derived, pixels)
    back = _round_trip(derived)

    _check_derived(back, source, [source])
    assert [float(v) for v in back.ImagerPixelSpacing] == [1.0, 1.25]  # scaled, never relabelled
    assert [float(v) for v in back.PixelSpacing] == [0.5, 0.625]  # the calibrated spacing, scaled alike
    for keyword in ("EstimatedRadiographicMagnificationFactor", "PixelSpacingCalibrationType"):
        assert back[keyword].value == source[keyword].value
    assert "ImagePositionPatient" not in back
    assert back["PixelData"].VR == "OB" and np.array_equal(back.pixel_array, pixels)
    assert plane_geometries(back)[0].spacing_kind is SpacingKind.DETECTOR


def test_without_spacing_no_spacing_is_written(tmp_path: Path) -> None:
    source = _shared(tmp_path, "misc-barre/MG_Explicit_Little.dcm")
    plane = dataclasses.replace(plane_geometries(source)[0], rows=100, columns=100, spacing=None,
                                spacing_kind=SpacingKind.NONE)
    derived = _derive(source, [plane], series_number=None, series_description=None, instance_number=None)
    attach_pixels(derived, np.zeros((100, 100), np.uint8))
    back = _round_trip(derived)
    for keyword in ("SeriesNumber", "SeriesDescription", "InstanceNumber"):  # never the source's, type 2 kept
        assert keyword in back and back[keyword].value in (None, ""), keyword
    assert "PixelSpacing" not in back and "ImagerPixelSpacing" not in back
    assert plane_geometries(back)[0].spacing_kind is SpacingKind.NONE


def test_classic_multiframe() -> None:
    mr = _testfile("emri_small.dcm")  # 10 frames, no functional groups
    planes = [dataclasses.replace(plane, rows=32, columns=32) for plane in plane_geometries(mr)]
    derived = _derive(mr, planes)
    frames = _pattern((10, 32, 32), "<u2")
    attach_pixels(derived, frames)
    back = _round_trip(derived)
    _check_derived(back, mr, [mr])
    assert back.NumberOfFrames == 10 and np.array_equal(back.pixel_array, frames)


def test_colour_big_endian_planar_source(tmp_path: Path) -> None:
    source = _shared(tmp_path, "misc-barre/US_Explicit_Big_RGB.dcm")
    assert source.PlanarConfiguration == 1 and source.original_encoding == (False, False)
    plane = dataclasses.replace(plane_geometries(source)[0], rows=20, columns=30)
    derived = _derive(source, [plane])
    pixels = _pattern((20, 30, 3), "u1")
    attach_pixels(derived, pixels)
    back = _round_trip(derived)
    _check_derived(back, source, [source])
    assert back.PlanarConfiguration == 0 and back.SamplesPerPixel == 3
    assert np.array_equal(back.pixel_array, pixels)
    assert back.PatientName == source.PatientName  # big-endian header elements re-encoded, not copied as bytes


def test_ycbcr_422_becomes_full_when_native() -> None:
    source = _testfile("color3d_jpeg_baseline.dcm")
    assert source.PhotometricInterpretation == "YBR_FULL_422"
    plane = dataclasses.replace(plane_geometries(source)[0], rows=16, columns=16)
    derived = _derive(source, [plane, plane])
    attach_pixels(derived, _pattern((2, 16, 16, 3), "u1"))
    back = _round_trip(derived)
    assert back.PhotometricInterpretation == "YBR_FULL" and back.NumberOfFrames == 2
    assert back.pixel_array.shape == (2, 16, 16, 3)


def test_enhanced_functional_groups() -> None:
    source = _testfile("eCT_Supplemental.dcm")
    originals = plane_geometries(source)
    assert len(originals) == 2
    normal = originals[0].normal()
    planes = [_moved(originals[0], k * 4.0 * normal, rows=256, columns=256, spacing=(0.75, 0.75))
              for k in range(3)]  # resampled across frames: 3 frames at 4 mm
    derived = _derive(source, planes, slice_thickness=4.0, spacing_between_slices=4.0)
    frames = _pattern((3, 256, 256), "<u2")
    attach_pixels(derived, frames)
    back = _round_trip(derived)

    _check_derived(back, source, [source])
    assert back.NumberOfFrames == 3 and len(back.PerFrameFunctionalGroupsSequence) == 3
    assert np.array_equal(back.pixel_array, frames)
    shared = back.SharedFunctionalGroupsSequence[0]
    measures = shared.PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.75, 0.75]
    assert float(measures.SliceThickness) == 4.0 and float(measures.SpacingBetweenSlices) == 4.0
    derivation = shared.DerivationImageSequence[0]
    assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert derivation.DerivationCodeSequence[0].CodeValue == "113085"
    assert list(shared.CTImageFrameTypeSequence[0].FrameType)[:2] == ["DERIVED", "SECONDARY"]
    for index, (group, plane) in enumerate(zip(back.PerFrameFunctionalGroupsSequence, planes)):
        assert "DerivationImageSequence" not in group
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, _position(plane), atol=1e-4)
        assert group.FrameContentSequence[0].InStackPositionNumber == index + 1
        assert list(group.FrameContentSequence[0].DimensionIndexValues) == [1, index + 1]  # (stack, in-stack)
    read = plane_geometries(back)
    assert [p.spacing for p in read] == [(0.75, 0.75)] * 3
    along = [float(np.dot(_position(p), normal)) for p in read]
    assert np.allclose(along, [float(np.dot(_position(planes[0]), normal)) + 4.0 * k for k in range(3)], atol=1e-4)


def test_binary_segmentation() -> None:
    source = _testfile("liver.dcm")  # 3 frames, Bits Allocated 1
    planes = [dataclasses.replace(plane, rows=16, columns=24) for plane in plane_geometries(source)]
    derived = _derive(source, planes)
    masks = (_pattern((3, 16, 24), "u1") % 3 == 0).astype(np.uint8)
    attach_pixels(derived, masks)
    back = _round_trip(derived)
    _check_derived(back, source, [source])
    assert back.NumberOfFrames == 3 and back["PixelData"].VR == "OB"
    assert np.array_equal(back.pixel_array, masks)
    with pytest.raises(ValueError, match="0/1"):
        attach_pixels(derived, masks * 2)


def test_attach_pixels_refuses_what_the_header_does_not_say(tmp_path: Path) -> None:
    source = _shared(tmp_path, "ct-chest-tcia/A002304/axial/19001231-076.dcm")
    derived = _derive(source, [dataclasses.replace(plane_geometries(source)[0], rows=8, columns=8)])
    with pytest.raises(ValueError, match="header says"):
        attach_pixels(derived, np.zeros((8, 8), np.uint16))  # CT here is signed
    with pytest.raises(ValueError, match="header says"):
        attach_pixels(derived, np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="samples"):
        attach_pixels(derived, np.zeros((1, 8, 8, 3), np.int16))
    with pytest.raises(ValueError, match="Rows and Columns"):
        plane = plane_geometries(source)[0]
        _derive(source, [plane, dataclasses.replace(plane, rows=9)])
