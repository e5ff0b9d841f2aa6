"""Commands that archive files: direct ingest, queued ingest, the demo."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from archive.cli._app import app, console, err_console, human, open_archive
from archive.cli.browse import print_jobs
from archive.config import Settings, parse_codec_spec
from archive.errors import ArchiveError
from archive.kinds import NormalizeOutcome
from archive.services import jobs, query
from archive.services.ingest import FileOutcome, IngestReport, Outcome, default_jobs, ingest_paths
from archive.services.outcomes import nothing_to_archive_message
from archive.services.retrieve import retrieve_study
from archive.services.runtime import Archive

def print_ingest_summary(report: IngestReport, out: Console = console) -> None:
    table = Table(title="Ingest summary", show_header=False, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    summary = {
        "studies": str(len(report.studies)),
        "instances": str(report.instances),
        "bytes in": human(report.bytes_in),
        "bytes stored": human(report.bytes_stored),
        "ratio": f"{report.ratio:.2f}",
        "seconds": f"{report.seconds:.2f}",
        "duplicates": str(report.count(Outcome.DUPLICATE)),
        "conflicts": str(report.count(Outcome.CONFLICT)),
        "skipped": str(report.count(Outcome.SKIPPED)),
        "quarantined": str(report.count(Outcome.QUARANTINED)),
    }
    if report.interrupted:
        summary["not reached"] = str(report.remaining)
    if report.job_id is not None:
        summary["job"] = str(report.job_id)
    normalized = [n for n in report.normalized if n.outcome is NormalizeOutcome.NORMALIZED]
    if normalized:
        summary["normalized series"] = str(len(normalized))
        summary["normalized stored"] = human(sum(n.bytes_stored for n in normalized))
    for name, value in summary.items():
        table.add_row(name, value)
    out.print(table)
    other = [n for n in report.normalized if n.outcome in (NormalizeOutcome.SKIPPED, NormalizeOutcome.FAILED)
             or (n.outcome is NormalizeOutcome.NORMALIZED and n.warnings)]
    for n in other:
        why = n.reason if n.outcome is not NormalizeOutcome.NORMALIZED else "; ".join(n.warnings)
        out.print(f"normalize {n.profile or ''} {n.outcome.value} series {n.source_series_uid}: {why}",
                  highlight=False, soft_wrap=True)
    for label, outcome in (("Skipped", Outcome.SKIPPED), ("Quarantined", Outcome.QUARANTINED), ("Conflicts", Outcome.CONFLICT)):
        rows = report.with_outcome(outcome)
        if rows:
            listing = Table(title=f"{label} ({len(rows)})", show_header=True, title_justify="left")
            listing.add_column("file", overflow="fold")
            listing.add_column("reason", overflow="fold")
            for row in rows:
                listing.add_row(str(row.path), row.reason)
            out.print(listing)


def run_ingest(archive: Archive, paths: list[Path], codec: dict[str, Any] | None, show_progress: bool,
               jobs: int | None = None) -> IngestReport:
    with Progress(TextColumn("[bold]ingest"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=err_console, disable=not show_progress,
                  transient=True) as progress:
        task = progress.add_task("", total=None)

        def discovered(total: int) -> None:
            progress.update(task, total=total)

        def done(outcome: FileOutcome) -> None:
            if outcome.outcome is Outcome.SKIPPED and not outcome.path.exists():
                return
            progress.update(task, advance=1, description=outcome.path.name)

        return ingest_paths(archive, paths, codec_config=codec, jobs=jobs or default_jobs(),
                            on_discovered=discovered, on_file=done, interruptible=True)


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (read recursively, never modified).")],
    codec: Annotated[Optional[str], typer.Option(help='A codec id (jpegxl) or a codec config as JSON, e.g. '
                                                 '\'{"id": "jpegxl", "effort": 7}\'.')] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Queue through the broker for the workers; show progress "
                                       "until archived.")] = False,
    timeout: Annotated[Optional[float], typer.Option(help="With --wait: give up after this many seconds.")] = None,
    jobs_count: Annotated[Optional[int], typer.Option("--jobs", "-j", min=1, help="Staging processes (read, encode, "
                                                      "verify, write blobs); default: one per core.")] = None,
) -> None:
    """Archive DICOM files; exits 1 when anything was quarantined, 2 when there is nothing to archive, 130 when
    interrupted (Ctrl-C or SIGTERM: what was committed stays; run it again to store the rest)."""
    codec_config = parse_codec_spec(codec, source="--codec") if codec is not None else None
    if wait:
        if codec_config:
            raise ArchiveError("--codec applies to direct ingest; queued ingest uses the configured codec")
        from workers.service import dispatch_task, require_broker

        require_broker()  # no broker: fail now, instead of queueing work nothing will receive
        with open_archive() as archive:
            job_ids, skipped = jobs.submit_paths(archive, paths, dispatch_task)
            if not job_ids:
                raise ArchiveError(nothing_to_archive_message(paths, skipped))
            summaries = _wait_for_jobs(archive, job_ids, timeout)
        if as_json:
            console.print_json(json.dumps({"jobs": [s.as_dict() for s in summaries],
                                           "skipped": [str(o.path) for o in skipped]}))
        else:
            print_jobs(summaries, "Queued ingest")
        quarantined = sum(s.items.get("quarantined", 0) for s in summaries)
        if quarantined or any(s.status == "failed" for s in summaries):
            err_console.print(f"[red]{quarantined} file(s) quarantined[/red]: see `medarchive quarantine list`")
            raise typer.Exit(1)
        return
    with open_archive() as archive:
        report = run_ingest(archive, paths, codec_config, show_progress=not as_json, jobs=jobs_count)
    if as_json:
        console.print_json(json.dumps(ingest_json(report)))
    else:
        print_ingest_summary(report)
    if report.interrupted:
        err_console.print(f"[red]interrupted[/red]: {len(report.outcomes)} of {report.files} file(s) done, job "
                          f"{report.job_id} marked interrupted; what was committed is archived. Run the same "
                          "ingest again to store the rest (files already archived count as duplicates).",
                          highlight=False)
        raise typer.Exit(130)
    nothing = report.nothing_to_archive(paths)
    if nothing:
        raise ArchiveError(nothing)
    quarantined = report.count(Outcome.QUARANTINED)
    if quarantined:
        err_console.print(f"[red]{quarantined} file(s) quarantined[/red]: see `medarchive quarantine list`")
        raise typer.Exit(1)


def ingest_json(report: IngestReport) -> dict[str, Any]:
    """The ``ingest --json`` document: totals, per-file outcomes, and whether the run was interrupted."""
    return {
        "job_id": report.job_id, "interrupted": report.interrupted, "studies": sorted(report.studies),
        "instances": report.instances, "bytes_in": report.bytes_in, "bytes_stored": report.bytes_stored,
        "seconds": report.seconds, "files_found": report.files, "not_reached": report.remaining,
        "counts": {o.value: report.count(o) for o in Outcome},
        "files": [{"path": str(o.path), "outcome": o.outcome.value, "reason": o.reason} for o in report.outcomes],
        "normalized": [n.as_dict() for n in report.normalized],
    }


def _wait_for_jobs(archive: Archive, job_ids: list[int], timeout: float | None) -> list[query.JobSummary]:
    """Poll the catalog (the source of truth) until the jobs are done; a progress bar meanwhile."""
    started = time.monotonic()
    with Progress(TextColumn("[bold]archiving"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=err_console, transient=True) as progress:
        bar = progress.add_task("", total=None)
        while True:
            with archive.unit_of_work() as uow:
                summaries = [s for j in job_ids for s in query.list_jobs(uow.session, job_id=j)]
            total = sum(s.total for s in summaries)
            final = sum(s.final for s in summaries)
            progress.update(bar, total=total, completed=final,
                            description=", ".join(f"job {s.id} {s.status}" for s in summaries))
            if all(s.status in ("done", "failed") for s in summaries):
                return summaries
            if timeout is not None and time.monotonic() - started > timeout:
                raise ArchiveError(f"jobs {job_ids} not finished after {timeout:g} s; are workers running? "
                                   "(`medarchive worker`; `medarchive jobs` shows their state)")
            time.sleep(0.5)


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Keep the demo inbox and retrieved files.")] = True,
) -> None:
    """Build an inbox from pydicom's real test files plus a generated series, ingest it, retrieve a study."""
    from archive.demo import build_demo_inbox

    settings = Settings.load()
    inbox = build_demo_inbox(settings.home / "demo-inbox")
    console.print(f"demo inbox: {inbox} (home {settings.home})")
    with Archive.open(settings) as archive:
        report = run_ingest(archive, [inbox], None, show_progress=True)
        print_ingest_summary(report)
        if report.interrupted:
            err_console.print("[red]interrupted[/red]: run `medarchive demo` again to finish")
            raise typer.Exit(130)
        generated = [o for o in report.outcomes if o.outcome is Outcome.STORED and "generated" in str(o.path)]
        target = generated[0].study_uid if generated else next(iter(sorted(report.studies)))
        assert target is not None
        out = settings.home / "demo-retrieved"
        retrieved = retrieve_study(archive, target, out)
    console.print(f"retrieved study {target}: {len(retrieved.files)} file(s) in {out}")
    console.print("next: `medarchive studies`, `medarchive show <uid>`, `medarchive quarantine list`")
