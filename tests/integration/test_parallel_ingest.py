"""A pool of staging processes archives exactly what one process does; re-sent copies are recognised."""

from __future__ import annotations

import hashlib
import shutil
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian
from sqlalchemy import select

from archive.catalog.models import EncodedFrame, Encoding, HeaderDictionary, Instance, Series, Study
from archive.config import Settings
from archive.dicom.header import header_of
from archive.dicom.reader import read_instance
from archive.services.ingest import FileOutcome, Outcome, ingest_paths
from archive.services.retrieve import retrieve_study
from archive.services.runtime import Archive
from tests.conftest import shared_data
from tests.dicom_compare import header_differences, read, stored_values

PHILIPS = "mr-philips-achieva/1301_Dual-echo_iso"
CT = ("ct-chest-tcia/A002304/axial/19001231-076.dcm", "ct-chest-tcia/A002304/coronal/19001231-076.dcm",
      "ct-chest-tcia/A058062/coronal/19001231-052.dcm")
BROKEN = ("broken/truncated-pixel-data.dcm", "broken/photo.png")


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    """12 Philips MR, 3 CT (two studies), a truncated file and a PNG, copied with their relative paths."""
    data = shared_data()
    names = [f"{PHILIPS}/{n:03d}.dcm" for n in range(1, 13)] + list(CT) + list(BROKEN)
    folder = tmp_path / "inbox"
    for name in names:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / name, target)
    return folder


def _open(home: Path) -> Archive:
    return Archive.open(Settings.load(environ={}, home=home, normalize=False))


@pytest.fixture
def two_archives(tmp_path: Path) -> Iterator[tuple[Archive, Archive]]:
    one, two = _open(tmp_path / "jobs1"), _open(tmp_path / "jobs2")
    yield one, two
    one.close()
    two.close()


def _hashes(folder: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _catalog(archive: Archive) -> list[tuple[Any, ...]]:
    """Every instance with what identifies its content and how it was stored (ids left out)."""
    with archive.unit_of_work() as uow:
        rows = uow.session.execute(
            select(Study.study_uid, Series.series_uid, Instance.sop_instance_uid, Instance.status,
                   Instance.conflict_seq, Instance.storage_mode, Instance.transfer_syntax_uid, Instance.header_sha256,
                   Instance.header_blob, Instance.header_dictionary, Instance.pixel_sha256, Instance.source_path,
                   Instance.source_sha256, Encoding.codec_id, Encoding.kind, Encoding.id)
            .join(Series, Series.id == Instance.series_id).join(Study, Study.id == Series.study_id)
            .join(Encoding, Encoding.instance_id == Instance.id).where(Encoding.is_current)
        ).all()
        catalog = []
        for *columns, encoding_id in rows:
            frames = uow.session.scalars(select(EncodedFrame.blob_sha256).where(EncodedFrame.encoding_id == encoding_id)
                                         .order_by(EncodedFrame.frame_index)).all()
            catalog.append((*columns, tuple(frames)))
        return sorted(catalog, key=lambda row: (row[2], row[4]))


def test_two_staging_processes_archive_what_one_does(inbox: Path, two_archives: tuple[Archive, Archive],
                                                     tmp_path: Path) -> None:
    before = _hashes(inbox)
    reports = []
    for archive, jobs in zip(two_archives, (1, 2)):
        seen: list[FileOutcome] = []
        report = ingest_paths(archive, [inbox], jobs=jobs, on_file=seen.append)
        assert Counter(o.path for o in seen) == Counter(list(before)), f"jobs={jobs}: on_file once per file"
        assert sorted(seen, key=lambda o: o.path) == sorted(report.outcomes, key=lambda o: o.path)
        reports.append(report)
    assert _hashes(inbox) == before, "sources are only read"

    outcomes = [{o.path.relative_to(inbox).as_posix(): (o.outcome, o.reason) for o in r.outcomes} for r in reports]
    assert outcomes[0] == outcomes[1]
    assert Counter(o for o, _ in outcomes[0].values()) == {Outcome.STORED: 15, Outcome.QUARANTINED: 1,
                                                           Outcome.SKIPPED: 1}
    assert outcomes[0]["broken/truncated-pixel-data.dcm"][0] is Outcome.QUARANTINED
    assert outcomes[0]["broken/photo.png"][0] is Outcome.SKIPPED

    catalogs = [_catalog(archive) for archive in two_archives]
    assert len(catalogs[0]) == 15
    assert catalogs[0] == catalogs[1]
    for archive in two_archives:
        with archive.unit_of_work() as uow:
            assert not uow.session.scalars(select(HeaderDictionary)).all(), "12 headers of a kind train nothing"

    studies = reports[0].studies
    assert studies == reports[1].studies and len(studies) == 3
    retrieved: list[dict[str, bytes]] = []
    for n, archive in enumerate(two_archives):
        files: dict[str, bytes] = {}
        for study_uid in sorted(studies):
            for item in retrieve_study(archive, study_uid, tmp_path / f"out{n}").files:
                assert item.source_path is not None
                source, back = read(Path(item.source_path)), read(item.path)
                assert back.SOPInstanceUID == source.SOPInstanceUID
                assert np.array_equal(stored_values(back), stored_values(source)), item.source_path
                assert stored_values(back).dtype == stored_values(source).dtype
                assert not header_differences(source, back), item.source_path
                files[item.source_path] = item.path.read_bytes()
        retrieved.append(files)
    assert len(retrieved[0]) == 15
    assert retrieved[0] == retrieved[1], "the same files given back byte for byte"


def _implicit_copy(source: Path, target: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(source)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(target, implicit_vr=True, little_endian=True, enforce_file_format=True)
    assert read(target).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    return target


def _instance_rows(archive: Archive) -> list[tuple[str, str]]:
    with archive.unit_of_work() as uow:
        return [(r.sop_instance_uid, r.header_sha256) for r in uow.session.execute(
            select(Instance.sop_instance_uid, Instance.header_sha256).order_by(Instance.id))]


def test_implicit_vr_copy_of_an_archived_file_is_a_duplicate(archive: Archive, tmp_path: Path) -> None:
    """The copy's header bytes (hence hash) differ; the canonical re-serialised comparison finds them equal."""
    folder = tmp_path / "in"
    folder.mkdir()
    source = folder / "MR_Explicit_Little_MultiFrame.dcm"
    shutil.copyfile(shared_data() / "misc-barre" / source.name, source)
    copy = _implicit_copy(source, folder / "copy-implicit.dcm")
    assert header_of(read_instance(source)).kept and not header_of(read_instance(copy)).kept

    first = ingest_paths(archive, [source])
    assert [o.outcome for o in first.outcomes] == [Outcome.STORED]
    rows = _instance_rows(archive)
    ((sop, archived_hash),) = rows
    assert header_of(read_instance(copy)).dataset_sha256 != archived_hash, "not decided by the hash alone"

    again = ingest_paths(archive, [copy], jobs=2)
    assert [o.outcome for o in again.outcomes] == [Outcome.DUPLICATE], again.outcomes
    assert _instance_rows(archive) == rows


def test_implicit_vr_copy_in_the_same_batch_is_a_duplicate(sqlite_archive: Archive, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    source = folder / "a-MR_Explicit_Little_MultiFrame.dcm"
    shutil.copyfile(shared_data() / "misc-barre" / "MR_Explicit_Little_MultiFrame.dcm", source)
    _implicit_copy(source, folder / "b-copy-implicit.dcm")
    report = ingest_paths(sqlite_archive, [folder])
    assert [o.outcome for o in report.outcomes] == [Outcome.STORED, Outcome.DUPLICATE], report.outcomes


def test_implicit_vr_copy_with_private_elements_is_a_duplicate(sqlite_archive: Archive, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    source = folder / "001.dcm"
    shutil.copyfile(shared_data() / PHILIPS / source.name, source)
    copy = _implicit_copy(source, folder / "copy-implicit.dcm")
    assert [o.outcome for o in ingest_paths(sqlite_archive, [source]).outcomes] == [Outcome.STORED]
    report = ingest_paths(sqlite_archive, [copy])
    assert [o.outcome for o in report.outcomes] == [Outcome.DUPLICATE], report.outcomes


def test_a_staging_process_that_dies_costs_one_quarantined_file(
    inbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that kills its staging process (the test-only MEDARCHIVE_FAULT_KILL switch stands in for a
    decoder crash) is found by staging the files in flight one at a time; it is quarantined with the reason
    and every other file is archived: no hang, no crash, nothing dropped."""
    poison = f"{PHILIPS}/005.dcm"
    monkeypatch.setenv("MEDARCHIVE_FAULT_KILL", poison)
    archive = _open(tmp_path / "home")
    try:
        report = ingest_paths(archive, [inbox], jobs=2)
        by_name = {str(o.path.relative_to(inbox)): o for o in report.outcomes}
        assert by_name[poison].outcome is Outcome.QUARANTINED
        assert "staging process died" in by_name[poison].reason
        assert len(report.outcomes) == 17 and report.instances == 14  # 12 MR + 3 CT, less the poison one
        assert report.count(Outcome.QUARANTINED) == 2  # and the truncated file, as always
        copies = [p.name for p in archive.settings.quarantine_dir.rglob("*005.dcm")]
        assert copies, "the poison file is kept in quarantine"
        with archive.unit_of_work() as uow:
            assert uow.session.scalar(select(Instance.id).where(Instance.source_path.endswith("005.dcm"))) is None
    finally:
        archive.close()
