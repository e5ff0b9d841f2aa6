"""A real ``medarchive ingest`` stopped by Ctrl-C, SIGTERM or SIGKILL: what it committed is right, a re-run finishes.

The ingest runs as a subprocess in its own session, so a signal can go to its
whole process group as a terminal's Ctrl-C does (the staging processes get it
too). ``MEDARCHIVE_FAULT_DELAY`` (the test-only fault switch) slows staging
so the signal arrives mid-way; it is sent once the first batch is committed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from archive.config import Settings
from archive.services.ingest import Outcome, ingest_paths
from archive.services.integrity import verify_blobs
from archive.services.reconcile import close_orphaned_ingests
from archive.services.runtime import Archive
from tests.conftest import shared_data

PHILIPS = "mr-philips-achieva/1301_Dual-echo_iso"


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDARCHIVE_")}
    env.update(MEDARCHIVE_HOME=str(home), COLUMNS="200", NO_COLOR="1", TERM="dumb", **extra)
    return env


def medarchive(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "archive.cli", *args], env=_env(home), capture_output=True,
                          text=True, timeout=120, cwd=home.parent)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """The 120 Philips MR files (3.3 MB, one series)."""
    folder = tmp_path / "source"
    shutil.copytree(shared_data() / PHILIPS, folder)
    return folder


def _query(home: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{home / 'catalog.sqlite'}?mode=ro", uri=True, timeout=30) as connection:
        return connection.execute(sql).fetchall()


def _committed(home: Path) -> int:
    try:
        return int(_query(home, "SELECT count(*) FROM instances")[0][0])
    except sqlite3.OperationalError:  # the catalog is being created
        return 0


def _start_and_signal(home: Path, source: Path, jobs: int, delay: str, signals: list[tuple[signal.Signals, bool]]
                      ) -> subprocess.CompletedProcess[str]:
    """Start an ingest, wait for its first commit, send ``signals`` ((signal, to the whole group?), ...)."""
    command = [sys.executable, "-m", "archive.cli", "ingest", "--jobs", str(jobs), str(source)]
    process = subprocess.Popen(command, env=_env(home, MEDARCHIVE_FAULT_DELAY=delay), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=home.parent, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while _committed(home) == 0:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no batch committed within a minute"
            time.sleep(0.05)
        for signum, group in signals:
            if group:
                os.killpg(process.pid, signum)  # what a terminal's Ctrl-C does
            else:
                process.send_signal(signum)
            time.sleep(0.05)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _assert_totals_match_rows(home: Path) -> None:
    """Every study's and series' totals equal its stored instance rows: no reconcile needed."""
    studies = _query(home, """
        SELECT s.study_uid, s.num_instances, s.num_series,
               (SELECT count(*) FROM instances i JOIN series se ON i.series_id = se.id
                WHERE se.study_id = s.id AND i.status = 'stored'),
               (SELECT count(*) FROM series se WHERE se.study_id = s.id)
        FROM studies s""")
    assert studies, "nothing committed"
    for uid, num_instances, num_series, rows, series in studies:
        assert (num_instances, num_series) == (rows, series), uid
    series_rows = _query(home, """
        SELECT se.series_uid, se.num_instances,
               (SELECT count(*) FROM instances i WHERE i.series_id = se.id AND i.status = 'stored') FROM series se""")
    for uid, num_instances, rows in series_rows:
        assert num_instances == rows, uid


def _jobs(home: Path) -> list[tuple[int, str, dict[str, int]]]:
    return [(job_id, status, json.loads(counts)) for job_id, status, counts in
            _query(home, "SELECT id, status, counts FROM jobs ORDER BY id")]


def _run_again_completes(home: Path, source: Path, committed: int, *, via_cli: bool = False) -> None:
    """The same ingest again stores the rest (the rest are duplicates); totals right, verify clean, no reconcile."""
    if via_cli:
        again = medarchive(home, "ingest", "--json", "--jobs", "2", str(source))
        assert again.returncode == 0, again.stderr
        report = json.loads(again.stdout)
        assert report["interrupted"] is False
        counts = report["counts"]
    with Archive.open(Settings.load(environ={}, home=home)) as archive:
        if not via_cli:
            rerun = ingest_paths(archive, [source], jobs=2)
            assert not rerun.interrupted
            counts = {o.value: rerun.count(o) for o in Outcome}
        assert counts["duplicate"] == committed and counts["stored"] == 120 - committed, counts
        assert verify_blobs(archive).ok
    assert _committed(home) == 120
    _assert_totals_match_rows(home)
    assert _query(home, "SELECT num_instances FROM studies") == [(120,)]
    assert "running" not in {status for _, status, _ in _jobs(home)}


@pytest.mark.parametrize(("jobs", "signum", "group"), [
    pytest.param(1, signal.SIGINT, True, id="ctrl-c-direct"),
    pytest.param(2, signal.SIGTERM, False, id="sigterm-jobs-2"),
])
def test_an_interrupted_ingest_commits_what_it_staged_and_a_rerun_completes(
    tmp_path: Path, source: Path, jobs: int, signum: signal.Signals, group: bool
) -> None:
    home = tmp_path / "home"
    result = _start_and_signal(home, source, jobs, "0.03", [(signum, group)])
    output = result.stdout + result.stderr
    assert result.returncode == 130, output
    assert "interrupted" in result.stderr and "Traceback" not in output, output
    assert "Ingest summary" in result.stdout and "not reached" in result.stdout, output

    committed = _committed(home)
    assert 0 < committed < 120, "stopped mid-way"
    [(_job_id, status, counts)] = _jobs(home)
    assert status == "interrupted"
    assert counts["stored"] == committed and counts["files"] == 120, counts
    _assert_totals_match_rows(home)
    _run_again_completes(home, source, committed, via_cli=signum is signal.SIGINT)


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_and_leaves_the_catalog_consistent(tmp_path: Path, source: Path) -> None:
    """Two Ctrl-C to the whole group with staging processes: no waiting for staging, no half transaction."""
    home = tmp_path / "home"
    result = _start_and_signal(home, source, 2, "0.05", [(signal.SIGINT, True), (signal.SIGINT, True)])
    assert result.returncode == 130, result.stdout + result.stderr
    assert "interrupted" in result.stderr and "Traceback" not in result.stderr, result.stderr
    committed = _committed(home)
    assert 0 < committed < 120
    assert [status for _, status, _ in _jobs(home)] == ["interrupted"]
    _assert_totals_match_rows(home)
    _run_again_completes(home, source, committed)


def test_a_killed_ingest_leaves_right_totals_and_reconcile_closes_its_job(tmp_path: Path, source: Path) -> None:
    """SIGKILL: no handler runs. Totals are committed with each batch; the job is closed once its process is gone."""
    home = tmp_path / "home"
    result = _start_and_signal(home, source, 1, "0.03", [(signal.SIGKILL, True)])
    assert result.returncode == -signal.SIGKILL
    committed = _committed(home)
    assert 0 < committed < 120
    _assert_totals_match_rows(home)
    [(job_id, status, counts)] = _jobs(home)
    assert status == "running" and counts["stored"] == committed  # counts went with the last commit
    with Archive.open(Settings.load(environ={}, home=home)) as archive:
        assert close_orphaned_ingests(archive) == [job_id]
    assert [status for _, status, _ in _jobs(home)] == ["interrupted"]
    _run_again_completes(home, source, committed)


def test_running_an_ingest_again_mends_totals_an_older_version_left_wrong(tmp_path: Path) -> None:
    """Before totals went with each batch, a killed ingest left them at 0; a re-run of only duplicates mends them."""
    source = tmp_path / "source"
    source.mkdir()
    for path in sorted((shared_data() / PHILIPS).iterdir())[:6]:
        shutil.copyfile(path, source / path.name)
    home = tmp_path / "home"
    with Archive.open(Settings.load(environ={}, home=home)) as archive:
        assert ingest_paths(archive, [source]).count(Outcome.STORED) == 6
    with sqlite3.connect(home / "catalog.sqlite") as connection:
        connection.execute("UPDATE studies SET num_instances = 0, num_series = 0")
        connection.execute("UPDATE series SET num_instances = 0")
    with Archive.open(Settings.load(environ={}, home=home)) as archive:
        assert ingest_paths(archive, [source]).count(Outcome.DUPLICATE) == 6
    _assert_totals_match_rows(home)
    assert _query(home, "SELECT num_instances, num_series FROM studies") == [(6, 1)]
