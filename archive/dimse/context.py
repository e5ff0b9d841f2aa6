"""What every DIMSE handler is given: the archive, the allow rules, and the per-association bookkeeping."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archive.config import Settings
from archive.dimse.access import AllowRule, AssociationLog
from archive.services.runtime import Archive


@dataclass
class ScpContext:
    """Shared by the handlers of one running SCP (handlers run on one thread per association)."""

    archive: Archive
    settings: Settings  # the archive's, or what ``medarchive scp``'s options changed
    rules: list[AllowRule]
    arrived: Callable[[Path], None]  # a durable file in the incoming area: hand it to the stable-study logic
    logs: dict[int, AssociationLog] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)  # bytes received since the association's last message
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)  # set when the SCP shuts down

    def log_of(self, assoc: Any) -> AssociationLog:
        """The association's audit record (created when it was requested)."""
        with self.lock:
            found = self.logs.get(id(assoc))
            if found is None:
                requestor = assoc.requestor
                # set from the A-ASSOCIATE-RQ only after negotiation; the primitive has it from the start
                primitive = getattr(requestor, "primitive", None)
                calling = getattr(primitive, "calling_ae_title", None) or requestor.ae_title
                found = self.logs[id(assoc)] = AssociationLog(str(calling).strip(), str(requestor.address))
            return found

    def end(self, assoc: Any) -> AssociationLog | None:
        """Forget a closed association; its audit record, to be written."""
        with self.lock:
            self.received.pop(id(assoc), None)
            return self.logs.pop(id(assoc), None)

    def include_derived(self, assoc: Any) -> bool:
        """Derived series (normalized, lossy) are shown to C-FIND only for the configured AEs, as in QIDO."""
        return self.log_of(assoc).calling_ae in self.settings.scp_derived_aes


def no_delay(event: Any) -> None:
    """EVT_CONN_OPEN: no Nagle delay; a C-STORE sub-operation (command PDU, then data PDU) would wait ~40 ms
    for the peer's delayed ACK (pynetdicom never sets TCP_NODELAY)."""
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
