"""Who may ask: bearer tokens from the configuration (several, named) — minimal version, extended by issue 18."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from archive.api.deps import Principal, archive_of

PUBLIC_PATHS = frozenset({"/health"})


def token_name_for(tokens: dict[str, str], presented: str) -> str | None:
    """The name of the configured token equal to ``presented`` (constant-time comparisons), or None."""
    found = None
    for name, token in tokens.items():
        if hmac.compare_digest(token.encode(), presented.encode()):
            found = name
    return found


async def authenticate(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    if request.url.path in PUBLIC_PATHS:
        return await call_next(request)
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    name = token_name_for(archive_of(request).settings.api_tokens, presented.strip()) \
        if scheme.lower() == "bearer" else None
    if name is None:
        return JSONResponse({"error": "a valid bearer token is required"}, status_code=401,
                            headers={"WWW-Authenticate": 'Bearer realm="medarchive"'})
    request.state.principal = Principal(name)
    return await call_next(request)
