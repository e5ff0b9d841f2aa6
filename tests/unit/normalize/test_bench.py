"""``medarchive bench normalize`` on a few real slices: every method timed, the ratios made from those figures."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from archive.cli import app
from archive.normalize.bench import (
    COUNTERPART,
    INGEST_GOAL,
    LABELS,
    NORMALIZE_GOAL,
    RESAMPLE_GOAL,
    Method,
    collect_slices,
    print_normalize_benchmark,
    synthetic_616,
)
from tests.conftest import shared_data

CT_FILES = ["ct-chest-tcia/A002304/axial/19001231-076.dcm", "ct-chest-tcia/A002304/axial/19010112-135.dcm"]
MR_FILES = [f"mr-siemens-prisma/8_gre_fm_siemens_baseline/00{i}_e2_ph.dcm" for i in (1, 2)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two axial CT slices (0.64 and 0.83 mm: both shrink to 0.977 mm) and two 64² MR slices (3.3 mm: enlarge)."""
    target = tmp_path_factory.mktemp("bench-normalize")
    for name in CT_FILES + MR_FILES:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data() / name, target / name)
        (target / name).chmod(0o644)
    return target


@pytest.fixture(scope="module")
def result(folder: Path) -> dict[str, Any]:
    args = ["bench", "normalize", str(folder), "--slices", "2", "--repeat", "2", "--ingest", "--ingest-repeat", "1",
            "--json"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, (done.output, done.exception)
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def test_every_case_times_every_method_and_the_ratios_come_from_those_times(result: dict[str, Any]) -> None:
    cases = {case["name"]: case for case in result["cases"]}
    assert set(cases) == {"CT 512×512 shrink", "CT 616×616 (made) shrink", "MR 64×64 enlarge"}
    assert result["files_read"] == 4 and result["left_out"] == {}
    for case in cases.values():
        assert case["slices"] == 2
        ms = case["ms_per_slice"]
        assert set(ms) == {m.value for m in Method}
        assert all(math.isfinite(v) and v > 0 for v in ms.values()), ms
        default = case["default_interpolation"]
        assert default == ("area" if case["shrinking"] else "cubic")
        jpegls = ms[Method.JPEGLS.value]
        ratios = case["ratios"]
        assert ratios["resample_over_jpegls"] == pytest.approx(ms[default] / jpegls, rel=1e-12)
        assert ratios["normalize_over_jpegls"] == pytest.approx(ms[Method.NORMALIZE.value] / jpegls, rel=1e-12)
        goals = case["goals"]
        assert goals["resample_over_jpegls"]["met"] == (ratios["resample_over_jpegls"] <= RESAMPLE_GOAL)
        assert goals["normalize_over_jpegls"]["met"] == (ratios["normalize_over_jpegls"] <= NORMALIZE_GOAL)
        assert set(case["agreement"]) == {m.value for m in COUNTERPART}
        assert case["goal_applies"] == (case["modality"] == "CT")
    made = cases["CT 616×616 (made) shrink"]
    assert made["source"]["spacing_mm"] == pytest.approx([0.87, 0.87])
    assert made["target"] == {"rows": 512, "columns": 512, "spacing_mm": pytest.approx(500 / 512)}
    assert made["scale"] == pytest.approx([500 / 512 / 0.87] * 2)
    mr = cases["MR 64×64 enlarge"]
    assert mr["target"] == {"rows": 256, "columns": 256, "spacing_mm": pytest.approx(1.0)}
    # Enlarging, ours linear is plain bilinear on the same grid: SimpleITK's result differs by its rounding only.
    assert mr["agreement"][Method.SITK_LINEAR.value] < 1.0
    # The same grid, not a shifted or flipped one: on the 616² slices the exact-grid references stay within a few HU.
    for method in (Method.SITK_LINEAR, Method.SITK_BSPLINE, Method.CV_WARP_CUBIC):
        assert made["agreement"][method.value] < 10.0, (method, made["agreement"])


def test_ingest_is_measured_both_ways(result: dict[str, Any]) -> None:
    ingest = result["ingest"]
    off, on = ingest["off"], ingest["on"]
    assert ingest["files"] == 2 and off["instances"] == on["instances"] == 2
    assert off["normalized_instances"] == 0 and off["normalized_series"] == {}
    assert on["normalized_instances"] == 2 and on["normalized_series"] == {"normalized": 2}
    assert all(math.isfinite(r["instances_per_s"]) and r["instances_per_s"] > 0 for r in (off, on))
    assert ingest["ratio"] == pytest.approx(on["instances_per_s"] / off["instances_per_s"], rel=1e-12)
    assert ingest["goal"]["met"] == (ingest["ratio"] >= INGEST_GOAL)


def test_the_printed_table_shows_every_method_and_the_verdicts(result: dict[str, Any]) -> None:
    out = io.StringIO()
    print_normalize_benchmark(result, Console(file=out, width=220))
    text = out.getvalue()
    assert all(label in text for label in LABELS.values())
    assert text.count("goal <= 0.5:") == 3 and "goal >= 0.5:" in text


def test_the_616_copy_keeps_the_field_centre_and_the_values(folder: Path) -> None:
    chosen, _files, _left = collect_slices(folder, 2)
    source = chosen["CT"][0]
    made = synthetic_616(source)
    assert made.pixels.shape == (616, 616) and made.pixels.dtype == source.pixels.dtype
    assert made.plane.spacing == pytest.approx((0.87, 0.87))
    centre, moved = source.plane.centre(), made.plane.centre()
    assert centre is not None and moved is not None
    np.testing.assert_allclose(moved, centre, atol=1e-3)  # mm
    # A 40 mm square around the centre: the same anatomy, so nearly the same mean (stored values, HU + 1024 here).
    half_src = round(20 / source.plane.spacing[0]) if source.plane.spacing else 0
    s_mid, m_mid = (source.pixels.shape[0] - 1) // 2, (616 - 1) // 2
    a = source.pixels[s_mid - half_src:s_mid + half_src + 1, s_mid - half_src:s_mid + half_src + 1]
    half_made = round(20 / 0.87)
    b = made.pixels[m_mid - half_made:m_mid + half_made + 1, m_mid - half_made:m_mid + half_made + 1]
    assert abs(float(a.mean()) - float(b.mean())) < 5.0
