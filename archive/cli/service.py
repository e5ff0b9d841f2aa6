"""Commands of the batch service: watcher, workers, beat, reconcile, re-compression."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from archive.cli._app import app, console, err_console, human, open_archive
from archive.cli.browse import print_jobs
from archive.config import Settings
from archive.kinds import Lane
from archive.services import jobs, query, sweeps
from archive.services.recompress import RecompressPlan
from archive.services.runtime import Archive

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
    with open_archive() as archive:
        watcher = InboxWatcher(archive, inbox, dispatch_task, stable_age=stable_age, poll=poll)
        err_console.print(f"watching {watcher.inbox} (stable age {watcher.stable_age:g} s, "
                          f"{'polling' if poll else 'events'}); Ctrl-C stops")
        watcher.run(stop)


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    name: Annotated[str, typer.Option(help="Celery node name.")] = "medarchive@%h",
    loglevel: Annotated[str, typer.Option()] = "INFO",
    lanes: Annotated[Optional[list[Lane]], typer.Option(
        "--lane", help="Queues taken: default, learned (the learned codecs' work; give a GPU or many-core machine "
                       "--lane learned). Repeatable; default: both.")] = None,
) -> None:
    """Start one Celery worker (production: one per container, scale the service)."""
    Settings.load().home.mkdir(parents=True, exist_ok=True)  # the embedded broker lives there
    from workers.service import celery_app, queue_of

    queues = ",".join(queue_of(lane) for lane in (lanes or list(Lane)))
    celery_app.worker_main(["worker", "--concurrency", str(concurrency), "--hostname", name,
                            "--loglevel", loglevel, "--queues", queues])


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
    scp: Annotated[Optional[bool], typer.Option("--scp/--no-scp", help="Also run the DICOM SCP (medarchive scp; "
                                                "default: setting scp_enabled).")] = None,
) -> None:
    """Watcher + worker(s) + beat (+ the DICOM SCP) as child processes (the embedded default: no servers)."""
    from workers.service import run_all

    settings = Settings.load()
    Archive.open(settings).close()  # create or migrate the embedded catalog once, before the children
    raise typer.Exit(run_all(inbox, workers=workers, concurrency=concurrency, poll=poll, console=err_console,
                             scp=settings.scp_enabled if scp is None else scp))


@app.command()
def reconcile(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON for scripts.")] = False,
) -> None:
    """Re-send unfinished work that no live task holds, and close finished jobs (beat runs this too)."""
    from workers.service import dispatch_task, queue_depth, require_broker

    require_broker()  # re-sending into a broker that is away would only defer the work again
    with open_archive() as archive:
        report = jobs.reconcile(archive, dispatch_task, queue_depth=queue_depth())
    if as_json:
        console.print_json(json.dumps(report.as_dict()))
        return
    done = report.as_dict()
    console.print(f"re-sent {len(done['redispatched'])} task(s){_ids(done['redispatched'])}", highlight=False)
    console.print(f"closed {len(done['finalized'])} finished job(s){_ids(done['finalized'])}", highlight=False)
    if "interrupted" in done:
        console.print(f"marked {len(done['interrupted'])} job(s) interrupted{_ids(done['interrupted'])}",
                      highlight=False)
    console.print(f"removed {len(done['spools_removed'])} spool folder(s)", highlight=False)


def _ids(ids: list[int], most: int = 10) -> str:
    if not ids:
        return ""
    shown = ", ".join(str(i) for i in ids[:most])
    return f" ({shown}{', …' if len(ids) > most else ''})"


@app.command()
def recompress(
    policy: Annotated[str, typer.Option("--policy", help="A policy name from the [policies] configuration.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what the policy selects; change nothing.")] = False,
    limit: Annotated[Optional[int], typer.Option(help="At most this many instances (default: the policy's "
                                                 "batch_size).")] = None,
    queue: Annotated[bool, typer.Option("--queue", help="Send to the workers instead of running here.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: print the selection as JSON.")] = False,
) -> None:
    """Run a re-compression policy by hand (ignoring its time window)."""
    from archive.services.recompress import plan

    with open_archive() as archive:
        chosen = archive.settings.policy(policy)
        if dry_run:
            with archive.unit_of_work() as uow:
                result = plan(uow.session, chosen, limit=limit or chosen.batch_size)
            if as_json:
                console.print_json(json.dumps(result.as_dict()))
            else:
                _print_plan(result)
            return
        if queue:
            from workers.service import dispatch_task as dispatcher, require_broker

            require_broker()
        else:
            def dispatcher(task_id: int, lane: Lane = Lane.DEFAULT) -> str:
                jobs.run_task(archive, task_id)
                return f"inline-{task_id}"
        report = sweeps.start_sweep(archive, policy, dispatcher, limit=limit, respect_window=False)
        with archive.unit_of_work() as uow:
            summaries = query.list_jobs(uow.session, job_id=report.job_id) if report.job_id else []
    if as_json:
        console.print_json(json.dumps({**report.as_dict(), "jobs": [s.as_dict() for s in summaries]}, default=str))
        return
    console.print(f"policy {policy}: {report.action}, {report.instances} instance(s)")
    if summaries:
        print_jobs(summaries, "Re-compression")


def _print_plan(plan: RecompressPlan) -> None:
    """The dry run as a sentence and two short breakdowns (fits 80 columns)."""
    target = {k: v for k, v in plan.target.items() if k != "id"}
    console.print(f"policy {plan.policy} (dry run, nothing changed) selects {plan.instances} instance(s)",
                  highlight=False)
    console.print(f"  in {plan.studies} study(ies), {human(plan.bytes_stored)} of pixel data stored now",
                  highlight=False)
    console.print(f"  target: {plan.target.get('id', '?')} {json.dumps(target) if target else ''}".rstrip(),
                  highlight=False)
    console.print(f"  this {plan.words}", highlight=False, soft_wrap=True,
                  style="bold red" if plan.lossy and not plan.keep_lossless else None)
    for label, counts in (("current codec", plan.by_codec), ("modality", plan.by_modality)):
        if counts:
            console.print(f"  by {label}: " + ", ".join(f"{k or '?'} {v}" for k, v in sorted(counts.items())),
                          highlight=False)
