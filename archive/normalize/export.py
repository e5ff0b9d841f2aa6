"""One series as one volume for ML users: NIfTI (RAS, as nibabel expects) or npz with a JSON sidecar, optionally de-identified.

A volume needs a regular grid: one orientation, one matrix, slices evenly spaced
along the normal. Geometry comes from Image Position / Orientation (Patient) and
Pixel Spacing (PS3.3 C.7.6.2), never from Slice Thickness, so the affine is the
one SimpleITK and dcm2niix compute from the same files. Sample values stay the
stored ones; Rescale Slope / Intercept travel beside them (NIfTI ``scl_slope`` /
``scl_inter``, npz keys), as dcm2niix does.
"""

from __future__ import annotations

import copy
import gzip
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from archive.errors import ArchiveError

# Relative tolerance on slice gaps (and on the lateral drift of positions off the normal): beyond it the
# slices do not form a regular grid and an affine would misplace them.
SPACING_TOLERANCE = 0.01
_ORIENTATION_TOLERANCE = 1e-4  # direction cosines; DICOM writes them with ~6 decimals
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# NIFTI_XFORM_SCANNER_ANAT for both qform and sform: the affine is the scanner's patient coordinates (DICOM's),
# which is what dcm2niix writes, so the two files agree header for header.
_NIFTI_XFORM_SCANNER = 1
# The newest PS3.15 Table E.1-1 the dicom-anonymizer library ships.
DEIDENTIFICATION_TABLE = "dicomfields_2026c"


class VolumeError(ArchiveError, ValueError):
    """The datasets do not form one regular volume (mixed series, orientation or matrix, uneven or duplicate slices)."""


@dataclass(frozen=True)
class SourceUids:
    """Where a volume came from: its study, its series and each slice's instance, in slice order."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"study_instance_uid": self.study_instance_uid, "series_instance_uid": self.series_instance_uid,
                "sop_instance_uids": list(self.sop_instance_uids)}


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: compare fields explicitly
class Volume:
    """A regular grid of slices in ITK's conventions (LPS, index order x = column, y = row, z = slice).

    ``data`` is (slices, rows, columns) in stored values with the original dtype;
    modality values are ``data * rescale_slope + rescale_intercept``. ``direction``
    holds the axes as columns: the row direction cosines (increasing column index),
    the column direction cosines (increasing row index) and the slice direction
    (increasing slice index, i.e. the normal when slices are sorted along it).
    """

    data: np.ndarray
    rescale_slope: float
    rescale_intercept: float
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    source_uids: SourceUids

    def affine_lps(self) -> np.ndarray:
        """Voxel (x = column, y = row, z = slice) to LPS mm of its centre."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * np.asarray(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    def affine_ras(self) -> np.ndarray:
        """The same in RAS, the convention of NIfTI and nibabel."""
        affine: np.ndarray = _LPS_TO_RAS @ self.affine_lps()
        return affine

    def sidecar(self) -> dict[str, Any]:
        """What a reader needs besides the array: the JSON written next to an npz volume."""
        return {
            "shape": list(self.data.shape),
            "axis_order": ["slice", "row", "column"],
            "dtype": str(self.data.dtype),
            "coordinate_system": "LPS",
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": [float(v) for v in self.direction.reshape(-1)],  # row-major, as SimpleITK's GetDirection
            "index_order": ["column", "row", "slice"],  # of spacing, origin's voxel and direction's columns
            "affine_lps": self.affine_lps().tolist(),
            "affine_ras": self.affine_ras().tolist(),
            "rescale": {"slope": self.rescale_slope, "intercept": self.rescale_intercept},
            "source": self.source_uids.as_dict(),
        }


@dataclass(frozen=True)
class _Slice:
    dataset: Dataset
    row_cosines: np.ndarray
    column_cosines: np.ndarray
    position: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns)


def _floats(ds: Dataset, keyword: str, count: int) -> np.ndarray:
    value = ds.get(keyword)
    try:
        numbers = np.asarray([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        numbers = None
    if numbers is None or numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise VolumeError(f"instance {ds.get('SOPInstanceUID')} has no usable {keyword} ({value!r}): "
                          "a volume needs the position, orientation and spacing of every slice")
    return numbers


def _slice(ds: Dataset) -> _Slice:
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise VolumeError(f"instance {ds.get('SOPInstanceUID')} is multi-frame: export takes single-frame slices")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise VolumeError(f"instance {ds.get('SOPInstanceUID')} is colour: a volume holds one sample per voxel")
    orientation = _floats(ds, "ImageOrientationPatient", 6)
    spacing = _floats(ds, "PixelSpacing", 2)
    if np.any(spacing <= 0):
        raise VolumeError(f"instance {ds.get('SOPInstanceUID')} has Pixel Spacing {list(spacing)}: not a grid")
    row, column = orientation[:3], orientation[3:]
    norms = np.linalg.norm(row), np.linalg.norm(column)
    if min(norms) < 0.5:
        raise VolumeError(f"instance {ds.get('SOPInstanceUID')} has degenerate orientation {list(orientation)}")
    return _Slice(ds, row / norms[0], column / norms[1], _floats(ds, "ImagePositionPatient", 3),
                  (float(spacing[0]), float(spacing[1])))


def _rescale(ds: Dataset) -> tuple[float, float]:
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    return (float(slope) if slope not in (None, "") else 1.0,
            float(intercept) if intercept not in (None, "") else 0.0)


def _uid(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword) or "")


def _check_one_grid(slices: Sequence[_Slice]) -> None:
    first = slices[0]
    series = {_uid(s.dataset, "SeriesInstanceUID") for s in slices}
    if len(series) > 1:
        raise VolumeError(f"the datasets belong to {len(series)} series: a volume is one series")
    instances = [_uid(s.dataset, "SOPInstanceUID") for s in slices]
    if len(set(instances)) < len(instances):
        raise VolumeError("the same SOP Instance UID occurs twice: a volume holds each slice once")
    for other in slices[1:]:
        uid = _uid(other.dataset, "SOPInstanceUID")
        if (np.max(np.abs(other.row_cosines - first.row_cosines)) > _ORIENTATION_TOLERANCE
                or np.max(np.abs(other.column_cosines - first.column_cosines)) > _ORIENTATION_TOLERANCE):
            raise VolumeError(f"mixed orientations in one series (instance {uid}): no single volume grid")
        if (int(other.dataset.Rows), int(other.dataset.Columns)) != (int(first.dataset.Rows), int(first.dataset.Columns)):
            raise VolumeError(f"mixed matrix in one series (instance {uid}: {other.dataset.Rows}x"
                              f"{other.dataset.Columns}, first {first.dataset.Rows}x{first.dataset.Columns})")
        if not np.allclose(other.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=0):
            raise VolumeError(f"mixed pixel spacing in one series (instance {uid}: {list(other.pixel_spacing)}, "
                              f"first {list(first.pixel_spacing)})")


def _slice_spacing(ordered: Sequence[_Slice], positions: np.ndarray, normal: np.ndarray) -> float:
    """The mean gap, after checking that every gap and the drift off the normal stay within tolerance."""
    gaps = np.diff(positions)
    spacing = float((positions[-1] - positions[0]) / (len(positions) - 1))
    if spacing <= 0 or np.min(gaps) < SPACING_TOLERANCE * spacing:
        raise VolumeError(f"duplicate slice positions (smallest gap {np.min(gaps):.4g} mm, mean {spacing:.4g} mm; "
                          "several echoes, phases or acquisitions in one series?): split the series first")
    worst = float(np.max(np.abs(gaps - spacing)))
    if worst > SPACING_TOLERANCE * spacing:
        raise VolumeError(f"uneven slice spacing: gaps from {np.min(gaps):.4g} to {np.max(gaps):.4g} mm "
                          f"(more than {SPACING_TOLERANCE:.0%} off the mean {spacing:.4g} mm): no regular grid")
    start = ordered[0].position
    drift = max(float(np.linalg.norm(s.position - start - (p - positions[0]) * normal))
                for s, p in zip(ordered, positions, strict=True))
    if drift > SPACING_TOLERANCE * spacing:
        raise VolumeError(f"slice positions drift {drift:.4g} mm off the normal (gantry tilt or a sheared stack): "
                          "an affine cannot describe it")
    return spacing


def series_volume(datasets: Sequence[Dataset]) -> Volume:
    """The volume of one series' single-frame slices (any order), sorted along the normal.

    Slices whose Rescale Slope / Intercept differ (Philips scales per slice) are
    turned into float32 modality values with slope 1 and intercept 0, since one
    pair must describe the whole array.
    """
    if not datasets:
        raise VolumeError("no datasets: a volume needs at least one slice")
    slices = [_slice(ds) for ds in datasets]
    _check_one_grid(slices)
    first = slices[0]
    normal = np.cross(first.row_cosines, first.column_cosines)
    along = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(along, kind="stable")
    ordered = [slices[i] for i in order]
    positions = along[order]
    if len(ordered) > 1:
        slice_spacing = _slice_spacing(ordered, positions, normal)
    else:
        thickness = first.dataset.get("SliceThickness")
        slice_spacing = float(thickness) if thickness not in (None, "") and float(thickness) > 0 else 1.0
    arrays = [s.dataset.pixel_array for s in ordered]
    rescales = [_rescale(s.dataset) for s in ordered]
    if len(set(rescales)) == 1:
        data = np.stack(arrays)
        slope, intercept = rescales[0]
    else:
        data = np.stack([a.astype(np.float64) * m + b for a, (m, b) in zip(arrays, rescales, strict=True)])
        data, slope, intercept = data.astype(np.float32), 1.0, 0.0
    lead = ordered[0].dataset
    return Volume(
        data=data, rescale_slope=slope, rescale_intercept=intercept,
        spacing=(first.pixel_spacing[1], first.pixel_spacing[0], slice_spacing),
        origin=(float(ordered[0].position[0]), float(ordered[0].position[1]), float(ordered[0].position[2])),
        direction=np.column_stack([first.row_cosines, first.column_cosines, normal]),
        source_uids=SourceUids(_uid(lead, "StudyInstanceUID"), _uid(lead, "SeriesInstanceUID"),
                               tuple(_uid(s.dataset, "SOPInstanceUID") for s in ordered)),
    )


def write_nifti(volume: Volume, path: Path) -> None:
    """A NIfTI-1 file (``.nii`` or ``.nii.gz``) with the stored values and the rescale as ``scl_slope`` / ``scl_inter``.

    The header and the array are written explicitly: nibabel's image writer
    replaces any slope in the header with one of its own choosing.
    """
    import nibabel as nib  # heavy: only exports need it
    from nibabel.volumeutils import array_to_file

    xyz = np.transpose(volume.data, (2, 1, 0))  # (x = column, y = row, z = slice) as nibabel and ITK index
    affine = volume.affine_ras()
    header = nib.Nifti1Header()
    header.set_data_dtype(xyz.dtype)
    header.set_data_shape(xyz.shape)
    header.set_qform(affine, code=_NIFTI_XFORM_SCANNER)
    header.set_sform(affine, code=_NIFTI_XFORM_SCANNER)
    header.set_xyzt_units(xyz="mm", t="sec")
    header.set_slope_inter(volume.rescale_slope, volume.rescale_intercept)
    header.set_data_offset(header.single_vox_offset)
    header["descrip"] = f"medarchive series {volume.source_uids.series_instance_uid}"[:80]
    with (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")) as stream:
        header.write_to(stream)
        array_to_file(xyz, stream, xyz.dtype, offset=header.get_data_offset(), order="F")


def write_npz(volume: Volume, path: Path) -> Path:
    """``image`` (slices, rows, columns) in stored values plus the rescale; the geometry in a JSON sidecar.

    Returns the sidecar's path, ``path`` with the suffix ``.json``.
    """
    with open(path, "wb") as stream:  # a file object: numpy would otherwise append ".npz" to the name
        np.savez_compressed(stream, image=volume.data, rescale_slope=np.float64(volume.rescale_slope),
                            rescale_intercept=np.float64(volume.rescale_intercept), affine_ras=volume.affine_ras())
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps(volume.sidecar(), indent=2) + "\n")
    return sidecar


_LIBRARY_LOCK = threading.Lock()  # the library keeps its UID map in a module global, swapped per call below


def deidentify(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Copies of ``datasets`` under the PS3.15 Annex E Basic Application Level Confidentiality Profile.

    The rules are the dicom-anonymizer library's (Table E.1-1, private tags
    removed). Two things it leaves to its caller are done here: its UID map is a
    process-wide global, so each call gets a fresh one (the same original UID
    becomes the same new UID across this export, and unlinkable to any other);
    and it applies the rules to the top level only, so every item of the
    sequences it keeps is de-identified too (Annex E applies them wherever the
    attributes occur). Pixel data are not inspected for burned-in text.
    """
    # heavy: only exports need it
    from dicomanonymizer import simpledicomanonymizer as library  # type: ignore[import-untyped]

    rules: dict[Any, Any] = library.initialize_actions(DEIDENTIFICATION_TABLE)

    def fresh_rules() -> dict[Any, Any]:
        return dict(rules)

    copies = [copy.deepcopy(ds) for ds in datasets]
    with _LIBRARY_LOCK:
        if not isinstance(getattr(library, "dictionary", None), dict):
            raise TypeError("dicom-anonymizer no longer keeps its UID map in `dictionary`: check deidentify()")
        saved, library.dictionary = library.dictionary, {}
        try:
            for ds in copies:
                _anonymize_tree(ds, library.anonymize_dataset, fresh_rules)
        finally:
            library.dictionary = saved
    for ds in copies:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = f"PS3.15 E.1 Basic Profile, dicom-anonymizer {DEIDENTIFICATION_TABLE}"  # LO: 64
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        ds.DeidentificationMethodCodeSequence = DicomSequence([code])
    return copies


def _anonymize_tree(ds: Dataset, anonymize: Callable[..., None], rules: Callable[[], dict[Any, Any]]) -> None:
    anonymize(ds, None, True, rules)
    for element in list(ds):
        if element.VR == "SQ" and element.value is not None:
            for item in element.value:
                _anonymize_tree(item, anonymize, rules)
