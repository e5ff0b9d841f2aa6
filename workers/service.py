"""The batch service as the ``medarchive`` command sees it: the one module of ``workers`` that ``archive.cli`` imports.

The dependency runs one way: ``workers`` builds on the ``archive`` library and
no module here imports ``archive.cli`` (the supervisor starts the command as a
child process). The library never imports ``workers`` at module level; the
command imports this module inside the commands that need a broker (``watch``,
``worker``, ``beat``, ``run``, ``reconcile``, ``ingest --wait``,
``recompress --queue``), so the others never load Celery.
"""

from __future__ import annotations

from workers.app import app as celery_app
from workers.supervisor import run_all
from workers.tasks import broker_unavailable, dispatch_task, queue_depth, queue_of, require_broker

__all__ = ["broker_unavailable", "celery_app", "dispatch_task", "queue_depth", "queue_of", "require_broker", "run_all"]
