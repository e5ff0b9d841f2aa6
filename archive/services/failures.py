"""Failures of the machine (retry the task) as opposed to failures of the input (quarantine)."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

from archive.errors import TransientError
from archive.services.outcomes import TRANSIENT_ERRNOS

def is_transient(exc: BaseException) -> bool:
    """Failures of the machine (retry the task) as opposed to failures of the input (quarantine)."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    return type(exc).__name__ in ("ConnectionError", "TimeoutError", "OperationalError") and type(
        exc
    ).__module__.startswith(("redis", "kombu", "amqp"))
