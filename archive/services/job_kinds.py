"""One handler per job kind: what an item of that kind is and how it is done.

The executors (:mod:`archive.services.executors`) and the reconciler know
nothing about ingest, re-compression or normalization; they look the job's
kind up in :data:`HANDLERS`. A new kind is one more handler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import time
from pathlib import Path

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from archive.catalog.models import Instance, ItemStatus, Job, JobItem, Series, Study
from archive.clock import local_time_now
from archive.config import Settings
from archive.errors import ArchiveError, InstanceTimeLimitExceeded
from archive.kinds import ItemOutcome, JobKind, NormalizeOutcome
from archive.services.deadlines import fault_point, instance_deadline
from archive.services.encoding import archive_codec
from archive.services.failures import is_transient
from archive.services.leases import finish_item
from archive.services.outcomes import FileOutcome, Outcome
from archive.services.quarantine import quarantine_file, quarantine_unless_kept
from archive.services.recording import commit_staged
from archive.services.runtime import Archive
from archive.services.staging import StagedInstance, stage_file
from archive.services.totals import write_counted
from archive.services.unit_of_work import UnitOfWork

ItemResult = tuple[ItemStatus, ItemOutcome, str | None]  # status, outcome, error


@dataclass(frozen=True)
class JobHandler:
    """How the service runs the items of one job kind."""

    kind: JobKind
    process_one: Callable[[Archive, int], ItemResult]  # a claimed item, committed with its result
    set_aside: Callable[[Archive, Job, JobItem, str], ItemResult]  # an item that kept killing its worker
    studies_of: Callable[[Session, Job], set[int]]  # whose totals to refresh when the job finishes
    batch: bool = False  # a chunk may be staged and committed as one batch
    blobs_must_exist: bool = False  # finishing checks every referenced blob is in the store
    windowed: bool = False  # items run only inside the job's policy window


def item_result(outcome: FileOutcome) -> ItemResult:
    if outcome.outcome is Outcome.QUARANTINED:
        return ItemStatus.QUARANTINED, ItemOutcome.QUARANTINED, outcome.reason
    return ItemStatus.DONE, ItemOutcome(outcome.outcome.value), outcome.reason or None


def in_window(settings: Settings, job: Job, clock: Callable[[], time] = local_time_now) -> bool:
    """Whether a windowed job may run now (a job started by hand ignores its policy's window)."""
    handler = handler_for(job)
    if not handler.windowed or not job.params.get("respect_window", True):
        return True
    policy = settings.policies.get(job.policy or "")
    return policy is None or policy.in_window(clock())


# --------------------------------------------------------------------------- ingest


def _ingest_one(archive: Archive, item_id: int) -> ItemResult:
    settings = archive.settings
    with archive.unit_of_work() as uow:
        item = uow.session.get_one(JobItem, item_id)
        job = uow.session.get_one(Job, item.job_id)
        job_id, path = job.id, Path(item.path or "")
        keep_skipped = job.spool_dir is None
        codec_config = job.params.get("codec") or settings.codec
    fault_point(str(path))
    try:
        with instance_deadline(settings.instance_time_limit):
            staged = stage_file(archive, path, archive_codec(codec_config), job_id=job_id)
    except InstanceTimeLimitExceeded as exc:
        staged = quarantine_file(archive, path, str(exc), type(exc).__name__, job_id=job_id)
    if isinstance(staged, FileOutcome):
        staged = quarantine_unless_kept(archive, staged, job_id=job_id, keep_skipped=keep_skipped)
    def record(uow: UnitOfWork) -> tuple[ItemResult, list[int]]:
        """The instance's rows, the item's result and its study's totals: one transaction, run again on a lost race."""
        recorded, study_id = commit_staged(uow, staged, job_id) if isinstance(staged, StagedInstance) else (staged, None)
        result = item_result(recorded)
        finish_item(uow.session, item_id, *result)
        return result, [] if study_id is None else [study_id]

    try:
        status, label, error = write_counted(archive, record)
    except Exception as exc:
        if is_transient(exc):
            raise
        reason = f"unexpected {type(exc).__name__} while recording: {exc}"
        quarantine_file(archive, path, reason, type(exc).__name__, job_id=job_id)
        status, label, error = ItemStatus.QUARANTINED, ItemOutcome.QUARANTINED, reason
        with archive.unit_of_work() as uow:
            finish_item(uow.session, item_id, status, label, error)
            uow.commit()
    return status, label, error


def _ingest_set_aside(archive: Archive, job: Job, item: JobItem, reason: str) -> ItemResult:
    if not item.path or not Path(item.path).exists():
        return ItemStatus.FAILED, ItemOutcome.FAILED, reason
    quarantine_file(archive, Path(item.path), reason, "WorkerLost", job_id=job.id)
    return ItemStatus.QUARANTINED, ItemOutcome.QUARANTINED, reason


def _ingest_studies(session: Session, job: Job) -> set[int]:
    query = select(Series.study_id).join(Instance, Instance.series_id == Series.id).where(Instance.job_id == job.id)
    return _with_job_study(session, job, query)


# --------------------------------------------------------------------------- re-compression


def _recompress_one(archive: Archive, item_id: int) -> ItemResult:
    from archive.services.recompress import recompress_instance  # noqa: PLC0415 - recompress imports this module

    settings = archive.settings
    with archive.unit_of_work() as uow:
        item = uow.session.get_one(JobItem, item_id)
        job = uow.session.get_one(Job, item.job_id)
        instance_id, policy_name = item.source_instance_id, job.policy
    fault_point(f"instance:{instance_id}")
    assert instance_id is not None
    status: ItemStatus
    try:
        policy = settings.policy(policy_name or "")
        with instance_deadline(settings.instance_time_limit):
            done = recompress_instance(archive, instance_id, policy)
        status, outcome, error = ItemStatus.DONE, done.outcome, done.reason or None
    except ArchiveError as exc:  # not verified (or no such policy): the previous encoding stays current
        status, outcome, error = ItemStatus.FAILED, ItemOutcome.FAILED, f"{type(exc).__name__}: {exc}"
    with archive.unit_of_work() as uow:
        finish_item(uow.session, item_id, status, outcome, error)
        uow.commit()
    return status, outcome, error


def _recompress_set_aside(archive: Archive, job: Job, item: JobItem, reason: str) -> ItemResult:
    return ItemStatus.FAILED, ItemOutcome.FAILED, reason  # the archived generation stays current


def _recompress_studies(session: Session, job: Job) -> set[int]:
    query = (select(Series.study_id).join(Instance, Instance.series_id == Series.id)
             .join(JobItem, JobItem.source_instance_id == Instance.id).where(JobItem.job_id == job.id))
    return _with_job_study(session, job, query)


def _with_job_study(session: Session, job: Job, query: Select[int]) -> set[int]:
    """The studies ``query`` finds, and the study the job was created for (which may have got no instance)."""
    ids = set(session.scalars(query.distinct()))
    if job.study_uid:
        ids.update(session.scalars(select(Study.id).where(Study.study_uid == job.study_uid)))
    return ids


# --------------------------------------------------------------------------- normalization


def _normalize_one(archive: Archive, item_id: int) -> ItemResult:
    """An item is a source series (named by its first instance): normalized by the profile that matches it."""
    from archive.services.normalization import normalize_series  # noqa: PLC0415 - it imports the pipeline

    with archive.unit_of_work() as uow:
        item = uow.session.get_one(JobItem, item_id)
        job_id, instance_id = item.job_id, item.source_instance_id
        series_id = uow.session.scalar(select(Instance.series_id).where(Instance.id == instance_id))
    fault_point(f"instance:{instance_id}")
    status: ItemStatus
    error: str | None
    if series_id is None:  # deleted since the sweep chose it
        status, outcome, error = ItemStatus.DONE, ItemOutcome.SKIPPED, "the series is no longer archived"
    else:
        try:
            done = normalize_series(archive, series_id, job_id=job_id)
            status, error = ItemStatus.DONE, done.reason or None
            outcome = {NormalizeOutcome.NORMALIZED: ItemOutcome.NORMALIZED,
                       NormalizeOutcome.UNCHANGED: ItemOutcome.UNCHANGED}.get(done.outcome, ItemOutcome.SKIPPED)
        except Exception as exc:
            if is_transient(exc):
                raise
            status, outcome, error = ItemStatus.FAILED, ItemOutcome.FAILED, f"{type(exc).__name__}: {exc}"
    with archive.unit_of_work() as uow:
        finish_item(uow.session, item_id, status, outcome, error)
        uow.commit()
    return status, outcome, error


def _normalize_set_aside(archive: Archive, job: Job, item: JobItem, reason: str) -> ItemResult:
    return ItemStatus.FAILED, ItemOutcome.FAILED, reason  # the original is untouched; the next sweep skips it


def _normalize_studies(session: Session, job: Job) -> set[int]:
    query = (select(Series.study_id).join(Instance, Instance.series_id == Series.id)
             .join(JobItem, JobItem.source_instance_id == Instance.id).where(JobItem.job_id == job.id))
    return _with_job_study(session, job, query)


HANDLERS: dict[JobKind, JobHandler] = {
    JobKind.INGEST: JobHandler(JobKind.INGEST, _ingest_one, _ingest_set_aside, _ingest_studies,
                               batch=True, blobs_must_exist=True),
    JobKind.RECOMPRESS: JobHandler(JobKind.RECOMPRESS, _recompress_one, _recompress_set_aside, _recompress_studies,
                                   windowed=True),
    JobKind.NORMALIZE: JobHandler(JobKind.NORMALIZE, _normalize_one, _normalize_set_aside, _normalize_studies),
}


def handler_for(job: Job) -> JobHandler:
    try:
        return HANDLERS[JobKind(job.kind)]
    except (KeyError, ValueError):
        raise ArchiveError(f"job {job.id} has kind {job.kind!r}, which no handler runs") from None
