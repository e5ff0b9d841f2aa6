"""Verification and garbage collection on a real archive: bad blobs are named, live blobs are never removed."""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select, update

from archive.catalog.models import Blob, EncodedFrame, Encoding, Instance
from archive.config import RecompressPolicy
from archive.errors import NotFoundError
from archive.services.ingest import Outcome, ingest_paths
from archive.services.integrity import collect_garbage, verify_blobs
from archive.services.recompress import recompress_instance
from archive.services.retrieve import retrieve_study
from archive.services.runtime import Archive
from tests.dicom_compare import read, stored_values

TO_JPEGXL = RecompressPolicy(name="to-jpegxl", codec={"id": "jpegxl", "effort": 3})
HOUR = 3600.0


def _ingest(archive: Archive, folder: Path, *names: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    copies = {}
    for name in names:
        copies[name] = folder / name
        shutil.copyfile(str(get_testdata_file(name)), copies[name])
    report = ingest_paths(archive, list(copies.values()))
    assert all(o.outcome is Outcome.STORED for o in report.outcomes), report.outcomes
    return copies


def _twin(source: Path, target: Path) -> Path:
    """The same pixels under another SOP Instance UID: a second instance sharing the frame blob."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(target)
    return target


def _instance(archive: Archive, path: Path) -> tuple[int, str, list[str], str]:
    """(instance id, study uid, current frame digests, header digest) of an ingested file."""
    sop = str(read(path).SOPInstanceUID)
    with archive.unit_of_work() as uow:
        instance = uow.session.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
        frames = uow.session.scalars(
            select(EncodedFrame.blob_sha256).join(Encoding)
            .where(Encoding.instance_id == instance.id, Encoding.is_current).order_by(EncodedFrame.frame_index)
        ).all()
        return instance.id, instance.series.study.study_uid, list(frames), instance.header_blob


def _referenced(archive: Archive) -> set[str]:
    with archive.unit_of_work() as uow:
        return set(uow.session.scalars(select(EncodedFrame.blob_sha256))) | set(
            uow.session.scalars(select(Instance.header_blob)))


def _blob_rows(archive: Archive) -> set[str]:
    with archive.unit_of_work() as uow:
        return set(uow.session.scalars(select(Blob.sha256)))


def _assert_retrieves_exactly(archive: Archive, sources: dict[str, Path], out: Path) -> None:
    by_sop = {str(read(p).SOPInstanceUID): p for p in sources.values()}
    studies = {str(read(p).StudyInstanceUID) for p in sources.values()}
    retrieved = 0
    for study in studies:
        for item in retrieve_study(archive, study, out / study).files:
            expected = stored_values(read(by_sop[item.sop_instance_uid]))
            got = stored_values(read(item.path))
            assert got.dtype == expected.dtype and np.array_equal(got, expected), item.sop_instance_uid
            retrieved += 1
    assert retrieved == len(sources)


