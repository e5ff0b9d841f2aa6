"""The SCP: one pynetdicom application entity, the handlers of each service, and the in-process watcher.

:class:`ScpServer` is what ``medarchive scp`` runs (and ``medarchive run``
when ``scp_enabled``). Associations are served on their own threads (up to
``scp_max_associations``); a malformed PDU or an oversized data set ends that
association only. The watcher thread turns what C-STORE wrote into queued
jobs exactly as ``medarchive watch`` does for a folder.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pydicom import uid as uids
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from archive.dimse import commitment, find, retrieve, store
from archive.dimse.access import admitted, parse_allow
from archive.dimse.context import ScpContext, no_delay
from archive.config import Settings
from archive.errors import ConfigError
from archive.services.jobs import Dispatcher
from archive.services.runtime import Archive
from archive.watcher import InboxWatcher

log = logging.getLogger(__name__)

# What C-STORE accepts, in the order the archive prefers when a sender proposes several syntaxes in one context
# (pynetdicom takes the acceptor's first): uncompressed first, so nothing is decompressed or recompressed on the
# way; then lossless compressions; lossy ones only when a sender offers nothing else (its images are lossy already).
ACCEPTED_SYNTAXES: list[str] = [
    uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian, uids.DeflatedExplicitVRLittleEndian,
    uids.JPEGLSLossless, uids.JPEG2000Lossless, uids.HTJ2KLossless, uids.HTJ2KLosslessRPCL, uids.JPEGLosslessSV1,
    uids.JPEGLossless, uids.RLELossless,
    uids.JPEGLSNearLossless, uids.JPEG2000, uids.HTJ2K, uids.JPEGBaseline8Bit, uids.JPEGExtended12Bit,
    uids.ExplicitVRBigEndian,
]
UNCOMPRESSED = [uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian]
QUERY_RETRIEVE = [
    PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove,
]
MAX_PDU = 1024 * 1024  # what peers may send us in one PDU (dcmtk's default is 16 KiB; bigger costs fewer reads)
REJECT_PERMANENT, REJECT_SERVICE_USER, CALLING_AE_NOT_RECOGNIZED = 0x01, 0x01, 0x03


def build_ae(ctx: ScpContext) -> AE:
    """The application entity with every presentation context the SCP accepts."""
    settings = ctx.settings
    ae = AE(ae_title=settings.scp_aet)
    ae.maximum_pdu_size = MAX_PDU
    ae.maximum_associations = settings.scp_max_associations
    ae.network_timeout = 120
    ae.dimse_timeout = 120
    ae.add_supported_context(Verification, UNCOMPRESSED)
    for context in AllStoragePresentationContexts:
        # the SCP role too: a C-GET requester receives its sub-operations on this association (role selection)
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_SYNTAXES, scu_role=True, scp_role=True)
    for sop_class in QUERY_RETRIEVE:
        ae.add_supported_context(sop_class, UNCOMPRESSED)
    ae.add_supported_context(StorageCommitmentPushModel, UNCOMPRESSED)
    return ae


def handlers(ctx: ScpContext) -> list[Any]:
    return [
        (evt.EVT_CONN_OPEN, no_delay),
        (evt.EVT_REQUESTED, _on_requested, [ctx]),
        (evt.EVT_CONN_CLOSE, _on_closed, [ctx]),
        (evt.EVT_DATA_RECV, store.count_received, [ctx]),
        (evt.EVT_C_ECHO, _on_echo),
        (evt.EVT_C_STORE, store.handle_store, [ctx]),
        (evt.EVT_N_ACTION, commitment.handle_action, [ctx]),
        (evt.EVT_C_FIND, find.handle_find, [ctx]),
        (evt.EVT_C_GET, retrieve.handle_get, [ctx]),
        (evt.EVT_C_MOVE, retrieve.handle_move, [ctx]),
    ]


def _on_echo(event: Any) -> int:
    return 0x0000


def _on_requested(event: Any, ctx: ScpContext) -> None:
    """Reject a caller the allow-list does not name before any data set is exchanged."""
    association = ctx.log_of(event.assoc)
    if admitted(ctx.rules, association.calling_ae, association.address):
        return
    log.warning("rejected an association from %s at %s: not in scp_allow", association.calling_ae,
                association.address)
    association.rejected = True
    event.assoc.acse.send_reject(REJECT_PERMANENT, REJECT_SERVICE_USER, CALLING_AE_NOT_RECOGNIZED)
    event.assoc.kill()  # as pynetdicom's own rejection does: the A-ASSOCIATE-RJ goes out before the socket closes


def _on_closed(event: Any, ctx: ScpContext) -> None:
    association = ctx.end(event.assoc)
    if association is None:
        return
    assoc = event.assoc
    ending = ("rejected: calling AE not allowed" if association.rejected else
              "released" if assoc.is_released else "aborted" if assoc.is_aborted or assoc.is_established else "closed")
    association.flush(ctx.archive, ending)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """DICOM TLS (PS3.15 B.1, TLS 1.2 or newer) when a certificate is configured; ``None`` for plain TCP."""
    if not settings.scp_tls_cert and not settings.scp_tls_key:
        return None
    if not (settings.scp_tls_cert and settings.scp_tls_key):
        raise ConfigError("scp_tls_cert and scp_tls_key go together: set both, or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.scp_tls_cert, settings.scp_tls_key)
        if settings.scp_tls_ca:
            context.load_verify_locations(settings.scp_tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the SCP's TLS certificate, key or CA: {exc}") from exc
    return context


class ScpServer:
    """The listening SCP and its watcher thread; :meth:`start` returns once both run."""

    def __init__(self, archive: Archive, dispatcher: Dispatcher, *, settings: Settings | None = None,
                 port: int | None = None, host: str | None = None, stable_age: float | None = None) -> None:
        settings = archive.settings if settings is None else settings
        self.archive = archive
        self.host = settings.scp_host if host is None else host
        self.requested_port = settings.scp_port if port is None else port
        self.watcher = InboxWatcher(archive, settings.incoming_dir, dispatcher,
                                    stable_age=settings.stable_age if stable_age is None else stable_age,
                                    file_settle=0.0)
        self.settings = settings
        self.context = ScpContext(archive, settings, parse_allow(settings.scp_allow), self.watcher.events.put)
        self.tls = tls_context(settings)
        self.stopping = self.context.stopping  # the watcher and storage commitment's waiting threads stop with it
        self._server: Any = None
        self._watching: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else self.requested_port

    def start(self) -> None:
        self.settings.incoming_dir.mkdir(parents=True, exist_ok=True)
        self._watching = threading.Thread(target=self.watcher.run, args=(self.stopping,), name="scp-watcher",
                                          daemon=True)
        self._watching.start()
        ae = build_ae(self.context)
        self._server = ae.start_server((self.host, self.requested_port), block=False, ssl_context=self.tls,
                                       evt_handlers=handlers(self.context))
        log.info("%s listening on %s:%d%s", ae.ae_title, self.host, self.port, " (TLS)" if self.tls else "")

    def stop(self) -> None:
        """Stop accepting, end open associations, then let the watcher spool what is stable."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.stopping.set()
        if self._watching is not None:
            self._watching.join(timeout=30)

    def serve(self, stop: threading.Event, on_started: Callable[[ScpServer], None] | None = None) -> None:
        self.start()
        if on_started is not None:
            on_started(self)
        try:
            stop.wait()
        finally:
            self.stop()

