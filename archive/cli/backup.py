"""Commands that copy the archive: backup (while it runs) and restore (into an empty home)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from archive.cli._app import app, console, human, open_archive
from archive.config import Settings

JSON_HELP = "Print the result as JSON instead of a summary."


@app.command()
def backup(
    dest: Annotated[Path, typer.Argument(help="A new or empty folder for the copy.")],
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """A consistent copy of the catalog and the blobs, taken while ingest goes on (GC compaction waits)."""
    from archive.services.backup import backup as run_backup

    with open_archive(read_only=True) as archive:
        report = run_backup(archive, dest)
    if as_json:
        console.print_json(json.dumps(report.as_dict()))
        return
    console.print(f"backup in {report.dest}: catalog {report.catalog_file} ({report.catalog_kind}, revision "
                  f"{report.revision}), {report.studies} studies, {report.instances} instances, {report.blobs} blobs",
                  highlight=False, soft_wrap=True)
    console.print(f"copied {report.packs} pack(s), {human(report.pack_bytes)}; {report.loose_blobs} loose blob(s); "
                  f"{report.quarantine_files} quarantine file(s) in {report.seconds:.1f} s", highlight=False)
    if report.missing_loose:
        console.print(f"[yellow]warning:[/yellow] {len(report.missing_loose)} referenced loose blob(s) were already "
                      "missing (see `medarchive verify`)", highlight=False)


@app.command()
def restore(
    src: Annotated[Path, typer.Argument(help="A folder `medarchive backup` wrote.")],
    force: Annotated[bool, typer.Option("--force", help="Restore even into a home or catalog that is not empty "
                                        "(its catalog is replaced, its blobs stay for the GC).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Bring a backup back into the configured home (MEDARCHIVE_HOME, MEDARCHIVE_DATABASE_URL), then verify it."""
    from archive.services.backup import restore as run_restore

    report = run_restore(Settings.load(), src, force=force)
    verify = report.verify
    if as_json:
        console.print_json(json.dumps(report.as_dict()))
    else:
        console.print(f"restored {report.source} into {report.home}: {report.catalog_kind} catalog (revision "
                      f"{report.revision}), {report.packs} pack(s), {report.loose_blobs} loose blob(s), "
                      f"{report.quarantine_files} quarantine file(s)", highlight=False, soft_wrap=True)
        if verify is not None:
            state = "ok" if verify.ok else f"{verify.bad_blobs} missing or corrupt (`medarchive verify` lists them)"
            console.print(f"verify: {verify.blobs_checked} blob(s), {human(verify.bytes_checked)}: {state}",
                          highlight=False)
    if verify is None or not verify.ok:
        raise typer.Exit(1)
