"""Test data for normalization: new DICOM series derived from real files in ../shared/data.

Real scanners differ in matrix, pixel spacing, slice spacing, tilt and
orientation; the shared data has one of each at most. These generators make
the missing variants from real pixels, with geometry that stays consistent
(the anatomy stays where it is in patient coordinates, PS3.3 C.7.6.2), so a
test can check a normalized result against physics, not against the code.

Every file is a new Part 10 instance (Explicit VR Little Endian) with new
UIDs. UIDs are deterministic: they hash the generator, its arguments and the
output folder's *name* (never its full path), so a test run is reproducible
while two calls into differently named folders never collide. Private tags are
dropped: vendors keep geometry there too (Siemens CSA), and a moved slice must
not carry its old position in a private copy.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat
from scipy import ndimage  # type: ignore[import-untyped]

from tests.conftest import shared_data

CT_FOLDER = "ct-chest-tcia"
MR_SERIES = "mr-siemens-prisma/8_gre_fm_siemens_baseline"
MG_FILE = "misc-barre/MG_Explicit_Little.dcm"
DX_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
PIXEL_STATISTICS = (  # values that describe the old pixels, wrong after any change
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
)


# --- public generators ---------------------------------------------------------------------------------------------


def default_ct_source() -> Path:
    """The first ORIGINAL axial CT slice of the shared data (sorted by path)."""
    for path in sorted((shared_data() / CT_FOLDER).rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.ImageType[0] == "ORIGINAL" and np.allclose(_orientation(ds), [1, 0, 0, 0, 1, 0], atol=1e-3):
            return path
    raise FileNotFoundError(f"no ORIGINAL axial slice under {shared_data() / CT_FOLDER}")


def resampled_ct(
    out_dir: Path, *, matrix: int, spacing_mm: float, source: Path | None = None, study_uid: str | None = None
) -> list[Path]:
    """One CT slice as another scanner would store it: ``matrix`` x ``matrix`` at ``spacing_mm``, same field centre.

    Cubic spline resampling (scipy order 3) clipped to the source's value range; outside the source field the
    source's minimum (its padding, -3024 HU here). Rescale, BitsStored, Pixel Representation and the Frame of
    Reference are kept: the slice shows the same anatomy in the same place.
    """
    path = source or default_ct_source()
    ds = pydicom.dcmread(path)
    entropy = ("resampled_ct", path.parts[-3:], matrix, spacing_mm, study_uid, out_dir.name)
    study = study_uid or _uid(*entropy, "study")
    pixels = _resample_plane(ds, matrix, matrix, spacing_mm)
    out = _derived(ds, study=study, series=_uid(*entropy, "series"), instance=_uid(*entropy, "instance"))
    _set_plane(out, pixels, spacing_mm, _plane_position(ds, matrix, matrix, spacing_mm))
    out.SeriesDescription = f"synthetic {matrix}x{matrix} at {spacing_mm} mm"
    return [_write(out, out_dir / "000.dcm")]


def ct_stack(
    out_dir: Path,
    *,
    slices: int,
    spacing_mm: float,
    matrix: int = 512,
    pixel_mm: float | None = None,
    tilt_deg: float = 0.0,
    uneven: bool = False,
    duplicate: bool = False,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> list[Path]:
    """A CT series of ``slices`` slices ``spacing_mm`` apart along the normal, from one real slice.

    Slice ``k`` is the base image rolled by ``k`` rows (towards higher row index), so neighbours differ the
    way a structure crossing the slices does and linear interpolation across slices has a known answer.
    ``tilt_deg`` shears the stack as gantry tilt does: IPP also moves ``tan(tilt) * z`` along the column
    direction (Gantry/Detector Tilt set). ``uneven`` doubles the gap after slice ``slices // 2 - 1``;
    ``duplicate`` gives slice ``slices // 2`` the position and pixels of the slice before it.
    Positions along the normal are ``first + spacing * k`` (plus the extra gap), whatever the tilt.
    """
    if slices < 2 and (uneven or duplicate):
        raise ValueError("uneven and duplicate need at least 2 slices")
    ds = pydicom.dcmread(default_ct_source())
    field = float(ds.Columns) * float(ds.PixelSpacing[1])
    spacing = pixel_mm if pixel_mm is not None else field / matrix
    base = _resample_plane(ds, matrix, matrix, spacing)
    position = _plane_position(ds, matrix, matrix, spacing)
    entropy = ("ct_stack", slices, spacing_mm, matrix, pixel_mm, tilt_deg, uneven, duplicate, study_uid,
               series_uid, out_dir.name)
    study = study_uid or _uid(*entropy, "study")
    series = series_uid or _uid(*entropy, "series")
    frame = _uid(*entropy, "frame")
    orientation = _orientation(ds)
    column_dir, normal = orientation[3:], np.cross(orientation[:3], orientation[3:])
    offsets = stack_offsets(slices, spacing_mm, uneven=uneven, duplicate=duplicate)
    shear = math.tan(math.radians(tilt_deg))
    written = []
    for k, z in enumerate(offsets):
        content = k - 1 if duplicate and k == slices // 2 else k
        out = _derived(ds, study=study, series=series, instance=_uid(*entropy, "instance", k))
        out.FrameOfReferenceUID = frame
        ipp = position + z * normal + shear * z * column_dir
        _set_plane(out, np.roll(base, content, axis=0), spacing, ipp)
        out.InstanceNumber = k + 1
        out.SliceThickness = DSfloat(spacing_mm, auto_format=True)
        out.SliceLocation = DSfloat(float(ipp @ normal), auto_format=True)
        out.GantryDetectorTilt = DSfloat(tilt_deg, auto_format=True)
        out.SeriesDescription = f"synthetic stack {slices} x {spacing_mm} mm, tilt {tilt_deg}"
        written.append((float(ipp @ normal), k, _write(out, out_dir / f"{k:03d}.dcm")))
    return [p for _, _, p in sorted(written)]


def stack_offsets(slices: int, spacing_mm: float, *, uneven: bool = False, duplicate: bool = False) -> list[float]:
    """Distances along the normal from the first slice that :func:`ct_stack` uses (the oracle for its tests)."""
    middle = slices // 2
    offsets = []
    for k in range(slices):
        step = k - 1 if duplicate and k >= middle else k
        offsets.append(spacing_mm * (step + (1 if uneven and k >= middle else 0)))
    return offsets


def oblique_mr(
    out_dir: Path,
    *,
    angle_deg: float = 20.0,
    axis: tuple[float, float] = (1.0, 0.0),
    slices: int | None = None,
    study_uid: str | None = None,
) -> list[Path]:
    """The real Siemens axial MR stack (one echo, 3 mm apart) turned rigidly by ``angle_deg``.

    ``axis`` is the in-plane rotation axis as weights of (row direction, column direction): (1, 0) tilts the
    plane towards coronal, (1, 1) makes it double oblique. Both orientation vectors and every IPP turn about
    the stack's centre by the same rotation, so pixels, spacing and slice gaps are unchanged; a new Frame of
    Reference, because this is no longer where the scanner put the anatomy.
    """
    files = sorted((shared_data() / MR_SERIES).glob("*.dcm"))[:slices]
    sources = [pydicom.dcmread(p) for p in files]
    echoes = {int(ds.EchoNumbers) for ds in sources}
    if len(echoes) != 1:
        raise ValueError(f"{MR_SERIES} holds echoes {sorted(echoes)}: expected one")
    orientation = _orientation(sources[0])
    direction = axis[0] * orientation[:3] + axis[1] * orientation[3:]
    rotation = rotation_matrix(direction, angle_deg)
    centres = [_field_centre(ds) for ds in sources]
    pivot = (centres[0] + centres[-1]) / 2.0
    new_orientation = np.concatenate([rotation @ orientation[:3], rotation @ orientation[3:]])
    normal = np.cross(new_orientation[:3], new_orientation[3:])
    entropy = ("oblique_mr", angle_deg, axis, slices, study_uid, out_dir.name)
    study = study_uid or _uid(*entropy, "study")
    series, frame = _uid(*entropy, "series"), _uid(*entropy, "frame")
    written = []
    for k, ds in enumerate(sources):
        out = _derived(ds, study=study, series=series, instance=_uid(*entropy, "instance", k))
        out.FrameOfReferenceUID = frame
        ipp = pivot + rotation @ (np.asarray(ds.ImagePositionPatient, dtype=np.float64) - pivot)
        out.ImageOrientationPatient = _ds_list(new_orientation)
        out.ImagePositionPatient = _ds_list(ipp)
        out.SliceLocation = DSfloat(float(ipp @ normal), auto_format=True)
        out.SeriesDescription = f"synthetic oblique {angle_deg} deg"
        written.append((float(ipp @ normal), k, _write(out, out_dir / f"{k:03d}.dcm")))
    return [p for _, _, p in sorted(written)]


def without_spacing(out_dir: Path, *, zero: bool = False, study_uid: str | None = None) -> list[Path]:
    """The default CT slice with Pixel Spacing removed, or set to ``0\\0`` (both seen from old converters)."""
    ds = pydicom.dcmread(default_ct_source())
    entropy = ("without_spacing", zero, study_uid, out_dir.name)
    out = _derived(ds, study=study_uid or _uid(*entropy, "study"), series=_uid(*entropy, "series"),
                   instance=_uid(*entropy, "instance"))
    if zero:
        out.PixelSpacing = [DSfloat(0), DSfloat(0)]
    else:
        del out.PixelSpacing
    return [_write(out, out_dir / "000.dcm")]


def projection(out_dir: Path, *, study_uid: str | None = None) -> list[Path]:
    """A DX image, 1536 rows x 1024 columns, Imager Pixel Spacing 0.143 mm, magnification 1.1, no IOP/IPP.

    Pixels: the default CT slice as 12-bit unsigned (HU + 1024 clipped to 0..4095), zoomed 3x (linear,
    grid-aligned) and cropped to the central 1024 columns: larger than 512 on both axes and not square.
    """
    ct = pydicom.dcmread(default_ct_source())
    hu = ct.pixel_array.astype(np.float64) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    stored = np.clip(hu + 1024.0, 0.0, 4095.0)
    zoomed = ndimage.zoom(stored, 3, order=1, grid_mode=True, mode="nearest")
    left = (zoomed.shape[1] - 1024) // 2
    pixels = np.rint(zoomed[:, left:left + 1024]).astype(np.uint16)
    entropy = ("projection", study_uid, out_dir.name)
    ds = _projection_header(ct, study=study_uid or _uid(*entropy, "study"), series=_uid(*entropy, "series"),
                            instance=_uid(*entropy, "instance"))
    ds.set_pixel_data(pixels, "MONOCHROME2", 12, generate_instance_uid=False)
    return [_write(ds, out_dir / "000.dcm")]


def mammography(
    out_dir: Path, *, scale: int = 1, calibrated: bool = False, study_uid: str | None = None
) -> list[Path]:
    """The real MG image (8-bit, Imager Pixel Spacing 0.5 mm, magnification 1.5), optionally zoomed.

    ``scale`` > 1 zooms the pixels (linear, grid-aligned) and divides the spacings by it, so the detector
    field stays the same. The real file also has a calibrated Pixel Spacing (0.25 mm, FIDUCIAL): kept only
    with ``calibrated``, so by default the image has Imager Pixel Spacing alone.
    """
    ds = pydicom.dcmread(shared_data() / MG_FILE)
    entropy = ("mammography", scale, calibrated, study_uid, out_dir.name)
    out = _derived(ds, study=study_uid or _uid(*entropy, "study"), series=_uid(*entropy, "series"),
                   instance=_uid(*entropy, "instance"))
    if scale != 1:
        zoomed = ndimage.zoom(ds.pixel_array.astype(np.float64), scale, order=1, grid_mode=True, mode="nearest")
        out.set_pixel_data(np.rint(zoomed).astype(np.uint8), "MONOCHROME2", 8, generate_instance_uid=False)
        out.ImagerPixelSpacing = _ds_list(np.asarray(ds.ImagerPixelSpacing, dtype=np.float64) / scale)
        out.PixelSpacing = _ds_list(np.asarray(ds.PixelSpacing, dtype=np.float64) / scale)
    if not calibrated:
        for keyword in ("PixelSpacing", "PixelSpacingCalibrationType", "PixelSpacingCalibrationDescription"):
            if keyword in out:
                delattr(out, keyword)
    return [_write(out, out_dir / "000.dcm")]


def study_of(paths: Sequence[Path]) -> str:
    """The one Study Instance UID of generated files (an error if they disagree)."""
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in paths}
    if len(uids) != 1:
        raise ValueError(f"files span {len(uids)} studies")
    return uids.pop()


def rotation_matrix(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """Right-handed rotation by ``angle_deg`` about ``axis`` (Rodrigues' formula)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    angle = math.radians(angle_deg)
    rotation: np.ndarray = np.eye(3) + math.sin(angle) * cross + (1.0 - math.cos(angle)) * (cross @ cross)
    return rotation


def field_centre(ds: Dataset) -> np.ndarray:
    """Patient coordinates (LPS mm) of the centre of the field: pixel ((rows-1)/2, (columns-1)/2)."""
    return _field_centre(ds)


# --- internals -----------------------------------------------------------------------------------------------------


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=[repr(p) for p in parts]))


def _orientation(ds: Dataset) -> np.ndarray:
    return np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)


def _field_centre(ds: Dataset) -> np.ndarray:
    orientation = _orientation(ds)
    spacing = [float(v) for v in ds.PixelSpacing]
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    half_columns, half_rows = (int(ds.Columns) - 1) / 2.0, (int(ds.Rows) - 1) / 2.0
    return ipp + half_columns * spacing[1] * orientation[:3] + half_rows * spacing[0] * orientation[3:]


def _plane_position(ds: Dataset, rows: int, columns: int, spacing: float) -> np.ndarray:
    """IPP of a ``rows`` x ``columns`` grid at ``spacing`` in the source plane with the source's field centre."""
    orientation = _orientation(ds)
    return _field_centre(ds) - (columns - 1) / 2.0 * spacing * orientation[:3] \
        - (rows - 1) / 2.0 * spacing * orientation[3:]


def _resample_plane(ds: Dataset, rows: int, columns: int, spacing: float) -> np.ndarray:
    """Source pixels (stored values) on a centred grid; unchanged when the grid is the source's own."""
    source = ds.pixel_array
    sr, sc = (float(v) for v in ds.PixelSpacing)
    if (rows, columns) == source.shape and math.isclose(spacing, sr) and math.isclose(spacing, sc):
        return np.array(source)
    r = (ds.Rows - 1) / 2.0 + (np.arange(rows) - (rows - 1) / 2.0) * spacing / sr
    c = (ds.Columns - 1) / 2.0 + (np.arange(columns) - (columns - 1) / 2.0) * spacing / sc
    grid = np.meshgrid(r, c, indexing="ij")
    low, high = float(source.min()), float(source.max())
    values = ndimage.map_coordinates(source.astype(np.float64), grid, order=3, mode="grid-constant", cval=low)
    return np.asarray(np.rint(np.clip(values, low, high)).astype(source.dtype))


def _ds_list(values: np.ndarray | Sequence[float]) -> list[DSfloat]:
    return [DSfloat(float(v), auto_format=True) for v in values]


def _set_plane(ds: Dataset, pixels: np.ndarray, spacing: float, position: np.ndarray) -> None:
    bits_stored = int(ds.BitsStored)
    ds.set_pixel_data(pixels, str(ds.PhotometricInterpretation), bits_stored, generate_instance_uid=False)
    ds.PixelSpacing = _ds_list([spacing, spacing])
    ds.ImagePositionPatient = _ds_list(position)


def _derived(ds: Dataset, *, study: str, series: str, instance: str) -> Dataset:
    """A copy of ``ds`` under new UIDs, without private tags or pixel statistics."""
    out = copy.deepcopy(ds)
    out.remove_private_tags()
    for keyword in PIXEL_STATISTICS:
        if keyword in out:
            delattr(out, keyword)
    out.StudyInstanceUID, out.SeriesInstanceUID, out.SOPInstanceUID = study, series, instance
    out.file_meta = _file_meta(out)
    return out


def _file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _projection_header(ct: Dataset, *, study: str, series: str, instance: str) -> Dataset:
    """A DX header for the CT patient: detector spacing and magnification only, no patient geometry."""
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        setattr(ds, keyword, ct.get(keyword, ""))
    ds.SOPClassUID, ds.SOPInstanceUID = DX_SOP_CLASS, instance
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "CHEST"
    ds.PatientOrientation = ["L", "P"]
    ds.ImagerPixelSpacing = _ds_list([0.143, 0.143])
    ds.DistanceSourceToDetector = DSfloat(1100)
    ds.DistanceSourceToPatient = DSfloat(1000)
    ds.EstimatedRadiographicMagnificationFactor = DSfloat(1.1)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = DSfloat(0), DSfloat(1), "US"
    ds.WindowCenter, ds.WindowWidth = DSfloat(1024), DSfloat(1600)
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LIN", 1
    ds.BurnedInAnnotation = "NO"
    ds.SeriesDescription = "synthetic DX 0.143 mm"
    ds.file_meta = _file_meta(ds)
    return ds


def _write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def with_new_uids(ds: Dataset, *, study: str | None = None) -> Dataset:
    """``ds`` as another instance: new SOP Instance and Series UIDs, a new study unless ``study`` names one."""
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def part10_bytes(ds: Dataset) -> bytes:
    """``ds`` written as a Part 10 file, in memory."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
