"""The spool: a stable study's files leave the inbox for a folder of their own, then are queued once.

Order matters for crash safety: the job is recorded (status spooling, with its
file list) before any file moves, so a watcher killed half way is finished by
:func:`resume_spooling` on its next start; tasks are created only once every
file is in the spool. The spool folder is removed by
:func:`archive.services.jobs.finalize_job` when every instance in it is
archived or quarantined.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select

from archive.catalog.models import Job, JobStatus
from archive.clock import utcnow
from archive.kinds import JobKind
from archive.services.encoding import archive_codec
from archive.services.jobs import (
    Dispatcher,
    ItemSpec,
    create_job,
    dispatch,
    job_task_ids,
)
from archive.services.runtime import Archive
from archive.store.blobstore import fsync_dir


def spool_fingerprint(study_uid: str, files: Sequence[tuple[str, int, int]]) -> str:
    """Study + (relative path, size, mtime) of every file: the same arrival is queued once."""
    digest = hashlib.sha256(study_uid.encode())
    for rel, size, mtime_ns in sorted(files):
        digest.update(f"\0{rel}\0{size}\0{mtime_ns}".encode())
    return digest.hexdigest()


def spool_study(
    archive: Archive,
    inbox: Path,
    study_uid: str,
    files: Sequence[tuple[Path, str | None]],
    dispatcher: Dispatcher,
) -> int:
    """Move a stable study's files from the inbox into ``spool/<job>/``, record the job, queue it once."""
    rels = []
    for path, series in files:
        stat = path.stat()
        rels.append((str(path.relative_to(inbox)), stat.st_size, stat.st_mtime_ns, series))
    fingerprint = spool_fingerprint(study_uid, [(r, s, m) for r, s, m, _ in rels])
    with archive.unit_of_work() as uow:
        existing = uow.session.scalar(select(Job).where(Job.fingerprint == fingerprint))
        if existing is not None and existing.status is not JobStatus.SPOOLING:
            # the very same files (same names, sizes and times) again after that job finished: a new arrival
            fingerprint = hashlib.sha256(f"{fingerprint}:{utcnow().isoformat()}".encode()).hexdigest()
            existing = None
        if existing is None:
            job = Job(kind=JobKind.INGEST, status=JobStatus.SPOOLING, study_uid=study_uid or None, fingerprint=fingerprint,
                      params={"inbox": str(inbox), "files": [[r, series] for r, _, _, series in rels],
                              "codec": archive_codec(archive.settings.codec).get_config()})
            uow.session.add(job)
            uow.session.flush()
            job.spool_dir = str(archive.settings.spool_dir / f"job-{job.id}")
            uow.commit()
            job_id = job.id
        else:
            job_id = existing.id
    return _finish_spooling(archive, job_id, dispatcher)


def resume_spooling(archive: Archive, dispatcher: Dispatcher) -> list[int]:
    """Finish jobs a watcher left half-spooled (it was killed while moving files)."""
    with archive.unit_of_work() as uow:
        job_ids = list(uow.session.scalars(select(Job.id).where(Job.status == JobStatus.SPOOLING)))
    return [_finish_spooling(archive, job_id, dispatcher) for job_id in job_ids]


def _finish_spooling(archive: Archive, job_id: int, dispatcher: Dispatcher) -> int:
    with archive.unit_of_work() as uow:
        job = uow.session.get_one(Job, job_id)
        assert job.spool_dir is not None
        inbox = Path(job.params["inbox"])
        spool = Path(job.spool_dir)
        files = [(str(rel), series) for rel, series in job.params["files"]]
    spool.mkdir(parents=True, exist_ok=True)
    items: list[ItemSpec] = []
    for rel, series in files:
        source, target = inbox / rel, spool / rel
        if source.exists() and not target.exists():
            _move_durably(source, target)
        if target.exists():
            items.append(ItemSpec(path=str(target), series_uid=series))
    fsync_dir(spool)
    with archive.unit_of_work() as uow:
        job = uow.session.get_one(Job, job_id)
        if job.status is JobStatus.SPOOLING:
            create_job(uow.session, kind=JobKind.INGEST, items=items, chunk_size=archive.settings.chunk_size, job=job)
            if not items:
                job.status, job.finished_at, job.error = JobStatus.DONE, utcnow(), "every file left the inbox before spooling"
        uow.commit()
        task_ids = job_task_ids(uow.session, job_id)
    dispatch(archive, task_ids, dispatcher)
    return job_id


def _move_durably(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)  # atomic on one filesystem
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = target.with_name(target.name + ".spooling")
        shutil.copy2(source, tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        source.unlink()  # only once the copy is durable
