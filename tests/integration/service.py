"""A real batch service for tests: Celery worker, beat and watcher processes on a real broker.

Each role runs as the ``medarchive`` command would start it, in its own
process group so a test can SIGKILL a whole worker (main process and pool).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func, select

from archive.catalog.models import Instance, Job, JobItem, JobStatus
from archive.config import Settings
from archive.kinds import Lane
from archive.services.runtime import Archive

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Service:
    """Settings shared by every process of one test's service, and those processes."""

    home: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        return Settings.load(environ=self.env)

    @contextmanager
    def archive(self) -> Iterator[Archive]:
        opened = Archive.open(self.settings)
        try:
            yield opened
        finally:
            opened.close()

    def start(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.home.parent / f"{name}.log"
        self.logs[name] = log
        env = {**os.environ, **self.env, **(extra_env or {})}
        process = subprocess.Popen(
            [sys.executable, "-m", "archive.cli", *args], cwd=REPO, env=env, start_new_session=True,
            stdout=log.open("ab"), stderr=subprocess.STDOUT,
        )
        self.processes[name] = process
        return process

    def start_worker(self, name: str = "worker", concurrency: int = 1, lane: Lane | None = None,
                     **extra_env: str) -> subprocess.Popen[bytes]:
        lanes = ("--lane", lane.value) if lane is not None else ()
        return self.start(name, "worker", "--concurrency", str(concurrency), "--name", f"{name}-{os.getpid()}@%h",
                          "--loglevel", "INFO", *lanes, extra_env=extra_env)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a role's whole process group (a Celery worker's main process and its pool)."""
        process = self.processes.pop(name)
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        process.wait(timeout=60)

    def stop_all(self) -> None:
        for name in list(self.processes):
            process = self.processes[name]
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=5)  # teardown only; clean shutdown is tested by the `run` test
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            self.processes.pop(name)

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            parts.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    def dispatcher(self) -> Callable[[int, Lane], str]:
        """Send job tasks from the test process, as the watcher or the CLI would (each on its lane's queue)."""
        from workers.app import create_app

        app = create_app(self.settings)
        queues = {Lane.DEFAULT: self.settings.queue, Lane.LEARNED: self.settings.learned_queue}
        return lambda task_id, lane: str(app.send_task("medarchive.process_task", args=(task_id,),
                                                       queue=queues[lane]).id)

    def wait_for(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.log_tail()}")

    def jobs_finished(self, expected: int = 1) -> list[Job] | None:
        with self.archive() as archive, archive.unit_of_work() as uow:
            jobs = list(uow.session.scalars(select(Job).order_by(Job.id)))
            if len(jobs) >= expected and all(j.status in (JobStatus.DONE, JobStatus.FAILED) for j in jobs):
                uow.session.expunge_all()  # plain snapshots for the test to read
                return jobs
        return None

    def items_final(self) -> int:
        with self.archive() as archive, archive.unit_of_work() as uow:
            return int(uow.session.scalar(
                select(func.count()).select_from(JobItem).where(JobItem.status.in_(["done", "quarantined", "failed"]))
            ) or 0)

    def items_running(self) -> int:
        with self.archive() as archive, archive.unit_of_work() as uow:
            return int(uow.session.scalar(
                select(func.count()).select_from(JobItem).where(JobItem.status == "running")
            ) or 0)

    def instance_counts(self) -> dict[str, int]:
        """SOP Instance UID -> catalog rows (must be 1 each: nothing lost, nothing duplicated)."""
        with self.archive() as archive, archive.unit_of_work() as uow:
            return {uid: n for uid, n in uow.session.execute(
                select(Instance.sop_instance_uid, func.count()).group_by(Instance.sop_instance_uid)
            )}


class PrivateRedis:
    """A real redis-server of the test's own, so restarting it disturbs nothing else."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port)
        for _ in range(100):
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise AssertionError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
