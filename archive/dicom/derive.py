"""The header of a derived image: a new Instance in a derived Series, linked to its source.

One rule for every derived object (normalized now, lossy and learned later;
issue 15 point 4): new SOP Instance and Series Instance UIDs, minted
deterministically from the source, the parameters and the software version;
Image Type DERIVED\\SECONDARY; a Derivation Description and Code (CID 7203
"Spatial resampling"); a Source Image Sequence with the purpose of reference
"Source image for image processing operation" (DCM 121322, PS3.16 CID 7202);
the Common Instance Reference Module (PS3.3 C.12.2) naming the source series.

Geometry comes from the planes the caller computed, never from array sizes:
Rows/Columns, Pixel Spacing or, for projection images, Imager Pixel Spacing
(measured at the detector: scaled, never relabelled, with the calibration
attributes carried over; PS3.3 10.7.1.3), Image Position (Patient) and, for
enhanced objects, the Pixel Measures and Plane Position functional groups.
Sample values keep their units: Rescale Slope/Intercept, Bits Stored and
Photometric Interpretation are the source's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels.utils import pack_bits
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from archive.dicom.geometry import PlaneGeometry, plane_geometries
from archive.dicom.reader import PixelLayout
from archive.dicom.uids import derived_uid
from archive.dicom.writer import IMPLEMENTATION_VERSION, attach_native_pixels
from archive.normalize.grid import SpacingKind

#: Why the pixels differ from the source's (PS3.16 CID 7203 Image Derivation).
SPATIAL_RESAMPLING: Code = codes.DCM.SpatialResampling  # 113085
#: A lossy representation made from a lossless original (PS3.16 CID 7203).
LOSSY_COMPRESSION: Code = codes.DCM.LossyCompression  # 113040
#: What each source image was to the derived one (PS3.16 CID 7202 Source Image Purpose of Reference).
SOURCE_FOR_PROCESSING: Code = codes.DCM.SourceImageForImageProcessingOperation  # 121322

_DERIVATION_DESCRIPTION_MAX = 1024  # ST
_LO_MAX = 64
#: Elements whose values describe the source's pixels (or the source's place in a concatenation), not ours.
_DROPPED_KEYWORDS = (
    "IconImageSequence",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "SmallestImagePixelValueInPlane",
    "LargestImagePixelValueInPlane",
    "PixelDataProviderURL",
    "NumberOfFrames",
    "ConcatenationUID",
    "InConcatenationNumber",
    "InConcatenationTotalNumber",
    "ConcatenationFrameOffsetNumber",
    "SOPInstanceUIDOfConcatenationSource",
    "DataSetTrailingPadding",
    # replaced below: the source's own derivation history is not ours
    "DerivationDescription",
    "DerivationCodeSequence",
    "SourceImageSequence",
)
_DROPPED_TAGS = frozenset(Tag(keyword) for keyword in _DROPPED_KEYWORDS)
_SPACINGS = ("PixelSpacing", "ImagerPixelSpacing")
#: Photometric interpretations that only describe a compressed stream, and what its decoded samples are.
_NATIVE_PHOTOMETRIC = {"YBR_RCT": "RGB", "YBR_ICT": "RGB", "YBR_FULL_422": "YBR_FULL", "YBR_PARTIAL_420": "YBR_FULL"}
_IN_STACK_POSITION = Tag("InStackPositionNumber")
_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"


def params_sha256(params: Mapping[str, Any]) -> str:
    """The identity of a parameter set: SHA-256 of its canonical JSON (keys sorted, no spaces).

    str-valued Enums encode as their values; anything JSON cannot express raises TypeError.
    """
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def derived_instance_uid(source_uid: str, params_sha: str, software_version: str, *, index: int | None = None) -> str:
    """The SOP Instance UID of what ``source_uid`` becomes under ``params_sha``: a re-run gives the same UID.

    ``index`` tells apart several outputs of one source (slices resampled across a series).
    """
    parts = ("derived-instance", source_uid, params_sha, software_version)
    return derived_uid(*parts) if index is None else derived_uid(*parts, str(index))


def derived_series_uid(source_series_uid: str, params_sha: str, software_version: str) -> str:
    """The Series Instance UID of the derived series made from ``source_series_uid`` under ``params_sha``."""
    return derived_uid("derived-series", source_series_uid, params_sha, software_version)


@dataclass(frozen=True)
class LossyCompression:
    """What a lossy representation says of itself (PS3.3 C.7.6.1.1.5): ratio and method, appended to any earlier."""

    ratio: float
    method: str  # a defined term (ISO_14495_1 ...) where one fits, else a documented medarchive name


def derive_header(
    source: Dataset,
    *,
    series_uid: str,
    sop_instance_uid: str,
    planes: Sequence[PlaneGeometry],
    sources: Sequence[Dataset],
    profile: str,
    description: str,
    series_number: int | None,
    series_description: str | None,
    instance_number: int | None,
    slice_thickness: float | None = None,
    spacing_between_slices: float | None = None,
    pad_value: int | None = None,
    derivation: Code = SPATIAL_RESAMPLING,
    lossy: LossyCompression | None = None,
    made_by: str = "profile",
) -> Dataset:
    """A new dataset from ``source``'s header for pixels on ``planes`` (one per frame); no Pixel Data yet.

    ``source`` is left untouched; :func:`attach_pixels` adds the pixels. A
    lossy representation (``lossy``) sets Lossy Image Compression "01" (never
    reset once set) and appends its ratio and method to the source's.
    ``made_by`` names what ``profile`` is ("profile", "policy").
    """
    if not planes:
        raise ValueError("a derived image needs at least one plane")
    first = planes[0]
    if any(plane.rows != first.rows or plane.columns != first.columns for plane in planes):
        raise ValueError("all frames of one image share Rows and Columns")
    enhanced = _is_enhanced(source)
    ds = _header_copy(source)
    ds.SOPInstanceUID = sop_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number  # None: present and empty (type 2), never the source's number
    ds.SeriesDescription = series_description[:_LO_MAX] if series_description is not None else None
    ds.InstanceNumber = instance_number
    if str(source.get("SOPClassUID") or "") == _SEGMENTATION:
        ds.ImageType = ["DERIVED", "PRIMARY"]  # the one value a SEG may have (PS3.3 C.8.20.2)
    else:
        ds.ImageType = ["DERIVED", "SECONDARY", *_values(source.get("ImageType"))[2:]]
    text = f"medarchive {made_by} {profile}: {description}"[:_DERIVATION_DESCRIPTION_MAX]
    ds.DerivationDescription = text
    ds.DerivationCodeSequence = [_code_item(derivation)]
    if lossy is not None:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = [*_values(source.get("LossyImageCompressionRatio")), _ds(lossy.ratio)]
        ds.LossyImageCompressionMethod = [*_values(source.get("LossyImageCompressionMethod")), lossy.method]
    ds.SourceImageSequence = [_source_reference(item) for item in sources]
    _reference_instances(ds, sources)
    photometric = str(ds.get("PhotometricInterpretation") or "").strip()
    if photometric in _NATIVE_PHOTOMETRIC:
        ds.PhotometricInterpretation = _NATIVE_PHOTOMETRIC[photometric]
    ds.Rows, ds.Columns = first.rows, first.columns
    factor = _spacing_factor(source, first)
    if _named_spacing(first) is not None:
        ds.pop("PixelAspectRatio", None)  # the spacing says it now
    if enhanced:
        _update_functional_groups(ds, planes, factor, text, sources, slice_thickness, spacing_between_slices)
    else:
        if not _write_spacings([(ds, first)], factor):
            _set_spacing(ds, first)
        _write_position(ds, source, first)
        _set_ds(ds, "SliceThickness", slice_thickness)
        _set_ds(ds, "SpacingBetweenSlices", spacing_between_slices)
    if enhanced or "NumberOfFrames" in source or len(planes) > 1:
        ds.NumberOfFrames = len(planes)
    if pad_value is not None:
        signed = int(source.get("PixelRepresentation") or 0) == 1
        ds["PixelPaddingValue"] = DataElement(Tag("PixelPaddingValue"), "SS" if signed else "US", int(pad_value))
    ds.file_meta = _file_meta(ds)
    return ds


def attach_pixels(ds: Dataset, frames: np.ndarray) -> None:
    """Native little-endian Pixel Data for ``frames`` in the dataset's sample format; Rows/Columns/frames updated.

    ``frames`` is (R, C), (R, C, S), (N, R, C) or (N, R, C, S); its dtype must be
    the one Bits Allocated and Pixel Representation say, so no value is cast.
    """
    samples = int(ds.get("SamplesPerPixel") or 1)
    stack = _as_stack(np.asarray(frames), samples)
    count, rows, columns = stack.shape[:3]
    bits_allocated = int(ds.BitsAllocated)
    representation = int(ds.get("PixelRepresentation") or 0)
    enhanced = _is_enhanced(ds)
    if enhanced and len(ds.get("PerFrameFunctionalGroupsSequence") or []) != count:
        raise ValueError(f"{count} frames for {len(ds.PerFrameFunctionalGroupsSequence)} per-frame functional groups")
    ds.Rows, ds.Columns = rows, columns
    if enhanced or count > 1 or "NumberOfFrames" in ds:
        ds.NumberOfFrames = count
    if samples > 1:
        ds.PlanarConfiguration = 0
    if bits_allocated == 1:
        if stack.dtype.kind not in "bu" or (stack.size and int(stack.max()) > 1):
            raise ValueError("Bits Allocated 1 takes 0/1 values")
        ds.PixelData = pack_bits(stack.astype(np.uint8, copy=False).reshape(-1))
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return
    expected = np.dtype(f"<{'i' if representation else 'u'}{max(bits_allocated // 8, 1)}")
    if stack.dtype.kind != expected.kind or stack.dtype.itemsize != expected.itemsize:
        raise ValueError(f"frames are {stack.dtype}, the header says {expected} (Bits Allocated {bits_allocated})")
    photometric = str(ds.get("PhotometricInterpretation") or "").strip()
    layout = PixelLayout(
        rows=rows,
        columns=columns,
        samples_per_pixel=samples,
        number_of_frames=count,
        bits_allocated=bits_allocated,
        bits_stored=int(ds.get("BitsStored") or bits_allocated),
        high_bit=int(ds.get("HighBit") or bits_allocated - 1),
        pixel_representation=representation,
        photometric_interpretation=photometric,
        planar_configuration=0 if samples > 1 else None,
        dtype=expected.str,
        output_photometric=photometric,
    )
    attach_native_pixels(ds, list(stack[..., 0] if samples == 1 else stack), layout)


def _as_stack(array: np.ndarray, samples: int) -> np.ndarray:
    """``array`` as (N, R, C, S), telling (R, C, S) from (N, R, C) by Samples per Pixel."""
    if array.ndim == 2 and samples == 1:
        return array[np.newaxis, :, :, np.newaxis]
    if array.ndim == 3 and samples > 1 and array.shape[2] == samples:
        return array[np.newaxis]
    if array.ndim == 3 and samples == 1:
        return array[..., np.newaxis]
    if array.ndim == 4 and array.shape[3] == samples:
        return array
    raise ValueError(f"frames of shape {array.shape} do not fit {samples} samples per pixel")


def _is_enhanced(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _dropped(tag: BaseTag) -> bool:
    """Pixel-dependent elements: Pixel Data and its kin (7FE0), overlays (60xx), curves (50xx), group lengths.

    File meta elements misplaced in the data set (0002) go too: the file meta is rebuilt.
    """
    group = tag.group
    if group in (0x0002, 0x7FE0) or tag.element == 0 or tag in _DROPPED_TAGS:
        return True
    return group % 2 == 0 and (0x6000 <= group <= 0x601E or 0x5000 <= group <= 0x501E)


def _header_copy(source: Dataset) -> Dataset:
    """A deep copy of the kept elements; raw (unparsed) ones are immutable tuples, shared as they are.

    Raw elements go straight into the dictionary: through ``ds[tag] = ...`` pydicom
    would parse every private one, and a large private header (CSA) is most of the cost.
    """
    ds = Dataset()
    for tag, element in source.items():
        if _dropped(tag):
            continue
        if isinstance(element, RawDataElement):
            ds._dict[tag] = element
        else:
            ds[tag] = copy.deepcopy(element)
    implicit, little = source.original_encoding
    ds.set_original_encoding(implicit, little, source.original_character_set)  # raw elements are written as read
    return ds


def _file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def _values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def _ds(value: float) -> str:
    """A DS string of at most 16 characters (PS3.5 6.2)."""
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {value}")
    return format_number_as_ds(float(value) + 0.0)  # + 0.0: no "-0.0"


def _set_ds(ds: Dataset, keyword: str, value: float | None) -> None:
    if value is not None:
        setattr(ds, keyword, _ds(value))


def _spacing_factor(source: Dataset, plane: PlaneGeometry) -> tuple[float, float] | None:
    """New spacing over the source's, per axis, for spacings of the same kind; None when unknown."""
    before = plane_geometries(source)
    old = before[0] if before else None
    if old is None or old.spacing is None or plane.spacing is None or old.spacing_kind is not plane.spacing_kind:
        return None
    return plane.spacing[0] / old.spacing[0], plane.spacing[1] / old.spacing[1]


def _write_spacings(holders: Sequence[tuple[Dataset, PlaneGeometry]], factor: tuple[float, float] | None) -> bool:
    """Set the spacing each plane's kind names; scale every other spacing held by ``factor``.

    A projection image's Imager Pixel Spacing stays Imager Pixel Spacing, and its
    calibrated Pixel Spacing (if any) follows by the same factor, the calibration
    attributes (magnification, calibration type, distances) carried over unchanged.
    Without a usable spacing or factor the others are removed: a wrong spacing
    measures wrongly. Returns whether the named spacing was written anywhere.
    """
    written = False
    for holder, plane in holders:
        named = _named_spacing(plane)
        for keyword in _SPACINGS:
            if keyword not in holder:
                continue
            if keyword == named and plane.spacing is not None:
                setattr(holder, keyword, [_ds(plane.spacing[0]), _ds(plane.spacing[1])])
                written = True
                continue
            before = _floats(holder.get(keyword))
            if factor is None or before is None or len(before) != 2:
                del holder[keyword]
            else:
                setattr(holder, keyword, [_ds(before[0] * factor[0]), _ds(before[1] * factor[1])])
    return written


def _named_spacing(plane: PlaneGeometry) -> str | None:
    if plane.spacing is None or plane.spacing_kind is SpacingKind.NONE:
        return None
    return "PixelSpacing" if plane.spacing_kind is SpacingKind.PATIENT else "ImagerPixelSpacing"


def _set_spacing(holder: Dataset, plane: PlaneGeometry) -> None:
    named = _named_spacing(plane)
    if named is not None and plane.spacing is not None:
        setattr(holder, named, [_ds(plane.spacing[0]), _ds(plane.spacing[1])])


def _floats(value: object) -> list[float] | None:
    try:
        return [float(v) for v in _values(value)]
    except (TypeError, ValueError):
        return None


def _write_position(ds: Dataset, source: Dataset, plane: PlaneGeometry) -> None:
    """Image Position (Patient) of the new first pixel; Slice Location moved by the shift along the normal."""
    if plane.position is None:
        ds.pop("ImagePositionPatient", None)
        return
    ds.ImagePositionPatient = [_ds(v) for v in plane.position]
    if "SliceLocation" not in ds or plane.orientation is None:
        return
    try:
        old_location = float(source.SliceLocation)
        old_position = np.array([float(v) for v in _values(source.get("ImagePositionPatient"))], dtype=np.float64)
    except (TypeError, ValueError):
        return
    if old_position.shape != (3,) or not math.isfinite(old_location):
        return
    shift = float(np.dot(np.asarray(plane.position, dtype=np.float64) - old_position, plane.normal()))
    if abs(shift) > 1e-6:  # in-plane resampling moves nothing along the normal: the source's text is kept
        ds.SliceLocation = _ds(old_location + shift)


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _instance_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def _source_reference(source: Dataset) -> Dataset:
    item = _instance_reference(source)
    item.PurposeOfReferenceCodeSequence = [_code_item(SOURCE_FOR_PROCESSING)]
    return item


def _reference_instances(ds: Dataset, sources: Sequence[Dataset]) -> None:
    """Add the sources to the Common Instance Reference Module (PS3.3 C.12.2), keeping what it already lists."""
    study = str(ds.get("StudyInstanceUID") or "")
    for source in sources:
        source_study = str(source.get("StudyInstanceUID") or "")
        if source_study and source_study != study:
            studies = ds.setdefault("StudiesContainingOtherReferencedInstancesSequence", []).value
            holder = next((item for item in studies if str(item.get("StudyInstanceUID")) == source_study), None)
            if holder is None:
                holder = Dataset()
                holder.StudyInstanceUID = source_study
                studies.append(holder)
        else:
            holder = ds
        series_items = holder.setdefault("ReferencedSeriesSequence", []).value
        series_uid = str(source.SeriesInstanceUID)
        series = next((item for item in series_items if str(item.get("SeriesInstanceUID")) == series_uid), None)
        if series is None:
            series = Dataset()
            series.SeriesInstanceUID = series_uid
            series_items.append(series)
        instances = series.setdefault("ReferencedInstanceSequence", []).value
        if all(str(item.get("ReferencedSOPInstanceUID")) != str(source.SOPInstanceUID) for item in instances):
            instances.append(_instance_reference(source))


def _update_functional_groups(
    ds: Dataset,
    planes: Sequence[PlaneGeometry],
    factor: tuple[float, float] | None,
    description: str,
    sources: Sequence[Dataset],
    slice_thickness: float | None,
    spacing_between_slices: float | None,
) -> None:
    """Pixel Measures, Plane Position, Frame Type and Derivation Image functional groups (PS3.3 C.7.6.16)."""
    if "SharedFunctionalGroupsSequence" not in ds or not ds.SharedFunctionalGroupsSequence:
        ds.SharedFunctionalGroupsSequence = [Dataset()]
    shared = ds.SharedFunctionalGroupsSequence[0]
    frames = _frame_groups(ds, len(planes))
    groups = [(shared, planes[0]), *zip(frames, planes)]
    for group, _ in groups:
        group.pop("DerivationImageSequence", None)  # the source's derivation is not ours
        _derive_frame_type(group)
    measures = [(item, plane) for group, plane in groups for item in group.get("PixelMeasuresSequence") or []]
    wants_measures = _named_spacing(planes[0]) == "PixelSpacing" or slice_thickness or spacing_between_slices
    if not measures and wants_measures:
        shared.PixelMeasuresSequence = [Dataset()]
        measures = [(shared.PixelMeasuresSequence[0], planes[0])]
    detector = [(item, plane) for group, plane in groups
                for item in group.get("FramePixelDataPropertiesSequence") or []]
    if not _write_spacings([(ds, planes[0]), *measures, *detector], factor):
        for item, plane in measures if _named_spacing(planes[0]) == "PixelSpacing" else [(ds, planes[0])]:
            _set_spacing(item, plane)
    for item, _ in measures:
        _set_ds(item, "SliceThickness", slice_thickness)
        _set_ds(item, "SpacingBetweenSlices", spacing_between_slices)
    for keyword, value in (("SliceThickness", slice_thickness), ("SpacingBetweenSlices", spacing_between_slices)):
        if keyword in ds:  # top level only where the source put them
            _set_ds(ds, keyword, value)
    for group, plane in [groups[0]] if "PlanePositionSequence" in shared else groups[1:]:
        if plane.position is None:
            group.pop("PlanePositionSequence", None)
            continue
        position = Dataset()
        position.ImagePositionPatient = [_ds(v) for v in plane.position]
        group.PlanePositionSequence = [position]
    derivation = Dataset()
    derivation.DerivationDescription = description
    derivation.DerivationCodeSequence = [_code_item(SPATIAL_RESAMPLING)]
    derivation.SourceImageSequence = [_source_reference(item) for item in sources]
    shared.DerivationImageSequence = [derivation]
    ds.PerFrameFunctionalGroupsSequence = frames


def _frame_groups(ds: Dataset, count: int) -> list[Dataset]:
    """One per-frame functional group item per output frame.

    Same count: the source's items. Resampled across frames: each output frame
    takes the nearest source item, its In-Stack Position renumbered (and the
    dimension index that points at it).
    """
    source_groups = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if len(source_groups) == count:
        return source_groups
    if not source_groups:
        return [Dataset() for _ in range(count)]
    pointers = [Tag(item.get("DimensionIndexPointer")) for item in ds.get("DimensionIndexSequence") or []
                if item.get("DimensionIndexPointer") is not None]
    groups = []
    for index in range(count):
        nearest = round(index * (len(source_groups) - 1) / max(count - 1, 1))
        group = copy.deepcopy(source_groups[nearest])
        for content in group.get("FrameContentSequence") or []:
            if "InStackPositionNumber" in content:
                content.InStackPositionNumber = index + 1
            values = _values(content.get("DimensionIndexValues"))
            if _IN_STACK_POSITION in pointers and len(values) == len(pointers):
                updated = [int(v) for v in values]
                updated[pointers.index(_IN_STACK_POSITION)] = index + 1
                content.DimensionIndexValues = updated
        groups.append(group)
    return groups


def _derive_frame_type(group: Dataset) -> None:
    """Frame Type mirrors Image Type (PS3.3 C.8.16.1): DERIVED\\SECONDARY in every ...FrameTypeSequence."""
    for element in group:
        if element.VR == "SQ" and element.keyword.endswith("FrameTypeSequence"):
            for item in element.value:
                if "FrameType" in item:
                    item.FrameType = ["DERIVED", "SECONDARY", *_values(item.FrameType)[2:]]
