"""The Celery application: configuration only; the tasks are in :mod:`workers.tasks`.

Settings come from :class:`archive.config.Settings` (``MEDARCHIVE_*`` and the
TOML file), so the worker, beat, the watcher and the CLI agree on the broker.
Run ``celery -A workers.app worker`` or ``medarchive worker``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery

from archive.config import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Reconciler, re-compression policies, the normalization sweep, verification and garbage collection."""
    schedule: dict[str, dict[str, Any]] = {
        "reconcile": {"task": "medarchive.reconcile", "schedule": timedelta(seconds=settings.reconcile_interval)},
    }
    for name, policy in settings.policies.items():
        schedule[f"recompress:{name}"] = {"task": "medarchive.recompress_sweep", "args": [name],
                                          "schedule": timedelta(seconds=policy.interval)}
    if settings.normalize and settings.normalize_interval > 0:
        schedule["normalize"] = {"task": "medarchive.normalize_sweep",
                                 "schedule": timedelta(seconds=settings.normalize_interval)}
    if settings.verify_interval > 0:
        schedule["verify"] = {"task": "medarchive.verify", "schedule": timedelta(seconds=settings.verify_interval)}
    if settings.gc_interval > 0:
        schedule["gc"] = {"task": "medarchive.gc", "schedule": timedelta(seconds=settings.gc_interval)}
    return schedule


def transport_options(settings: Settings) -> dict[str, Any]:
    """Redis redelivers an unacknowledged task after the visibility timeout; SQLite must wait for its lock."""
    url = settings.effective_broker_url
    if url.startswith(("redis://", "rediss://")):
        return {"visibility_timeout": settings.visibility_timeout}
    if url.startswith("sqla+sqlite"):
        # kombu hands these to SQLAlchemy's create_engine; the embedded broker loses a SIGKILLed
        # worker's unacknowledged message, which the catalog's reconciler re-sends
        return {"connect_args": {"timeout": 30}}
    return {}


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.load()
    broker = settings.effective_broker_url
    if broker.startswith("sqla+sqlite"):
        from workers.transport import SCHEME, register

        register()
        broker = SCHEME + broker.removeprefix("sqla")
    app = Celery("medarchive", broker=broker, backend=settings.effective_result_backend, include=["workers.tasks"])
    app.conf.update(
        # JSON only: a message is a task id, never a pickled object
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # a task is acknowledged when done, re-delivered when its worker dies, one message per process at a time
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_default_queue=settings.queue,
        medarchive_learned_queue=settings.learned_queue,  # read by workers.tasks.queue_of
        # no task events by default (a Redis write per task); Flower switches them on while it runs
        worker_send_task_events=False,
        result_expires=timedelta(days=1),
        timezone="UTC",
        beat_schedule=beat_schedule(settings),
        beat_schedule_filename=str(settings.home / "beat-schedule"),
    )
    return app


app = create_app()
