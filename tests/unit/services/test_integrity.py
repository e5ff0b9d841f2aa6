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


def _age(archive: Archive, digest: str, seconds: float) -> None:
    """Set a blob file's mtime ``seconds`` into the past."""
    then = time.time() - seconds
    os.utime(archive.store.path_for(digest), (then, then))


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


def test_clean_archive_verifies(archive: Archive, tmp_path: Path) -> None:
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm", "MR_small.dcm", "emri_small.dcm")
    sources["twin.dcm"] = _twin(sources["CT_small.dcm"], tmp_path / "twin.dcm")
    ingest_paths(archive, [sources["twin.dcm"]])
    seen: list[tuple[str, bool]] = []
    report = verify_blobs(archive, on_blob=lambda digest, ok: seen.append((digest, ok)))
    assert report.ok and report.problems == [] and report.corrupt_by_study == {}
    referenced = _referenced(archive)
    assert report.blobs_checked == len(referenced) == len(seen)
    assert {d for d, _ in seen} == referenced and all(ok for _, ok in seen)  # a shared blob is read once
    assert report.bytes_checked == sum(archive.store.path_for(d).stat().st_size for d in referenced)
    assert report.as_dict()["bad_blobs"] == 0


def test_verify_names_corrupt_and_missing_blobs_by_study(archive: Archive, tmp_path: Path) -> None:
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm", "MR_small.dcm", "emri_small.dcm")
    _, ct_study, ct_frames, _ = _instance(archive, sources["CT_small.dcm"])
    _, mr_study, _, mr_header = _instance(archive, sources["MR_small.dcm"])
    _, emri_study, _, _ = _instance(archive, sources["emri_small.dcm"])
    path = archive.store.path_for(ct_frames[0])
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    archive.store.path_for(mr_header).unlink()

    seen: dict[str, bool] = {}
    report = verify_blobs(archive, on_blob=seen.__setitem__)
    ct_sop, mr_sop = str(read(sources["CT_small.dcm"]).SOPInstanceUID), str(read(sources["MR_small.dcm"]).SOPInstanceUID)
    assert {(p.study_uid, p.sop_instance_uid, p.digest, p.problem) for p in report.problems} == {
        (ct_study, ct_sop, ct_frames[0], "corrupt"),
        (mr_study, mr_sop, mr_header, "missing"),
    }
    assert set(report.corrupt_by_study) == {ct_study, mr_study}
    assert not report.ok and report.blobs_checked == len(_referenced(archive))
    assert seen[ct_frames[0]] is False and seen[mr_header] is False and sum(seen.values()) == len(seen) - 2

    one = verify_blobs(archive, study_uid=ct_study)
    assert [p.digest for p in one.problems] == [ct_frames[0]]
    assert verify_blobs(archive, study_uid=emri_study).ok
    with pytest.raises(NotFoundError):
        verify_blobs(archive, study_uid="1.2.3.4.no.such.study")


def test_gc_after_recompress_frees_old_blobs_and_keeps_everything_retrievable(archive: Archive,
                                                                              tmp_path: Path) -> None:
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm", "MR_small.dcm", "emri_small.dcm")
    old_frames = {d for p in sources.values() for d in _instance(archive, p)[2]}
    for path in sources.values():
        assert recompress_instance(archive, _instance(archive, path)[0], TO_JPEGXL).outcome == "recompressed"
    assert old_frames <= set(archive.store.digests()) and old_frames <= _blob_rows(archive)  # released, not gone

    kept = collect_garbage(archive, grace_seconds=HOUR)
    assert (kept.blob_rows, kept.files_deleted, kept.bytes_freed) == (0, 0, 0)
    assert old_frames <= set(archive.store.digests())

    dry = collect_garbage(archive, grace_seconds=0, dry_run=True)
    assert dry.dry_run and dry.blob_rows == dry.blob_files == len(old_frames) and set(dry.deleted) == old_frames
    assert old_frames <= set(archive.store.digests()) and old_frames <= _blob_rows(archive)  # dry: nothing gone

    sizes = sum(archive.store.path_for(d).stat().st_size for d in old_frames)
    report = collect_garbage(archive, grace_seconds=0)
    assert report.blob_rows == report.blob_files == len(old_frames) and report.bytes_freed == sizes == dry.bytes_freed
    assert set(report.deleted) == old_frames
    assert not old_frames & set(archive.store.digests()) and not old_frames & _blob_rows(archive)
    assert set(archive.store.digests()) == _referenced(archive) == _blob_rows(archive)
    assert verify_blobs(archive).ok
    _assert_retrieves_exactly(archive, sources, tmp_path / "out")
    assert collect_garbage(archive, grace_seconds=0).files_deleted == 0  # nothing left to do


def test_blob_shared_by_two_instances_stays_while_referenced(archive: Archive, tmp_path: Path) -> None:
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm")
    sources["twin.dcm"] = _twin(sources["CT_small.dcm"], tmp_path / "in" / "twin.dcm")
    ingest_paths(archive, [sources["twin.dcm"]])
    first, _, (shared,), _ = _instance(archive, sources["CT_small.dcm"])
    _, _, twin_frames, _ = _instance(archive, sources["twin.dcm"])
    assert twin_frames == [shared]
    assert recompress_instance(archive, first, TO_JPEGXL).outcome == "recompressed"

    report = collect_garbage(archive, grace_seconds=0)
    assert shared not in report.deleted
    assert archive.store.exists(shared) and shared in _blob_rows(archive)
    _assert_retrieves_exactly(archive, sources, tmp_path / "out")


def test_orphan_file_without_a_row_goes_after_the_grace(archive: Archive, tmp_path: Path) -> None:
    _ingest(archive, tmp_path / "in", "MR_small.dcm")
    orphan = archive.store.put(b"frames of a stage that never committed" * 10)
    assert collect_garbage(archive, grace_seconds=HOUR).orphan_files == 0  # young: a stage may commit it yet
    assert archive.store.exists(orphan)
    _age(archive, orphan, 2 * HOUR)
    dry = collect_garbage(archive, grace_seconds=HOUR, dry_run=True)
    assert (dry.orphan_files, dry.orphan_bytes, dry.deleted) == (1, 380, [orphan])
    assert archive.store.exists(orphan)
    report = collect_garbage(archive, grace_seconds=HOUR)
    assert (report.orphan_files, report.orphan_bytes, report.deleted) == (1, 380, [orphan])
    assert not archive.store.exists(orphan)
    assert set(archive.store.digests()) == _referenced(archive)  # the live blobs stay, however old
    assert verify_blobs(archive).ok


def test_an_old_row_whose_content_was_put_again_keeps_its_file(archive: Archive, tmp_path: Path) -> None:
    """A row unreferenced for longer than the grace loses its row, but a fresh put (new mtime) keeps the file."""
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm", "MR_small.dcm")
    ct, _, (ct_old,), _ = _instance(archive, sources["CT_small.dcm"])
    mr, _, (mr_old,), _ = _instance(archive, sources["MR_small.dcm"])
    for instance_id in (ct, mr):
        recompress_instance(archive, instance_id, TO_JPEGXL)
    long_ago = datetime.now(timezone.utc) - timedelta(hours=2)
    with archive.unit_of_work() as uow:
        uow.session.execute(update(Blob).where(Blob.sha256.in_([ct_old, mr_old])).values(created_at=long_ago))
        uow.commit()
    _age(archive, ct_old, 2 * HOUR)
    _age(archive, mr_old, 2 * HOUR)
    archive.store.put(archive.store.get(mr_old))  # an ingest is about to reference this content again

    report = collect_garbage(archive, grace_seconds=HOUR)
    assert report.blob_rows == 2 and report.deleted == [ct_old] and report.kept_recent == 1
    assert not archive.store.exists(ct_old) and archive.store.exists(mr_old)
    assert not {ct_old, mr_old} & _blob_rows(archive)
    _age(archive, mr_old, 2 * HOUR)  # never referenced after all: now an orphan file
    later = collect_garbage(archive, grace_seconds=HOUR)
    assert (later.orphan_files, later.deleted) == (1, [mr_old])
    _assert_retrieves_exactly(archive, sources, tmp_path / "out")
