"""Where the normalized grid lies on the source: the in-plane plan of one image and the slice plan of a stack.

The output grid keeps the source's orientation and is centred on the source
field's centre: output index ((R - 1) / 2, (C - 1) / 2) maps to source index
((R_src - 1) / 2, (C_src - 1) / 2), so the centre in patient coordinates is the
same before and after, whatever the scale. Everything is expressed as
:class:`AxisMap` s in index space (see :mod:`archive.normalize.grid`); the
output :class:`PlaneGeometry` is what the derived header declares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from archive.dicom.geometry import PlaneGeometry
from archive.normalize.grid import AxisMap, Fit, SpacingKind
from archive.normalize.stack import StackAnalysis

UPSAMPLE_TOLERANCE = 1e-6  # relative: an output spacing this close to the source's is not an enlargement
SLICE_COUNT_TOLERANCE = 1e-6  # a last slice short of the extent by this fraction of a spacing still counts


@dataclass(frozen=True)
class PlaneTarget:
    """What a profile asks of each plane."""

    rows: int
    columns: int
    spacing_mm: float | None  # square output pixels; None with PAD_CROP: pad or crop at the source spacing
    fit: Fit
    allow_upsample: bool


@dataclass(frozen=True)
class PlanePlan:
    """The in-plane transform of one image, and the geometry of its result.

    ``pad_crop`` per side (top, bottom, left, right): a positive value is the
    number of output pixels lying outside the source field on that side
    (padding); a negative value is minus the number of source pixels of that
    side left outside the output field (cropping). Both are rounded to whole
    pixels; 0 means the fields' edges meet within half a pixel.
    """

    rows: AxisMap
    columns: AxisMap
    output: PlaneGeometry  # same orientation; new rows, columns, spacing and position; same spacing_kind
    scale: tuple[float, float]  # source pixels per output pixel (rows, columns) = the AxisMap steps
    pad_crop: dict[str, int]
    upsamples: bool  # output spacing finer than the source's finest axis
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows.as_dict(),
            "columns": self.columns.as_dict(),
            "output": self.output.as_dict(),
            "scale": list(self.scale),
            "pad_crop": dict(self.pad_crop),
            "upsamples": self.upsamples,
            "notes": list(self.notes),
        }


def plan_plane(source: PlaneGeometry, target: PlaneTarget) -> PlanePlan:
    """Place ``target``'s grid on ``source``, centred on its field centre.

    PAD_CROP keeps ``target.spacing_mm`` exactly and pads or crops the field;
    SCALE fits the whole field into the matrix with square pixels of
    ``max(R_src * sr / R, C_src * sc / C)`` mm and pads the short side. A
    source without spacing is scaled by matrix alone (square in pixel units).
    The plan never refuses to enlarge: ``upsamples`` says it does, and a note
    says so when ``target.allow_upsample`` is False, for the caller to decide.
    """
    _check(source, target)
    notes: list[str] = []
    spacing: tuple[float, float] | None
    if source.spacing is None:
        step = max(source.rows / target.rows, source.columns / target.columns)
        steps, spacing = (step, step), None
        notes.append("no pixel spacing: scaled by matrix only")
        upsamples = step < 1 - UPSAMPLE_TOLERANCE
    else:
        source_rows, source_columns = source.spacing
        if target.fit is Fit.SCALE:
            size = max(source.rows * source_rows / target.rows, source.columns * source_columns / target.columns)
        elif target.spacing_mm is None:
            size = None
            notes.append("no target spacing: padded or cropped at the source spacing, not resampled")
        else:
            size = target.spacing_mm
        if size is None:
            steps, spacing = (1.0, 1.0), source.spacing
        else:
            steps, spacing = (size / source_rows, size / source_columns), (size, size)
        upsamples = size is not None and size < min(source.spacing) * (1 - UPSAMPLE_TOLERANCE)
    if source.spacing_kind is SpacingKind.DETECTOR:
        notes.append("Imager Pixel Spacing: millimetres at the detector, magnification included")
    if upsamples and not target.allow_upsample:
        notes.append(f"enlarges the source {1 / min(steps):.3g} times, which the target does not allow")
    rows = _centred(source.rows, target.rows, steps[0])
    columns = _centred(source.columns, target.columns, steps[1])
    position = None
    if source.position is not None and source.orientation is not None and source.spacing is not None:
        corner = source.pixel_to_patient(rows.start, columns.start)
        position = (float(corner[0]), float(corner[1]), float(corner[2]))
    output = PlaneGeometry(rows=target.rows, columns=target.columns, spacing=spacing,
                           spacing_kind=source.spacing_kind if spacing is not None else SpacingKind.NONE,
                           orientation=source.orientation, position=position,
                           frame_of_reference_uid=source.frame_of_reference_uid)
    top, bottom = _edges(source.rows, rows)
    left, right = _edges(source.columns, columns)
    return PlanePlan(rows=rows, columns=columns, output=output, scale=steps,
                     pad_crop={"top": top, "bottom": bottom, "left": left, "right": right},
                     upsamples=upsamples, notes=notes)


@dataclass(frozen=True, eq=False)
class SlicePlan:
    """Output slice positions along the stack normal (mm, ascending, as in :class:`StackAnalysis`)."""

    positions: np.ndarray
    spacing: float
    thickness: float

    def as_dict(self) -> dict[str, Any]:
        return {"positions": [float(p) for p in self.positions], "spacing": self.spacing,
                "thickness": self.thickness}


def plan_slices(stack: StackAnalysis, spacing_mm: float) -> SlicePlan:
    """Slices every ``spacing_mm`` from the first source position up to the last (never beyond it).

    Only for a stack that may be resampled across slices (``stack.across_ok``):
    anything else raises ValueError with the stack's own messages.
    """
    if not (math.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"slice spacing must be a positive number of mm, not {spacing_mm!r}")
    if not stack.across_ok or stack.positions is None:
        raise ValueError("the stack cannot be resampled across slices: " + "; ".join(stack.messages))
    first, last = stack.positions[0], stack.positions[-1]
    count = math.floor((last - first) / spacing_mm + SLICE_COUNT_TOLERANCE) + 1
    positions = first + np.arange(count, dtype=np.float64) * spacing_mm
    return SlicePlan(positions=positions, spacing=float(spacing_mm), thickness=float(spacing_mm))


def _check(source: PlaneGeometry, target: PlaneTarget) -> None:
    if source.rows < 1 or source.columns < 1:
        raise ValueError(f"the source has no pixels ({source.rows}x{source.columns})")
    if target.rows < 1 or target.columns < 1:
        raise ValueError(f"the target matrix must be at least 1x1, not {target.rows}x{target.columns}")
    if target.spacing_mm is not None and not (math.isfinite(target.spacing_mm) and target.spacing_mm > 0):
        raise ValueError(f"the target spacing must be a positive number of mm, not {target.spacing_mm!r}")


def _centred(source_size: int, size: int, step: float) -> AxisMap:
    """The axis whose middle sample sits on the source's middle sample."""
    return AxisMap(size=size, start=(source_size - 1) / 2 - (size - 1) / 2 * step, step=step)


def _edges(source_size: int, axis: AxisMap) -> tuple[int, int]:
    """(low side, high side) padding (+, output pixels) or cropping (-, source pixels), as in :class:`PlanePlan`."""
    low = axis.start - axis.step / 2  # the output field's edges, in source index units
    high = axis.start + (axis.size - 1) * axis.step + axis.step / 2
    before, after = -0.5 - low, high - (source_size - 0.5)  # > 0: the output reaches past the source
    return _side(before, axis.step), _side(after, axis.step)


def _side(overhang: float, step: float) -> int:
    if overhang > 0:
        return math.floor(overhang / step + 0.5)
    return -math.floor(-overhang + 0.5)
