"""The audit log: every change an administrator makes to archived data leaves a row saying who, when and why."""

from __future__ import annotations

import getpass
import socket
from typing import Any

from sqlalchemy.orm import Session

from archive.catalog.models import AuditEvent
from archive.kinds import AuditAction


def actor() -> str:
    """``user@host`` of this process: who to ask about a change."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's numeric user)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:128]


def record(session: Session, action: AuditAction, target: str, *, reason: str | None = None,
           details: dict[str, Any] | None = None) -> AuditEvent:
    """Add an audit row to the session's transaction: it commits with the change it describes, or not at all."""
    event = AuditEvent(action=action, target=target[:128], actor=actor(), reason=reason, details=details or {})
    session.add(event)
    session.flush()
    return event
