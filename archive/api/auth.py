"""Who may ask: bearer tokens from the configuration (several, named), and the web page's signed-in sessions.

A client shows ``Authorization: Bearer TOKEN``; a browser signs in once with
the token (``POST /session``) and then carries a session cookie. The cookie
holds the token's *name*, an expiry and an HMAC-SHA256 of both keyed by the
token's own value: nothing is kept on the server, and rotating a token ends
every session signed with it. State-changing requests of a cookie session
must carry ``X-CSRF-Token`` (an HMAC of the cookie, :func:`csrf_token`, which
the page puts in a ``<meta name="csrf-token">``) and, when the browser sends
one, an ``Origin`` equal to the server's own; the cookie is ``SameSite=Strict``
besides. Bearer requests need neither: no browser attaches that header by itself.

The middleware is plain ASGI (no ``BaseHTTPMiddleware``): it decides before the
route runs and never touches the body, so streamed answers pass through as sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter
from jinja2 import Environment, FileSystemLoader
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from archive.api.deps import Principal, archive_of, record
from archive.kinds import AccessAction

SESSION_COOKIE = "medarchive_session"
SESSION_SECONDS = 12 * 3600
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# open to anyone: the health probe, signing in and out, and the page's CSS/JS (no data)
PUBLIC_PATHS = frozenset({"/health", "/sign-in", "/session", "/session/delete"})
PUBLIC_PREFIXES = ("/static/",)
MAX_FORM_BYTES = 16 * 1024
UNKNOWN_TOKEN = "(invalid token)"  # the access log's token name for a failed sign-in

_templates = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True)

router = APIRouter(tags=["session"])


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def token_name_for(tokens: dict[str, str], presented: str) -> str | None:
    """The name of the configured token equal to ``presented`` (constant-time comparisons), or None."""
    found = None
    for name, token in tokens.items():
        if hmac.compare_digest(token.encode(), presented.encode()):
            found = name
    return found


# --- the session cookie and its CSRF token


def _mac(key: str, message: str) -> str:
    return hmac.new(key.encode(), message.encode(), hashlib.sha256).hexdigest()


def session_value(name: str, token: str, *, now: float | None = None) -> str:
    """``base64url(name).expiry.hmac``: the cookie of a session signed in with ``token`` (called ``name``)."""
    expires = int((time.time() if now is None else now) + SESSION_SECONDS)
    encoded = base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")
    body = f"{encoded}.{expires}"
    return f"{body}.{_mac(token, body)}"


def session_token_name(tokens: dict[str, str], value: str, *, now: float | None = None) -> str | None:
    """The token name of a valid, unexpired session cookie whose token is still configured, else None."""
    parts = value.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    encoded, expires, mac = parts
    try:
        name = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    token = tokens.get(name)
    if token is None or int(expires) < (time.time() if now is None else now):
        return None
    return name if hmac.compare_digest(_mac(token, f"{encoded}.{expires}").encode(), mac.encode()) else None


def session_csrf(tokens: dict[str, str], value: str) -> str:
    """The CSRF token that goes with session cookie ``value`` ("" when the cookie is not a valid session)."""
    name = session_token_name(tokens, value) if value else None
    return _mac(tokens[name], "csrf:" + value) if name is not None else ""


def csrf_token(request: Request) -> str:
    """The CSRF token of this request's session ("" without a valid session): an HMAC of the cookie value."""
    return session_csrf(archive_of(request).settings.api_tokens, request.cookies.get(SESSION_COOKIE, ""))


def own_origin_matches(request: Request, origin: str) -> bool:
    """``Origin`` names this server: same host (and port) as the request's Host, same scheme.

    Behind a TLS proxy (``api_tls_proxy``) the browser's scheme is https while ours is http.
    """
    host = request.headers.get("host", "")
    schemes = {request.url.scheme}
    if archive_of(request).settings.api_tls_proxy:
        schemes.add("https")
    parsed = urlsplit(origin)
    return bool(host) and parsed.netloc.lower() == host.lower() and parsed.scheme in schemes


# --- the middleware


class AuthMiddleware:
    """Every request but the public paths needs a bearer token or a session; sets ``request.state.principal``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        answer = _authenticate(request)
        if answer is not None:
            await answer(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _authenticate(request: Request) -> Response | None:
    """None when the request may go on (the principal is set), else the 401 or 403 answer."""
    tokens = archive_of(request).settings.api_tokens
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, presented = header.partition(" ")
        name = token_name_for(tokens, presented.strip()) if scheme.lower() == "bearer" and presented.strip() else None
        if name is None:
            return unauthorized(request, "the bearer token is not valid")
        request.state.principal = Principal(name)
        return None
    cookie = request.cookies.get(SESSION_COOKIE)
    name = session_token_name(tokens, cookie) if cookie else None
    if name is None:
        return unauthorized(request, "a valid bearer token is required" if not cookie else
                            "the session has expired or its token was changed: sign in again")
    if request.method not in SAFE_METHODS:
        origin = request.headers.get("origin")
        if origin is not None and not own_origin_matches(request, origin):
            return JSONResponse({"error": "cross-origin request refused"}, status_code=403)
        presented = request.headers.get(CSRF_HEADER, "")
        if not presented or not hmac.compare_digest(presented.encode(), csrf_token(request).encode()):
            return JSONResponse({"error": f"the {CSRF_HEADER} header of this session is required"}, status_code=403)
    request.state.principal = Principal(name, via_session=True)
    return None


def prefers_html(request: Request) -> bool:
    """A browser navigating (GET, ``text/html`` accepted before JSON): it gets the sign-in page, not JSON."""
    if request.method not in ("GET", "HEAD"):
        return False
    accept = request.headers.get("accept", "")
    html = accept.find("text/html")
    return html >= 0 and (accept.find("application/json") < 0 or html < accept.find("application/json"))


def unauthorized(request: Request, message: str) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="medarchive"'}
    if prefers_html(request):
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return sign_in_page(request, next_path=path, status_code=401, headers=headers)
    return JSONResponse({"error": message}, status_code=401, headers=headers)


# --- signing in and out


def safe_next(path: str | None) -> str:
    """A same-site relative path to go to after signing in (anything else: ``/``); no open redirect."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path or any(
            ord(c) < 0x20 for c in path):
        return "/"
    parsed = urlsplit(path)
    return path if not parsed.scheme and not parsed.netloc else "/"


def sign_in_page(request: Request, *, next_path: str = "/", error: str | None = None, status_code: int = 200,
                 headers: dict[str, str] | None = None) -> HTMLResponse:
    html = _templates.get_template("sign_in.html").render(next_path=safe_next(next_path), error=error)
    return HTMLResponse(html, status_code=status_code, headers=headers)


@router.get("/sign-in", include_in_schema=False)
def sign_in_form(request: Request, next: str = "/") -> HTMLResponse:  # noqa: A002  (the query parameter's name)
    """The sign-in page of the web interface."""
    return sign_in_page(request, next_path=next)


@router.post("/session", status_code=303, responses={
    303: {"description": "signed in: the session cookie is set, go to `next`"},
    401: {"description": "wrong token: the sign-in page again, with an error"},
    403: {"description": "cross-origin request"}, 413: {"description": "form too large"}})
async def create_session(request: Request) -> Response:
    """Sign in with a token (form field ``token``; ``next``: where to go then): sets the session cookie.

    The form is parsed here (``application/x-www-form-urlencoded``, at most 16 kB) so the
    server needs no multipart package.
    """
    origin = request.headers.get("origin")
    if origin is not None and not own_origin_matches(request, origin):
        return JSONResponse({"error": "cross-origin request refused"}, status_code=403)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return JSONResponse({"error": "the sign-in form is too large"}, status_code=413)
    form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    presented = (form.get("token") or [""])[0].strip()
    next_path = safe_next((form.get("next") or ["/"])[0])
    tokens = archive_of(request).settings.api_tokens
    name = token_name_for(tokens, presented) if presented else None
    if name is None:
        request.state.principal = Principal(UNKNOWN_TOKEN, via_session=True)
        await run_in_threadpool(record, request, AccessAction.SIGN_IN, "session", status=401)
        return sign_in_page(request, next_path=next_path, error="That token is not valid.", status_code=401)
    request.state.principal = Principal(name, via_session=True)
    await run_in_threadpool(record, request, AccessAction.SIGN_IN, "session", status=303)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(SESSION_COOKIE, session_value(name, tokens[name]), max_age=SESSION_SECONDS, path="/",
                        secure=_secure(request), httponly=True, samesite="strict")
    return response


@router.post("/session/delete", status_code=303, responses={303: {"description": "signed out"},
                                                            403: {"description": "cross-origin request"}})
def delete_session(request: Request) -> Response:
    """Sign out: the session cookie is cleared (a cross-origin request is refused)."""
    origin = request.headers.get("origin")
    if origin is not None and not own_origin_matches(request, origin):
        return JSONResponse({"error": "cross-origin request refused"}, status_code=403)
    response = RedirectResponse("/sign-in", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=_secure(request), httponly=True, samesite="strict")
    return response


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or archive_of(request).settings.api_tls_proxy
