"""Use case: a re-compression sweep — pick the next batch a policy selects and queue it as a job.

Throttled (at most ``batch_size`` instances per sweep, one open job per
policy), resumable (an unfinished job is resumed, not replaced: its items are
in the catalog), and confined to the policy's time window (workers leave items
queued outside it and the next sweep inside the window sends them again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from archive.catalog.models import Instance, ItemStatus, Job, JobItem, JobStatus, Series
from archive.codecs import get_codec
from archive.services.jobs import Dispatcher, ItemSpec, create_job, dispatch
from archive.services.runtime import Archive
from archive.kinds import JobKind


@dataclass
class SweepReport:
    policy: str
    job_id: int | None = None
    action: str = "nothing to do"  # started | resumed | outside window | nothing to do
    instances: int = 0  # queued by this sweep (started) or still waiting (resumed)
    dispatched: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "job": self.job_id, "action": self.action, "instances": self.instances,
                "dispatched": self.dispatched}


def start_sweep(
    archive: Archive,
    policy_name: str,
    dispatcher: Dispatcher,
    *,
    limit: int | None = None,
    respect_window: bool = True,
    now: datetime | None = None,
) -> SweepReport:
    """Resume this policy's open job, or queue the next ``batch_size`` candidates as a new one."""
    from archive.services.recompress import select_candidates

    settings = archive.settings
    policy = settings.policy(policy_name)
    get_codec(policy.codec)  # a bad target config fails here, not in every worker
    report = SweepReport(policy=policy_name)
    if respect_window and not policy.in_window(now.time() if now is not None else None):
        report.action = "outside window"
        return report
    with archive.unit_of_work() as uow:
        session = uow.session
        open_job = session.scalar(
            select(Job).where(Job.kind == JobKind.RECOMPRESS, Job.policy == policy_name,
                              Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])).order_by(Job.id).limit(1)
        )
        if open_job is not None:
            task_ids = sorted(set(session.scalars(
                select(JobItem.task_id).where(JobItem.job_id == open_job.id, JobItem.status == ItemStatus.QUEUED)
            )))
            report.job_id, report.action = open_job.id, "resumed"
            report.instances = len(set(session.scalars(
                select(JobItem.id).where(JobItem.job_id == open_job.id, JobItem.status == ItemStatus.QUEUED)
            )))
        else:
            candidates = select_candidates(session, policy, limit=limit or policy.batch_size)
            if not candidates:
                return report
            series_of: dict[int, str] = {
                instance_id: series_uid for instance_id, series_uid in session.execute(
                    select(Instance.id, Series.series_uid).join(Series, Instance.series_id == Series.id)
                    .where(Instance.id.in_(candidates))
                )
            }
            job = create_job(
                session, kind=JobKind.RECOMPRESS, policy=policy_name, chunk_size=settings.chunk_size,
                items=[ItemSpec(instance_id=i, series_uid=series_of.get(i)) for i in candidates],
                params={"codec": get_codec(policy.codec).get_config(), "max_error": policy.max_error,
                        "respect_window": respect_window},
            )
            uow.commit()
            report.job_id, report.action, report.instances = job.id, "started", len(candidates)
            task_ids = sorted({t.id for t in job.tasks})
    report.dispatched = dispatch(archive, task_ids, dispatcher)
    return report
