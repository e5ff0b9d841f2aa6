"""Resampling by weight matrices: kernels, edges and padding, dtypes, frames, slices, round-trip error."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from scipy import ndimage

from archive.normalize.grid import AxisMap, Interpolation
from archive.normalize.resample import (
    axis_weights,
    resample_plane,
    resample_slices,
    round_trip_error,
)
from tests.conftest import shared_data

ALL = list(Interpolation)


def covering(source_size: int, size: int) -> AxisMap:
    """``size`` samples whose footprints tile the source exactly: the same field, another matrix."""
    step = source_size / size
    return AxisMap(size=size, start=-0.5 + step / 2.0, step=step)


def smooth(rows: int, columns: int) -> npt.NDArray[np.float64]:
    r, c = np.mgrid[0:rows, 0:columns].astype(np.float64)
    image: npt.NDArray[np.float64] = 1000.0 + 400.0 * np.sin(r / 17.0) * np.cos(c / 23.0) + 3.0 * r - 2.0 * c
    return image


@pytest.mark.parametrize("kernel", ALL)
def test_constant_stays_constant_inside_and_pad_outside(kernel: Interpolation) -> None:
    image = np.full((40, 50), 1234, dtype=np.int16)
    rows = AxisMap(size=30, start=-10.0, step=1.7)  # reaches 10 samples above and ~0 below the source
    columns = AxisMap(size=70, start=-5.0, step=0.8)  # enlarges and overhangs both sides
    out = resample_plane(image, rows, columns, kernel, pad_value=-2000)
    assert out.dtype == np.int16 and out.shape == (30, 70)
    _, cov_r = axis_weights(40, rows, kernel)
    _, cov_c = axis_weights(50, columns, kernel)
    inside = np.outer(cov_r, cov_c) >= 0.5
    assert np.all(out[inside] == 1234)
    assert np.all(out[~inside] == -2000)
    # the field edge lies where the geometry puts it: sample centres within about half a source pixel
    centres_r = rows.start + np.arange(30) * rows.step
    assert np.all(inside[np.abs(centres_r - 19.5) < 19.5, 35]) and not inside[centres_r < -1.5].any()


def test_weights_rows_sum_to_one_and_coverage_at_edges() -> None:
    axis = AxisMap(size=6, start=-1.0, step=1.0)  # samples at -1, 0, 1, 2, 3, 4 on a 4-sample source
    for kernel in ALL:
        weights, coverage = axis_weights(4, axis, kernel)
        sums = np.asarray(weights.sum(axis=1)).ravel()
        assert np.allclose(sums[coverage >= 0.5], 1.0, atol=1e-6), kernel
        assert coverage[1] == pytest.approx(1.0, abs=0.02) and coverage[0] < 0.5, kernel
    _, area = axis_weights(4, AxisMap(size=3, start=-0.5, step=1.0), Interpolation.AREA)
    assert np.allclose(area, [0.5, 1.0, 1.0])


def test_kernel_weights_half_way_between_samples() -> None:
    axis = AxisMap(size=1, start=5.5, step=1.0)
    cubic, _ = axis_weights(12, axis, Interpolation.CUBIC)  # Keys a = -0.5: -1/16, 9/16, 9/16, -1/16
    np.testing.assert_allclose(cubic.toarray()[0, 4:8], [-0.0625, 0.5625, 0.5625, -0.0625], atol=1e-7)
    lanczos, _ = axis_weights(12, axis, Interpolation.LANCZOS)
    t = np.arange(3, 9) - 5.5
    expected = np.sinc(t) * np.sinc(t / 3.0)
    np.testing.assert_allclose(lanczos.toarray()[0, 3:9], expected / expected.sum(), atol=1e-7)
    linear, _ = axis_weights(12, AxisMap(size=1, start=5.5, step=2.0), Interpolation.LINEAR)  # stretched by 2
    np.testing.assert_allclose(linear.toarray()[0, 4:8], [0.125, 0.375, 0.375, 0.125], atol=1e-7)


@pytest.mark.parametrize(
    ("kernel", "steps", "tolerance"),
    [
        (Interpolation.LINEAR, (0.9, 0.73), 1e-9),  # plain linear interpolation: exact
        # the stretched triangle (antialiasing, as Pillow) sampled at integers: its centroid moves by up to
        # 0.066 pixel at these steps (measured), so allow 0.08 pixel on each axis times the slopes
        (Interpolation.LINEAR, (1.1, 1.3), 0.08 * (2.5 + 1.25)),
    ],
)
def test_a_ramp_is_reproduced_at_interior_samples(
    kernel: Interpolation, steps: tuple[float, float], tolerance: float
) -> None:
    ramp = np.arange(60, dtype=np.float64)[:, None] * 2.5 + np.arange(80)[None, :] * -1.25 + 7.0
    rows = AxisMap(size=int(50 / steps[0]), start=3.3, step=steps[0])
    columns = AxisMap(size=int(70 / steps[1]), start=1.7, step=steps[1])
    out = resample_plane(ramp, rows, columns, kernel, pad_value=0.0)
    r = rows.start + np.arange(rows.size) * rows.step
    c = columns.start + np.arange(columns.size) * columns.step
    expected = r[:, None] * 2.5 + c[None, :] * -1.25 + 7.0
    margin = 2.0 * max(steps)  # the kernel support stays inside the source
    interior = (r[:, None] > margin) & (r[:, None] < 59 - margin) & (c[None, :] > margin) & (c[None, :] < 79 - margin)
    assert interior.sum() > 500
    np.testing.assert_allclose(out[interior], expected[interior], rtol=0, atol=tolerance)


@pytest.mark.parametrize("kernel", ALL)
def test_shrinking_does_not_alias_except_nearest(kernel: Interpolation) -> None:
    stripes = np.tile(np.array([0.0, 1000.0]), (20, 60))  # the finest pattern there is, mean 500
    out = resample_plane(stripes, AxisMap(20, 0.0, 1.0), AxisMap(44, 3.0, 2.5), kernel, pad_value=0.0)
    spread = float(out[5:15, 2:-2].std())
    if kernel is Interpolation.NEAREST:
        assert spread > 400.0  # point sampling a period-2 pattern aliases at full amplitude
    else:  # measured: area 71, linear 27, cubic 3.4, Lanczos 0.9; without the stretched support linear gives ~350
        assert spread < 100.0 and abs(float(out[5:15, 2:-2].mean()) - 500.0) < 5.0


def test_area_factor_two_is_the_block_mean() -> None:
    image = np.random.default_rng(1).uniform(-1000, 3000, (64, 48))
    out = resample_plane(image, covering(64, 32), covering(48, 24), Interpolation.AREA, pad_value=0.0)
    blocks = image.reshape(32, 2, 24, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(out, blocks, rtol=0, atol=1e-9)
    as_int = resample_plane(image.astype(np.int16), covering(64, 32), covering(48, 24), Interpolation.AREA, pad_value=0)
    expected = np.rint(image.astype(np.int16).reshape(32, 2, 24, 2).mean(axis=(1, 3)))
    assert np.abs(as_int.astype(np.int64) - expected).max() <= 1  # float32 inside: .5 ties may round either way


def test_area_conserves_the_mean_when_the_map_covers_the_image() -> None:
    image = np.random.default_rng(2).normal(100.0, 40.0, (616, 616))
    out = resample_plane(image, covering(616, 512), covering(616, 512), Interpolation.AREA, pad_value=0.0)
    assert out.mean() == pytest.approx(image.mean(), abs=1e-9)


def test_nearest_never_creates_values() -> None:
    labels = np.random.default_rng(3).choice(np.array([0, 3, 7, 250], dtype=np.uint8), size=(37, 41))
    out = resample_plane(labels, AxisMap(50, -0.3, 0.71), AxisMap(20, 0.4, 2.03), Interpolation.NEAREST, pad_value=0)
    assert set(np.unique(out)) <= {0, 3, 7, 250}
    assert out[10, 5] == labels[int(np.floor(-0.3 + 10 * 0.71 + 0.5)), int(np.floor(0.4 + 5 * 2.03 + 0.5))]


@pytest.mark.parametrize("kernel", [Interpolation.CUBIC, Interpolation.LANCZOS])
@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
def test_overshoot_is_clipped(kernel: Interpolation, dtype: type[np.integer]) -> None:
    info = np.iinfo(dtype)
    edge = np.full((16, 32), info.min, dtype=dtype)
    edge[:, 16:] = info.max  # a full-range step: cubic and Lanczos ring past both ends
    axis = AxisMap(size=64, start=0.0, step=0.49)
    unclipped = resample_plane(edge.astype(np.float64), AxisMap(16, 0.0, 1.0), axis, kernel, pad_value=0.0)
    assert unclipped.max() > info.max and unclipped.min() < info.min  # the test can fail: ringing exists
    out = resample_plane(edge, AxisMap(16, 0.0, 1.0), axis, kernel, pad_value=0)
    assert out.min() == info.min and out.max() == info.max
    stored = resample_plane(edge, AxisMap(16, 0.0, 1.0), axis, kernel, pad_value=0, value_range=(100, 4000))
    assert stored.min() == 100 and stored.max() == 4000


def test_colour_equals_per_channel_and_frames_equal_per_frame() -> None:
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    rows, columns = AxisMap(25, -1.0, 1.3), AxisMap(50, 0.2, 0.77)
    colour = resample_plane(rgb, rows, columns, Interpolation.CUBIC, pad_value=0)
    for channel in range(3):
        alone = resample_plane(np.ascontiguousarray(rgb[..., channel]), rows, columns, Interpolation.CUBIC, pad_value=0)
        np.testing.assert_array_equal(colour[..., channel], alone)
    stack = rng.integers(-1000, 2000, (5, 30, 40), dtype=np.int16)
    frames = resample_plane(stack, rows, columns, Interpolation.LANCZOS, pad_value=-1024, frames=True)
    assert frames.shape == (5, 25, 50)
    for k in range(5):
        alone = resample_plane(stack[k], rows, columns, Interpolation.LANCZOS, pad_value=-1024)
        np.testing.assert_array_equal(frames[k], alone)
    assert (frames == -1024).any()  # the rows map overhangs: padding is applied to every frame


def test_deterministic_bytes() -> None:
    image = np.random.default_rng(5).integers(-1024, 3000, (616, 616), dtype=np.int16)
    axis = AxisMap(size=512, start=0.1, step=0.9765625 / 0.873)
    first = resample_plane(image, axis, axis, Interpolation.AREA, pad_value=-2000)
    second = resample_plane(image.copy(), axis, axis, Interpolation.AREA, pad_value=-2000)
    assert first.tobytes() == second.tobytes()


def test_slices_linear_mix_and_contributors() -> None:
    volume = np.stack([np.full((4, 5), v, dtype=np.int16) for v in (0, 100, 200, 600)])
    positions = np.array([10.0, 12.5, 15.0, 17.5])
    targets = np.array([10.0, 11.0, 13.75, 16.5, 17.5, 20.0])
    out, contributors = resample_slices(volume, positions, targets, Interpolation.LINEAR, pad_value=-1)
    assert out[:, 0, 0].tolist() == [0, 40, 150, 440, 600, -1]
    assert contributors == [[0], [0, 1], [1, 2], [2, 3], [3], []]
    area, parts = resample_slices(volume, positions, np.array([11.25, 16.25]), Interpolation.AREA, pad_value=-1)
    assert area[:, 0, 0].tolist() == [50, 400]  # slabs of 5 mm: [8.75, 13.75] and [13.75, 18.75]
    assert parts == [[0, 1], [2, 3]]
    nearest, picks = resample_slices(volume, positions, targets, Interpolation.NEAREST, pad_value=-1)
    assert nearest[:, 0, 0].tolist() == [0, 0, 200, 600, 600, -1] and picks[1] == [0]
    with pytest.raises(ValueError):
        resample_slices(volume, positions, targets, Interpolation.CUBIC, pad_value=-1)


def test_linear_agrees_with_map_coordinates_when_enlarging() -> None:
    image = smooth(70, 90).astype(np.float32) + np.random.default_rng(6).normal(0, 20, (70, 90)).astype(np.float32)
    rows, columns = AxisMap(120, 1.3, 0.55), AxisMap(150, 0.7, 0.57)
    out = resample_plane(image, rows, columns, Interpolation.LINEAR, pad_value=0.0)
    r = rows.start + np.arange(rows.size) * rows.step
    c = columns.start + np.arange(columns.size) * columns.step
    grid = np.meshgrid(r, c, indexing="ij")
    reference = ndimage.map_coordinates(image.astype(np.float64), grid, order=1)
    interior = (grid[0] < 69.0) & (grid[1] < 89.0)
    assert interior.sum() > 15000
    np.testing.assert_allclose(out[interior], reference[interior], rtol=1e-3, atol=0)


def test_round_trip_of_an_enlargement_is_nearly_exact() -> None:
    image = smooth(100, 100)
    rows = columns = covering(100, 173)
    enlarged = resample_plane(image, rows, columns, Interpolation.LINEAR, pad_value=0.0)
    error = round_trip_error(image, enlarged, rows, columns)
    assert error.pixels > 0.9 * image.size
    assert error.rmse < 0.5 and error.max_abs < 2.0  # of a 1000 +- 700 image
    nothing = round_trip_error(image, enlarged * 0.0, rows, columns)
    assert nothing.rmse > 500.0  # a blank image cannot pass


def test_round_trip_error_of_a_real_ct_shrink(tmp_path: Path) -> None:
    original = shared_data() / "ct-chest-tcia" / "A002304" / "axial" / "19001231-076.dcm"
    copy = tmp_path / "ct.dcm"
    shutil.copyfile(original, copy)
    pixels = pydicom.dcmread(copy).pixel_array  # int16 stored values, -2000 outside the reconstruction circle
    assert pixels.shape == (512, 512) and pixels.dtype == np.int16
    axis = covering(512, 400)
    small = resample_plane(pixels, axis, axis, Interpolation.AREA, pad_value=-2000)
    error = round_trip_error(pixels, small, axis, axis)
    assert error.pixels == 512 * 512 - 4 * 511  # all but the outermost ring, where LINEAR back overhangs
    # measured on this slice: rmse 65.5, max 1384 stored units (= HU, slope 1); 400/512 of the resolution loses
    # noise and fine lung detail, and the -2000 edge of the reconstruction circle gives the maximum
    assert error.rmse < 70.0 and error.max_abs < 1500.0
    flipped = round_trip_error(pixels, np.ascontiguousarray(small[::-1]), axis, axis)
    assert flipped.rmse > 5 * error.rmse  # a flipped copy cannot pass
