"""Closing the loop: finish jobs whose items are all final, and re-send work no live task holds."""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from archive.catalog.models import FINAL_ITEM_STATUSES, Instance, ItemStatus, Job, JobItem, JobStatus, JobTask
from archive.clock import aware_utc, utcnow
from archive.kinds import JobKind, NormalizeOutcome
from archive.services.blobs import blob_refs
from archive.services.references import blob_references
from archive.services.job_kinds import handler_for, in_window
from archive.services.leases import owner_is_dead, process_owner, reclaimable
from archive.services.runtime import Archive
from archive.services.submission import Dispatcher, dispatch
from archive.services.totals import begin_write, refresh_totals

def finalize_job(archive: Archive, job_id: int) -> bool:
    """Close a job whose items are all final: recompute totals from the catalog, release its spool folder.

    The spool folder goes only when every instance in it is archived and its
    blobs are present, or quarantined (with a copy); otherwise the job fails
    and the folder stays for an administrator.
    """
    normalized = _normalize_finished_ingest(archive, job_id)
    with archive.unit_of_work() as uow:
        session = uow.session
        job = session.get(Job, job_id)
        if job is None or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING) or is_direct(job):
            return False  # a direct ingest (no items) closes itself, or is closed by reconcile when its process died
        open_count = session.scalar(
            select(func.count()).select_from(JobItem).where(
                JobItem.job_id == job_id, JobItem.status.not_in(FINAL_ITEM_STATUSES)
            )
        )
        if open_count:
            return False
        begin_write(session)  # SQLite: the totals are read and written under one lock while others commit
        counts: Counter[str] = Counter()
        for status, outcome, n in session.execute(
            select(JobItem.status, JobItem.outcome, func.count()).where(JobItem.job_id == job_id)
            .group_by(JobItem.status, JobItem.outcome)
        ):
            counts[outcome.value if outcome else status.value] += n
        counts["items"] = sum(v for k, v in counts.items() if k != "items")
        if normalized:
            counts["normalized_series"] = normalized
        handler = handler_for(job)
        refresh_totals(session, handler.studies_of(session, job))
        missing = _missing_blobs(archive, session, job_id) if handler.blobs_must_exist else []
        failed = counts.get("failed", 0)
        error = None
        if missing:
            error = f"{len(missing)} blobs missing after ingest (first {missing[0]}); spool folder kept"
        elif failed:
            error = f"{failed} instances failed; see `medarchive jobs --id {job_id}`"
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])).values(
                status=JobStatus.FAILED if missing else JobStatus.DONE, finished_at=utcnow(), counts=dict(counts),
                error=error,
            ).execution_options(synchronize_session=False)
        )
        won = getattr(result, "rowcount", 0) == 1
        spool_dir = job.spool_dir
        uow.commit()
    if won and spool_dir and not missing:
        shutil.rmtree(spool_dir, ignore_errors=True)
    return bool(won)


def _normalize_finished_ingest(archive: Archive, job_id: int) -> int:
    """An ingest job's last step, once every item is final: normalize what it archived (idempotent, so a
    finalization that runs twice, or a reconciler finishing a dead worker's job, only finds it done)."""
    from archive.services.normalization import after_ingest, job_sources

    with archive.unit_of_work() as uow:
        session = uow.session
        job = session.get(Job, job_id)
        if (job is None or job.kind is not JobKind.INGEST or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING)
                or is_direct(job) or not archive.settings.normalize):
            return 0
        if session.scalar(select(func.count()).select_from(JobItem).where(
                JobItem.job_id == job_id, JobItem.status.not_in(FINAL_ITEM_STATUSES))):
            return 0
        study_ids = sorted(handler_for(job).studies_of(session, job))
        sources, codec = job_sources(job), job.params.get("codec")
    results = after_ingest(archive, study_ids=study_ids, job_id=job_id, sources=sources, codec=codec)
    return sum(1 for r in results if r.outcome is NormalizeOutcome.NORMALIZED)


def is_direct(job: Job) -> bool:
    """A ``medarchive ingest`` run in its own process (no job items, no broker): only it can finish its job."""
    return bool(job.params.get("direct") or "jobs" in job.params)


def close_orphaned_ingests(archive: Archive) -> list[int]:
    """Mark interrupted the direct ingests whose process is gone (SIGKILL, a crash, a power cut).

    What they committed stays, with right totals (each batch carries them);
    running the same ingest again stores the rest.
    """
    closed: list[int] = []
    with archive.unit_of_work() as uow:
        running = uow.session.scalars(select(Job).where(Job.status == JobStatus.RUNNING, ~Job.id.in_(
            select(JobItem.job_id).distinct()))).all()
        for job in running:
            owner = job.params.get("owner")
            if not is_direct(job) or not owner_is_dead(owner):
                continue
            result = uow.session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.RUNNING).values(
                status=JobStatus.INTERRUPTED, finished_at=utcnow(),
                error=f"the ingest process {owner or '(unknown)'} ended without finishing; "
                      "run the same ingest again to store the rest").execution_options(synchronize_session=False))
            if getattr(result, "rowcount", 0) == 1:
                closed.append(job.id)
        uow.commit()
    return closed


def _missing_blobs(archive: Archive, session: Session, job_id: int) -> list[str]:
    references = blob_references(instance_ids=select(Instance.id).where(Instance.job_id == job_id)).subquery()
    digests = {d for d in session.scalars(select(references.c.digest)) if d is not None}
    refs = blob_refs(session, digests)
    return sorted(d for d in digests if d not in refs or not archive.store.exists(refs[d]))


@dataclass
class ReconcileReport:
    redispatched: list[int] = field(default_factory=list)
    finalized: list[int] = field(default_factory=list)
    spools_removed: list[str] = field(default_factory=list)
    interrupted: list[int] = field(default_factory=list)  # direct ingests whose process died

    def as_dict(self) -> dict[str, Any]:
        return {"redispatched": self.redispatched, "finalized": self.finalized,
                "spools_removed": self.spools_removed, "interrupted": self.interrupted}


def reconcile(archive: Archive, dispatcher: Dispatcher, *, queue_depth: int | None = None) -> ReconcileReport:
    """Re-send work the catalog says is unfinished but no live task holds; close finished jobs.

    A task is re-sent when it was never sent, when an item is claimed by a
    dead process or past its lease, or when it was sent more than
    ``requeue_after`` seconds ago and the broker queue holds fewer messages
    than there are such tasks (a broker restart without persistence, or the
    embedded broker losing a SIGKILLed worker's message). Duplicates are
    harmless: items are claimed, not assumed.
    """
    settings = archive.settings
    report = ReconcileReport()
    now = utcnow()
    owner = process_owner()
    waiting: list[tuple[datetime, int]] = []
    with archive.unit_of_work() as uow:
        session = uow.session
        rows = session.execute(
            select(JobTask, JobItem, Job)
            .join(JobItem, JobItem.task_id == JobTask.id)
            .join(Job, Job.id == JobTask.job_id)
            .where(JobItem.status.in_([ItemStatus.QUEUED, ItemStatus.RUNNING]),
                   Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        ).all()
        per_task: dict[int, tuple[JobTask, Job, list[JobItem]]] = {}
        for task, item, job in rows:
            per_task.setdefault(task.id, (task, job, []))[2].append(item)
        for task_id, (task, job, items) in per_task.items():
            if not in_window(settings, job):
                continue
            running = [i for i in items if i.status is ItemStatus.RUNNING]
            sent = aware_utc(task.dispatched_at)
            if sent is None:
                if (aware_utc(task.created_at) or now) < now - timedelta(seconds=30):  # not one being sent now
                    report.redispatched.append(task_id)
            elif any(reclaimable(i, now, owner) and i.owner != owner for i in running):
                report.redispatched.append(task_id)
            elif not running and sent < now - timedelta(seconds=settings.requeue_after):
                waiting.append((sent, task_id))
            elif not running and queue_depth == 0 and sent < now - timedelta(seconds=min(settings.requeue_after, 30)):
                waiting.append((sent, task_id))
        finished = [job.id for job in session.scalars(
            select(Job).where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]), ~Job.id.in_(
                select(JobItem.job_id).where(JobItem.status.in_([ItemStatus.QUEUED, ItemStatus.RUNNING]))
            ))
        ) if not is_direct(job)]
        leftover_spools = [(j.id, j.spool_dir) for j in session.scalars(
            select(Job).where(Job.status == JobStatus.DONE, Job.spool_dir.is_not(None))
        ) if j.spool_dir and Path(j.spool_dir).exists()]
    waiting.sort()
    lost = len(waiting) if queue_depth is None else max(len(waiting) - queue_depth, 0)
    report.redispatched.extend(task_id for _, task_id in waiting[:lost])
    dispatch(archive, report.redispatched, dispatcher)
    report.finalized = [job_id for job_id in finished if finalize_job(archive, job_id)]
    report.interrupted = close_orphaned_ingests(archive)
    for _job_id, spool in leftover_spools:
        shutil.rmtree(spool, ignore_errors=True)
        report.spools_removed.append(spool)
    return report
