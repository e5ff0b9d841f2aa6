"""Use case: ingest files and folders. Sources are only ever read.

Staging (read, classify, encode, decode to verify, hash, write blobs) runs in
a pool of ``jobs`` forked processes, or in this process when ``jobs`` is 1;
this process is the one writer: it commits the staged instances' catalog rows
in batches (``COMMIT_BATCH`` instances, or a series boundary once
``FLUSH_SECONDS`` have passed), with the totals of their studies and the
job's counts in the same transaction. Blobs are durable before the rows that
reference them are committed.

Stopping: with ``interruptible`` a SIGINT or SIGTERM stops taking new files;
what is in flight is staged and committed, the job is marked interrupted and
the report says so. A second signal aborts at the next safe point: a batch
commits whole or not at all, staged blobs without rows are the garbage
collector's. Running the same ingest again stores the rest (what is archived
comes back as duplicates). Any number of ingests may run on one archive at
once: a batch that loses a race for a SOP Instance UID is run again
(:func:`archive.services.totals.write_counted`) and becomes a duplicate or a
conflict. The names other modules and the tests import from the ingest
pipeline are re-exported here.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from archive.catalog.models import Job, JobStatus, Study
from archive.clock import utcnow
from archive.codecs import Codec
from archive.config import Settings
from archive.errors import ArchiveError
from archive.kinds import JobKind
from archive.services.deadlines import fault_point
from archive.services.discovery import discover, is_hidden_or_temporary
from archive.services.encoding import (
    RECENT_FRAMES,
    archive_codec,
    encode_frames,
    pixel_hash,
)
from archive.services.header_dictionaries import SampleCollector
from archive.services.leases import process_owner
from archive.services.outcomes import (
    TRANSIENT_ERRNOS,
    FileOutcome,
    IngestReport,
    Outcome,
    nothing_to_archive_message,
)
from archive.services.quarantine import quarantine_file
from archive.services.recording import commit_staged, commit_staged_batch
from archive.services.runtime import Archive
from archive.services.staging import (
    StagedInstance,
    lookup_session,
    stage_file,
    stage_files,
)
from archive.services.totals import lost_race, write_counted
from archive.services.unit_of_work import UnitOfWork

__all__ = [
    "TRANSIENT_ERRNOS", "FileOutcome", "IngestReport", "Outcome", "StagedInstance", "commit_staged",
    "commit_staged_batch", "default_jobs", "discover", "encode_frames", "ingest_paths",
    "is_hidden_or_temporary", "pixel_hash", "quarantine_file", "stage_file",
]

COMMIT_BATCH = 200  # most instances in one catalog transaction
STAGE_CHUNK = 4  # files staged together: one duplicate look-up, one message between processes
LOOKAHEAD_PER_JOB = 2  # chunks staged ahead of the writer, per staging process
FLUSH_SECONDS = 1.0  # at a series boundary, commit what is pending once it has waited this long
MAX_PENDING_SECONDS = 2.0  # inside a series too, after this long: progress shows, a crash loses little
COUNTS_SECONDS = 1.0  # the job's counts follow outcomes that need no commit (skips, duplicates) this often


def ingest_paths(
    archive: Archive,
    paths: Sequence[Path],
    *,
    codec_config: dict[str, Any] | None = None,
    jobs: int = 1,
    on_discovered: Callable[[int], None] | None = None,
    on_file: Callable[[FileOutcome], None] | None = None,
    interruptible: bool = False,
) -> IngestReport:
    """Archive every DICOM file under ``paths``; the report says what happened to each.

    A path that does not exist, or paths holding no file at all, raise an
    :class:`ArchiveError` before any job is recorded. The job is always
    finished: done, failed (with the error) or interrupted. With
    ``interruptible`` (the command line) SIGINT and SIGTERM stop the ingest
    cleanly and the report comes back with ``interrupted`` set; otherwise a
    KeyboardInterrupt still marks the job interrupted before it propagates.
    """
    started = time.perf_counter()
    codec = archive_codec(codec_config or archive.settings.codec)
    files, report_skipped = discover(paths)
    if not files:
        raise ArchiveError(nothing_to_archive_message(paths, report_skipped))
    if on_discovered:
        on_discovered(len(files))
    report = IngestReport(outcomes=list(report_skipped), files=len(files) + len(report_skipped))
    with archive.unit_of_work() as uow:
        job = Job(kind=JobKind.INGEST, status=JobStatus.RUNNING, started_at=utcnow(), counts=report.job_counts(),
                  params={"paths": [str(p) for p in paths], "codec": codec.get_config(), "jobs": jobs,
                          "direct": True, "owner": process_owner()})
        uow.session.add(job)
        uow.commit()
        report.job_id = job.id
    # staged here (one process) and normalized here: keep the verified frames for the normalization step
    RECENT_FRAMES.enable(jobs <= 1 and archive.settings.normalize)
    with _Stop(interruptible) as stop:
        writer = _BatchWriter(archive, report, on_file, stop)
        status, error = JobStatus.FAILED, None
        try:
            staged = _stage_all(archive, files, codec, jobs, report.job_id, stop)
            try:
                for result in staged:
                    writer.add(result)
            finally:
                staged.close()  # a failing writer takes the staging processes down with it
            writer.flush()
            if not stop.requested:
                report.normalized = _normalize(archive, report, paths, codec.get_config(), jobs)
            status = JobStatus.INTERRUPTED if stop.requested else JobStatus.DONE
        except KeyboardInterrupt:
            status = JobStatus.INTERRUPTED  # the batch being written rolled back; staged blobs are GC's
            if not interruptible:
                raise
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"[:2000]
            raise
        finally:
            RECENT_FRAMES.enable(False)
            report.interrupted = status is JobStatus.INTERRUPTED
            report.seconds = time.perf_counter() - started
            with stop.shielded():
                _finish_job(archive, report, status, error, must=error is None and status is not JobStatus.FAILED)
    return report


def _normalize(archive: Archive, report: IngestReport, paths: Sequence[Path], codec: dict[str, Any],
               jobs: int) -> list[Any]:
    """The job's second step: normalized series of what it archived (or found archived), per the profiles."""
    from archive.services.normalization import after_ingest

    uids = sorted({o.study_uid for o in report.outcomes if o.study_uid and o.outcome in (
        Outcome.STORED, Outcome.CONFLICT, Outcome.DUPLICATE)})
    return after_ingest(archive, study_uids=uids, job_id=report.job_id, sources=[str(p) for p in paths], codec=codec,
                        jobs=jobs)


def _finish_job(archive: Archive, report: IngestReport, status: JobStatus, error: str | None, *, must: bool) -> None:
    """Record how the job ended; when another failure is already on its way out, a failure here does not hide it.

    The totals of every study the ingest met are refreshed once more, those
    it only found duplicates of included: a re-run also mends totals an
    older version left wrong.
    """
    uids = sorted({o.study_uid for o in report.outcomes if o.study_uid})

    def finish(uow: UnitOfWork) -> tuple[None, list[int]]:
        session = uow.session
        session.execute(update(Job).where(Job.id == report.job_id).values(
            status=status, finished_at=utcnow(), counts=report.job_counts(), error=error))
        ids = [i for start in range(0, len(uids), 500) for i in session.scalars(
            select(Study.id).where(Study.study_uid.in_(uids[start:start + 500])))]
        return None, ids

    try:
        write_counted(archive, finish)
    except Exception:
        if must:
            raise


def default_jobs() -> int:
    """One staging process per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _Stop:
    """SIGINT and SIGTERM during an ingest: the first stops taking new files, a second aborts at a safe point.

    Handlers are installed only when asked (the command line) and only in the
    main thread; the previous ones come back afterwards. A second signal
    raises KeyboardInterrupt at once, except inside a commit, where it waits
    for the transaction to end (committed or not, never half).
    """

    def __init__(self, install: bool) -> None:
        self.install = install and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.hard = False
        self.signal: int | None = None
        self._critical = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        if self.install:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if not self.requested:
            self.requested, self.signal = True, signum
            return
        self.hard = True
        if not self._critical:
            raise KeyboardInterrupt

    @contextmanager
    def critical(self) -> Iterator[None]:
        """A commit: a second signal inside it aborts right after it."""
        with self.shielded():
            yield
        if self.hard:
            raise KeyboardInterrupt

    @contextmanager
    def shielded(self) -> Iterator[None]:
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1


class _BatchWriter:
    """The one writer: commits staged instances in batches.

    A batch ends at ``COMMIT_BATCH`` instances, at a series boundary once
    ``FLUSH_SECONDS`` have passed since the last commit (so small series share
    a transaction and progress still moves every second or so), or anywhere
    after ``MAX_PENDING_SECONDS`` (a slow series). Each commit carries the
    totals of the batch's studies and the job's counts.
    """

    def __init__(self, archive: Archive, report: IngestReport, on_file: Callable[[FileOutcome], None] | None,
                 stop: _Stop) -> None:
        self.archive = archive
        self.report = report
        self.on_file = on_file
        self.stop = stop
        self.pending: list[StagedInstance] = []
        self.flushed = time.monotonic()
        self.counted = time.monotonic()
        self.samples = SampleCollector()

    def add(self, result: StagedInstance | FileOutcome) -> None:
        if isinstance(result, FileOutcome):
            self._done(result)
            if not self.pending and time.monotonic() - self.counted > COUNTS_SECONDS:
                self._write_counts()
            return
        waited = time.monotonic() - self.flushed
        if self.pending and (len(self.pending) >= COMMIT_BATCH or waited > MAX_PENDING_SECONDS or (
                self.pending[-1].series_uid != result.series_uid and waited > FLUSH_SECONDS)):
            self.flush()
        if not self.pending:
            self.flushed = time.monotonic()  # the clock runs from the oldest instance waiting
        self.pending.append(result)
        self.samples.add([result])  # headers read so far teach a dictionary for the ones still to come
        try:
            self.samples.train_ready(self.archive)
        except sa_exc.IntegrityError:  # another ingest trained the same dictionary first: use theirs
            self.archive.headers.forget()

    def flush(self) -> None:
        self.flushed = time.monotonic()
        if not self.pending:
            return
        with self.stop.critical():
            self.archive.store.make_durable([ref for item in self.pending for ref in item.blobs])
            results = write_counted(self.archive, self._write)
            self.pending = []
            self.counted = time.monotonic()
            for outcome, _study_id in results:
                self._done(outcome)

    def _write(self, uow: UnitOfWork) -> tuple[list[tuple[FileOutcome, int | None]], set[int]]:
        results = commit_staged_batch(uow, self.pending, self.report.job_id)
        counts = self.report.job_counts(outcome for outcome, _ in results)
        uow.session.execute(update(Job).where(Job.id == self.report.job_id).values(counts=counts))
        return results, {study_id for _, study_id in results if study_id is not None}

    def _write_counts(self) -> None:
        """Progress for ``jobs`` while nothing needs committing (a re-run finds duplicates only)."""
        self.counted = time.monotonic()
        try:
            with self.stop.critical(), self.archive.unit_of_work() as uow:
                uow.session.execute(update(Job).where(Job.id == self.report.job_id)
                                    .values(counts=self.report.job_counts()))
                uow.commit()
        except sa_exc.OperationalError as exc:
            if not lost_race(exc):  # another writer holds the lock: the next update will do
                raise

    def _done(self, outcome: FileOutcome) -> None:
        self.report.outcomes.append(outcome)
        if self.on_file:
            self.on_file(outcome)


def _stage_all(
    archive: Archive, files: Sequence[Path], codec: Codec, jobs: int, job_id: int | None, stop: _Stop
) -> Generator[StagedInstance | FileOutcome, None, None]:
    """Staged results in file order: in this process, or from a pool of forked staging processes.

    Once a stop is requested no new file is started; what is in flight comes back.
    """
    jobs = max(1, min(jobs, len(files)))
    chunks = [[str(p) for p in files[i:i + STAGE_CHUNK]] for i in range(0, len(files), STAGE_CHUNK)]
    if jobs == 1 or "fork" not in multiprocessing.get_all_start_methods():
        with lookup_session(archive) as lookups:
            for chunk in chunks:
                if stop.requested:
                    return
                yield from stage_files(archive, [Path(p) for p in chunk], codec, job_id=job_id, session=lookups,
                                       sync=False, guard=_fault_switch)
        return
    yield from _StagingPool(archive, codec, job_id, jobs, stop).stage(chunks)


class _StagingPool:
    """Forked staging processes, fed a bounded window of chunks; results come back in file order.

    The children share what this process imported; each opens its own engine
    and pack, and ignores SIGINT (a Ctrl-C reaches the whole process group:
    this process decides when they stop). A child that dies (a decoder crash,
    the kernel's OOM killer) breaks the pool: the files that were in flight
    are then staged one at a time in a fresh pool, and the one that takes its
    process down again is quarantined with the reason, as the batch service
    does with a poison instance; the rest of the ingest goes on. Once a stop
    is requested nothing new is submitted, chunks not started are cancelled
    and the running ones finish; on a hard abort the children are terminated.
    """

    def __init__(self, archive: Archive, codec: Codec, job_id: int | None, jobs: int, stop: _Stop) -> None:
        self.archive, self.codec, self.job_id, self.jobs, self.stop = archive, codec, job_id, jobs, stop

    def _executor(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_start_stager, initargs=(self.archive, self.codec.get_config(), self.job_id))

    def stage(self, chunks: list[list[str]]) -> Iterator[StagedInstance | FileOutcome]:
        # the window keeps staging from running so far ahead that what the writer learns (a header
        # dictionary) comes too late for the files that follow
        window = LOOKAHEAD_PER_JOB * self.jobs
        pending = deque(chunks)
        while pending and not self.stop.requested:
            executor = self._executor(self.jobs)
            in_flight: deque[tuple[list[str], Future[list[StagedInstance | FileOutcome]]]] = deque()
            clean = False
            try:
                while in_flight or (pending and not self.stop.requested):
                    while pending and len(in_flight) < window and not self.stop.requested:
                        chunk = pending.popleft()
                        in_flight.append((chunk, executor.submit(_stage_chunk, chunk)))
                    if not in_flight:
                        break  # a stop came in between
                    chunk, future = in_flight[0]
                    try:
                        results = future.result()
                    except CancelledError:
                        in_flight.popleft()
                        continue
                    except BrokenProcessPool:
                        suspects = [path for chunk, _ in in_flight for path in chunk]
                        in_flight.clear()
                        if not self.stop.requested:  # children killed by the stop signal are no poison
                            yield from self._one_at_a_time(suspects)
                        break  # a fresh pool for what is left
                    in_flight.popleft()
                    if self.stop.requested:
                        for _, waiting in in_flight:
                            waiting.cancel()  # not started: dropped; running: finishes
                    yield from results
                clean = True
            finally:
                if not clean:
                    _terminate(executor)
                executor.shutdown(wait=True, cancel_futures=True)

    def _one_at_a_time(self, paths: list[str]) -> Iterator[StagedInstance | FileOutcome]:
        executor = self._executor(1)
        clean = False
        try:
            for path in paths:
                if self.stop.requested:
                    break
                try:
                    yield from executor.submit(_stage_chunk, [path]).result()
                except BrokenProcessPool:
                    executor.shutdown(wait=True)
                    executor = self._executor(1)
                    if self.stop.requested:
                        break
                    reason = "the staging process died while reading or encoding this file (a decoder crash or out of memory)"
                    yield quarantine_file(self.archive, Path(path), reason, "StagingProcessDied", job_id=self.job_id)
            clean = True
        finally:
            if not clean:
                _terminate(executor)
            executor.shutdown(wait=True)


def _terminate(executor: ProcessPoolExecutor) -> None:
    """A hard abort (or a failing writer): stop the staging processes now; their staged blobs are the GC's."""
    for process in list((executor._processes or {}).values()):
        if process.is_alive():
            process.terminate()


_stager: tuple[Archive, Codec, int | None, Session] | None = None


def _start_stager(parent: Archive, codec_config: dict[str, Any], job_id: int | None) -> None:
    global _stager
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the parent decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's stop handler: terminate() must work
    parent.engine.dispose(close=False)  # the parent's connections stay the parent's
    settings: Settings = parent.settings
    archive = Archive.open(settings, migrate=False)
    archive.headers.refresh_seconds = 0.05  # the writer may train a dictionary any moment: look often
    _stager = (archive, archive_codec(codec_config), job_id, lookup_session(archive))


def _stage_chunk(paths: list[str]) -> list[StagedInstance | FileOutcome]:
    assert _stager is not None
    archive, codec, job_id, lookups = _stager
    return stage_files(archive, [Path(p) for p in paths], codec, job_id=job_id, session=lookups, sync=False,
                       guard=_fault_switch)


@contextmanager
def _fault_switch(path: Path) -> Iterator[None]:
    """The test-only fault switches: ``MEDARCHIVE_FAULT_DELAY`` slows each file, ``MEDARCHIVE_FAULT_KILL`` kills on one."""
    fault_point(str(path))
    yield
