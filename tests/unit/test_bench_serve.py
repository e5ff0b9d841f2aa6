"""``medarchive bench serve``: a quick real run (real server process, real HTTP) gives checked, positive figures."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from archive.bench_serve import (
    EXPLICIT_LE,
    MEDARCHIVE,
    ORTHANC,
    Query,
    generated_rows,
    run_serve_benchmark,
    split_multipart,
)
from archive.bench_serve_orthanc import orthanc_missing
from archive.cli import app
from archive.cli.bench_serve import markdown_serve_benchmark, print_serve_benchmark
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def quick_result() -> dict[str, Any]:
    return run_serve_benchmark(shared_data(), quick=True, orthanc=False, studies=200, seconds=0.3)


def test_every_figure_is_positive_and_every_answer_was_checked(quick_result: dict[str, Any]) -> None:
    result = json.loads(json.dumps(quick_result))  # what --json prints
    assert result["orthanc"]["measured"] is False and "--no-orthanc" in result["orthanc"]["why_not"]
    checks = result["answer_checks"]
    assert checks["failed"] == {}
    assert set(checks["passed"]) == {f"{MEDARCHIVE} {EXPLICIT_LE}", f"{MEDARCHIVE} *"}
    assert all(c["parts"] == result["wado_study"]["instances"] == 3 for c in checks["passed"].values())
    assert checks["passed"][f"{MEDARCHIVE} {EXPLICIT_LE}"]["transfer_syntaxes"] == [EXPLICIT_LE]

    assert len(result["qido"]) == 4 + 8  # four searches on the data set, four plain and four paged on 203 studies
    assert {row["catalog"] for row in result["qido"]} == {"data set", "203 studies"}
    for row in result["qido"]:
        stat = row[MEDARCHIVE]
        assert stat["failures"] == 0, (row["query"], stat["first_failure"])
        assert stat["requests"] >= 10 and 0 < stat["median_ms"] <= stat["p95_ms"]
        assert 0 < stat["found"] <= row["expected"], row["query"]  # a server's default page may cut a long answer
        assert stat["found"] == row["expected"] or row["catalog"] != "data set", row["query"]
        assert ORTHANC not in row and row["ratio_median"] is None

    assert [(row["transfer_syntax"], row["clients"]) for row in result["wado"]] == [
        (EXPLICIT_LE, 1), (EXPLICIT_LE, 8), ("*", 1), ("*", 8)]
    for row in result["wado"]:
        stat = row[MEDARCHIVE]
        assert stat["failures"] == 0, stat["first_failure"]
        assert stat["studies"] >= row["clients"]
        assert stat["instances_per_s"] > 0 and stat["mb_per_s"] > 0 and 0 < stat["median_ms"] <= stat["p95_ms"]
        assert stat["bytes_per_study"] > 3 * 512 * 512 or row["transfer_syntax"] == "*"
    goals = {goal["goal"]: goal["met"] for goal in result["goals"]}
    assert [met for goal, met in goals.items() if goal.startswith("WADO")] == [None, None, None]  # no Orthanc
    assert result["medarchive_ingest"]["instances"] == result["dataset"]["instances"] == 46


def test_tables_and_markdown_show_every_row(quick_result: dict[str, Any]) -> None:
    out = io.StringIO()
    print_serve_benchmark(quick_result, Console(file=out, width=200))
    text = out.getvalue()
    assert "QIDO-RS" in text and "WADO-RS" in text and "not measured" in text
    markdown = markdown_serve_benchmark(quick_result).splitlines()
    assert "| figure | medarchive | Orthanc | medarchive / Orthanc |" in markdown
    assert sum(line.startswith("| QIDO") for line in markdown) == 12
    assert sum(line.startswith("| WADO-RS") for line in markdown) == 8


def test_generated_catalog_is_deterministic_and_searches_count_it() -> None:
    rows = generated_rows(500)
    assert rows == generated_rows(500) and len({r["study_uid"] for r in rows}) == 500
    facts = [(r["patient_id"], r["patient_name"], r["study_date"], {r["modality"]}) for r in rows]
    by_name = Query("g", "PatientName=a*", 0)
    assert sum(by_name.matches(f) for f in facts) == sum(r["patient_name"].upper().startswith("A") for r in rows) > 0
    assert Query("g", "StudyDate=20100101-20101231", 0).matches(("x", "y", "20100615", {"CT"}))
    assert not Query("g", "StudyDate=20100101-20101231", 0).matches(("x", "y", "", {"CT"}))
    assert Query("g", "ModalitiesInStudy=CT&limit=5", 0).matches(("x", "y", "", {"MR", "CT"}))


def test_split_multipart_reads_parts_and_their_types() -> None:
    body = (b"--abc\r\nContent-Type: application/dicom; transfer-syntax=1.2\r\n\r\nONE\r\n"
            b"--abc\r\nContent-Type: application/dicom\r\n\r\nTWO\r\n--abc--\r\n")
    parts = split_multipart(body, 'multipart/related; type="application/dicom"; boundary="abc"')
    assert parts == [("application/dicom; transfer-syntax=1.2", b"ONE"), ("application/dicom", b"TWO")]


def test_command_is_registered_and_refuses_a_missing_folder(tmp_path: Path) -> None:
    runner = CliRunner()
    assert "--no-orthanc" in runner.invoke(app, ["bench", "serve", "--help"]).output
    failed = runner.invoke(app, ["bench", "serve", "--data", str(tmp_path / "nowhere"), "--no-orthanc"])
    assert failed.exit_code != 0 and "not a folder" in str(failed.exception)


@pytest.mark.slow
def test_orthanc_side_on_quick() -> None:
    missing = orthanc_missing()
    assert missing is None, f"{missing}: this test measures the reference (apt-get install orthanc orthanc-dicomweb)"
    result = run_serve_benchmark(shared_data(), quick=True, orthanc=True, studies=0, seconds=0.3)
    assert result["orthanc"]["measured"] and result["orthanc_load"]["instances"] == 46
    assert result["orthanc_load"]["transcoded"] == 46
    assert result["answer_checks"]["failed"] == {}
    assert f"{ORTHANC} *" in result["answer_checks"]["passed"]
    for row in result["qido"]:
        assert row[ORTHANC]["failures"] == 0 and row[ORTHANC]["found"] == row["expected"]
        assert row["ratio_median"] is not None and row["ratio_median"] > 0
    for row in result["wado"]:
        assert row[ORTHANC]["failures"] == 0 and row[ORTHANC]["instances_per_s"] > 0
        assert row["ratio_instances_per_s"] is not None and row["ratio_instances_per_s"] > 0
    assert all(goal["met"] is not None for goal in result["goals"] if goal["goal"].startswith("WADO"))


def test_the_command_line_uses_the_benchmark_names() -> None:
    import archive.bench_serve as bench
    import archive.cli.bench_serve as command

    assert (command.MB, command.EXPLICIT_LE, command.MEDARCHIVE, command.ORTHANC) == (
        bench.MB, bench.EXPLICIT_LE, bench.MEDARCHIVE, bench.ORTHANC)
