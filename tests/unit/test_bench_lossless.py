"""The lossless research benchmark (benchmarks/lossless_bench.py) reads its reference figures from data."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lossless_bench.py"


@pytest.fixture(scope="module")
def lossless_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lossless_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_anchors_come_from_the_data_file(lossless_bench: ModuleType) -> None:
    anchors = lossless_bench.load_anchors()
    assert Path(anchors.source).name == "anchors.toml"
    assert anchors.bpp["jpegls-pyjpegls"]["ct-chest-tcia"] == pytest.approx(4.657)
    assert anchors.mb_s["htj2k"] == (282.0, 458.0) and anchors.mb_s_group == "ct-chest-tcia"
    # every reference row the benchmark computes has its ANCHORS.md figures
    assert set(lossless_bench.reference_methods()) == set(anchors.bpp) == set(anchors.mb_s)
    assert "/work/" not in SCRIPT.read_text()  # no machine paths


def test_script_runs_on_its_own() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--repeat" in done.stdout and "--render" in done.stdout
