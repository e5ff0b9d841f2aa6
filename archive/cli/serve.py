"""``medarchive serve`` (DICOMweb and the web page) and ``medarchive audit`` (who read or stored what)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from archive.cli._app import app, console, err_console, human
from archive.cli._format import JSON_HELP, cell, short_time, table
from archive.config import Settings
from archive.errors import ConfigError
from archive.kinds import AccessAction
from archive.services.backfill import fill_study_attributes
from archive.services.runtime import Archive


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1): nothing off this machine can connect."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_listen(host: str, settings: Settings, *, tls: bool, behind_proxy: bool) -> None:
    """Refuse to expose the archive: no token off loopback, and no plain HTTP off loopback without a TLS proxy."""
    if is_loopback(host):
        return
    if not settings.api_tokens:
        raise ConfigError(f"refusing to listen on {host} without an API token: every client could read the archive; "
                          "set MEDARCHIVE_API_TOKEN (or api_tokens in the configuration file), or serve on 127.0.0.1")
    if not tls and not behind_proxy:
        raise ConfigError(f"refusing to serve plain HTTP on {host}: tokens and images would cross the network in "
                          "clear; give --tls-cert and --tls-key, or --behind-tls-proxy when a TLS-terminating proxy "
                          "forwards to this address (setting api_tls_proxy)")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs a token and TLS.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    tls_cert: Annotated[Optional[Path], typer.Option("--tls-cert", help="PEM certificate (chain) for HTTPS.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option("--tls-key", help="PEM private key of --tls-cert.")] = None,
    behind_tls_proxy: Annotated[bool, typer.Option(
        "--behind-tls-proxy", help="A TLS-terminating proxy forwards to this address: plain HTTP is allowed "
                                   "(setting api_tls_proxy); session cookies are then marked Secure.")] = False,
) -> None:
    """Serve DICOMweb (QIDO-RS, WADO-RS, STOW-RS) and the web page; Ctrl-C stops."""
    import uvicorn

    from archive.api.app import create_app

    settings = Settings.load()
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both (a PEM certificate and its key)")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise ConfigError(f"no such file: {path}; give the PEM file's path")
    tls = tls_cert is not None
    behind = behind_tls_proxy or settings.api_tls_proxy
    check_listen(host, settings, tls=tls, behind_proxy=behind)
    if behind != settings.api_tls_proxy:
        settings = dataclasses.replace(settings, api_tls_proxy=behind)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with Archive.open(settings) as archive:
        filled = fill_study_attributes(archive)  # studies archived before the QIDO columns existed
        if filled:
            err_console.print(f"filled the search attributes of {filled} study(ies) archived before revision 0007",
                              highlight=False)
        config = uvicorn.Config(
            create_app(archive), host=host, port=port, access_log=False,  # our log line has no query string
            ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None,
            proxy_headers=behind, server_header=False, log_level="info")
        shown = f"[{host}]" if ":" in host else host
        err_console.print(f"medarchive serving {'https' if tls else 'http'}://{shown}:{port}/ "
                          f"(home {settings.home}); Ctrl-C stops", highlight=False, soft_wrap=True)
        if not settings.api_tokens:
            err_console.print("[yellow]warning:[/yellow] no API token is configured: every route but /health "
                              "answers 401; set MEDARCHIVE_API_TOKEN", highlight=False, soft_wrap=True)
        uvicorn.Server(config).run()


@app.command()
def audit(
    limit: Annotated[int, typer.Option(help="Newest rows shown.")] = 100,
    token: Annotated[Optional[str], typer.Option("--token", help="Only this token name's requests.")] = None,
    action: Annotated[Optional[AccessAction], typer.Option(help="Only this action.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """The access log of the server: who (token name) retrieved or stored what (UIDs), when, and how many bytes."""
    from archive.services.access import list_access

    with Archive.open(Settings.load(), read_only=True) as archive:
        rows = list_access(archive, limit=limit, token_name=token, action=action)
    if as_json:
        console.print_json(json.dumps([{**dataclasses.asdict(r), "action": r.action.value,
                                        "created_at": r.created_at.isoformat()} for r in rows]))
        return
    out = table(f"Access log ({len(rows)})", ("when", 11), ("token", 10), ("action", 9), ("status", 6, "right"),
                ("bytes", 9, "right"), ("inst.", 5, "right"), "target")
    for r in rows:
        out.add_row(short_time(r.created_at), cell(r.token_name), r.action.value, str(r.status), human(r.nbytes),
                    str(r.instances), cell(r.target))
    console.print(out)
