"""Commands that look after the archive: verify, GC, schema upgrades, benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from archive.cli._app import app, bench_app, console, db_app, err_console, human, open_archive
from archive.config import Settings

@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Alembic revision to reach (see migrations/versions).")] = "head",
) -> None:
    """Create or migrate the catalog schema (Alembic) up to REVISION (default: the newest)."""
    from archive.catalog.database import current_revision, upgrade_schema

    settings = Settings.load()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade_schema(settings.database_url, revision)
    reached = current_revision(settings.database_url)
    console.print(f"catalog at {settings.database_url.split('@')[-1]} is at revision {reached or 'none'}")


@bench_app.command("ingest")
def bench_ingest(
    folder: Annotated[Path, typer.Argument(help="Folder of DICOM files (read recursively, never modified).")],
    jobs: Annotated[Optional[int], typer.Option("--jobs", min=1, help="Processes of the parallel ingest row "
                                                "(default: the number of cores).")] = None,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Runs of every row; the fastest is kept.")] = 1,
    database_url: Annotated[Optional[str], typer.Option("--database-url", help="A PostgreSQL server URL: the "
                                                        "catalog goes to a fresh temporary database per run "
                                                        "instead of the embedded SQLite.")] = None,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="Where the temporary homes go (default: "
                                                    "the system's temporary folder).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")] = False,
) -> None:
    """Ingest rate and stored size, next to a bare single-core loop doing the same codec work, in one run."""
    from archive.bench import print_ingest_benchmark, run_ingest_benchmark

    options: dict[str, Any] = dict(jobs=jobs, repeat=repeat, database_url=database_url, workdir=workdir)
    if as_json:
        console.print_json(json.dumps(run_ingest_benchmark(folder, **options)))
        return
    with err_console.status("benchmark…") as status:
        result = run_ingest_benchmark(folder, progress=status.update, **options)
    print_ingest_benchmark(result, console)


@app.command()
def verify(
    study: Annotated[Optional[str], typer.Option(help="One study (Study Instance UID); default all.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-read and re-hash stored blobs; exits 1 and lists them per study when any is missing or corrupt."""
    from archive.services.integrity import verify_blobs

    with open_archive() as archive:
        report = verify_blobs(archive, study_uid=study)
    if as_json:
        console.print_json(json.dumps(report.as_dict()))
    else:
        console.print(f"checked {report.blobs_checked} blob(s), {human(report.bytes_checked)}: "
                      f"{len(report.problems)} problem(s)")
        if report.problems:
            table = Table(title="Missing or corrupt blobs")
            for column in ("study", "instance", "blob", "problem"):
                table.add_column(column, overflow="fold")
            for problem in report.problems:
                table.add_row(problem.study_uid, problem.sop_instance_uid, problem.digest, problem.problem)
            console.print(table)
    if report.problems:
        raise typer.Exit(1)


@app.command()
def gc(
    grace: Annotated[Optional[float], typer.Option(help="Seconds an unreferenced blob is kept (default: gc_grace).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
) -> None:
    """Remove blobs no catalog row references, once older than the grace period."""
    from archive.services.integrity import collect_garbage

    with open_archive() as archive:
        report = collect_garbage(archive, grace_seconds=archive.settings.gc_grace if grace is None else grace,
                                 dry_run=dry_run)
    console.print_json(json.dumps(report.as_dict()))
