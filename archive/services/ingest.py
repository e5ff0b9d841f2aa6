"""Use case: ingest files and folders. Sources are only ever read.

Staging (read, classify, encode, decode to verify, hash, write blobs) runs in
a pool of ``jobs`` forked processes, or in this process when ``jobs`` is 1;
this process is the one writer: it commits the staged instances' catalog rows
in batches (``COMMIT_BATCH`` instances, or a series boundary once
``FLUSH_SECONDS`` have passed). Blobs are durable before the rows that
reference them are committed. The names other modules and the tests import
from the ingest pipeline are re-exported here.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from archive.catalog.models import Job, JobStatus
from archive.clock import utcnow
from archive.codecs import Codec, get_codec
from archive.config import Settings
from archive.kinds import JobKind
from archive.services.deadlines import fault_point
from archive.services.discovery import discover, is_hidden_or_temporary
from archive.services.encoding import encode_frames, pixel_hash
from archive.services.header_dictionaries import SampleCollector
from archive.services.outcomes import TRANSIENT_ERRNOS, FileOutcome, IngestReport, Outcome
from archive.services.quarantine import quarantine_file
from archive.services.recording import commit_staged, commit_staged_batch
from archive.services.runtime import Archive
from archive.services.staging import StagedInstance, lookup_session, stage_file, stage_files
from archive.services.totals import refresh_totals

__all__ = [
    "TRANSIENT_ERRNOS", "FileOutcome", "IngestReport", "Outcome", "StagedInstance", "commit_staged",
    "commit_staged_batch", "default_jobs", "discover", "encode_frames", "ingest_paths",
    "is_hidden_or_temporary", "pixel_hash", "quarantine_file", "stage_file",
]

COMMIT_BATCH = 200  # most instances in one catalog transaction
STAGE_CHUNK = 4  # files staged together: one duplicate look-up, one message between processes
LOOKAHEAD_PER_JOB = 2  # chunks staged ahead of the writer, per staging process
FLUSH_SECONDS = 1.0  # at a series boundary, commit what is pending once it has waited this long


def ingest_paths(
    archive: Archive,
    paths: Sequence[Path],
    *,
    codec_config: dict[str, Any] | None = None,
    jobs: int = 1,
    on_discovered: Callable[[int], None] | None = None,
    on_file: Callable[[FileOutcome], None] | None = None,
) -> IngestReport:
    """Archive every DICOM file under ``paths``; the report says what happened to each."""
    started = time.perf_counter()
    codec = get_codec(codec_config or archive.settings.codec)
    files, report_skipped = discover(paths)
    if on_discovered:
        on_discovered(len(files))
    report = IngestReport(outcomes=list(report_skipped))
    with archive.unit_of_work() as uow:
        job = Job(kind=JobKind.INGEST, status=JobStatus.RUNNING, params={"paths": [str(p) for p in paths],
                  "codec": codec.get_config(), "jobs": jobs}, started_at=utcnow())
        uow.session.add(job)
        uow.commit()
        report.job_id = job.id
    writer = _BatchWriter(archive, report, on_file)
    for result in _stage_all(archive, files, codec, jobs, report.job_id):
        writer.add(result)
    writer.flush()
    with archive.unit_of_work() as uow:
        refresh_totals(uow.session, writer.touched)
        job = uow.session.get_one(Job, report.job_id)
        job.status = JobStatus.DONE
        job.finished_at = utcnow()
        job.counts = {o.value: report.count(o) for o in Outcome}
        uow.commit()
    report.seconds = time.perf_counter() - started
    return report


def default_jobs() -> int:
    """One staging process per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _BatchWriter:
    """The one writer: commits staged instances in batches.

    A batch ends at ``COMMIT_BATCH`` instances, or at a series boundary once
    ``FLUSH_SECONDS`` have passed since the last commit (so small series share
    a transaction and progress still moves every second or so).
    """

    def __init__(self, archive: Archive, report: IngestReport, on_file: Callable[[FileOutcome], None] | None) -> None:
        self.archive = archive
        self.report = report
        self.on_file = on_file
        self.pending: list[StagedInstance] = []
        self.touched: set[int] = set()
        self.flushed = time.monotonic()
        self.samples = SampleCollector()

    def add(self, result: StagedInstance | FileOutcome) -> None:
        if isinstance(result, FileOutcome):
            self._done(result)
            return
        if self.pending and (len(self.pending) >= COMMIT_BATCH or (
                self.pending[-1].series_uid != result.series_uid and time.monotonic() - self.flushed > FLUSH_SECONDS)):
            self.flush()
        self.pending.append(result)
        self.samples.add([result])  # headers read so far teach a dictionary for the ones still to come
        self.samples.train_ready(self.archive)

    def flush(self) -> None:
        self.flushed = time.monotonic()
        if not self.pending:
            return
        self.archive.store.make_durable([ref for item in self.pending for ref in item.blobs])
        with self.archive.unit_of_work() as uow:
            results = commit_staged_batch(uow, self.pending, self.report.job_id)
            uow.commit()
        self.pending = []
        for outcome, study_id in results:
            if study_id is not None:
                self.touched.add(study_id)
            self._done(outcome)

    def _done(self, outcome: FileOutcome) -> None:
        self.report.outcomes.append(outcome)
        if self.on_file:
            self.on_file(outcome)


def _stage_all(
    archive: Archive, files: Sequence[Path], codec: Codec, jobs: int, job_id: int | None
) -> Iterator[StagedInstance | FileOutcome]:
    """Staged results in file order: in this process, or from a pool of forked staging processes."""
    jobs = max(1, min(jobs, len(files)))
    chunks = [[str(p) for p in files[i:i + STAGE_CHUNK]] for i in range(0, len(files), STAGE_CHUNK)]
    if jobs == 1 or "fork" not in multiprocessing.get_all_start_methods():
        with lookup_session(archive) as lookups:
            for chunk in chunks:
                yield from stage_files(archive, [Path(p) for p in chunk], codec, job_id=job_id, session=lookups,
                                       sync=False)
        return
    yield from _StagingPool(archive, codec, job_id, jobs).stage(chunks)


class _StagingPool:
    """Forked staging processes, fed a bounded window of chunks; results come back in file order.

    The children share what this process imported; each opens its own engine
    and pack. A child that dies (a decoder crash, the kernel's OOM killer)
    breaks the pool: the files that were in flight are then staged one at a
    time in a fresh pool, and the one that takes its process down again is
    quarantined with the reason, as the batch service does with a poison
    instance; the rest of the ingest goes on.
    """

    def __init__(self, archive: Archive, codec: Codec, job_id: int | None, jobs: int) -> None:
        self.archive, self.codec, self.job_id, self.jobs = archive, codec, job_id, jobs

    def _executor(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_start_stager, initargs=(self.archive, self.codec.get_config(), self.job_id))

    def stage(self, chunks: list[list[str]]) -> Iterator[StagedInstance | FileOutcome]:
        # the window keeps staging from running so far ahead that what the writer learns (a header
        # dictionary) comes too late for the files that follow
        window = LOOKAHEAD_PER_JOB * self.jobs
        pending = deque(chunks)
        while pending:
            executor = self._executor(self.jobs)
            in_flight: deque[tuple[list[str], Future[list[StagedInstance | FileOutcome]]]] = deque()
            try:
                while pending or in_flight:
                    while pending and len(in_flight) < window:
                        chunk = pending.popleft()
                        in_flight.append((chunk, executor.submit(_stage_chunk, chunk)))
                    chunk, future = in_flight[0]
                    try:
                        results = future.result()
                    except BrokenProcessPool:
                        suspects = [path for chunk, _ in in_flight for path in chunk]
                        in_flight.clear()
                        yield from self._one_at_a_time(suspects)
                        break  # a fresh pool for what is left
                    in_flight.popleft()
                    yield from results
            finally:
                executor.shutdown(wait=True, cancel_futures=True)

    def _one_at_a_time(self, paths: list[str]) -> Iterator[StagedInstance | FileOutcome]:
        executor = self._executor(1)
        try:
            for path in paths:
                try:
                    yield from executor.submit(_stage_chunk, [path]).result()
                except BrokenProcessPool:
                    executor.shutdown(wait=True)
                    executor = self._executor(1)
                    reason = "the staging process died while reading or encoding this file (a decoder crash or out of memory)"
                    yield quarantine_file(self.archive, Path(path), reason, "StagingProcessDied", job_id=self.job_id)
        finally:
            executor.shutdown(wait=True)


_stager: tuple[Archive, Codec, int | None, Session] | None = None


def _start_stager(parent: Archive, codec_config: dict[str, Any], job_id: int | None) -> None:
    global _stager
    parent.engine.dispose(close=False)  # the parent's connections stay the parent's
    settings: Settings = parent.settings
    archive = Archive.open(settings, migrate=False)
    archive.headers.refresh_seconds = 0.05  # the writer may train a dictionary any moment: look often
    _stager = (archive, get_codec(codec_config), job_id, lookup_session(archive))


def _stage_chunk(paths: list[str]) -> list[StagedInstance | FileOutcome]:
    assert _stager is not None
    archive, codec, job_id, lookups = _stager
    return stage_files(archive, [Path(p) for p in paths], codec, job_id=job_id, session=lookups, sync=False,
                       guard=_fault_switch)


@contextmanager
def _fault_switch(path: Path) -> Iterator[None]:
    """The test-only fault switch (``MEDARCHIVE_FAULT_KILL``): a staging process that dies on one file."""
    fault_point(str(path))
    yield
