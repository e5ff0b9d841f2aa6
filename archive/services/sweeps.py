"""Use cases: scheduled sweeps — pick the next batch a policy selects and queue it as a job.

Re-compression: one policy's candidates. Normalization: archived series that
lack their profile's current normalized series.

Throttled (at most ``batch_size`` instances per sweep, one open job per
policy), resumable (an unfinished job is resumed, not replaced: its items are
in the catalog), and confined to the policy's time window (workers leave items
queued outside it and the next sweep inside the window sends them again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from archive.catalog.models import Derivation, Instance, InstanceStatus, ItemStatus, Job, JobItem, JobStatus, Series
from archive.codecs import get_codec
from archive.kinds import JobKind, StorageMode
from archive.services.jobs import Dispatcher, ItemSpec, create_job, dispatch
from archive.services.runtime import Archive


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
    from archive.services.lossy import policy_codec
    from archive.services.recompress import select_candidates

    settings = archive.settings
    policy = settings.policy(policy_name)
    policy_codec(policy)  # a bad target config (or a bound its codec cannot keep) fails here, not in every worker
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
                        "min_psnr": policy.min_psnr, "respect_window": respect_window},
            )
            uow.commit()
            report.job_id, report.action, report.instances = job.id, "started", len(candidates)
            task_ids = sorted({t.id for t in job.tasks})
    report.dispatched = dispatch(archive, task_ids, dispatcher)
    return report


NORMALIZE_POLICY_PREFIX = "normalize:"


def normalize_policy_tag(profile_name: str, params_sha: str) -> str:
    """A normalize job's ``policy``: the profile and its parameters' hash (a changed profile is a new policy)."""
    return f"{NORMALIZE_POLICY_PREFIX}{profile_name[:30]}:{params_sha[:16]}"


def start_normalize_sweep(archive: Archive, dispatcher: Dispatcher, *, limit: int | None = None) -> SweepReport:
    """The scheduled normalization: resume the open normalize job, or queue archived series that lack their
    profile's current normalized series (new profiles, changed profiles, studies archived with it off).

    A series a job of this profile version has already handled (normalized,
    skipped with a reason, failed) is not chosen again until the profile changes.
    """
    from archive.normalize.pipeline import profile_sha256
    from archive.services.normalization import software_version

    settings = archive.settings
    report = SweepReport(policy="normalize")
    if not settings.normalize:
        report.action = "normalization is off"
        return report
    budget = limit or settings.normalize_batch
    version = software_version()
    with archive.unit_of_work() as uow:
        session = uow.session
        open_job = session.scalar(select(Job).where(
            Job.kind == JobKind.NORMALIZE, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])).order_by(Job.id))
        if open_job is not None:
            task_ids = sorted(set(session.scalars(
                select(JobItem.task_id).where(JobItem.job_id == open_job.id, JobItem.status == ItemStatus.QUEUED))))
            report.job_id, report.action, report.instances = open_job.id, "resumed", len(task_ids)
        else:
            task_ids = []
            for profile in settings.normalize_profiles:
                if not profile.enabled or profile.keep or budget <= 0:
                    continue
                sha = profile_sha256(profile, version)
                tag = normalize_policy_tag(profile.name, sha)
                firsts = _normalize_candidates(session, profile.modalities, profile.body_parts, sha, tag, budget)
                if not firsts:
                    continue
                job = create_job(session, kind=JobKind.NORMALIZE, policy=tag, chunk_size=1,
                                 items=[ItemSpec(instance_id=i, series_uid=uid) for uid, i in firsts],
                                 params={"profile": profile.name, "params_sha256": sha})
                session.flush()
                task_ids += [t.id for t in job.tasks]
                report.job_id, report.action = job.id, "started"
                report.instances += len(firsts)
                budget -= len(firsts)
            uow.commit()
    report.dispatched = dispatch(archive, task_ids, dispatcher)
    return report


def _normalize_candidates(session: Session, modalities: tuple[str, ...], body_parts: tuple[str, ...], sha: str,
                          tag: str, limit: int) -> list[tuple[str, int]]:
    """(series UID, first image instance id) of original series no job of ``tag`` has seen, without a series
    of this profile version."""
    done = select(Derivation.source_series_id).where(Derivation.params_sha256 == sha)
    seen = (select(Instance.series_id).join(JobItem, JobItem.source_instance_id == Instance.id)
            .join(Job, Job.id == JobItem.job_id).where(Job.kind == JobKind.NORMALIZE, Job.policy == tag))
    query = (select(Series.series_uid, func.min(Instance.id))
             .join(Instance, Instance.series_id == Series.id)
             .where(Series.derived_from_id.is_(None), Instance.status == InstanceStatus.STORED,
                    Instance.storage_mode != StorageMode.WHOLE, Instance.rows.is_not(None),
                    Series.id.not_in(done), Series.id.not_in(seen))
             .group_by(Series.id, Series.series_uid).order_by(Series.id).limit(limit))
    if modalities:
        query = query.where(func.upper(Series.modality).in_([m.upper() for m in modalities]))
    if body_parts:
        query = query.where(func.upper(Series.body_part).in_([b.upper() for b in body_parts]))
    return [(uid, int(first)) for uid, first in session.execute(query)]
