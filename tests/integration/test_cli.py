"""The real ``medarchive`` command in a subprocess, with its home in a tmp folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from alembic.runtime.migration import MigrationContext
from pydicom.data import get_testdata_file

from archive.catalog.models import Base
from tests.conftest import _reset_postgres, shared_data
from tests.dicom_compare import header_differences, read, stored_values

CLEAN = ["MR_small.dcm", "CT_small.dcm"]


def medarchive(home: Path, *args: str, database_url: str | None = None,
               normalize: bool | None = False) -> subprocess.CompletedProcess[str]:
    """The command; normalization off unless asked (None: as shipped, no variable set)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDARCHIVE_")}
    env.update(MEDARCHIVE_HOME=str(home), COLUMNS="200", NO_COLOR="1", TERM="dumb")
    if normalize is not None:
        env["MEDARCHIVE_NORMALIZE"] = "on" if normalize else "off"
    if database_url:
        env["MEDARCHIVE_DATABASE_URL"] = database_url
    return subprocess.run([sys.executable, "-m", "archive.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=home.parent)


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def clean_inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "clean"
    folder.mkdir()
    for name in CLEAN:
        shutil.copyfile(str(get_testdata_file(name)), folder / name)
    return folder


def test_module_runs_main(tmp_path: Path) -> None:
    result = medarchive(tmp_path / "home", "--help")
    assert result.returncode == 0
    assert "ingest" in result.stdout and "quarantine" in result.stdout


def test_ingest_broken_exits_1_and_counts_quarantined(tmp_path: Path) -> None:
    home = tmp_path / "home"
    broken = tmp_path / "broken"
    shutil.copytree(shared_data() / "broken", broken)

    result = medarchive(home, "ingest", str(broken))
    assert result.returncode == 1, result.stdout + result.stderr
    said = re.search(r"(\d+) file\(s\) quarantined", result.stderr)
    assert said, result.stderr

    entries = _json(medarchive(home, "quarantine", "list", "--json"))
    assert int(said.group(1)) == len(entries) >= 8
    assert re.search(rf"quarantined\W+{len(entries)}\b", result.stdout), result.stdout
    for entry in entries:
        assert entry["reason"] and entry["error_type"]
        assert Path(entry["source_path"]).parent == broken
        assert Path(entry["stored_path"]).read_bytes() == Path(entry["source_path"]).read_bytes()
        assert home.resolve() in Path(entry["stored_path"]).resolve().parents
    assert {Path(e["source_path"]).name for e in entries} >= {"empty.dcm", "truncated-header.dcm"}


def test_ingest_studies_show_get(tmp_path: Path, clean_inbox: Path) -> None:
    home = tmp_path / "home"
    result = medarchive(home, "ingest", str(clean_inbox))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"instances\W+2\b", result.stdout), result.stdout

    studies = _json(medarchive(home, "studies", "--json"))
    expected = {str(read(clean_inbox / n).StudyInstanceUID) for n in CLEAN}
    assert {s["study_uid"] for s in studies} == expected
    assert all(s["instances"] == 1 and s["bytes_stored"] > 0 for s in studies)

    for name in CLEAN:
        source = read(clean_inbox / name)
        study_uid = str(source.StudyInstanceUID)
        shown = _json(medarchive(home, "show", study_uid, "--json"))
        assert shown["study_uid"] == study_uid
        (instance,) = [i for s in shown["series"] for i in s["instances"]]
        assert instance["sop_instance_uid"] == str(source.SOPInstanceUID)
        (encoding,) = instance["encodings"]
        assert encoding["codec"] == "jpegls" and encoding["config"]["id"] == "jpegls"
        assert encoding["bytes_before"] == source.Rows * source.Columns * 2
        assert 0 < encoding["bytes_after"] < encoding["bytes_before"]
        assert encoding["max_abs_error"] == 0

        out = tmp_path / f"out-{name}"
        got = medarchive(home, "get", study_uid, "--out", str(out))
        assert got.returncode == 0, got.stderr
        files = [p for p in out.rglob("*") if p.is_file()]
        assert len(files) == 1 and "wrote 1 instance" in got.stdout
        assert files[0].read_bytes()[128:132] == b"DICM"
        retrieved = pydicom.dcmread(files[0])  # a Part 10 file: no force needed
        assert retrieved.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert not header_differences(source, retrieved)
        assert np.array_equal(stored_values(retrieved), stored_values(source))


def test_unknown_study_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    result = medarchive(tmp_path / "home", "show", "1.2.3.4", "--json")
    assert result.returncode == 2
    assert "error" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.postgres
def test_db_upgrade_on_fresh_postgres(tmp_path: Path, postgres_url: str, clean_inbox: Path) -> None:
    _reset_postgres(postgres_url)
    try:
        home = tmp_path / "home"
        result = medarchive(home, "db", "upgrade", database_url=postgres_url)
        assert result.returncode == 0, result.stderr
        engine = sa.create_engine(postgres_url)
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() is not None
            assert set(Base.metadata.tables) <= set(sa.inspect(conn).get_table_names())
        engine.dispose()
        assert not (home / "catalog.sqlite").exists(), "the PostgreSQL URL was used, not the default SQLite"

        ingest = medarchive(home, "ingest", str(clean_inbox), database_url=postgres_url)
        assert ingest.returncode == 0, ingest.stderr
        studies = _json(medarchive(home, "studies", "--json", database_url=postgres_url))
        assert len(studies) == len(CLEAN)
    finally:
        _reset_postgres(postgres_url)  # the session database is shared: leave it empty


@pytest.mark.parametrize("spec", ["jpegxl", '{"id": "jpegxl", "effort": 3}'])
def test_ingest_codec_as_a_bare_id_or_json(tmp_path: Path, spec: str) -> None:
    home = tmp_path / "home"
    source = tmp_path / "in" / "CT_small.dcm"
    source.parent.mkdir()
    shutil.copyfile(str(get_testdata_file("CT_small.dcm")), source)

    result = medarchive(home, "ingest", "--codec", spec, str(source))
    assert result.returncode == 0, result.stdout + result.stderr
    engine = sa.create_engine(f"sqlite:///{home / 'catalog.sqlite'}")
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT codec_id, codec_config FROM encodings")).all()
    engine.dispose()
    assert [codec_id for codec_id, _ in rows] == ["jpegxl"]
    if spec.startswith("{"):
        config = rows[0][1] if isinstance(rows[0][1], dict) else json.loads(rows[0][1])
        assert config["effort"] == 3


@pytest.mark.parametrize(("spec", "message"), [("{bad", "not valid JSON"), ('["jpegxl"]', "JSON object"),
                                               ('{"effort": 7}', "'id'"), ("", "empty")])
def test_ingest_bad_codec_is_an_error_not_a_traceback(tmp_path: Path, spec: str, message: str) -> None:
    source = tmp_path / "CT_small.dcm"
    shutil.copyfile(str(get_testdata_file("CT_small.dcm")), source)
    result = medarchive(tmp_path / "home", "ingest", "--codec", spec, str(source))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--codec" in result.stderr and message in result.stderr and "Traceback" not in result.stderr


def _sqlite_revision(path: Path) -> str | None:
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
        assert MigrationContext.configure(conn).get_current_revision() in (stored or [None])
    engine.dispose()
    return stored[0] if stored else None


def test_db_upgrade_to_a_revision_then_to_head(tmp_path: Path) -> None:
    from alembic.script import ScriptDirectory

    from archive.catalog.database import alembic_config

    home = tmp_path / "home"
    catalog = tmp_path / "elsewhere" / "catalog.sqlite"  # MEDARCHIVE_DATABASE_URL, not the default under home
    url = f"sqlite:///{catalog}"
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert head is not None and head != "0001"

    first = medarchive(home, "db", "upgrade", "0001", database_url=url)
    assert first.returncode == 0, first.stderr
    assert _sqlite_revision(catalog) == "0001"
    assert re.search(r"is at revision 0001\b", first.stdout), first.stdout
    assert not (home / "catalog.sqlite").exists()

    second = medarchive(home, "db", "upgrade", database_url=url)
    assert second.returncode == 0, second.stderr
    assert _sqlite_revision(catalog) == head
    assert re.search(rf"is at revision {head}\b", second.stdout), second.stdout

    unknown = medarchive(home, "db", "upgrade", "no-such-revision", database_url=url)
    assert unknown.returncode == 2 and "no-such-revision" in unknown.stderr and "Traceback" not in unknown.stderr
    assert _sqlite_revision(catalog) == head
