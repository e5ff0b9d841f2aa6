"""Time limits inside a task, and the test-only fault switch that stands in for an instance that kills its worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from archive.errors import InstanceTimeLimitExceeded

@contextmanager
def instance_deadline(seconds: float) -> Iterator[None]:
    """Raise InstanceTimeLimitExceeded in this thread after ``seconds`` (main thread only, else no limit).

    The task's hard time limit (Celery kills the process) still covers code
    that never returns to Python; this one lets the rest of the chunk go on.
    """
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _expired(_signum: int, _frame: Any) -> None:
        raise InstanceTimeLimitExceeded(f"took longer than the per-instance limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def fault_point(label: str) -> None:
    """Test-only fault injection, off unless ``MEDARCHIVE_FAULT_*`` is set in a worker's environment.

    ``MEDARCHIVE_FAULT_DELAY`` (seconds) slows every instance so a test can
    kill a worker mid-study; ``MEDARCHIVE_FAULT_KILL`` (a substring of a path)
    makes the process SIGKILL itself on that instance: a poison instance that
    takes its worker down, which no real file does on demand.
    """
    delay = os.environ.get("MEDARCHIVE_FAULT_DELAY")
    if delay:
        time.sleep(float(delay))
    poison = os.environ.get("MEDARCHIVE_FAULT_KILL")
    if poison and poison in label:
        os.kill(os.getpid(), signal.SIGKILL)
