"""C-GET and C-MOVE against the real SCP: dcmtk's getscu, movescu and storescp, and pynetdicom as requester.

Every instance that comes back is compared with the file that was ingested:
pixel values bit-exact and every header element outside group 0002.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from archive.dimse.server import ACCEPTED_SYNTAXES
from archive.services.access import list_access
from archive.kinds import AccessAction
from tests.dicom_compare import header_differences, read, stored_values
from tests.integration.dimse.conftest import DERIVED_AE, Scp, dcmtk

def _by_uid(paths: list[Path]) -> dict[str, Dataset]:
    found = {}
    for path in paths:
        ds = read(path)
        found[str(ds.SOPInstanceUID)] = ds
    return found


def _assert_same(original: Dataset, retrieved: Dataset, *, skip_private: bool = False) -> None:
    assert np.array_equal(stored_values(original), stored_values(retrieved)), original.SOPInstanceUID
    differences = header_differences(original, retrieved)
    if skip_private:
        differences = [d for d in differences if not int(d[1:5], 16) % 2]
    assert not differences, differences


def _sources_of_study(scp: Scp, folder: str, study_uid: str) -> dict[str, Dataset]:
    return {uid: ds for uid, ds in _by_uid(scp.sources(folder)).items() if ds.StudyInstanceUID == study_uid}


# --- dcmtk


def test_getscu_study_gives_every_instance_back_bit_exact(scp: Scp, tmp_path: Path) -> None:
    done = dcmtk("getscu", "-v", "-S", "-aet", "GETTER", "-od", str(tmp_path), "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={scp.ct_study_uid}", *scp.address())
    expected = _sources_of_study(scp, "ct", scp.ct_study_uid)
    received = _by_uid(sorted(p for p in tmp_path.iterdir() if p.is_file()))
    assert set(received) == set(expected), done.stdout + done.stderr  # originals only: no derived series
    # getscu proposes the uncompressed syntaxes in one context per class: pynetdicom accepts the first of the
    # SCP's own list that getscu offers, and the instance goes in that (Explicit VR LE is stored, Implicit the rest)
    negotiated = next(s for s in ACCEPTED_SYNTAXES if s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian))
    for uid, original in expected.items():
        assert received[uid].file_meta.TransferSyntaxUID == negotiated
        _assert_same(original, received[uid], skip_private=negotiated == ImplicitVRLittleEndian)
    output = done.stdout + done.stderr
    assert "Received C-GET Response (Success)" in output and "Number of Completed Suboperations : 3" in output


@pytest.fixture
def storescp(scp: Scp, tmp_path: Path) -> Iterator[Path]:
    """dcmtk's storescp listening as MOVEDEST on the port the SCP's configuration names."""
    folder = tmp_path / "moved"
    folder.mkdir()
    port = scp.destinations["MOVEDEST"]
    process = subprocess.Popen(["storescp", "-aet", "MOVEDEST", "-od", str(folder), str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "storescp did not start"
                time.sleep(0.05)
        yield folder
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_movescu_series_reaches_the_configured_destination(scp: Scp, storescp: Path) -> None:
    expected = _by_uid(scp.sources("mr"))
    series_uid = str(next(iter(expected.values())).SeriesInstanceUID)
    done = dcmtk("movescu", "-d", "-S", "-aet", "MOVER", "-aem", "MOVEDEST", "-k", "QueryRetrieveLevel=SERIES",
                 "-k", f"StudyInstanceUID={scp.mr_study_uid}", "-k", f"SeriesInstanceUID={series_uid}",
                 *scp.address())
    responses = [block for block in (done.stdout + done.stderr).split("INCOMING DIMSE MESSAGE") if "C-MOVE RSP" in block]
    completed = [int(re.search(r"Completed Suboperations\s*: (\d+)", block)[1]) for block in responses]  # type: ignore[index]
    assert completed == [*range(1, 9), 8], responses  # a pending response per sub-operation, then the final one
    assert "DIMSE Status                  : 0x0000" in responses[-1]
    assert re.search(r"Failed Suboperations\s*: 0\b", responses[-1])
    received = _by_uid(sorted(storescp.iterdir()))
    assert set(received) == set(expected) and len(expected) == 8
    for uid, original in expected.items():
        assert received[uid].file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # stored, proposed first
        _assert_same(original, received[uid])
    rows = [r for r in list_access(scp.archive, token_name="dimse:MOVER", action=AccessAction.MOVE)
            if r.target == f"{scp.mr_study_uid}/{series_uid} -> MOVEDEST"]
    deadline = time.monotonic() + 5
    while not rows and time.monotonic() < deadline:  # written when the association ends
        time.sleep(0.05)
        rows = [r for r in list_access(scp.archive, token_name="dimse:MOVER", action=AccessAction.MOVE)
                if r.target == f"{scp.mr_study_uid}/{series_uid} -> MOVEDEST"]
    assert rows and rows[0].instances == 8 and rows[0].status == 0 and rows[0].nbytes > 0


# --- pynetdicom as requester


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _get(scp: Scp, identifier: Dataset, storage: dict[str, list[str]],
         model: str = StudyRootQueryRetrieveInformationModelGet) -> tuple[list[Dataset], list[Dataset]]:
    """C-GET with ``storage`` (SOP class -> syntaxes, each class one context with the SCP role)."""
    ae = AE(ae_title="PYGETTER")
    ae.add_requested_context(model)
    for sop_class, syntaxes in storage.items():
        ae.add_requested_context(sop_class, syntaxes)
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    roles: list[Any] = [build_role(sop_class, scp_role=True) for sop_class in storage]
    assoc = ae.associate(scp.host, scp.port, ae_title=scp.aet, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        responses = [status for status, _ in assoc.send_c_get(identifier, model) if status is not None]
    finally:
        assoc.release()
    return received, responses


def test_get_proposing_only_implicit_receives_implicit(scp: Scp) -> None:
    expected = _by_uid(scp.sources("mr"))
    uid, original = next(iter(expected.items()))
    received, responses = _get(scp, _identifier("IMAGE", StudyInstanceUID=scp.mr_study_uid,
                                                SeriesInstanceUID=original.SeriesInstanceUID, SOPInstanceUID=uid),
                               {MRImageStorage: [ImplicitVRLittleEndian]})
    assert [str(ds.SOPInstanceUID) for ds in received] == [uid]  # IMAGE level: that one instance
    assert received[0].file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    _assert_same(original, received[0], skip_private=True)
    final = responses[-1]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 1


def test_get_proposing_only_jpegls_receives_the_stored_codestream(scp: Scp) -> None:
    expected = _by_uid(scp.sources("mr"))
    series_uid = str(next(iter(expected.values())).SeriesInstanceUID)
    received, responses = _get(scp, _identifier("SERIES", SeriesInstanceUID=series_uid),
                               {MRImageStorage: [JPEGLSLossless]})
    assert {str(ds.SOPInstanceUID) for ds in received} == set(expected)
    for ds in received:
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
        _assert_same(expected[str(ds.SOPInstanceUID)], ds)
    pending = [r for r in responses if r.Status == 0xFF00]
    assert [r.NumberOfRemainingSuboperations for r in pending] == list(range(7, -1, -1))
    assert responses[-1].Status == 0x0000 and responses[-1].NumberOfCompletedSuboperations == 8


def test_get_counts_a_sub_operation_the_requester_cannot_receive_as_failed(scp: Scp) -> None:
    ct = _sources_of_study(scp, "ct", scp.ct_study_uid)
    mr = _by_uid(scp.sources("mr"))
    ct_uid, mr_uid = next(iter(ct)), next(iter(mr))
    received, responses = _get(scp, _identifier("IMAGE", SOPInstanceUID=f"{ct_uid}\\{mr_uid}"),
                               {CTImageStorage: [ExplicitVRLittleEndian]})  # no context for MR
    assert [str(ds.SOPInstanceUID) for ds in received] == [ct_uid]
    final = responses[-1]
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 1)


def test_get_patient_root_patient_level_takes_both_studies(scp: Scp) -> None:
    ct = _by_uid(scp.sources("ct"))
    patient_id = str(next(iter(ct.values())).PatientID)
    received, responses = _get(scp, _identifier("PATIENT", PatientID=patient_id),
                               {CTImageStorage: [ExplicitVRLittleEndian]}, PatientRootQueryRetrieveInformationModelGet)
    assert {str(ds.SOPInstanceUID) for ds in received} == set(ct) and len(ct) == 6
    assert responses[-1].Status == 0x0000


def test_unknown_study_is_success_with_no_sub_operations(scp: Scp) -> None:
    received, responses = _get(scp, _identifier("STUDY", StudyInstanceUID="1.2.3.4.5.6.7.8.9"),
                               {CTImageStorage: [ExplicitVRLittleEndian]})
    assert received == []
    assert responses[-1].Status == 0x0000 and responses[-1].NumberOfCompletedSuboperations == 0


def test_identifier_without_its_unique_key_is_refused(scp: Scp) -> None:
    received, responses = _get(scp, _identifier("SERIES", StudyInstanceUID=scp.mr_study_uid),
                               {MRImageStorage: [ExplicitVRLittleEndian]})
    assert received == [] and responses[-1].Status == 0xA900
    assert "SeriesInstanceUID" in responses[-1].ErrorComment


def test_move_to_an_unknown_destination_is_refused(scp: Scp) -> None:
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(scp.host, scp.port, ae_title=scp.aet)
    assert assoc.is_established
    try:
        responses = [status for status, _ in assoc.send_c_move(
            _identifier("STUDY", StudyInstanceUID=scp.ct_study_uid), "NOWHERE",
            StudyRootQueryRetrieveInformationModelMove) if status is not None]
    finally:
        assoc.release()
    assert [r.Status for r in responses] == [0xA801]


def test_get_that_can_send_nothing_fails_every_sub_operation(scp: Scp) -> None:
    mr = _by_uid(scp.sources("mr"))
    series_uid = str(next(iter(mr.values())).SeriesInstanceUID)
    received, responses = _get(scp, _identifier("SERIES", SeriesInstanceUID=series_uid),
                               {CTImageStorage: [ExplicitVRLittleEndian]})
    final = responses[-1]
    assert received == [] and final.Status == 0xA702
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 8)


def test_study_of_a_derived_ae_includes_the_lossy_series(scp: Scp) -> None:
    ae = AE(ae_title=DERIVED_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        return 0x0000

    assoc = ae.associate(scp.host, scp.port, ae_title=scp.aet, ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        responses = [s for s, _ in assoc.send_c_get(_identifier("STUDY", StudyInstanceUID=scp.ct_study_uid),
                                                    StudyRootQueryRetrieveInformationModelGet) if s is not None]
    finally:
        assoc.release()
    assert responses[-1].Status == 0x0000
    originals = set(_sources_of_study(scp, "ct", scp.ct_study_uid))
    derived = [ds for ds in received if str(ds.SOPInstanceUID) not in originals]
    assert originals <= {str(ds.SOPInstanceUID) for ds in received}
    # the normalized series ingest made and the lossy derivative, which only the configured AEs are given
    assert derived and [str(ds.SeriesInstanceUID) for ds in derived].count(scp.lossy_series_uid) == 1


def test_cancel_stops_before_the_next_sub_operation(scp: Scp) -> None:
    mr = _by_uid(scp.sources("mr"))
    series_uid = str(next(iter(mr.values())).SeriesInstanceUID)
    ae = AE(ae_title="CANCELLER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        if not received:  # the C-CANCEL reaches the SCP before this first sub-operation's response
            context = next(cx for cx in event.assoc.accepted_contexts
                           if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelGet)
            event.assoc.send_c_cancel(1, context.context_id)
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    assoc = ae.associate(scp.host, scp.port, ae_title=scp.aet, ext_neg=[build_role(MRImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        responses = [s for s, _ in assoc.send_c_get(_identifier("SERIES", SeriesInstanceUID=series_uid),
                                                    StudyRootQueryRetrieveInformationModelGet, msg_id=1)
                     if s is not None]
    finally:
        assoc.release()
    final = responses[-1]
    assert final.Status == 0xFE00 and len(received) == 1
    assert (final.NumberOfCompletedSuboperations, final.NumberOfRemainingSuboperations) == (1, 7)
