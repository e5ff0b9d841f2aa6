"""Study totals are derived from the catalog, never counted by hand."""

from __future__ import annotations

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from archive.catalog.models import Blob, Encoding, Instance, InstanceStatus, Series, Study
from archive.kinds import StorageMode


def refresh_study_totals(session: Session, study_id: int) -> None:
    """Recompute a study's and its series' counts and sizes (two aggregate queries)."""
    study = session.get_one(Study, study_id)
    stored = case((Instance.status == InstanceStatus.STORED, 1), else_=0)
    per_series = session.execute(
        select(Series.id, Series.modality, func.coalesce(func.sum(stored), 0),
               func.coalesce(func.sum(Instance.source_size), 0))
        .outerjoin(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id).group_by(Series.id, Series.modality)
    ).all()
    in_study = Instance.series_id.in_(select(Series.id).where(Series.study_id == study_id))
    headers = (select(func.coalesce(func.sum(Blob.size), 0)).join(Instance, Instance.header_blob == Blob.sha256)
               .where(in_study).scalar_subquery())
    pixels = (select(func.coalesce(func.sum(Encoding.bytes_after), 0))
              .join(Instance, Encoding.instance_id == Instance.id)
              .where(in_study, Encoding.is_current, Instance.storage_mode != StorageMode.WHOLE).scalar_subquery())
    header_bytes, pixel_bytes = session.execute(select(headers, pixels)).one()
    counts = {series_id: int(n) for series_id, _modality, n, _size in per_series}
    study.num_series = len(per_series)
    study.num_instances = sum(counts.values())
    study.bytes_original = sum(int(size) for *_, size in per_series)
    study.bytes_stored = int(header_bytes) + int(pixel_bytes)
    study.modalities_in_study = "\\".join(sorted({m for _, m, _, _ in per_series if m})) or None
    for series in study.series:
        series.num_instances = counts.get(series.id, 0)
