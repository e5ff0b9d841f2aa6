"""Verification and garbage collection on a real archive: bad blobs are named, live blobs are never removed.

New blobs live in pack files, so the collector gives space back by compacting
sealed packs (live records copied to a new pack, the old one retired, then
deleted by a later run); blobs of the layout before packs (one loose file
each, catalog row with no pack) keep reading, verifying and being collected.
Time passes through ``now=`` and the grace period, never by sleeping.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select, update

from archive.catalog.models import Blob, EncodedFrame, Encoding, HeaderDictionary, HeaderRevision, Instance
from archive.codecs import get_codec
from archive.config import RecompressPolicy
from archive.errors import BlobNotFoundError, NotFoundError
from archive.services.blobs import blob_refs, read_blob, record_blobs
from archive.services.ingest import Outcome, ingest_paths
from archive.services.integrity import backup_lock, collect_garbage, verify_blobs
from archive.services.recompress import recompress_instance
from archive.services.recording import commit_staged
from archive.services.retrieve import read_frame, retrieve_study
from archive.services.runtime import Archive
from archive.services.staging import StagedInstance, stage_file
from archive.store import BlobRef
from archive.store.packs import PACK_MAGIC, RECORD_HEADER
from tests.dicom_compare import read, stored_values

TO_JPEGXL = RecompressPolicy(name="to-jpegxl", codec={"id": "jpegxl", "effort": 3})
HOUR = 3600.0
AFTER_GRACE = timedelta(hours=1, seconds=1)  # a later run, once a retired pack's grace period has passed


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
    """Every digest something references: frames, headers, header dictionaries."""
    with archive.unit_of_work() as uow:
        return (set(uow.session.scalars(select(EncodedFrame.blob_sha256)))
                | set(uow.session.scalars(select(Instance.header_blob)))
                | {d for d in uow.session.scalars(select(Instance.header_dictionary)) if d is not None}
                | set(uow.session.scalars(select(HeaderDictionary.blob_sha256))))


def _blob_rows(archive: Archive) -> set[str]:
    with archive.unit_of_work() as uow:
        return set(uow.session.scalars(select(Blob.sha256)))


def _refs(archive: Archive, digests: set[str] | list[str]) -> dict[str, BlobRef]:
    with archive.unit_of_work() as uow:
        return blob_refs(uow.session, digests)


def _seal(archive: Archive) -> None:
    """What the end of the writing process does: its pack is made durable and sealed (the next put opens a new one)."""
    archive.store.close()


def _packs_dir(archive: Archive) -> Path:
    return archive.store.packs.root


def _live_packs(archive: Archive) -> dict[str, int]:
    return {info.name: info.size for info in archive.store.packs.packs()}


def _bytes_on_disk(archive: Archive) -> int:
    """Every pack file, live or retired."""
    return sum(p.stat().st_size for p in _packs_dir(archive).iterdir() if p.is_file())


def _records(refs: list[BlobRef]) -> int:
    """What these blobs take in a pack."""
    return sum(RECORD_HEADER + ref.size for ref in refs)


def _flip_byte(path: Path, position: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(position)
        byte = handle.read(1)
        handle.seek(position)
        handle.write(bytes([byte[0] ^ 0x01]))


def _assert_retrieves_exactly(archive: Archive, sources: dict[str, Path], out: Path) -> None:
    """Every study retrieves bit-exactly, and the first and last frames of every instance read alone."""
    by_sop = {str(read(p).SOPInstanceUID): p for p in sources.values()}
    studies = {str(read(p).StudyInstanceUID) for p in sources.values()}
    retrieved = 0
    for study in studies:
        for item in retrieve_study(archive, study, out / study).files:
            source = read(by_sop[item.sop_instance_uid])
            expected = stored_values(source)
            got = stored_values(read(item.path))
            assert got.dtype == expected.dtype and np.array_equal(got, expected), item.sop_instance_uid
            frames = expected if int(source.get("NumberOfFrames", 1) or 1) > 1 else expected[np.newaxis]
            for index in {0, len(frames) - 1}:
                assert np.array_equal(read_frame(archive, item.sop_instance_uid, index), frames[index])
            retrieved += 1
    assert retrieved == len(sources)


# ====================================================================== verification


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
    refs = _refs(archive, referenced)
    assert all(ref.pack is not None for ref in refs.values())  # new blobs are packed
    assert report.bytes_checked == sum(ref.size for ref in refs.values())
    assert report.as_dict()["bad_blobs"] == 0


def test_verify_names_corrupt_and_missing_blobs_by_study(archive: Archive, tmp_path: Path) -> None:
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm", "emri_small.dcm")
    _seal(archive)
    sources |= _ingest(archive, tmp_path / "in", "MR_small.dcm")  # another pack: the one the disk loses
    _seal(archive)
    _, ct_study, ct_frames, _ = _instance(archive, sources["CT_small.dcm"])
    _, mr_study, mr_frames, mr_header = _instance(archive, sources["MR_small.dcm"])
    _, emri_study, _, _ = _instance(archive, sources["emri_small.dcm"])
    refs = _refs(archive, _referenced(archive))
    corrupt = refs[ct_frames[0]]
    assert corrupt.pack is not None and corrupt.offset is not None
    _flip_byte(_packs_dir(archive) / corrupt.pack, corrupt.offset + corrupt.size // 2)  # inside the blob's bytes
    mr_blobs = {mr_header, *mr_frames}
    (mr_pack,) = {refs[d].pack for d in mr_blobs}
    assert {d for d, ref in refs.items() if ref.pack == mr_pack} == mr_blobs
    assert mr_pack is not None
    (_packs_dir(archive) / mr_pack).unlink()

    seen: dict[str, bool] = {}
    report = verify_blobs(archive, on_blob=seen.__setitem__)
    ct_sop, mr_sop = str(read(sources["CT_small.dcm"]).SOPInstanceUID), str(read(sources["MR_small.dcm"]).SOPInstanceUID)
    assert {(p.study_uid, p.sop_instance_uid, p.digest, p.problem) for p in report.problems} == {
        (ct_study, ct_sop, ct_frames[0], "corrupt"),
        *((mr_study, mr_sop, digest, "missing") for digest in mr_blobs),
    }
    assert set(report.corrupt_by_study) == {ct_study, mr_study} and report.bad_blobs == 1 + len(mr_blobs)
    assert not report.ok and report.blobs_checked == len(_referenced(archive))
    assert {d for d, ok in seen.items() if not ok} == {ct_frames[0], *mr_blobs}

    one = verify_blobs(archive, study_uid=ct_study)
    assert [p.digest for p in one.problems] == [ct_frames[0]]
    assert verify_blobs(archive, study_uid=emri_study).ok  # its blobs share the pack of the corrupt one
    with pytest.raises(NotFoundError):
        verify_blobs(archive, study_uid="1.2.3.4.no.such.study")


def test_verify_a_truncated_pack_flags_exactly_the_blobs_past_the_cut(archive: Archive, tmp_path: Path) -> None:
    _ingest(archive, tmp_path / "in", "CT_small.dcm", "MR_small.dcm")
    _seal(archive)
    refs = _refs(archive, _referenced(archive))
    (pack,) = {ref.pack for ref in refs.values()}
    assert pack is not None
    middle = sorted(refs.values(), key=lambda r: r.offset or 0)[len(refs) // 2]
    cut = (middle.offset or 0) + middle.size // 2
    (_packs_dir(archive) / pack).open("r+b").truncate(cut)
    report = verify_blobs(archive)
    assert {p.digest for p in report.problems} == {d for d, r in refs.items() if (r.offset or 0) + r.size > cut}
    assert middle.digest in {p.digest for p in report.problems} and not report.ok
    assert report.bytes_checked == sum(r.size for r in refs.values() if (r.offset or 0) + r.size <= cut)


# ====================================================================== garbage collection of packs


def test_gc_after_recompress_gives_the_space_back_and_keeps_everything_retrievable(
        archive: Archive, tmp_path: Path) -> None:
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm", "MR_small.dcm", "emri_small.dcm")
    _seal(archive)
    old_frames = {d for p in sources.values() for d in _instance(archive, p)[2]}
    headers = {_instance(archive, p)[3] for p in sources.values()}
    (ingest_pack,) = {ref.pack for ref in _refs(archive, _referenced(archive)).values()}
    assert ingest_pack is not None
    ingest_pack_size = _live_packs(archive)[ingest_pack]
    for path in sources.values():
        assert recompress_instance(archive, _instance(archive, path)[0], TO_JPEGXL).outcome == "recompressed"
    _seal(archive)
    assert old_frames <= _blob_rows(archive) and not old_frames & _referenced(archive)  # released, not gone
    old_refs = _refs(archive, old_frames)
    dead = _records(list(old_refs.values()))
    live = _records(list(_refs(archive, headers).values()))
    assert ingest_pack_size == len(PACK_MAGIC) + dead + live  # the ingest pack: headers and the old frames
    before = _bytes_on_disk(archive)

    kept = collect_garbage(archive, grace_seconds=HOUR)
    assert (kept.blob_rows, kept.packs_retired, kept.bytes_freed) == (0, 0, 0)
    assert _bytes_on_disk(archive) == before and old_frames <= _blob_rows(archive)

    dry = collect_garbage(archive, grace_seconds=0, dry_run=True)
    assert dry.dry_run and dry.blob_rows == len(old_frames) and dry.blob_files == 0 and dry.deleted == []
    assert (dry.packs_retired, dry.packs_compacted, dry.pack_bytes_reclaimable) == (1, 1, dead)
    assert old_frames <= _blob_rows(archive) and ingest_pack in _live_packs(archive)  # dry: nothing gone
    assert _bytes_on_disk(archive) == before

    report = collect_garbage(archive, grace_seconds=0)
    assert report.blob_rows == len(old_frames) and report.blob_files == 0 and report.deleted == []
    assert (report.packs_retired, report.packs_compacted) == (1, 1)
    assert report.pack_bytes_reclaimable == dead == dry.pack_bytes_reclaimable
    assert report.pack_bytes_moved == sum(ref.size for ref in _refs(archive, headers).values())
    assert report.pack_bytes_freed == 0  # set aside: a reader may still hold a location in it
    assert not old_frames & _blob_rows(archive) and _referenced(archive) == _blob_rows(archive)
    assert ingest_pack not in _live_packs(archive)
    assert all(ref.pack != ingest_pack for ref in _refs(archive, _referenced(archive)).values())
    for digest, ref in old_refs.items():  # a reader that looked a location up before compaction
        assert archive.store.get(ref) and ref.digest == digest
    assert verify_blobs(archive).ok
    _assert_retrieves_exactly(archive, sources, tmp_path / "out")

    second = collect_garbage(archive, grace_seconds=0)
    assert second.pack_bytes_freed == second.bytes_freed == ingest_pack_size
    assert (second.blob_rows, second.packs_retired) == (0, 0)
    assert before - _bytes_on_disk(archive) == dead  # exactly the released frames and their record headers
    assert archive.store.packs.retired_bytes() == 0
    with pytest.raises(BlobNotFoundError):
        archive.store.get(next(iter(old_refs.values())))
    assert verify_blobs(archive).ok
    _assert_retrieves_exactly(archive, sources, tmp_path / "out-again")
    third = collect_garbage(archive, grace_seconds=0)
    assert (third.blob_rows, third.packs_retired, third.bytes_freed) == (0, 0, 0)  # nothing left to do


def test_blob_shared_by_two_instances_stays_while_referenced(archive: Archive, tmp_path: Path) -> None:
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm")
    sources["twin.dcm"] = _twin(sources["CT_small.dcm"], tmp_path / "in" / "twin.dcm")
    ingest_paths(archive, [sources["twin.dcm"]])
    _seal(archive)
    first, _, (shared,), _ = _instance(archive, sources["CT_small.dcm"])
    _, _, twin_frames, _ = _instance(archive, sources["twin.dcm"])
    assert twin_frames == [shared]
    assert recompress_instance(archive, first, TO_JPEGXL).outcome == "recompressed"
    _seal(archive)

    report = collect_garbage(archive, grace_seconds=0)
    assert report.blob_rows == 0  # the twin still references the shared frame
    assert report.packs_compacted == 1  # its pack held a second, dead copy of it: the live one was moved
    purge = collect_garbage(archive, grace_seconds=0)
    assert purge.pack_bytes_freed > 0
    assert shared in _blob_rows(archive) and archive.store.exists(_refs(archive, [shared])[shared])
    assert verify_blobs(archive).ok
    _assert_retrieves_exactly(archive, sources, tmp_path / "out")


def test_orphan_record_in_a_pack_of_its_own_goes_after_the_grace(archive: Archive, tmp_path: Path) -> None:
    _ingest(archive, tmp_path / "in", "MR_small.dcm")
    _seal(archive)
    live_packs = _live_packs(archive)
    orphan = archive.store.put(b"frames of a stage that never committed" * 10)  # made durable, never recorded
    _seal(archive)  # the stager exited before its rows were committed
    assert orphan.pack is not None and orphan.pack not in live_packs
    orphan_pack_size = len(PACK_MAGIC) + RECORD_HEADER + 380
    assert _live_packs(archive)[orphan.pack] == orphan_pack_size

    young = collect_garbage(archive, grace_seconds=HOUR)  # a stage may commit it yet
    assert (young.packs_retired, young.bytes_freed) == (0, 0) and archive.store.get(orphan)
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    dry = collect_garbage(archive, grace_seconds=HOUR, dry_run=True, now=later)
    assert (dry.packs_retired, dry.packs_compacted, dry.pack_bytes_reclaimable) == (1, 0, orphan_pack_size)
    assert orphan.pack in _live_packs(archive)
    report = collect_garbage(archive, grace_seconds=HOUR, now=later)
    assert (report.packs_retired, report.packs_compacted, report.pack_bytes_moved) == (1, 0, 0)
    assert report.pack_bytes_reclaimable == orphan_pack_size and report.blob_rows == 0
    assert _live_packs(archive) == live_packs  # the live blobs' pack stays, however old
    assert archive.store.get(orphan)  # retired, not yet deleted
    purge = collect_garbage(archive, grace_seconds=HOUR, now=later + AFTER_GRACE)
    assert purge.pack_bytes_freed == purge.bytes_freed == orphan_pack_size
    with pytest.raises(BlobNotFoundError):
        archive.store.get(orphan)
    assert verify_blobs(archive).ok and _live_packs(archive) == live_packs


def test_orphan_record_among_live_ones_is_reclaimed_by_compaction_after_the_grace(
        archive: Archive, tmp_path: Path) -> None:
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm")
    orphan = archive.store.put(bytes(range(256)) * 400)  # a large stage that never committed, same pack
    _seal(archive)
    refs = _refs(archive, _referenced(archive))
    assert {ref.pack for ref in refs.values()} == {orphan.pack}

    assert collect_garbage(archive, grace_seconds=HOUR).packs_retired == 0
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    report = collect_garbage(archive, grace_seconds=HOUR, now=later)
    assert (report.packs_retired, report.packs_compacted) == (1, 1)
    assert report.pack_bytes_reclaimable == RECORD_HEADER + orphan.size
    assert report.pack_bytes_moved == sum(ref.size for ref in refs.values())
    assert collect_garbage(archive, grace_seconds=HOUR, now=later + AFTER_GRACE).pack_bytes_freed > orphan.size
    with pytest.raises(BlobNotFoundError):
        archive.store.get(orphan)
    assert verify_blobs(archive).ok
    _assert_retrieves_exactly(archive, sources, tmp_path / "out")


def test_content_put_again_after_its_old_row_went_keeps_readable(archive: Archive, tmp_path: Path) -> None:
    """An ingest re-stores content whose old row the collector is deleting: its new copy is what the row points at."""
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm", "MR_small.dcm")
    _seal(archive)
    ct, _, (ct_old,), _ = _instance(archive, sources["CT_small.dcm"])
    mr, _, (mr_old,), _ = _instance(archive, sources["MR_small.dcm"])
    for instance_id in (ct, mr):
        assert recompress_instance(archive, instance_id, TO_JPEGXL).outcome == "recompressed"
    _seal(archive)
    assert not {ct_old, mr_old} & _referenced(archive)
    # An ingest of the same MR pixels under another SOP Instance UID: staged (its blobs, the old MR frame
    # content among them, are durable in this process's pack), not yet committed when the collector runs.
    twin = _twin(sources["MR_small.dcm"], tmp_path / "twin.dcm")
    staged = stage_file(archive, twin, get_codec(archive.settings.codec))
    assert isinstance(staged, StagedInstance) and [f.digest for f in staged.frames] == [mr_old]

    later = datetime.now(timezone.utc) + timedelta(hours=2)
    report = collect_garbage(archive, grace_seconds=HOUR, now=later)
    assert report.blob_rows == 2 and not {ct_old, mr_old} & _blob_rows(archive)
    assert (report.packs_retired, report.packs_compacted) == (1, 1)  # the ingest pack: its old frames are dead
    stager_pack = staged.frames[0].pack
    assert stager_pack is not None and stager_pack in _live_packs(archive)  # held by a live writer: untouched
    with archive.store.packs.sealed(stager_pack) as sealed:
        assert sealed is False
    assert archive.store.exists(staged.frames[0])

    with archive.unit_of_work() as uow:  # the ingest commits
        commit_staged(uow, staged, None)
        uow.commit()
    sources["twin.dcm"] = twin
    assert _refs(archive, [mr_old])[mr_old] == staged.frames[0]
    with archive.unit_of_work() as uow:
        assert read_blob(uow.session, archive.store, mr_old) == archive.store.get(staged.frames[0])
    purge = collect_garbage(archive, grace_seconds=HOUR, now=later + AFTER_GRACE)  # the compacted ingest pack goes
    assert purge.pack_bytes_freed > 0 and purge.blob_rows == 0
    assert verify_blobs(archive).ok
    _assert_retrieves_exactly(archive, sources, tmp_path / "out")


def test_a_row_refreshed_by_a_put_again_is_kept(archive: Archive, tmp_path: Path) -> None:
    """The content was put again and its row refreshed before the collector ran: the row and the new copy stay."""
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm")
    _seal(archive)
    ct, _, (ct_old,), _ = _instance(archive, sources["CT_small.dcm"])
    assert recompress_instance(archive, ct, TO_JPEGXL).outcome == "recompressed"
    _seal(archive)
    long_ago = datetime.now(timezone.utc) - timedelta(hours=2)
    with archive.unit_of_work() as uow:
        uow.session.execute(update(Blob).where(Blob.sha256 == ct_old).values(created_at=long_ago))
        uow.commit()
        old_bytes = read_blob(uow.session, archive.store, ct_old)
    again = archive.store.put(old_bytes)
    archive.store.sync()
    with archive.unit_of_work() as uow:
        record_blobs(uow.session, [again])  # restarts the row's grace period, points it at the new copy
        uow.commit()
    report = collect_garbage(archive, grace_seconds=HOUR)
    assert report.blob_rows == 0 and _refs(archive, [ct_old])[ct_old] == again
    assert archive.store.get(again) == old_bytes
    _assert_retrieves_exactly(archive, sources, tmp_path / "out")


# ====================================================================== the layout before packs


def _unpack(archive: Archive) -> dict[str, BlobRef]:
    """Turn every blob into a loose file with a row without a pack: an archive written before packs."""
    loose = archive.store.loose
    refs = _refs(archive, _blob_rows(archive))
    with archive.unit_of_work() as uow:
        for digest, ref in refs.items():
            assert loose.put_digest(archive.store.get(ref)) == digest
            uow.session.execute(update(Blob).where(Blob.sha256 == digest).values(pack=None, offset=None))
        uow.commit()
    return _refs(archive, set(refs))


def test_old_layout_loose_blobs_are_read_verified_and_collected(archive: Archive, tmp_path: Path) -> None:
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm", "MR_small.dcm")
    _seal(archive)
    loose = archive.store.loose
    refs = _unpack(archive)
    assert all(ref.pack is None and ref.offset is None for ref in refs.values())
    assert set(loose.digests()) == set(refs) == _referenced(archive)
    _assert_retrieves_exactly(archive, sources, tmp_path / "out")
    clean = verify_blobs(archive)
    assert clean.ok and clean.bytes_checked == sum(ref.size for ref in refs.values())

    ct, ct_study, (ct_old,), _ = _instance(archive, sources["CT_small.dcm"])
    _, _, (mr_frame,), _ = _instance(archive, sources["MR_small.dcm"])
    data = loose.get(ct_old)
    _flip_byte(loose.path_for(ct_old), refs[ct_old].size // 2)
    bad = verify_blobs(archive)
    assert [(p.study_uid, p.digest, p.problem) for p in bad.problems] == [(ct_study, ct_old, "corrupt")]
    loose.put_digest(data)  # putting the bytes again repairs a corrupt loose file
    assert verify_blobs(archive).ok

    assert recompress_instance(archive, ct, TO_JPEGXL).outcome == "recompressed"  # reads the loose frame
    _seal(archive)
    orphan = loose.put_digest(b"a loose file no row names")
    again = archive.store.put(loose.get(mr_frame))  # MR's frame re-stored, now packed: its loose copy is an orphan
    archive.store.sync()
    with archive.unit_of_work() as uow:
        record_blobs(uow.session, [again])
        uow.commit()

    kept = collect_garbage(archive, grace_seconds=HOUR)
    assert (kept.blob_rows, kept.blob_files, kept.orphan_files, kept.deleted) == (0, 0, 0, [])
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    dry = collect_garbage(archive, grace_seconds=HOUR, dry_run=True, now=later)
    assert (dry.blob_rows, dry.blob_files, dry.orphan_files) == (1, 1, 2)
    assert sorted(dry.deleted) == sorted([ct_old, orphan, mr_frame]) and loose.exists(ct_old)
    report = collect_garbage(archive, grace_seconds=HOUR, now=later)
    assert (report.blob_rows, report.blob_files, report.blob_bytes) == (1, 1, refs[ct_old].size)
    assert report.orphan_files == 2 and sorted(report.deleted) == sorted([ct_old, orphan, mr_frame])
    assert report.packs_retired >= 1  # the pack the ingest wrote first holds nothing live any more
    assert not {ct_old, orphan, mr_frame} & set(loose.digests())
    assert _refs(archive, [mr_frame])[mr_frame] == again
    assert set(loose.digests()) | {mr_frame, *_instance(archive, sources["CT_small.dcm"])[2]} == _referenced(archive)
    assert verify_blobs(archive).ok
    _assert_retrieves_exactly(archive, sources, tmp_path / "out-after-gc")


def test_a_missing_loose_blob_is_reported_and_its_row_collected(archive: Archive, tmp_path: Path) -> None:
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm")
    _seal(archive)
    _unpack(archive)
    _, ct_study, (ct_frame,), _ = _instance(archive, sources["CT_small.dcm"])
    archive.store.loose.delete(ct_frame)
    assert [(p.study_uid, p.digest, p.problem) for p in verify_blobs(archive).problems] == [
        (ct_study, ct_frame, "missing")]
    lost = "ab" * 32
    with archive.unit_of_work() as uow:  # an unreferenced row of the old layout whose file is already gone
        uow.session.add(Blob(sha256=lost, size=3, pack=None, offset=None,
                             created_at=datetime.now(timezone.utc) - timedelta(hours=2)))
        uow.commit()
    report = collect_garbage(archive, grace_seconds=HOUR)
    assert (report.blob_rows, report.missing_files, report.blob_files, report.deleted) == (1, 1, 0, [])
    assert lost not in _blob_rows(archive) and ct_frame in _blob_rows(archive)  # a referenced row stays, lost or not


# ====================================================================== header revisions and the backup lock


def _keep_revision(archive: Archive, instance_id: int, header: bytes) -> str:
    """What a correction does: the previous header kept as a revision (its blob recorded, the instance moved on)."""
    ref = archive.store.put(header)
    archive.store.sync()
    with archive.unit_of_work() as uow:
        record_blobs(uow.session, [ref])
        uow.session.add(HeaderRevision(instance_id=instance_id, revision=1, header_blob=ref.digest,
                                       header_sha256="0" * 64, changes={"PatientID": ["old", "new"]}))
        uow.commit()
    return ref.digest


def test_a_kept_header_revision_is_verified_and_never_collected(archive: Archive, tmp_path: Path) -> None:
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm")
    instance_id, study, _, header = _instance(archive, sources["CT_small.dcm"])
    with archive.unit_of_work() as uow:
        kept = _keep_revision(archive, instance_id, read_blob(uow.session, archive.store, header) + b"previous")
    _seal(archive)
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    report = collect_garbage(archive, grace_seconds=0, now=later)
    assert report.blob_rows == 0 and kept in _blob_rows(archive)
    clean = verify_blobs(archive)
    assert clean.ok and clean.blobs_checked == len(_referenced(archive)) + 1
    ref = _refs(archive, [kept])[kept]
    assert ref.pack is not None and ref.offset is not None
    _flip_byte(_packs_dir(archive) / ref.pack, ref.offset + 1)
    bad = verify_blobs(archive)
    assert [(p.study_uid, p.digest, p.problem) for p in bad.problems] == [(study, kept, "corrupt")]
    assert [p.digest for p in verify_blobs(archive, study_uid=study).problems] == [kept]


def test_gc_leaves_files_and_packs_alone_while_a_backup_holds_the_lock(archive: Archive, tmp_path: Path) -> None:
    sources = _ingest(archive, tmp_path / "in", "CT_small.dcm", "MR_small.dcm")
    _seal(archive)
    ct, _, _, _ = _instance(archive, sources["CT_small.dcm"])
    assert recompress_instance(archive, ct, TO_JPEGXL).outcome == "recompressed"
    _seal(archive)
    packs_before = _live_packs(archive)
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    with backup_lock(archive.settings.home, exclusive=False):  # what `medarchive backup` holds while it copies
        report = collect_garbage(archive, grace_seconds=HOUR, now=later)
        assert report.deferred_for_backup and report.blob_rows == 1  # the released frame's row only
        assert (report.packs_retired, report.pack_bytes_freed) == (0, 0) and _live_packs(archive) == packs_before
    after = collect_garbage(archive, grace_seconds=HOUR, now=later)  # the backup is done: compaction goes on
    assert not after.deferred_for_backup and after.packs_retired >= 1
    assert verify_blobs(archive).ok
    _assert_retrieves_exactly(archive, sources, tmp_path / "out")
