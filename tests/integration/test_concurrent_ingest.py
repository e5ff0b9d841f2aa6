"""Several real ``medarchive ingest`` processes on one archive and the same files, on SQLite and PostgreSQL.

Each SOP instance ends up stored exactly once and every other arrival is a
duplicate, whichever process wins the race for its SOP Instance UID; studies
and series created at the same time do not fail either, every job finishes,
totals match the rows, and verify is clean.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from archive.catalog.models import Instance, InstanceStatus, Job, JobStatus, Series, Study
from archive.config import Settings
from archive.services.integrity import verify_blobs
from archive.services.runtime import Archive
from tests.conftest import shared_data

PROCESSES = 3


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """36 files, two studies, three series: 24 Philips MR (one series) and 12 GE MR (two series)."""
    data = shared_data()
    folder = tmp_path / "source"
    philips = sorted((data / "mr-philips-achieva" / "1301_Dual-echo_iso").iterdir())[:24]
    ge = [path for series in sorted((data / "mr-ge-signa").iterdir()) for path in sorted(series.iterdir())[:6]]
    for path in philips + ge:
        target = folder / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return folder


def _settings(home: Path, database_url: str | None) -> Settings:
    return Settings.load(environ={}, home=home, **({"database_url": database_url} if database_url else {}))


def _ingest_at_once(home: Path, source: Path, database_url: str | None, jobs: int = 1
                    ) -> list[subprocess.CompletedProcess[str]]:
    """``PROCESSES`` ingests of ``source`` started together (staging slowed a little so that they overlap)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDARCHIVE_")}
    env.update(MEDARCHIVE_HOME=str(home), MEDARCHIVE_FAULT_DELAY="0.01", COLUMNS="200", NO_COLOR="1")
    if database_url:
        env["MEDARCHIVE_DATABASE_URL"] = database_url
    command = [sys.executable, "-m", "archive.cli", "ingest", "--json", "--jobs", str(jobs), str(source)]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=home.parent) for _ in range(PROCESSES)]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return results


def _check(home: Path, database_url: str | None, source: Path, results: list[subprocess.CompletedProcess[str]]) -> None:
    files = sum(1 for p in source.rglob("*") if p.is_file())
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
    reports = [json.loads(r.stdout) for r in results]
    assert sum(r["counts"]["stored"] for r in reports) == files, [r["counts"] for r in reports]
    assert sum(r["counts"]["duplicate"] for r in reports) == (PROCESSES - 1) * files
    assert all(r["counts"]["conflict"] == r["counts"]["quarantined"] == 0 for r in reports)
    with Archive.open(_settings(home, database_url)) as archive, archive.unit_of_work() as uow:
        session = uow.session
        rows, distinct = session.execute(select(func.count(), func.count(Instance.sop_instance_uid.distinct()))).one()
        assert rows == distinct == files, "every SOP instance stored exactly once"
        assert session.scalar(select(func.count()).where(Instance.status != InstanceStatus.STORED)) == 0
        assert session.scalar(select(func.count()).select_from(Study)) == 2
        assert session.scalar(select(func.count()).select_from(Series)) == 3
        for study in session.scalars(select(Study)):
            stored = session.scalar(select(func.count()).select_from(Instance).join(Series)
                                    .where(Series.study_id == study.id))
            assert study.num_instances == stored and study.num_series == len(study.series), study.study_uid
        jobs = session.scalars(select(Job)).all()
        assert len(jobs) == PROCESSES and {j.status for j in jobs} == {JobStatus.DONE}
        assert sum(j.counts["stored"] for j in jobs) == files and {j.counts["files"] for j in jobs} == {files}
        uow.rollback()
        assert verify_blobs(archive).ok


def test_concurrent_ingests_of_the_same_files(tmp_path: Path, source: Path, database_url: str) -> None:
    home = tmp_path / "home"
    server = None if database_url.startswith("sqlite") else database_url
    Archive.open(_settings(home, server), migrate=True).close()  # a server catalog is migrated by `db upgrade`
    _check(home, server, source, _ingest_at_once(home, source, server))


def test_concurrent_ingests_with_staging_pools_on_a_fresh_sqlite_home(tmp_path: Path, source: Path) -> None:
    """No home yet: the processes create and migrate the catalog together, then race with staging pools.

    Needs the first-use migration of an SQLite catalog serialised across processes (a file lock around
    ``upgrade_schema``): without it two of them fail with "table ... already exists".
    """
    home = tmp_path / "home"
    _check(home, None, source, _ingest_at_once(home, source, None, jobs=2))
