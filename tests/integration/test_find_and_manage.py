"""Finding and managing what is archived: search, series-level get/show, delete + GC, quarantine retry/purge, jobs.

Real files (pydicom's test files, the shared TCIA chest CT), real ingests, the
real ``medarchive`` command in a subprocess, and the search on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from sqlalchemy import select

from archive.catalog.models import AuditEvent, Instance, ItemStatus, Job, JobItem, JobStatus, JobTask, Study
from archive.config import Settings
from archive.errors import NotFoundError
from archive.kinds import AuditAction, JobKind
from archive.services.deletion import delete_study, plan_study_deletion
from archive.services.ingest import Outcome, ingest_paths, quarantine_file
from archive.services.integrity import collect_garbage
from archive.services.query import StudyFilter, find_studies, list_jobs, list_quarantine, parse_date_range
from archive.services.quarantine import purge_quarantine
from archive.services.retrieve import retrieve_study
from archive.services.runtime import Archive
from tests.conftest import shared_data
from tests.integration.test_cli import _json, medarchive

# Patient, date, modality, accession and description differ across these (all real files)
SEARCHABLE = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "examples_overlay.dcm", "rtstruct.dcm"]
# one patient's two chest CT studies, each with an axial, a coronal and a sagittal series
CHEST = "ct-chest-tcia/A002304"


def _uid(path: Path, keyword: str = "StudyInstanceUID") -> str:
    return str(getattr(pydicom.dcmread(path, stop_before_pixels=True, force=True), keyword))


def _copy_testdata(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(str(get_testdata_file(name)), folder / name)
    return folder


def _chest(tmp_path: Path) -> Path:
    target = tmp_path / "chest"
    shutil.copytree(shared_data() / CHEST, target)
    return target


def _lines_fit(text: str, width: int = 80) -> None:
    too_long = [line for line in text.splitlines() if len(line) > width]
    assert not too_long, too_long


# --- search (the query function on both catalogs)


def test_find_studies_by_each_filter(archive: Archive, tmp_path: Path) -> None:
    inbox = _copy_testdata(tmp_path / "in", SEARCHABLE)
    shutil.copytree(shared_data() / CHEST / "axial", inbox / "chest")
    report = ingest_paths(archive, [inbox])
    assert {o.outcome for o in report.outcomes} == {Outcome.STORED}, report.outcomes
    ct, mr, nm, overlay, rt = (_uid(inbox / n) for n in SEARCHABLE)
    prior, current = (_uid(p) for p in sorted((inbox / "chest").iterdir()))  # 19001231, 19010112

    def found(**filters: Any) -> list[str]:
        limit = filters.pop("limit", 100)
        return [s["study_uid"] for s in find_studies(archive, StudyFilter(**filters), limit=limit).studies]

    # newest StudyDate first, undated last
    assert found() == [overlay, mr, nm, ct, current, prior, rt] or found() == [overlay, nm, mr, ct, current, prior, rt]
    assert set(found(patient_id="?CT1")) == {ct}
    assert set(found(patient_id="A00*")) == {prior, current}
    assert found(patient_id="1ct1") == []  # IDs match exactly, case included
    assert set(found(patient_name="compressedsamples^*")) == {ct, mr, nm}  # names: any case
    assert set(found(patient_name="*^MR?")) == {mr}
    assert found(patient_name="%") == [] and found(patient_id="_CT1") == []  # SQL wildcards are literal
    assert set(found(date_from="20040101", date_to="20041231")) == {ct, mr, nm}
    assert set(found(date_to="19001231")) == {prior}
    assert set(found(date_from="20050101")) == {overlay}
    assert set(found(date_from="20040826", date_to="20040826")) == {mr, nm}
    assert set(found(modality="mr")) == {mr, overlay}
    assert set(found(modality="RTSTRUCT")) == {rt}
    assert set(found(accession="8000*")) == {overlay}
    assert set(found(accession="1")) == {rt}
    assert set(found(description="*BONE*")) == {nm}
    assert set(found(description="abdomen^*")) == {overlay}
    assert set(found(patient_name="compressed*", modality="CT", date_from="20040101")) == {ct}

    page = find_studies(archive, StudyFilter(patient_name="Compressed*"), limit=2)
    assert page.truncated and page.matched == 3 and len(page.studies) == 2
    assert ct not in {s["study_uid"] for s in page.studies}  # the oldest is the one left out


def test_date_ranges_parse_like_dicom_range_matching() -> None:
    assert parse_date_range("20200101-20201231") == ("20200101", "20201231")
    assert parse_date_range("20200101-") == ("20200101", None)
    assert parse_date_range("-20201231") == (None, "20201231")
    assert parse_date_range("20200229") == ("20200229", "20200229")
    for bad in ("2020-01-01", "20201301", "-", "20201231-20200101", "2020010"):
        with pytest.raises(Exception, match="--date"):
            parse_date_range(bad)


# --- the command: search output, series level, delete, quarantine, jobs
# Set-up and most checks go through the services and the catalog in this process; the command runs (as a real
# subprocess, about a second each) only for what is under test.


def narrow(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command at 80 columns, as a terminal of that size shows it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDARCHIVE_")}
    env.update(MEDARCHIVE_HOME=str(home), COLUMNS="80", NO_COLOR="1", TERM="dumb", MEDARCHIVE_NORMALIZE="off")
    return subprocess.run([sys.executable, "-m", "archive.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=home.parent)


@contextmanager
def opened(home: Path) -> Iterator[Archive]:
    """The home's archive in this process (closed after: its pack is sealed, as a finished command leaves it)."""
    archive = Archive.open(Settings.load(environ={}, home=home, normalize=False))
    try:
        yield archive
    finally:
        archive.close()


def ingest(home: Path, *paths: Path) -> list[Outcome]:
    with opened(home) as archive:
        return [o.outcome for o in ingest_paths(archive, list(paths)).outcomes]


def _sqlite(home: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(home / "catalog.sqlite") as conn:
        return conn.execute(sql, params).fetchall()


def _study_uids(home: Path) -> set[str]:
    return {uid for (uid,) in _sqlite(home, "SELECT study_uid FROM studies")}


def test_studies_command_filters_and_fits_80_columns(tmp_path: Path) -> None:
    home = tmp_path / "home"
    inbox = _copy_testdata(tmp_path / "in", SEARCHABLE)
    assert set(ingest(home, inbox)) == {Outcome.STORED}
    names = narrow(home, "studies", "--patient-name", "compressedsamples*", "--date", "20040101-")
    assert names.returncode == 0, names.stderr
    _lines_fit(names.stdout)
    assert "Studies (3)" in names.stdout and "…" in names.stdout  # UIDs shortened in the table
    limited = narrow(home, "studies", "--modality", "mr", "--limit", "1", "--json")
    assert limited.returncode == 0 and "newest 1 of 2" in limited.stderr
    assert [s["study_uid"] for s in json.loads(limited.stdout)] == [_uid(inbox / "examples_overlay.dcm")]  # UIDs whole
    bad = medarchive(home, "studies", "--date", "2004-01-01")
    assert bad.returncode == 2 and "error:" in bad.stderr and "--date" in bad.stderr and "Traceback" not in bad.stderr

    jobs = narrow(home, "jobs")  # a direct ingest has no job items: its own counts are shown, not 0/0
    assert jobs.returncode == 0, jobs.stderr
    _lines_fit(jobs.stdout)
    assert f"{len(SEARCHABLE)}/{len(SEARCHABLE)}" in jobs.stdout and f"{len(SEARCHABLE)} stored" in jobs.stdout
    with opened(home) as archive, archive.unit_of_work() as uow:
        (job,) = list_jobs(uow.session)
    assert (job.final, job.total, job.outcomes) == (len(SEARCHABLE), len(SEARCHABLE), {"stored": len(SEARCHABLE)})


def test_get_and_show_take_a_series_uid(tmp_path: Path) -> None:
    home = tmp_path / "home"
    chest = _chest(tmp_path)
    ingest(home, chest)
    coronal = sorted((chest / "coronal").iterdir())[0]
    study, series = _uid(coronal), _uid(coronal, "SeriesInstanceUID")

    shown = _json(medarchive(home, "show", series, "--json"))
    assert shown["study_uid"] == study and shown["series_only"] == series and shown["num_series"] == 3
    assert [s["series_uid"] for s in shown["series"]] == [series]
    table = narrow(home, "show", study)
    assert table.returncode == 0 and "3 series, 3 instances" in table.stdout
    _lines_fit("\n".join(line for line in table.stdout.splitlines() if not line.startswith("Study ")))

    out = tmp_path / "out"
    got = medarchive(home, "get", series, "--out", str(out))
    assert got.returncode == 0, got.stderr
    (written,) = [p for p in out.rglob("*.dcm")]
    assert _uid(written, "SOPInstanceUID") == _uid(coronal, "SOPInstanceUID")
    whole = _json(medarchive(home, "get", study, "--out", str(tmp_path / "all"), "--json"))
    assert len(whole["files"]) == 3 and whole["series_uid"] is None and whole["unreadable"] == []


def _pack_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in (home / "blobs").rglob("*") if p.is_file())


def test_delete_study_then_gc_frees_its_bytes_and_keeps_the_rest(tmp_path: Path) -> None:
    home = tmp_path / "home"
    chest = _chest(tmp_path)
    ingest(home, chest)
    ((prior, stored_prior),) = _sqlite(home, "SELECT study_uid, bytes_stored FROM studies WHERE study_date = '19001231'")
    (current,) = _study_uids(home) - {prior}

    refused = medarchive(home, "delete", prior)  # no terminal, no --yes: nothing happens
    assert refused.returncode == 2 and "--yes" in refused.stderr and "Traceback" not in refused.stderr
    assert _study_uids(home) == {prior, current}

    deleted = _json(medarchive(home, "delete", prior, "--yes", "--reason", "test: wrong patient", "--json"))
    assert deleted["instances"] == 3 and deleted["series"] == 3 and deleted["patient_id"] == "A002304"
    assert _study_uids(home) == {current}
    assert _sqlite(home, "SELECT count(*) FROM instances")[0][0] == 3
    assert _sqlite(home, "SELECT count(*) FROM series")[0][0] == 3
    (audit,) = _sqlite(home, "SELECT action, target, reason, details FROM audit_log")
    assert audit[:3] == ("delete-study", prior, "test: wrong patient")
    details = json.loads(audit[3])
    assert details["instances"] == 3 and details["bytes_stored"] == stored_prior and details["patient_id"] == "A002304"

    before = _pack_bytes(home)
    with opened(home) as archive:  # the first run retires the half-dead pack, the next deletes it
        collect_garbage(archive, grace_seconds=0)
    assert medarchive(home, "gc", "--grace", "0").returncode == 0
    freed = before - _pack_bytes(home)
    assert freed >= stored_prior * 0.9, (freed, stored_prior)
    verify = medarchive(home, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    out = tmp_path / "out"
    assert medarchive(home, "get", current, "--out", str(out)).returncode == 0
    assert len(list(out.rglob("*.dcm"))) == 3


def test_delete_one_series(tmp_path: Path) -> None:
    home = tmp_path / "home"
    chest = _chest(tmp_path)
    ingest(home, chest)
    sagittal = sorted((chest / "sagittal").iterdir())[0]
    study, series = _uid(sagittal), _uid(sagittal, "SeriesInstanceUID")
    result = medarchive(home, "delete", "--series", series, "--yes")
    assert result.returncode == 0, result.stderr
    assert "deleted series" in result.stdout
    assert _sqlite(home, "SELECT num_series, num_instances FROM studies WHERE study_uid = ?", study) == [(2, 2)]
    assert _sqlite(home, "SELECT count(*) FROM series WHERE series_uid = ?", series) == [(0,)]
    assert _sqlite(home, "SELECT action, target FROM audit_log") == [("delete-series", series)]
    both = medarchive(home, "delete", study, "--series", series, "--yes")
    assert both.returncode == 2 and "either" in both.stderr


def _flip_a_frame_byte(home: Path, sop_instance_uid: str) -> None:
    """Flip one byte of the instance's first frame blob in its pack (the catalog says where it is)."""
    ((pack, offset, size),) = _sqlite(home, """
        SELECT b.pack, b."offset", b.size FROM blobs b JOIN encoded_frames f ON f.blob_sha256 = b.sha256
        JOIN encodings e ON e.id = f.encoding_id JOIN instances i ON i.id = e.instance_id
        WHERE i.sop_instance_uid = ? AND e.is_current AND f.frame_index = 0""", sop_instance_uid)
    path = home / "blobs" / "packs" / pack
    with path.open("r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_get_keep_going_writes_the_readable_rest(tmp_path: Path) -> None:
    home = tmp_path / "home"
    chest = _chest(tmp_path)
    ingest(home, chest)
    axial = sorted((chest / "axial").iterdir())[0]
    study, damaged = _uid(axial), _uid(axial, "SOPInstanceUID")
    _flip_a_frame_byte(home, damaged)

    stopped = medarchive(home, "get", study, "--out", str(tmp_path / "stopped"))
    assert stopped.returncode != 0 and "Traceback" not in stopped.stderr
    assert damaged in stopped.stderr and "--keep-going" in stopped.stderr and "verify" in stopped.stderr

    out = tmp_path / "out"
    kept = narrow(home, "get", study, "--out", str(out), "--keep-going", "--json")
    assert kept.returncode == 1, kept.stderr
    report = json.loads(kept.stdout)
    assert [u["sop_instance_uid"] for u in report["unreadable"]] == [damaged]
    assert report["unreadable"][0]["problem"] == "corrupt"
    assert len(report["files"]) == 2 == len(list(out.rglob("*.dcm")))
    assert damaged not in {_uid(p, "SOPInstanceUID") for p in out.rglob("*.dcm")}
    assert "1 instance(s) could not be read" in kept.stderr and "verify --study" in kept.stderr
    _lines_fit(kept.stderr)


def test_quarantine_retry_and_purge(tmp_path: Path) -> None:
    home = tmp_path / "home"
    broken = tmp_path / "broken"
    shutil.copytree(shared_data() / "broken", broken)
    good = _copy_testdata(tmp_path / "good", ["CT_small.dcm"]) / "CT_small.dcm"
    with opened(home) as archive:
        assert Outcome.QUARANTINED in {o.outcome for o in ingest_paths(archive, [broken]).outcomes}
        # a good file refused for a reason that has since gone away (a staging process that died, a codec missing)
        quarantine_file(archive, good, "the staging process died while reading this file", "StagingProcessDied")
        entries = list_quarantine(archive)
    good_entry = next(e for e in entries if e["source_path"] == str(good))
    listing = narrow(home, "quarantine", "list")
    assert listing.returncode == 0 and f"Quarantine ({len(entries)})" in listing.stdout
    _lines_fit(listing.stdout)

    retried = _json(medarchive(home, "quarantine", "retry", str(good_entry["id"]), "--json"))
    assert retried["released"] == 1 and retried["results"][0]["outcome"] == "stored"
    assert not Path(good_entry["stored_path"]).exists()
    assert _uid(good) in _study_uids(home)
    assert _sqlite(home, "SELECT source_path FROM instances WHERE sop_instance_uid = ?", _uid(good, "SOPInstanceUID")) \
        == [(str(good),)]  # the original source, not the quarantine copy
    assert _sqlite(home, "SELECT action, target FROM audit_log") == [("quarantine-retry", str(good))]
    left = {e["id"] for e in entries} - {good_entry["id"]}
    assert {id_ for (id_,) in _sqlite(home, "SELECT id FROM quarantine")} == left

    copies = sorted(p for p in (home / "quarantine").rglob("*") if p.is_file())
    again = narrow(home, "quarantine", "retry", "--all")  # they still fail: they stay, once each, with a reason
    assert again.returncode == 1 and f"0 archived, {len(left)} still quarantined" in again.stdout
    _lines_fit(again.stdout)
    rows = _sqlite(home, "SELECT id, reason FROM quarantine")
    assert {id_ for id_, _ in rows} == left and all(reason for _, reason in rows)
    assert sorted(p for p in (home / "quarantine").rglob("*") if p.is_file()) == copies  # no extra copies either
    unknown = medarchive(home, "quarantine", "retry", "99999")
    assert unknown.returncode == 2 and "99999" in unknown.stderr

    with opened(home) as archive:
        assert purge_quarantine(archive, older_than_days=1).entries == []  # all younger than a day
    dry = _json(medarchive(home, "quarantine", "purge", "--older-than", "0", "--dry-run", "--json"))
    assert len(dry["entries"]) == len(left) and len(_sqlite(home, "SELECT id FROM quarantine")) == len(left)
    purged = _json(medarchive(home, "quarantine", "purge", "--older-than", "0", "--json"))
    assert len(purged["entries"]) == len(left) and purged["bytes"] > 0
    assert _sqlite(home, "SELECT count(*) FROM quarantine") == [(0,)]
    assert not [p for p in (home / "quarantine").rglob("*") if p.is_file()]
    assert _sqlite(home, "SELECT action FROM audit_log ORDER BY id")[-1] == ("quarantine-purge",)


def test_delete_study_takes_its_conflicts_and_leaves_the_rest(archive: Archive, tmp_path: Path) -> None:
    """On both catalogs: the rows of the study and of conflicts recorded against it go, in one transaction."""
    inbox = _copy_testdata(tmp_path / "in", ["MR_small.dcm", "CT_small.dcm"])
    shutil.copyfile(shared_data() / "broken" / "conflict-with-pydicom-MR_small.dcm", inbox / "zz-conflict.dcm")
    outcomes = {o.path.name: o.outcome for o in ingest_paths(archive, [inbox]).outcomes}
    assert outcomes == {"MR_small.dcm": Outcome.STORED, "CT_small.dcm": Outcome.STORED, "zz-conflict.dcm": Outcome.CONFLICT}
    mr, ct = _uid(inbox / "MR_small.dcm"), _uid(inbox / "CT_small.dcm")

    with archive.unit_of_work() as uow:  # a re-compression item still queued for the MR instance
        instance_id = uow.session.scalars(select(Instance.id).where(
            Instance.sop_instance_uid == _uid(inbox / "MR_small.dcm", "SOPInstanceUID"), Instance.conflict_seq == 0)).one()
        job = Job(kind=JobKind.RECOMPRESS, status=JobStatus.RUNNING)
        task = JobTask(job=job)
        uow.session.add_all([job, task])
        uow.session.flush()
        uow.session.add(JobItem(job_id=job.id, task_id=task.id, source_instance_id=instance_id))
        uow.commit()

    preview = plan_study_deletion(archive, mr)
    assert (preview.instances, preview.conflicts, preview.audit_id) == (1, 1, None)
    report = delete_study(archive, mr, reason="duplicate upload")
    assert (report.instances, report.conflicts) == (1, 1) and report.audit_id is not None
    with archive.unit_of_work() as uow:
        assert uow.session.scalars(select(Instance.sop_instance_uid)).all() == [_uid(inbox / "CT_small.dcm", "SOPInstanceUID")]
        assert uow.session.scalars(select(Study.study_uid)).all() == [ct]
        (event,) = uow.session.scalars(select(AuditEvent)).all()
        assert (event.action, event.target, event.reason) == (AuditAction.DELETE_STUDY, mr, "duplicate upload")
        assert event.details["conflicts"] == 1 and event.details["patient_name"] == "CompressedSamples^MR1"
        (job_item,) = uow.session.scalars(select(JobItem)).all()
        assert (job_item.source_instance_id, job_item.status) == (None, ItemStatus.FAILED)  # final: no worker waits for it
    with pytest.raises(NotFoundError):
        delete_study(archive, mr)
    (item,) = retrieve_study(archive, ct, tmp_path / "out").files
    assert _uid(item.path, "SOPInstanceUID") == _uid(inbox / "CT_small.dcm", "SOPInstanceUID")
    again = ingest_paths(archive, [inbox / "MR_small.dcm"])  # deleted means gone: the same file archives anew
    assert [o.outcome for o in again.outcomes] == [Outcome.STORED]
