"""C-GET and C-MOVE of a study, series or instance from the catalog: thin glue over :mod:`archive.services.dimse_retrieve`.

pynetdicom runs the sub-operations: the handlers yield the number of
sub-operations, then one ``(0xFF00, dataset)`` per instance; pynetdicom sends
each as a C-STORE (on the requester's association for C-GET, on a new one to
the destination for C-MOVE), answers a pending response with the counts after
each, and the final Success (0x0000), Warning (0xB000, some failed) or Failure
(0xA702, all failed) with the Failed SOP Instance UID List.

* C-GET sends each instance in a syntax the requester proposed for its SOP
  class with the SCP role (role selection): the stored syntax, else Explicit,
  else Implicit VR Little Endian, else another it accepted and we can write.
* C-MOVE opens the sub-association itself through pynetdicom (the handler's
  first yield carries the presentation contexts): per SOP class the stored
  syntax (where standard), Explicit and Implicit VR Little Endian, each its own
  context so the destination can pick; each instance goes in the best accepted.
* A sub-operation we cannot perform (no acceptable syntax, an instance that
  cannot be built, an original held only as a lossy derivative) is counted as
  failed and listed: it is handed to pynetdicom as a data set that cannot be
  sent (no transfer syntax), which pynetdicom counts as a failed C-STORE. Why
  is in our log.
* Statuses: an unknown move destination 0xA801; an identifier we cannot act on
  (a level the model lacks, a missing unique key) 0xA900 with an Error Comment
  (pynetdicom then reports one failed sub-operation); a catalog failure 0xC000;
  a well-formed identifier that matches nothing: Success, zero sub-operations.
* A C-CANCEL stops before the next sub-operation (0xFE00 with the counts so far).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
)

from archive.dimse.context import ScpContext, no_delay
from archive.dimse.store import failure
from archive.errors import ArchiveError, IdentifierError
from archive.kinds import AccessAction
from archive.services.dimse_retrieve import (
    Selection,
    SelectedInstance,
    accepted_by_class,
    build_part10,
    choose_syntax,
    move_proposal,
    parse_identifier,
    select_instances,
)

log = logging.getLogger(__name__)

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
WARNING = 0xB000  # sub-operations complete, one or more failures or warnings
ALL_FAILED = 0xA702  # unable to perform sub-operations (what pynetdicom answers when every one failed)
DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
MAX_CONTEXTS = 128  # presentation contexts in one association (odd IDs 1-255)


class StoreResponses:
    """The status of every C-STORE response an association receives, in order (EVT_DIMSE_RECV)."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.association: Any = None  # C-MOVE: the sub-association, once the destination accepted it

    def on_message(self, event: Any) -> None:
        if isinstance(event.message, C_STORE_RSP):
            self.statuses.append(int(getattr(event.message.command_set, "Status", 0xC000)))

    def on_accepted(self, event: Any) -> None:
        self.association = event.assoc


@dataclass
class _Tally:
    """What the sub-operations of one target did, for the access log."""

    asked: int = 0
    sent: int = 0
    failed: int = 0
    nbytes: int = 0

    def status(self, cancelled: bool) -> int:
        if cancelled and self.sent + self.failed < self.asked:
            return CANCEL
        if self.failed and self.failed >= self.asked:
            return ALL_FAILED
        return WARNING if self.failed else SUCCESS


@dataclass
class _Run:
    """One C-GET or C-MOVE: its selection, its access-log target suffix, and the tallies per target."""

    action: AccessAction
    suffix: str = ""  # " -> AE" for C-MOVE
    tallies: dict[str, _Tally] = field(default_factory=dict)
    cancelled: bool = False

    def plan(self, selection: Selection) -> None:
        for selected in selection.instances:
            self.tallies.setdefault(selected.target, _Tally()).asked += 1
        for _uid, target in selection.lossy_only:
            self.tallies.setdefault(target, _Tally()).asked += 1

    def record(self, ctx: ScpContext, assoc: Any) -> None:
        association = ctx.log_of(assoc)
        for target, tally in self.tallies.items():
            association.add(self.action, target + self.suffix, nbytes=tally.nbytes, instances=tally.sent,
                            status=tally.status(self.cancelled))


def handle_get(event: Any, ctx: ScpContext) -> Iterator[Any]:
    """pynetdicom's EVT_C_GET handler: the instances go back over the requester's own association."""
    run = _Run(AccessAction.RETRIEVE)
    patient_root = str(event.request.AffectedSOPClassUID) == PatientRootQueryRetrieveInformationModelGet
    try:
        selection = _selection(event, ctx, patient_root)
    except ArchiveError as exc:
        yield 1  # pynetdicom answers a failure only once sub-operations were announced
        yield _refusal(ctx, event, run, exc), None
        return
    run.plan(selection)
    if not selection.suboperations:
        run.record(ctx, event.assoc)
        yield 0
        return
    accepted = accepted_by_class((cx.abstract_syntax, cx.transfer_syntax[0])
                                 for cx in event.assoc.accepted_contexts if cx.as_scu)
    responses = StoreResponses()
    event.assoc.bind(evt.EVT_DIMSE_RECV, responses.on_message)
    try:
        yield selection.suboperations
        yield from _suboperations(event, ctx, selection, accepted, responses, run)
    finally:
        event.assoc.unbind(evt.EVT_DIMSE_RECV, responses.on_message)
        run.record(ctx, event.assoc)


def handle_move(event: Any, ctx: ScpContext) -> Iterator[Any]:
    """pynetdicom's EVT_C_MOVE handler: the destination comes from ``scp_destinations``, never from the request."""
    destination = str(event.request.MoveDestination or "").strip()
    run = _Run(AccessAction.MOVE, f" -> {destination or '(none)'}")
    address = _destination(ctx, destination)
    if address is None:
        log.warning("C-MOVE from %s to %r refused: not a configured destination (scp_destinations)",
                    ctx.log_of(event.assoc).calling_ae, destination)
        ctx.log_of(event.assoc).add(AccessAction.MOVE, "(unknown destination)" + run.suffix,
                                    status=DESTINATION_UNKNOWN)
        yield None, None
        return
    patient_root = str(event.request.AffectedSOPClassUID) == PatientRootQueryRetrieveInformationModelMove
    try:
        selection = _selection(event, ctx, patient_root)
    except ArchiveError as exc:
        yield address[0], address[1]
        yield 1  # pynetdicom opens the sub-association first, then sends this failure and releases it
        yield _refusal(ctx, event, run, exc), None
        return
    run.plan(selection)
    responses = StoreResponses()
    contexts = _move_contexts(selection)
    handlers = [(evt.EVT_CONN_OPEN, no_delay), (evt.EVT_ACCEPTED, responses.on_accepted),
                (evt.EVT_DIMSE_RECV, responses.on_message)]
    try:
        yield address[0], address[1], {"contexts": contexts, "evt_handlers": handlers}
        yield selection.suboperations
        if responses.association is None:
            return  # the destination refused the association: pynetdicom answered 0xA801
        accepted = accepted_by_class((cx.abstract_syntax, cx.transfer_syntax[0])
                                     for cx in responses.association.accepted_contexts if cx.as_scu)
        yield from _suboperations(event, ctx, selection, accepted, responses, run)
    finally:
        if selection.suboperations and responses.association is None:
            log.warning("C-MOVE to %s at %s:%d: the destination did not accept the association",
                        destination, address[0], address[1])
            for tally in run.tallies.values():
                tally.failed = tally.asked
        run.record(ctx, event.assoc)


def _selection(event: Any, ctx: ScpContext, patient_root: bool) -> Selection:
    try:
        identifier = event.identifier
    except Exception as exc:  # noqa: BLE001  (whatever pydicom raises on an undecodable identifier)
        raise IdentifierError(f"cannot decode the identifier: {exc}") from exc
    request = parse_identifier(identifier, patient_root=patient_root)
    return select_instances(ctx.archive, request, include_derived=ctx.include_derived(event.assoc))


def _refusal(ctx: ScpContext, event: Any, run: _Run, exc: ArchiveError) -> Dataset:
    status = IDENTIFIER_MISMATCH if isinstance(exc, IdentifierError) else UNABLE_TO_PROCESS
    log.warning("%s from %s refused (0x%04X): %s", run.action.value, ctx.log_of(event.assoc).calling_ae, status, exc)
    ctx.log_of(event.assoc).add(run.action, "(identifier)" + run.suffix, status=status)
    return failure(status, str(exc))


def _destination(ctx: ScpContext, ae_title: str) -> tuple[str, int] | None:
    """(host, port) of a configured move destination ("host:port"), or None."""
    configured = ctx.settings.scp_destinations.get(ae_title)
    if not configured:
        return None
    host, _, port = str(configured).rpartition(":")
    host = host.strip().strip("[]")
    try:
        return (host, int(port)) if host and 0 < int(port) < 65536 else None
    except ValueError:
        log.error("scp_destinations: %s = %r is not host:port", ae_title, configured)
        return None


def _move_contexts(selection: Selection) -> list[PresentationContext]:
    """Each (SOP class, syntax) of the proposal as its own presentation context, at most 128."""
    contexts = [build_context(sop_class, [syntax])
                for sop_class, syntaxes in move_proposal(selection).items() if sop_class for syntax in syntaxes]
    if len(contexts) > MAX_CONTEXTS:
        log.warning("C-MOVE needs %d presentation contexts; proposing the first %d", len(contexts), MAX_CONTEXTS)
    return contexts[:MAX_CONTEXTS]


def _suboperations(event: Any, ctx: ScpContext, selection: Selection, accepted: dict[str, set[str]],
                   responses: StoreResponses, run: _Run) -> Iterator[tuple[int, Dataset | None]]:
    """One pending yield per sub-operation; the outcome of each is read from its C-STORE response."""
    peer = ctx.log_of(event.assoc).calling_ae
    for selected in selection.instances:
        if event.is_cancelled:
            run.cancelled = True
            log.info("%s for %s cancelled", run.action.value, peer)
            yield CANCEL, None
            return
        tally = run.tallies[selected.target]
        dataset, nbytes = _dataset(ctx, selected, accepted.get(selected.sop_class_uid, set()), run)
        if nbytes == 0:
            tally.failed += 1
            yield PENDING, dataset
            continue
        before = len(responses.statuses)
        yield PENDING, dataset
        status = responses.statuses[-1] if len(responses.statuses) > before else None
        if status is not None and (status == SUCCESS or status & 0xF000 == 0xB000):
            tally.sent += 1
            tally.nbytes += nbytes
        else:
            tally.failed += 1
            log.warning("%s of %s: the peer answered the C-STORE %s", run.action.value,
                        selected.planned.sop_instance_uid, "nothing" if status is None else f"0x{status:04X}")
    for uid, target in selection.lossy_only:
        if event.is_cancelled:
            run.cancelled = True
            yield CANCEL, None
            return
        log.warning("%s of %s left out: its lossless original was released by a policy; only a lossy "
                    "derivative (its own series) is held", run.action.value, uid)
        run.tallies[target].failed += 1
        yield PENDING, _unsendable(uid)


def _dataset(ctx: ScpContext, selected: SelectedInstance, accepted: set[str], run: _Run) -> tuple[Dataset, int]:
    """The instance to send and its size; an unsendable stand-in and 0 when it cannot be (the reason logged)."""
    planned = selected.planned
    syntax = choose_syntax(planned, accepted)
    if syntax is None:
        log.warning("%s of %s (%s) failed: the peer accepted none of the syntaxes it can be sent in (%s)",
                    run.action.value, planned.sop_instance_uid, selected.sop_class_uid or "no SOP class",
                    ", ".join(sorted(accepted)) or "no context for this SOP class with the role needed")
        return _unsendable(planned.sop_instance_uid), 0
    try:
        data = build_part10(ctx.archive, planned, syntax)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data)), len(data)
    except Exception as exc:  # noqa: BLE001  (a damaged blob or a failed transcode fails this sub-operation only)
        log.error("%s of %s as %s failed: %s", run.action.value, planned.sop_instance_uid, syntax, exc)
        return _unsendable(planned.sop_instance_uid), 0


def _unsendable(sop_instance_uid: str) -> Dataset:
    """A data set pynetdicom cannot send (no SOP Class, no transfer syntax): counted failed, its UID listed."""
    stand_in = Dataset()
    stand_in.SOPInstanceUID = sop_instance_uid
    return stand_in
