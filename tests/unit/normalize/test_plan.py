"""The in-plane plan keeps the field centre in patient coordinates and gives the field of view the target asks for."""

from __future__ import annotations

import math

import numpy as np
import pytest

from archive.dicom.geometry import Orientation, PlaneGeometry
from archive.normalize.grid import Fit, SpacingKind
from archive.normalize.plan import PlaneTarget, plan_plane, plan_slices
from archive.normalize.stack import analyse_stack

AXIAL: Orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
OBLIQUE: Orientation = (0.6, 0.8, 0.0, 0.48, -0.36, 0.8)  # orthonormal, oblique to every axis
CT_500 = PlaneTarget(rows=512, columns=512, spacing_mm=500 / 512, fit=Fit.PAD_CROP, allow_upsample=False)


def _geometry(rows: int, columns: int, spacing: tuple[float, float] | None,
              orientation: Orientation | None = AXIAL,
              kind: SpacingKind = SpacingKind.PATIENT) -> PlaneGeometry:
    return PlaneGeometry(rows=rows, columns=columns, spacing=spacing, spacing_kind=kind if spacing else SpacingKind.NONE,
                         orientation=orientation, position=(-174.8, -187.3, -194.75) if orientation else None,
                         frame_of_reference_uid="1.2.3")


SOURCES = {
    "axial CT 512 at 0.826": _geometry(512, 512, (0.826172, 0.826172)),
    "axial CT 616 at 0.87": _geometry(616, 616, (0.87, 0.87)),
    "oblique 300x200 at 0.7x0.9": _geometry(300, 200, (0.7, 0.9), OBLIQUE),
    "oblique 64x96 at 3.3x2.1": _geometry(64, 96, (3.3, 2.1), OBLIQUE),
}
TARGETS = {
    "pad-crop 512 at 500 mm": CT_500,
    "pad-crop 256x200 at 1 mm": PlaneTarget(rows=256, columns=200, spacing_mm=1.0, fit=Fit.PAD_CROP,
                                            allow_upsample=True),
    "scale 256x256": PlaneTarget(rows=256, columns=256, spacing_mm=None, fit=Fit.SCALE, allow_upsample=True),
    "scale 128x300": PlaneTarget(rows=128, columns=300, spacing_mm=1.0, fit=Fit.SCALE, allow_upsample=True),
}


@pytest.mark.parametrize("target", TARGETS.values(), ids=TARGETS.keys())
@pytest.mark.parametrize("source", SOURCES.values(), ids=SOURCES.keys())
def test_the_field_centre_stays_in_place(source: PlaneGeometry, target: PlaneTarget) -> None:
    plan = plan_plane(source, target)
    centre = source.centre()
    assert centre is not None
    np.testing.assert_allclose(plan.output.centre(), centre, atol=1e-6)
    # the output geometry and the index maps describe the same grid, corner to corner
    for k, j in [(0, 0), (target.rows - 1, 0), (0, target.columns - 1), (target.rows - 1, target.columns - 1)]:
        np.testing.assert_allclose(
            plan.output.pixel_to_patient(k, j),
            source.pixel_to_patient(float(plan.rows.source_index(k)), float(plan.columns.source_index(j))),
            atol=1e-6)
    assert plan.output.orientation == source.orientation and plan.output.spacing_kind is source.spacing_kind
    assert plan.scale == (plan.rows.step, plan.columns.step)


@pytest.mark.parametrize("source", SOURCES.values(), ids=SOURCES.keys())
def test_pad_crop_gives_the_target_field_of_view(source: PlaneGeometry) -> None:
    plan = plan_plane(source, CT_500)
    assert plan.output.spacing == (500 / 512, 500 / 512)
    assert plan.output.field_mm() == pytest.approx((500.0, 500.0), abs=1e-9)
    assert source.spacing is not None
    assert plan.scale == pytest.approx((500 / 512 / source.spacing[0], 500 / 512 / source.spacing[1]), rel=1e-12)


@pytest.mark.parametrize("target", [TARGETS["scale 256x256"], TARGETS["scale 128x300"]], ids=["256x256", "128x300"])
@pytest.mark.parametrize("source", SOURCES.values(), ids=SOURCES.keys())
def test_scale_fits_the_whole_field(source: PlaneGeometry, target: PlaneTarget) -> None:
    plan = plan_plane(source, target)
    field, fitted = source.field_mm(), plan.output.field_mm()
    assert field is not None and fitted is not None and plan.output.spacing is not None
    assert fitted[0] >= field[0] - 1e-9 and fitted[1] >= field[1] - 1e-9  # nothing cropped
    assert min(fitted[0] - field[0], fitted[1] - field[1]) == pytest.approx(0.0, abs=1e-9)  # one side fills
    assert plan.output.spacing[0] == plan.output.spacing[1]  # square pixels
    assert min(plan.pad_crop.values()) >= 0


def test_padding_and_cropping_in_pixels() -> None:
    padded = plan_plane(SOURCES["axial CT 512 at 0.826"], CT_500)
    # (500 - 512 * 0.826172) / 2 = 38.51 mm on each side = 39.4 output pixels of 0.977 mm
    assert padded.pad_crop == {"top": 39, "bottom": 39, "left": 39, "right": 39}
    cropped = plan_plane(SOURCES["axial CT 616 at 0.87"], CT_500)
    # (616 * 0.87 - 500) / 2 = 17.96 mm on each side = 20.6 source pixels of 0.87 mm
    assert cropped.pad_crop == {"top": -21, "bottom": -21, "left": -21, "right": -21}
    assert not padded.upsamples and not cropped.upsamples and padded.notes == []


def test_non_square_pixels_become_square_without_counting_as_upsampling() -> None:
    source = SOURCES["oblique 300x200 at 0.7x0.9"]
    plan = plan_plane(source, PlaneTarget(rows=256, columns=255, spacing_mm=0.8, fit=Fit.PAD_CROP,
                                          allow_upsample=False))
    assert plan.scale == pytest.approx((0.8 / 0.7, 0.8 / 0.9))
    assert plan.output.spacing == (0.8, 0.8) and not plan.upsamples
    # rows: 300 * 0.7 = 210 mm inside 204.8 mm: cropped 2.6 mm = 3.7 source pixels each side
    # columns: 200 * 0.9 = 180 mm inside 255 * 0.8 = 204 mm: padded 12 mm = 15 output pixels each side
    assert plan.pad_crop == {"top": -4, "bottom": -4, "left": 15, "right": 15}


def test_upsampling_is_flagged_and_noted_when_not_allowed() -> None:
    small_mr = _geometry(64, 64, (3.28125, 3.28125))
    denied = plan_plane(small_mr, PlaneTarget(rows=256, columns=256, spacing_mm=1.0, fit=Fit.PAD_CROP,
                                              allow_upsample=False))
    assert denied.upsamples and any("does not allow" in note for note in denied.notes)
    allowed = plan_plane(small_mr, PlaneTarget(rows=256, columns=256, spacing_mm=1.0, fit=Fit.PAD_CROP,
                                               allow_upsample=True))
    assert allowed.upsamples and allowed.notes == []
    same = plan_plane(small_mr, PlaneTarget(rows=64, columns=64, spacing_mm=3.28125, fit=Fit.PAD_CROP,
                                            allow_upsample=False))
    assert not same.upsamples and same.scale == (1.0, 1.0) and same.rows.start == 0.0


def test_without_spacing_the_matrix_alone_is_scaled() -> None:
    ultrasound = _geometry(480, 640, None, orientation=None)
    plan = plan_plane(ultrasound, CT_500)
    assert plan.scale == (1.25, 1.25)  # 640 columns into 512, aspect ratio kept
    assert plan.output.spacing is None and plan.output.spacing_kind is SpacingKind.NONE
    assert plan.output.position is None and "no pixel spacing" in plan.notes[0]
    assert plan.rows.start + (plan.rows.size - 1) / 2 * plan.rows.step == pytest.approx(239.5)
    assert plan.pad_crop == {"top": 64, "bottom": 64, "left": 0, "right": 0}


def test_pad_crop_without_target_spacing_does_not_resample() -> None:
    plan = plan_plane(SOURCES["oblique 300x200 at 0.7x0.9"],
                      PlaneTarget(rows=256, columns=256, spacing_mm=None, fit=Fit.PAD_CROP, allow_upsample=False))
    assert plan.scale == (1.0, 1.0) and plan.output.spacing == (0.7, 0.9)
    assert plan.pad_crop == {"top": -22, "bottom": -22, "left": 28, "right": 28}


def test_detector_spacing_keeps_its_meaning() -> None:
    mammogram = _geometry(512, 512, (0.5, 0.5), orientation=None, kind=SpacingKind.DETECTOR)
    plan = plan_plane(mammogram, PlaneTarget(rows=256, columns=256, spacing_mm=1.0, fit=Fit.PAD_CROP,
                                             allow_upsample=False))
    assert plan.output.spacing_kind is SpacingKind.DETECTOR and plan.output.spacing == (1.0, 1.0)
    assert plan.output.position is None and plan.scale == (2.0, 2.0)
    assert plan.as_dict()["output"]["spacing_kind"] == "detector"


@pytest.mark.parametrize("target", [PlaneTarget(rows=0, columns=5, spacing_mm=1.0, fit=Fit.SCALE, allow_upsample=True),
                                    PlaneTarget(rows=5, columns=5, spacing_mm=-1.0, fit=Fit.PAD_CROP,
                                                allow_upsample=True),
                                    PlaneTarget(rows=5, columns=5, spacing_mm=math.nan, fit=Fit.PAD_CROP,
                                                allow_upsample=True)])
def test_a_malformed_target_is_refused(target: PlaneTarget) -> None:
    with pytest.raises(ValueError, match="target"):
        plan_plane(SOURCES["axial CT 512 at 0.826"], target)


def _axial_stack(zs: list[float]) -> list[PlaneGeometry]:
    return [PlaneGeometry(rows=8, columns=8, spacing=(1.0, 1.0), spacing_kind=SpacingKind.PATIENT, orientation=AXIAL,
                          position=(0.0, 0.0, z), frame_of_reference_uid="1.2.3") for z in zs]


def test_slices_from_first_to_last_position() -> None:
    stack = analyse_stack(_axial_stack([-10.0 + 2.5 * i for i in range(5)]))  # -10 .. 0
    fine = plan_slices(stack, 1.0)
    np.testing.assert_allclose(fine.positions, np.arange(-10.0, 0.5, 1.0))
    assert fine.spacing == fine.thickness == 1.0
    coarse = plan_slices(stack, 3.0)
    np.testing.assert_allclose(coarse.positions, [-10.0, -7.0, -4.0, -1.0])  # never beyond the last slice
    thirds = plan_slices(stack, 10 / 3)
    assert len(thirds.positions) == 4 and thirds.positions[-1] == pytest.approx(0.0)
    assert thirds.as_dict()["positions"][0] == -10.0


def test_slices_refused_for_an_unsafe_stack() -> None:
    with pytest.raises(ValueError, match="share a position"):
        plan_slices(analyse_stack(_axial_stack([0.0, 2.0, 2.0, 4.0])), 1.0)
    with pytest.raises(ValueError, match="positive"):
        plan_slices(analyse_stack(_axial_stack([0.0, 2.0])), 0.0)
