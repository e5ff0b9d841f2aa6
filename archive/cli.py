"""The ``medarchive`` command: argument parsing and presentation only; the work is in services."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from archive.config import Settings, parse_codec_spec
from archive.errors import ArchiveError
from archive.services import jobs, query, sweeps
from archive.services.ingest import FileOutcome, IngestReport, Outcome, default_jobs, ingest_paths
from archive.services.retrieve import TRANSFER_SYNTAX_CHOICES, retrieve_study
from archive.services.runtime import Archive

app = typer.Typer(help="medarchive: archive DICOM studies compressed, verified, and retrievable by Study Instance UID.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Catalog schema.", no_args_is_help=True)
quarantine_app = typer.Typer(help="Files that could not be archived.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks on a folder of DICOM.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(bench_app, name="bench")
console = Console()
err_console = Console(stderr=True)


def _open() -> Archive:
    return Archive.open(Settings.load())


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def print_ingest_summary(report: IngestReport, out: Console = console) -> None:
    table = Table(title="Ingest summary", show_header=False, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    summary = {
        "studies": str(len(report.studies)),
        "instances": str(report.instances),
        "bytes in": _human(report.bytes_in),
        "bytes stored": _human(report.bytes_stored),
        "ratio": f"{report.ratio:.2f}",
        "seconds": f"{report.seconds:.2f}",
        "duplicates": str(report.count(Outcome.DUPLICATE)),
        "conflicts": str(report.count(Outcome.CONFLICT)),
        "skipped": str(report.count(Outcome.SKIPPED)),
        "quarantined": str(report.count(Outcome.QUARANTINED)),
    }
    for name, value in summary.items():
        table.add_row(name, value)
    out.print(table)
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
                            on_discovered=discovered, on_file=done)


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
    """Archive DICOM files; exits 1 when anything was quarantined."""
    codec_config = parse_codec_spec(codec, source="--codec") if codec is not None else None
    if wait:
        if codec_config:
            raise ArchiveError("--codec applies to direct ingest; queued ingest uses the configured codec")
        from workers.service import dispatch_task

        with _open() as archive:
            job_ids, skipped = jobs.submit_paths(archive, paths, dispatch_task)
            summaries = _wait_for_jobs(archive, job_ids, timeout)
        if as_json:
            console.print_json(json.dumps({"jobs": [s.as_dict() for s in summaries],
                                           "skipped": [str(o.path) for o in skipped]}))
        else:
            _print_jobs(summaries, "Queued ingest")
        quarantined = sum(s.items.get("quarantined", 0) for s in summaries)
        if quarantined or any(s.status == "failed" for s in summaries):
            err_console.print(f"[red]{quarantined} file(s) quarantined[/red]: see `medarchive quarantine list`")
            raise typer.Exit(1)
        return
    with _open() as archive:
        report = run_ingest(archive, paths, codec_config, show_progress=not as_json, jobs=jobs_count)
    if as_json:
        console.print_json(json.dumps({
            "job_id": report.job_id, "studies": sorted(report.studies), "instances": report.instances,
            "bytes_in": report.bytes_in, "bytes_stored": report.bytes_stored, "seconds": report.seconds,
            "files": [{"path": str(o.path), "outcome": o.outcome.value, "reason": o.reason} for o in report.outcomes],
        }))
    else:
        print_ingest_summary(report)
    quarantined = report.count(Outcome.QUARANTINED)
    if quarantined:
        err_console.print(f"[red]{quarantined} file(s) quarantined[/red]: see `medarchive quarantine list`")
        raise typer.Exit(1)


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


def _print_jobs(summaries: list[query.JobSummary], title: str = "Jobs") -> None:
    table = Table(title=f"{title} ({len(summaries)})")
    for column in ("id", "kind", "status", "study / policy", "instances", "outcomes", "created", "error"):
        table.add_column(column, overflow="fold")
    for s in summaries:
        table.add_row(str(s.id), s.kind, s.status, s.policy or s.study_uid or "", f"{s.final}/{s.total}",
                      ", ".join(f"{k} {v}" for k, v in sorted(s.outcomes.items())),
                      s.created_at.strftime("%Y-%m-%d %H:%M:%S"), s.error or "")
    console.print(table)


@app.command()
def studies(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List archived studies."""
    with _open() as archive:
        rows = query.list_studies(archive)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title=f"Studies ({len(rows)})")
    for column in ("Study Instance UID", "patient", "date", "modalities", "series", "instances", "original", "stored", "ratio"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r["study_uid"], f"{r['patient_name'] or ''} ({r['patient_id'] or ''})", r["study_date"] or "",
                      r["modalities"] or "", str(r["series"]), str(r["instances"]), _human(r["bytes_original"]),
                      _human(r["bytes_stored"]), f"{r['ratio'] or 0:.2f}")
    console.print(table)


@app.command()
def show(study_uid: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Series, instances, codec, parameters, errors and sizes of one study."""
    with _open() as archive:
        study = query.show_study(archive, study_uid)
    if as_json:
        console.print_json(json.dumps(study, default=str))
        return
    console.print(f"[bold]{study['study_uid']}[/bold]  {study['patient_name'] or ''}  {study['study_date'] or ''}  "
                  f"{study['modalities'] or ''}  {study['instances']} instances, "
                  f"{_human(study['bytes_original'])} → {_human(study['bytes_stored'])}")
    for series in study["series"]:
        table = Table(title=f"Series {series['series_number']} {series['modality'] or ''} {series['description'] or ''} "
                            f"({series['series_uid']})", title_justify="left")
        for column in ("instance", "mode", "codec", "config", "ran", "bytes", "ratio", "bpp", "max err", "PSNR dB", "status"):
            table.add_column(column, overflow="fold")
        for inst in series["instances"]:
            for enc in inst["encodings"]:
                table.add_row(
                    inst["sop_instance_uid"], inst["storage_mode"], enc["codec"], json.dumps(enc["config"]),
                    ",".join(f"{k}×{v}" for k, v in enc["actual_codecs"].items()),
                    f"{enc['bytes_before']}→{enc['bytes_after']}", f"{enc['ratio']:.2f}", f"{enc['bits_per_pixel']:.3f}",
                    f"{enc['max_abs_error']:g}" if enc["max_abs_error"] is not None else "-",
                    "exact" if enc["psnr"] is None and enc["mse"] == 0 else f"{enc['psnr']:.2f}",
                    inst["status"] + ("" if enc["current"] else " (old)"),
                )
        console.print(table)


@app.command()
def get(
    study_uid: str,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the DICOM files into.")],
    transfer_syntax: Annotated[str, typer.Option("--transfer-syntax", help="|".join(TRANSFER_SYNTAX_CHOICES))] = "explicit-le",
    include_conflicts: Annotated[bool, typer.Option(help="Also write recorded conflicts.")] = False,
) -> None:
    """Write a study's instances as DICOM Part 10 files."""
    with _open() as archive:
        report = retrieve_study(archive, study_uid, out, transfer_syntax=transfer_syntax,
                                include_conflicts=include_conflicts)
    syntaxes = ", ".join(f"{n} {name}" for name, n in report.syntaxes.items())
    console.print(f"wrote {len(report.files)} instance(s) to {out} ({syntaxes})")
    for f in report.files:
        if f.note:
            console.print(f"  {f.path.name}: {f.note}")


@quarantine_app.command("list")
def quarantine_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Quarantined files, with the reason each was refused."""
    with _open() as archive:
        rows = query.list_quarantine(archive)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title=f"Quarantine ({len(rows)})")
    for column in ("id", "source", "reason", "copy"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(str(r["id"]), r["source_path"], r["reason"], r["stored_path"])
    console.print(table)


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
        generated = [o for o in report.outcomes if o.outcome is Outcome.STORED and "generated" in str(o.path)]
        target = generated[0].study_uid if generated else next(iter(sorted(report.studies)))
        assert target is not None
        out = settings.home / "demo-retrieved"
        retrieved = retrieve_study(archive, target, out)
    console.print(f"retrieved study {target}: {len(retrieved.files)} file(s) in {out}")
    console.print("next: `medarchive studies`, `medarchive show <uid>`, `medarchive quarantine list`")


@app.command()
def watch(
    inbox: Annotated[Path, typer.Argument(help="Folder that scanners and PACS drop studies into (files are moved).")],
    poll: Annotated[bool, typer.Option("--poll", help="Poll instead of filesystem events (network shares).")] = False,
    stable_age: Annotated[Optional[float], typer.Option(help="Seconds without a new instance before a study is "
                                                        "queued (default: setting stable_age, 60).")] = None,
) -> None:
    """Watch an inbox: queue each stable study as a job for the workers."""
    import logging
    import threading

    from archive.watcher import InboxWatcher
    from workers.service import dispatch_task

    logging.basicConfig(level=logging.INFO, format="%(asctime)s watcher %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with _open() as archive:
        watcher = InboxWatcher(archive, inbox, dispatch_task, stable_age=stable_age, poll=poll)
        err_console.print(f"watching {watcher.inbox} (stable age {watcher.stable_age:g} s, "
                          f"{'polling' if poll else 'events'}); Ctrl-C stops")
        watcher.run(stop)


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    name: Annotated[str, typer.Option(help="Celery node name.")] = "medarchive@%h",
    loglevel: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """Start one Celery worker (production: one per container, scale the service)."""
    Settings.load().home.mkdir(parents=True, exist_ok=True)  # the embedded broker lives there
    from workers.service import celery_app

    celery_app.worker_main(["worker", "--concurrency", str(concurrency), "--hostname", name,
                            "--loglevel", loglevel, "--queues", celery_app.conf.task_default_queue])


@app.command()
def beat(loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
    """Start Celery beat: reconciler, re-compression policies, verify and GC on their schedules."""
    Settings.load().home.mkdir(parents=True, exist_ok=True)
    from workers.service import celery_app

    celery_app.start(["beat", "--loglevel", loglevel, "--schedule", celery_app.conf.beat_schedule_filename])


@app.command()
def run(
    inbox: Annotated[Path, typer.Argument(help="Folder to watch.")],
    workers: Annotated[int, typer.Option(help="Worker processes to start (each with --concurrency).")] = 1,
    concurrency: Annotated[int, typer.Option(help="Processes per worker.")] = 2,
    poll: Annotated[bool, typer.Option("--poll")] = False,
) -> None:
    """Watcher + worker(s) + beat as child processes (the embedded default: no servers); Ctrl-C stops all."""
    from workers.service import run_all

    Archive.open(Settings.load()).close()  # create or migrate the embedded catalog once, before the children
    raise typer.Exit(run_all(inbox, workers=workers, concurrency=concurrency, poll=poll, console=err_console))


@app.command("jobs")
def jobs_command(
    status: Annotated[Optional[str], typer.Option(help="queued | running | done | failed | spooling")] = None,
    job_id: Annotated[Optional[int], typer.Option("--id", help="One job, with its failed instances.")] = None,
    limit: Annotated[int, typer.Option()] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Jobs from the catalog: state, instance counts, outcomes, errors."""
    with _open() as archive, archive.unit_of_work() as uow:
        summaries = query.list_jobs(uow.session, status=status, job_id=job_id, limit=limit)
        errors = query.job_errors(uow.session, job_id) if job_id is not None else []
    if as_json:
        console.print_json(json.dumps({"jobs": [s.as_dict() for s in summaries],
                                       "errors": [{"item": i, "status": st, "error": e} for i, st, e in errors]}))
        return
    _print_jobs(summaries)
    if errors:
        table = Table(title=f"Instances of job {job_id} that did not archive")
        for column in ("item", "status", "error"):
            table.add_column(column, overflow="fold")
        for row in errors:
            table.add_row(*row)
        console.print(table)


@app.command()
def reconcile() -> None:
    """Re-send unfinished work that no live task holds, and close finished jobs (beat runs this too)."""
    from workers.service import dispatch_task, queue_depth

    with _open() as archive:
        report = jobs.reconcile(archive, dispatch_task, queue_depth=queue_depth())
    console.print_json(json.dumps(report.as_dict()))


@app.command()
def recompress(
    policy: Annotated[str, typer.Option("--policy", help="A policy name from the [policies] configuration.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what the policy selects; change nothing.")] = False,
    limit: Annotated[Optional[int], typer.Option(help="At most this many instances (default: the policy's "
                                                 "batch_size).")] = None,
    queue: Annotated[bool, typer.Option("--queue", help="Send to the workers instead of running here.")] = False,
) -> None:
    """Run a re-compression policy by hand (ignoring its time window)."""
    from archive.services.recompress import plan

    with _open() as archive:
        chosen = archive.settings.policy(policy)
        if dry_run:
            with archive.unit_of_work() as uow:
                result = plan(uow.session, chosen, limit=limit or chosen.batch_size)
            console.print_json(json.dumps(result.as_dict()))
            return
        if queue:
            from workers.service import dispatch_task as dispatcher
        else:
            def dispatcher(task_id: int) -> str:
                jobs.run_task(archive, task_id)
                return f"inline-{task_id}"
        report = sweeps.start_sweep(archive, policy, dispatcher, limit=limit, respect_window=False)
        with archive.unit_of_work() as uow:
            summaries = query.list_jobs(uow.session, job_id=report.job_id) if report.job_id else []
    console.print(f"policy {policy}: {report.action}, {report.instances} instance(s)")
    if summaries:
        _print_jobs(summaries, "Re-compression")


@app.command()
def verify(
    study: Annotated[Optional[str], typer.Option(help="One study (Study Instance UID); default all.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-read and re-hash stored blobs; exits 1 and lists them per study when any is missing or corrupt."""
    from archive.services.integrity import verify_blobs

    with _open() as archive:
        report = verify_blobs(archive, study_uid=study)
    if as_json:
        console.print_json(json.dumps(report.as_dict()))
    else:
        console.print(f"checked {report.blobs_checked} blob(s), {_human(report.bytes_checked)}: "
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

    with _open() as archive:
        report = collect_garbage(archive, grace_seconds=archive.settings.gc_grace if grace is None else grace,
                                 dry_run=dry_run)
    console.print_json(json.dumps(report.as_dict()))


def main() -> None:
    try:
        app()
    except ArchiveError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
