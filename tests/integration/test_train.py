"""``medarchive train``: a short real run on a few real files writes a complete bundle and resumes its checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from archive.learned.bundle import MANIFEST, load_bundle
from tests.conftest import REPO, shared_data

pytestmark = [pytest.mark.slow]


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for patient in sorted((shared_data() / "ct-chest-tcia").iterdir())[:3]:  # one trains, the last two validate
        for path in sorted(patient.rglob("*.dcm"))[:2]:
            target = data / "ct-chest-tcia" / patient.name / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    for path in sorted((shared_data() / "mr-siemens-prisma").rglob("*.dcm"))[:6]:
        target = data / "mr-siemens-prisma" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return data


def _train(data: Path, out: Path, *extra: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "archive.cli", "train", "learned", "--data", str(data), "--out",
                             str(out), "--minutes", "0.1", *extra], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((out / MANIFEST).read_text())


def test_a_short_training_run_writes_a_bundle_that_codes_and_resumes(tmp_path: Path) -> None:
    data, out = _data(tmp_path), tmp_path / "bundle"
    first = _train(data, out, "--fresh")
    assert (out / "checkpoint.pt").is_file()
    assert first["data_split"]["validation"] == {"CT": 4, "MR": 2}
    steps = first["metrics"]["steps"]
    second = _train(data, out)  # resumes: the budget was spent, so it only finishes from the checkpoint
    assert second["metrics"]["steps"] >= steps
    bundle = load_bundle(str(out))  # its digest checks
    assert bundle.weights_sha256 == second["files"]["weights.safetensors"]
    assert second["metrics"]["CT_bpp_n0"] < 16  # measured by the real codec
