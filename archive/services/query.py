"""Use cases that only read the catalog: list studies, show one, list quarantine, list jobs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from archive.catalog.models import (
    FINAL_ITEM_STATUSES,
    Encoding,
    Instance,
    ItemStatus,
    Job,
    JobItem,
    JobStatus,
    QuarantineEntry,
    Series,
    Study,
)
from archive.clock import aware_utc, utcnow
from archive.errors import NotFoundError
from archive.services.runtime import Archive


def list_studies(archive: Archive) -> list[dict[str, Any]]:
    with archive.unit_of_work() as uow:
        studies = uow.session.scalars(select(Study).order_by(Study.study_date, Study.study_uid)).all()
        return [_study_dict(s) for s in studies]


def show_study(archive: Archive, study_uid: str) -> dict[str, Any]:
    """A study with its series, instances and every encoding: codec, parameters, sizes, errors."""
    with archive.unit_of_work() as uow:
        study = uow.session.scalar(
            select(Study)
            .where(Study.study_uid == study_uid)
            .options(
                selectinload(Study.series)
                .selectinload(Series.instances)
                .selectinload(Instance.encodings)
                .selectinload(Encoding.frames)
            )
        )
        if study is None:
            raise NotFoundError(f"no study with Study Instance UID {study_uid!r}")
        result = _study_dict(study)
        result["series"] = [
            {
                "series_uid": series.series_uid,
                "series_number": series.series_number,
                "modality": series.modality,
                "description": series.series_description,
                "instances": [_instance_dict(i) for i in series.instances],
            }
            for series in study.series
        ]
        return result


def list_quarantine(archive: Archive) -> list[dict[str, Any]]:
    with archive.unit_of_work() as uow:
        rows = uow.session.scalars(select(QuarantineEntry).order_by(QuarantineEntry.id)).all()
        return [
            {
                "id": q.id,
                "source_path": q.source_path,
                "stored_path": q.stored_path,
                "reason": q.reason,
                "error_type": q.error_type,
                "size": q.size,
                "sha256": q.sha256,
                "created_at": q.created_at.isoformat(),
            }
            for q in rows
        ]


def _study_dict(study: Study) -> dict[str, Any]:
    return {
        "study_uid": study.study_uid,
        "patient_id": study.patient_id,
        "patient_name": study.patient_name,
        "study_date": study.study_date,
        "accession_number": study.accession_number,
        "study_description": study.study_description,
        "modalities": study.modalities_in_study,
        "series": study.num_series,
        "instances": study.num_instances,
        "bytes_original": study.bytes_original,
        "bytes_stored": study.bytes_stored,
        "ratio": round(study.bytes_original / study.bytes_stored, 3) if study.bytes_stored else None,
    }


def _instance_dict(instance: Instance) -> dict[str, Any]:
    return {
        "sop_instance_uid": instance.sop_instance_uid,
        "instance_number": instance.instance_number,
        "status": instance.status.value,
        "conflict_seq": instance.conflict_seq,
        "storage_mode": instance.storage_mode.value,
        "storage_reason": instance.storage_reason,
        "transfer_syntax_uid": instance.transfer_syntax_uid,
        "rows": instance.rows,
        "columns": instance.columns,
        "frames": instance.number_of_frames,
        "bits_stored": instance.bits_stored,
        "photometric": instance.photometric_interpretation,
        "source_size": instance.source_size,
        "assigned_uids": instance.assigned_uids,
        "encodings": [
            {
                "generation": e.generation,
                "current": e.is_current,
                "kind": e.kind,
                "codec": e.codec_id,
                "config": e.codec_config,
                "actual_codecs": e.actual_codecs,
                "library_versions": e.library_versions,
                "side_info": e.side_info,
                "bytes_before": e.bytes_before,
                "bytes_after": e.bytes_after,
                "ratio": round(e.ratio, 3),
                "bits_per_pixel": round(e.bits_per_pixel, 4),
                "mse": e.mse,
                "psnr": e.psnr,
                "psnr_range": e.psnr_range,
                "max_abs_error": e.max_abs_error,
                "encode_ms": round(e.encode_ms, 3),
                "decode_ms": round(e.decode_ms, 3),
                "derived_from": e.derived_from_id,
            }
            for e in instance.encodings
        ],
    }


# --- jobs of the batch service


@dataclass(frozen=True)
class JobSummary:
    id: int
    kind: str
    status: str
    study_uid: str | None
    policy: str | None
    items: dict[str, int]  # item status -> count
    outcomes: dict[str, int]
    error: str | None
    created_at: datetime
    finished_at: datetime | None

    @property
    def total(self) -> int:
        return sum(self.items.values())

    @property
    def final(self) -> int:
        return sum(n for s, n in self.items.items() if ItemStatus(s) in FINAL_ITEM_STATUSES)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "status": self.status, "study_uid": self.study_uid,
                "policy": self.policy, "items": self.items, "outcomes": self.outcomes, "error": self.error,
                "created_at": self.created_at.isoformat(),
                "finished_at": self.finished_at.isoformat() if self.finished_at else None}


def list_jobs(session: Session, *, status: str | None = None, job_id: int | None = None, limit: int = 50) -> list[JobSummary]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if status:
        query = query.where(Job.status == JobStatus(status))
    if job_id is not None:
        query = query.where(Job.id == job_id)
    jobs = list(session.scalars(query))
    items: dict[int, Counter[str]] = {j.id: Counter() for j in jobs}
    outcomes: dict[int, Counter[str]] = {j.id: Counter() for j in jobs}
    if jobs:
        for jid, item_status, outcome, n in session.execute(
            select(JobItem.job_id, JobItem.status, JobItem.outcome, func.count())
            .where(JobItem.job_id.in_(list(items))).group_by(JobItem.job_id, JobItem.status, JobItem.outcome)
        ):
            items[jid][item_status.value] += n
            if outcome:
                outcomes[jid][outcome] += n
    return [
        JobSummary(id=j.id, kind=j.kind, status=j.status.value, study_uid=j.study_uid, policy=j.policy,
                   items=dict(items[j.id]), outcomes=dict(outcomes[j.id]), error=j.error,
                   created_at=aware_utc(j.created_at) or utcnow(), finished_at=aware_utc(j.finished_at))
        for j in jobs
    ]


def job_errors(session: Session, job_id: int, limit: int = 50) -> list[tuple[str, str, str]]:
    """(path or instance, status, error) of a job's items that did not simply succeed."""
    rows = session.execute(
        select(JobItem.path, JobItem.source_instance_id, JobItem.status, JobItem.error)
        .where(JobItem.job_id == job_id, JobItem.error.is_not(None), JobItem.status != ItemStatus.DONE)
        .order_by(JobItem.id).limit(limit)
    )
    return [(path or f"instance {iid}", status.value, error or "") for path, iid, status, error in rows]
