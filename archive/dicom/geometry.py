"""Where each pixel of an image lies: spacing, orientation and position read from DICOM, never guessed from sizes.

In the spirit of highdicom's ``spatial`` module. Image Orientation (Patient)
holds the row direction cosines (increasing column index) then the column
direction cosines (increasing row index); Image Position (Patient) is the
centre of pixel (0, 0) in LPS millimetres (PS3.3 C.7.6.2.1.1). So pixel
``(r, c)`` lies at ``IPP + c * spacing[1] * row_dir + r * spacing[0] * col_dir``.

Projection images (CR, DX, MG, XA, RF, IO...) have no orientation or position;
their Imager Pixel Spacing is measured at the detector, magnification included
(PS3.3 10.7.1.3), and is kept as :attr:`SpacingKind.DETECTOR`, never relabelled
as a patient spacing. Malformed values become ``None`` fields: reading the
geometry of odd input never raises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from archive.normalize.grid import SpacingKind

#: Row and column cosines further from orthogonal than this (|cos|, about 0.6 degrees) are not an orientation.
_ORTHOGONALITY_TOLERANCE = 0.01
_MIN_NORM = 1e-6

Orientation = tuple[float, float, float, float, float, float]
Position = tuple[float, float, float]


@dataclass(frozen=True)
class PlaneGeometry:
    """The geometry of one image plane (a single-frame image or one frame of a multi-frame one).

    ``orientation`` is stored with both cosine vectors normalised to unit length.
    """

    rows: int
    columns: int
    spacing: tuple[float, float] | None  # (between rows, between columns) mm; None when missing or unusable
    spacing_kind: SpacingKind
    orientation: Orientation | None
    position: Position | None
    frame_of_reference_uid: str | None

    def row_direction(self) -> np.ndarray:
        """Unit vector of increasing column index (LPS)."""
        return np.array(self._orientation()[:3], dtype=np.float64)

    def column_direction(self) -> np.ndarray:
        """Unit vector of increasing row index (LPS)."""
        return np.array(self._orientation()[3:], dtype=np.float64)

    def normal(self) -> np.ndarray:
        """Unit slice normal, row direction x column direction."""
        normal: np.ndarray = np.cross(self.row_direction(), self.column_direction())
        return normal / float(np.linalg.norm(normal))

    def pixel_to_patient(self, row: float, column: float) -> np.ndarray:
        """LPS millimetres of the point at index (row, column); fractional indices allowed."""
        if self.position is None or self.spacing is None:
            raise ValueError(f"no {'Image Position (Patient)' if self.position is None else 'pixel spacing'}: "
                             "pixel positions in the patient are unknown")
        return (np.array(self.position, dtype=np.float64)
                + column * self.spacing[1] * self.row_direction()
                + row * self.spacing[0] * self.column_direction())

    def centre(self) -> np.ndarray | None:
        """LPS millimetres of the field centre, index ((rows - 1) / 2, (columns - 1) / 2); None when unknown."""
        if self.position is None or self.orientation is None or self.spacing is None:
            return None
        return self.pixel_to_patient((self.rows - 1) / 2, (self.columns - 1) / 2)

    def slice_position(self) -> float | None:
        """Distance of the plane from the origin along its normal (mm): what sorts a stack."""
        if self.position is None or self.orientation is None:
            return None
        return float(np.dot(np.array(self.position, dtype=np.float64), self.normal()))

    def field_mm(self) -> tuple[float, float] | None:
        """Field of view (mm along the columns, i.e. height; mm along the rows, i.e. width)."""
        if self.spacing is None:
            return None
        return self.rows * self.spacing[0], self.columns * self.spacing[1]

    def moved_to(self, slice_position: float) -> PlaneGeometry:
        """The same plane shifted along its normal so that :meth:`slice_position` is ``slice_position``."""
        current = self.slice_position()
        if current is None or self.position is None:
            raise ValueError("no Image Position/Orientation (Patient): the plane cannot be moved along its normal")
        moved = np.array(self.position, dtype=np.float64) + (slice_position - current) * self.normal()
        return replace(self, position=_vector3(moved))

    def as_dict(self) -> dict[str, Any]:
        """JSON for the catalog; :meth:`from_dict` reads it back."""
        return {
            "rows": self.rows,
            "columns": self.columns,
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "spacing_kind": self.spacing_kind.value,
            "orientation": list(self.orientation) if self.orientation is not None else None,
            "position": list(self.position) if self.position is not None else None,
            "frame_of_reference_uid": self.frame_of_reference_uid,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlaneGeometry:
        spacing, orientation, position = data.get("spacing"), data.get("orientation"), data.get("position")
        return cls(
            rows=int(data["rows"]),
            columns=int(data["columns"]),
            spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None else None,
            spacing_kind=SpacingKind(data["spacing_kind"]),
            orientation=_orientation(orientation) if orientation is not None else None,
            position=_vector3(position) if position is not None else None,
            frame_of_reference_uid=data.get("frame_of_reference_uid"),
        )

    def _orientation(self) -> Orientation:
        if self.orientation is None:
            raise ValueError("no Image Orientation (Patient): the plane's directions are unknown")
        return self.orientation


def plane_geometries(ds: Dataset) -> list[PlaneGeometry]:
    """One :class:`PlaneGeometry` per frame; empty when the data set has no image (no Rows or Columns).

    Enhanced multi-frame objects are read from their Per-frame, then Shared
    Functional Groups (PS3.3 C.7.6.16), then the top level, so classic images
    and classic multi-frame images (one geometry repeated) take the same path.
    Imager Pixel Spacing wins over Pixel Spacing only on projection images (no
    orientation and no position): their Pixel Spacing, when present, is a
    calibration the derived header scales along with it.
    """
    rows, columns = _positive_int(_get(ds, "Rows")), _positive_int(_get(ds, "Columns"))
    if rows is None or columns is None:
        return []
    frames = _positive_int(_get(ds, "NumberOfFrames")) or 1
    uid = _get(ds, "FrameOfReferenceUID")
    frame_of_reference = (str(uid).strip() or None) if uid is not None else None
    per_frame = _sequence(_get(ds, "PerFrameFunctionalGroupsSequence"))
    shared = _sequence(_get(ds, "SharedFunctionalGroupsSequence"))
    shared_item = shared[0] if shared else None
    if not per_frame:
        plane = _plane(rows, columns, frame_of_reference, ds, None, shared_item)
        return [plane] * frames
    return [_plane(rows, columns, frame_of_reference, ds, per_frame[i] if i < len(per_frame) else None, shared_item)
            for i in range(frames)]


def _plane(rows: int, columns: int, frame_of_reference: str | None, ds: Dataset,
           frame_item: Dataset | None, shared_item: Dataset | None) -> PlaneGeometry:
    def lookup(macro: str, keyword: str) -> Any:
        """Per-frame group, then shared group, then the top level: the first that holds ``keyword``."""
        for item in (frame_item, shared_item):
            if item is None:
                continue
            group = _sequence(_get(item, macro))
            if group:
                value = _get(group[0], keyword)
                if value is not None and value != "":
                    return value
        return _get(ds, keyword)

    orientation = _orientation(lookup("PlaneOrientationSequence", "ImageOrientationPatient"))
    position = _vector3(lookup("PlanePositionSequence", "ImagePositionPatient"))
    patient = _spacing(lookup("PixelMeasuresSequence", "PixelSpacing"))
    detector = _spacing(lookup("FramePixelDataPropertiesSequence", "ImagerPixelSpacing"))
    if detector is not None and orientation is None and position is None:
        spacing, kind = detector, SpacingKind.DETECTOR
    elif patient is not None:
        spacing, kind = patient, SpacingKind.PATIENT
    else:
        spacing, kind = None, SpacingKind.NONE
    return PlaneGeometry(rows=rows, columns=columns, spacing=spacing, spacing_kind=kind,
                         orientation=orientation, position=position, frame_of_reference_uid=frame_of_reference)


def _get(ds: Dataset, keyword: str) -> Any:
    """The value of ``keyword``, or None when absent or unreadable."""
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - pydicom converts values lazily: malformed bytes raise here, of many types
        return None


def _sequence(value: Any) -> Sequence[Dataset]:
    return value if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else []


def _positive_int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number > 0 else None


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    """Exactly ``count`` finite numbers, or None."""
    if value is None or isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        return None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        return None
    return numbers


def _spacing(value: Any) -> tuple[float, float] | None:
    numbers = _floats(value, 2)
    if numbers is None or min(numbers) <= 0:
        return None
    return numbers[0], numbers[1]


def _vector3(value: Any) -> Position | None:
    numbers = _floats(value, 3)
    return (numbers[0], numbers[1], numbers[2]) if numbers is not None else None


def _orientation(value: Any) -> Orientation | None:
    """Both cosine vectors normalised; None when either is zero or they are not orthogonal."""
    numbers = _floats(value, 6)
    if numbers is None:
        return None
    row, column = np.array(numbers[:3]), np.array(numbers[3:])
    row_norm, column_norm = float(np.linalg.norm(row)), float(np.linalg.norm(column))
    if min(row_norm, column_norm) < _MIN_NORM:
        return None
    row, column = row / row_norm, column / column_norm
    if abs(float(np.dot(row, column))) > _ORTHOGONALITY_TOLERANCE:
        return None
    r0, r1, r2 = (float(v) for v in row)
    c0, c1, c2 = (float(v) for v in column)
    return r0, r1, r2, c0, c1, c2
