"""Use cases that only read the catalog: find studies (filters, wildcards, date ranges), show a study or series, list quarantine and jobs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session, selectinload

from archive.catalog.models import (
    FINAL_ITEM_STATUSES,
    Derivation,
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
from archive.kinds import ItemOutcome
from archive.errors import ArchiveError, NotFoundError
from archive.services.runtime import Archive


DEFAULT_STUDY_LIMIT = 100
_LIKE_ESCAPE = "\\"


@dataclass(frozen=True)
class StudyFilter:
    """What ``medarchive studies`` narrows by; every field is optional and they combine with AND.

    ``patient_id``, ``patient_name``, ``accession`` and ``description`` take
    DICOM wildcards (``*`` any run of characters, ``?`` one character);
    patient names and descriptions match whatever the case, IDs and accession
    numbers exactly. ``date_from``/``date_to`` are inclusive YYYYMMDD bounds.
    """

    patient_id: str | None = None
    patient_name: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    modality: str | None = None
    accession: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class StudyPage:
    """The studies found, newest first, and how many matched in all (``truncated`` when the limit cut the list)."""

    studies: list[dict[str, Any]]
    matched: int
    limit: int

    @property
    def truncated(self) -> bool:
        return self.matched > len(self.studies)


def parse_date_range(text: str) -> tuple[str | None, str | None]:
    """``YYYYMMDD``, ``FROM-TO``, ``FROM-`` or ``-TO`` (DICOM range matching) as inclusive bounds."""
    text = text.strip()
    if "-" in text:
        start, _, end = text.partition("-")
        if "-" in end:
            raise ArchiveError(f"--date {text!r}: use YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD")
    else:
        start = end = text
    bounds = (_check_date(start, text) if start else None, _check_date(end, text) if end else None)
    if bounds == (None, None):
        raise ArchiveError(f"--date {text!r}: give at least one date (YYYYMMDD)")
    if bounds[0] and bounds[1] and bounds[0] > bounds[1]:
        raise ArchiveError(f"--date {text!r}: the range ends before it starts")
    return bounds


def _check_date(value: str, text: str) -> str:
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise ArchiveError(f"--date {text!r}: {value!r} is not a date YYYYMMDD") from None
    if len(value) != 8:
        raise ArchiveError(f"--date {text!r}: {value!r} is not a date YYYYMMDD")
    return value


def wildcard_to_like(pattern: str) -> str:
    """A DICOM wildcard pattern as a LIKE pattern (escape ``\\``): ``*`` is ``%``, ``?`` is ``_``, the rest literal."""
    out = []
    for char in pattern:
        if char in ("%", "_", _LIKE_ESCAPE):
            out.append(_LIKE_ESCAPE + char)
        elif char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        else:
            out.append(char)
    return "".join(out)


def _wildcard_glob(pattern: str) -> str:
    """The same pattern for SQLite's case-sensitive GLOB: only ``[`` needs escaping (``*`` and ``?`` mean the same)."""
    return pattern.replace("[", "[[]")


def _matches(column: InstrumentedAttribute[str | None], pattern: str, *, case_sensitive: bool, dialect: str) -> ColumnElement[bool]:
    """``column`` matches the DICOM wildcard ``pattern``, the same way on SQLite and PostgreSQL."""
    like = wildcard_to_like(pattern)
    if not case_sensitive:
        return func.lower(column).like(like.lower(), escape=_LIKE_ESCAPE)
    if dialect == "sqlite":  # SQLite's LIKE ignores ASCII case; GLOB does not
        return column.op("GLOB")(_wildcard_glob(pattern))
    return column.like(like, escape=_LIKE_ESCAPE)


def _study_conditions(filters: StudyFilter, dialect: str) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if filters.patient_id:
        conditions.append(_matches(Study.patient_id, filters.patient_id, case_sensitive=True, dialect=dialect))
    if filters.patient_name:
        conditions.append(_matches(Study.patient_name, filters.patient_name, case_sensitive=False, dialect=dialect))
    if filters.accession:
        conditions.append(_matches(Study.accession_number, filters.accession, case_sensitive=True, dialect=dialect))
    if filters.description:
        conditions.append(_matches(Study.study_description, filters.description, case_sensitive=False, dialect=dialect))
    if filters.date_from:
        conditions.append(Study.study_date >= filters.date_from)
    if filters.date_to:
        conditions.append(Study.study_date <= filters.date_to)
    if filters.modality:
        conditions.append(exists().where(Series.study_id == Study.id,
                                         func.upper(Series.modality) == filters.modality.strip().upper()))
    return conditions


def find_studies(archive: Archive, filters: StudyFilter | None = None, *, limit: int = DEFAULT_STUDY_LIMIT) -> StudyPage:
    """Studies matching ``filters``, newest StudyDate first (undated last), at most ``limit`` of them."""
    if limit < 1:
        raise ArchiveError(f"--limit {limit}: give a positive number of studies")
    filters = filters or StudyFilter()
    with archive.unit_of_work() as uow:
        conditions = _study_conditions(filters, uow.session.get_bind().dialect.name)
        matched = uow.session.scalar(select(func.count()).select_from(Study).where(*conditions)) or 0
        studies = uow.session.scalars(
            select(Study).where(*conditions)
            .order_by(Study.study_date.desc().nulls_last(), Study.created_at.desc(), Study.id.desc()).limit(limit)
        ).all()
        return StudyPage([_study_dict(s) for s in studies], matched, limit)


def list_studies(archive: Archive) -> list[dict[str, Any]]:
    """Every study (no filter, no limit), oldest StudyDate first."""
    with archive.unit_of_work() as uow:
        studies = uow.session.scalars(select(Study).order_by(Study.study_date, Study.study_uid)).all()
        return [_study_dict(s) for s in studies]


def resolve_uid(session: Session, uid: str) -> tuple[Study, Series | None]:
    """The study a Study *or* Series Instance UID names, and the series when it was a series UID."""
    study = session.scalar(select(Study).where(Study.study_uid == uid))
    if study is not None:
        return study, None
    series = session.scalar(select(Series).where(Series.series_uid == uid).options(selectinload(Series.study)))
    if series is not None:
        return series.study, series
    raise NotFoundError(f"no study or series with the UID {uid!r} (see `medarchive studies`)")


def show_study(archive: Archive, uid: str) -> dict[str, Any]:
    """A study with its series, instances and every encoding: codec, parameters, sizes, errors.

    ``uid`` is a Study or a Series Instance UID; for a series only that
    series is listed (``"series_only"`` names it).
    """
    with archive.unit_of_work() as uow:
        found, only = resolve_uid(uow.session, uid)
        study = uow.session.scalar(
            select(Study)
            .where(Study.id == found.id)
            .options(
                selectinload(Study.series)
                .selectinload(Series.instances)
                .selectinload(Instance.encodings)
                .selectinload(Encoding.frames)
            )
        )
        assert study is not None
        result = _study_dict(study)
        result["num_series"] = study.num_series
        result["series_only"] = only.series_uid if only is not None else None
        derivations = {d.series_id: d for d in uow.session.scalars(
            select(Derivation).where(Derivation.series_id.in_([s.id for s in study.series])))}
        uid_of = {s.id: s.series_uid for s in study.series}
        result["series"] = [
            {
                "series_uid": series.series_uid,
                "series_number": series.series_number,
                "modality": series.modality,
                "description": series.series_description,
                "derived_from": uid_of.get(series.derived_from_id) if series.derived_from_id else None,
                "derivation": _derivation_dict(derivations.get(series.id)),
                "instances": [_instance_dict(i) for i in series.instances],
            }
            for series in study.series
            if only is None or series.id == only.id
        ]
        return result


def _derivation_dict(row: Derivation | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "kind": row.kind.value, "profile": row.profile, "generation": row.generation, "current": row.is_current,
        "params": row.params, "source_geometry": row.source_geometry, "target_geometry": row.target_geometry,
        "transform": row.transform, "interpolation": row.interpolation, "across_slices": row.across_slices,
        "warnings": [w["message"] for w in row.warnings.get("items", [])], "rmse": row.rmse,
        "max_abs_error": row.max_abs_error, "error_pixels": row.error_pixels, "software_version": row.software_version,
    }


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
        "derived_series": study.num_derived_series,
        "derived_instances": study.num_derived_instances,
        "bytes_derived": study.bytes_derived,
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
        "derived_from_instance": instance.derived_from_id,
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
                "max_error_bound": e.max_error_bound,
                "context_blob": e.context_blob,
                "fallback_reason": e.fallback_reason,
                "released": e.released_at is not None,
            }
            for e in instance.encodings
        ],
    }


# --- jobs of the batch service


@dataclass(frozen=True)
class JobSummary:
    """A job and its progress: from its items (batch service), or from its ``counts`` (a direct ``ingest`` has no items)."""

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
    counts: dict[str, int] = field(default_factory=dict)  # the job's own tally: outcome -> count, "files"

    @property
    def total(self) -> int:
        if self.items:
            return sum(self.items.values())
        return max(int(self.counts.get("files") or 0), self.final)

    @property
    def final(self) -> int:
        if self.items:
            return sum(n for s, n in self.items.items() if ItemStatus(s) in FINAL_ITEM_STATUSES)
        return sum(n for key, n in self.counts.items() if key in _OUTCOME_KEYS)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "status": self.status, "study_uid": self.study_uid,
                "policy": self.policy, "items": self.items, "outcomes": self.outcomes, "counts": self.counts,
                "final": self.final, "total": self.total, "error": self.error,
                "created_at": self.created_at.isoformat(),
                "finished_at": self.finished_at.isoformat() if self.finished_at else None}


_OUTCOME_KEYS = frozenset(o.value for o in ItemOutcome)


def _int_counts(counts: dict[str, Any] | None) -> dict[str, int]:
    """A job's ``counts`` JSON as numbers (anything else in it is not a count and is left out)."""
    return {str(k): int(v) for k, v in (counts or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


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
                outcomes[jid][outcome.value] += n  # the value: an Enum key prints as "ItemOutcome.X"
    summaries = []
    for j in jobs:
        counts = _int_counts(j.counts)
        if not items[j.id]:  # no items: the job's own tally says what became of its files
            outcomes[j.id].update({k: n for k, n in counts.items() if k in _OUTCOME_KEYS and n})
        summaries.append(JobSummary(
            id=j.id, kind=j.kind.value, status=j.status.value, study_uid=j.study_uid, policy=j.policy,
            items=dict(items[j.id]), outcomes=dict(outcomes[j.id]), error=j.error,
            created_at=aware_utc(j.created_at) or utcnow(), finished_at=aware_utc(j.finished_at), counts=counts))
    return summaries


def job_errors(session: Session, job_id: int, limit: int = 50) -> list[tuple[str, str, str]]:
    """(path or instance, status, error) of a job's items that did not simply succeed."""
    rows = session.execute(
        select(JobItem.path, JobItem.source_instance_id, JobItem.status, JobItem.error)
        .where(JobItem.job_id == job_id, JobItem.error.is_not(None), JobItem.status != ItemStatus.DONE)
        .order_by(JobItem.id).limit(limit)
    )
    return [(path or f"instance {iid}", status.value, error or "") for path, iid, status, error in rows]
