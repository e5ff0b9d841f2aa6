"""The ASGI application: one FastAPI app over one open :class:`Archive`."""

from __future__ import annotations

from fastapi import FastAPI

from archive.api import ops, page, qido, stow, wado
from archive.services.runtime import Archive


def create_app(archive: Archive) -> FastAPI:
    app = FastAPI(title="medarchive", version="0.1.0")
    app.state.archive = archive
    for module in (ops, qido, wado, stow, page):
        app.include_router(module.router)
    return app
