"""Volumes for ML users: the NIfTI affine SimpleITK and dcm2niix compute, npz round trips, de-identification.

The series is the shared Siemens Prisma field map (40 axial slices, 64x64, 3 mm,
Rescale Slope 2 / Intercept -4096), copied, and an oblique copy of it: Image
Orientation / Position rotated together by 25 degrees about an oblique axis,
pixels unchanged, so every reader must place them in rotated space.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from archive.errors import ArchiveError
from archive.normalize.export import (
    SourceUids,
    Volume,
    VolumeError,
    deidentify,
    series_volume,
    write_nifti,
    write_npz,
)
from tests.conftest import shared_data

SERIES = "mr-siemens-prisma/8_gre_fm_siemens_baseline"
ANGLE_DEG = 25.0
AXIS = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
WORLD_TOLERANCE_MM = 1e-4  # DICOM's own decimals (positions written with 6, cosines with 8) stay well below it


def _rotation(angle_deg: float, axis: np.ndarray) -> np.ndarray:
    """Rodrigues' formula: an exact rotation matrix, independent of the code under test."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.radians(angle_deg)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


@pytest.fixture(scope="module", params=["axial", "oblique"])
def series_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp(request.param)
    for source in sorted((shared_data() / SERIES).glob("*.dcm")):
        if request.param == "axial":
            shutil.copyfile(source, target / source.name)
            continue
        ds = pydicom.dcmread(source)
        rotation = _rotation(ANGLE_DEG, AXIS)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([rotation @ iop[:3], rotation @ iop[3:]])]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in rotation @ ipp]
        ds.save_as(target / source.name)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def _datasets(folder: Path) -> list[Dataset]:
    datasets = [pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))]
    random.Random(7).shuffle(datasets)  # the order on input must not matter
    return datasets


def _sitk(folder: Path) -> tuple[sitk.Image, list[str]]:
    reader = sitk.ImageSeriesReader()
    names = list(reader.GetGDCMSeriesFileNames(str(folder)))
    reader.SetFileNames(names)
    return reader.Execute(), names


def _sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _corners(shape_xyz: tuple[int, ...]) -> np.ndarray:
    """The eight corner voxels (x, y, z, 1) as columns."""
    return np.array([[x, y, z, 1] for x in (0, shape_xyz[0] - 1) for y in (0, shape_xyz[1] - 1)
                     for z in (0, shape_xyz[2] - 1)], dtype=np.float64).T


def test_nifti_affine_and_values_match_simpleitk(series_dir: Path, tmp_path: Path) -> None:
    volume = series_volume(_datasets(series_dir))
    write_nifti(volume, tmp_path / "volume.nii.gz")
    written = nib.load(tmp_path / "volume.nii.gz")
    image, _names = _sitk(series_dir)
    reference = _sitk_affine_ras(image)
    assert written.shape == image.GetSize() == (64, 64, 40)
    corners = _corners(written.shape)
    for affine in (written.affine, written.header.get_sform()):
        assert np.max(np.abs((affine - reference) @ corners)) < WORLD_TOLERANCE_MM
    assert np.max(np.abs((written.header.get_qform() - reference) @ corners)) < 1e-3  # float32 quaternion
    header = written.header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)
    assert header.get_xyzt_units() == ("mm", "sec")
    assert (written.dataobj.slope, written.dataobj.inter) == (2.0, -4096.0)  # nibabel moves them off the header
    stored = np.asanyarray(written.dataobj.get_unscaled())
    assert stored.dtype == volume.data.dtype == np.uint16
    assert np.array_equal(stored, volume.data.transpose(2, 1, 0))
    # SimpleITK applies the rescale and indexes its array (z, y, x): the same voxels, independently read
    assert np.array_equal(written.get_fdata(), sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float64))
    assert np.ptp(stored) > 1000  # a real image, not a blank one


def test_nifti_agrees_with_dcm2niix(series_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dcm2niix"
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-f", "%s", "-o", str(out), str(series_dir)],
                   check=True, capture_output=True, timeout=60)
    [theirs_path] = list(out.glob("*.nii"))
    theirs = nib.load(theirs_path)
    volume = series_volume(_datasets(series_dir))
    write_nifti(volume, tmp_path / "ours.nii")
    ours = nib.load(tmp_path / "ours.nii")
    assert ours.shape == theirs.shape
    rng = np.random.default_rng(3)
    samples = np.vstack([rng.integers(0, n, 300) for n in ours.shape] + [np.ones(300)])
    voxels = np.hstack([_corners(ours.shape), samples])
    # where our voxels sit in dcm2niix's index space (it flips rows, among others): on its voxel centres
    in_theirs = np.linalg.inv(theirs.affine) @ ours.affine @ voxels
    assert np.max(np.abs(in_theirs - np.rint(in_theirs))) < 1e-3  # voxels, far below the half a voxel
    index = np.rint(in_theirs[:3]).astype(int)
    assert np.all((index >= 0) & (index < np.array(theirs.shape)[:, None]))
    ours_values = ours.get_fdata()[tuple(voxels[:3].astype(int))]
    assert np.array_equal(ours_values, theirs.get_fdata()[tuple(index)])
    assert len(np.unique(ours_values)) > 50


def test_npz_round_trip_and_sidecar(series_dir: Path, tmp_path: Path) -> None:
    volume = series_volume(_datasets(series_dir))
    sidecar_path = write_npz(volume, tmp_path / "volume.npz")
    assert sidecar_path == tmp_path / "volume.json"
    with np.load(tmp_path / "volume.npz") as loaded:
        assert loaded["image"].dtype == volume.data.dtype and np.array_equal(loaded["image"], volume.data)
        assert (float(loaded["rescale_slope"]), float(loaded["rescale_intercept"])) == (2.0, -4096.0)
        assert np.array_equal(loaded["affine_ras"], volume.affine_ras())
    sidecar = json.loads(sidecar_path.read_text())
    image, names = _sitk(series_dir)
    assert sidecar["shape"] == [40, 64, 64] and sidecar["axis_order"] == ["slice", "row", "column"]
    assert np.allclose(sidecar["spacing"], image.GetSpacing(), rtol=0, atol=1e-6)
    assert np.allclose(sidecar["origin"], image.GetOrigin(), rtol=0, atol=1e-6)
    assert np.allclose(sidecar["direction"], image.GetDirection(), rtol=0, atol=1e-6)
    assert np.allclose(sidecar["affine_ras"], _sitk_affine_ras(image), rtol=0, atol=1e-6)
    assert sidecar["rescale"] == {"slope": 2.0, "intercept": -4096.0}
    # slice order = GDCM's order along the normal, and the image's first slice is SimpleITK's
    expected = [str(pydicom.dcmread(name, stop_before_pixels=True).SOPInstanceUID) for name in names]
    assert sidecar["source"]["sop_instance_uids"] == expected
    first = pydicom.dcmread(names[0], stop_before_pixels=True)
    assert sidecar["source"]["series_instance_uid"] == first.SeriesInstanceUID
    assert sidecar["source"]["study_instance_uid"] == first.StudyInstanceUID


def _axial() -> list[Dataset]:
    """The first six slices, read straight into memory (nothing is written back)."""
    return [pydicom.dcmread(path) for path in sorted((shared_data() / SERIES).glob("*.dcm"))[:6]]


def test_irregular_series_are_refused_with_a_reason(tmp_path: Path) -> None:
    cases: dict[str, list[Dataset]] = {}
    cases["uneven slice spacing"] = [ds for i, ds in enumerate(_axial()) if i != 3]
    tilted = _axial()
    tilted[2].ImageOrientationPatient = [1, 0, 0, 0, 0.98, 0.199]
    cases["mixed orientations"] = tilted
    duplicate = _axial()
    duplicate[4].ImagePositionPatient = duplicate[3].ImagePositionPatient
    cases["duplicate slice positions"] = duplicate
    sheared = _axial()
    for i, ds in enumerate(sheared):
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]) + 0.5 * i,
                                   float(ds.ImagePositionPatient[2])]
    cases["off the normal"] = sheared
    matrix = _axial()
    matrix[1].PixelSpacing = [3.0, 3.0]
    cases["mixed pixel spacing"] = matrix
    mixed = _axial()
    mixed[0].SeriesInstanceUID = "1.2.3"
    cases["2 series"] = mixed
    for reason, datasets in cases.items():
        with pytest.raises(VolumeError, match=reason) as raised:
            series_volume(datasets)
        assert isinstance(raised.value, ArchiveError) and isinstance(raised.value, ValueError)


def test_one_slice_is_a_volume_with_slice_thickness_as_depth(tmp_path: Path) -> None:
    volume = series_volume(_axial()[:1])
    assert volume.data.shape == (1, 64, 64) and volume.spacing == (3.28125, 3.28125, 3.0)
    assert np.allclose(volume.direction, np.eye(3), atol=1e-9)


def test_per_slice_rescale_becomes_modality_values(tmp_path: Path) -> None:
    datasets = _axial()
    datasets[2].RescaleSlope = 4
    volume = series_volume(datasets)
    assert volume.data.dtype == np.float32 and (volume.rescale_slope, volume.rescale_intercept) == (1.0, 0.0)
    order = np.argsort([float(ds.ImagePositionPatient[2]) for ds in datasets])
    expected = [ds.pixel_array * (4.0 if i == 2 else 2.0) - 4096 for i, ds in enumerate(datasets)]
    assert np.array_equal(volume.data, np.stack([expected[i] for i in order]).astype(np.float32))


def _snapshot(datasets: list[Dataset]) -> list[Dataset]:
    return [copy.deepcopy(ds) for ds in datasets]


def test_deidentify_basic_profile(tmp_path: Path) -> None:
    datasets = _axial()
    originals = _snapshot(datasets)
    reference = Dataset()
    reference.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    reference.PatientName = "Nested^Name"
    datasets[1].ReferencedSeriesSequence = DicomSequence([reference])  # UIDs and names inside kept sequences too
    originals[1].ReferencedSeriesSequence = DicomSequence([copy.deepcopy(reference)])

    result = deidentify(datasets)

    assert all(a == b for a, b in zip(datasets, originals, strict=True))  # the sources are untouched
    assert all(a is not b for a, b in zip(datasets, result, strict=True))
    source = originals[0]
    for ds in result:
        assert str(ds.get("PatientName") or "") in ("", "ANONYMIZED") and "acdc" not in str(ds.get("PatientName"))
        assert str(ds.get("PatientID") or "") in ("", "ANONYMIZED")
        for keyword in ("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            assert str(ds.get(keyword) or "") in ("", "00010101"), keyword
        for keyword in ("InstitutionName", "ReferringPhysicianName", "DeviceSerialNumber"):
            assert str(ds.get(keyword) or "") in ("", "ANONYMIZED"), keyword
        assert not any(element.tag.is_private for element in ds)
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
            assert ds[keyword].value != source[keyword].value and pydicom.uid.UID(ds[keyword].value).is_valid
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):  # consistent across the series
        assert len({ds[keyword].value for ds in result}) == 1, keyword
    assert len({ds.SOPInstanceUID for ds in result}) == len(result)
    nested = result[1].ReferencedSeriesSequence[0]
    assert nested.SeriesInstanceUID == result[0].SeriesInstanceUID and "Nested" not in str(nested.get("PatientName"))
    again = deidentify(datasets)
    assert again[0].StudyInstanceUID != result[0].StudyInstanceUID  # exports cannot be linked by their UIDs

    # the exported volume: same grid and voxels, the new UIDs
    before, after = series_volume(originals), series_volume(result)
    assert np.array_equal(before.data, after.data) and np.array_equal(before.affine_ras(), after.affine_ras())
    assert after.source_uids.series_instance_uid == result[0].SeriesInstanceUID
    new_of_old = {a.SOPInstanceUID: b.SOPInstanceUID for a, b in zip(originals, result, strict=True)}
    assert after.source_uids.sop_instance_uids == tuple(new_of_old[u] for u in before.source_uids.sop_instance_uids)


def test_volume_affines_are_lps_and_ras() -> None:
    direction = _rotation(30.0, np.array([0.0, 0.0, 1.0]))
    volume = Volume(data=np.zeros((2, 3, 4), np.int16), rescale_slope=1.0, rescale_intercept=0.0,
                    spacing=(0.5, 0.7, 2.0), origin=(10.0, -20.0, 30.0), direction=direction,
                    source_uids=SourceUids("1.2", "1.2.3", ("1.2.3.1", "1.2.3.2")))
    voxel = np.array([3.0, 2.0, 1.0, 1.0])  # column 3, row 2, slice 1
    lps = np.array([10.0, -20.0, 30.0]) + direction @ (np.array([3.0, 2.0, 1.0]) * [0.5, 0.7, 2.0])
    assert np.allclose(volume.affine_lps() @ voxel, [*lps, 1.0])
    assert np.allclose(volume.affine_ras() @ voxel, [-lps[0], -lps[1], lps[2], 1.0])
