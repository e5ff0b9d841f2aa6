"""Use cases: delete a study or one series from the archive, with an audit record.

The catalog rows go in one transaction together with the audit row that says
who deleted what and why; the blobs are not touched here. Once nothing
references them the garbage collector (``medarchive gc``) frees them after
its grace period, exactly as it does for re-compression's old frames, so a
reader that is retrieving the study right now still finds its bytes.
Conflicting objects recorded against the deleted instances (same SOP
Instance UID, possibly filed under another series) go with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from archive.catalog.models import (
    FINAL_ITEM_STATUSES,
    Blob,
    Derivation,
    EncodedFrame,
    Encoding,
    HeaderRevision,
    Instance,
    InstanceStatus,
    ItemStatus,
    JobItem,
    Series,
    Study,
)
from archive.errors import NotFoundError
from archive.kinds import AuditAction, ItemOutcome, StorageMode
from archive.services.audit import record
from archive.services.runtime import Archive
from archive.services.totals import refresh_totals

_PAGE = 500


@dataclass
class DeletionReport:
    """What a delete removes (a preview) or removed (``audit_id`` set)."""

    study_uid: str
    series_uid: str | None  # None: the whole study
    patient_id: str | None
    patient_name: str | None
    study_description: str | None
    study_date: str | None
    series: int = 0
    instances: int = 0  # stored instances
    conflicts: int = 0  # recorded conflicting objects removed with them
    bytes_original: int = 0  # as received
    bytes_stored: int = 0  # headers and current encodings: what the GC gives back (less what other studies share)
    study_deleted: bool = False  # a series delete that emptied its study removes the study too
    audit_id: int | None = None
    series_uids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_study_deletion(archive: Archive, study_uid: str) -> DeletionReport:
    """What ``delete_study`` would remove, without removing anything (for the confirmation prompt)."""
    with archive.unit_of_work() as uow:
        study = _study(uow.session, study_uid)
        return _plan(uow.session, study, list(study.series), series_uid=None, whole_study=True)


def plan_series_deletion(archive: Archive, series_uid: str) -> DeletionReport:
    """What ``delete_series`` would remove, without removing anything."""
    with archive.unit_of_work() as uow:
        series = _series(uow.session, series_uid)
        return _plan(uow.session, series.study, [series], series_uid=series_uid, whole_study=len(series.study.series) == 1)


def delete_study(archive: Archive, study_uid: str, *, reason: str | None = None) -> DeletionReport:
    """Remove a study's catalog rows and record who did it; its blobs are freed by the next GC after the grace period."""
    with archive.unit_of_work() as uow:
        study = _study(uow.session, study_uid, lock=True)
        report = _plan(uow.session, study, list(study.series), series_uid=None, whole_study=True)
        _remove(uow.session, study, list(study.series), whole_study=True)
        report.audit_id = record(uow.session, AuditAction.DELETE_STUDY, study_uid, reason=reason,
                                 details=_details(report)).id
        uow.commit()
    return report


def delete_series(archive: Archive, series_uid: str, *, reason: str | None = None) -> DeletionReport:
    """Remove one series' catalog rows (and its study when it was the last series), with an audit record."""
    with archive.unit_of_work() as uow:
        series = _series(uow.session, series_uid, lock=True)
        study = series.study
        doomed = _with_derived(uow.session, [series])  # its normalized copies go with it
        whole = {s.id for s in study.series} <= {s.id for s in doomed}
        report = _plan(uow.session, study, doomed, series_uid=series_uid, whole_study=whole)
        _remove(uow.session, study, doomed, whole_study=whole)
        report.audit_id = record(uow.session, AuditAction.DELETE_SERIES, series_uid, reason=reason,
                                 details=_details(report)).id
        uow.commit()
    return report


# --- internals


def _study(session: Session, study_uid: str, *, lock: bool = False) -> Study:
    query = select(Study).where(Study.study_uid == study_uid)
    study = session.scalar(query.with_for_update() if lock else query)
    if study is None:
        raise NotFoundError(f"no study with Study Instance UID {study_uid!r} (see `medarchive studies`)")
    return study


def _series(session: Session, series_uid: str, *, lock: bool = False) -> Series:
    query = select(Series).where(Series.series_uid == series_uid)
    series = session.scalar(query.with_for_update() if lock else query)
    if series is None:
        raise NotFoundError(f"no series with Series Instance UID {series_uid!r} (see `medarchive show STUDY_UID`)")
    return series


def _with_derived(session: Session, series: Sequence[Series]) -> list[Series]:
    """``series`` and every series derived from them (normalized copies, and copies of those)."""
    found = {s.id: s for s in series}
    frontier = list(found)
    while frontier:
        children = session.scalars(select(Series).where(Series.derived_from_id.in_(frontier))).all()
        frontier = [c.id for c in children if c.id not in found]
        found.update((c.id, c) for c in children)
    return list(found.values())


def _instance_ids(session: Session, series: Sequence[Series]) -> list[int]:
    """The instances of ``series``, and every conflict recorded against them wherever it is filed."""
    own = list(session.scalars(select(Instance.id).where(Instance.series_id.in_([s.id for s in series]))))
    conflicts: set[int] = set()
    for page in _pages(own):
        conflicts.update(session.scalars(select(Instance.id).where(Instance.conflict_of_id.in_(page))))
    return sorted(set(own) | conflicts)


def _plan(session: Session, study: Study, series: Sequence[Series], *, series_uid: str | None,
          whole_study: bool) -> DeletionReport:
    report = DeletionReport(
        study_uid=study.study_uid, series_uid=series_uid,
        patient_id=study.patient_id, patient_name=study.patient_name, study_description=study.study_description,
        study_date=study.study_date, series=len(series), study_deleted=whole_study,
        series_uids=[s.series_uid for s in series],
    )
    ids = _instance_ids(session, series)
    for page in _pages(ids):
        for status, n, size in session.execute(
            select(Instance.status, func.count(), func.coalesce(func.sum(Instance.source_size), 0))
            .where(Instance.id.in_(page)).group_by(Instance.status)
        ):
            if status is InstanceStatus.STORED:
                report.instances += n
                report.bytes_original += int(size)
            else:
                report.conflicts += n
        headers = session.scalar(
            select(func.coalesce(func.sum(Blob.size), 0)).join(Instance, Instance.header_blob == Blob.sha256)
            .where(Instance.id.in_(page)))
        pixels = session.scalar(
            select(func.coalesce(func.sum(Encoding.bytes_after), 0)).join(Instance, Instance.id == Encoding.instance_id)
            .where(Instance.id.in_(page), Encoding.is_current, Instance.storage_mode != StorageMode.WHOLE))
        report.bytes_stored += int(headers or 0) + int(pixels or 0)
    return report


def _remove(session: Session, study: Study, series: Sequence[Series], *, whole_study: bool) -> None:
    """Delete the rows that describe the instances, then the series (and study); refresh what remains."""
    ids = _instance_ids(session, series)
    series_ids = {s.id for s in series}
    elsewhere: set[int] = set()  # series of conflicts filed outside what is deleted
    for page in _pages(ids):
        elsewhere.update(session.scalars(select(Instance.series_id).distinct().where(Instance.id.in_(page))))
    elsewhere -= series_ids
    session.execute(delete(Derivation).where(Derivation.series_id.in_(series_ids)
                                             | Derivation.source_series_id.in_(series_ids)))
    session.execute(update(Series).where(Series.derived_from_id.in_(series_ids)).values(derived_from_id=None))
    for page in _pages(ids):
        encodings = select(Encoding.id).where(Encoding.instance_id.in_(page))
        session.execute(update(Instance).where(Instance.conflict_of_id.in_(page)).values(conflict_of_id=None))
        session.execute(update(Instance).where(Instance.derived_from_id.in_(page)).values(derived_from_id=None))
        session.execute(update(Encoding).where(Encoding.derived_from_id.in_(encodings)).values(derived_from_id=None))
        session.execute(delete(EncodedFrame).where(EncodedFrame.encoding_id.in_(encodings)))
        session.execute(delete(Encoding).where(Encoding.instance_id.in_(page)))
        session.execute(delete(HeaderRevision).where(HeaderRevision.instance_id.in_(page)))
        # re-compression items of these instances: nothing left to do, so final; the job's history stays
        session.execute(
            update(JobItem).where(JobItem.source_instance_id.in_(page), JobItem.status.not_in(FINAL_ITEM_STATUSES))
            .values(status=ItemStatus.FAILED, outcome=ItemOutcome.FAILED, owner=None, lease_until=None,
                    error="the instance was deleted"))
        session.execute(update(JobItem).where(JobItem.source_instance_id.in_(page)).values(source_instance_id=None))
        session.execute(delete(Instance).where(Instance.id.in_(page)))
    session.execute(delete(Series).where(Series.id.in_(series_ids)))
    touched: set[int] = set()
    if elsewhere:  # a series that held only conflicts of the deleted instances is left empty: it goes too
        for series_id, study_id, remaining in session.execute(
            select(Series.id, Series.study_id, func.count(Instance.id)).outerjoin(Instance, Instance.series_id == Series.id)
            .where(Series.id.in_(elsewhere)).group_by(Series.id, Series.study_id)
        ).all():
            touched.add(study_id)
            if not remaining:
                session.execute(delete(Series).where(Series.id == series_id))
    if whole_study:
        session.execute(delete(Study).where(Study.id == study.id))
        touched.discard(study.id)
    else:
        touched.add(study.id)
    empty = [sid for sid in touched if not session.scalar(select(func.count()).select_from(Series).where(
        Series.study_id == sid))]
    if empty:
        session.execute(delete(Study).where(Study.id.in_(empty)))
    refresh_totals(session, touched - set(empty))
    session.expire_all()


def _details(report: DeletionReport) -> dict[str, Any]:
    """The audit record's details: enough to know afterwards what was deleted and whose it was."""
    return {key: value for key, value in report.as_dict().items() if key != "audit_id"}


def _pages(ids: Sequence[int]) -> list[list[int]]:
    return [list(ids[start:start + _PAGE]) for start in range(0, len(ids), _PAGE)]


