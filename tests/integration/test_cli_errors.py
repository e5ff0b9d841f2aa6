"""Operational failures end in one ``error:`` line and a documented exit code (real ``python -m archive.cli``).

Each case is the real failure: PostgreSQL on a port nothing listens on, Redis likewise, a home under /proc
(tests run as root, who ignores permission bits), a read-only bind mount of an archive (a mounted backup).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file

from tests.conftest import REPO

STOPPED_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5999/test"
STOPPED_REDIS = "redis://127.0.0.1:6399/0"


def run(home: Path, *args: str, prefix: tuple[str, ...] = (), timeout: float = 120,
        **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDARCHIVE_")}
    env.update(MEDARCHIVE_HOME=str(home), COLUMNS="80", NO_COLOR="1", TERM="dumb", MEDARCHIVE_NORMALIZE="off")
    env.update(env_extra)
    return subprocess.run([*prefix, sys.executable, "-m", "archive.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def one_error_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Exactly one ``error:`` line, no traceback, the exit code, and the words that name cause and remedy."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.returncode == code, (result.returncode, result.stderr)
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def dicom(name: str = "CT_small.dcm") -> str:
    return str(get_testdata_file(name))


def test_postgres_down_is_one_error_line_exit_3(tmp_path: Path) -> None:
    result = run(tmp_path / "home", "studies", MEDARCHIVE_DATABASE_URL=STOPPED_POSTGRES)
    one_error_line(result, 3, "cannot reach the catalog database at 127.0.0.1:5999", "connection refused",
                   "is PostgreSQL running?", "MEDARCHIVE_DATABASE_URL")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run(tmp_path / "home", "--debug", "studies", MEDARCHIVE_DATABASE_URL=STOPPED_POSTGRES)
    assert result.returncode == 3
    assert "Traceback (most recent call last)" in result.stderr and "OperationalError" in result.stderr
    assert "MEDARCHIVE_DEBUG" not in result.stderr  # the variable is known: no warning about it
    by_env = run(tmp_path / "home", "studies", MEDARCHIVE_DATABASE_URL=STOPPED_POSTGRES, MEDARCHIVE_DEBUG="1")
    assert by_env.returncode == 3 and "Traceback" in by_env.stderr


def test_garbled_database_url_is_a_usage_error(tmp_path: Path) -> None:
    result = run(tmp_path / "home", "studies", MEDARCHIVE_DATABASE_URL="notaurl")
    one_error_line(result, 2, "'notaurl' is not a database URL", "MEDARCHIVE_DATABASE_URL")


def test_unwritable_home_is_exit_3_naming_it(tmp_path: Path) -> None:
    result = run(Path("/proc/medarchive"), "ingest", dicom())
    one_error_line(result, 3, "/proc/medarchive", "MEDARCHIVE_HOME")


def test_redis_down_with_ingest_wait_is_exit_3_naming_the_broker(tmp_path: Path) -> None:
    home = tmp_path / "home"
    started = time.monotonic()
    result = run(home, "ingest", "--wait", "--timeout", "20", dicom(), MEDARCHIVE_BROKER_URL=STOPPED_REDIS,
                 timeout=90)
    one_error_line(result, 3, "cannot reach the broker at redis://127.0.0.1:6399/0", "MEDARCHIVE_BROKER_URL")
    assert time.monotonic() - started < 60
    # whatever was recorded before the broker was found away stays queued for the reconciler, nothing is lost
    if (home / "catalog.sqlite").exists():
        with sqlite3.connect(home / "catalog.sqlite") as catalog:
            statuses = {row[0] for row in catalog.execute("SELECT status FROM jobs")}
        assert statuses <= {"queued", "QUEUED"}, statuses


def test_redis_down_with_reconcile_is_exit_3(tmp_path: Path) -> None:
    result = run(tmp_path / "home", "reconcile", MEDARCHIVE_BROKER_URL=STOPPED_REDIS)
    one_error_line(result, 3, "redis://127.0.0.1:6399/0", "is Redis running?")


def test_misspelled_toml_key_is_exit_2_naming_it_and_the_fix(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "medarchive.toml").write_text("stabel_age = 5\n")
    result = run(home, "studies")
    one_error_line(result, 2, "unknown key 'stabel_age'", "did you mean stable_age?", str(home / "medarchive.toml"))


def test_unknown_environment_variable_is_a_warning_and_the_command_still_works(tmp_path: Path) -> None:
    result = run(tmp_path / "home", "studies", "--json", MEDARCHIVE_STABEL_AGE="5")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [] or isinstance(json.loads(result.stdout), (list, dict))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "MEDARCHIVE_STABEL_AGE" in warnings[0]
    assert "did you mean MEDARCHIVE_STABLE_AGE?" in warnings[0]


def test_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    result = run(tmp_path / "home", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"medarchive {version('medarchive')}"
    assert not (tmp_path / "home").exists()  # asking the version creates no archive


def test_info_json_and_text(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run(home, "ingest", dicom()).returncode == 0
    result = run(home, "info", "--json")
    facts = json.loads(result.stdout)
    assert result.returncode == 0, result.stderr
    assert facts["home"] == str(home) and facts["read_only"] is False
    assert facts["catalog"]["url"] == f"sqlite:///{home / 'catalog.sqlite'}"
    assert facts["catalog"]["revision"] == facts["catalog"]["head"] is not None
    assert facts["studies"] == 1 and facts["instances"] == 1 and facts["quarantined"] == 0
    assert facts["codec"] == {"id": "jpegls"} and facts["broker_url"].startswith("sqla+sqlite:///")
    assert facts["disk"]["free"] > 0 and facts["packs"]["files"] >= 1 and facts["packs"]["bytes"] > 0
    text = run(home, "info")
    assert text.returncode == 0 and all(len(line) <= 80 for line in text.stdout.splitlines())
    for word in ("version", "home", "catalog", "broker", "codec", "disk", "1 studies, 1 instances"):
        assert word in text.stdout, word


def test_info_hides_the_password_and_says_the_catalog_is_unreachable(tmp_path: Path) -> None:
    result = run(tmp_path / "home", "info", "--json",
                 MEDARCHIVE_DATABASE_URL="postgresql+psycopg://archive:s3cret@127.0.0.1:5999/m",
                 MEDARCHIVE_BROKER_URL="redis://:hunter2@127.0.0.1:6399/0")
    assert result.returncode == 3
    assert "s3cret" not in result.stdout + result.stderr and "hunter2" not in result.stdout + result.stderr
    facts = json.loads(result.stdout)
    assert "127.0.0.1:5999" in facts["catalog"]["url"] and "cannot reach" in facts["catalog"]["error"]


# --------------------------------------------------------------------------- read-only copies (mounted backups)

def _read_only_prefix(tmp_path: Path) -> tuple[str, ...] | None:
    """A mount namespace where MOUNT is a read-only bind mount (``unshare -rm`` or, as root, ``unshare -m``)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && ! touch "$0/x" 2>/dev/null'
    for unshare in (("unshare", "-rm"), ("unshare", "-m")):
        if shutil.which(unshare[0]) is None:
            continue
        done = subprocess.run([*unshare, "sh", "-c", script, str(probe)], capture_output=True, timeout=30)
        if done.returncode == 0:
            return unshare
    return None


def _read_only(prefix: tuple[str, ...], home: Path) -> tuple[str, ...]:
    """Run the command with ``home`` remounted read-only, in a private mount namespace (nothing leaks out)."""
    mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return (*prefix, "sh", "-c", mount, str(home))


def _copy_while_open(home: Path, targets: dict[Path, bool]) -> None:
    """Copy an archive while another process holds its catalog open with commits still in the WAL.

    ``targets`` maps each copy to whether its ``-shm`` index goes with it.
    """
    holder = sqlite3.connect(home / "catalog.sqlite")
    try:
        holder.execute("PRAGMA wal_autocheckpoint=0")
        holder.execute("SELECT count(*) FROM studies").fetchone()
        assert run(home, "ingest", dicom("MR_small.dcm")).returncode == 0
        assert (home / "catalog.sqlite-wal").stat().st_size > 0
        for target, shm in targets.items():
            shutil.copytree(home, target, ignore=None if shm else shutil.ignore_patterns("*-shm"))
    finally:
        holder.close()


def test_read_only_copies_open_for_studies_show_get_and_info_wal_mode_or_not(tmp_path: Path) -> None:
    """Three backups on a read-only mount: checkpointed, with -wal and -shm, with -wal alone (no -shm can be made)."""
    prefix = _read_only_prefix(tmp_path)
    if prefix is None:
        pytest.fail("cannot make a read-only bind mount here (needs unshare -rm or root with unshare -m)")
    home = tmp_path / "home"
    assert run(home, "ingest", dicom("CT_small.dcm")).returncode == 0
    checkpointed, wal_shm, wal_only = tmp_path / "checkpointed", tmp_path / "wal-shm", tmp_path / "wal-only"
    shutil.copytree(home, checkpointed)
    assert not (checkpointed / "catalog.sqlite-wal").exists()
    _copy_while_open(home, {wal_shm: True, wal_only: False})
    assert not (wal_only / "catalog.sqlite-shm").exists()
    before = {b: sorted((p.relative_to(b), p.stat().st_size) for p in b.rglob("*")) for b in (wal_shm, wal_only)}
    ro = {b: _read_only(prefix, b) for b in (checkpointed, wal_shm, wal_only)}

    ct_uid, = _study_uids(_json(run(checkpointed, "studies", "--json", prefix=ro[checkpointed])))
    both = _study_uids(_json(run(wal_only, "studies", "--json", prefix=ro[wal_only])))
    assert len(both) == 2 and ct_uid in both  # the commits still in the WAL are seen, not lost
    mr_uid, = set(both) - {ct_uid}
    shown = run(wal_only, "show", mr_uid, "--json", prefix=ro[wal_only])
    assert shown.returncode == 0 and mr_uid in shown.stdout, shown.stderr
    out = tmp_path / "out"
    for backup, uid in ((checkpointed, ct_uid), (wal_shm, mr_uid), (wal_only, ct_uid), (wal_only, mr_uid)):
        got = run(backup, "get", uid, "--out", str(out / backup.name / uid[-8:]), prefix=ro[backup])
        assert got.returncode == 0, got.stderr
        assert len([p for p in (out / backup.name / uid[-8:]).rglob("*") if p.is_file()]) == 1  # every instance
    for backup, opened in ((wal_shm, "read-only"), (wal_only, "copy")):
        facts = _json(run(backup, "info", "--json", prefix=ro[backup]))
        assert facts["read_only"] is True and facts["instances"] == 2 and facts["catalog"]["opened"] == opened

    refused = run(wal_only, "ingest", dicom("MR_small.dcm"), prefix=ro[wal_only])
    one_error_line(refused, 3, str(wal_only), "MEDARCHIVE_HOME")
    assert {b: sorted((p.relative_to(b), p.stat().st_size) for p in b.rglob("*")) for b in before} == before


def test_a_read_only_copy_at_an_older_schema_says_so(tmp_path: Path) -> None:
    prefix = _read_only_prefix(tmp_path)
    if prefix is None:
        pytest.fail("cannot make a read-only bind mount here (needs unshare -rm or root with unshare -m)")
    home = tmp_path / "home"
    assert run(home, "ingest", dicom()).returncode == 0
    with sqlite3.connect(home / "catalog.sqlite") as catalog:
        catalog.execute("UPDATE alembic_version SET version_num = '0003'")
    result = run(home, "studies", prefix=_read_only(prefix, home))
    one_error_line(result, 2, "schema revision 0003", "read-only", "db upgrade")


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _study_uids(listed: Any) -> list[str]:
    rows = listed["studies"] if isinstance(listed, dict) else listed
    return [row["study_uid"] for row in rows]
