"""Creating jobs and sending their tasks.

A job's instances are :class:`JobItem` rows grouped into :class:`JobTask`
chunks (at most ``chunk_size`` instances of one study: a big series is split,
small series share a chunk); a broker message carries a task id and nothing
else. Celery is not imported here: callers hand in a ``dispatcher`` that sends
a message for a task id on a :class:`Lane` (learned codecs have a queue of their own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from archive.catalog.models import Job, JobItem, JobStatus, JobTask
from archive.clock import utcnow
from archive.dicom.reader import peek_uids
from archive.codecs import uses_learned_codec
from archive.kinds import JobKind, Lane
from archive.services.discovery import discover
from archive.services.encoding import archive_codec
from archive.services.failures import is_transient
from archive.services.outcomes import FileOutcome
from archive.services.runtime import Archive

Dispatcher = Callable[[int, Lane], str]  # sends one message for a JobTask id on a lane, returns the message id
UNREADABLE = ""  # group key of files whose Study Instance UID cannot be read


@dataclass(frozen=True)
class ItemSpec:
    """One instance of a new job: a file to ingest or an archived instance to re-compress."""

    path: str | None = None
    instance_id: int | None = None
    series_uid: str | None = None


def create_job(
    session: Session,
    *,
    kind: JobKind,
    items: Sequence[ItemSpec],
    chunk_size: int,
    study_uid: str | None = None,
    params: dict[str, Any] | None = None,
    spool_dir: str | None = None,
    fingerprint: str | None = None,
    policy: str | None = None,
    job: Job | None = None,
) -> Job:
    """A job with its items, in tasks of at most ``chunk_size`` instances (the caller commits)."""
    if job is None:
        job = Job(kind=kind, status=JobStatus.QUEUED, study_uid=study_uid, params=params or {},
                  spool_dir=spool_dir, fingerprint=fingerprint, policy=policy)
        session.add(job)
    job.status = JobStatus.QUEUED
    session.flush()
    for series_uid, chunk in _chunks(items, max(chunk_size, 1)):
        task = JobTask(job_id=job.id, series_uid=series_uid)
        session.add(task)
        session.flush()
        session.add_all(JobItem(job_id=job.id, task_id=task.id, path=spec.path, source_instance_id=spec.instance_id)
                        for spec in chunk)
    job.counts = {"items": len(items)}
    session.flush()
    return job


def _chunks(items: Sequence[ItemSpec], size: int) -> list[tuple[str | None, list[ItemSpec]]]:
    """Tasks of at most ``size`` instances: a big series is split, small series of the study share a task.

    A CT series has hundreds of slices (one series per task, or several); a
    localizer or a secondary capture has one, and a message, a claim and a
    commit per single instance would cost more than encoding it.
    """
    by_series: dict[str | None, list[ItemSpec]] = {}
    for spec in items:
        by_series.setdefault(spec.series_uid, []).append(spec)
    chunks: list[tuple[str | None, list[ItemSpec]]] = []
    small: list[ItemSpec] = []
    for series_uid, specs in by_series.items():
        if len(specs) < size:
            if len(small) + len(specs) > size:
                chunks.append((None, small))
                small = []
            small.extend(specs)
            continue
        for start in range(0, len(specs), size):
            chunks.append((series_uid, specs[start:start + size]))
    if small:
        series = {s.series_uid for s in small}
        chunks.append((series.pop() if len(series) == 1 else None, small))
    return chunks


def dispatch(archive: Archive, task_ids: Sequence[int], dispatcher: Dispatcher) -> int:
    """Send one message per task and record when; a failure to send leaves the task to the reconciler."""
    sent: list[tuple[int, str]] = []
    lanes = task_lanes(archive, task_ids)
    try:
        for task_id in task_ids:
            sent.append((task_id, dispatcher(task_id, lanes.get(task_id, Lane.DEFAULT))))
    except Exception as exc:
        if not is_transient(exc):
            raise
        # the broker is away: the reconciler sends what is left once it is back
    if sent:
        now = utcnow()
        with archive.unit_of_work() as uow:
            for task_id, message_id in sent:
                uow.session.execute(update(JobTask).where(JobTask.id == task_id).values(
                    celery_id=message_id, dispatched_at=now, dispatches=JobTask.dispatches + 1))
            uow.commit()
    return len(sent)


def task_lanes(archive: Archive, task_ids: Sequence[int]) -> dict[int, Lane]:
    """The lane of each task: LEARNED when its job's codec (a policy's, or the archive's for ingest) runs a model."""
    if not task_ids:
        return {}
    ingest_learned = uses_learned_codec(archive.settings.codec)
    lanes: dict[int, Lane] = {}
    with archive.unit_of_work() as uow:
        rows = uow.session.execute(select(JobTask.id, Job.kind, Job.params).join(Job, Job.id == JobTask.job_id)
                                   .where(JobTask.id.in_(list(task_ids))))
        for task_id, kind, params in rows:
            codec = (params or {}).get("codec")
            learned = uses_learned_codec(codec) if codec is not None else kind is JobKind.INGEST and ingest_learned
            lanes[task_id] = Lane.LEARNED if learned else Lane.DEFAULT
    return lanes


def job_task_ids(session: Session, job_id: int) -> list[int]:
    return list(session.scalars(select(JobTask.id).where(JobTask.job_id == job_id).order_by(JobTask.id)))


def submit_paths(
    archive: Archive, paths: Sequence[Path], dispatcher: Dispatcher
) -> tuple[list[int], list[FileOutcome]]:
    """Queue files and folders for the workers in place (``ingest --wait``); sources are only read.

    Files are grouped by study and series from their headers, one job per study.
    Returns the job ids and the files set aside before reading.
    """
    files, skipped = discover(paths)
    groups = group_by_study(files)
    codec = archive_codec(archive.settings.codec).get_config()
    job_ids: list[int] = []
    for study_uid, members in groups.items():  # each study is queued as soon as it is recorded
        with archive.unit_of_work() as uow:
            job = create_job(
                uow.session, kind=JobKind.INGEST, study_uid=study_uid or None,
                items=[ItemSpec(path=str(p), series_uid=series) for p, series in members],
                chunk_size=archive.settings.chunk_size, params={"paths": [str(p) for p in paths], "codec": codec},
            )
            task_ids = job_task_ids(uow.session, job.id)
            uow.commit()
        job_ids.append(job.id)
        dispatch(archive, task_ids, dispatcher)
    return job_ids, skipped


def group_by_study(files: Sequence[Path]) -> dict[str, list[tuple[Path, str | None]]]:
    """Files by Study Instance UID with their Series Instance UID; unreadable ones under ``UNREADABLE``."""
    groups: dict[str, list[tuple[Path, str | None]]] = {}
    for path in files:
        uids = peek_uids(path)
        study, series = uids if uids else (UNREADABLE, None)
        groups.setdefault(study, []).append((path, series))
    return groups
