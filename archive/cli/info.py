"""``medarchive info``: which archive this is, what it talks to, what it holds, how full its disk is."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from archive.cli._app import app, console, human, version
from archive.config import Settings
from archive.errors import TransientError
from archive.services.runtime import Archive, describe


@app.command()
def info(as_json: Annotated[bool, typer.Option("--json", help="Print the facts as JSON for scripts.")] = False) -> None:
    """Version, home, catalog (and its schema revision), broker, codec, disk space and what the archive holds.

    Works on a read-only copy of an archive. When the catalog cannot be reached the rest is still shown
    and the command exits 3.
    """
    from sqlalchemy import exc as sa_exc

    settings = Settings.load()
    archive: Archive | None = None
    error: str | None = None
    try:
        archive = Archive.open(settings, read_only=True)
    except (TransientError, sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
        from archive.cli import describe_failure

        error = describe_failure(exc)[0]
    try:
        facts: dict[str, Any] = {"version": version(), **describe(settings, archive, catalog_error=error)}
    finally:
        if archive is not None:
            archive.close()
    if as_json:
        console.print_json(json.dumps(facts, default=str))
    else:
        _print(facts)
    if error:
        raise typer.Exit(3)


def _print(facts: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("", overflow="fold")
    catalog = facts["catalog"]
    home = facts["home"] + ("" if facts["home_exists"] else " (not created yet)")
    if facts.get("read_only"):
        opened = {"immutable": ", catalog opened immutable", "copy": ", catalog read from a temporary copy"}
        home += f" (read-only{opened.get(catalog.get('opened', ''), '')})"
    table.add_row("version", facts["version"])
    table.add_row("home", home)
    revision = ("unreachable: " + catalog["error"]) if catalog.get("error") else (
        f"schema {catalog.get('revision') or 'none'}"
        + ("" if catalog.get("revision") == catalog.get("head") else f" (this version needs {catalog.get('head')})"))
    table.add_row("catalog", f"{catalog['url']}")
    table.add_row("", revision)
    table.add_row("broker", facts["broker_url"])
    table.add_row("results", facts["result_backend"])
    codec = facts["codec"]
    table.add_row("codec", codec["id"] + (" " + json.dumps({k: v for k, v in codec.items() if k != "id"})
                                         if len(codec) > 1 else ""))
    if facts["policies"]:
        table.add_row("policies", ", ".join(facts["policies"]))
    disk = facts["disk"]
    if "error" in disk:
        table.add_row("disk", f"unknown ({disk['error']})")
    else:
        table.add_row("disk", f"{human(disk['free'])} free of {human(disk['total'])} "
                              f"({disk['used'] / max(disk['total'], 1):.0%} used)")
    packs = facts["packs"]
    table.add_row("packs", f"{packs['files']} file(s), {human(packs['bytes'])}")
    if "studies" in facts:
        blobs = facts["blobs"]
        table.add_row("blobs", f"{blobs['count']} referenced, {human(blobs['bytes'])}"
                               + (f" ({human(blobs['loose_bytes'])} loose)" if blobs["loose_bytes"] else ""))
        table.add_row("holds", f"{facts['studies']} studies, {facts['instances']} instances, "
                               f"{facts['quarantined']} quarantined file(s)")
    console.print(table)
