"""Use cases: prove the stored blobs are intact, and remove the ones nothing references.

Verification re-reads and re-hashes every blob the catalog references, once
per digest however many instances share it, and names the studies a bad blob
belongs to. Garbage collection removes blobs that are referenced by nothing
and older than a grace period: the catalog rows in one transaction whose
DELETE re-checks the references itself, then the files, each only when its
modification time is old too (``put`` refreshes it), so content that a
concurrent ingest or re-compression is about to reference is never lost.

Headers kept by corrections (``header_revisions``) are references like any
other: verified, and never collected. ``medarchive backup`` holds
``home/backup.lock`` shared while it copies; the collector takes it
exclusively before it deletes files or compacts packs, and when a backup
holds it deletes catalog rows only (their bytes go on a later run), so a
backup never misses a blob its catalog snapshot references.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.orm import Session

from archive.catalog.models import (
    Blob,
    Instance,
    Series,
    Study,
)
from archive.errors import BlobCorruptError, BlobNotFoundError, NotFoundError
from archive.services.blobs import blob_refs
from archive.services.references import blob_references, is_referenced
from archive.services.monitoring import record_verify
from archive.services.runtime import Archive
from archive.store import BlobRef
from archive.clock import aware_utc, utcnow
from archive.store.packs import PACK_MAGIC, RECORD_HEADER

MISSING = "missing"
CORRUPT = "corrupt"
_PAGE = 1000
COMPACT_DEAD_FRACTION = 0.25  # a sealed pack is rewritten once this share of it is dead
BACKUP_LOCK = "backup.lock"  # in the home: shared by a backup, exclusive by the collector's file phase


@contextmanager
def backup_lock(home: Path, *, exclusive: bool, wait: bool = True) -> Iterator[bool]:
    """Hold ``home/backup.lock``; yields False when ``wait`` is off and another process holds it the other way.

    A backup holds it shared (several may run); the garbage collector
    exclusively, without waiting, while it deletes files and compacts packs.
    """
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / BACKUP_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


@dataclass(frozen=True)
class BlobProblem:
    """One bad blob as one instance sees it (a shared blob yields one problem per instance)."""

    study_uid: str
    sop_instance_uid: str
    digest: str
    problem: str  # MISSING or CORRUPT


@dataclass
class VerifyReport:
    study_uid: str | None = None  # None: the whole archive
    blobs_checked: int = 0
    bytes_checked: int = 0
    problems: list[BlobProblem] = field(default_factory=list)  # study and instance "" : no instance uses it

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_blobs(self) -> int:
        return len({p.digest for p in self.problems})

    @property
    def corrupt_by_study(self) -> dict[str, list[BlobProblem]]:
        """Problems (missing or corrupt) grouped by the study they damage."""
        grouped: dict[str, list[BlobProblem]] = {}
        for problem in self.problems:
            grouped.setdefault(problem.study_uid, []).append(problem)
        return grouped

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "blobs_checked": self.blobs_checked,
            "bytes_checked": self.bytes_checked,
            "bad_blobs": self.bad_blobs,
            "problems": [dataclasses.asdict(p) for p in self.problems],
            "corrupt_by_study": {study: len(items) for study, items in self.corrupt_by_study.items()},
        }


@dataclass
class GcReport:
    dry_run: bool
    grace_seconds: float
    blob_rows: int = 0  # unreferenced catalog rows deleted (dry run: that would be)
    blob_files: int = 0  # loose files (layout before packs) of deleted rows deleted
    blob_bytes: int = 0
    kept_recent: int = 0  # loose files of deleted rows kept: put again within the grace period
    missing_files: int = 0  # rows deleted whose loose file was already gone
    orphan_files: int = 0  # loose files with no catalog row (a stage that never committed), deleted
    orphan_bytes: int = 0
    packs_compacted: int = 0  # sealed packs whose live blobs were copied to a new pack
    packs_retired: int = 0  # packs set aside (compacted, or with nothing live)
    pack_bytes_moved: int = 0  # live bytes copied by compaction
    pack_bytes_reclaimable: int = 0  # dead bytes in the packs retired by this run
    pack_bytes_freed: int = 0  # retired packs deleted (set aside by an earlier run, past the grace period)
    deferred_for_backup: bool = False  # a backup held the lock: rows deleted, files and packs left for a later run
    deleted: list[str] = field(default_factory=list)  # digests of the loose files deleted

    @property
    def files_deleted(self) -> int:
        return self.blob_files + self.orphan_files

    @property
    def bytes_freed(self) -> int:
        return self.blob_bytes + self.orphan_bytes + self.pack_bytes_freed

    def as_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values.pop("deleted")
        return {**values, "files_deleted": self.files_deleted, "bytes_freed": self.bytes_freed}


def verify_blobs(
    archive: Archive,
    *,
    study_uid: str | None = None,
    on_blob: Callable[[str, bool], None] | None = None,
) -> VerifyReport:
    """Re-hash every blob referenced by the catalog (or by one study); raises NotFoundError for an unknown study."""
    report = VerifyReport(study_uid=study_uid)
    study_id: int | None = None
    if study_uid is not None:
        with archive.unit_of_work() as uow:
            study_id = uow.session.scalar(select(Study.id).where(Study.study_uid == study_uid))
        if study_id is None:
            raise NotFoundError(f"no study with Study Instance UID {study_uid!r}")
    last = ""
    while True:  # keyset pages of distinct digests, each read in a short transaction
        with archive.unit_of_work() as uow:
            refs = _references(study_id).subquery()
            page = list(uow.session.scalars(
                select(refs.c.digest).distinct().where(refs.c.digest > last).order_by(refs.c.digest).limit(_PAGE)
            ))
            locations = blob_refs(uow.session, page)
        bad: dict[str, str] = {}
        for digest in page:
            problem, nbytes = check_blob(archive, locations, digest)
            if problem:
                bad[digest] = problem
            report.bytes_checked += nbytes
            report.blobs_checked += 1
            if on_blob is not None:
                on_blob(digest, digest not in bad)
        if bad:
            with archive.unit_of_work() as uow:
                report.problems.extend(_attribute(uow.session, bad, study_id))
        if len(page) < _PAGE:
            break
        last = page[-1]
    report.problems.sort(key=lambda p: (p.study_uid, p.sop_instance_uid, p.digest))
    if study_uid is None and not archive.read_only:  # a whole-archive run: /metrics shows its figures
        kinds = {p.digest: p.problem for p in report.problems}
        try:
            record_verify(archive, blobs_checked=report.blobs_checked,
                          missing=sum(1 for k in kinds.values() if k == MISSING),
                          corrupt=sum(1 for k in kinds.values() if k == CORRUPT))
        except OSError:
            pass  # the figures are for monitoring; the report itself is what the caller acts on
    return report


def check_blob(archive: Archive, locations: dict[str, BlobRef], digest: str) -> tuple[str | None, int]:
    """Read one blob back, re-hashing it: (MISSING, CORRUPT or None, bytes read)."""
    try:
        if digest not in locations:
            raise BlobNotFoundError(f"blob {digest} has no catalog row")
        return None, len(archive.store.get(locations[digest]))
    except BlobNotFoundError:
        return MISSING, 0
    except BlobCorruptError:
        return CORRUPT, 0


def verify_instances(archive: Archive, instance_ids: Iterable[int], *, batch: int = 200) -> dict[int, str]:
    """Re-read every blob the instances reference (frames, codec contexts, headers, dictionaries, revisions).

    ``verify_blobs`` scoped to a few instances (storage commitment asks about
    the instances it is about to commit): the instances with a missing or
    corrupt blob, and what is wrong.
    """
    ids = sorted(set(instance_ids))
    problems: dict[int, str] = {}
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        with archive.unit_of_work() as uow:
            refs = blob_references(instance_ids=select(Instance.id).where(Instance.id.in_(chunk))).subquery()
            uses = uow.session.execute(select(refs.c.digest, refs.c.instance_id).distinct()).all()
            locations = blob_refs(uow.session, {digest for digest, _ in uses})
        bad = {digest: problem for digest in sorted({d for d, _ in uses})
               if (problem := check_blob(archive, locations, digest)[0])}
        for digest, instance_id in uses:
            if digest in bad:
                problems[instance_id] = f"stored blob {digest[:12]} is {bad[digest]}"
    return problems


def _references(study_id: int | None) -> Select[tuple[str, int]]:
    """(digest, instance id) for every blob reference (see :mod:`archive.services.references`)."""
    return blob_references(study_id)


def _attribute(session: Session, bad: dict[str, str], study_id: int | None) -> list[BlobProblem]:
    """Name the study and instance of every reference to a bad digest."""
    problems: list[BlobProblem] = []
    sub = _references(study_id).subquery()
    rows = session.execute(
        select(sub.c.digest, Study.study_uid, Instance.sop_instance_uid)
        .join(Instance, Instance.id == sub.c.instance_id)
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(sub.c.digest.in_(list(bad)))
        .distinct()
    ).all()
    for digest, study, sop in rows:
        problems.append(BlobProblem(study, sop, digest, bad[digest]))
    named = {problem.digest for problem in problems}
    for digest in sorted(set(bad) - named):  # a trained header dictionary no instance uses yet
        problems.append(BlobProblem("", "", digest, bad[digest]))
    return problems


def collect_garbage(
    archive: Archive,
    *,
    grace_seconds: float,
    dry_run: bool = False,
    now: datetime | None = None,
) -> GcReport:
    """Remove blobs referenced by nothing and older than ``grace_seconds`` (rows, then files), and orphan files."""
    now = (aware_utc(now) or utcnow())
    cutoff = now - timedelta(seconds=grace_seconds)
    cutoff_ts = cutoff.timestamp()
    report = GcReport(dry_run=dry_run, grace_seconds=grace_seconds)
    unreferenced = (Blob.created_at <= cutoff) & ~is_referenced(Blob.sha256)
    with archive.unit_of_work() as uow:
        if dry_run:
            rows = uow.session.execute(select(Blob.sha256, Blob.size, Blob.pack).where(unreferenced)).all()
        else:
            # The DELETE carries the conditions itself: a reference committed after any earlier read is seen
            # (PostgreSQL re-checks a row another transaction updated; SQLite has a single writer).
            rows = uow.session.execute(
                delete(Blob).where(unreferenced).returning(Blob.sha256, Blob.size, Blob.pack)
            ).all()
            uow.commit()
    report.blob_rows = len(rows)
    if dry_run:
        _collect_files(archive, report, rows, cutoff_ts, grace_seconds)
        return report
    with backup_lock(archive.settings.home, exclusive=True, wait=False) as held:
        if not held:  # a backup is copying what its snapshot references: its files stay until a later run
            report.deferred_for_backup = True
            return report
        _collect_files(archive, report, rows, cutoff_ts, grace_seconds)
    return report


def _collect_files(archive: Archive, report: GcReport, rows: Sequence[Any], cutoff_ts: float,
                   grace_seconds: float) -> None:
    """The file phase of :func:`collect_garbage`: loose files of deleted rows, orphans, then pack compaction."""
    dry_run = report.dry_run
    loose = archive.store.loose
    for digest, size, pack in sorted(rows):
        if pack is not None:
            continue  # a packed blob's bytes come back when its pack is compacted
        mtime = loose.mtime(digest)
        if mtime is None:
            report.missing_files += 1
            continue
        freed = (size if mtime < cutoff_ts else None) if dry_run else loose.delete_if_older(digest, cutoff_ts)
        if freed is None:  # put again within the grace period: about to be referenced, or an orphan later
            report.kept_recent += 1
            continue
        report.blob_files += 1
        report.blob_bytes += freed
        report.deleted.append(digest)
    for batch in _batches(loose.digests(), _PAGE):
        with archive.unit_of_work() as uow:
            known = set(uow.session.scalars(select(Blob.sha256).where(Blob.sha256.in_(batch), Blob.pack.is_(None))))
        for digest in batch:
            if digest in known:
                continue
            mtime = loose.mtime(digest)
            if mtime is None or mtime >= cutoff_ts:
                continue  # young: a stage that has not committed yet
            freed = _size_on_disk(loose.path_for(digest)) if dry_run else loose.delete_if_older(digest, cutoff_ts)
            if freed is None:
                continue
            report.orphan_files += 1
            report.orphan_bytes += freed
            report.deleted.append(digest)
    # a dry run deleted no rows: its compaction estimate must not count the packed ones it would delete as live
    doomed = {digest for digest, _, pack in rows if pack is not None} if dry_run else set()
    _compact_packs(archive, report, cutoff_ts, grace_seconds=grace_seconds, dry_run=dry_run, unreferenced=doomed)


def compact_packs(
    archive: Archive, report: GcReport, cutoff_ts: float, *, grace_seconds: float = 0.0, dry_run: bool = False,
    unreferenced: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Give back the space of dead records: copy a sealed pack's live blobs to a new pack, retire the old one.

    Only packs no process appends to (no flock) and not modified since the
    cutoff are touched. Rows are moved with a compare-and-set on the old
    location, after the copies are durable; the old pack is set aside, and
    deleted by a run after the grace period, so a reader holding its old
    location still reads it meanwhile. ``unreferenced``: digests whose rows
    a dry run would have deleted, not counted as live. Nothing is moved or
    deleted while a backup runs (``report.deferred_for_backup``).
    """
    if dry_run:
        _compact_packs(archive, report, cutoff_ts, grace_seconds=grace_seconds, dry_run=True, unreferenced=unreferenced)
        return
    with backup_lock(archive.settings.home, exclusive=True, wait=False) as held:
        if not held:
            report.deferred_for_backup = True
            return
        _compact_packs(archive, report, cutoff_ts, grace_seconds=grace_seconds, unreferenced=unreferenced)


def _compact_packs(
    archive: Archive, report: GcReport, cutoff_ts: float, *, grace_seconds: float = 0.0, dry_run: bool = False,
    unreferenced: set[str] | frozenset[str] = frozenset(),
) -> None:
    packs = archive.store.packs
    if not dry_run:
        report.pack_bytes_freed += packs.purge_retired(cutoff_ts)
    for info in packs.packs():
        if info.mtime >= cutoff_ts:
            continue
        with packs.sealed(info.name) as sealed:
            if not sealed:
                continue  # a live process still appends to it
            with archive.unit_of_work() as uow:
                live = [BlobRef(row.sha256, row.size, info.name, row.offset) for row in uow.session.execute(
                    select(Blob.sha256, Blob.size, Blob.offset).where(Blob.pack == info.name))
                    if row.sha256 not in unreferenced]
            # a pack with nothing live goes whole; a compacted one's magic is replaced by the new pack's
            live_bytes = sum(ref.size + RECORD_HEADER for ref in live) + (len(PACK_MAGIC) if live else 0)
            dead = info.size - live_bytes
            if live and dead < info.size * COMPACT_DEAD_FRACTION:
                continue
            if dry_run:
                report.packs_retired += 1
                report.packs_compacted += bool(live)
                report.pack_bytes_reclaimable += dead
                continue
            if live and not _move_live_blobs(archive, info.name, live):
                continue
            packs.retire(info.name, now=cutoff_ts + grace_seconds)
            report.packs_retired += 1
            report.packs_compacted += bool(live)
            report.pack_bytes_moved += sum(ref.size for ref in live)
            report.pack_bytes_reclaimable += dead
    archive.store.sync()


def _move_live_blobs(archive: Archive, pack: str, live: list[BlobRef]) -> bool:
    """Copy live blobs to this process's pack and point their rows there; False when one cannot be read."""
    try:
        for ref in live:  # every live blob must read intact before any is copied: no churn around a bad one
            archive.store.get(ref)
    except (BlobCorruptError, BlobNotFoundError):
        return False  # verify reports it; the pack stays until an administrator has looked
    moved = [(ref, archive.store.put(archive.store.get(ref))) for ref in live]
    archive.store.sync()
    with archive.unit_of_work() as uow:
        for old, new in moved:
            uow.session.execute(
                update(Blob).where(Blob.sha256 == old.digest, Blob.pack == pack, Blob.offset == old.offset)
                .values(pack=new.pack, offset=new.offset)
            )
        remaining = uow.session.scalar(select(func.count()).select_from(Blob).where(Blob.pack == pack))
        if remaining:
            uow.rollback()
            return False
        uow.commit()
    return True


def _size_on_disk(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _batches(items: Iterator[str], size: int) -> Iterator[Sequence[str]]:
    while batch := list(islice(items, size)):
        yield batch
