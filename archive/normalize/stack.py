"""Whether a stack of planes can be resampled across slices, and in which order its slices lie.

A series is resampled across slices only when its slices are one regular
stack: same orientation and matrix, positions known, stepping along the
normal (no gantry tilt or shear), evenly spaced, no two at the same place.
Anything else is normalized in-plane only, with a warning whose message
carries the figures that decided it, so the catalog says why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from archive.dicom.geometry import PlaneGeometry
from archive.normalize.grid import StackWarning

ANGLE_TOLERANCE_DEG = 0.5  # orientations and slice steps further apart than this are not one stack
DUPLICATE_FRACTION, DUPLICATE_MM = 0.01, 0.01  # a gap below either (of the median gap) is one position twice
UNEVEN_FRACTION, UNEVEN_MM = 0.10, 0.05  # a gap off the median by more than both is uneven spacing
SPACING_TOLERANCE = 1e-4  # relative difference of pixel spacings that still counts as the same


@dataclass(frozen=True)
class StackAnalysis:
    """The slices of one series in position order, and why (if at all) they are not one regular stack."""

    order: list[int]  # input indices sorted by slice position (input order when unknown)
    positions: list[float] | None  # sorted positions along the first plane's normal (mm)
    slice_spacing: float | None  # median gap between distinct positions (mm)
    warnings: list[StackWarning]
    messages: list[str]  # one human sentence per warning, with the figures

    @property
    def across_ok(self) -> bool:
        """True when the stack may be resampled across slices."""
        return not self.warnings and len(self.order) >= 2

    def as_dict(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "positions": self.positions,
            "slice_spacing": self.slice_spacing,
            "warnings": [warning.value for warning in self.warnings],
            "messages": self.messages,
        }


def analyse_stack(planes: Sequence[PlaneGeometry]) -> StackAnalysis:
    """Sort ``planes`` along the normal of the first and check they form one regular stack.

    The median gap ignores gaps under 0.01 mm, so that a series with every
    position twice (two echoes) still has its true slice spacing.
    """
    count = len(planes)
    found: list[tuple[StackWarning, str]] = []

    def warn(warning: StackWarning, message: str) -> None:
        found.append((warning, message))

    if count < 2:
        warn(StackWarning.SINGLE_SLICE, f"{count} slice{'' if count == 1 else 's'}: nothing to resample across")
    unspaced = sum(plane.spacing is None for plane in planes)
    if unspaced:
        warn(StackWarning.NO_SPACING, f"{unspaced} of {count} slices have no usable pixel spacing")
    mixed = _mixed_matrix(planes)
    if mixed:
        warn(StackWarning.MIXED_MATRIX, mixed)
    unplaced = sum(plane.position is None or plane.orientation is None for plane in planes)
    frames_of_reference = {plane.frame_of_reference_uid for plane in planes} - {None}
    if unplaced or len(frames_of_reference) > 1:
        message = (f"{unplaced} of {count} slices have no usable Image Position/Orientation (Patient)" if unplaced
                   else f"slices lie in {len(frames_of_reference)} frames of reference: positions cannot be compared")
        warn(StackWarning.NO_POSITION, message)
        return _analysis(list(range(count)), None, None, found)
    if count == 0:
        return _analysis([], None, None, found)

    turned = max(_orientation_angle(planes[0], plane) for plane in planes)
    if turned > ANGLE_TOLERANCE_DEG:
        warn(StackWarning.MIXED_ORIENTATIONS,
             f"slice orientations differ by up to {turned:.2f}° (tolerance {ANGLE_TOLERANCE_DEG}°)")
    normal = planes[0].normal()
    points = np.array([plane.position for plane in planes], dtype=np.float64)
    along = points @ normal
    order = np.argsort(along, kind="stable")
    ordered = along[order]
    gaps = np.diff(ordered)
    distinct = gaps[gaps >= DUPLICATE_MM]
    median = float(np.median(distinct)) if distinct.size else None
    threshold = max(DUPLICATE_MM, DUPLICATE_FRACTION * median) if median is not None else DUPLICATE_MM
    duplicates = np.flatnonzero(gaps < threshold)
    if duplicates.size:
        warn(StackWarning.DUPLICATE_POSITIONS,
             f"{duplicates.size} pair{'' if duplicates.size == 1 else 's'} of slices share a position "
             f"(gap < {threshold:.3g} mm), the first at {ordered[duplicates[0]]:.2f} mm")
    regular = gaps[gaps >= threshold]
    if median is not None and regular.size:
        off = np.abs(regular - median)
        if np.any((off > UNEVEN_FRACTION * median) & (off > UNEVEN_MM)):
            warn(StackWarning.UNEVEN_SPACING,
                 f"slice gaps range from {regular.min():.3f} to {regular.max():.3f} mm (median {median:.3f} mm)")
        if turned <= ANGLE_TOLERANCE_DEG:
            steps = np.diff(points[order], axis=0)[gaps >= threshold]
            cosines = np.clip(regular / np.linalg.norm(steps, axis=1), -1.0, 1.0)
            tilt = math.degrees(float(np.max(np.arccos(cosines))))
            if tilt > ANGLE_TOLERANCE_DEG:
                warn(StackWarning.GANTRY_TILT,
                     f"slice positions step {tilt:.2f}° off the slice normal (gantry tilt or shear; "
                     f"tolerance {ANGLE_TOLERANCE_DEG}°)")
    return _analysis([int(i) for i in order], [float(p) for p in ordered], median, found)


def _analysis(order: list[int], positions: list[float] | None, spacing: float | None,
              found: list[tuple[StackWarning, str]]) -> StackAnalysis:
    return StackAnalysis(order=order, positions=positions, slice_spacing=spacing,
                         warnings=[warning for warning, _ in found], messages=[message for _, message in found])


def _mixed_matrix(planes: Sequence[PlaneGeometry]) -> str | None:
    """A message naming the different matrices and spacings, or None when all slices share them."""
    matrices = sorted({(plane.rows, plane.columns) for plane in planes})
    spacings: list[tuple[float, float]] = []
    for plane in planes:
        if plane.spacing is not None and not any(_same_spacing(plane.spacing, seen) for seen in spacings):
            spacings.append(plane.spacing)
    if len(matrices) <= 1 and len(spacings) <= 1:
        return None
    parts = []
    if len(matrices) > 1:
        parts.append("matrices " + ", ".join(f"{rows}x{columns}" for rows, columns in matrices))
    if len(spacings) > 1:
        parts.append("pixel spacings " + ", ".join(f"{rows:g}x{columns:g} mm" for rows, columns in spacings))
    return "slices differ: " + "; ".join(parts)


def _same_spacing(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(abs(x - y) <= SPACING_TOLERANCE * max(x, y) for x, y in zip(a, b, strict=True))


def _orientation_angle(a: PlaneGeometry, b: PlaneGeometry) -> float:
    """The larger angle (degrees) between the row directions and between the column directions of two planes."""
    cosines = (float(np.dot(a.row_direction(), b.row_direction())),
               float(np.dot(a.column_direction(), b.column_direction())))
    return max(math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in cosines)
