"""Use cases of the batch service: create jobs, run their tasks, reconcile, finalize.

The catalog is the source of truth, the broker only a delivery mechanism. A
job's instances are :class:`JobItem` rows grouped into :class:`JobTask`
chunks (at most ``chunk_size`` instances of one study: a big series is split,
small series share a chunk); a broker message carries a task id and nothing
else. A worker *claims* an item (status, owner, lease) before touching it, so
a task delivered twice does each instance once, and the reconciler can re-send
any task whose message was lost or whose worker died.

Two ways to run a task:

* batch: stage (read, encode, verify, write blobs) every item, then commit the
  catalog rows of the whole chunk in one transaction — the fast path;
* careful: after a redelivery (a worker died in this task) every item is
  claimed, processed and committed alone, so the one instance that kills its
  worker is found: it is quarantined after ``max_attempts`` tries and the rest
  of its series completes.

Celery is not imported here: tasks hand in a ``dispatcher`` that sends a
message for a task id.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from archive.catalog.models import (
    FINAL_ITEM_STATUSES,
    EncodedFrame,
    Encoding,
    Instance,
    ItemStatus,
    Job,
    JobItem,
    JobStatus,
    JobTask,
    Series,
    Study,
)
from archive.codecs import Codec, get_codec
from archive.dicom.reader import peek_uids
from archive.errors import ArchiveError, InstanceTimeLimitExceeded, NotFoundError, TransientError
from archive.services.ingest import (
    TRANSIENT_ERRNOS,
    FileOutcome,
    Outcome,
    StagedInstance,
    commit_staged,
    commit_staged_batch,
    discover,
    quarantine_file,
    stage_file,
)
from archive.services.blobs import blob_refs
from archive.services.runtime import Archive
from archive.services.totals import refresh_study_totals

Dispatcher = Callable[[int], str]  # sends one message for a JobTask id, returns the message id
UNREADABLE = ""  # group key of files whose Study Instance UID cannot be read


# --------------------------------------------------------------------------- processes and leases


def process_owner() -> str:
    """``host:pid:start`` of this process: a claim's owner can be proven dead on the same host."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


def owner_is_dead(owner: str | None) -> bool:
    """True only when the owner ran on this host and that process is gone (or its pid was reused)."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine's worker: only its lease can expire
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return start not in ("?", _start_ticks(pid))


def _reclaimable(item: JobItem, now: datetime, owner: str) -> bool:
    if item.status is ItemStatus.QUEUED:
        return True
    if item.status is not ItemStatus.RUNNING:
        return False
    if item.owner == owner:
        return True
    lease = aware_utc(item.lease_until)
    return lease is None or lease < now or owner_is_dead(item.owner)


@contextmanager
def instance_deadline(seconds: float) -> Iterator[None]:
    """Raise InstanceTimeLimitExceeded in this thread after ``seconds`` (main thread only, else no limit).

    The task's hard time limit (Celery kills the process) still covers code
    that never returns to Python; this one lets the rest of the chunk go on.
    """
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _expired(_signum: int, _frame: Any) -> None:
        raise InstanceTimeLimitExceeded(f"took longer than the per-instance limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def is_transient(exc: BaseException) -> bool:
    """Failures of the machine (retry the task) as opposed to failures of the input (quarantine)."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    return type(exc).__name__ in ("ConnectionError", "TimeoutError", "OperationalError") and type(
        exc
    ).__module__.startswith(("redis", "kombu", "amqp"))


# --------------------------------------------------------------------------- creating jobs


@dataclass(frozen=True)
class ItemSpec:
    """One instance of a new job: a file to ingest or an archived instance to re-compress."""

    path: str | None = None
    instance_id: int | None = None
    series_uid: str | None = None


def create_job(
    session: Session,
    *,
    kind: str,
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
    try:
        for task_id in task_ids:
            sent.append((task_id, dispatcher(task_id)))
    except Exception as exc:
        if not is_transient(exc):
            raise
        # the broker is away: the reconciler sends what is left once it is back
    if sent:
        now = _now()
        with archive.unit_of_work() as uow:
            for task_id, message_id in sent:
                uow.session.execute(update(JobTask).where(JobTask.id == task_id).values(
                    celery_id=message_id, dispatched_at=now, dispatches=JobTask.dispatches + 1))
            uow.commit()
    return len(sent)


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
    job_ids: list[int] = []
    with archive.unit_of_work() as uow:
        for study_uid, members in groups.items():
            job = create_job(
                uow.session, kind="ingest", study_uid=study_uid or None,
                items=[ItemSpec(path=str(p), series_uid=series) for p, series in members],
                chunk_size=archive.settings.chunk_size,
                params={"paths": [str(p) for p in paths], "codec": get_codec(archive.settings.codec).get_config()},
            )
            job_ids.append(job.id)
        uow.commit()
    for job_id in job_ids:
        with archive.unit_of_work() as uow:
            task_ids = job_task_ids(uow.session, job_id)
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


# --------------------------------------------------------------------------- running a task


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
        return {"task": self.task_id, "job": self.job_id, "mode": self.mode, "outcomes": dict(self.outcomes),
                "busy": self.skipped_busy, "deferred": self.deferred, "finalized": self.finalized}


def run_task(archive: Archive, task_id: int, *, owner: str | None = None) -> TaskReport:
    """Do one task's instances (what a worker runs for one message). Idempotent.

    Raises :class:`TransientError` when the machine failed; the caller retries.
    """
    owner = owner or process_owner()
    settings = archive.settings
    report = TaskReport(task_id=task_id)
    now = _now()
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
        is_recompress = job.kind == "recompress"
        # careful only where a worker died holding instances; a re-sent lost message is still a batch
        died_here = [i for i in left_running if _reclaimable(i, now, owner)]
        if not (is_recompress or died_here) and deliveries <= settings.max_deliveries:
            plan = _claim_chunk(archive, session, task_id, job, owner, len(open_items))
        uow.commit()
    try:
        if deliveries > settings.max_deliveries:
            _give_up(archive, task_id, owner, f"task delivered {deliveries} times (max_deliveries "
                     f"{settings.max_deliveries}); the instance kept failing its worker", report)
        elif plan is None:
            report.mode = "careful" if not is_recompress else "per-instance"
            _run_careful(archive, task_id, owner, report)
        else:
            job_still_open = _run_batch(archive, task_id, owner, report, plan)
            if not job_still_open:
                report.finalized = finalize_job(archive, report.job_id)
            return report
    except Exception as exc:
        if is_transient(exc):
            _release_claims(archive, task_id, owner)
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
            status=ItemStatus.RUNNING, owner=owner, attempts=JobItem.attempts + 1, updated_at=_now(),
            lease_until=_now() + timedelta(seconds=_lease_seconds(archive, count)),
        ).execution_options(synchronize_session=False)
    )
    paths = {item_id: Path(path or "") for item_id, path in session.execute(
        select(JobItem.id, JobItem.path).where(JobItem.task_id == task_id, JobItem.owner == owner,
                                               JobItem.status == ItemStatus.RUNNING).order_by(JobItem.id))}
    return _BatchPlan(job_id=job.id, paths=paths, codec=get_codec(job.params.get("codec") or archive.settings.codec),
                      keep_skipped=job.spool_dir is None, busy=count - len(paths))


def _claim(session: Session, item: JobItem, owner: str, lease_seconds: float) -> bool:
    """Take an item for this process; False when another live worker holds it (or it is done)."""
    result = session.execute(
        update(JobItem)
        .where(JobItem.id == item.id, JobItem.status == item.status, JobItem.attempts == item.attempts)
        .values(status=ItemStatus.RUNNING, owner=owner, attempts=JobItem.attempts + 1,
                lease_until=_now() + timedelta(seconds=lease_seconds), updated_at=_now())
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def _lease_seconds(archive: Archive, count: int = 1) -> float:
    return archive.settings.instance_time_limit * count + 60.0


def _run_batch(archive: Archive, task_id: int, owner: str, report: TaskReport, plan: _BatchPlan) -> bool:
    """Stage every claimed instance, then commit the chunk's rows at once; True while the job has open items."""
    settings = archive.settings
    job_id, codec, keep_skipped, paths = plan.job_id, plan.codec, plan.keep_skipped, plan.paths
    report.skipped_busy = plan.busy
    if not paths:
        return True  # every open instance is held by another live worker
    staged: dict[int, StagedInstance | FileOutcome] = {}
    with archive.unit_of_work() as reads:  # one session for the chunk's duplicate look-ups
        for item_id, path in paths.items():
            fault_point(str(path))
            try:
                with instance_deadline(settings.instance_time_limit):
                    staged[item_id] = stage_file(archive, path, codec, job_id=job_id, session=reads.session)
            except InstanceTimeLimitExceeded as exc:
                staged[item_id] = quarantine_file(archive, path, str(exc), type(exc).__name__, job_id=job_id)
    results: dict[int, StagedInstance | FileOutcome] = {
        item_id: _keep_or_quarantine(archive, result, job_id, keep_skipped) for item_id, result in staged.items()
    }
    try:
        with archive.unit_of_work() as uow:
            to_commit = [(item_id, r) for item_id, r in results.items() if isinstance(r, StagedInstance)]
            committed = commit_staged_batch(uow, [r for _, r in to_commit], job_id)
            outcomes: dict[int, FileOutcome] = {i: r for i, r in results.items() if isinstance(r, FileOutcome)}
            outcomes.update({item_id: outcome for (item_id, _), (outcome, _study) in zip(to_commit, committed)})
            now = _now()
            rows = []
            for item_id, outcome in outcomes.items():
                status, label, error = _item_result(outcome)
                rows.append({"id": item_id, "status": status, "outcome": label, "error": error, "owner": None,
                             "lease_until": None, "updated_at": now})
                report.outcomes[label] += 1
            uow.session.execute(update(JobItem), rows)  # one executemany by primary key
            still_open = bool(uow.session.scalar(select(JobItem.id).where(
                JobItem.job_id == job_id, JobItem.status.not_in(FINAL_ITEM_STATUSES)).limit(1)))
            uow.commit()
        return still_open
    except Exception as exc:
        if is_transient(exc):
            raise
        # a concurrent worker won a race on a shared row, or one row is odd: redo one instance at a time
        report.outcomes.clear()
        _release_claims(archive, task_id, owner)
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
            now = _now()
            if not _reclaimable(item, now, owner):
                report.skipped_busy += 1
                continue
            if job.kind == "recompress" and job.params.get("respect_window", True):
                policy = settings.policies.get(job.policy or "")
                if policy is not None and not policy.in_window(datetime.now().time()):
                    report.deferred += 1  # resumed by the next sweep inside the window
                    continue
            if item.status is ItemStatus.RUNNING and item.owner != owner and item.attempts >= settings.max_attempts:
                reason = (f"a worker died or hit the time limit on this instance {item.attempts} times "
                          f"(max_attempts {settings.max_attempts}); set aside so its series can complete")
                status, outcome, error = _poison(archive, uow, job, item, reason)
                _finish_item(uow.session, item.id, status, outcome, error)
                uow.commit()
                report.outcomes[outcome] += 1
                continue
            if not _claim(uow.session, item, owner, _lease_seconds(archive)):
                report.skipped_busy += 1
                continue
            uow.commit()
        status, outcome, error = _process_one(archive, item_id)
        report.outcomes[outcome] += 1


def fault_point(label: str) -> None:
    """Test-only fault injection, off unless ``MEDARCHIVE_FAULT_*`` is set in a worker's environment.

    ``MEDARCHIVE_FAULT_DELAY`` (seconds) slows every instance so a test can
    kill a worker mid-study; ``MEDARCHIVE_FAULT_KILL`` (a substring of a path)
    makes the process SIGKILL itself on that instance: a poison instance that
    takes its worker down, which no real file does on demand.
    """
    delay = os.environ.get("MEDARCHIVE_FAULT_DELAY")
    if delay:
        time.sleep(float(delay))
    poison = os.environ.get("MEDARCHIVE_FAULT_KILL")
    if poison and poison in label:
        os.kill(os.getpid(), signal.SIGKILL)


def _process_one(archive: Archive, item_id: int) -> tuple[ItemStatus, str, str | None]:
    """One claimed item, committed with its result in one transaction."""
    settings = archive.settings
    with archive.unit_of_work() as uow:
        item = uow.session.get_one(JobItem, item_id)
        job = uow.session.get_one(Job, item.job_id)
        job_id, kind, path, instance_id = job.id, job.kind, Path(item.path or ""), item.source_instance_id
        keep_skipped = job.spool_dir is None
        codec_config = job.params.get("codec") or settings.codec
        policy_name = job.policy
    fault_point(str(path) if kind == "ingest" else f"instance:{instance_id}")
    if kind == "recompress":
        from archive.services.recompress import recompress_instance  # noqa: PLC0415 - optional use case

        assert instance_id is not None
        policy = settings.policy(policy_name or "")
        try:
            with instance_deadline(settings.instance_time_limit):
                done = recompress_instance(archive, instance_id, policy)
            status, outcome, error = ItemStatus.DONE, done.outcome, done.reason or None
        except ArchiveError as exc:  # not verified: the previous encoding stays current
            status, outcome, error = ItemStatus.FAILED, "failed", f"{type(exc).__name__}: {exc}"
        with archive.unit_of_work() as uow:
            _finish_item(uow.session, item_id, status, outcome, error)
            uow.commit()
        return status, outcome, error
    try:
        with instance_deadline(settings.instance_time_limit):
            staged = stage_file(archive, path, get_codec(codec_config), job_id=job_id)
    except InstanceTimeLimitExceeded as exc:
        staged = quarantine_file(archive, path, str(exc), type(exc).__name__, job_id=job_id)
    staged = _keep_or_quarantine(archive, staged, job_id, keep_skipped)
    try:
        with archive.unit_of_work() as uow:
            recorded = commit_staged(uow, staged, job_id)[0] if isinstance(staged, StagedInstance) else staged
            status, label, error = _item_result(recorded)
            _finish_item(uow.session, item_id, status, label, error)
            uow.commit()
    except Exception as exc:
        if is_transient(exc):
            raise
        reason = f"unexpected {type(exc).__name__} while recording: {exc}"
        result = quarantine_file(archive, path, reason, type(exc).__name__, job_id=job_id)
        status, label, error = ItemStatus.QUARANTINED, result.outcome.value, reason
        with archive.unit_of_work() as uow:
            _finish_item(uow.session, item_id, status, label, error)
            uow.commit()
    return status, label, error


def _keep_or_quarantine(
    archive: Archive, result: StagedInstance | FileOutcome, job_id: int, keep_skipped: bool
) -> StagedInstance | FileOutcome:
    """A skipped file of a spool job is quarantined: the spool folder is deleted when the job ends.

    Done before the catalog transaction: quarantining writes in a transaction of its own.
    """
    if isinstance(result, FileOutcome) and result.outcome is Outcome.SKIPPED and not keep_skipped:
        return quarantine_file(archive, result.path, f"not archived: {result.reason}", "NotArchived", job_id=job_id)
    return result


def _item_result(outcome: FileOutcome) -> tuple[ItemStatus, str, str | None]:
    if outcome.outcome is Outcome.QUARANTINED:
        return ItemStatus.QUARANTINED, outcome.outcome.value, outcome.reason
    return ItemStatus.DONE, outcome.outcome.value, outcome.reason or None


def _poison(archive: Archive, uow: Any, job: Job, item: JobItem, reason: str) -> tuple[ItemStatus, str, str | None]:
    if job.kind == "recompress" or not item.path or not Path(item.path).exists():
        return ItemStatus.FAILED, "failed", reason
    outcome = quarantine_file(archive, Path(item.path), reason, "WorkerLost", job_id=job.id)
    return ItemStatus.QUARANTINED, outcome.outcome.value, reason


def _give_up(archive: Archive, task_id: int, owner: str, reason: str, report: TaskReport) -> None:
    with archive.unit_of_work() as uow:
        task = uow.session.get_one(JobTask, task_id)
        for item in task.items:
            if item.status in FINAL_ITEM_STATUSES or not _reclaimable(item, _now(), owner):
                continue
            status, outcome, error = _poison(archive, uow, task.job, item, reason)
            _finish_item(uow.session, item.id, status, outcome, error)
            report.outcomes[outcome] += 1
        uow.commit()


def _finish_item(session: Session, item_id: int, status: ItemStatus, outcome: str, error: str | None) -> None:
    session.execute(
        update(JobItem).where(JobItem.id == item_id).values(
            status=status, outcome=outcome, error=error, owner=None, lease_until=None, updated_at=_now()
        ).execution_options(synchronize_session=False)
    )


def _release_claims(archive: Archive, task_id: int, owner: str) -> None:
    """Best effort: hand this process's claims back so a retry starts in batch mode again."""
    try:
        with archive.unit_of_work() as uow:
            uow.session.execute(
                update(JobItem)
                .where(JobItem.task_id == task_id, JobItem.owner == owner, JobItem.status == ItemStatus.RUNNING)
                .values(status=ItemStatus.QUEUED, owner=None, lease_until=None, attempts=JobItem.attempts - 1)
                .execution_options(synchronize_session=False)
            )
            uow.commit()
    except Exception:  # the database may be the thing that is down; leases expire on their own
        pass


# --------------------------------------------------------------------------- finishing jobs


def finalize_job(archive: Archive, job_id: int) -> bool:
    """Close a job whose items are all final: recompute totals from the catalog, release its spool folder.

    The spool folder goes only when every instance in it is archived and its
    blobs are present, or quarantined (with a copy); otherwise the job fails
    and the folder stays for an administrator.
    """
    with archive.unit_of_work() as uow:
        session = uow.session
        job = session.get(Job, job_id)
        if job is None or job.status in (JobStatus.DONE, JobStatus.FAILED, JobStatus.SPOOLING):
            return False
        open_count = session.scalar(
            select(func.count()).select_from(JobItem).where(
                JobItem.job_id == job_id, JobItem.status.not_in(FINAL_ITEM_STATUSES)
            )
        )
        if open_count:
            return False
        counts: Counter[str] = Counter()
        for status, outcome, n in session.execute(
            select(JobItem.status, JobItem.outcome, func.count()).where(JobItem.job_id == job_id)
            .group_by(JobItem.status, JobItem.outcome)
        ):
            counts[outcome or status.value] += n
        counts["items"] = sum(v for k, v in counts.items() if k != "items")
        for study_id in _studies_of(session, job):
            refresh_study_totals(session, study_id)
        missing = _missing_blobs(archive, session, job_id) if job.kind == "ingest" else []
        failed = counts.get("failed", 0)
        error = None
        if missing:
            error = f"{len(missing)} blobs missing after ingest (first {missing[0]}); spool folder kept"
        elif failed:
            error = f"{failed} instances failed; see `medarchive jobs --id {job_id}`"
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])).values(
                status=JobStatus.FAILED if missing else JobStatus.DONE, finished_at=_now(), counts=dict(counts),
                error=error,
            ).execution_options(synchronize_session=False)
        )
        won = getattr(result, "rowcount", 0) == 1
        spool_dir = job.spool_dir
        uow.commit()
    if won and spool_dir and not missing:
        shutil.rmtree(spool_dir, ignore_errors=True)
    return bool(won)


def _studies_of(session: Session, job: Job) -> set[int]:
    if job.kind == "recompress":
        query = (select(Series.study_id).join(Instance, Instance.series_id == Series.id)
                 .join(JobItem, JobItem.source_instance_id == Instance.id).where(JobItem.job_id == job.id))
    else:
        query = select(Series.study_id).join(Instance, Instance.series_id == Series.id).where(Instance.job_id == job.id)
    ids = set(session.scalars(query.distinct()))
    if job.study_uid:
        ids.update(session.scalars(select(Study.id).where(Study.study_uid == job.study_uid)))
    return ids


def _missing_blobs(archive: Archive, session: Session, job_id: int) -> list[str]:
    digests = set(session.scalars(select(Instance.header_blob).where(Instance.job_id == job_id)))
    digests.update(session.scalars(
        select(EncodedFrame.blob_sha256).join(Encoding, EncodedFrame.encoding_id == Encoding.id)
        .join(Instance, Encoding.instance_id == Instance.id).where(Instance.job_id == job_id, Encoding.is_current)
    ))
    refs = blob_refs(session, digests)
    return sorted(d for d in digests if d not in refs or not archive.store.exists(refs[d]))


# --------------------------------------------------------------------------- the reconciler


@dataclass
class ReconcileReport:
    redispatched: list[int] = field(default_factory=list)
    finalized: list[int] = field(default_factory=list)
    spools_removed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"redispatched": self.redispatched, "finalized": self.finalized,
                "spools_removed": self.spools_removed}


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
    now = _now()
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
            if job.kind == "recompress" and job.params.get("respect_window", True):
                policy = settings.policies.get(job.policy or "")
                if policy is not None and not policy.in_window(datetime.now().time()):
                    continue
            running = [i for i in items if i.status is ItemStatus.RUNNING]
            sent = aware_utc(task.dispatched_at)
            if sent is None:
                if (aware_utc(task.created_at) or now) < now - timedelta(seconds=30):  # not one being sent now
                    report.redispatched.append(task_id)
            elif any(_reclaimable(i, now, owner) and i.owner != owner for i in running):
                report.redispatched.append(task_id)
            elif not running and sent < now - timedelta(seconds=settings.requeue_after):
                waiting.append((sent, task_id))
            elif not running and queue_depth == 0 and sent < now - timedelta(seconds=min(settings.requeue_after, 30)):
                waiting.append((sent, task_id))
        finished = list(session.scalars(
            select(Job.id).where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]), ~Job.id.in_(
                select(JobItem.job_id).where(JobItem.status.in_([ItemStatus.QUEUED, ItemStatus.RUNNING]))
            ))
        ))
        leftover_spools = [(j.id, j.spool_dir) for j in session.scalars(
            select(Job).where(Job.status == JobStatus.DONE, Job.spool_dir.is_not(None))
        ) if j.spool_dir and Path(j.spool_dir).exists()]
    waiting.sort()
    lost = len(waiting) if queue_depth is None else max(len(waiting) - queue_depth, 0)
    report.redispatched.extend(task_id for _, task_id in waiting[:lost])
    dispatch(archive, report.redispatched, dispatcher)
    report.finalized = [job_id for job_id in finished if finalize_job(archive, job_id)]
    for _job_id, spool in leftover_spools:
        shutil.rmtree(spool, ignore_errors=True)
        report.spools_removed.append(spool)
    return report


def aware_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _now() -> datetime:
    return datetime.now(timezone.utc)
