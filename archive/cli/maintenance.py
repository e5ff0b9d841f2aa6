"""Commands that look after the archive: verify, GC, schema upgrades, benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from archive.cli._app import app, bench_app, console, db_app, human, open_archive, run_benchmark
from archive.cli._format import short_uid
from archive.config import Settings
from archive.errors import NotFoundError

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
    if revision == "head":
        from archive.services.backfill import fill_study_attributes

        with open_archive() as archive:
            filled = fill_study_attributes(archive)
        if filled:
            console.print(f"filled the search attributes of {filled} study(ies) archived before revision 0007")


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
    run_benchmark(run_ingest_benchmark, print_ingest_benchmark, folder, options, as_json)


@bench_app.command("normalize")
def bench_normalize(
    folder: Annotated[Path, typer.Argument(help="Folder of DICOM files (read recursively, never modified).")],
    slices: Annotated[int, typer.Option("--slices", min=1, help="CT and MR slices measured per modality "
                                        "(spread over matrices and series).")] = 20,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Timed runs per method and slice; the median "
                                        "is kept.")] = 7,
    ingest: Annotated[bool, typer.Option("--ingest", help="Also ingest the folder's CT files with normalization "
                                         "off and on, and compare the rates.")] = False,
    ingest_repeat: Annotated[int, typer.Option("--ingest-repeat", min=1, help="Ingest runs each way; the fastest "
                                               "is kept.")] = 3,
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="Processes of the --ingest runs.")] = 1,
    workdir: Annotated[Path | None, typer.Option("--workdir", help="Where the temporary homes go (default: "
                                                 "the system's temporary folder).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")] = False,
) -> None:
    """Milliseconds per slice of each interpolation, next to JPEG-LS, OpenCV and SimpleITK on the same slices."""
    from archive.normalize.bench import (
        print_normalize_benchmark,
        run_normalize_benchmark,
    )

    options: dict[str, Any] = {"slices": slices, "repeat": repeat, "ingest": ingest, "ingest_repeat": ingest_repeat,
                               "jobs": jobs, "workdir": workdir}
    run_benchmark(run_normalize_benchmark, print_normalize_benchmark, folder, options, as_json)


JSON_HELP = "Print the result as JSON (full UIDs and digests) instead of a summary."


def _problems_table(problems: list[Any], title: str) -> Table:
    table = Table(title=title)
    for column in ("study", "instance", "blob", "problem"):
        table.add_column(column, no_wrap=True)
    for problem in problems:
        table.add_row(short_uid(problem.study_uid) or "(no instance)", short_uid(problem.sop_instance_uid),
                      short_uid(problem.digest, 13), problem.problem)
    return table


@app.command()
def verify(
    study: Annotated[Optional[str], typer.Option(help="One study (Study Instance UID); default all.")] = None,
    repair_from: Annotated[Optional[Path], typer.Option(
        "--repair-from", help="A folder of original files: damaged blobs whose source is there are written again, "
        "then everything is verified again.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Re-read and re-hash stored blobs; exits 1 and lists them per study when any is missing or corrupt."""
    from archive.services.integrity import verify_blobs
    from archive.services.repair import repair_from_paths

    if repair_from is not None and not repair_from.exists():
        raise NotFoundError(f"no such file or folder: {repair_from}; give the folder that holds the original files")
    with open_archive() as archive:
        report = verify_blobs(archive, study_uid=study)
        repair = after = None
        if repair_from is not None and report.problems:
            only = {p.sop_instance_uid for p in report.problems if p.sop_instance_uid}
            repair = repair_from_paths(archive, [repair_from], only=only)
            after = verify_blobs(archive, study_uid=study)
    final = after if after is not None else report
    if as_json:
        out: dict[str, Any] = report.as_dict()
        if repair_from is not None:
            out = {"before": report.as_dict(), "repair": repair.as_dict() if repair is not None else None,
                   "after": final.as_dict(), "ok": final.ok}
        console.print_json(json.dumps(out))
    else:
        console.print(f"checked {report.blobs_checked} blob(s), {human(report.bytes_checked)}: "
                      f"{report.bad_blobs} missing or corrupt", highlight=False)
        if repair is not None and after is not None:
            console.print(f"repair from {repair_from}: {repair.blobs_repaired} blob(s) of {len(repair.repaired)} "
                          f"instance(s) written again ({repair.files_scanned} file(s) looked at)", highlight=False)
            for path, why in repair.failed:
                console.print(f"  could not repair from {path}: {why}", highlight=False, soft_wrap=True)
            console.print(f"verified again: {after.bad_blobs} missing or corrupt", highlight=False)
        if final.problems:
            console.print(_problems_table(final.problems, "Still missing or corrupt" if repair is not None
                                          else "Missing or corrupt blobs"))
            if repair_from is None:
                console.print("repair: ingest the originals again, or `medarchive verify --repair-from DIR`",
                              highlight=False)
    if final.problems:
        raise typer.Exit(1)


@app.command()
def gc(
    grace: Annotated[Optional[float], typer.Option(help="Seconds an unreferenced blob is kept (default: gc_grace).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would go; delete nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Remove blobs no catalog row references, once older than the grace period; compact packs."""
    from archive.services.integrity import collect_garbage

    with open_archive() as archive:
        report = collect_garbage(archive, grace_seconds=archive.settings.gc_grace if grace is None else grace,
                                 dry_run=dry_run)
    if as_json:
        console.print_json(json.dumps(report.as_dict()))
        return
    would = "would be " if dry_run else ""
    lines = [
        f"unreferenced blobs: {report.blob_rows} catalog row(s) {would}deleted "
        f"(grace period {report.grace_seconds:g} s)",
        f"loose files: {report.files_deleted} {would}deleted, {human(report.blob_bytes + report.orphan_bytes)}"
        f"{f'; {report.kept_recent} kept (put again recently)' if report.kept_recent else ''}",
        f"packs: {report.packs_compacted} {would}compacted, {report.packs_retired} {would}retired "
        f"({human(report.pack_bytes_reclaimable)} dead), {human(report.pack_bytes_moved)} of live blobs moved",
    ]
    if not dry_run:
        lines.append(f"freed now: {human(report.bytes_freed)} (retired packs are deleted by a run after the grace "
                     "period)")
    if report.deferred_for_backup:
        lines.append("a backup is running: rows were deleted, files and packs are left for the next run")
    for line in lines:
        console.print(line, highlight=False)
