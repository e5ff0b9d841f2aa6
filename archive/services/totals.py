"""Study totals are derived from the catalog, never counted by hand, in the transaction that changes what they count.

:func:`write_counted` is the writers' transaction: the rows, then the totals
of the studies they touched, one commit. A process killed at any moment
leaves totals that match the rows (no reconcile needed), and concurrent
writers (``ingest`` processes, workers) resolve their races by running the
batch again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import case, func, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from archive.catalog.models import Blob, Encoding, Instance, InstanceStatus, Series, Study
from archive.clock import utcnow
from archive.kinds import StorageMode

if TYPE_CHECKING:
    from archive.services.runtime import Archive
    from archive.services.unit_of_work import UnitOfWork

_log = logging.getLogger(__name__)
_PAGE = 500
WRITE_ATTEMPTS = 8  # a batch that keeps losing races to other writers gives up after this many tries
_T = TypeVar("_T")
_RACE_SQLSTATES = {"40001", "40P01"}  # PostgreSQL: serialization failure, deadlock detected


def write_counted(archive: Archive, work: Callable[[UnitOfWork], tuple[_T, Iterable[int]]]) -> _T:
    """Run ``work`` in one write transaction, refresh the totals of the study ids it returns there, commit.

    On SQLite the transaction takes the write lock before ``work`` reads
    anything (``BEGIN IMMEDIATE``): what it looks up (which SOP instances are
    archived) cannot change before it commits, and no two writers deadlock on
    a lock upgrade. A race another writer won (the same SOP Instance UID
    inserted first, a study or series created at the same time, a deadlock,
    a lock wait that timed out) rolls back and runs ``work`` again, which then
    sees the winner's rows: a duplicate, or a conflict if the objects differ.
    """
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            with archive.unit_of_work() as uow:
                begin_write(uow.session)
                result, study_ids = work(uow)
                refresh_totals(uow.session, study_ids)
                uow.commit()
                return result
        except (sa_exc.IntegrityError, sa_exc.OperationalError) as exc:
            if attempt == WRITE_ATTEMPTS or not lost_race(exc):
                raise
            _log.debug("another writer won a race (%s); running the transaction again (attempt %d)",
                       type(getattr(exc, "orig", exc)).__name__, attempt + 1)
        time.sleep(random.uniform(0.01, 0.05) * attempt)  # let the winner finish; spread the retries
    raise AssertionError("unreachable")  # pragma: no cover


def begin_write(session: Session) -> None:
    """Start the session's transaction as a writer: on SQLite take the write lock now (``BEGIN IMMEDIATE``)."""
    connection = session.connection()
    if connection.dialect.name == "sqlite" and not connection.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def lost_race(exc: BaseException) -> bool:
    """A failure another writer caused, gone when the transaction runs again."""
    if isinstance(exc, sa_exc.IntegrityError):
        return True  # a unique row (SOP instance, study, series, dictionary) committed by another writer first
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) in _RACE_SQLSTATES:
        return True
    text = str(orig or exc).lower()
    return "database is locked" in text or "deadlock detected" in text


def refresh_study_totals(session: Session, study_id: int) -> None:
    """Recompute one study's and its series' counts and sizes."""
    refresh_totals(session, [study_id])


def refresh_totals(session: Session, study_ids: Iterable[int]) -> None:
    """Recompute studies' and their series' counts and sizes: three aggregate queries per page of studies.

    On PostgreSQL the study rows are locked first (in id order), so two
    writers refreshing one study count each other's committed rows instead of
    overwriting them with a total taken before the other committed.
    """
    ids = sorted(set(study_ids))
    if ids and session.get_bind().dialect.name == "postgresql":
        for start in range(0, len(ids), _PAGE):
            session.execute(select(Study.id).where(Study.id.in_(ids[start:start + _PAGE]))
                            .order_by(Study.id).with_for_update()).all()
    for start in range(0, len(ids), _PAGE):
        _refresh_page(session, ids[start:start + _PAGE])


def _refresh_page(session: Session, study_ids: list[int]) -> None:
    """Originals and derived series (normalized copies) are counted apart: a study's totals are its originals."""
    # a lossy-only original is still one of the study's instances (held as its lossy derivative)
    stored = case((Instance.status.in_((InstanceStatus.STORED, InstanceStatus.LOSSY_ONLY)), 1), else_=0)
    derived = Series.derived_from_id.is_not(None)
    per_series = session.execute(
        select(Series.id, Series.study_id, Series.modality, Series.derived_from_id,
               func.coalesce(func.sum(stored), 0), func.coalesce(func.sum(Instance.source_size), 0))
        .outerjoin(Instance, Instance.series_id == Series.id)
        .where(Series.study_id.in_(study_ids))
        .group_by(Series.id, Series.study_id, Series.modality, Series.derived_from_id)
    ).all()
    headers = {(study_id, bool(is_derived)): size for study_id, is_derived, size in session.execute(
        select(Series.study_id, derived, func.coalesce(func.sum(Blob.size), 0))
        .join(Instance, Instance.series_id == Series.id).join(Blob, Instance.header_blob == Blob.sha256)
        .where(Series.study_id.in_(study_ids)).group_by(Series.study_id, derived)
    )}
    pixels = {(study_id, bool(is_derived)): size for study_id, is_derived, size in session.execute(
        select(Series.study_id, derived, func.coalesce(func.sum(Encoding.bytes_after), 0))
        .join(Instance, Instance.series_id == Series.id).join(Encoding, Encoding.instance_id == Instance.id)
        .where(Series.study_id.in_(study_ids), Encoding.is_current, Instance.storage_mode != StorageMode.WHOLE)
        .group_by(Series.study_id, derived)
    )}
    totals = {study_id: _Totals() for study_id in study_ids}
    series_rows = []
    for series_id, study_id, modality, derived_from, count, size in per_series:
        entry = totals[study_id]
        if derived_from is not None:
            entry.num_derived_series += 1
            entry.num_derived_instances += int(count)
        else:
            entry.num_series += 1
            entry.num_instances += int(count)
            entry.bytes_original += int(size)
            if modality:
                entry.modalities.add(modality)
        series_rows.append({"id": series_id, "num_instances": int(count)})
    if series_rows:
        session.execute(update(Series), series_rows)  # one executemany by primary key
    session.execute(update(Study), [
        {"id": study_id, "num_series": t.num_series, "num_instances": t.num_instances,
         "bytes_original": t.bytes_original,
         "bytes_stored": int(headers.get((study_id, False), 0)) + int(pixels.get((study_id, False), 0)),
         "num_derived_series": t.num_derived_series, "num_derived_instances": t.num_derived_instances,
         "bytes_derived": int(headers.get((study_id, True), 0)) + int(pixels.get((study_id, True), 0)),
         "modalities_in_study": "\\".join(sorted(t.modalities)) or None, "updated_at": utcnow()}
        for study_id, t in totals.items()
    ])


@dataclass
class _Totals:
    num_series: int = 0
    num_instances: int = 0
    num_derived_series: int = 0
    num_derived_instances: int = 0
    bytes_original: int = 0
    modalities: set[str] = field(default_factory=set)
