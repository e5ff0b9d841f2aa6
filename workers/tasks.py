"""Thin Celery tasks: each calls the service function the CLI calls.

The catalog decides what is done; a message only names a job task. Transient
failures (database, broker, full disk) are retried with exponential backoff
and jitter; bad input never raises here, it is quarantined by the service.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.signals import worker_process_init, worker_ready

from sqlalchemy import select

from archive.catalog.models import JobItem
from archive.config import Settings
from archive.errors import TransientError, UnavailableError
from archive.kinds import ItemOutcome, Lane
from archive.services import integrity, jobs, sweeps
from archive.services.runtime import Archive
from workers.app import app

log = logging.getLogger(__name__)
# pydicom logs a failed decoder plugin as an ERROR with a traceback before it raises; an undecodable input is
# an expected outcome here (quarantined, with the reason in the catalog and one WARNING line below)
logging.getLogger("pydicom").setLevel(logging.CRITICAL)
_archive: Archive | None = None


def get_archive() -> Archive:
    """One Archive (engine, store) per worker process, opened after the fork."""
    global _archive
    if _archive is None:
        _archive = Archive.open(Settings.load())
    return _archive


@worker_process_init.connect
def _fresh_archive_after_fork(**_: Any) -> None:
    global _archive
    _archive = None  # never share a parent's database connections with a child


@worker_ready.connect
def _reconcile_on_start(**_: Any) -> None:
    reconcile.apply_async(countdown=1)


def dispatch_task(task_id: int, lane: Lane = Lane.DEFAULT) -> str:
    """The services' dispatcher: one broker message per job task, on its lane's queue."""
    return str(process_task.apply_async(args=(task_id,), queue=queue_of(lane)).id)


def queue_of(lane: Lane) -> str:
    """The Celery queue of a lane (settings ``queue`` and ``learned_queue``)."""
    return str(app.conf.task_default_queue) if lane is Lane.DEFAULT else str(app.conf.medarchive_learned_queue)


def _broker_for_display(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def broker_unavailable(exc: BaseException) -> UnavailableError:
    """The error for a broker that cannot be reached: names the URL (password hidden) and the remedy."""
    url = _broker_for_display(Settings.load().effective_broker_url)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UnavailableError(f"cannot reach the broker at {url} ({reason}): is Redis running? "
                            "check MEDARCHIVE_BROKER_URL (broker_url)")


def require_broker(timeout: int = 5) -> None:
    """Raise :class:`UnavailableError` unless the broker answers within about ``timeout`` seconds.

    For commands that wait on the workers (``ingest --wait``): without a broker
    nothing would ever arrive, so they stop with exit 3 before queueing.
    """
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=1, timeout=timeout)
    except Exception as exc:  # kombu, redis and socket errors alike
        raise broker_unavailable(exc) from exc


def queue_depth() -> int | None:
    """Messages waiting in the work queues (both lanes), or None when the broker cannot say."""
    try:
        with app.connection_for_write() as connection:
            channel: Any = connection.default_channel
            total = 0
            for lane in Lane:
                try:
                    total += int(channel.queue_declare(queue=queue_of(lane), passive=True).message_count)
                except Exception:
                    if lane is Lane.DEFAULT:
                        raise
                    # the learned queue exists only once something was sent to it (or a worker took it)
            return total
    except Exception:  # a broker that cannot be asked is treated as "unknown", never as "empty"
        return None


@app.task(
    bind=True,
    name="medarchive.process_task",
    autoretry_for=(TransientError,),
    retry_backoff=2,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=10,
)
def process_task(self: Task[Any, Any], task_id: int) -> dict[str, Any]:
    """Archive (or re-compress) one chunk of one series."""
    archive = get_archive()
    report = jobs.run_task(archive, task_id).as_dict()
    if report["outcomes"].get(ItemOutcome.QUARANTINED.value):
        _log_quarantined(archive, task_id)
    return report


def _log_quarantined(archive: Archive, task_id: int) -> None:
    """An expected quarantine is one WARNING line per file (the catalog keeps the reason), not an ERROR."""
    with archive.session_factory() as session:
        rows = session.execute(select(JobItem.path, JobItem.source_instance_id, JobItem.error).where(
            JobItem.task_id == task_id, JobItem.outcome == ItemOutcome.QUARANTINED).order_by(JobItem.id))
        for path, instance_id, error in rows:
            log.warning("quarantined %s: %s", path or f"instance {instance_id}", " ".join((error or "").split()))


@app.task(name="medarchive.reconcile", autoretry_for=(TransientError,), retry_backoff=2, retry_jitter=True,
          max_retries=3)
def reconcile() -> dict[str, Any]:
    report = jobs.reconcile(get_archive(), dispatch_task, queue_depth=queue_depth())
    if report.redispatched or report.finalized:
        log.info("reconciler: %s", report.as_dict())
    return report.as_dict()


@app.task(name="medarchive.recompress_sweep")
def recompress_sweep(policy: str) -> dict[str, Any]:
    return sweeps.start_sweep(get_archive(), policy, dispatch_task).as_dict()


@app.task(name="medarchive.normalize_sweep", acks_late=False)
def normalize_sweep() -> dict[str, Any]:
    return sweeps.start_normalize_sweep(get_archive(), dispatch_task).as_dict()


@app.task(name="medarchive.verify", acks_late=False)
def verify(study_uid: str | None = None) -> dict[str, Any]:
    report = integrity.verify_blobs(get_archive(), study_uid=study_uid)
    if report.problems:
        log.error("verify: %d problem blobs: %s", len(report.problems), report.problems[:20])
    return report.as_dict()


@app.task(name="medarchive.gc", acks_late=False)
def gc() -> dict[str, Any]:
    archive = get_archive()
    return integrity.collect_garbage(archive, grace_seconds=archive.settings.gc_grace).as_dict()
