"""Storage Commitment Push Model: pynetdicom as the modality, the archive's SCP on a real socket.

The modality sends with dcmtk's storescu, asks for commitment with an
N-ACTION, and takes the N-EVENT-REPORT either on the association it keeps
open or, after releasing it, as the AE the archive knows by address
(``COMMITSCU``) on an association the archive opens.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from archive.kinds import AccessAction
from archive.services.access import list_access
from tests.integration.dimse.conftest import Scp, dcmtk
from tests.synthetic import with_new_uids

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
N_ACTION_RSP, N_EVENT_REPORT_RQ = 0x8130, 0x0100
Report = tuple[int, Dataset, Any]  # event type, event information, the association it came on


def _wait_at_most(scp: Scp, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Configure the SCP's commitment wait for one test (what is never archived fails when it ends)."""
    context = scp.server.context
    monkeypatch.setattr(context, "settings", dataclasses.replace(context.settings, scp_commit_timeout=seconds))


def _request(references: list[tuple[str, str]], transaction_uid: str | None) -> Dataset:
    information = Dataset()
    if transaction_uid is not None:
        information.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        items.append(item)
    information.ReferencedSOPSequence = items
    return information


def _on_report(reports: queue.Queue[Report]) -> Any:
    def handler(event: Any) -> tuple[int, None]:
        reports.put((event.event_type, event.event_information, event.assoc))
        return 0x0000, None
    return handler


def _associate(scp: Scp, calling_ae: str, reports: queue.Queue[Report] | None = None,
               received: list[int] | None = None) -> Any:
    """A modality's association; ``received`` collects the Command Field of each message the SCP sends, in order."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StorageCommitmentPushModel, SYNTAXES)
    handlers: list[Any] = [] if reports is None else [(evt.EVT_N_EVENT_REPORT, _on_report(reports))]
    if received is not None:
        handlers.append((evt.EVT_DIMSE_RECV, lambda event: received.append(event.message.command_set.CommandField)))
    assoc = ae.associate(scp.host, scp.port, ae_title=scp.aet, evt_handlers=handlers)
    assert assoc.is_established
    return assoc


def _ask(assoc: Any, information: Dataset, action_type: int = 1) -> Dataset:
    status: Dataset = assoc.send_n_action(information, action_type, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)[0]
    return status


@contextmanager
def _listening_as(ae_title: str, port: int) -> Iterator[queue.Queue[Report]]:
    """The modality's own SCP for reports on a new association; it accepts the archive's SCP role."""
    reports: queue.Queue[Report] = queue.Queue()
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(StorageCommitmentPushModel, SYNTAXES, scu_role=False, scp_role=True)
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, _on_report(reports))])
    assert server is not None
    try:
        yield reports
    finally:
        server.shutdown()


def _uids(sequence: Any) -> list[str]:
    return [str(item.ReferencedSOPInstanceUID) for item in sequence or []]


def _commit_rows(scp: Scp, transaction_uid: str, *, wait: float = 5.0) -> list[Any]:
    """The access rows of one transaction: the request's (written when its association ends) and the report's."""
    deadline = time.monotonic() + wait
    while True:
        rows = [row for row in list_access(scp.archive, limit=50, action=AccessAction.COMMIT)
                if row.target == transaction_uid]
        if len(rows) >= 2 or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def _archived(scp: Scp, folder: str, count: int) -> list[tuple[str, str]]:
    found = []
    for path in scp.sources(folder)[:count]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return found


def test_stored_instances_are_reported_on_a_new_association_after_release(
        scp: Scp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the unknown instance fails when the wait ends: a short wait keeps the test short
    _wait_at_most(scp, monkeypatch, 4.0)
    study, series = generate_uid(), generate_uid()
    sent: list[tuple[str, str]] = []
    for index, path in enumerate(scp.sources("mr")[:3]):
        ds = with_new_uids(pydicom.dcmread(path), study=study)
        ds.SeriesInstanceUID = series
        ds.save_as(tmp_path / f"{index}.dcm", enforce_file_format=True)
        sent.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    dcmtk("storescu", "-aet", "COMMITSCU", *scp.address(), *(str(tmp_path / f"{i}.dcm") for i in range(3)))
    unknown = (sent[0][0], generate_uid())
    transaction_uid = generate_uid()
    with _listening_as("COMMITSCU", scp.destinations["COMMITSCU"]) as reports:
        assoc = _associate(scp, "COMMITSCU")
        assert _ask(assoc, _request([*sent, unknown], transaction_uid)).Status == 0x0000
        assoc.release()
        event_type, information, on = reports.get(timeout=20)
    assert on is not assoc and on.requestor.ae_title == scp.aet
    assert on.accepted_contexts[0].as_scu and not on.accepted_contexts[0].as_scp  # the archive is the SCP here
    assert event_type == 2 and information.TransactionUID == transaction_uid
    assert _uids(information.ReferencedSOPSequence) == [uid for _, uid in sent]
    assert information.RetrieveAETitle == scp.aet
    (failed,) = information.FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == (unknown[1], 0x0112)
    rows = _commit_rows(scp, transaction_uid)
    assert sorted((row.instances, row.status) for row in rows) == [(0, 0), (3, 0x0112)]
    assert all(row.token_name == "dimse:COMMITSCU" for row in rows)


def test_archived_instances_commit_at_once_on_the_open_association(scp: Scp) -> None:
    archived = _archived(scp, "mr", 2)
    reports: queue.Queue[Report] = queue.Queue()
    transaction_uid = generate_uid()
    received: list[int] = []
    assoc = _associate(scp, "MODALITY7", reports, received)
    try:
        started = time.monotonic()
        assert _ask(assoc, _request(archived, transaction_uid)).Status == 0x0000
        event_type, information, on = reports.get(timeout=10)
        assert time.monotonic() - started < 3  # no waiting: they were archived and verify
        assert on is assoc and assoc.is_established
    finally:
        assoc.release()
    assert received == [N_ACTION_RSP, N_EVENT_REPORT_RQ]  # the answer first, then the report
    assert event_type == 1 and information.TransactionUID == transaction_uid
    assert _uids(information.ReferencedSOPSequence) == [uid for _, uid in archived]
    assert "FailedSOPSequence" not in information
    rows = _commit_rows(scp, transaction_uid)
    assert sorted((row.instances, row.status) for row in rows) == [(0, 0), (2, 0)]


def test_an_instance_archived_under_another_class_fails_with_a_conflict(scp: Scp) -> None:
    (mr,) = _archived(scp, "mr", 1)
    ct_class, ct_instance = _archived(scp, "ct", 1)[0]
    reports: queue.Queue[Report] = queue.Queue()
    assoc = _associate(scp, "MODALITY7", reports)
    try:
        assert _ask(assoc, _request([mr, (mr[0], ct_instance)], generate_uid())).Status == 0x0000
        event_type, information, _ = reports.get(timeout=10)
    finally:
        assoc.release()
    assert ct_class != mr[0]
    assert event_type == 2 and _uids(information.ReferencedSOPSequence) == [mr[1]]
    (failed,) = information.FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == (ct_instance, 0x0119)


def test_malformed_requests_are_refused_at_once(scp: Scp) -> None:
    (mr,) = _archived(scp, "mr", 1)
    assoc = _associate(scp, "MODALITY7")
    try:
        no_transaction = _ask(assoc, _request([mr], None))
        no_references = _ask(assoc, _request([], generate_uid()))
        bad_item = _ask(assoc, _request([(mr[0], "not a uid")], generate_uid()))
        other_action = _ask(assoc, _request([mr], generate_uid()), action_type=2)
    finally:
        assoc.release()
    assert no_transaction.Status == 0x0115 and "Transaction UID" in no_transaction.ErrorComment
    assert no_references.Status == 0x0115 and "Referenced SOP Sequence" in no_references.ErrorComment
    assert bad_item.Status == 0x0115
    assert other_action.Status == 0x0123


def test_a_requester_without_an_address_is_recorded_as_not_reported(
        scp: Scp, monkeypatch: pytest.MonkeyPatch) -> None:
    _wait_at_most(scp, monkeypatch, 0.5)
    (mr,) = _archived(scp, "mr", 1)
    transaction_uid = generate_uid()
    assoc = _associate(scp, "NOWHERE")
    assert _ask(assoc, _request([mr, (mr[0], generate_uid())], transaction_uid)).Status == 0x0000
    assoc.release()
    rows = _commit_rows(scp, transaction_uid)
    assert sorted((row.instances, row.status) for row in rows) == [(0, 0), (1, 0xA801)]
