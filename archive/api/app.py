"""The ASGI application: one FastAPI app over one open :class:`Archive`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from archive.api import auth, ops, page, qido, stow, wado
from archive.config import Settings
from archive.errors import ArchiveError, NotAcceptableError, NotFoundError, PayloadTooLargeError
from archive.services.runtime import Archive


def create_app(archive: Archive) -> FastAPI:
    app = FastAPI(title="medarchive", version="0.1.0")
    app.state.archive = archive
    app.middleware("http")(auth.authenticate)
    app.add_exception_handler(ArchiveError, _archive_error)
    for module in (ops, qido, wado, stow, page):
        app.include_router(module.router)
    return app


def app_from_environment() -> FastAPI:
    """``uvicorn --factory archive.api.app:app_from_environment``: the archive ``Settings.load()`` finds."""
    return create_app(Archive.open(Settings.load()))


async def _archive_error(request: Request, exc: Exception) -> JSONResponse:
    status = 400
    if isinstance(exc, NotFoundError):
        status = 404
    elif isinstance(exc, NotAcceptableError):
        status = 406
    elif isinstance(exc, PayloadTooLargeError):
        status = 413
    elif isinstance(exc, ArchiveError) and exc.exit_code == 3:
        status = 503
    return JSONResponse({"error": str(exc)}, status_code=status)
