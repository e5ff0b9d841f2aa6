"""Use case: export series as volumes (NIfTI or NumPy) for ML tools that read no DICOM.

The normalized series are the natural input (uniform grid), but any series
forming one regular volume exports. With ``deidentify`` the headers pass
through the PS3.15 Annex E basic profile before anything is written, since
these files leave the archive.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from archive.catalog.models import Encoding, Instance, InstanceStatus, Series
from archive.dicom.uids import safe_component
from archive.errors import NotFoundError
from archive.kinds import StorageMode, Variant
from archive.normalize.export import VolumeError, series_volume, write_nifti, write_npz
from archive.normalize.export import deidentify as deidentify_datasets
from archive.services.query import resolve_uid
from archive.services.retrieve import instance_part10, variant_filter
from archive.services.runtime import Archive


@dataclass
class ExportedVolume:
    series_uid: str  # as written (replaced when de-identified)
    source_series_uid: str
    path: Path
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"series_uid": self.series_uid, "source_series_uid": self.source_series_uid, "path": str(self.path),
                "shape": list(self.shape), "spacing": list(self.spacing), "notes": self.notes}


def export_series(archive: Archive, uids: Sequence[str], out_dir: Path, *, variant: Variant = Variant.NORMALIZED,
                  file_format: str = "nifti", deidentify: bool = False) -> list[ExportedVolume]:
    """Write one volume per series of the studies (or the series) named; series that are no volume are noted."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[ExportedVolume] = []
    with archive.unit_of_work() as uow:
        series_rows: list[Series] = []
        for uid in uids:
            study, one = resolve_uid(uow.session, uid)
            if one is not None:
                series_rows.append(one)
                continue
            series_rows.extend(uow.session.scalars(
                select(Series).where(Series.study_id == study.id, variant_filter(variant))
                .order_by(Series.series_number, Series.id)))
        if not series_rows:
            raise NotFoundError(f"no {variant.value} series in {', '.join(uids)}")
        for series in series_rows:
            instances = uow.session.scalars(
                select(Instance).where(Instance.series_id == series.id, Instance.status == InstanceStatus.STORED,
                                       Instance.storage_mode != StorageMode.WHOLE)
                .options(selectinload(Instance.encodings).selectinload(Encoding.frames))).all()
            if not instances:
                continue
            datasets: list[Dataset] = [pydicom.dcmread(io.BytesIO(instance_part10(uow, i, "explicit-le")[0])) for i in instances]
            if deidentify:
                datasets = deidentify_datasets(datasets)
            try:
                volume = series_volume(datasets)
            except VolumeError as exc:
                written.append(ExportedVolume(series.series_uid, series.series_uid, out_dir / "-", (), (),
                                              notes=[f"not exported: {exc}"]))
                continue
            name = safe_component(volume.source_uids.series_instance_uid)
            path = out_dir / (f"{name}.nii.gz" if file_format == "nifti" else f"{name}.npz")
            if file_format == "nifti":
                write_nifti(volume, path)
            else:
                write_npz(volume, path)
            written.append(ExportedVolume(volume.source_uids.series_instance_uid, series.series_uid, path,
                                          tuple(volume.data.shape), tuple(float(v) for v in volume.spacing)))
    return written
