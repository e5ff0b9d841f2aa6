"""Storage Commitment Push Model SCP: commit only what is archived and verified, report the rest with a reason.

The N-ACTION (Request Storage Commitment) is answered at once; the verdict
comes later in an N-EVENT-REPORT, because what a modality just C-STOREd waits
in the incoming area until its study is stable and the workers archive it.
A thread per request waits for that (:func:`archive.services.commitment.
await_commitment`, up to ``scp_commit_timeout``), then reports on the
requesting association while it is still open, after the N-ACTION response
has left, or else on a new association to the requester's AE title as
configured in ``scp_destinations``, proposing the SCP role (PS3.4 J.3.3).

The access log gets the request on the association's row and one more row
for the report (target: the Transaction UID, instances: how many were
committed) with the status: 0 all committed, the first failure's reason
(0x0110, 0x0112, 0x0119) when some were not, 0xA801 when the requester's AE
has no configured address, 0xC000 when the report could not be delivered,
or the failure status the peer answered to it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from archive.dimse.context import ScpContext
from archive.dimse.store import UID_PATTERN, failure
from archive.kinds import AccessAction
from archive.services.access import record_access
from archive.services.commitment import Commitment, Reference, await_commitment

log = logging.getLogger(__name__)

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"  # the Storage Commitment Push Model SOP Instance (PS3.4 J.3.5)
REQUEST_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type IDs of the report
SUCCESS = 0x0000
NO_SUCH_SOP_INSTANCE = 0x0112
INVALID_ARGUMENT = 0x0115  # PS3.7 C.4.x: the N-ACTION's argument is missing something or malformed
NO_SUCH_ACTION = 0x0123
DESTINATION_UNKNOWN = 0xA801  # the access log's status: no address for the requester's AE (as C-MOVE says it)
NOT_DELIVERED = 0xC000  # the access log's status: the report reached no one
N_ACTION_RSP = 0x8130  # Command Field of an N-ACTION response
ANSWER_WAIT = 10.0  # seconds to wait for our N-ACTION response to leave before reporting on that association
DELIVERY_ATTEMPTS = 3  # new associations tried, DELIVERY_PAUSE apart, before the report is given up
DELIVERY_PAUSE = 5.0
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

_message_ids = itertools.count(1)
_sending: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_sending_guard = threading.Lock()


@dataclass(frozen=True)
class CommitRequest:
    transaction_uid: str
    references: list[Reference]
    calling_ae: str
    address: str
    timeout: float


def handle_action(event: Any, ctx: ScpContext) -> tuple[int | Dataset, Dataset | None]:
    """pynetdicom's EVT_N_ACTION handler: check the request, answer, and leave the waiting to a thread."""
    association = ctx.log_of(event.assoc)
    if event.action_type != REQUEST_COMMITMENT:
        association.add(AccessAction.COMMIT, f"(action type {event.action_type})", status=NO_SUCH_ACTION)
        return failure(NO_SUCH_ACTION, f"action type {event.action_type} is not Request Storage Commitment"), None
    requested = str(event.request.RequestedSOPInstanceUID or "").strip()
    if requested != WELL_KNOWN_INSTANCE:
        association.add(AccessAction.COMMIT, "(wrong SOP instance)", status=NO_SUCH_SOP_INSTANCE)
        return failure(NO_SUCH_SOP_INSTANCE, f"the SOP instance is {WELL_KNOWN_INSTANCE}"), None
    try:
        try:
            information = event.action_information  # decoded here: a malformed one raises
        except Exception as exc:  # noqa: BLE001  (whatever pydicom raises on a malformed data set)
            raise ValueError(f"cannot read the action information: {exc}") from exc
        transaction_uid, references = parse_action_information(information)
    except ValueError as exc:
        association.add(AccessAction.COMMIT, "(malformed request)", status=INVALID_ARGUMENT)
        return failure(INVALID_ARGUMENT, str(exc)), None
    request = CommitRequest(transaction_uid, references, association.calling_ae, association.address,
                            ctx.settings.scp_commit_timeout)
    answered = _watch_answer(event.assoc, int(event.request.MessageID))
    association.add(AccessAction.COMMIT, transaction_uid)
    log.info("storage commitment %s from %s: %d instances (waiting up to %g s)", transaction_uid, request.calling_ae,
             len(references), request.timeout)
    threading.Thread(target=_commit_and_report, args=(ctx, event.assoc, request, answered),
                     name=f"commitment-{transaction_uid[-16:]}", daemon=True).start()
    return SUCCESS, None


def parse_action_information(information: Dataset) -> tuple[str, list[Reference]]:
    """Transaction UID and referenced instances of a request; ValueError names what is missing or malformed."""
    try:
        transaction_uid = str(information.get("TransactionUID", "") or "").strip()
        items = information.get("ReferencedSOPSequence") or []
        references = []
        for item in items:
            sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
            sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
            if not (UID_PATTERN.match(sop_class) and UID_PATTERN.match(sop_instance)):
                raise ValueError("a Referenced SOP Sequence item lacks a valid class or instance UID")
            references.append(Reference(sop_class, sop_instance))
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001  (whatever pydicom raises on a malformed data set)
        raise ValueError(f"cannot read the action information: {exc}") from exc
    if not UID_PATTERN.match(transaction_uid) or len(transaction_uid) > 64:
        raise ValueError("Transaction UID (0008,1195) is missing or malformed")
    if not references:
        raise ValueError("Referenced SOP Sequence (0008,1199) is missing or empty")
    return transaction_uid, references


def event_information(transaction_uid: str, commitment: Commitment, retrieve_ae: str) -> tuple[int, Dataset]:
    """The report's Event Type ID and Event Information (PS3.4 J.3.3.1)."""
    information = Dataset()
    information.TransactionUID = transaction_uid
    if commitment.committed:
        information.RetrieveAETitle = retrieve_ae
        information.ReferencedSOPSequence = [_item(reference) for reference in commitment.committed]
    if commitment.failed:
        items = []
        for failed in commitment.failed:
            item = _item(failed.reference)
            item.FailureReason = int(failed.reason)
            items.append(item)
        information.FailedSOPSequence = items
    return (SOME_FAILED if commitment.failed else ALL_COMMITTED), information


def _item(reference: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = reference.sop_class_uid
    item.ReferencedSOPInstanceUID = reference.sop_instance_uid
    return item


def _commit_and_report(ctx: ScpContext, assoc: Any, request: CommitRequest, answered: threading.Event) -> None:
    """The request's thread: wait for the verdict, deliver it, and record what happened."""
    committed = 0
    try:
        commitment = await_commitment(ctx.archive, request.references, timeout=request.timeout,
                                      stopping=ctx.stopping)
        committed = len(commitment.committed)
        for failed in commitment.failed:
            log.warning("storage commitment %s: %s not committed (0x%04X): %s", request.transaction_uid,
                        failed.reference.sop_instance_uid, failed.reason, failed.detail)
        event_type, information = event_information(request.transaction_uid, commitment, ctx.settings.scp_aet)
        status = _deliver(ctx, assoc, request, event_type, information, answered)
        if status == SUCCESS and commitment.failed:
            status = int(commitment.failed[0].reason)
    except Exception:  # noqa: BLE001  (a thread of its own: nothing above it would log this)
        log.exception("storage commitment %s from %s failed", request.transaction_uid, request.calling_ae)
        status = NOT_DELIVERED
    try:
        record_access(ctx.archive, token_name=f"dimse:{request.calling_ae}", action=AccessAction.COMMIT,
                      target=request.transaction_uid, instances=committed, status=status, client=request.address)
    except Exception:  # noqa: BLE001  (the audit must not take the server down; the log line keeps it)
        log.exception("could not record storage commitment %s", request.transaction_uid)


def _deliver(ctx: ScpContext, assoc: Any, request: CommitRequest, event_type: int, information: Dataset,
             answered: threading.Event) -> int:
    """Report on the requesting association if it is still open, else on a new one; the status to record."""
    if assoc.is_established and answered.wait(ANSWER_WAIT) and assoc.is_established:
        status = _send_on(assoc, event_type, information)
        if status is not None:
            log.info("storage commitment %s reported to %s on its association (0x%04X)", request.transaction_uid,
                     request.calling_ae, status)
            return status
    destination = ctx.settings.scp_destinations.get(request.calling_ae)
    host, _, port = (destination or "").rpartition(":")
    if not host or not port.isdigit():
        log.error("storage commitment %s: no address for %s in scp_destinations: the report is not delivered",
                  request.transaction_uid, request.calling_ae)
        return DESTINATION_UNKNOWN
    for attempt in range(DELIVERY_ATTEMPTS):
        if attempt:
            threading.Event().wait(DELIVERY_PAUSE)
        status = _send_on_new_association(ctx, request.calling_ae, host, int(port), event_type, information)
        if status is not None:
            log.info("storage commitment %s reported to %s at %s (0x%04X)", request.transaction_uid,
                     request.calling_ae, destination, status)
            return status
    log.error("storage commitment %s: %s at %s took no report after %d tries", request.transaction_uid,
              request.calling_ae, destination, DELIVERY_ATTEMPTS)
    return NOT_DELIVERED


def _send_on_new_association(ctx: ScpContext, calling_ae: str, host: str, port: int, event_type: int,
                             information: Dataset) -> int | None:
    """Associate as the Storage Commitment SCP (role selection), send the report, release."""
    ae = AE(ae_title=ctx.settings.scp_aet)
    ae.acse_timeout, ae.network_timeout, ae.dimse_timeout = 30, 60, 120
    ae.add_requested_context(StorageCommitmentPushModel, SYNTAXES)
    role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    peer = ae.associate(host, port, ae_title=calling_ae, ext_neg=[role])
    if not peer.is_established:
        log.warning("storage commitment: %s at %s:%d refused or did not answer the association", calling_ae, host,
                    port)
        return None
    try:
        return _send_on(peer, event_type, information)
    finally:
        if peer.is_established:
            peer.release()


def _send_on(assoc: Any, event_type: int, information: Dataset) -> int | None:
    """Send the N-EVENT-REPORT; the peer's status, or None when it did not answer (or the association ended)."""
    with _sending_guard:
        lock = _sending.setdefault(assoc, threading.Lock())
    with lock:  # one report at a time per association: pynetdicom matches a response to whoever waits first
        try:
            answer, _ = assoc.send_n_event_report(information, event_type, StorageCommitmentPushModel,
                                                  WELL_KNOWN_INSTANCE, msg_id=next(_message_ids) % 65536)
        except (RuntimeError, ValueError) as exc:  # no longer established, or no presentation context for it
            log.warning("storage commitment: cannot send the report: %s", exc)
            return None
    status = answer.get("Status")
    return None if status is None else int(status)


def _watch_answer(assoc: Any, message_id: int) -> threading.Event:
    """An event set once our response to N-ACTION ``message_id`` is on the wire.

    pynetdicom sends that response after the handler returns; a report sent
    on the same association before it would reach the peer first.
    """
    answered = threading.Event()

    def on_pdu_sent(event: Any) -> None:
        if answered.is_set():
            return
        for item in getattr(event.pdu, "presentation_data_value_items", None) or []:
            data = item.presentation_data_value or b""
            if len(data) > 1 and data[0] & 0x03 == 0x03 and _answers(data[1:], message_id):
                answered.set()
                assoc.unbind(evt.EVT_PDU_SENT, on_pdu_sent)  # pynetdicom swaps the list: safe while it iterates
                return

    assoc.bind(evt.EVT_PDU_SENT, on_pdu_sent)
    return answered


def _answers(command_set: bytes, message_id: int) -> bool:
    """Is this (last fragment of a) command set the N-ACTION response to ``message_id``?"""
    try:
        command = decode(BytesIO(command_set), True, True)
        return bool(command.get("CommandField") == N_ACTION_RSP
                    and command.get("MessageIDBeingRespondedTo") == message_id)
    except Exception:  # noqa: BLE001  (not a command we can read: not ours)
        return False
