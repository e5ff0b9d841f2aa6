"""Correcting patient data on real ingests: headers change, pixels and UIDs never do, every previous header is kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from archive.catalog.models import (
    AuditEvent,
    EncodedFrame,
    Encoding,
    HeaderRevision,
    Instance,
    Series,
    Study,
)
from archive.config import Settings
from archive.dicom.writer import read_header
from archive.errors import ArchiveError, NotFoundError
from archive.kinds import AuditAction, StorageMode
from archive.services import corrections
from archive.services.ingest import Outcome, ingest_paths
from archive.services.integrity import collect_garbage, verify_blobs
from archive.services.retrieve import retrieve_study
from archive.services.runtime import Archive
from tests.conftest import shared_data
from tests.dicom_compare import header_differences, read

PATIENT = "A002304"  # ct-chest-tcia: one patient, a prior and a current study of three series each
CHANGED = {"PatientID", "PatientName", "AccessionNumber"}


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    """A real CT patient (two studies, six instances) and a whole-kept object (pydicom-data's liver.dcm)."""
    folder = tmp_path / "inbox"
    shutil.copytree(shared_data() / "ct-chest-tcia" / PATIENT, folder / PATIENT)
    shutil.copyfile(str(get_testdata_file("liver.dcm")), folder / "liver.dcm")
    return folder


def _snapshot(archive: Archive, study_uid: str) -> dict[str, tuple[str | None, list[str]]]:
    """Per instance: the pixel hash and the frame blobs of its current encoding."""
    with archive.unit_of_work() as uow:
        rows = uow.session.execute(
            select(Instance.sop_instance_uid, Instance.pixel_sha256, EncodedFrame.blob_sha256).select_from(Instance)
            .join(Series, Instance.series_id == Series.id).join(Study, Series.study_id == Study.id).outerjoin(Encoding, (Encoding.instance_id == Instance.id) & Encoding.is_current)
            .outerjoin(EncodedFrame, EncodedFrame.encoding_id == Encoding.id)
            .where(Study.study_uid == study_uid).order_by(Instance.id, EncodedFrame.frame_index)
        ).all()
    snapshot: dict[str, tuple[str | None, list[str]]] = {}
    for sop, pixels, frame in rows:
        snapshot.setdefault(sop, (pixels, []))[1].extend([frame] if frame else [])
    return snapshot


def _by_sop(report: Any) -> dict[str, Path]:
    return {f.sop_instance_uid: f.path for f in report.files}


def test_update_serves_new_values_same_pixels_and_keeps_history(archive: Archive, inbox: Path, tmp_path: Path) -> None:
    report = ingest_paths(archive, [inbox])
    assert {o.outcome for o in report.outcomes} == {Outcome.STORED}
    with archive.unit_of_work() as uow:
        whole = uow.session.execute(select(Instance.sop_instance_uid, Study.study_uid).select_from(Instance)
                                    .join(Series, Instance.series_id == Series.id).join(Study, Series.study_id == Study.id)
                                    .where(Instance.storage_mode == StorageMode.WHOLE)).one()
        study_uid = uow.session.scalars(select(Study.study_uid).where(Study.patient_id == PATIENT)
                                        .order_by(Study.study_uid)).first()
    assert study_uid is not None
    before = _snapshot(archive, study_uid)
    first = _by_sop(retrieve_study(archive, study_uid, tmp_path / "before"))

    values = corrections.parse_assignments(["PatientID=P-777", "PatientName=Müller^Hans", "AccessionNumber=ACC1"])
    dry = corrections.update_attributes(archive, study_uid, values, reason="wrong patient", dry_run=True)
    assert dry.instances == 3 and dry.audit_id is None
    assert _snapshot(archive, study_uid) == before  # nothing written
    done = corrections.update_attributes(archive, study_uid, values, reason="wrong patient selected at the CT")
    assert done.instances == 3 and done.unchanged == 0 and done.audit_id is not None

    assert _snapshot(archive, study_uid) == before, "pixel hashes and frame blobs never change"
    second = _by_sop(retrieve_study(archive, study_uid, tmp_path / "after"))
    assert second.keys() == first.keys()
    for sop, path in second.items():
        old, new = read(first[sop]), read(path)
        assert new.PatientID == "P-777" and str(new.PatientName) == "Müller^Hans" and new.AccessionNumber == "ACC1"
        assert new.SOPInstanceUID == old.SOPInstanceUID and new.StudyInstanceUID == old.StudyInstanceUID
        assert header_differences(old, new, ignore=CHANGED) == []
        assert new.PixelData == old.PixelData, "the same pixels, bit-exact"

    with archive.unit_of_work() as uow:
        study = uow.session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        assert (study.patient_id, study.patient_name, study.accession_number) == ("P-777", "Müller^Hans", "ACC1")
        other = uow.session.scalars(select(Study).where(Study.study_uid != study_uid,
                                                       Study.study_uid != whole.study_uid)).one()
        assert other.patient_id == PATIENT, "the patient's other study is not touched by a study update"
        event = uow.session.get(AuditEvent, done.audit_id)
        assert event is not None and event.action is AuditAction.UPDATE and event.target == study_uid
        assert event.reason == "wrong patient selected at the CT" and event.details["instances"] == 3
        revisions = uow.session.scalars(select(HeaderRevision).order_by(HeaderRevision.instance_id)).all()
        assert [r.revision for r in revisions] == [1, 1, 1] and {r.audit_id for r in revisions} == {done.audit_id}
        assert revisions[0].changes["PatientID"] == [PATIENT, "P-777"]
        assert revisions[0].changes["AccessionNumber"] == [None, "ACC1"]
    sop = next(iter(first))
    previous = read_header(corrections.revision_header(archive, sop, 1))
    assert previous.PatientID == PATIENT and header_differences(read(first[sop]), previous) == []

    again = corrections.update_attributes(archive, study_uid, corrections.parse_assignments(["PatientName=Roe^Jane"]),
                                          reason="typo in the name")
    assert again.instances == 3
    assert read_header(corrections.revision_header(archive, sop, 2)).PatientName == "Müller^Hans"
    history = corrections.study_history(archive, study_uid)
    assert [e["id"] for e in history["events"]] == [done.audit_id, again.audit_id]
    assert history["events"][1]["changes"] == {"PatientName": {"new": "Roe^Jane", "previous": ["Müller^Hans"]}}
    assert sorted(r["revision"] for r in history["revisions"]) == [1, 1, 1, 2, 2, 2]
    unchanged = corrections.update_attributes(archive, study_uid, corrections.parse_assignments(["PatientName=Roe^Jane"]),
                                              reason="again")
    assert unchanged.instances == 0 and unchanged.unchanged == 3 and unchanged.audit_id is None

    # the whole-kept object: the whole file is rewritten in its own transfer syntax, Pixel Data bytes untouched
    whole_sop, whole_study = whole
    whole_before = _snapshot(archive, whole_study)
    (original,) = retrieve_study(archive, whole_study, tmp_path / "w0", transfer_syntax="original").files
    corrections.update_attributes(archive, whole_study, corrections.parse_assignments(
        ["PatientID=LIVER-1", "StudyDescription=Liver CT"]), reason="site convention")
    (corrected,) = retrieve_study(archive, whole_study, tmp_path / "w1", transfer_syntax="original").files
    assert _snapshot(archive, whole_study) == whole_before
    assert corrected.transfer_syntax == original.transfer_syntax
    old, new = read(original.path), read(corrected.path)
    assert new.PatientID == "LIVER-1" and new.StudyDescription == "Liver CT" and new.PixelData == old.PixelData
    assert header_differences(old, new, ignore={"PatientID", "StudyDescription"}) == []
    assert read_header(corrections.revision_header(archive, whole_sop, 1)).PatientID == old.PatientID
    assert verify_blobs(archive).ok


def test_refusals_leave_the_archive_unchanged(sqlite_archive: Archive, inbox: Path) -> None:
    ingest_paths(sqlite_archive, [inbox / PATIENT])
    with sqlite_archive.unit_of_work() as uow:
        study_uid = uow.session.scalars(select(Study.study_uid)).first()
    assert study_uid is not None
    with pytest.raises(ArchiveError, match="Specific Character Set"):  # ISO_IR 100 has no kanji
        corrections.update_attributes(sqlite_archive, study_uid, {"PatientName": "山田^太郎"}, reason="x")
    with pytest.raises(ArchiveError, match="reason"):
        corrections.update_attributes(sqlite_archive, study_uid, {"PatientID": "X"}, reason=" ")
    with pytest.raises(NotFoundError):
        corrections.update_attributes(sqlite_archive, "1.2.3.4", {"PatientID": "X"}, reason="x")
    with pytest.raises(NotFoundError):
        corrections.merge_patient(sqlite_archive, "NO-SUCH-PATIENT", "X", reason="x")
    with sqlite_archive.unit_of_work() as uow:
        assert uow.session.scalars(select(HeaderRevision)).all() == []
        assert uow.session.scalars(select(AuditEvent)).all() == []


def test_revisions_survive_garbage_collection(sqlite_archive: Archive, inbox: Path) -> None:
    """Needs collect_garbage to count header_revisions' blobs as referenced (see the corrections report)."""
    ingest_paths(sqlite_archive, [inbox / PATIENT / "axial"])
    with sqlite_archive.unit_of_work() as uow:
        row = uow.session.execute(select(Study.study_uid, Instance.sop_instance_uid)
                                  .join(Series, Series.study_id == Study.id)
                                  .join(Instance, Instance.series_id == Series.id)).first()
    assert row is not None
    study_uid, sop = row
    corrections.update_attributes(sqlite_archive, study_uid, {"PatientID": "NEW"}, reason="x")
    collect_garbage(sqlite_archive, grace_seconds=0)
    assert read_header(corrections.revision_header(sqlite_archive, sop, 1)).PatientID == PATIENT
    assert verify_blobs(sqlite_archive).ok


def test_resend_after_correction_is_a_duplicate(sqlite_archive: Archive, inbox: Path) -> None:
    """The original file again after a correction is the same object (duplicate detection consults revisions)."""
    source = inbox / PATIENT / "axial"
    ingest_paths(sqlite_archive, [source])
    with sqlite_archive.unit_of_work() as uow:
        study_uid = uow.session.scalars(select(Study.study_uid)).first()
    assert study_uid is not None
    corrections.update_attributes(sqlite_archive, study_uid, {"PatientID": "NEW"}, reason="x")
    again = ingest_paths(sqlite_archive, [source])
    assert {o.outcome for o in again.outcomes} == {Outcome.DUPLICATE}, again.outcomes


def test_philips_series_corrects_in_seconds(sqlite_archive: Archive, tmp_path: Path) -> None:
    """120 MR instances with dictionary-compressed headers: one query, one pass."""
    source = tmp_path / "mr"
    shutil.copytree(shared_data() / "mr-philips-achieva", source)
    report = ingest_paths(sqlite_archive, [source])
    (study_uid,) = report.studies
    with sqlite_archive.unit_of_work() as uow:
        series_uid = uow.session.scalars(select(Series.series_uid)).one()
        dictionaries = uow.session.scalars(select(Instance.header_dictionary)).all()
    assert any(dictionaries), "a header dictionary was trained on the series"
    started = time.perf_counter()
    result = corrections.update_attributes(
        sqlite_archive, None, corrections.parse_assignments(["SeriesDescription=Field map", "BodyPartExamined=HEAD"],
                                                            series_level=True),
        reason="protocol renamed", series_uid=series_uid)
    elapsed = time.perf_counter() - started
    assert result.instances == 120
    assert elapsed < 20, f"correcting 120 instances took {elapsed:.1f} s"
    with sqlite_archive.unit_of_work() as uow:
        series = uow.session.scalars(select(Series)).one()
        assert (series.series_description, series.body_part) == ("Field map", "HEAD")
        assert all(uow.session.scalars(select(Instance.header_dictionary))), "corrected headers keep a dictionary"
        assert len(uow.session.scalars(select(HeaderRevision)).all()) == 120
    files = retrieve_study(sqlite_archive, study_uid, tmp_path / "out").files
    assert {read(f.path).SeriesDescription for f in files} == {"Field map"}


# --- the real command ------------------------------------------------------------------------------------


def medarchive(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDARCHIVE_")}
    env.update(MEDARCHIVE_HOME=str(home), COLUMNS="80", NO_COLOR="1", TERM="dumb", MEDARCHIVE_NORMALIZE="off")
    return subprocess.run([sys.executable, "-m", "archive.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=home.parent)


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cli_update_merge_patient_and_history(tmp_path: Path, inbox: Path) -> None:
    home = tmp_path / "home"
    with Archive.open(Settings.load(environ={}, home=home, normalize=False)) as archive:
        ingest_paths(archive, [inbox / PATIENT])
        with archive.unit_of_work() as uow:
            studies = uow.session.scalars(select(Study.study_uid).order_by(Study.study_uid)).all()
    assert len(studies) == 2
    study = studies[0]

    refused = medarchive(home, "update", study, "--set", "SOPInstanceUID=1.2.3", "--reason", "test")
    assert refused.returncode == 2 and "error:" in refused.stderr and "UID" in refused.stderr, refused.stderr
    no_reason = medarchive(home, "update", study, "--set", "PatientID=X")
    assert no_reason.returncode == 2 and "reason" in no_reason.stderr

    dry = _json(medarchive(home, "update", study, "--set", "PatientID=P1", "--set", "AccessionNumber=A1",
                           "--set", "StudyDescription=", "--reason", "typo", "--dry-run", "--json"))
    assert dry["dry_run"] and dry["instances"] == 3 and dry["audit_id"] is None
    shown = medarchive(home, "update", study, "--set", "PatientID=P1", "--set", "AccessionNumber=A1",
                       "--reason", "typo at registration")
    assert shown.returncode == 0, shown.stderr
    assert "3 instance" in shown.stdout and "P1" in shown.stdout
    assert all(len(line) <= 80 for line in shown.stdout.splitlines()), shown.stdout

    out = tmp_path / "get"
    assert medarchive(home, "get", study, "--out", str(out)).returncode == 0
    assert {read(p).PatientID for p in out.rglob("*.dcm")} == {"P1"}

    back = _json(medarchive(home, "merge-patient", "P1", PATIENT, "--reason", "it was right", "--json"))
    assert back["studies"] == [study] and back["instances"] == 3  # only the corrected study has P1
    both = _json(medarchive(home, "merge-patient", PATIENT, "NEW-ID", "--name", "Doe^Jane",
                            "--reason", "patients merged at the RIS", "--json"))
    assert sorted(both["studies"]) == studies and both["instances"] == 6 and both["action"] == "merge-patient"
    gone = medarchive(home, "merge-patient", PATIENT, "X", "--reason", "r")
    assert gone.returncode == 2 and "no study with Patient ID" in gone.stderr

    with Archive.open(Settings.load(environ={}, home=home, normalize=False)) as archive, archive.unit_of_work() as uow:
        assert set(uow.session.scalars(select(Study.patient_id))) == {"NEW-ID"}
        assert set(uow.session.scalars(select(Study.patient_name))) == {"Doe^Jane"}

    found = _json(medarchive(home, "studies", "--patient-id", "NEW-ID", "--json"))  # the browse filters
    assert sorted(row["study_uid"] for row in found) == studies

    history = _json(medarchive(home, "history", study, "--json"))
    assert [e["action"] for e in history["events"]] == ["update", "merge-patient", "merge-patient"]
    assert history["events"][0]["reason"] == "typo at registration" and "@" in history["events"][0]["actor"]
    assert sorted({r["revision"] for r in history["revisions"]}) == [1, 2, 3]
    table = medarchive(home, "history", study)
    assert table.returncode == 0 and "merge-patient" in table.stdout and "typo at" in table.stdout
    assert all(len(line) <= 80 for line in table.stdout.splitlines()), table.stdout

    # two corrections at once apply one after the other: each revision keeps the other's result
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDARCHIVE_")} | {"MEDARCHIVE_HOME": str(home)}
    racing = [subprocess.Popen([sys.executable, "-m", "archive.cli", "update", study, "--set", f"StudyID=R{i}",
                                "--reason", f"race {i}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True) for i in (1, 2)]
    assert [p.wait(timeout=120) for p in racing] == [0, 0], [p.stderr.read() for p in racing if p.stderr]
    events = _json(medarchive(home, "history", study, "--json"))["events"][-2:]
    first_new = events[0]["changes"]["StudyID"]["new"]
    assert events[1]["changes"]["StudyID"]["previous"] == [first_new] and events[1]["revisions"] == [5]
