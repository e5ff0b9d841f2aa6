"""Which referenced instances the archive commits, and the reason for each one it does not (no network here).

A real archive with pydicom's MR_small and CT_small ingested; damage is done
to the stored bytes themselves (a flipped byte in the pack), and quarantine
entries come from the real quarantine service.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from archive.catalog.models import EncodedFrame, Encoding, Instance
from archive.services.blobs import blob_refs
from archive.services.commitment import (
    FailureReason,
    Reference,
    assess,
    await_commitment,
)
from archive.services.ingest import Outcome, ingest_paths
from archive.services.quarantine import quarantine_file
from archive.services.runtime import Archive


def _ingested(archive: Archive, folder: Path, name: str) -> Reference:
    folder.mkdir(parents=True, exist_ok=True)
    path = Path(shutil.copyfile(str(get_testdata_file(name)), folder / name))
    report = ingest_paths(archive, [path])
    assert [o.outcome for o in report.outcomes] == [Outcome.STORED]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Reference(str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def _flip_a_frame_byte(archive: Archive, sop_instance_uid: str) -> None:
    archive.store.close()  # seal the pack, as the end of the writing process does
    with archive.unit_of_work() as uow:
        digest = uow.session.scalars(
            select(EncodedFrame.blob_sha256).join(Encoding).join(Instance, Instance.id == Encoding.instance_id)
            .where(Instance.sop_instance_uid == sop_instance_uid)).first()
        assert digest is not None
        ref = blob_refs(uow.session, [digest])[digest]
    assert ref.pack is not None and ref.offset is not None
    with open(archive.store.packs.root / ref.pack, "r+b") as handle:
        handle.seek(ref.offset + ref.size // 2)
        byte = handle.read(1)
        handle.seek(ref.offset + ref.size // 2)
        handle.write(bytes([byte[0] ^ 0x01]))


def test_archived_instances_commit_and_unknown_ones_stay_pending(archive: Archive, tmp_path: Path) -> None:
    mr = _ingested(archive, tmp_path / "in", "MR_small.dcm")
    ct = _ingested(archive, tmp_path / "in", "CT_small.dcm")
    unknown = Reference(mr.sop_class_uid, generate_uid())
    verdict = assess(archive, [ct, unknown, mr, ct])
    assert verdict.committed == [ct, mr] and verdict.failed == [] and verdict.pending == [unknown]
    assert not verdict.settled


def test_another_sop_class_is_a_conflict(archive: Archive, tmp_path: Path) -> None:
    mr = _ingested(archive, tmp_path / "in", "MR_small.dcm")
    ct = _ingested(archive, tmp_path / "in", "CT_small.dcm")
    as_ct = Reference(ct.sop_class_uid, mr.sop_instance_uid)
    verdict = assess(archive, [as_ct])
    assert [(f.reference, f.reason) for f in verdict.failed] == [(as_ct, FailureReason.CLASS_INSTANCE_CONFLICT)]
    assert mr.sop_class_uid in verdict.failed[0].detail and verdict.committed == []


def test_an_instance_whose_stored_bytes_fail_verification_is_not_committed(archive: Archive, tmp_path: Path) -> None:
    mr = _ingested(archive, tmp_path / "in", "MR_small.dcm")
    ct = _ingested(archive, tmp_path / "in", "CT_small.dcm")
    assert assess(archive, [mr]).committed == [mr]
    _flip_a_frame_byte(archive, mr.sop_instance_uid)
    verdict = assess(archive, [mr, ct])
    assert verdict.committed == [ct]
    (failed,) = verdict.failed
    assert (failed.reference, failed.reason) == (mr, FailureReason.PROCESSING_FAILURE)
    assert "corrupt" in failed.detail


def test_a_quarantined_c_store_arrival_fails_without_waiting(archive: Archive, tmp_path: Path) -> None:
    sop_instance_uid = generate_uid()
    spooled = tmp_path / "spool" / "job-1" / "1.2.3" / f"{sop_instance_uid}.dcm"  # the name C-STORE gives it
    spooled.parent.mkdir(parents=True)
    spooled.write_bytes(Path(str(get_testdata_file("MR_small.dcm"))).read_bytes()[:2000])
    quarantine_file(archive, spooled, "truncated pixel data", "InvalidDicomError")
    reference = Reference("1.2.840.10008.5.1.4.1.1.4", sop_instance_uid)
    verdict = await_commitment(archive, [reference], timeout=30)
    assert [(f.reference, f.reason) for f in verdict.failed] == [(reference, FailureReason.PROCESSING_FAILURE)]
    assert "InvalidDicomError" in verdict.failed[0].detail


def test_the_wait_sees_a_late_arrival_and_fails_what_never_comes(archive: Archive, tmp_path: Path) -> None:
    source = Path(str(get_testdata_file("MR_small.dcm")))
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    late = Reference(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    never = Reference(late.sop_class_uid, generate_uid())
    arrival = threading.Timer(0.6, _ingested, args=(archive, tmp_path / "late", "MR_small.dcm"))
    arrival.start()
    try:
        verdict = await_commitment(archive, [never, late], timeout=1.5)
    finally:
        arrival.join()
    assert verdict.committed == [late]
    assert [(f.reference, f.reason) for f in verdict.failed] == [(never, FailureReason.NO_SUCH_OBJECT_INSTANCE)]
    assert verdict.settled
