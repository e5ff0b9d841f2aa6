"""``medarchive bench scp``: a quick real run (real ``medarchive scp`` and worker processes, real storescu/getscu)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

import archive.cli.bench_scp  # noqa: F401  (registers `bench scp` until archive.cli imports it)
from archive.bench_scp import MEDARCHIVE, ORTHANC, SourceFile, deal, largest_study, orthanc_run, run_scp_benchmark
from archive.bench_serve_orthanc import orthanc_missing
from archive.cli import app
from archive.cli.bench_scp import markdown_scp_benchmark, print_scp_benchmark
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def quick_result() -> dict[str, Any]:
    return run_scp_benchmark(shared_data(), quick=True, orthanc=False, concurrency=2, stable_age=0.5)


def test_every_instance_is_archived_and_retrieved(quick_result: dict[str, Any]) -> None:
    result = json.loads(json.dumps(quick_result))  # what --json prints
    assert result["orthanc"]["measured"] is False and "--no-orthanc" in result["orthanc"]["why_not"]
    assert result["dataset"]["files"] == 16 and result["medarchive"]["normalize"] is True
    assert [row["associations"] for row in result["store"]] == [1, 2]
    for row in result["store"]:
        mine = row[MEDARCHIVE]
        assert mine["failures"] == [] and mine["archived"] == mine["instances"] == 16
        assert len(mine["per_association_seconds"]) == row["associations"]
        # archived comes after the acknowledgment and after the stable age
        assert 0 < mine["ack_seconds"] < mine["archived_seconds"] and mine["archived_seconds"] > 0.5
        assert mine["ack"]["instances_per_s"] > mine["archived_rate"]["instances_per_s"] > 0
        assert row[ORTHANC] is None and row["ratio_archived"] is None
    get = result["get"][MEDARCHIVE]
    assert get["failures"] == [] and get["instances"] == result["get_study"]["instances"] == 10
    assert get["instances_per_s"] > 0 and get["bytes"] > 10 * 64 * 64 * 2
    assert [goal["met"] for goal in result["goals"]] == [None, None]


def test_tables_and_markdown_show_every_figure(quick_result: dict[str, Any]) -> None:
    out = io.StringIO()
    print_scp_benchmark(quick_result, Console(file=out, width=200))
    text = out.getvalue()
    assert "C-STORE" in text and "C-GET" in text and "not measured" in text and "FAILED" not in text
    markdown = markdown_scp_benchmark(quick_result).splitlines()
    assert sum(line.startswith("| C-STORE") for line in markdown) == 4
    assert sum(line.startswith("| C-GET") for line in markdown) == 1


def test_deal_spreads_files_evenly_and_keeps_each_once() -> None:
    files = [SourceFile(Path(f"{i}.dcm"), 1, f"1.{i}", f"2.{i % 3}") for i in range(10)]
    groups = deal(files, 4)
    assert [len(g) for g in groups] == [3, 3, 2, 2]
    assert sorted(f.sop_instance_uid for g in groups for f in g) == sorted(f.sop_instance_uid for f in files)
    assert deal(files[:2], 4) == [[files[0]], [files[1]]]
    assert largest_study(files)[0] == "2.0" and len(largest_study(files)[1]) == 4


def test_command_is_registered_and_refuses_a_missing_folder(tmp_path: Path) -> None:
    runner = CliRunner()
    assert "--concurrency" in runner.invoke(app, ["bench", "scp", "--help"]).output
    failed = runner.invoke(app, ["bench", "scp", "--data", str(tmp_path / "nowhere"), "--no-orthanc"])
    assert failed.exit_code != 0 and "not a folder" in str(failed.exception)


@pytest.mark.slow
def test_orthanc_stores_and_serves_c_get(tmp_path: Path) -> None:
    missing = orthanc_missing()
    assert missing is None, f"{missing}: this test measures the reference (apt-get install orthanc)"
    from archive.bench_scp import QUICK_FOLDERS, describe
    from archive.services.discovery import discover

    files = describe(discover([shared_data() / f for f in QUICK_FOLDERS])[0])[:16]
    study = largest_study(files)
    result = orthanc_run(files, 2, tmp_path, nodelay=True, get_study=study)
    assert result["failures"] == [] and result["stored"] == 16 and result["ack"]["instances_per_s"] > 0
    assert result["get"]["failures"] == [] and result["get"]["instances"] == len(study[1]) == 10
