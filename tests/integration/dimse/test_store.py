"""C-STORE from real peers: archived bit-exactly, refused with the right status, robust to bad peers.

dcmtk's storescu sends real CT and MR; pynetdicom sends what storescu cannot
(a mismatched SOP class, an association dropped mid-instance, 8 at once). A
server with other settings (an allow-list, a full disk, a small data set limit)
is a second SCP on the same archive, with its own incoming area and a stable
age long enough that it archives nothing during the test.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from archive.bench_serve_orthanc import free_port
from archive.catalog.models import Instance, QuarantineEntry
from archive.dimse.server import ScpServer
from archive.dimse.store import NOT_UNDERSTOOD
from archive.kinds import AccessAction
from archive.services.access import list_access
from archive.services.retrieve import retrieve_study
from tests.conftest import shared_data
from tests.dicom_compare import header_differences, read, stored_values
from tests.integration.dimse.conftest import Scp, dcmtk, inline_dispatcher
from tests.synthetic import with_new_uids


def archived(scp: Scp, sop_uids: set[str], timeout: float = 60) -> set[str]:
    """Wait until every one of ``sop_uids`` is in the catalog (the SCP's watcher archives stable studies)."""
    deadline = time.monotonic() + timeout
    found: set[str] = set()
    while time.monotonic() < deadline:
        with scp.archive.unit_of_work() as uow:
            found = set(uow.session.scalars(select(Instance.sop_instance_uid)
                                            .where(Instance.sop_instance_uid.in_(sop_uids))))
        if found == sop_uids:
            return found
        time.sleep(0.2)
    return found


def mr_copies(scp: Scp, count: int, study: str | None = None) -> list[Dataset]:
    """``count`` of the fixture's MR instances as a new study (new UIDs), one series."""
    copies = []
    study_uid = study or pydicom.uid.generate_uid()
    series_uid = pydicom.uid.generate_uid()
    for path in scp.sources("mr")[:count]:
        ds = with_new_uids(pydicom.dcmread(path), study=study_uid)
        ds.SeriesInstanceUID = series_uid
        copies.append(ds)
    return copies


@pytest.fixture
def other_scp(scp: Scp, tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Start SCPs with other settings on the same archive: ``start(scp_allow=(...), ...) -> port``."""
    servers: list[ScpServer] = []

    def start(**changes: object) -> int:
        settings = dataclasses.replace(scp.archive.settings, home=tmp_path / f"other-{len(servers)}",
                                       scp_port=free_port(), stable_age=3600.0, **changes)  # type: ignore[arg-type]
        server = ScpServer(scp.archive, inline_dispatcher(scp.archive), settings=settings)
        server.start()
        servers.append(server)
        return server.port

    yield start
    for server in servers:
        server.stop()


def test_storescu_study_is_archived_bit_exactly(scp: Scp, tmp_path: Path) -> None:
    source = shared_data() / "ct-chest-tcia" / "A027284"  # one patient: two studies of three series each
    files = sorted(source.rglob("*.dcm"))
    originals = {read(p).SOPInstanceUID: p for p in files}
    done = dcmtk("storescu", "-aet", "MODALITY", "+sd", "+r", *scp.address(), str(source))
    assert "Failed" not in done.stdout + done.stderr
    assert archived(scp, set(originals)) == set(originals)
    studies = {read(p).StudyInstanceUID for p in files}
    assert len(studies) == 2
    back: dict[str, Path] = {}
    for study in studies:
        report = retrieve_study(scp.archive, study, tmp_path / study)
        back.update({read(f.path).SOPInstanceUID: f.path for f in report.files})
    assert set(back) == set(originals)
    for uid, path in originals.items():
        original, retrieved = read(path), read(back[uid])
        assert np.array_equal(stored_values(original), stored_values(retrieved)), uid
        assert header_differences(original, retrieved) == [], uid
    assert files == sorted(source.rglob("*.dcm")) and all(p.stat().st_size for p in files)  # sources untouched
    rows = list_access(scp.archive, token_name="dimse:MODALITY", action=AccessAction.STORE)
    assert {r.target for r in rows} == studies and sum(r.instances for r in rows) == len(files)


def lying_file(folder: Path, ds: Dataset, sop_class: str, data: bytes | None = None) -> Path:
    """A Part 10 file whose file meta names ``sop_class`` but whose data set is ``ds`` (or ``data``, raw bytes).

    With STORE_SEND_CHUNKED_DATASET, pynetdicom's send_c_store takes the command's Affected SOP Class from a
    file's meta and sends the data set's bytes as they are: what a confused or broken modality would send.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    out = BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(DicomFileLike(out), meta)
    out.write(data if data is not None else (encode(ds, True, True) or b""))
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    path.write_bytes(out.getvalue())
    return path


@pytest.mark.parametrize("case", ["mismatch", "garbage"])
def test_bad_data_sets_are_refused_and_quarantined(scp: Scp, case: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ds = mr_copies(scp, 1)[0]
    syntax = pydicom.uid.ImplicitVRLittleEndian
    ae = AE(ae_title=f"BAD{case.upper()}"[:16])
    ae.add_requested_context(CTImageStorage, syntax)
    # MR bytes under the CT class (0xA900), or two bytes that are no data set at all (0xC210)
    sent = lying_file(tmp_path, ds, CTImageStorage, None if case == "mismatch" else b"\x08\x00")
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes as they are
    assoc = ae.associate(scp.host, scp.port, ae_title=scp.aet)
    assert assoc.is_established
    try:
        status = int(assoc.send_c_store(sent).Status)
    finally:
        assoc.release()
    expected = 0xA900 if case == "mismatch" else 0xC210
    assert status == expected
    with scp.archive.unit_of_work() as uow:
        reasons = list(uow.session.scalars(select(QuarantineEntry.reason)
                                           .where(QuarantineEntry.error_type == NOT_UNDERSTOOD)))
    assert any(ae.ae_title in r and f"0x{expected:04X}" in r for r in reasons), reasons


def test_unknown_calling_ae_is_rejected_at_association(scp: Scp, other_scp: Callable[..., int]) -> None:
    port = other_scp(scp_allow=("TRUSTED", "PINNED@127.0.0.1", "ELSEWHERE@192.0.2.1"))
    address = ["-aec", scp.aet, scp.host, str(port)]
    for caller in ("TRUSTED", "PINNED"):
        dcmtk("echoscu", "-aet", caller, *address)
    for caller in ("STRANGER", "ELSEWHERE"):
        refused = dcmtk("echoscu", "-aet", caller, *address, check=False)
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stdout + refused.stderr, refused.stderr
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rows = list_access(scp.archive, token_name="dimse:STRANGER", action=AccessAction.ASSOCIATE)
        if rows:
            break
        time.sleep(0.1)
    assert rows and rows[0].target.startswith("rejected") and rows[0].client == "127.0.0.1"


def test_full_disk_is_answered_a700(scp: Scp, other_scp: Callable[..., int], tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    port = other_scp(scp_min_free_bytes=free + 10**12)
    source = scp.sources("mr")[0]
    done = dcmtk("storescu", "-v", "-aet", "FULL", "-aec", scp.aet, scp.host, str(port), str(source), check=False)
    assert "Refused: OutOfResources" in done.stdout + done.stderr, done.stdout + done.stderr  # 0xA700
    assert not list((tmp_path / "other-0" / "incoming").rglob("*.dcm"))


def test_dropped_association_keeps_what_was_acknowledged(scp: Scp) -> None:
    copies = mr_copies(scp, 4)
    big = copies[3]
    big.Rows = big.Columns = 2048  # ~8 MB in flight when the connection drops
    big.PixelData = np.zeros((2048, 2048), dtype=np.uint16).tobytes()
    big.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ae = AE(ae_title="DROPPER")
    ae.add_requested_context(MRImageStorage, [pydicom.uid.ExplicitVRLittleEndian,
                                              copies[0].file_meta.TransferSyntaxUID])
    pulling = threading.Event()
    sent_of_big: list[int] = []

    def pull_the_cable(event: Any) -> None:  # EVT_PDU_SENT: 3 PDUs (of ~9: 1 MiB each) into it, the connection drops
        if pulling.is_set() and type(event.pdu).__name__ == "P_DATA_TF":
            sent_of_big.append(1)
            if len(sent_of_big) == 3:
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    assoc = ae.associate(scp.host, scp.port, ae_title=scp.aet, max_pdu=16384,
                         evt_handlers=[(evt.EVT_PDU_SENT, pull_the_cable)])
    assert assoc.is_established
    for ds in copies[:3]:
        assert assoc.send_c_store(ds).Status == 0x0000
    pulling.set()
    assert not assoc.send_c_store(big)  # no answer: the connection went mid-instance
    assert len(sent_of_big) >= 3
    acknowledged = {ds.SOPInstanceUID for ds in copies[:3]}
    assert archived(scp, acknowledged) == acknowledged
    time.sleep(1.0)  # the stable age has passed: nothing more is coming for this study
    assert archived(scp, {big.SOPInstanceUID}, timeout=0.5) == set()
    dcmtk("echoscu", "-aet", "AFTER", *scp.address())  # the server is still there


def test_eight_concurrent_associations_are_served(scp: Scp) -> None:
    study = pydicom.uid.generate_uid()
    batches = [mr_copies(scp, 2, study=study) for _ in range(8)]
    statuses: list[int] = []
    barrier = threading.Barrier(8)

    def send(batch: list[Dataset], n: int) -> None:
        ae = AE(ae_title=f"SENDER{n}")
        ae.add_requested_context(MRImageStorage, batch[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate(scp.host, scp.port, ae_title=scp.aet)
        barrier.wait(10)  # all eight associations are open at once
        statuses.extend(int(assoc.send_c_store(ds).Status) for ds in batch)
        assoc.release()

    threads = [threading.Thread(target=send, args=(batch, n)) for n, batch in enumerate(batches)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [0] * 16
    sent = {ds.SOPInstanceUID for batch in batches for ds in batch}
    assert archived(scp, sent) == sent


def test_malformed_pdu_and_oversized_data_set_close_only_their_association(
        scp: Scp, other_scp: Callable[..., int]) -> None:
    with socket.create_connection((scp.host, scp.port), timeout=10) as raw:
        raw.sendall(b"\x09\x00\x00\x00\x00\x04garbage-not-a-pdu")  # PDU type 9 does not exist
        assert raw.recv(6)[:1] == b"\x07"  # answered with an A-ABORT PDU
    dcmtk("echoscu", "-aet", "AFTERBAD", *scp.address())
    port = other_scp(scp_max_dataset_bytes=200_000)
    ds = mr_copies(scp, 1)[0]
    ds.Rows = ds.Columns = 1024
    ds.PixelData = np.zeros((1024, 1024), dtype=np.uint16).tobytes()  # 2 MB
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ae = AE(ae_title="TOOBIG")
    ae.add_requested_context(MRImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate(scp.host, port, ae_title=scp.aet)
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted and not status, (assoc.is_aborted, status)  # no answer: the association was aborted
    dcmtk("echoscu", "-aet", "AFTERBIG", "-aec", scp.aet, scp.host, str(port))
