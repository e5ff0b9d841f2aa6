"""Setting a file aside: a byte-identical copy with its reason, and a catalog row; the source is left as it is.

And managing what was set aside: retrying the copies through the normal
ingest (after an upgrade, or once a passing failure is gone) and purging old
entries, both with an audit record.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from archive.catalog.models import Instance, QuarantineEntry
from archive.clock import utcnow
from archive.dicom.uids import safe_filename
from archive.errors import ArchiveError, NotFoundError
from archive.kinds import AuditAction
from archive.services.audit import record
from archive.services.outcomes import FileOutcome, Outcome
from archive.services.runtime import Archive


def quarantine_file(archive: Archive, path: Path, reason: str, error_type: str, *, job_id: int | None = None) -> FileOutcome:
    """Copy ``path`` into the quarantine folder with its reason (once per content and path)."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    folder = archive.settings.quarantine_dir / digest[:2]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{digest[:16]}__{safe_filename(path.name)}"
    if not target.exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        target.with_name(target.name + ".reason.txt").write_text(f"{path}\n{error_type}: {reason}\n")
    with archive.unit_of_work() as uow:
        known = uow.session.scalar(
            select(func.count()).select_from(QuarantineEntry).where(
                QuarantineEntry.sha256 == digest, QuarantineEntry.source_path == str(path)
            )
        )
        if not known:
            uow.session.add(QuarantineEntry(
                source_path=str(path), stored_path=str(target), reason=reason, error_type=error_type,
                sha256=digest, size=len(data), job_id=job_id,
            ))
            uow.commit()
    return FileOutcome(path, Outcome.QUARANTINED, reason, bytes_in=len(data))


def quarantine_unless_kept(
    archive: Archive, outcome: FileOutcome, *, job_id: int | None, keep_skipped: bool
) -> FileOutcome:
    """A skipped file of a spooled job is quarantined too: its spool folder is deleted when the job ends."""
    if outcome.outcome is Outcome.SKIPPED and not keep_skipped:
        return quarantine_file(archive, outcome.path, f"not archived: {outcome.reason}", "NotArchived", job_id=job_id)
    return outcome


# --- managing the quarantine: retry, purge


@dataclass(frozen=True)
class RetryResult:
    """What became of one quarantined file given to ingest again."""

    entry_id: int
    source_path: str
    outcome: str  # an ingest outcome (stored, duplicate, conflict, quarantined, skipped) or "missing copy"
    reason: str = ""  # why it is still quarantined
    study_uid: str | None = None

    @property
    def released(self) -> bool:
        """Archived now (or already was): the entry and its copy are gone."""
        return self.outcome in _ARCHIVED


@dataclass
class RetryReport:
    results: list[RetryResult] = field(default_factory=list)
    job_id: int | None = None

    @property
    def released(self) -> list[RetryResult]:
        return [r for r in self.results if r.released]

    @property
    def still_quarantined(self) -> list[RetryResult]:
        return [r for r in self.results if not r.released]

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "released": len(self.released), "still_quarantined": len(self.still_quarantined),
                "results": [asdict(r) | {"released": r.released} for r in self.results]}


@dataclass
class PurgeReport:
    dry_run: bool
    older_than_days: float
    entries: list[dict[str, Any]] = field(default_factory=list)  # id, source_path, reason, size, created_at
    bytes: int = 0  # of the copies deleted (dry run: that would be)
    audit_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_ARCHIVED = frozenset({Outcome.STORED.value, Outcome.DUPLICATE.value, Outcome.CONFLICT.value})
MISSING_COPY = "missing copy"


def retry_quarantined(archive: Archive, entry_ids: Sequence[int] | None = None) -> RetryReport:
    """Ingest kept copies again (all when ``entry_ids`` is None): for input refused by an older version, or by a
    failure that has since gone away.

    The copies go through the normal ingest (one job). An entry whose file now
    archives (stored, duplicate or conflict) is removed with its copy and an
    audit record, and the instance's ``source_path`` names the original source
    again, not the copy. One that fails again stays, with the new reason; the
    entry ingest made for the copy on the way is folded into it, so the file
    keeps one entry.
    """
    from archive.services.ingest import ingest_paths  # ingest quarantines through this module: import when used

    with archive.unit_of_work() as uow:
        query = select(QuarantineEntry).order_by(QuarantineEntry.id)
        if entry_ids is not None:
            query = query.where(QuarantineEntry.id.in_(list(entry_ids)))
        entries = list(uow.session.scalars(query))
        uow.session.expunge_all()  # read after this transaction: detached with their loaded values
    if entry_ids is not None:
        unknown = sorted(set(entry_ids) - {e.id for e in entries})
        if unknown:
            raise NotFoundError(f"no quarantine entry {', '.join(map(str, unknown))} (see `medarchive quarantine list`)")
    report = RetryReport()
    present = [e for e in entries if Path(e.stored_path).is_file()]
    report.results.extend(RetryResult(e.id, e.source_path, MISSING_COPY, f"the kept copy {e.stored_path} is gone")
                          for e in entries if e not in present)
    if not present:
        return report
    paths = list(dict.fromkeys(e.stored_path for e in present))
    ingest = ingest_paths(archive, [Path(p) for p in paths])
    report.job_id = ingest.job_id
    outcomes = {str(o.path): o for o in ingest.outcomes}
    doomed_files: set[str] = set()
    with archive.unit_of_work() as uow:
        for entry in present:
            outcome = outcomes.get(entry.stored_path)
            if outcome is not None and outcome.outcome.value in _ARCHIVED:
                _release(uow.session, entry, outcome.outcome.value, outcome.study_uid, ingest.job_id)
                report.results.append(RetryResult(entry.id, entry.source_path, outcome.outcome.value,
                                                  study_uid=outcome.study_uid))
                doomed_files.add(entry.stored_path)
                continue
            state = outcome.outcome.value if outcome is not None else Outcome.SKIPPED.value
            reason = outcome.reason if outcome is not None else "ingest gave no outcome for the copy"
            files, error_type = _fold_new_entry(uow.session, entry)  # the entry ingest made for the copy, if any
            doomed_files |= files
            kept = uow.session.get_one(QuarantineEntry, entry.id)
            if state == Outcome.SKIPPED.value:
                kept.reason, kept.error_type = f"not archived: {reason}", "NotArchived"
            else:
                kept.reason, kept.error_type = reason, error_type or kept.error_type
            report.results.append(RetryResult(entry.id, entry.source_path, state, kept.reason))
        uow.commit()
        _delete_unreferenced_copies(uow.session, doomed_files)
    return report


def purge_quarantine(archive: Archive, *, older_than_days: float, dry_run: bool = False) -> PurgeReport:
    """Delete entries quarantined more than ``older_than_days`` ago, and their copies, with an audit record."""
    if older_than_days < 0:
        raise ArchiveError(f"--older-than {older_than_days:g}: give a number of days, 0 or more")
    cutoff = utcnow() - timedelta(days=older_than_days)
    report = PurgeReport(dry_run=dry_run, older_than_days=older_than_days)
    with archive.unit_of_work() as uow:
        entries = list(uow.session.scalars(
            select(QuarantineEntry).where(QuarantineEntry.created_at <= cutoff).order_by(QuarantineEntry.id)))
        report.entries = [{"id": e.id, "source_path": e.source_path, "stored_path": e.stored_path, "reason": e.reason,
                           "sha256": e.sha256, "size": e.size, "created_at": e.created_at.isoformat()} for e in entries]
        report.bytes = sum(e.size for e in {e.stored_path: e for e in entries}.values())
        if dry_run or not entries:
            return report
        for entry in entries:
            uow.session.delete(entry)
        report.audit_id = record(
            uow.session, AuditAction.QUARANTINE_PURGE, "quarantine",
            reason=f"purge of entries older than {older_than_days:g} days",
            details={"entries": len(entries), "bytes": report.bytes, "older_than_days": older_than_days,
                     "removed": [{k: e[k] for k in ("id", "source_path", "sha256", "size", "reason")}
                                 for e in report.entries]}).id
        uow.commit()
        _delete_unreferenced_copies(uow.session, {e.stored_path for e in entries})
    return report


def _release(session: Session, entry: QuarantineEntry, outcome: str, study_uid: str | None, job_id: int | None) -> None:
    """The file archives now: drop its entry, point the instance back at the original source, say so in the audit log."""
    session.execute(delete(QuarantineEntry).where(QuarantineEntry.id == entry.id))
    if job_id is not None:
        session.execute(update(Instance).where(Instance.source_path == entry.stored_path, Instance.job_id == job_id)
                        .values(source_path=entry.source_path))
    record(session, AuditAction.QUARANTINE_RETRY, entry.source_path, reason=f"re-ingested: {outcome}",
           details={"entry": entry.id, "source_path": entry.source_path, "sha256": entry.sha256, "outcome": outcome,
                    "study_uid": study_uid, "previous_reason": entry.reason, "job_id": job_id})


def _fold_new_entry(session: Session, entry: QuarantineEntry) -> tuple[set[str], str | None]:
    """Remove the entry ingest added for the copy itself (its source path is the copy).

    Returns the copy files that entry made (deleted after the commit) and its error type.
    """
    made = list(session.scalars(select(QuarantineEntry).where(
        QuarantineEntry.source_path == entry.stored_path, QuarantineEntry.id != entry.id)))
    for m in made:
        session.delete(m)
    session.flush()
    return {m.stored_path for m in made if m.stored_path != entry.stored_path}, (made[-1].error_type if made else None)


def _delete_unreferenced_copies(session: Session, stored_paths: set[str]) -> None:
    """Delete copies (and their reason files) no remaining entry points at; after the commit, so a crash leaves files, not rows without them."""
    for stored in sorted(stored_paths):
        if session.scalar(select(func.count()).select_from(QuarantineEntry).where(QuarantineEntry.stored_path == stored)):
            continue
        for path in (Path(stored), Path(stored + ".reason.txt")):
            path.unlink(missing_ok=True)
