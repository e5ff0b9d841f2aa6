"""The shared vocabulary of normalization: how an output grid maps onto a source grid, and the named choices.

Index space: a pixel's centre sits at its integer index (row ``r``, column
``c``); the pixel covers ``[c - 0.5, c + 0.5]``. An :class:`AxisMap` places
the output samples of one axis in that space, so one map describes a scale,
an offset, a crop and a pad at once, and its inverse is again an AxisMap.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class Interpolation(str, enum.Enum):
    """How output samples are computed from the source (profile key ``interpolation``)."""

    AREA = "area"  # the exact overlap average of the source pixels a target pixel covers: shrinking without aliasing
    NEAREST = "nearest"  # label maps and segmentations: values are never mixed
    LINEAR = "linear"
    CUBIC = "cubic"  # Keys a = -0.5
    LANCZOS = "lanczos"  # Lanczos-3


class Fit(str, enum.Enum):
    """How the source field is placed on the target matrix (profile key ``fit``)."""

    PAD_CROP = "pad-crop"  # the target spacing exactly, the field padded or cropped around its centre
    SCALE = "scale"  # the whole field scaled to fit the matrix, aspect ratio kept (square pixels), then padded


class SpacingKind(str, enum.Enum):
    """What the pixel spacing of an image measures (PS3.3 10.7.1.3)."""

    PATIENT = "patient"  # Pixel Spacing: mm in the patient (cross-sectional images)
    DETECTOR = "detector"  # Imager Pixel Spacing: mm at the detector, magnification included (projection images)
    NONE = "none"  # no usable spacing: scaled by matrix only


class StackWarning(str, enum.Enum):
    """Why a stack of slices is normalized in-plane only (never resampled across slices)."""

    NO_SPACING = "no-spacing"  # missing or zero Pixel Spacing
    NO_POSITION = "no-position"  # missing Image Position / Orientation
    MIXED_ORIENTATIONS = "mixed-orientations"
    MIXED_MATRIX = "mixed-matrix"  # slices of different Rows/Columns/spacing
    GANTRY_TILT = "gantry-tilt"  # positions not along the normal: a sheared stack
    UNEVEN_SPACING = "uneven-spacing"
    DUPLICATE_POSITIONS = "duplicate-positions"
    SINGLE_SLICE = "single-slice"


@dataclass(frozen=True)
class AxisMap:
    """Output sample ``k`` (0 <= k < size) sits at source index ``start + k * step``.

    ``step`` is source samples per output sample: above 1 the axis shrinks.
    """

    size: int
    start: float
    step: float

    def source_index(self, k: np.ndarray | float) -> np.ndarray | float:
        return self.start + np.asarray(k, dtype=np.float64) * self.step if isinstance(k, np.ndarray) \
            else self.start + k * self.step

    def inverse(self, source_size: int) -> AxisMap:
        """The map that places the ``source_size`` source samples on this output axis (for round trips)."""
        return AxisMap(size=source_size, start=-self.start / self.step, step=1.0 / self.step)

    def as_dict(self) -> dict[str, float]:
        return {"size": self.size, "start": self.start, "step": self.step}
