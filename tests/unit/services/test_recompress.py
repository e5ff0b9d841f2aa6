"""Re-compression on real files: bit-exact, a new generation, idempotent, never on wrong pixels."""

from __future__ import annotations

import shutil
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import func, select, update

from archive.catalog.models import Blob, EncodedFrame, Encoding, Instance, Series, Study
from archive.codecs import decode_frame
from archive.config import RecompressPolicy
from archive.errors import BlobCorruptError
from archive.services.ingest import Outcome, ingest_paths
from archive.services.recompress import plan, recompress_instance, select_candidates
from archive.services.retrieve import read_frame
from archive.services.runtime import Archive
from tests.conftest import shared_data
from tests.dicom_compare import read, stored_values

JPEGXL = {"id": "jpegxl", "effort": 3}  # effort 7 is the production default, too slow for unit tests
TO_JPEGXL = RecompressPolicy(name="to-jpegxl", codec=JPEGXL)
# pydicom's bundled files: CT 2004-01-19, MR 2004-08-26, MR 2000-01-01 (10 frames), NM JPEG lossy (passthrough)
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "JPEG-lossy.dcm")


def _ingest(archive: Archive, folder: Path, sources: list[Path], codec: dict[str, Any] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for source in sources:
        target = folder / f"{source.parent.name}-{source.name}"
        shutil.copyfile(source, target)
        copies.append(target)
    report = ingest_paths(archive, copies, codec_config=codec)
    assert all(o.outcome is Outcome.STORED for o in report.outcomes), report.outcomes
    return copies


def _pydicom(*names: str) -> list[Path]:
    return [Path(str(get_testdata_file(name))) for name in names]


def _instance_ids(archive: Archive) -> dict[str, int]:
    """Instance id by the file name it was ingested from."""
    with archive.unit_of_work() as uow:
        rows = uow.session.execute(select(Instance.source_path, Instance.id)).all()
    return {Path(path or "").name.split("-", 1)[-1]: instance_id for path, instance_id in rows}


def _encodings(archive: Archive, instance_id: int) -> list[Encoding]:
    with archive.unit_of_work() as uow:
        rows = uow.session.scalars(
            select(Encoding).where(Encoding.instance_id == instance_id).order_by(Encoding.generation)
        ).all()
        for row in rows:
            _ = row.frames  # loaded while the session is open
        uow.session.expunge_all()  # keep the loaded values: leaving the unit of work rolls back (expires)
        return list(rows)


def _candidates(archive: Archive, policy: RecompressPolicy, **kwargs: Any) -> list[int]:
    kwargs.setdefault("limit", None)
    with archive.unit_of_work() as uow:
        return select_candidates(uow.session, policy, **kwargs)


def test_jpegls_to_jpegxl_is_bit_exact_and_adds_a_generation(archive: Archive, tmp_path: Path) -> None:
    ct = shared_data() / "ct-chest-tcia" / "A002304" / "axial"
    sources = [ct / "19001231-076.dcm", ct / "19010112-135.dcm", *_pydicom("emri_small.dcm")]  # 512² CT, 10 frames
    copies = _ingest(archive, tmp_path / "in", sources)
    with archive.unit_of_work() as uow:
        studies_before = {s.id: s.bytes_stored for s in uow.session.scalars(select(Study))}
        header_bytes = {
            s: uow.session.scalar(
                select(func.sum(Blob.size)).join(Instance, Instance.header_blob == Blob.sha256)
                .join(Series).where(Series.study_id == s)
            ) for s in studies_before
        }
    candidates = _candidates(archive, TO_JPEGXL)
    assert len(candidates) == 3

    results = [recompress_instance(archive, i, TO_JPEGXL) for i in candidates]
    assert [r.outcome for r in results] == ["recompressed"] * 3
    for result in results:
        old, new = _encodings(archive, result.instance_id)
        assert (old.generation, old.is_current, new.generation, new.is_current) == (1, False, 2, True)
        assert new.derived_from_id == old.id
        assert old.released_at is not None and old.frames == []  # released: the GC frees its blobs
        assert new.codec_config == JPEGXL and new.kind == "lossless" and new.max_abs_error == 0
        assert new.actual_codecs == {"jpegxl": new.num_frames} and len(new.frames) == new.num_frames
        assert new.bytes_before == old.bytes_before and result.bytes_after == new.bytes_after
        assert result.bytes_before == old.bytes_after
        assert new.side_info["modality"] == old.side_info["modality"]

    with archive.unit_of_work() as uow:  # every frame reads back as the source file's stored values
        for copy in copies:
            source = read(copy)
            expected = stored_values(source)
            frames = expected if int(source.get("NumberOfFrames", 1)) > 1 else expected[None]
            for index, frame in enumerate(frames):
                got = read_frame(archive, str(source.SOPInstanceUID), index)
                assert got.dtype == frame.dtype and np.array_equal(got, frame), (copy.name, index)
        for result in results:  # study totals follow the new generation
            study = uow.session.get_one(Study, result.study_id)
            current = uow.session.scalars(
                select(Encoding).join(Instance).join(Series).where(Encoding.is_current, Series.study_id == study.id)
            ).all()
            assert study.bytes_stored == header_bytes[study.id] + sum(e.bytes_after for e in current)
            assert study.bytes_stored != studies_before[study.id]

    again = [recompress_instance(archive, i, TO_JPEGXL) for i in candidates]  # a redelivered task
    assert [r.outcome for r in again] == ["unchanged"] * 3
    assert all(len(_encodings(archive, i)) == 2 for i in candidates)
    assert _candidates(archive, TO_JPEGXL) == []


def test_candidates_follow_the_policy(archive: Archive, tmp_path: Path) -> None:
    _ingest(archive, tmp_path / "a", _pydicom("CT_small.dcm", "emri_small.dcm", "JPEG-lossy.dcm"))
    _ingest(archive, tmp_path / "b", _pydicom("MR_small.dcm"), codec={"id": "htj2k"})
    ids = _instance_ids(archive)
    ct, mr, emri, lossy = ids["CT_small.dcm"], ids["MR_small.dcm"], ids["emri_small.dcm"], ids["JPEG-lossy.dcm"]

    assert _candidates(archive, TO_JPEGXL) == sorted([ct, mr, emri])  # the passthrough JPEG never
    assert lossy not in _candidates(archive, RecompressPolicy("p", JPEGXL, modalities=("CT",)))
    assert _candidates(archive, RecompressPolicy("p", JPEGXL, modalities=("MR",))) == sorted([mr, emri])
    assert _candidates(archive, RecompressPolicy("p", JPEGXL, modalities=("CT", "NM"))) == [ct]
    assert _candidates(archive, RecompressPolicy("p", JPEGXL, from_codecs=("jpegls",))) == sorted([ct, emri])
    assert _candidates(archive, RecompressPolicy("p", JPEGXL, from_codecs=("htj2k",))) == [mr]
    assert _candidates(archive, RecompressPolicy("p", {"id": "htj2k"})) == sorted([ct, emri])  # already there
    assert _candidates(archive, RecompressPolicy("p", JPEGXL, study_date_before="20040201")) == sorted([ct, emri])
    assert _candidates(archive, RecompressPolicy("p", JPEGXL, study_date_before="20000101")) == []
    assert _candidates(archive, TO_JPEGXL, exclude={ct}) == sorted([mr, emri])
    assert _candidates(archive, TO_JPEGXL, limit=2) == sorted([ct, mr, emri])[:2]
    assert _candidates(archive, TO_JPEGXL, limit=0) == []
    assert _candidates(archive, TO_JPEGXL, limit=1, exclude={min(ct, mr, emri)}) == [sorted([ct, mr, emri])[1]]

    aged = RecompressPolicy("p", JPEGXL, archived_before_days=30)
    now = datetime.now(timezone.utc)
    assert _candidates(archive, aged) == []  # archived just now
    assert _candidates(archive, aged, now=now + timedelta(days=31)) == sorted([ct, mr, emri])
    assert _candidates(archive, aged, now=(now + timedelta(days=31)).replace(tzinfo=None)) == sorted([ct, mr, emri])
    with archive.unit_of_work() as uow:
        uow.session.execute(update(Instance).where(Instance.id == mr).values(created_at=now - timedelta(days=40)))
        uow.commit()
    assert _candidates(archive, aged) == [mr]

    with archive.unit_of_work() as uow:
        dry = plan(uow.session, TO_JPEGXL)
        stored = uow.session.scalar(select(func.sum(Encoding.bytes_after)).where(
            Encoding.is_current, Encoding.instance_id.in_([ct, mr, emri])))
    assert (dry.instances, dry.studies, dry.bytes_stored) == (3, 3, stored)
    assert dry.by_codec == {"jpegls": 2, "htj2k": 1} and dry.by_modality == {"CT": 1, "MR": 2}
    assert dry.target == JPEGXL and dry.as_dict()["instances"] == 3


def test_target_defaults_are_filled_in_before_comparing(archive: Archive, tmp_path: Path) -> None:
    _ingest(archive, tmp_path / "in", _pydicom("MR_small.dcm"), codec={"id": "jpegxl", "effort": 7})
    (mr,) = _instance_ids(archive).values()
    default = RecompressPolicy("p", {"id": "jpegxl"})  # effort 7 by default: the same configuration
    assert _candidates(archive, default) == []
    result = recompress_instance(archive, mr, default)
    assert result.outcome == "unchanged" and len(_encodings(archive, mr)) == 1
    assert _candidates(archive, TO_JPEGXL) == [mr]


def test_lossy_current_encoding_is_never_a_candidate(archive: Archive, tmp_path: Path) -> None:
    _ingest(archive, tmp_path / "in", _pydicom("CT_small.dcm", "MR_small.dcm"))
    ids = _instance_ids(archive)
    with archive.unit_of_work() as uow:  # as a lossy generation would record it
        uow.session.execute(update(Encoding).where(Encoding.instance_id == ids["MR_small.dcm"]).values(kind="lossy"))
        uow.commit()
    assert _candidates(archive, TO_JPEGXL) == [ids["CT_small.dcm"]]
    result = recompress_instance(archive, ids["MR_small.dcm"], TO_JPEGXL)
    assert result.outcome == "skipped" and "lossy" in result.reason
    assert len(_encodings(archive, ids["MR_small.dcm"])) == 1
    assert recompress_instance(archive, ids["CT_small.dcm"], RecompressPolicy("p", JPEGXL, from_codecs=("htj2k",))
                               ).outcome == "skipped"


def _catalog_state(archive: Archive) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], int]:
    with archive.unit_of_work() as uow:
        encodings = uow.session.execute(
            select(Encoding.id, Encoding.generation, Encoding.is_current, Encoding.released_at).order_by(Encoding.id)
        ).all()
        frames = uow.session.execute(
            select(EncodedFrame.encoding_id, EncodedFrame.frame_index, EncodedFrame.blob_sha256)
            .order_by(EncodedFrame.encoding_id, EncodedFrame.frame_index)
        ).all()
        blobs = uow.session.scalar(select(func.count()).select_from(Blob)) or 0
    return list(encodings), list(frames), blobs


def test_corrupt_old_blob_is_an_error_and_changes_nothing(archive: Archive, tmp_path: Path) -> None:
    _ingest(archive, tmp_path / "in", _pydicom("CT_small.dcm"))
    (ct,) = _instance_ids(archive).values()
    (old,) = _encodings(archive, ct)
    from archive.services.blobs import blob_refs

    digest = old.frames[0].blob_sha256
    with archive.unit_of_work() as uow:
        ref = blob_refs(uow.session, [digest])[digest]
    assert ref.pack is not None and ref.offset is not None
    with open(archive.store.packs.root / ref.pack, "r+b") as handle:  # one bit flipped inside the blob's bytes
        handle.seek(ref.offset + ref.size // 2)
        byte = handle.read(1)[0]
        handle.seek(ref.offset + ref.size // 2)
        handle.write(bytes([byte ^ 0x40]))
    before = _catalog_state(archive)
    packs_before = archive.store.packs.packs()
    with pytest.raises(BlobCorruptError):
        recompress_instance(archive, ct, TO_JPEGXL)
    assert _catalog_state(archive) == before
    assert archive.store.packs.packs() == packs_before  # nothing encoded, nothing written
    assert _encodings(archive, ct)[0].is_current


def test_pixels_that_differ_from_the_archived_hash_are_never_re_encoded(archive: Archive, tmp_path: Path) -> None:
    """Intact blobs whose pixels are not those hashed at ingest (a catalog mix-up): refuse, change nothing."""
    _ingest(archive, tmp_path / "in", _pydicom("CT_small.dcm"))
    (ct,) = _instance_ids(archive).values()
    with archive.unit_of_work() as uow:
        uow.session.execute(update(Instance).where(Instance.id == ct).values(pixel_sha256="0" * 64))
        uow.commit()
    before = _catalog_state(archive)
    with pytest.raises(BlobCorruptError, match="differ"):
        recompress_instance(archive, ct, TO_JPEGXL)
    assert _catalog_state(archive) == before


def test_concurrent_runs_on_one_instance_add_one_generation(archive: Archive, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _ingest(archive, tmp_path / "in", _pydicom("CT_small.dcm"))
    (ct,) = _instance_ids(archive).values()
    barrier = threading.Barrier(2, timeout=30)
    real_put = archive.store.put
    from archive.services.blobs import read_blob
    from archive.store import BlobRef

    def put_after_both_encoded(data: bytes) -> BlobRef:  # both runs have passed their candidate check
        barrier.wait()
        return real_put(data)

    monkeypatch.setattr(archive.store, "put", put_after_both_encoded)
    outcomes: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outcomes.append(recompress_instance(archive, ct, TO_JPEGXL).outcome)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert sorted(outcomes) == ["recompressed", "unchanged"]
    encodings = _encodings(archive, ct)
    assert [(e.generation, e.is_current) for e in encodings] == [(1, False), (2, True)]
    assert encodings[0].frames == [] and encodings[1].derived_from_id == encodings[0].id
    (item,) = encodings[1].frames
    with archive.unit_of_work() as uow:
        assert decode_frame(read_blob(uow.session, archive.store, item.blob_sha256)).shape == (128, 128)


def test_release_left_undone_is_finished_by_a_redelivery(archive: Archive, tmp_path: Path) -> None:
    """A run that committed its generation but stopped before releasing the old one: the next run releases it."""
    _ingest(archive, tmp_path / "in", _pydicom("MR_small.dcm"))
    (mr,) = _instance_ids(archive).values()
    first_frames = [(f.frame_index, f.blob_sha256, f.nbytes) for f in _encodings(archive, mr)[0].frames]
    assert recompress_instance(archive, mr, TO_JPEGXL).outcome == "recompressed"
    old, _new = _encodings(archive, mr)
    with archive.unit_of_work() as uow:  # put the old generation back as an interrupted run leaves it
        uow.session.execute(update(Encoding).where(Encoding.id == old.id).values(released_at=None))
        uow.session.add_all(EncodedFrame(encoding_id=old.id, frame_index=i, blob_sha256=d, nbytes=n)
                            for i, d, n in first_frames)
        uow.commit()
    assert len(_encodings(archive, mr)[0].frames) == 1
    assert recompress_instance(archive, mr, TO_JPEGXL).outcome == "unchanged"
    old, _new = _encodings(archive, mr)
    assert old.frames == [] and old.released_at is not None
