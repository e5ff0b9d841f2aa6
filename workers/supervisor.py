"""``medarchive run``: watcher, worker(s), beat (and the DICOM SCP when enabled) as child processes of one command.

For the embedded default on one machine. Ctrl-C (or SIGTERM) asks every child
to stop (SIGTERM: Celery finishes its current task, the watcher stops after
its current step), waits, and kills only what ignores that. A child that dies
on its own is restarted, with a pause so a crash loop cannot spin.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from rich.console import Console


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = field(default=0.0)

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv)
        self.started = time.monotonic()


def role_argv(role: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "archive.cli", role, *args]


def run_all(inbox: Path, *, workers: int, concurrency: int, poll: bool, console: Console,
            extra_watch_args: Sequence[str] = (), scp: bool = False) -> int:
    children = [Child("watcher", role_argv("watch", str(inbox), *(["--poll"] if poll else []), *extra_watch_args))]
    if scp:
        children.append(Child("scp", role_argv("scp")))
    children += [Child(f"worker-{n + 1}", role_argv("worker", "--concurrency", str(concurrency), "--name",
                                                     f"medarchive-{n + 1}@%h")) for n in range(workers)]
    children.append(Child("beat", role_argv("beat")))
    stopping = False

    def _stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for child in children:
            child.start()
            console.print(f"started {child.name} (pid {child.process.pid if child.process else '?'})")
        while not stopping:
            time.sleep(0.5)
            for child in children:
                assert child.process is not None
                code = child.process.poll()
                if code is None or stopping:
                    continue
                pause = min(30.0, 2.0 ** min(child.restarts, 5))
                console.print(f"[yellow]{child.name} exited with {code}; restarting in {pause:.0f} s[/yellow]")
                time.sleep(pause)
                child.restarts += 1
                child.start()
    finally:
        console.print("stopping: waiting for the current tasks to finish")
        for child in children:
            if child.process and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for child in children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                console.print(f"[red]{child.name} did not stop; killing it[/red]")
                child.process.kill()
                child.process.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    console.print("stopped")
    return 0
