"""A real MR series is one regular stack; each way a stack can fail is detected and named with its figures."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pydicom
import pytest

from archive.dicom.geometry import Orientation, PlaneGeometry, plane_geometries
from archive.normalize.grid import SpacingKind, StackWarning
from archive.normalize.stack import analyse_stack
from tests.conftest import shared_data

AXIAL: Orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _plane(z: float, *, y: float = 0.0, orientation: Orientation | None = AXIAL, rows: int = 8,
           spacing: tuple[float, float] | None = (1.0, 1.0)) -> PlaneGeometry:
    return PlaneGeometry(rows=rows, columns=8, spacing=spacing,
                         spacing_kind=SpacingKind.PATIENT if spacing else SpacingKind.NONE,
                         orientation=orientation, position=(0.0, y, z),
                         frame_of_reference_uid="1.2.3")


def _stack(zs: list[float]) -> list[PlaneGeometry]:
    return [_plane(z) for z in zs]


def test_real_mr_series_is_one_regular_stack(tmp_path: Path) -> None:
    folder = shared_data() / "mr-siemens-prisma" / "8_gre_fm_siemens_baseline"
    paths = sorted(folder.glob("*.dcm"))
    planes = []
    for path in reversed(paths):  # given in reverse: the analysis sorts them
        target = tmp_path / path.name
        shutil.copyfile(path, target)
        planes += plane_geometries(pydicom.dcmread(target, stop_before_pixels=True))
    stack = analyse_stack(planes)
    assert stack.warnings == [] and stack.messages == [] and stack.across_ok
    assert stack.slice_spacing == pytest.approx(3.0, abs=1e-6)
    assert stack.order == list(range(len(paths) - 1, -1, -1))
    assert stack.positions is not None and len(stack.positions) == 40
    assert stack.positions[0] == pytest.approx(-134.21807861328, abs=1e-6)
    assert stack.positions[-1] - stack.positions[0] == pytest.approx(39 * 3.0, abs=1e-4)  # float32 positions in the headers


def test_small_jitter_is_tolerated() -> None:
    tilted_a_little = math.tan(math.radians(0.3)) * 2.0
    planes = [_plane(z, y=i * tilted_a_little) for i, z in enumerate([0.0, 2.03, 3.99, 6.0])]
    stack = analyse_stack(planes)
    assert stack.across_ok, stack.messages
    assert stack.slice_spacing == pytest.approx(2.0, abs=0.02)


def test_shuffled_input_is_sorted() -> None:
    stack = analyse_stack(_stack([4.0, 0.0, 6.0, 2.0]))
    assert stack.order == [1, 3, 0, 2] and stack.positions == [0.0, 2.0, 4.0, 6.0] and stack.across_ok


def test_single_slice() -> None:
    stack = analyse_stack(_stack([5.0]))
    assert stack.warnings == [StackWarning.SINGLE_SLICE] and not stack.across_ok
    assert stack.order == [0] and stack.positions == [5.0] and stack.slice_spacing is None


def test_gantry_tilt_reports_the_angle() -> None:
    shift = 2.0 * math.tan(math.radians(20.0))  # each slice 2 mm up and shifted along y: a 20 degree tilt
    stack = analyse_stack([_plane(2.0 * i, y=shift * i) for i in range(5)])
    assert stack.warnings == [StackWarning.GANTRY_TILT]
    assert "20.00°" in stack.messages[0]
    assert stack.slice_spacing == pytest.approx(2.0)


def test_duplicate_positions() -> None:
    stack = analyse_stack(_stack([0.0, 2.0, 2.0, 4.0, 6.0]))
    assert stack.warnings == [StackWarning.DUPLICATE_POSITIONS]
    assert "1 pair" in stack.messages[0] and "2.00 mm" in stack.messages[0]
    assert stack.slice_spacing == pytest.approx(2.0)  # the duplicate's zero gap does not drag the median


def test_uneven_spacing_reports_min_and_max_gaps() -> None:
    stack = analyse_stack(_stack([0.0, 2.0, 4.0, 7.0, 9.0]))
    assert stack.warnings == [StackWarning.UNEVEN_SPACING]
    assert "2.000 to 3.000 mm" in stack.messages[0] and "median 2.000" in stack.messages[0]


def test_mixed_orientations_report_the_angle() -> None:
    a = math.radians(2.0)
    turned = (math.cos(a), math.sin(a), 0.0, -math.sin(a), math.cos(a), 0.0)  # 2 degrees in-plane
    planes = _stack([0.0, 2.0, 4.0]) + [_plane(6.0, orientation=turned)]
    stack = analyse_stack(planes)
    assert stack.warnings == [StackWarning.MIXED_ORIENTATIONS] and "2.00°" in stack.messages[0]


def test_mixed_matrix_and_spacing() -> None:
    planes = _stack([0.0, 2.0]) + [_plane(4.0, rows=6, spacing=(0.7, 0.9))]
    stack = analyse_stack(planes)
    assert stack.warnings == [StackWarning.MIXED_MATRIX]
    assert "6x8" in stack.messages[0] and "8x8" in stack.messages[0] and "0.7x0.9 mm" in stack.messages[0]


def test_missing_position_keeps_the_input_order() -> None:
    planes = _stack([4.0, 0.0]) + [_plane(2.0, orientation=None)]
    stack = analyse_stack(planes)
    assert stack.warnings == [StackWarning.NO_POSITION] and "1 of 3" in stack.messages[0]
    assert stack.order == [0, 1, 2] and stack.positions is None and not stack.across_ok


def test_missing_spacing() -> None:
    stack = analyse_stack([_plane(z, spacing=None) for z in (0.0, 2.0, 4.0)])
    assert stack.warnings == [StackWarning.NO_SPACING] and "3 of 3" in stack.messages[0]
    assert stack.positions == [0.0, 2.0, 4.0]  # the positions are still known
