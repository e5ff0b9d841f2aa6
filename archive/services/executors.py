"""Running one task: what a worker does for one broker message.

Two ways to run a task:

* batch: stage (read, encode, verify, write blobs) every item, make the
  chunk's blobs durable with one sync, then commit the catalog rows of the
  whole chunk, its items' results and its studies' totals in one transaction
  (run again when another writer won a race for a row) — the fast path;
* careful: after a redelivery (a worker died in this task) every item is
  claimed, processed and committed alone, so the one instance that kills its
  worker is found: it is quarantined after ``max_attempts`` tries and the rest
  of its series completes.

What an item *is* (a file to ingest, an instance to re-compress) is the job
kind's handler's business (:mod:`archive.services.job_kinds`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from archive.catalog.models import (
    FINAL_ITEM_STATUSES,
    ItemStatus,
    Job,
    JobItem,
    JobStatus,
    JobTask,
)
from archive.clock import utcnow
from archive.codecs import Codec
from archive.errors import NotFoundError, TransientError
from archive.services.deadlines import fault_point, instance_deadline
from archive.services.encoding import archive_codec
from archive.services.failures import is_transient
from archive.services.header_dictionaries import SampleCollector
from archive.services.job_kinds import handler_for, in_window, item_result
from archive.services.leases import (
    claim_item,
    finish_item,
    lease_seconds,
    process_owner,
    reclaimable,
    release_claims,
)
from archive.services.outcomes import FileOutcome, Outcome
from archive.services.quarantine import quarantine_unless_kept
from archive.services.reconcile import finalize_job
from archive.services.recording import commit_staged_batch
from archive.services.runtime import Archive
from archive.services.staging import StagedInstance, stage_files
from archive.services.totals import write_counted
from archive.services.unit_of_work import UnitOfWork


@dataclass
class TaskReport:
    task_id: int
    job_id: int = 0
    mode: str = "batch"
    outcomes: Counter[str] = field(default_factory=Counter)
    skipped_busy: int = 0  # items another live worker holds
    deferred: int = 0  # re-compression outside its window
    finalized: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task_id, "job": self.job_id, "mode": self.mode, "outcomes": {getattr(k, "value", k): n for k, n in self.outcomes.items()},
                "busy": self.skipped_busy, "deferred": self.deferred, "finalized": self.finalized}


def run_task(archive: Archive, task_id: int, *, owner: str | None = None) -> TaskReport:
    """Do one task's instances (what a worker runs for one message). Idempotent.

    Raises :class:`TransientError` when the machine failed; the caller retries.
    """
    owner = owner or process_owner()
    settings = archive.settings
    report = TaskReport(task_id=task_id)
    now = utcnow()
    plan: _BatchPlan | None = None
    with archive.unit_of_work() as uow:
        session = uow.session
        task = session.get(JobTask, task_id)
        if task is None:
            raise NotFoundError(f"no job task {task_id}")
        job = task.job
        report.job_id = job.id
        open_items = [i for i in task.items if i.status not in FINAL_ITEM_STATUSES]
        if not open_items:
            uow.rollback()
            report.finalized = finalize_job(archive, job.id)
            return report
        left_running = [i for i in open_items if i.status is ItemStatus.RUNNING]
        task.deliveries += 1
        deliveries = task.deliveries
        if job.status in (JobStatus.QUEUED, JobStatus.SPOOLING):
            job.status, job.started_at = JobStatus.RUNNING, job.started_at or now
        handler = handler_for(job)
        # careful only where a worker died holding instances; a re-sent lost message is still a batch
        died_here = [i for i in left_running if reclaimable(i, now, owner)]
        if handler.batch and not died_here and deliveries <= settings.max_deliveries:
            plan = _claim_chunk(archive, session, task_id, job, owner, len(open_items))
        uow.commit()
    try:
        if deliveries > settings.max_deliveries:
            _give_up(archive, task_id, owner, f"task delivered {deliveries} times (max_deliveries "
                     f"{settings.max_deliveries}); the instance kept failing its worker", report)
        elif plan is None:
            report.mode = "careful" if handler.batch else "per-instance"
            _run_careful(archive, task_id, owner, report)
        else:
            job_still_open = _run_batch(archive, task_id, owner, report, plan)
            if not job_still_open:
                report.finalized = finalize_job(archive, report.job_id)
            return report
    except Exception as exc:
        if is_transient(exc):
            release_claims(archive, task_id, owner)
            raise TransientError(f"task {task_id}: {type(exc).__name__}: {exc}") from exc
        raise
    report.finalized = finalize_job(archive, report.job_id)
    return report


@dataclass
class _BatchPlan:
    job_id: int
    paths: dict[int, Path]  # claimed item id -> file
    codec: Codec
    keep_skipped: bool
    busy: int = 0  # open instances another live worker holds


def _claim_chunk(archive: Archive, session: Session, task_id: int, job: Job, owner: str, count: int) -> _BatchPlan:
    """Claim every queued item of the task in one statement (inside the caller's transaction)."""
    session.execute(
        update(JobItem).where(JobItem.task_id == task_id, JobItem.status == ItemStatus.QUEUED).values(
            status=ItemStatus.RUNNING, owner=owner, attempts=JobItem.attempts + 1, updated_at=utcnow(),
            lease_until=utcnow() + timedelta(seconds=lease_seconds(archive, count)),
        ).execution_options(synchronize_session=False)
    )
    paths = {item_id: Path(path or "") for item_id, path in session.execute(
        select(JobItem.id, JobItem.path).where(JobItem.task_id == task_id, JobItem.owner == owner,
                                               JobItem.status == ItemStatus.RUNNING).order_by(JobItem.id))}
    return _BatchPlan(job_id=job.id, paths=paths, codec=archive_codec(job.params.get("codec") or archive.settings.codec),
                      keep_skipped=job.spool_dir is None, busy=count - len(paths))


def _run_batch(archive: Archive, task_id: int, owner: str, report: TaskReport, plan: _BatchPlan) -> bool:
    """Stage every claimed file, then commit the chunk's rows at once; True while the job has open items.

    The batch path is the ingest handler's (``JobHandler.batch``): its items are files.
    """
    settings = archive.settings
    job_id, codec, keep_skipped, paths = plan.job_id, plan.codec, plan.keep_skipped, plan.paths
    report.skipped_busy = plan.busy
    if not paths:
        return True  # every open instance is held by another live worker
    faulted: set[Path] = set()

    @contextmanager
    def guard(path: Path) -> Iterator[None]:
        if path not in faulted:  # the test-only fault switch, once per instance
            faulted.add(path)
            fault_point(str(path))
        with instance_deadline(settings.instance_time_limit):
            yield

    with archive.unit_of_work() as reads:  # one session, one duplicate look-up for the chunk
        chunk = stage_files(archive, list(paths.values()), codec, job_id=job_id, session=reads.session,
                            sync=False, guard=guard)
    staged: dict[int, StagedInstance | FileOutcome] = dict(zip(paths, chunk))
    results: dict[int, StagedInstance | FileOutcome] = {
        item_id: quarantine_unless_kept(archive, r, job_id=job_id, keep_skipped=keep_skipped)
        if isinstance(r, FileOutcome) else r for item_id, r in staged.items()
    }
    # one fsync for the chunk's blobs, before the rows that reference them are committed
    archive.store.make_durable([ref for r in results.values() if isinstance(r, StagedInstance) for ref in r.blobs])
    to_commit = [(item_id, r) for item_id, r in results.items() if isinstance(r, StagedInstance)]

    def record(uow: UnitOfWork) -> tuple[tuple[list[tuple[FileOutcome, int | None]], list[str]], set[int]]:
        """The chunk's rows, its items' results and its studies' totals: one transaction, run again on a lost race."""
        committed = commit_staged_batch(uow, [r for _, r in to_commit], job_id)
        outcomes: dict[int, FileOutcome] = {i: r for i, r in results.items() if isinstance(r, FileOutcome)}
        outcomes.update({item_id: outcome for (item_id, _), (outcome, _study) in zip(to_commit, committed)})
        now = utcnow()
        rows: list[dict[str, Any]] = []
        labels: list[str] = []
        for item_id, outcome in outcomes.items():
            status, label, error = item_result(outcome)
            rows.append({"id": item_id, "status": status, "outcome": label, "error": error, "owner": None,
                         "lease_until": None, "updated_at": now})
            labels.append(label)
        uow.session.execute(update(JobItem), rows)  # one executemany by primary key
        return (committed, labels), {study for _, study in committed if study is not None}

    try:
        committed, labels = write_counted(archive, record)
        # asked after the commit, never inside it: of two tasks finishing together, the later one then
        # sees both chunks final (inside their transactions each would see the other's still open)
        with archive.unit_of_work() as uow:
            still_open = bool(uow.session.scalar(select(JobItem.id).where(
                JobItem.job_id == job_id, JobItem.status.not_in(FINAL_ITEM_STATUSES)).limit(1)))
        report.outcomes.update(labels)
        samples = SampleCollector()  # a chunk of one kind of headers may teach a dictionary for the next ones
        samples.add(r for (_, r), (o, _s) in zip(to_commit, committed) if o.outcome is not Outcome.DUPLICATE)
        try:
            samples.train_ready(archive)
        except IntegrityError:  # another worker trained the same dictionary first: use theirs
            archive.headers.forget()
        return still_open
    except Exception as exc:
        if is_transient(exc):
            raise
        # a concurrent worker won a race on a shared row, or one row is odd: redo one instance at a time
        report.outcomes.clear()
        release_claims(archive, task_id, owner)
        report.mode = "careful"
        _run_careful(archive, task_id, owner, report)
        return True


def _run_careful(archive: Archive, task_id: int, owner: str, report: TaskReport) -> None:
    settings = archive.settings
    with archive.unit_of_work() as uow:
        item_ids = [i.id for i in uow.session.get_one(JobTask, task_id).items]
    for item_id in item_ids:
        with archive.unit_of_work() as uow:
            item = uow.session.get_one(JobItem, item_id)
            job = uow.session.get_one(Job, item.job_id)
            if item.status in FINAL_ITEM_STATUSES:
                continue
            now = utcnow()
            if not reclaimable(item, now, owner):
                report.skipped_busy += 1
                continue
            if not in_window(settings, job):
                report.deferred += 1  # resumed by the next sweep inside the window
                continue
            if item.status is ItemStatus.RUNNING and item.owner != owner and item.attempts >= settings.max_attempts:
                reason = (f"a worker died or hit the time limit on this instance {item.attempts} times "
                          f"(max_attempts {settings.max_attempts}); set aside so its series can complete")
                status, outcome, error = handler_for(job).set_aside(archive, job, item, reason)
                finish_item(uow.session, item.id, status, outcome, error)
                uow.commit()
                report.outcomes[outcome] += 1
                continue
            if not claim_item(uow.session, item, owner, lease_seconds(archive)):
                report.skipped_busy += 1
                continue
            uow.commit()
        status, outcome, error = handler_for(job).process_one(archive, item_id)
        report.outcomes[outcome] += 1


def _give_up(archive: Archive, task_id: int, owner: str, reason: str, report: TaskReport) -> None:
    with archive.unit_of_work() as uow:
        task = uow.session.get_one(JobTask, task_id)
        for item in task.items:
            if item.status in FINAL_ITEM_STATUSES or not reclaimable(item, utcnow(), owner):
                continue
            status, outcome, error = handler_for(task.job).set_aside(archive, task.job, item, reason)
            finish_item(uow.session, item.id, status, outcome, error)
            report.outcomes[outcome] += 1
        uow.commit()
