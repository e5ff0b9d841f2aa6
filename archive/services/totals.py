"""Study totals are derived from the catalog, never counted by hand."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from archive.catalog.models import Blob, Encoding, Instance, InstanceStatus, Series, Study
from archive.clock import utcnow
from archive.kinds import StorageMode

_PAGE = 500


def refresh_study_totals(session: Session, study_id: int) -> None:
    """Recompute one study's and its series' counts and sizes."""
    refresh_totals(session, [study_id])


def refresh_totals(session: Session, study_ids: Iterable[int]) -> None:
    """Recompute studies' and their series' counts and sizes: three aggregate queries per page of studies."""
    ids = sorted(set(study_ids))
    for start in range(0, len(ids), _PAGE):
        _refresh_page(session, ids[start:start + _PAGE])


def _refresh_page(session: Session, study_ids: list[int]) -> None:
    stored = case((Instance.status == InstanceStatus.STORED, 1), else_=0)
    per_series = session.execute(
        select(Series.id, Series.study_id, Series.modality, func.coalesce(func.sum(stored), 0),
               func.coalesce(func.sum(Instance.source_size), 0))
        .outerjoin(Instance, Instance.series_id == Series.id)
        .where(Series.study_id.in_(study_ids)).group_by(Series.id, Series.study_id, Series.modality)
    ).all()
    headers = dict(session.execute(
        select(Series.study_id, func.coalesce(func.sum(Blob.size), 0))
        .join(Instance, Instance.series_id == Series.id).join(Blob, Instance.header_blob == Blob.sha256)
        .where(Series.study_id.in_(study_ids)).group_by(Series.study_id)
    ).all())
    pixels = dict(session.execute(
        select(Series.study_id, func.coalesce(func.sum(Encoding.bytes_after), 0))
        .join(Instance, Instance.series_id == Series.id).join(Encoding, Encoding.instance_id == Instance.id)
        .where(Series.study_id.in_(study_ids), Encoding.is_current, Instance.storage_mode != StorageMode.WHOLE)
        .group_by(Series.study_id)
    ).all())
    totals = {study_id: _Totals() for study_id in study_ids}
    series_rows = []
    for series_id, study_id, modality, count, size in per_series:
        entry = totals[study_id]
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
         "bytes_original": t.bytes_original, "bytes_stored": int(headers.get(study_id, 0)) + int(pixels.get(study_id, 0)),
         "modalities_in_study": "\\".join(sorted(t.modalities)) or None, "updated_at": utcnow()}
        for study_id, t in totals.items()
    ])


@dataclass
class _Totals:
    num_series: int = 0
    num_instances: int = 0
    bytes_original: int = 0
    modalities: set[str] = field(default_factory=set)
