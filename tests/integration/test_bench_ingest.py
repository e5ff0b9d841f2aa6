"""``medarchive bench ingest`` on a handful of real files: the figures it reports agree with each other."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

import archive.bench
from archive.bench import measure_tree
from archive.cli import app
from tests.conftest import POSTGRES_ADMIN_URL

# Real files from pydicom's wheel: CT and MR (native), RGB, and an SR without pixels (kept whole).
DICOM_FILES = ["CT_small.dcm", "MR_small.dcm", "SC_rgb_small_odd.dcm", "test-SR.dcm"]


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    for name in DICOM_FILES:
        shutil.copyfile(str(get_testdata_file(name)), folder / name)
    (folder / "notes.txt").write_text("not DICOM\n")
    return folder


def _bench(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["bench", "ingest", *args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def _check_consistent(result: dict[str, Any], ingest_rows: list[str]) -> None:
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["reference", *ingest_rows]
    reference = rows["reference"]
    assert reference["outcomes"]["not_dicom"] == 1 and reference["roundtrip_mismatches"] == 0
    for row in rows.values():
        assert row["instances"] == len(DICOM_FILES)  # the same files archived by every row
        assert row["seconds"] > 0 and min(row["runs_s"]) == pytest.approx(row["seconds"])
        assert row["instances_per_s"] == pytest.approx(row["instances"] / row["seconds"])
        assert row["mb_per_s"] == pytest.approx(row["bytes_in"] / row["seconds"] / 1e6)
        assert row["x_reference"] == pytest.approx(row["instances_per_s"] / reference["instances_per_s"])
        assert row["bytes_in"] == reference["bytes_in"]
    assert reference["x_reference"] == pytest.approx(1.0)
    assert reference["content_bytes"] is None and reference["allocated_bytes"] is None
    for name in ingest_rows:
        row = rows[name]
        assert row["outcomes"]["stored"] == len(DICOM_FILES) and row["outcomes"]["skipped"] == 1
        assert row["content_bytes"] > 0 and row["allocated_bytes"] >= row["content_bytes"]
        assert row["in_per_allocated"] == pytest.approx(row["bytes_in"] / row["allocated_bytes"])
        assert row["in_per_content"] == pytest.approx(row["bytes_in"] / row["content_bytes"])
    assert result["files"] == len(DICOM_FILES) + 1
    assert result["input_bytes"] > reference["bytes_in"]  # notes.txt is input, not archived


def test_bench_ingest_json_figures_agree(small_folder: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = _bench(str(small_folder), "--jobs", "2", "--repeat", "2", "--workdir", str(workdir))
    _check_consistent(result, ["ingest jobs=1", "ingest jobs=2"])
    assert result["database"].startswith("sqlite") and result["repeat"] == 2
    assert all(len(row["runs_s"]) == 2 for row in result["rows"])
    assert list(workdir.iterdir()) == []  # temporary homes removed
    assert sorted(p.name for p in small_folder.iterdir()) == sorted([*DICOM_FILES, "notes.txt"])  # source untouched


def test_bench_ingest_table(small_folder: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "ingest", str(small_folder), "--jobs", "1"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, (result.output, result.exception)
    assert "reference" in result.stdout and "ingest jobs=1" in result.stdout
    assert "ingest jobs=2" not in result.stdout  # --jobs 1: the parallel row would repeat the first


def test_bench_ingest_refuses_a_non_server_url(small_folder: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "ingest", str(small_folder), "--database-url", "sqlite:///x.db"])
    assert result.exit_code != 0 and "only PostgreSQL" in str(result.exception)


def test_measure_tree_counts_like_du(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "one").write_bytes(b"x" * 5000)
    (root / "a" / "b" / "two").write_bytes(b"y" * 10)
    os.link(root / "a" / "one", root / "a" / "b" / "one-again")  # counted once
    size = measure_tree(root)
    assert size.content_bytes == 5010 and size.files == 2 and size.folders == 3
    blocks = sum(p.lstat().st_blocks * 512 for p in [root, root / "a", root / "a" / "b", root / "a" / "one",
                                                      root / "a" / "b" / "two"])
    assert size.allocated_bytes == blocks >= size.content_bytes


@pytest.mark.postgres
def test_bench_ingest_on_postgresql_drops_its_databases(small_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[str] = []
    real = archive.bench.temporary_database

    @contextmanager
    def recording(server: sa.URL) -> Iterator[str]:
        with real(server) as url:
            created.append(sa.make_url(url).database or "")
            yield url

    monkeypatch.setattr(archive.bench, "temporary_database", recording)
    result = _bench(str(small_folder), "--jobs", "2", "--database-url", POSTGRES_ADMIN_URL)
    _check_consistent(result, ["ingest jobs=1", "ingest jobs=2"])
    assert "PostgreSQL" in " ".join(result["notes"]) and "@" in result["database"]
    assert len(created) == 2 and all(name.startswith("medarchive_bench_") for name in created)
    admin = sa.create_engine(POSTGRES_ADMIN_URL)
    try:
        with admin.connect() as connection:
            left = connection.execute(sa.text("SELECT datname FROM pg_database WHERE datname = ANY(:names)"),
                                      {"names": created}).scalars().all()
    finally:
        admin.dispose()
    assert left == []
