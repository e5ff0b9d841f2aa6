"""``medarchive watch INBOX``: turn files dropped into a folder into queued study jobs.

A file is *ready* once its size and mtime have not changed for
``file_settle`` seconds (a scanner or a copy may still be writing it); hidden
and temporary files (``.name``, ``name~``, ``.part``, ``.tmp``) are ignored. A
study is *stable* once no new instance has become ready for ``stable_age``
seconds — Orthanc's StableAge — and is then moved into its own spool folder
and queued once (:func:`archive.services.spool.spool_study`). Events come from
watchdog (inotify), or from polling for network shares where events do not
reach us; a periodic rescan catches whatever events were missed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from archive.dicom.reader import peek_uids
from archive.services.ingest import is_hidden_or_temporary
from archive.services.jobs import UNREADABLE, Dispatcher
from archive.services.spool import resume_spooling, spool_study
from archive.services.runtime import Archive

log = logging.getLogger(__name__)
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini"})
RECENT_JOBS = 100  # spooled job ids a watcher remembers (the catalog keeps them all)


def is_ignored(name: str) -> bool:
    return is_hidden_or_temporary(name) or name in IGNORED_NAMES


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    since: float  # clock time the current size and mtime were first seen


@dataclass
class _Arriving:
    files: dict[Path, str | None] = field(default_factory=dict)  # ready file -> Series Instance UID
    last_arrival: float = 0.0


class _Events(FileSystemEventHandler):
    def __init__(self, sink: queue.SimpleQueue[Path]) -> None:
        self.sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if raw:
                self.sink.put(Path(os.fsdecode(raw)))


class InboxWatcher:
    """Owns an inbox: nothing it has seen is left behind or queued twice."""

    def __init__(
        self,
        archive: Archive,
        inbox: Path,
        dispatcher: Dispatcher,
        *,
        stable_age: float | None = None,
        file_settle: float | None = None,
        rescan_interval: float | None = None,
        poll: bool = False,
        clock: Callable[[], float] = time.monotonic,
        recent_jobs: int = RECENT_JOBS,
    ) -> None:
        settings = archive.settings
        self.archive = archive
        self.inbox = inbox.absolute()
        self.dispatcher = dispatcher
        self.stable_age = settings.stable_age if stable_age is None else stable_age
        self.file_settle = settings.file_settle if file_settle is None else file_settle
        self.rescan_interval = settings.rescan_interval if rescan_interval is None else rescan_interval
        self.poll = poll
        self.clock = clock
        self.pending: dict[Path, _Pending] = {}
        self.arriving: dict[str, _Arriving] = {}
        self.events: queue.SimpleQueue[Path] = queue.SimpleQueue()
        # the latest jobs this watcher spooled, newest last; bounded so a watcher running for months does not
        # grow (the catalog holds every job: ``medarchive jobs``)
        self.spooled_jobs: deque[int] = deque(maxlen=recent_jobs)
        self._own = tuple(p.absolute() for p in (settings.spool_dir, settings.blob_dir, settings.quarantine_dir))

    # -- observing files

    def scan(self) -> None:
        """Walk the whole inbox (start-up, and every ``rescan_interval`` seconds)."""
        for folder, dirs, names in os.walk(self.inbox):
            dirs[:] = [d for d in dirs if not is_ignored(d) and Path(folder, d).absolute() not in self._own]
            for name in names:
                self.observe(Path(folder) / name)

    def observe(self, path: Path) -> None:
        if is_ignored(path.name) or self._is_ours(path):
            return
        if path.is_dir():
            for folder, _dirs, names in os.walk(path):
                for name in names:
                    self.observe(Path(folder) / name)
            return
        if any(path in study.files for study in self.arriving.values()):
            return  # already ready; re-checked when the study is spooled
        try:
            stat = path.stat()
        except FileNotFoundError:
            self.pending.pop(path, None)
            return
        known = self.pending.get(path)
        if known is None or (known.size, known.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            self.pending[path] = _Pending(stat.st_size, stat.st_mtime_ns, self.clock())

    def _is_ours(self, path: Path) -> bool:
        """The archive's own folders (spool, blobs, quarantine) may live inside the inbox's volume."""
        absolute = path.absolute()
        return any(absolute == own or own in absolute.parents for own in self._own)

    # -- deciding

    def tick(self) -> list[int]:
        """Promote settled files to ready, spool stable studies; returns the jobs queued now."""
        now = self.clock()
        for path, state in list(self.pending.items()):
            if now - state.since < self.file_settle:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                del self.pending[path]
                continue
            if (stat.st_size, stat.st_mtime_ns) != (state.size, state.mtime_ns):
                self.pending[path] = _Pending(stat.st_size, stat.st_mtime_ns, now)
                continue
            del self.pending[path]
            uids = peek_uids(path)
            study_uid, series_uid = uids if uids else (UNREADABLE, None)
            arriving = self.arriving.setdefault(study_uid, _Arriving())
            arriving.files[path] = series_uid
            arriving.last_arrival = now
        queued: list[int] = []
        for study_uid, arriving in list(self.arriving.items()):
            if now - arriving.last_arrival < self.stable_age:
                continue
            del self.arriving[study_uid]
            files = [(p, s) for p, s in arriving.files.items() if p.exists()]
            if not files:
                continue
            job_id = spool_study(self.archive, self.inbox, study_uid, files, self.dispatcher)
            log.info("study %s stable: %d files queued as job %d", study_uid or "(unreadable files)", len(files), job_id)
            queued.append(job_id)
        self.spooled_jobs.extend(queued)
        return queued

    # -- running

    def run(self, stop: threading.Event, *, tick_seconds: float = 0.25) -> None:
        """Watch until ``stop`` is set: finish interrupted spooling, scan, then follow events."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        resumed = resume_spooling(self.archive, self.dispatcher)
        if resumed:
            log.info("finished spooling interrupted jobs %s", resumed)
        observer = PollingObserver(timeout=1) if self.poll else Observer()
        observer.schedule(_Events(self.events), str(self.inbox), recursive=True)
        observer.start()
        self.scan()
        last_scan = self.clock()
        try:
            while not stop.is_set():
                while True:
                    try:
                        self.observe(self.events.get_nowait())
                    except queue.Empty:
                        break
                if self.clock() - last_scan >= self.rescan_interval:
                    self.scan()
                    last_scan = self.clock()
                self.tick()
                stop.wait(tick_seconds)
        finally:
            observer.stop()
            observer.join(timeout=5)
