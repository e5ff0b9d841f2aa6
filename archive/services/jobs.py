"""The batch service's use cases, in one place for the CLI and the Celery tasks.

The catalog is the source of truth, the broker only a delivery mechanism.
Each concern has its module; this one only gathers their public names:

* :mod:`archive.services.submission` — creating jobs and sending their tasks;
* :mod:`archive.services.leases` — process identity, claims and leases;
* :mod:`archive.services.deadlines` — the per-instance time limit (and the test-only fault switch);
* :mod:`archive.services.failures` — retry (machine) versus quarantine (input);
* :mod:`archive.services.executors` — running a task: the batch and careful paths;
* :mod:`archive.services.job_kinds` — one handler per job kind;
* :mod:`archive.services.reconcile` — finishing jobs and re-sending lost work.
"""

from __future__ import annotations

from archive.services.deadlines import fault_point, instance_deadline
from archive.services.executors import TaskReport, run_task
from archive.services.failures import is_transient
from archive.services.job_kinds import HANDLERS, JobHandler, handler_for
from archive.services.leases import owner_is_dead, process_owner
from archive.services.reconcile import ReconcileReport, finalize_job, reconcile
from archive.services.submission import (
    UNREADABLE,
    Dispatcher,
    ItemSpec,
    create_job,
    dispatch,
    group_by_study,
    job_task_ids,
    submit_paths,
)

__all__ = [
    "HANDLERS", "UNREADABLE", "Dispatcher", "ItemSpec", "JobHandler", "ReconcileReport", "TaskReport", "create_job",
    "dispatch", "fault_point", "finalize_job", "group_by_study", "handler_for", "instance_deadline", "is_transient",
    "job_task_ids", "owner_is_dead", "process_owner", "reconcile", "run_task", "submit_paths",
]
