"""The ASGI application: one FastAPI app over one open :class:`Archive`.

Around the routes, two plain ASGI middlewares (they never buffer a body, so
streamed answers stay streamed): :class:`ObserveMiddleware` (outermost: the
security headers, the upload size limit by ``Content-Length``, request
metrics, and a log line of method, path, status and milliseconds, never the
query string, which may hold a patient's name) and
:class:`archive.api.auth.AuthMiddleware` (tokens and sessions).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.datastructures import MutableHeaders
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from archive.api import auth, ops, page, qido, stow, wado
from archive.api.deps import status_of
from archive.config import Settings
from archive.errors import (
    ArchiveError,
)
from archive.services.runtime import Archive

log = logging.getLogger("archive.api.access")

THREADS = 64  # route handlers are plain `def`s run in AnyIO's thread pool (default 40 threads)
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # not "no-referrer": under it browsers send "Origin: null" with the page's own form posts, which the
    # CSRF origin check must then refuse; "same-origin" still sends no URL (UIDs, a search) to another site
    (b"referrer-policy", b"same-origin"),
)
CSP = (b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       b"frame-ancestors 'none'")
# FastAPI's interactive docs load Swagger UI / ReDoc from a CDN with an inline script: the page's
# policy would blank them, so they get none (they show no patient data and need a token anyway)
NO_CSP_PATHS = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})
UNMATCHED = "(unmatched)"


def create_app(archive: Archive) -> FastAPI:
    app = FastAPI(title="medarchive", version="0.1.0", lifespan=_lifespan,
                  description="DICOMweb (QIDO-RS, WADO-RS, STOW-RS) and a web page over a medarchive archive. "
                              "Every route but /health and signing in needs `Authorization: Bearer TOKEN` "
                              "or the web page's session cookie.")
    app.state.archive = archive
    app.state.metrics = ops.ApiMetrics(archive)
    app.add_middleware(auth.AuthMiddleware)
    app.add_middleware(ObserveMiddleware, metrics=app.state.metrics,
                       max_upload_bytes=archive.settings.api_max_upload_bytes)  # added last: outermost
    app.add_exception_handler(ArchiveError, _archive_error)
    app.add_exception_handler(OperationalError, _unavailable)
    app.add_exception_handler(InterfaceError, _unavailable)
    for module in (ops, qido, wado, stow, page, auth):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")  # the page's CSS and JS, no data
    app.openapi = _openapi_with_security(app)  # type: ignore[method-assign]
    return app


def app_from_environment() -> FastAPI:
    """``uvicorn --factory archive.api.app:app_from_environment``: the archive ``Settings.load()`` finds."""
    return create_app(Archive.open(Settings.load()))


@asynccontextmanager
async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
    anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
    yield


async def _archive_error(request: Request, exc: Exception) -> JSONResponse:
    status = status_of(exc) if isinstance(exc, ArchiveError) else 500
    headers = {"Retry-After": "30"} if status == 503 else None
    return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The catalog database is unreachable: the machine, not the request, failed (no details: they name hosts)."""
    return JSONResponse({"error": "the catalog is unavailable; try again later"}, status_code=503,
                        headers={"Retry-After": "30"})


class ObserveMiddleware:
    """Security headers on every answer, the upload limit, request metrics and the access log line."""

    def __init__(self, app: ASGIApp, *, metrics: ops.ApiMetrics, max_upload_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        path: str = scope["path"]

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS:
                    headers.raw.append((name, value))
                if headers.get("content-type", "").startswith("text/html") and path not in NO_CSP_PATHS:
                    headers.raw.append((b"content-security-policy", CSP))
            await send(message)

        try:
            if self._too_large(scope):
                answer = JSONResponse({"error": f"the request is larger than the limit of {self.max_upload_bytes} "
                                                "bytes (setting api_max_upload_bytes)"}, status_code=413,
                                      headers={"Connection": "close"})
                await answer(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            seconds = time.perf_counter() - started
            method = scope["method"]
            self.metrics.observe(_route_template(scope), method, status, seconds)
            log.info("%s %s %d %.1f ms", method, path, status, seconds * 1000)

    def _too_large(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    return int(value) > self.max_upload_bytes
                except ValueError:
                    return False
        return False


def _route_template(scope: Scope) -> str:
    """``/studies/{study}`` rather than the path (bounded label values); found again for answers before routing."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if route is None and "app" in scope:
        for candidate in iter_route_contexts(scope["app"].routes):
            match, _ = candidate.original_route.matches(scope)
            if match is Match.FULL:
                template = candidate.path_format
                break
    return template if isinstance(template, str) else UNMATCHED


def _openapi_with_security(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The spec says what the middleware does: bearer or session on every route but the public ones, 401/403."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "a token of MEDARCHIVE_API_TOKEN or the api_tokens table"},
            "session": {"type": "apiKey", "in": "cookie", "name": auth.SESSION_COOKIE,
                        "description": "the web page's session (POST /session); state-changing requests also "
                                       f"need the {auth.CSRF_HEADER} header"},
        }
        schema["security"] = [{"bearer": []}, {"session": []}]
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                if auth.is_public(path):
                    operation["security"] = []
                    continue
                responses = operation.setdefault("responses", {})
                responses.setdefault("401", {"description": "missing or wrong token, or no valid session"})
                if method.upper() not in auth.SAFE_METHODS:
                    responses.setdefault("403", {"description": "a session request without its CSRF token, "
                                                                "or from another origin"})
        app.openapi_schema = schema
        return schema

    return build
