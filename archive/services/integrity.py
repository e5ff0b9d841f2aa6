"""Use cases: prove the stored blobs are intact, and remove the ones nothing references.

Verification re-reads and re-hashes every blob the catalog references, once
per digest however many instances share it, and names the studies a bad blob
belongs to. Garbage collection removes blobs that are referenced by nothing
and older than a grace period: the catalog rows in one transaction whose
DELETE re-checks the references itself, then the files, each only when its
modification time is old too (``put`` refreshes it), so content that a
concurrent ingest or re-compression is about to reference is never lost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from itertools import islice
from typing import Any

from sqlalchemy import Select, delete, exists, select, union_all
from sqlalchemy.orm import Session

from archive.catalog.models import Blob, EncodedFrame, Encoding, Instance, Series, Study
from archive.errors import BlobCorruptError, BlobNotFoundError, NotFoundError
from archive.services.runtime import Archive

MISSING = "missing"
CORRUPT = "corrupt"
_PAGE = 1000


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
    problems: list[BlobProblem] = field(default_factory=list)

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
    blob_files: int = 0  # their files deleted
    blob_bytes: int = 0
    kept_recent: int = 0  # files of deleted rows kept: put again within the grace period
    missing_files: int = 0  # rows deleted whose file was already gone
    orphan_files: int = 0  # files with no catalog row (a stage that never committed), deleted
    orphan_bytes: int = 0
    deleted: list[str] = field(default_factory=list)  # digests of the files deleted

    @property
    def files_deleted(self) -> int:
        return self.blob_files + self.orphan_files

    @property
    def bytes_freed(self) -> int:
        return self.blob_bytes + self.orphan_bytes

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
        bad: dict[str, str] = {}
        for digest in page:
            try:
                data = archive.store.get(digest)
            except BlobNotFoundError:
                bad[digest] = MISSING
            except BlobCorruptError:
                bad[digest] = CORRUPT
            else:
                report.bytes_checked += len(data)
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
    return report


def _references(study_id: int | None) -> Select[tuple[str, int]]:
    """(digest, instance id) for every blob reference: encoded frames and header blobs."""
    frames = select(EncodedFrame.blob_sha256.label("digest"), Encoding.instance_id.label("instance_id")).join(
        Encoding, Encoding.id == EncodedFrame.encoding_id
    )
    headers = select(Instance.header_blob.label("digest"), Instance.id.label("instance_id"))
    if study_id is not None:
        in_study = select(Instance.id).join(Series, Series.id == Instance.series_id).where(Series.study_id == study_id)
        frames = frames.where(Encoding.instance_id.in_(in_study))
        headers = headers.where(Instance.id.in_(in_study))
    return select(union_all(frames, headers).subquery())


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
    return problems


def collect_garbage(
    archive: Archive,
    *,
    grace_seconds: float,
    dry_run: bool = False,
    now: datetime | None = None,
) -> GcReport:
    """Remove blobs referenced by nothing and older than ``grace_seconds`` (rows, then files), and orphan files."""
    now = _utc(now)
    cutoff = now - timedelta(seconds=grace_seconds)
    cutoff_ts = cutoff.timestamp()
    report = GcReport(dry_run=dry_run, grace_seconds=grace_seconds)
    unreferenced = (
        (Blob.created_at <= cutoff)
        & ~exists().where(EncodedFrame.blob_sha256 == Blob.sha256)
        & ~exists().where(Instance.header_blob == Blob.sha256)
    )
    with archive.unit_of_work() as uow:
        if dry_run:
            rows = uow.session.execute(select(Blob.sha256, Blob.size).where(unreferenced)).all()
        else:
            # The DELETE carries the conditions itself: a reference committed after any earlier read is seen
            # (PostgreSQL re-checks a row another transaction updated; SQLite has a single writer).
            rows = uow.session.execute(
                delete(Blob).where(unreferenced).returning(Blob.sha256, Blob.size)
            ).all()
            uow.commit()
    report.blob_rows = len(rows)
    store = archive.store
    for digest, size in sorted(rows):
        mtime = store.mtime(digest)
        if mtime is None:
            report.missing_files += 1
            continue
        freed = (size if mtime < cutoff_ts else None) if dry_run else store.delete_if_older(digest, cutoff_ts)
        if freed is None:  # put again within the grace period: about to be referenced, or an orphan later
            report.kept_recent += 1
            continue
        report.blob_files += 1
        report.blob_bytes += freed
        report.deleted.append(digest)
    for batch in _batches(store.digests(), _PAGE):
        with archive.unit_of_work() as uow:
            known = set(uow.session.scalars(select(Blob.sha256).where(Blob.sha256.in_(batch))))
        for digest in batch:
            if digest in known:
                continue
            mtime = store.mtime(digest)
            if mtime is None or mtime >= cutoff_ts:
                continue  # young: a stage that has not committed yet
            freed = _size_on_disk(archive, digest) if dry_run else store.delete_if_older(digest, cutoff_ts)
            if freed is None:
                continue
            report.orphan_files += 1
            report.orphan_bytes += freed
            report.deleted.append(digest)
    return report


def _size_on_disk(archive: Archive, digest: str) -> int | None:
    try:
        return archive.store.path_for(digest).stat().st_size
    except FileNotFoundError:
        return None


def _batches(items: Iterator[str], size: int) -> Iterator[Sequence[str]]:
    while batch := list(islice(items, size)):
        yield batch


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    return now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)
