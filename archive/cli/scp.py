"""``medarchive scp``: the DICOM network service (C-ECHO, C-STORE, storage commitment, C-FIND, C-GET, C-MOVE)."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from typing import Annotated, Optional

import typer

from archive.cli._app import app, err_console
from archive.config import Settings
from archive.services.backfill import fill_study_attributes
from archive.services.runtime import Archive


@app.command()
def scp(
    aet: Annotated[Optional[str], typer.Option("--aet", help="The archive's AE title (setting scp_aet, "
                                                             "default MEDARCHIVE).")] = None,
    port: Annotated[Optional[int], typer.Option(help="TCP port (setting scp_port, default 11112).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to listen on (setting scp_host, default all).")] = None,
    stable_age: Annotated[Optional[float], typer.Option(help="Seconds without a new instance before a study is "
                                                        "queued (default: setting stable_age, 60).")] = None,
) -> None:
    """Serve DIMSE: modalities and PACS store, commit, find, get and move here; studies go to the workers."""
    from archive.dimse.server import ScpServer
    from workers.service import dispatch_task

    settings = Settings.load()
    settings = dataclasses.replace(settings, scp_aet=aet or settings.scp_aet, scp_host=host or settings.scp_host,
                                   scp_port=settings.scp_port if port is None else port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s scp %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with Archive.open(settings) as archive:
        fill_study_attributes(archive)  # C-FIND matches the same columns as QIDO
        server = ScpServer(archive, dispatch_task, stable_age=stable_age)

        def started(running: ScpServer) -> None:
            allowed = ", ".join(settings.scp_allow) or "loopback callers only"
            err_console.print(f"medarchive SCP {settings.scp_aet} on {running.host}:{running.port}"
                              f"{' (TLS)' if running.tls else ''}; callers: {allowed}; stable age "
                              f"{running.watcher.stable_age:g} s; Ctrl-C stops", highlight=False, soft_wrap=True)

        server.serve(stop, started)
