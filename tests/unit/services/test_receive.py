"""Ingest from bytes: each part gets its outcome, nothing a client sent is dropped, the temporary folder goes away."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from sqlalchemy import select

from archive.catalog.models import Job, QuarantineEntry
from archive.config import Settings
from archive.services.outcomes import Outcome
from archive.services.receive import NOT_ARCHIVED, STUDY_MISMATCH, ingest_bytes
from archive.services.runtime import Archive
from tests.synthetic import part10_bytes, with_new_uids


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    opened = Archive.open(Settings.load(environ={}, home=tmp_path / "home", normalize=False), migrate=True)
    yield opened
    opened.close()


def _instance(study: str | None = None) -> Dataset:
    return with_new_uids(pydicom.dcmread(get_testdata_file("CT_small.dcm")), study=study)


def test_each_part_gets_its_outcome_in_order_and_nothing_is_dropped(archive: Archive) -> None:
    ds = _instance()
    png = b"\x89PNG\r\n\x1a\n" + bytes(200)
    parts = [part10_bytes(ds), b"plain text, not DICOM" * 10, part10_bytes(ds), png]
    outcomes = ingest_bytes(archive, parts, origin="test:unit")
    assert [o.index for o in outcomes] == [0, 1, 2, 3]
    # a part sent as application/dicom claims to be DICOM: the reader quarantines what it cannot read,
    # and skips what is plainly something else (a PNG), which is then quarantined here
    assert [o.outcome for o in outcomes] == [Outcome.STORED, Outcome.QUARANTINED, Outcome.DUPLICATE, Outcome.SKIPPED]
    assert (outcomes[0].sop_instance_uid, outcomes[0].study_uid, outcomes[0].series_uid) == (
        ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert outcomes[0].sop_class_uid == ds.SOPClassUID and outcomes[0].succeeded and outcomes[2].succeeded
    assert not outcomes[1].succeeded and outcomes[1].error_type == "InvalidDicomError"
    assert not outcomes[3].succeeded and outcomes[3].error_type == NOT_ARCHIVED
    with archive.unit_of_work() as uow:
        entries = uow.session.execute(select(QuarantineEntry.stored_path, QuarantineEntry.reason)
                                      .order_by(QuarantineEntry.id)).all()
        params = uow.session.scalars(select(Job.params)).one()
    assert [Path(stored).read_bytes() for stored, _ in entries] == [parts[1], png]
    assert all("test:unit" in reason for _, reason in entries)
    assert params["origin"] == "test:unit"
    assert not any((archive.settings.home / "received").iterdir())


def test_a_part_of_another_study_is_quarantined_not_archived(archive: Archive, tmp_path: Path) -> None:
    mine, stray = _instance(), _instance()
    source = tmp_path / "stray.dcm"
    source.write_bytes(part10_bytes(stray))
    outcomes = ingest_bytes(archive, [source], origin="test:unit", study_uid=mine.StudyInstanceUID)
    assert [(o.outcome, o.error_type) for o in outcomes] == [(Outcome.QUARANTINED, STUDY_MISMATCH)]
    assert source.exists()  # a path handed in is copied, never moved
    with archive.unit_of_work() as uow:
        assert uow.session.scalars(select(Job.id)).first() is None  # nothing to ingest: no job
        assert uow.session.scalars(select(QuarantineEntry.error_type)).all() == [STUDY_MISMATCH]
    matching = ingest_bytes(archive, [part10_bytes(_instance(mine.StudyInstanceUID))], origin="t",
                            study_uid=mine.StudyInstanceUID)
    assert [o.outcome for o in matching] == [Outcome.STORED]
