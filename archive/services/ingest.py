"""Use case: ingest files and folders. Sources are only ever read.

Staging (read, classify, encode, decode to verify, hash, write blobs) runs in
a pool of ``jobs`` worker processes, or in this process when ``jobs`` is 1;
this process is the one writer: it commits the staged instances' catalog
rows in batches (a series, or ``commit_batch`` instances, whichever comes
first). Blobs are durable before the rows that reference them are committed.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from multiprocessing.pool import AsyncResult
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from archive.catalog.models import Job, JobStatus
from archive.clock import utcnow
from archive.codecs import Codec, get_codec
from archive.config import Settings
from archive.kinds import JobKind
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
    "commit_staged_batch", "default_jobs", "discover", "encode_frames", "ingest_file", "ingest_paths", "is_hidden_or_temporary",
    "pixel_hash", "quarantine_file", "stage_file",
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


def ingest_file(archive: Archive, path: Path, codec: Codec, *, job_id: int | None = None) -> tuple[FileOutcome, int | None]:
    """Archive one file in its own unit of work; never raises for bad input (the outcome says what happened)."""
    staged = stage_file(archive, path, codec, job_id=job_id)
    if isinstance(staged, FileOutcome):
        return staged, None
    with archive.unit_of_work() as uow:
        outcome, study_id = commit_staged(uow, staged, job_id)
        uow.commit()
    return outcome, study_id


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
    # fork: the children share what this process imported; each opens its own engine and pack
    context = multiprocessing.get_context("fork")
    with context.Pool(jobs, initializer=_start_stager, initargs=(archive, codec.get_config(), job_id)) as pool:
        # a bounded window of chunks in flight: results come back in order, and staging never runs so far
        # ahead that what the writer learns (a header dictionary) comes too late for the files that follow
        in_flight: deque[AsyncResult[list[StagedInstance | FileOutcome]]] = deque()
        for chunk in chunks:
            in_flight.append(pool.apply_async(_stage_chunk, (chunk,)))
            if len(in_flight) >= LOOKAHEAD_PER_JOB * jobs:
                yield from in_flight.popleft().get()
        while in_flight:
            yield from in_flight.popleft().get()


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
    return stage_files(archive, [Path(p) for p in paths], codec, job_id=job_id, session=lookups, sync=False)
