#!/usr/bin/env python
"""Service throughput: studies/hour and instances/s of the batch service, next to the codec work it wraps.

What is timed, on the same machine and in the same run (see benchmarks/README.md, "Service throughput"):

1. codec       JPEG-LS encode + decode + compare of every CT frame (the configured default codec via
               ``archive.codecs.get_codec``, decode via ``archive.codecs.decode_frame``), one process.
2. staging     ``stage_file`` for every CT file: read, parse, header serialisation, hashes, encode, verify,
               blob writes (fsync) -- everything an instance costs except its catalog rows.
3. ingest      ``ingest_paths`` (what ``medarchive ingest`` runs): per-instance catalog transactions, SQLite.
4. run_task    the service's own unit of work without a broker: ``submit_paths`` with a dispatcher that only
               collects task ids, then ``jobs.run_task`` for each, in this process (PostgreSQL and SQLite).
5. service     real ``python -m archive.cli worker`` processes (own process groups) on Redis + PostgreSQL and on
               the embedded broker (kombu SQLAlchemy transport on SQLite) + SQLite: time from ``submit_paths`` to
               every job done (the catalog is polled every 0.2 s; the end is the last job's ``finished_at``).

The CT set is ``ct-chest-tcia`` (36 files, 12 studies of 3 one-instance series) written ``--copies`` times with
fresh Study/Series/SOP Instance UIDs into a temporary folder. Every worker this script starts is stopped
(SIGTERM to its process group, SIGKILL after 20 s) and every temporary folder, PostgreSQL database and Redis
key it created is removed, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from archive.catalog.models import Instance, Job, JobItem, JobStatus, JobTask, Study  # noqa: E402
from archive.kinds import StorageMode  # noqa: E402
from archive.clock import aware_utc  # noqa: E402
from archive.codecs import decode_frame, get_codec  # noqa: E402
from archive.config import Settings  # noqa: E402
from archive.dicom.reader import iter_frames, read_instance  # noqa: E402
from archive.services import jobs  # noqa: E402
from archive.services.ingest import Outcome, StagedInstance, ingest_paths, stage_file  # noqa: E402
from archive.services.runtime import Archive  # noqa: E402

CT_GROUP = "ct-chest-tcia"
EMBEDDED_POLL_S = 0.1  # workers.transport.EmbeddedTransport.polling_interval (kombu's default is 1 s)
POLL_S = 0.2
FINAL_JOB = (JobStatus.DONE, JobStatus.FAILED)


# --------------------------------------------------------------------------- cleanup registry


class Cleanup:
    """Everything to undo, in reverse order, whatever happens."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, action: Callable[[], None]) -> None:
        self._actions.append((what, action))

    def pop_run(self, what: str) -> None:
        for i in range(len(self._actions) - 1, -1, -1):
            if self._actions[i][0] == what:
                _, action = self._actions.pop(i)
                _safely(what, action)
                return

    def run_all(self) -> None:
        while self._actions:
            what, action = self._actions.pop()
            _safely(what, action)


def _safely(what: str, action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as exc:  # cleanup must go on
        print(f"cleanup of {what} failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def _raise_on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------- machine and data


def _v(name: str) -> str:
    try:
        return dist_version(name)
    except PackageNotFoundError:
        return "-"


def machine_info(redis_url: str, pg_admin_url: str) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    info: dict[str, Any] = {
        "cpu_model": model or platform.processor(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": mem_gb,
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {n: _v(n) for n in ("celery", "kombu", "redis", "sqlalchemy", "psycopg", "pydicom",
                                        "imagecodecs", "pyjpegls", "numpy")},
    }
    with contextlib.suppress(Exception):
        import redis

        info["redis_server"] = redis.Redis.from_url(redis_url).info("server").get("redis_version")
    with contextlib.suppress(Exception):
        engine = sa.create_engine(pg_admin_url)
        with engine.connect() as conn:
            info["postgresql_server"] = conn.execute(sa.text("SHOW server_version")).scalar()
        engine.dispose()
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        info["git"] = commit + (" (uncommitted changes in the tree)" if dirty else "")
        info["git_modified"] = [line[3:] for line in subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True,
            check=True).stdout.splitlines()]
    return info


@dataclass
class FileSet:
    name: str
    roots: list[Path]  # folders handed to submit_paths / ingest_paths
    files: list[Path]
    studies: int
    series: int
    bytes_in: int
    description: str
    copy_roots: list[Path] = field(default_factory=list)  # CT only: one folder per copy

    @property
    def instances(self) -> int:
        return len(self.files)

    def subset(self, copies: int) -> FileSet:
        """The first ``copies`` copies of a CT set (same pixels, fewer studies)."""
        if not self.copy_roots or copies >= len(self.copy_roots):
            return self
        roots = self.copy_roots[:copies]
        files = [f for f in self.files if any(r in f.parents for r in roots)]
        per = len(self.copy_roots)
        return FileSet(f"{self.name}[{copies}]", roots, files, self.studies * copies // per,
                       self.series * copies // per, sum(f.stat().st_size for f in files),
                       f"{copies} of the {per} copies", roots)


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def make_ct_copies(data: Path, target: Path, copies: int, stacked: bool = False) -> FileSet:
    """Write ct-chest-tcia ``copies`` times with fresh Study/Series/SOP Instance UIDs (pixels untouched).

    ``stacked``: the copies of a slice join one series (fresh SOP Instance UIDs only), so a series holds
    ``copies`` instances as an acquired CT series does, instead of one.
    """
    source = data / CT_GROUP
    originals = _files_under(source)
    if not originals:
        raise SystemExit(f"no files under {source}")
    copy_roots = []
    written: list[Path] = []
    study_uids: set[str] = set()
    series_uids: set[str] = set()
    shared_uid: dict[str, str] = {}
    for k in range(copies):
        root = target / f"copy-{k:02d}"
        new_uid: dict[str, str] = shared_uid if stacked else {}

        def fresh(old: str, _map: dict[str, str] = new_uid) -> str:
            return _map.setdefault(old, generate_uid())

        for path in originals:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = fresh(str(ds.StudyInstanceUID))
            ds.SeriesInstanceUID = fresh(str(ds.SeriesInstanceUID))
            ds.SOPInstanceUID = fresh(f"sop:{ds.SOPInstanceUID}:{path}:{k}")
            if getattr(ds, "file_meta", None) is not None and "MediaStorageSOPInstanceUID" in ds.file_meta:
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            out = root / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out)
            written.append(out)
            study_uids.add(str(ds.StudyInstanceUID))
            series_uids.add(str(ds.SeriesInstanceUID))
        copy_roots.append(root)
    size = sum(p.stat().st_size for p in written)
    return FileSet(
        "ct", copy_roots, written, len(study_uids), len(series_uids), size,
        f"{CT_GROUP} x{copies} with fresh UIDs: {len(written)} instances 512x512 16-bit, "
        f"{len(study_uids)} studies, {len(series_uids)} series ({copies if stacked else 1} instance(s) each)",
        copy_roots,
    )


def make_mixed_copy(data: Path, target: Path) -> FileSet:
    """Every group of ../shared/data except broken/ (files lying directly in data/, e.g. README.md, left out)."""
    groups = sorted(p for p in data.iterdir() if p.is_dir() and p.name != "broken" and not p.name.startswith("."))
    for group in groups:
        shutil.copytree(group, target / group.name)
    for path in target.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    files = _files_under(target)
    from archive.dicom.reader import peek_uids

    studies: set[str] = set()
    series: set[str] = set()
    no_uids = 0
    for path in files:
        uids = peek_uids(path)
        if uids:
            studies.add(uids[0])
            series.add(uids[1])
        else:
            no_uids += 1
    return FileSet("mixed", [target], files, len(studies), len(series), sum(p.stat().st_size for p in files),
                   f"{data} minus broken/: {', '.join(g.name for g in groups)}; {len(files)} files, "
                   f"{len(studies)} studies and {len(series)} series by header UIDs"
                   + (f" + {no_uids} file(s) without UIDs (ACR-NEMA: the archive assigns them)" if no_uids else ""))


# --------------------------------------------------------------------------- in-process references


def _settings(home: Path, database_url: str | None = None, **env: str) -> Settings:
    environ = {"MEDARCHIVE_HOME": str(home), **env}
    if database_url:
        environ["MEDARCHIVE_DATABASE_URL"] = database_url
    return Settings.load(environ=environ)


def measure_codec(fileset: FileSet, codec_config: dict[str, Any]) -> dict[str, Any]:
    frames: list[np.ndarray] = []
    for path in fileset.files:
        parsed = read_instance(path)
        if parsed.mode is StorageMode.PIXELS:
            frames.extend(np.ascontiguousarray(f) for f in iter_frames(parsed))
    codec = get_codec(codec_config)
    decode_frame(codec.encode(frames[0]))  # warm-up, not timed
    enc_s = dec_s = cmp_s = 0.0
    bad = 0
    stored = 0
    for frame in frames:
        t0 = time.perf_counter()
        data = codec.encode(frame)
        t1 = time.perf_counter()
        back = decode_frame(data)
        t2 = time.perf_counter()
        exact = np.array_equal(back, frame)
        t3 = time.perf_counter()
        enc_s, dec_s, cmp_s = enc_s + t1 - t0, dec_s + t2 - t1, cmp_s + t3 - t2
        bad += not exact
        stored += len(data)
    raw = sum(f.nbytes for f in frames)
    total = enc_s + dec_s + cmp_s
    return {"what": f"{codec.codec_id} encode + decode_frame + compare, one process", "codec": codec.get_config(),
            "frames": len(frames), "raw_bytes": raw, "stored_bytes": stored, "not_exact": bad,
            "seconds": total, "encode_s": enc_s, "decode_s": dec_s, "compare_s": cmp_s,
            "encode_MBps": raw / enc_s / 1e6, "decode_MBps": raw / dec_s / 1e6}


def measure_staging(fileset: FileSet, home: Path) -> dict[str, Any]:
    settings = _settings(home)
    with Archive.open(settings, migrate=True) as archive:
        codec = get_codec(settings.codec)
        results: Counter[str] = Counter()
        t0 = time.perf_counter()
        for path in fileset.files:
            staged = stage_file(archive, path, codec, sync=False)
            results["staged" if isinstance(staged, StagedInstance) else staged.outcome.value] += 1
        archive.store.sync()  # blobs durable once for the lot, as a batch writer does before committing
        seconds = time.perf_counter() - t0
    return {"what": "stage_file per file (read, parse, header, hashes, encode, verify, blob writes), one sync at "
                    "the end; no catalog rows",
            "seconds": seconds, "results": dict(results)}


def measure_ingest(fileset: FileSet, home: Path) -> dict[str, Any]:
    settings = _settings(home)
    with Archive.open(settings, migrate=True) as archive:
        report = ingest_paths(archive, fileset.roots)
    counts = {o.value: report.count(o) for o in Outcome}
    return {"what": "ingest_paths, one catalog transaction per instance, SQLite", "seconds": report.seconds,
            "instances": report.instances, "studies": len(report.studies), "outcomes": counts}


def measure_run_task(fileset: FileSet, settings: Settings, profile_to: Path | None = None) -> dict[str, Any]:
    """The service's work without a broker: submit_paths (collecting dispatcher) + run_task per task, here."""
    with Archive.open(settings, migrate=True) as archive:
        sent: list[int] = []
        counter = iter(range(1, 10**9))

        def collect(task_id: int) -> str:
            sent.append(task_id)
            return f"local-{next(counter)}"

        t0 = time.perf_counter()
        jobs.submit_paths(archive, fileset.roots, collect)
        t1 = time.perf_counter()
        profiler = cProfile.Profile() if profile_to else None
        if profiler:
            profiler.enable()
        modes: Counter[str] = Counter()
        for task_id in sent:
            modes[jobs.run_task(archive, task_id).mode] += 1
        if profiler:
            profiler.disable()
        t2 = time.perf_counter()
        summary = _catalog_summary(archive)
    result = {"what": "submit_paths + jobs.run_task per task in this process (no broker)",
              "catalog": "postgresql" if not settings.is_sqlite else "sqlite",
              "seconds": t2 - t0, "submit_s": t1 - t0, "run_s": t2 - t1, "tasks": len(sent),
              "modes": dict(modes), **summary}
    if profiler and profile_to:
        profiler.dump_stats(str(profile_to))
        result["profile"] = _profile_tops(profile_to)
    return result


def _profile_tops(path: Path, n: int = 25) -> dict[str, list[str]]:
    tops = {}
    for key in ("tottime", "cumulative"):
        stream = io.StringIO()
        stats = pstats.Stats(str(path), stream=stream)
        stats.strip_dirs().sort_stats(key).print_stats(n)
        lines = [ln for ln in stream.getvalue().splitlines() if re.match(r"\s*\d", ln)]
        tops[key] = lines[:n]
    return tops


# --------------------------------------------------------------------------- the catalog


def _catalog_summary(archive: Archive) -> dict[str, Any]:
    with archive.unit_of_work() as uow:
        s = uow.session
        outcomes = {(o.value if o else st.value): n for st, o, n in s.execute(
            select(JobItem.status, JobItem.outcome, func.count()).group_by(JobItem.status, JobItem.outcome))}
        job_status = {st.value: n for st, n in s.execute(select(Job.status, func.count()).group_by(Job.status))}
        deliveries = s.scalar(select(func.coalesce(func.sum(JobTask.deliveries), 0))) or 0
        dispatches = s.scalar(select(func.coalesce(func.sum(JobTask.dispatches), 0))) or 0
        tasks = s.scalar(select(func.count()).select_from(JobTask)) or 0
        instances = s.scalar(select(func.count()).select_from(Instance)) or 0
        bytes_in = s.scalar(select(func.coalesce(func.sum(Instance.source_size), 0))) or 0
        studies = s.scalar(select(func.count()).select_from(Study)) or 0
        stored = s.scalar(select(func.coalesce(func.sum(Study.bytes_stored), 0))) or 0
        errors = [e for (e,) in s.execute(select(Job.error).where(Job.error.is_not(None)).limit(5))]
    return {"instances": int(instances), "studies": int(studies), "bytes_in": int(bytes_in),
            "bytes_stored": int(stored), "tasks": int(tasks), "deliveries": int(deliveries),
            "dispatches": int(dispatches), "item_outcomes": outcomes, "job_status": job_status,
            "job_errors": errors}


class PostgresDatabases:
    def __init__(self, admin_url: str, cleanup: Cleanup) -> None:
        self.admin_url = admin_url
        self.cleanup = cleanup

    def create(self) -> str:
        name = f"medarchive_bench_{uuid.uuid4().hex[:10]}"
        admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        self.cleanup.push(f"db:{name}", lambda: self.drop(name))
        return self.admin_url.rsplit("/", 1)[0] + f"/{name}"

    def drop(self, name: str) -> None:
        admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()

    def drop_url(self, url: str) -> None:
        self.cleanup.pop_run(f"db:{url.rsplit('/', 1)[1]}")


# --------------------------------------------------------------------------- worker processes


@dataclass
class WorkerSpec:
    nodes: int
    concurrency: int

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        text = text.strip().lower()
        if "x" in text:
            nodes, conc = text.split("x", 1)
            return cls(int(nodes), int(conc))
        return cls(1, int(text))

    @property
    def processes(self) -> int:
        return self.nodes * self.concurrency

    @property
    def label(self) -> str:
        if self.nodes == 1:
            return f"{self.processes} (1 node, -c {self.concurrency})"
        return f"{self.processes} ({self.nodes} nodes, -c {self.concurrency})"

    @property
    def short(self) -> str:
        return f"{self.nodes}x{self.concurrency}"


@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _child_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MEDARCHIVE_")}
    return {**base, **env, "PYTHONUNBUFFERED": "1"}


def start_worker(name: str, concurrency: int, env: dict[str, str], log: Path, cleanup: Cleanup,
                 command: Sequence[str] | None = None) -> Worker:
    argv = list(command) if command else [sys.executable, "-m", "archive.cli", "worker", "--concurrency",
                                          str(concurrency), "--name", name, "--loglevel", "INFO"]
    handle = log.open("ab")
    process = subprocess.Popen(argv, cwd=REPO, env=_child_env(env), start_new_session=True,
                               stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    worker = Worker(name, process, log)
    cleanup.push(f"worker:{name}", lambda: stop_worker(worker))
    return worker


def stop_worker(worker: Worker, grace: float = 20.0) -> None:
    """SIGTERM the worker's process group (main process and pool), SIGKILL what is left after ``grace``."""
    process = worker.process
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # pool children left behind, if any
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def wait_ready(workers: Sequence[Worker], app: Any | None, timeout: float = 90.0) -> float:
    """Until every node logged "ready." (and answers a ping on Redis) and the on-start reconcile tasks ran."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    pinged = app is None
    while time.monotonic() < deadline:
        for w in workers:
            if w.process.poll() is not None:
                raise RuntimeError(f"worker {w.name} exited with {w.process.returncode}:\n{w.text()[-3000:]}")
        texts = [w.text() for w in workers]
        ready = all(re.search(r"@\S+ ready\.", t) for t in texts)
        if ready and not pinged and app is not None:
            replies = app.control.ping(destination=[w.name for w in workers], timeout=1.0)
            pinged = len(replies) >= len(workers)
        reconciled = sum(len(re.findall(r"medarchive\.reconcile\[[^\]]+\] succeeded", t)) for t in texts)
        if ready and pinged and reconciled >= len(workers):
            return time.perf_counter() - t0
        time.sleep(0.1)
    tails = "\n".join(f"--- {w.name}\n{w.text()[-2000:]}" for w in workers)
    raise RuntimeError(f"workers not ready after {timeout:g} s\n{tails}")


def _celery_ids(texts: Sequence[str]) -> set[str]:
    return set(re.findall(r"\[([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\]", "\n".join(texts)))


def clean_redis(redis_url: str, queue: str, task_ids: set[str]) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"*{queue}*", count=1000))
    keys += [f"celery-task-meta-{t}" for t in task_ids]
    removed = 0
    for start in range(0, len(keys), 500):
        removed += int(client.delete(*keys[start:start + 500]) or 0)
    client.close()
    return removed


# --------------------------------------------------------------------------- one service run


def run_service(
    fileset: FileSet, broker: str, spec: WorkerSpec, work: Path, args: argparse.Namespace, cleanup: Cleanup,
    pg: PostgresDatabases, tag: str,
) -> dict[str, Any]:
    from workers.app import create_app

    run_dir = work / f"service-{tag}"
    home = run_dir / "home"
    run_dir.mkdir(parents=True)
    queue = f"medarchive-bench-{uuid.uuid4().hex[:12]}"
    env = {"MEDARCHIVE_HOME": str(home), "MEDARCHIVE_QUEUE": queue}
    pg_url = None
    if broker == "redis":
        pg_url = pg.create()
        env["MEDARCHIVE_DATABASE_URL"] = pg_url
        env["MEDARCHIVE_BROKER_URL"] = args.redis_url
    else:
        env["MEDARCHIVE_DATABASE_URL"] = f"sqlite:///{home / 'catalog.sqlite'}"
    settings = Settings.load(environ=env)
    workers: list[Worker] = []
    sent: list[str] = []
    result: dict[str, Any] = {
        "broker": broker, "catalog": "postgresql" if pg_url else "sqlite", "workers": spec.label,
        "nodes": spec.nodes, "concurrency": spec.concurrency, "processes": spec.processes, "set": fileset.name,
        "queue": queue, "chunk_size": settings.chunk_size,
        "broker_url": settings.effective_broker_url.split("@")[-1],
    }
    archive = Archive.open(settings, migrate=True)
    try:
        app = create_app(settings)
        token = uuid.uuid4().hex[:6]
        for i in range(spec.nodes):
            name = f"bench{i}-{token}@{socket.gethostname()}"
            workers.append(start_worker(name, spec.concurrency, env, run_dir / f"worker{i}.log", cleanup))
        result["ready_s"] = wait_ready(workers, app if broker == "redis" else None)

        def dispatcher(task_id: int) -> str:
            message_id = str(app.send_task("medarchive.process_task", args=(task_id,)).id)
            sent.append(message_id)
            return message_id

        result["loadavg_before"] = os.getloadavg()[0]
        started_at = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        jobs.submit_paths(archive, fileset.roots, dispatcher)
        submit_s = time.perf_counter() - t0
        deadline = time.monotonic() + args.run_timeout
        polls = 0
        while True:
            with archive.unit_of_work() as uow:
                total, open_ = uow.session.execute(
                    select(func.count(), func.count().filter(Job.status.not_in(FINAL_JOB)))
                ).one()
            polls += 1
            if total and not open_:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{open_} of {total} jobs not finished after {args.run_timeout:g} s\n"
                                   + "\n".join(f"--- {w.name}\n{w.text()[-2000:]}" for w in workers))
            for w in workers:
                if w.process.poll() is not None:
                    raise RuntimeError(f"worker {w.name} died ({w.process.returncode}):\n{w.text()[-3000:]}")
            time.sleep(POLL_S)
        polled_s = time.perf_counter() - t0
        with archive.unit_of_work() as uow:
            last = uow.session.scalar(select(func.max(Job.finished_at)))
            first_start = uow.session.scalar(select(func.min(Job.started_at)))
        last = aware_utc(last)  # SQLite hands back naive UTC
        first_start = aware_utc(first_start)
        wall = (last - started_at).total_seconds() if last else polled_s
        result.update(_catalog_summary(archive))
        result.update({
            "submit_s": submit_s, "wall_s": wall, "polled_wall_s": polled_s, "polls": polls,
            "first_task_started_s": (first_start - started_at).total_seconds() if first_start else None,
            "messages_sent": len(sent), "loadavg_after": os.getloadavg()[0],
        })
        if result["instances"] != fileset.instances and fileset.name.startswith("ct"):
            raise RuntimeError(f"{result['instances']} instances archived, {fileset.instances} expected: "
                               f"{result['item_outcomes']} {result['job_errors']}")
        _rates(result)
        return result
    finally:
        texts = [w.text() for w in workers]
        for w in workers:
            cleanup.pop_run(f"worker:{w.name}")
        result["worker_log_errors"] = sorted({ln.strip()[:200] for t in texts for ln in t.splitlines()
                                              if re.search(r"\b(ERROR|CRITICAL|Traceback)\b", ln)})[:10]
        result["retries_logged"] = sum(t.count(" retry: ") for t in texts)
        archive.close()
        if broker == "redis":
            with contextlib.suppress(Exception):
                result["redis_keys_removed"] = clean_redis(args.redis_url, queue, set(sent) | _celery_ids(texts))
        if pg_url:
            pg.drop_url(pg_url)
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def _rates(r: dict[str, Any]) -> None:
    wall = r["wall_s"]
    r["instances_per_s"] = r["instances"] / wall if wall else None
    r["studies_per_hour"] = r["studies"] * 3600 / wall if wall else None
    r["MBps"] = r["bytes_in"] / wall / 1e6 if wall else None


def _ratios(r: dict[str, Any], per_instance: dict[str, float], cores: int) -> None:
    """Service wall time over a reference's time for the same number of instances.

    ``x_<ref>`` divides the reference by the processes that can run at once (min(processes, cores)):
    1.00 = as fast as that work alone, perfectly parallel; 1.15 = 15 % added. ``raw_x_<ref>`` does not divide.
    """
    par = max(1, min(r["processes"], cores))
    r["parallel"] = par
    for ref, seconds_per_instance in per_instance.items():
        ref_s = seconds_per_instance * r["instances"]
        r[f"raw_x_{ref}"] = r["wall_s"] / ref_s if ref_s else None
        r[f"x_{ref}"] = r["wall_s"] / (ref_s / par) if ref_s else None


# --------------------------------------------------------------------------- worker profile


def profile_worker(fileset: FileSet, work: Path, args: argparse.Namespace, cleanup: Cleanup,
                   pg: PostgresDatabases) -> dict[str, Any]:
    """One Redis + PostgreSQL worker with the solo pool under cProfile: where a real worker's time goes."""
    from workers.app import create_app

    run_dir = work / "profile-worker"
    home = run_dir / "home"
    run_dir.mkdir(parents=True)
    queue = f"medarchive-bench-{uuid.uuid4().hex[:12]}"
    pg_url = pg.create()
    env = {"MEDARCHIVE_HOME": str(home), "MEDARCHIVE_QUEUE": queue, "MEDARCHIVE_DATABASE_URL": pg_url,
           "MEDARCHIVE_BROKER_URL": args.redis_url}
    settings = Settings.load(environ=env)
    prof = run_dir / "worker.prof"
    name = f"benchprof-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    command = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "celery", "-A", "workers.app", "worker",
               "--pool", "solo", "--concurrency", "1", "--hostname", name, "--loglevel", "INFO", "--queues", queue]
    archive = Archive.open(settings, migrate=True)
    sent: list[str] = []
    worker: Worker | None = None
    try:
        app = create_app(settings)
        worker = start_worker(name, 1, env, run_dir / "worker.log", cleanup, command=command)
        wait_ready([worker], app)

        def dispatcher(task_id: int) -> str:
            message_id = str(app.send_task("medarchive.process_task", args=(task_id,)).id)
            sent.append(message_id)
            return message_id

        t0 = time.perf_counter()
        jobs.submit_paths(archive, fileset.roots, dispatcher)
        while True:
            with archive.unit_of_work() as uow:
                total, open_ = uow.session.execute(
                    select(func.count(), func.count().filter(Job.status.not_in(FINAL_JOB)))).one()
            if total and not open_:
                break
            if time.perf_counter() - t0 > args.run_timeout:
                raise RuntimeError("profiled worker did not finish")
            time.sleep(POLL_S)
        wall = time.perf_counter() - t0
        cleanup.pop_run(f"worker:{name}")  # SIGTERM: warm shutdown, cProfile writes its file
        for _ in range(50):
            if prof.exists() and prof.stat().st_size:
                break
            time.sleep(0.1)
        out = {"what": "celery worker --pool solo under cProfile, Redis + PostgreSQL (times inflated by profiling)",
               "wall_s": wall, "tasks": len(sent)}
        if prof.exists():
            out["profile"] = _profile_tops(prof, 30)
            if args.keep_profiles:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(prof, args.out.parent / "service-worker.prof")
        return out
    finally:
        if worker is not None:
            cleanup.pop_run(f"worker:{name}")
        archive.close()
        with contextlib.suppress(Exception):
            clean_redis(args.redis_url, queue, set(sent) | _celery_ids([worker.text()] if worker else []))
        pg.drop_url(pg_url)
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


# --------------------------------------------------------------------------- report


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def print_report(res: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        Console = Table = None  # type: ignore[assignment,misc]  # noqa: N806

    def table(title: str, header: list[str], rows: list[list[str]]) -> None:
        if Table is not None:
            t = Table(title=title, title_justify="left")
            for i, h in enumerate(header):
                t.add_column(h, justify="left" if i < 2 else "right")
            for row in rows:
                t.add_row(*row)
            Console(width=max(150, shutil.get_terminal_size().columns)).print(t)
        else:
            print(title)
            print(" | ".join(header))
            for row in rows:
                print(" | ".join(row))
        print()

    m = res["machine"]
    print(f"\n{res['date']}  {m['cpu_model']}, {m['cores']} cores, {m.get('memory_gb')} GB, Python {m['python']}, "
          f"Redis {m.get('redis_server', '?')}, PostgreSQL {m.get('postgresql_server', '?')}, git {m.get('git', '?')}")
    ct = res["data"]["ct"]
    print(f"CT set: {ct['description']} ({ct['bytes_in'] / 1e6:.1f} MB)")
    if "mixed" in res["data"]:
        mx = res["data"]["mixed"]
        print(f"mixed set: {mx['description']} ({mx['bytes_in'] / 1e6:.1f} MB)")
    print()
    ref = res["reference"]
    n = ct["instances"]
    rows = []
    for key, label in (("codec", "codec: JPEG-LS encode+decode+compare"), ("staging", "stage_file (no catalog)"),
                       ("ingest_sqlite", "ingest_paths, SQLite"), ("run_task_postgresql", "run_task in-process, PostgreSQL"),
                       ("run_task_sqlite", "run_task in-process, SQLite")):
        r = ref.get(key)
        if not r or "seconds" not in r:
            continue
        s = r["seconds"]
        rows.append([label, str(n), _fmt(s), _fmt(n / s, 1), _fmt(ct["studies"] * 3600 / s, 0),
                     _fmt(ct["bytes_in"] / s / 1e6, 1), _fmt(s / ref["codec"]["seconds"]),
                     _fmt(s / ref["staging"]["seconds"]) if "staging" in ref else "-"])
    table("In-process, one process, CT set", ["work", "inst", "s", "inst/s", "studies/h", "MB/s", "x codec",
                                              "x staging"], rows)
    rows = []
    for r in res["service"]:
        if "error" in r:
            rows.append([r["broker"], r["workers"], *["-"] * 10, "ERROR " + r["error"][:60]])
            continue
        note = []
        if r["broker"] == "embedded":
            note.append(f"broker polls every {EMBEDDED_POLL_S:g} s")
        if r.get("deliveries", 0) > r.get("tasks", 0):
            note.append(f"{r['deliveries'] - r['tasks']} redeliveries")
        if r.get("retries_logged"):
            note.append(f"{r['retries_logged']} retries")
        bad = {k: v for k, v in r.get("item_outcomes", {}).items() if k != "stored"}
        if bad:
            note.append(f"outcomes {bad}")
        rows.append([r["broker"] + "/" + r["catalog"], r["workers"], str(r["instances"]), str(r["studies"]),
                     _fmt(r["wall_s"]), _fmt(r["submit_s"]), _fmt(r.get("first_task_started_s")), _fmt(r["instances_per_s"], 1),
                     _fmt(r["studies_per_hour"], 0), _fmt(r["MBps"], 1), _fmt(r.get("x_codec")),
                     _fmt(r.get("x_staging")), "; ".join(note)])
    table("Service, CT set (x codec / x staging: wall over the reference / min(processes, cores); 1.15 = +15 %)",
          ["broker/catalog", "worker processes", "inst", "studies", "wall s", "submit s", "1st task s", "inst/s",
           "studies/h",
           "MB/s", "x codec", "x staging", "notes"], rows)
    if res.get("mixed"):
        rows = []
        for r in res["mixed"]:
            if "error" in r:
                rows.append([r["broker"], r["workers"], "-", "-", "-", "-", "-", "-", "ERROR " + r["error"][:60]])
                continue
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r.get("item_outcomes", {}).items()))
            rows.append([r["broker"] + "/" + r["catalog"], r["workers"], str(r["instances"]), str(r["studies"]),
                         _fmt(r["wall_s"]), _fmt(r["instances_per_s"], 1), _fmt(r["studies_per_hour"], 0),
                         _fmt(r["MBps"], 1), outcomes])
        mi = res["reference"].get("ingest_mixed_sqlite")
        if mi and "seconds" in mi:
            rows.append(["in-process ingest_paths/sqlite", "1", str(mi["instances"]), str(mi["studies"]),
                         _fmt(mi["seconds"]), _fmt(mi["instances"] / mi["seconds"], 1),
                         _fmt(mi["studies"] * 3600 / mi["seconds"], 0),
                         _fmt(res["data"]["mixed"]["bytes_in"] / mi["seconds"] / 1e6, 1), "(reference)"])
        table("Service, mixed set (../shared/data minus broken/)",
              ["broker/catalog", "worker processes", "inst", "studies", "wall s", "inst/s", "studies/h", "MB/s",
               "item outcomes"], rows)
    for key in ("run_task_postgresql", "worker"):
        prof = (res.get("profiles", {}).get(key) or {}).get("profile")
        if prof:
            print(f"Top functions by own time, {key}, {res['profiles']['set']} (cProfile; not the timed runs):")
            for line in prof["tottime"][:15]:
                print("  " + line)
            print()
    for note in res["notes"]:
        print("note: " + note)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="the shared DICOM folder (default ../shared/data relative to the repository)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "service.json")
    parser.add_argument("--copies", type=int, default=10,
                        help="copies of ct-chest-tcia (36 files, 12 studies) with fresh UIDs (default 10: 360 instances)")
    parser.add_argument("--stacked", action="store_true",
                        help="copies of a slice join one series: series of --copies instances, as acquired CT "
                             "series are (default: every copy is a new one-instance series)")
    parser.add_argument("--embedded-copies", type=int, default=0,
                        help="use only the first N copies for the embedded broker's CT runs (default 0 = all)")
    parser.add_argument("--brokers", default="redis,embedded")
    parser.add_argument("--workers", default="1,2",
                        help="worker process counts: N = one node with --concurrency N; AxB = A nodes with "
                             "--concurrency B (default 1,2)")
    parser.add_argument("--mixed-workers", default="2",
                        help="worker specs for the mixed-data runs on the whole of --data minus broken/ "
                             "(empty: skip them)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                        help="an admin connection: the script creates and drops its own database per run")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="seconds per service run")
    parser.add_argument("--skip-reference", action="store_true", help="skip the in-process run_task figures")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed runs, cProfile run_task in-process and a solo-pool worker on "
                             "Redis + PostgreSQL (--profile-copies copies; profiles go to the JSON, not the tables)")
    parser.add_argument("--profile-copies", type=int, default=2, help="CT copies profiled (default 2; 0 = all)")
    parser.add_argument("--keep-profiles", action="store_true", help="keep the .prof files next to --out")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (debugging)")
    parser.add_argument("--tmp", type=Path, default=None, help="parent of the temporary folder")
    args = parser.parse_args(argv)
    args.out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    for b in brokers:
        if b not in ("redis", "embedded"):
            parser.error(f"unknown broker {b!r} (redis, embedded)")
    specs = [WorkerSpec.parse(w) for w in args.workers.split(",") if w.strip()]
    mixed_specs = [WorkerSpec.parse(w) for w in args.mixed_workers.split(",") if w.strip()]
    if not args.data.is_dir():
        parser.error(f"no data folder at {args.data}")

    signal.signal(signal.SIGTERM, _raise_on_signal)
    signal.signal(signal.SIGHUP, _raise_on_signal)
    cleanup = Cleanup()
    pg = PostgresDatabases(args.postgres_url, cleanup)
    work = Path(tempfile.mkdtemp(prefix="medarchive-service-bench-", dir=args.tmp))
    if not args.keep:
        cleanup.push("tmp", lambda: shutil.rmtree(work, ignore_errors=True))
    started = time.perf_counter()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    res: dict[str, Any] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "machine": machine_info(args.redis_url, args.postgres_url),
                           "args": {k: str(v) for k, v in vars(args).items()}, "data": {}, "reference": {},
                           "service": [], "mixed": [], "notes": []}
    try:
        def log(msg: str) -> None:
            print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

        ct = make_ct_copies(args.data, work / "ct", args.copies, stacked=args.stacked)
        res["data"]["ct"] = {"description": ct.description, "instances": ct.instances, "studies": ct.studies,
                             "series": ct.series, "bytes_in": ct.bytes_in, "copies": args.copies}
        log(f"CT set written: {ct.description}")
        mixed = None
        if mixed_specs:
            mixed = make_mixed_copy(args.data, work / "mixed")
            res["data"]["mixed"] = {"description": mixed.description, "instances": mixed.instances,
                                    "studies": mixed.studies, "series": mixed.series, "bytes_in": mixed.bytes_in}
        default_codec = Settings.load(environ={"MEDARCHIVE_HOME": str(work)}).codec

        ref = res["reference"]
        ref["codec"] = measure_codec(ct, default_codec)
        log(f"codec: {ref['codec']['seconds']:.2f} s for {ref['codec']['frames']} frames")
        ref["staging"] = measure_staging(ct, work / "home-staging")
        log(f"staging: {ref['staging']['seconds']:.2f} s")
        ref["ingest_sqlite"] = measure_ingest(ct, work / "home-ingest")
        log(f"ingest_paths: {ref['ingest_sqlite']['seconds']:.2f} s")
        if not args.skip_reference:
            for catalog in ("postgresql", "sqlite"):
                home = work / f"home-runtask-{catalog}"
                url = pg.create() if catalog == "postgresql" else None
                try:
                    ref[f"run_task_{catalog}"] = measure_run_task(ct, _settings(home, url))
                except Exception as exc:
                    traceback.print_exc()
                    ref[f"run_task_{catalog}"] = {"error": f"{type(exc).__name__}: {exc}"}
                finally:
                    if url:
                        pg.drop_url(url)
                log(f"run_task {catalog}: {ref[f'run_task_{catalog}'].get('seconds', float('nan')):.2f} s")
        if mixed is not None:
            ref["ingest_mixed_sqlite"] = measure_ingest(mixed, work / "home-ingest-mixed")
        per_instance = {"codec": ref["codec"]["seconds"] / ct.instances,
                        "staging": ref["staging"]["seconds"] / ct.instances}

        runs = [(b, s, "ct") for b in brokers for s in specs]
        runs += [(b, s, "mixed") for b in brokers for s in mixed_specs] if mixed is not None else []
        for i, (broker, spec, which) in enumerate(runs):
            fileset = ct if which == "ct" else mixed
            assert fileset is not None
            if which == "ct" and broker == "embedded" and args.embedded_copies > 0:
                fileset = ct.subset(args.embedded_copies)
            tag = f"{i:02d}-{broker}-{spec.short}-{which}"
            log(f"service {broker} {spec.label} on {fileset.name} ({fileset.instances} files) ...")
            try:
                r = run_service(fileset, broker, spec, work, args, cleanup, pg, tag)
                r["files"] = fileset.instances
                if which == "ct":
                    _ratios(r, per_instance, cores)
                log(f"  wall {r['wall_s']:.2f} s, {r['instances_per_s']:.1f} inst/s, "
                    f"{r['studies_per_hour']:.0f} studies/h" + (f", x codec {r['x_codec']:.2f}, x staging "
                                                                  f"{r['x_staging']:.2f}" if which == "ct" else ""))
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                traceback.print_exc()
                r = {"broker": broker, "workers": spec.label, "set": fileset.name,
                     "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
            res["service" if which == "ct" else "mixed"].append(r)
        if args.profile:
            # after the timed runs and on fewer copies: profiling slows everything it watches
            small = ct.subset(args.profile_copies) if args.profile_copies else ct
            res["profiles"] = {"set": f"{small.instances} CT instances"}
            url = pg.create()
            prof = work / "run_task-postgresql.prof"
            log(f"profiling run_task in-process on PostgreSQL ({small.instances} instances) ...")
            try:
                res["profiles"]["run_task_postgresql"] = measure_run_task(
                    small, _settings(work / "home-profile", url), prof)
                if args.keep_profiles:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(prof, args.out.parent / "service-run_task-postgresql.prof")
            except Exception as exc:
                traceback.print_exc()
                res["profiles"]["run_task_postgresql"] = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                pg.drop_url(url)
            if "redis" in brokers:
                log("profiling a solo-pool worker on Redis ...")
                try:
                    res["profiles"]["worker"] = profile_worker(small, work, args, cleanup, pg)
                except Exception as exc:
                    traceback.print_exc()
                    res["profiles"]["worker"] = {"error": f"{type(exc).__name__}: {exc}"}
        res["notes"] = [
            f"'2 workers' here means {', '.join(s.label for s in specs if s.processes > 1) or '-'} on this "
            f"{cores}-core machine (AxB in --workers starts A nodes).",
            f"The embedded broker (kombu SQLAlchemy transport on SQLite) polls for messages every "
            f"{EMBEDDED_POLL_S:g} s and a worker takes at most prefetch (= concurrency) messages per poll.",
            "ct-chest-tcia series hold one instance each (unless --stacked): small series of a study share a task, "
            "so a task here is one study of three instances.",
            "x codec / x staging: service wall time over the reference seconds for the same instance count divided by "
            "min(processes, cores); raw_x_* in the JSON do not divide.",
        ]
        res["total_s"] = time.perf_counter() - started
    except KeyboardInterrupt:
        print("interrupted: stopping workers and cleaning up", file=sys.stderr)
        res["interrupted"] = True
        raise
    finally:
        cleanup.run_all()
        if res.get("service") or res.get("reference"):
            args.out.parent.mkdir(parents=True, exist_ok=True)
            gitignore = args.out.parent / ".gitignore"
            if args.out.parent.name == "results" and not gitignore.exists():
                gitignore.write_text("*\n")
            args.out.write_text(json.dumps(res, indent=2, default=str))
    print_report(res)
    print(f"\nresults: {args.out} ({res['total_s']:.0f} s)", file=sys.stderr)
    return 0 if all("error" not in r for r in res["service"] + res["mixed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
