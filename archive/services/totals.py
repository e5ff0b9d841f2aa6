"""Study totals are derived from the catalog, never counted by hand."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from archive.catalog.models import Blob, Encoding, Instance, InstanceStatus, Series, StorageMode, Study


def refresh_study_totals(session: Session, study_id: int) -> None:
    study = session.get_one(Study, study_id)
    stored = (Instance.status == InstanceStatus.STORED)
    in_study = Instance.series_id.in_(select(Series.id).where(Series.study_id == study_id))
    study.num_series = session.scalar(select(func.count(Series.id)).where(Series.study_id == study_id)) or 0
    study.num_instances = session.scalar(select(func.count(Instance.id)).where(in_study, stored)) or 0
    study.bytes_original = session.scalar(select(func.coalesce(func.sum(Instance.source_size), 0)).where(in_study)) or 0
    headers = session.scalar(
        select(func.coalesce(func.sum(Blob.size), 0)).join(Instance, Instance.header_blob == Blob.sha256).where(in_study)
    ) or 0
    pixels = session.scalar(
        select(func.coalesce(func.sum(Encoding.bytes_after), 0))
        .join(Instance, Encoding.instance_id == Instance.id)
        .where(in_study, Encoding.is_current, Instance.storage_mode != StorageMode.WHOLE)
    ) or 0
    study.bytes_stored = int(headers) + int(pixels)
    modalities = session.scalars(
        select(Series.modality).distinct().where(Series.study_id == study_id, Series.modality.is_not(None))
    ).all()
    study.modalities_in_study = "\\".join(sorted(m for m in modalities if m)) or None
    for series in study.series:
        series.num_instances = session.scalar(
            select(func.count(Instance.id)).where(Instance.series_id == series.id, stored)
        ) or 0
