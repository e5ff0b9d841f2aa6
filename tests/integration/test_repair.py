"""A flipped byte in a real blob, a lost blob: found by ``verify``, written again from the original files.

Damage is done where it happens on a real disk: a byte of a pack file at the
offset the catalog's ``blobs`` row gives, a loose blob file (the layout before
packs) that is gone. Repair reads the source, encodes it as the instance's
current encoding did and writes what is missing; ``get`` then gives the
original pixels back bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select, update

from archive.catalog.models import AuditEvent, Blob, EncodedFrame, Encoding, Instance
from archive.config import Settings
from archive.kinds import AuditAction, StorageMode
from archive.services.blobs import blob_refs
from archive.services.ingest import Outcome, ingest_paths
from archive.services.integrity import verify_blobs
from archive.services.repair import damaged_blobs, repair_duplicate, repair_from_paths
from archive.services.retrieve import retrieve_study
from archive.services.runtime import Archive
from tests.conftest import shared_data
from tests.dicom_compare import read, stored_values

CT = "ct-chest-tcia"
MISC = ("CT_JPEG70.dcm", "rtstruct.dcm", "MR_Explicit_Little_MultiFrame.dcm")  # passthrough, whole, 16 frames


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    folder = tmp_path / "sources"
    ct = sorted((shared_data() / CT).rglob("*.dcm"))[:3]
    for index, path in enumerate(ct):
        target = folder / "ct" / f"{index}-{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    for name in MISC:
        (folder / "misc").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data() / "misc-barre" / name, folder / "misc" / name)
    return folder


def _ingested(archive: Archive, sources: Path) -> dict[str, Path]:
    report = ingest_paths(archive, [sources])
    assert all(o.outcome is Outcome.STORED for o in report.outcomes), report.outcomes
    return {str(read(path).SOPInstanceUID): path for path in sources.rglob("*.dcm")}


def _instance(archive: Archive, sop: str) -> tuple[int, str, list[str], StorageMode]:
    """(id, header blob, current frame blobs, storage mode) of an archived SOP instance."""
    with archive.unit_of_work() as uow:
        instance = uow.session.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
        frames = uow.session.scalars(select(EncodedFrame.blob_sha256).join(Encoding).where(
            Encoding.instance_id == instance.id, Encoding.is_current).order_by(EncodedFrame.frame_index)).all()
        return instance.id, instance.header_blob, list(frames), instance.storage_mode


def _flip_byte(archive: Archive, digest: str) -> None:
    """Flip one byte in the middle of a blob, in the pack file its catalog row names."""
    with archive.unit_of_work() as uow:
        ref = blob_refs(uow.session, [digest])[digest]
    assert ref.pack is not None and ref.offset is not None
    path = archive.settings.blob_dir / "packs" / ref.pack
    with open(path, "r+b") as handle:
        handle.seek(ref.offset + ref.size // 2)
        byte = handle.read(1)
        handle.seek(ref.offset + ref.size // 2)
        handle.write(bytes([byte[0] ^ 0x5A]))


def _make_loose_and_lose_it(archive: Archive, digest: str) -> None:
    """The blob as an archive before packs held it (a loose file), and then that file gone."""
    with archive.unit_of_work() as uow:
        uow.session.execute(update(Blob).where(Blob.sha256 == digest).values(pack=None, offset=None))
        uow.commit()
    assert not archive.store.loose.path_for(digest).exists()


def _pixels_equal(archive: Archive, study_uid: str, by_sop: dict[str, Path], out: Path) -> int:
    report = retrieve_study(archive, study_uid, out)
    for item in report.files:
        source = read(by_sop[item.sop_instance_uid])
        if "PixelData" in source:
            assert np.array_equal(stored_values(read(item.path)), stored_values(source)), item.sop_instance_uid
    return len(report.files)


def test_flipped_bytes_in_frames_headers_and_whole_objects_are_repaired_from_the_sources(
    sqlite_archive: Archive, sources: Path, tmp_path: Path
) -> None:
    archive = sqlite_archive
    by_sop = _ingested(archive, sources)
    damaged: set[str] = set()
    for sop in by_sop:
        _, header, frames, mode = _instance(archive, sop)
        for digest in ([header] if mode is StorageMode.WHOLE else [header, frames[-1]]):
            _flip_byte(archive, digest)
            damaged.add(digest)
    before = verify_blobs(archive)
    assert {p.digest for p in before.problems} == damaged and {p.problem for p in before.problems} == {"corrupt"}
    with archive.unit_of_work() as uow:
        ids = {sop: _instance(archive, sop)[0] for sop in by_sop}
        assert set(damaged_blobs(uow.session, uow.store, ids.values())) == set(ids.values())

    for sop, path in by_sop.items():
        note = repair_duplicate(archive, path, ids[sop])
        expected = 1 if _instance(archive, sop)[3] is StorageMode.WHOLE else 2
        assert note == f"repaired {expected} blob(s)", (sop, note)
        assert repair_duplicate(archive, path, ids[sop]) is None  # intact now: nothing to do
    assert verify_blobs(archive).ok
    with archive.unit_of_work() as uow:
        audits = uow.session.scalars(select(AuditEvent).where(AuditEvent.action == AuditAction.REPAIR)).all()
        assert sorted(a.target for a in audits) == sorted(by_sop)
        study_uids = {str(read(p).StudyInstanceUID) for p in by_sop.values()}
    files = sum(_pixels_equal(archive, study, by_sop, tmp_path / "out" / str(n)) for n, study in enumerate(study_uids))
    assert files == len(by_sop)
    whole = next(p for p in by_sop.values() if p.name == "rtstruct.dcm")
    retrieved = next((tmp_path / "out").rglob(f"{read(whole).SOPInstanceUID}.dcm"))
    assert pydicom.dcmread(retrieved).ROIContourSequence == read(whole).ROIContourSequence


def test_a_blob_shared_by_two_instances_is_repaired_for_both(sqlite_archive: Archive, sources: Path,
                                                            tmp_path: Path) -> None:
    archive = sqlite_archive
    source = next((sources / "ct").iterdir())
    twin = tmp_path / "twin.dcm"
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(twin)
    assert all(o.outcome is Outcome.STORED for o in ingest_paths(archive, [source, twin]).outcomes)
    first, second = _instance(archive, str(read(source).SOPInstanceUID)), _instance(archive, str(ds.SOPInstanceUID))
    assert first[2] == second[2]  # the same pixels: one frame blob
    _flip_byte(archive, first[2][0])
    assert {p.sop_instance_uid for p in verify_blobs(archive).problems} == {str(read(source).SOPInstanceUID),
                                                                            str(ds.SOPInstanceUID)}
    report = repair_from_paths(archive, [source])  # only the first one's source is at hand
    assert report.blobs_repaired == 1 and verify_blobs(archive).ok


def test_a_codec_whose_output_changed_gets_a_verified_new_generation(sqlite_archive: Archive, sources: Path,
                                                                     tmp_path: Path) -> None:
    """The stored frames cannot be re-made byte for byte (here: zstd where jpegls ran, as after a library upgrade)."""
    archive = sqlite_archive
    by_sop = _ingested(archive, sources / "ct")
    sop, path = next(iter(by_sop.items()))
    instance_id, _, frames, _ = _instance(archive, sop)
    with archive.unit_of_work() as uow:
        uow.session.execute(update(Encoding).where(Encoding.instance_id == instance_id)
                            .values(codec_config={"id": "zstd", "level": 5}))
        uow.commit()
    _flip_byte(archive, frames[0])
    report = repair_from_paths(archive, [sources / "ct"])
    [repair] = report.repaired
    assert repair.new_generation == 2 and repair.replaced == frames and not repair.remaining
    with archive.unit_of_work() as uow:
        encodings = uow.session.scalars(select(Encoding).where(Encoding.instance_id == instance_id)
                                        .order_by(Encoding.generation)).all()
        assert [(e.generation, e.is_current, e.released_at is not None) for e in encodings] == [
            (1, False, True), (2, True, False)]
        assert encodings[1].codec_id == "zstd" and not encodings[0].frames
    assert verify_blobs(archive).ok
    assert _pixels_equal(archive, str(read(path).StudyInstanceUID), by_sop, tmp_path / "out") >= 1


def _medarchive(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDARCHIVE_")}
    env.update(MEDARCHIVE_HOME=str(home), COLUMNS="200", NO_COLOR="1", TERM="dumb")
    return subprocess.run([sys.executable, "-m", "archive.cli", *args], env=env, capture_output=True, text=True,
                          timeout=180, cwd=home.parent)


def test_verify_repair_from_a_folder_repairs_lost_and_corrupt_blobs(sources: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = Settings.load(environ={}, home=home)
    with Archive.open(settings) as archive:
        by_sop = _ingested(archive, sources)
        ct = [sop for sop, path in by_sop.items() if path.parent.name == "ct"]
        _flip_byte(archive, _instance(archive, ct[0])[2][0])  # a corrupt frame in a pack
        _make_loose_and_lose_it(archive, _instance(archive, ct[1])[1])  # a lost loose header
        multiframe = next(sop for sop, path in by_sop.items() if "MultiFrame" in path.name)
        _flip_byte(archive, _instance(archive, multiframe)[2][7])
    damaged = _medarchive(home, "verify")
    assert damaged.returncode == 1 and "3 missing or corrupt" in damaged.stdout
    repaired = _medarchive(home, "verify", "--repair-from", str(sources), "--json")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    result = json.loads(repaired.stdout)
    assert result["ok"] and result["repair"]["blobs_repaired"] == 3 and result["after"]["bad_blobs"] == 0
    out = tmp_path / "got"
    got = _medarchive(home, "get", str(read(by_sop[multiframe]).StudyInstanceUID), "--out", str(out))
    assert got.returncode == 0, got.stderr
    retrieved = next(out.rglob(f"{multiframe}.dcm"))
    assert np.array_equal(stored_values(read(retrieved)), stored_values(read(by_sop[multiframe])))
    with Archive.open(settings) as archive:
        for n, sop in enumerate(ct[:2]):
            assert _pixels_equal(archive, str(read(by_sop[sop]).StudyInstanceUID), by_sop, tmp_path / f"ct{n}")


def test_a_source_that_is_not_at_hand_leaves_the_damage_reported(tmp_path: Path, sources: Path) -> None:
    home = tmp_path / "home"
    with Archive.open(Settings.load(environ={}, home=home)) as archive:
        by_sop = _ingested(archive, sources / "ct")
        _flip_byte(archive, _instance(archive, next(iter(by_sop)))[2][0])
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(sources / "misc", elsewhere)
    result = _medarchive(home, "verify", "--repair-from", str(elsewhere))
    assert result.returncode == 1 and "Still missing or corrupt" in result.stdout
    assert "0 blob(s) of 0 instance(s)" in result.stdout


def test_ingesting_the_source_again_repairs_its_corrupt_blob(sqlite_archive: Archive, sources: Path) -> None:
    archive = sqlite_archive
    by_sop = _ingested(archive, sources / "ct")
    sop, path = next(iter(by_sop.items()))
    _flip_byte(archive, _instance(archive, sop)[2][0])
    assert not verify_blobs(archive).ok
    again = ingest_paths(archive, [path])
    assert [o.outcome for o in again.outcomes] == [Outcome.DUPLICATE]
    assert verify_blobs(archive).ok
