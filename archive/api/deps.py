"""What every route needs from the request: the archive, the client's principal, and a line in the access log."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from archive.errors import ArchiveError, NotAcceptableError, NotFoundError, PayloadTooLargeError
from archive.kinds import AccessAction
from archive.services.access import record_access
from archive.services.runtime import Archive


@dataclass(frozen=True)
class Principal:
    """Who is asking: the name of the token they showed (as a bearer header or through a signed-in session)."""

    token_name: str
    via_session: bool = False  # a cookie session of the web page: state-changing requests need its CSRF token


def archive_of(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def principal_of(request: Request) -> Principal:
    """Set by the authentication middleware (:mod:`archive.api.auth`) before any protected route runs."""
    principal: Principal = request.state.principal
    return principal


def record(request: Request, action: AccessAction, target: str, *, status: int = 200, nbytes: int = 0,
           instances: int = 0) -> None:
    """One access-log row for this request (UIDs only in ``target``: no patient data)."""
    client = request.client.host if request.client else None
    record_access(archive_of(request), token_name=principal_of(request).token_name, action=action, target=target,
                  status=status, nbytes=nbytes, instances=instances, client=client)


def status_of(exc: ArchiveError) -> int:
    """The HTTP status an :class:`ArchiveError` answers: the exception handler and the access log agree."""
    if isinstance(exc, NotFoundError):  # LossyOnlyError included
        return 404
    if isinstance(exc, NotAcceptableError):
        return 406
    if isinstance(exc, PayloadTooLargeError):
        return 413
    if exc.exit_code == 3:  # TransientError, UnavailableError: the machine, not the request
        return 503
    return 400
