"""Ingest from bytes: what a network client sends (STOW-RS, and the DIMSE C-STORE SCP of issue 19).

The parts are written durably to ``home/received/<uuid>/part-NNNNN.dcm`` and
archived by the ordinary direct ingest (:func:`archive.services.ingest.ingest_paths`,
one job, recorded, normalizing as configured), so a received instance goes
through exactly the reader, staging, duplicate/conflict decision and
quarantine that a file on disk does. When :func:`ingest_received` returns,
every stored instance is committed and its blobs are durable; the temporary
folder is then removed. Nothing a client sent is dropped silently: a part
that is not DICOM, or that belongs to another study than the one the client
named, is quarantined (a copy with its reason, naming ``origin``) before its
temporary copy goes away.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy import select, update

from archive.catalog.models import Job, QuarantineEntry
from archive.services.ingest import ingest_paths
from archive.services.outcomes import FileOutcome, Outcome
from archive.services.quarantine import quarantine_file
from archive.services.runtime import Archive
from archive.store import fsync_dir

STUDY_MISMATCH = "StudyMismatch"  # the quarantine's error type of a part of another study than the one named
NOT_ARCHIVED = "NotArchived"  # the quarantine's error type of a part that is not DICOM (as the spooled ingest's)

# One received batch at a time per process: the direct ingest keeps process-wide state (the cache of
# recently verified frames its normalization step reads) and the embedded SQLite catalog has one writer.
# Concurrent senders queue here; each still gets its own job and its own truthful answer.
_ONE_AT_A_TIME = threading.Lock()


@dataclass(frozen=True)
class ReceivedOutcome:
    """What became of one part of a request (in request order)."""

    index: int  # position in the request, from 0
    outcome: Outcome  # STORED, DUPLICATE, CONFLICT, SKIPPED (then quarantined too), QUARANTINED
    reason: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_uid: str | None
    error_type: str = ""  # the quarantine's error type when the part was quarantined (StudyMismatch, InvalidDicomError...)
    series_uid: str | None = None  # as read from the part (the STOW-RS answer's Retrieve URL needs it)

    @property
    def succeeded(self) -> bool:
        """Archived now or before (a duplicate is a success: the archive holds exactly this object)."""
        return self.outcome in (Outcome.STORED, Outcome.DUPLICATE, Outcome.CONFLICT)


@dataclass(frozen=True)
class _Peek:
    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_uid: str | None
    series_uid: str | None = None

    @property
    def is_dicom(self) -> bool:
        return bool(self.sop_instance_uid or self.study_uid)


def new_receipt(archive: Archive) -> Path:
    """A fresh folder under ``home/received`` for the parts of one request (the caller writes them there)."""
    folder = archive.settings.home / "received" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    return folder


def part_path(folder: Path, index: int) -> Path:
    """Where part ``index`` (from 0) of a receipt is written: the names keep request order."""
    return folder / f"part-{index + 1:05d}.dcm"


def ingest_bytes(archive: Archive, parts: Sequence[bytes] | Sequence[Path], *, origin: str,
                 study_uid: str | None = None) -> list[ReceivedOutcome]:
    """Archive each part (bytes, or files that are copied first); one outcome per part, in order."""
    folder = new_receipt(archive)
    try:
        files = []
        for index, part in enumerate(parts):
            target = part_path(folder, index)
            if isinstance(part, Path):
                shutil.copyfile(part, target)
            elif isinstance(part, (bytes, bytearray, memoryview)):
                target.write_bytes(part)
            else:
                raise TypeError(f"a part is bytes or a Path, not {type(part).__name__}")
            files.append(target)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return ingest_received(archive, files, origin=origin, study_uid=study_uid)


def ingest_received(archive: Archive, files: Sequence[Path], *, origin: str,
                    study_uid: str | None = None) -> list[ReceivedOutcome]:
    """Archive the files of one receipt folder (:func:`new_receipt`), then remove that folder.

    ``origin`` (``stow-rs:<token name>``, ``c-store:<calling AE>``) goes into the
    job's parameters and every quarantine reason. With ``study_uid`` (STOW-RS
    ``POST /studies/{study}``) a part of another study is not archived: it is
    quarantined with that reason and reported as such.
    """
    folders = {f.parent for f in files}
    if len(folders) > 1:
        raise ValueError("ingest_received takes the files of one receipt folder")
    folder = folders.pop() if folders else None
    try:
        for path in files:
            fsync_dir(path)
        if folder is not None:
            fsync_dir(folder)
        with _ONE_AT_A_TIME:
            return _archive(archive, list(files), origin, study_uid)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _archive(archive: Archive, files: list[Path], origin: str, study_uid: str | None) -> list[ReceivedOutcome]:
    peeks = [_peek(path) for path in files]
    results: dict[int, ReceivedOutcome] = {}
    to_ingest: list[Path] = []
    for index, (path, peek) in enumerate(zip(files, peeks)):
        if study_uid is not None and peek.is_dicom and peek.study_uid != study_uid:
            reason = (f"received from {origin} for study {study_uid}, but the instance belongs to study "
                      f"{peek.study_uid or '(none)'}: not archived")
            quarantine_file(archive, path, reason, STUDY_MISMATCH)
            results[index] = ReceivedOutcome(index, Outcome.QUARANTINED, reason, peek.sop_class_uid,
                                             peek.sop_instance_uid, peek.study_uid, STUDY_MISMATCH, peek.series_uid)
        else:
            to_ingest.append(path)
    if to_ingest:
        for path in set(files) - set(to_ingest):
            path.unlink()  # the quarantine holds its copy; the ingest must not see it
        report = ingest_paths(archive, [to_ingest[0].parent], jobs=1)
        by_name: dict[str, FileOutcome] = {o.path.name: o for o in report.outcomes}
        error_types = _tag_origin(archive, report.job_id, origin)
        for index, path in enumerate(files):
            if index in results:
                continue
            peek = peeks[index]
            found = by_name.get(path.name)
            if found is None:  # not reached (cannot happen without an interrupt): say so, keep the bytes
                found = quarantine_file(archive, path, f"received from {origin}: not processed", NOT_ARCHIVED,
                                        job_id=report.job_id)
                error_types[str(path)] = NOT_ARCHIVED
            elif found.outcome is Outcome.SKIPPED:  # not DICOM: its temporary copy goes away, so keep one
                reason = f"received from {origin}, not archived: {found.reason}"
                quarantine_file(archive, path, reason, NOT_ARCHIVED, job_id=report.job_id)
                results[index] = ReceivedOutcome(index, Outcome.SKIPPED, found.reason, peek.sop_class_uid,
                                                 peek.sop_instance_uid, peek.study_uid, NOT_ARCHIVED, peek.series_uid)
                continue
            results[index] = ReceivedOutcome(index, found.outcome, found.reason, peek.sop_class_uid,
                                             peek.sop_instance_uid, found.study_uid or peek.study_uid,
                                             error_types.get(str(path), ""), peek.series_uid)
    return [results[i] for i in range(len(files))]


def _tag_origin(archive: Archive, job_id: int | None, origin: str) -> dict[str, str]:
    """Name ``origin`` in the job's parameters and its quarantine reasons; the error type of each quarantined file."""
    if job_id is None:
        return {}
    with archive.unit_of_work() as uow:
        job = uow.session.get(Job, job_id)
        if job is not None:
            job.params = {**job.params, "origin": origin}
        uow.session.execute(update(QuarantineEntry).where(QuarantineEntry.job_id == job_id)
                            .values(reason=f"received from {origin}: " + QuarantineEntry.reason))
        types = {row.source_path: row.error_type for row in uow.session.execute(
            select(QuarantineEntry.source_path, QuarantineEntry.error_type).where(QuarantineEntry.job_id == job_id))}
        uow.commit()
    return types


def _peek(path: Path) -> _Peek:
    """SOP Class, SOP Instance and Study UIDs if pydicom can read them (the archive's reader decides the rest)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                            "SeriesInstanceUID"])
        meta = getattr(ds, "file_meta", None)

        def text(name: str, meta_name: str | None = None) -> str | None:
            value = ds.get(name) or (meta.get(meta_name) if meta is not None and meta_name else None)
            return (str(value).strip() or None) if value else None

        return _Peek(text("SOPClassUID", "MediaStorageSOPClassUID"),
                     text("SOPInstanceUID", "MediaStorageSOPInstanceUID"), text("StudyInstanceUID"),
                     text("SeriesInstanceUID"))
    except Exception:  # noqa: BLE001  (anything pydicom cannot read is for the archive's reader to judge)
        return _Peek(None, None, None)


