"""``medarchive backup`` while a real ``medarchive ingest`` runs, and ``restore`` into a new home.

Real processes and real files: the ingest (slowed by the test-only fault
switch so the backup lands mid-way) and the backup are separate
``python -m archive.cli`` processes on the same home. The restored home must
verify and give every study back, pixels equal to the sources.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy import select

from archive.catalog.models import AuditEvent, Instance, Study
from archive.config import Settings
from archive.errors import ConfigError, NotFoundError
from archive.kinds import AuditAction
from archive.services.backup import backup as backup_to
from archive.services.backup import restore
from archive.services.ingest import Outcome, ingest_paths
from archive.services.retrieve import retrieve_study
from archive.services.runtime import Archive
from tests.conftest import POSTGRES_ADMIN_URL, _reset_postgres, shared_data
from tests.dicom_compare import read, stored_values

SOURCES = ("ct-chest-tcia", "mr-siemens-prisma")  # 76 files, 12 + 1 studies


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDARCHIVE_")}
    env.update(MEDARCHIVE_HOME=str(home), COLUMNS="200", NO_COLOR="1", TERM="dumb", **extra)
    return env


def medarchive(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "archive.cli", *args], env=_env(home, **env), capture_output=True,
                          text=True, timeout=180, cwd=home.parent)


def _committed(home: Path) -> int:
    try:
        with sqlite3.connect(f"file:{home / 'catalog.sqlite'}?mode=ro", uri=True, timeout=30) as connection:
            return int(connection.execute("SELECT count(*) FROM instances").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def _sources(tmp_path: Path) -> Path:
    folder = tmp_path / "sources"
    for name in SOURCES:
        shutil.copytree(shared_data() / name, folder / name)
    return folder


def _check_every_study(home: Path, sources: Path, out: Path, *, database_url: str | None = None) -> int:
    """Every study of the restored catalog retrieves; a sample of its instances equals its source's pixels."""
    by_sop = {str(read(path).SOPInstanceUID): path for path in sources.rglob("*") if path.is_file()}
    settings = Settings.load(environ={}, home=home, **({"database_url": database_url} if database_url else {}))
    compared = 0
    with Archive.open(settings) as archive:
        with archive.unit_of_work() as uow:
            studies = list(uow.session.scalars(select(Study.study_uid).order_by(Study.study_uid)))
        for number, study in enumerate(studies):
            report = retrieve_study(archive, study, out / f"study-{number}")
            assert report.files and not report.unreadable
            for item in report.files[:2]:  # a sample of each study
                original = stored_values(read(by_sop[item.sop_instance_uid]))
                assert np.array_equal(stored_values(read(item.path)), original), item.sop_instance_uid
                compared += 1
    return compared


def test_backup_during_a_running_ingest_restores_to_an_archive_that_verifies(tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    total = sum(1 for p in sources.rglob("*") if p.is_file())
    home, copy, restored = tmp_path / "home", tmp_path / "backup", tmp_path / "restored"
    ingest = subprocess.Popen([sys.executable, "-m", "archive.cli", "ingest", "--jobs", "2", str(sources)],
                              env=_env(home, MEDARCHIVE_FAULT_DELAY="0.08"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while _committed(home) == 0:
            assert ingest.poll() is None, ingest.communicate()
            assert time.monotonic() < deadline, "no batch committed within a minute"
            time.sleep(0.05)
        backup = medarchive(home, "backup", str(copy), "--json")
        still_running = ingest.poll() is None
    finally:
        out, err = ingest.communicate(timeout=180)
    assert backup.returncode == 0, backup.stderr
    assert ingest.returncode == 0, (out, err)
    taken: dict[str, Any] = json.loads(backup.stdout)
    assert still_running and 0 < taken["instances"] < total, (taken, total)  # a snapshot mid-ingest
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["catalog"]["kind"] == "sqlite" and manifest["counts"]["instances"] == taken["instances"]

    done = medarchive(restored, "restore", str(copy))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify:" in done.stdout and ": ok" in done.stdout
    verified = medarchive(restored, "verify", "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["bad_blobs"] == 0
    assert _committed(restored) == taken["instances"]
    assert _check_every_study(restored, sources, tmp_path / "out") > 0
    with Archive.open(Settings.load(environ={}, home=restored)) as archive, archive.unit_of_work() as uow:
        audit = uow.session.scalars(select(AuditEvent).where(AuditEvent.action == AuditAction.RESTORE)).one()
        assert audit.details["verify_ok"] is True and audit.details["counts"]["instances"] == taken["instances"]

    again = medarchive(restored, "restore", str(copy))  # a home with an archive in it is never overwritten
    assert again.returncode == 2 and "already holds blobs" in again.stderr, again.stderr
    studies = medarchive(copy, "studies", "--json")  # the backup folder is a home: it reads in place
    assert studies.returncode == 0 and len(json.loads(studies.stdout)) == taken["studies"], studies.stderr
    with Archive.open(Settings.load(environ={}, home=home)) as archive:
        with pytest.raises(ConfigError, match="not empty"):
            backup_to(archive, copy)
    with pytest.raises(NotFoundError, match="not a complete medarchive backup"):
        restore(Settings.load(environ={}, home=tmp_path / "new"), sources)


@pytest.fixture
def second_postgres() -> Any:
    """A second fresh PostgreSQL database to restore into."""
    name = f"medarchive_restore_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.mark.postgres
@pytest.mark.slow  # about 7 s: two databases, pg_dump and pg_restore
def test_postgres_catalog_backup_is_a_pg_dump_that_restores(tmp_path: Path, postgres_url: str,
                                                            second_postgres: str) -> None:
    _reset_postgres(postgres_url)
    sources = tmp_path / "sources"
    shutil.copytree(shared_data() / "ct-chest-tcia", sources)
    home, restored = tmp_path / "home", tmp_path / "restored"
    with Archive.open(Settings.load(environ={}, home=home, database_url=postgres_url), migrate=True) as archive:
        assert all(o.outcome is Outcome.STORED for o in ingest_paths(archive, [sources]).outcomes)
    taken = medarchive(home, "backup", str(tmp_path / "copy"), "--json", MEDARCHIVE_DATABASE_URL=postgres_url)
    assert taken.returncode == 0, taken.stderr
    assert json.loads(taken.stdout)["catalog_file"] == "catalog.pgdump" and (tmp_path / "copy/catalog.pgdump").is_file()
    done = medarchive(restored, "restore", str(tmp_path / "copy"), MEDARCHIVE_DATABASE_URL=second_postgres)
    assert done.returncode == 0, done.stdout + done.stderr
    engine = sa.create_engine(second_postgres)
    with engine.connect() as conn:
        assert conn.execute(select(sa.func.count()).select_from(Instance)).scalar_one() == 36
    engine.dispose()
    assert _check_every_study(restored, sources, tmp_path / "out", database_url=second_postgres) > 0
    again = medarchive(tmp_path / "other", "restore", str(tmp_path / "copy"), MEDARCHIVE_DATABASE_URL=second_postgres)
    assert again.returncode == 2 and "not empty" in again.stderr
