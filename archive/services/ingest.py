"""Use case: ingest files and folders. Sources are only ever read.

Per file: read and classify (skip / quarantine / archive), hash header and
pixels for duplicate detection, encode frame by frame, decode what was
encoded to measure the error (a lossless codec that does not round-trip
falls back to zstd rather than store wrong pixels), write blobs, then commit
the catalog rows in one unit of work.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from archive.catalog.models import (
    Blob,
    EncodedFrame,
    Encoding,
    Instance,
    InstanceStatus,
    Job,
    JobStatus,
    QuarantineEntry,
    Series,
    Study,
)
from archive.kinds import StorageMode
from archive.codecs import Codec, decode_frame, get_codec, read_frame_header
from archive.dicom.reader import ParsedInstance, iter_fragments, iter_frames, read_instance
from archive.dicom.uids import safe_filename
from archive.dicom.writer import serialize_header
from archive.errors import ArchiveError, InvalidDicomError, NotDicomError
from archive.services.metrics import ErrorStats
from archive.services.runtime import Archive
from archive.services.totals import refresh_study_totals
from archive.services.unit_of_work import UnitOfWork
from archive.store import BlobStore
from archive.store.compression import compress_bytes

HIDDEN_OR_TEMPORARY = (".", "~")
TEMPORARY_SUFFIXES = ("~", ".part", ".tmp", ".partial", ".crdownload")
# Errors of the machine, not of the file: the task is retried, nothing is quarantined.
TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.ENOMEM, errno.ESTALE})


class Outcome(str, Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    SKIPPED = "skipped"
    QUARANTINED = "quarantined"


@dataclass(frozen=True)
class FileOutcome:
    path: Path
    outcome: Outcome
    reason: str = ""
    study_uid: str | None = None
    bytes_in: int = 0
    bytes_stored: int = 0


@dataclass
class IngestReport:
    outcomes: list[FileOutcome] = field(default_factory=list)
    seconds: float = 0.0
    job_id: int | None = None

    def count(self, outcome: Outcome) -> int:
        return sum(1 for o in self.outcomes if o.outcome is outcome)

    @property
    def studies(self) -> set[str]:
        return {o.study_uid for o in self.outcomes if o.study_uid and o.outcome is not Outcome.DUPLICATE}

    @property
    def instances(self) -> int:
        return self.count(Outcome.STORED) + self.count(Outcome.CONFLICT)

    @property
    def bytes_in(self) -> int:
        return sum(o.bytes_in for o in self.outcomes if o.outcome in (Outcome.STORED, Outcome.CONFLICT))

    @property
    def bytes_stored(self) -> int:
        return sum(o.bytes_stored for o in self.outcomes)

    @property
    def ratio(self) -> float:
        return self.bytes_in / self.bytes_stored if self.bytes_stored else 0.0

    def with_outcome(self, outcome: Outcome) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.outcome is outcome]


def is_hidden_or_temporary(name: str) -> bool:
    """``.name``, ``name~``, ``.part``/``.tmp`` and friends: never archived, never moved."""
    return name.startswith(HIDDEN_OR_TEMPORARY) or name.endswith(TEMPORARY_SUFFIXES)


def discover(paths: Iterable[Path]) -> tuple[list[Path], list[FileOutcome]]:
    """Files under ``paths`` in a stable order, and those set aside before reading."""
    found: list[Path] = []
    skipped: list[FileOutcome] = []
    for root in paths:
        root = Path(root)
        if root.is_file():
            found.append(root)
            continue
        if not root.is_dir():
            skipped.append(FileOutcome(root, Outcome.SKIPPED, "no such file or folder"))
            continue
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                path = Path(folder) / name
                if is_hidden_or_temporary(name):
                    skipped.append(FileOutcome(path, Outcome.SKIPPED, "hidden or temporary file"))
                elif path.is_file():
                    found.append(path)
    return found, skipped


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
        job = Job(kind="ingest", status=JobStatus.RUNNING, params={"paths": [str(p) for p in paths],
                  "codec": codec.get_config()}, started_at=_now())
        uow.session.add(job)
        uow.commit()
        report.job_id = job.id
    touched: set[int] = set()
    for path in files:
        outcome, study_id = ingest_file(archive, path, codec, job_id=report.job_id)
        report.outcomes.append(outcome)
        if study_id is not None:
            touched.add(study_id)
        if on_file:
            on_file(outcome)
    with archive.unit_of_work() as uow:
        for study_id in touched:
            refresh_study_totals(uow.session, study_id)
        job = uow.session.get_one(Job, report.job_id)
        job.status = JobStatus.DONE
        job.finished_at = _now()
        job.counts = {o.value: report.count(o) for o in Outcome}
        uow.commit()
    report.seconds = time.perf_counter() - started
    return report


def ingest_file(archive: Archive, path: Path, codec: Codec, *, job_id: int | None = None) -> tuple[FileOutcome, int | None]:
    """Archive one file in its own unit of work; never raises for bad input (the outcome says what happened)."""
    staged = stage_file(archive, path, codec, job_id=job_id)
    if isinstance(staged, FileOutcome):
        return staged, None
    with archive.unit_of_work() as uow:
        outcome, study_id = commit_staged(uow, staged, job_id)
        uow.commit()
    return outcome, study_id


@dataclass
class _Prepared:
    parsed: ParsedInstance
    header_blob: bytes
    header_sha256: str
    pixel_sha256: str | None
    frames: list[np.ndarray] | None  # decoded stored values (PIXELS)
    fragments: list[bytes] | None  # original compressed frames (PASSTHROUGH)
    codec: Codec


@dataclass
class StagedInstance:
    """An instance read, encoded, verified and written to the blob store, not yet in the catalog.

    Staging needs no transaction, so workers encode in parallel and commit a
    whole chunk at once; blobs of a stage that never commits are unreferenced
    and the garbage collector removes them after its grace period.
    """

    prepared: _Prepared
    header_digest: str
    encoding: dict[str, Any]  # Encoding columns
    frames: list[tuple[str, int]]  # (blob sha256, size) per frame
    blob_sizes: dict[str, int]

    @property
    def path(self) -> Path:
        return self.prepared.parsed.source_path


def stage_file(
    archive: Archive, path: Path, codec: Codec, *, job_id: int | None = None, session: Session | None = None
) -> StagedInstance | FileOutcome:
    """Read, classify, encode and verify one file; bad input becomes a skip or quarantine outcome.

    ``session`` (read only) serves the duplicate look-up; without one a short unit of work does.
    """
    try:
        parsed = read_instance(path)
        prepared = _prepare(parsed, codec, archive.settings.header_zstd_level)
    except NotDicomError as exc:
        return FileOutcome(path, Outcome.SKIPPED, str(exc))
    except InvalidDicomError as exc:
        return quarantine_file(archive, path, str(exc), type(exc).__name__, job_id=job_id)
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:
            raise
        return FileOutcome(path, Outcome.SKIPPED, f"cannot read: {exc}")
    except Exception as exc:  # a reader or decoder bug on odd input must not stop the batch
        reason = f"unexpected {type(exc).__name__} while reading: {exc}"
        return quarantine_file(archive, path, reason, type(exc).__name__, job_id=job_id)
    if session is not None:
        duplicate = _find_duplicate(session, prepared)
    else:
        with archive.unit_of_work() as uow:
            duplicate = _find_duplicate(uow.session, prepared)
    if duplicate is not None:
        return duplicate
    try:
        return _stage(archive.store, prepared)
    except ArchiveError as exc:
        return quarantine_file(archive, path, str(exc), type(exc).__name__, job_id=job_id)


def commit_staged(uow: UnitOfWork, staged: StagedInstance, job_id: int | None) -> tuple[FileOutcome, int | None]:
    """Add one staged instance's catalog rows to ``uow`` (the caller commits)."""
    return commit_staged_batch(uow, [staged], job_id)[0]


def commit_staged_batch(
    uow: UnitOfWork, staged: Sequence[StagedInstance], job_id: int | None
) -> list[tuple[FileOutcome, int | None]]:
    """Add the catalog rows of staged instances to ``uow`` with a handful of statements (the caller commits).

    A chunk is usually one series: one lookup of the SOP Instance UIDs already
    archived, one multi-row insert of blob rows, the study and series looked up
    once, one flush. Duplicates and conflicts are decided against the catalog
    and against earlier instances of the same batch.
    """
    session = uow.session
    uids = sorted({s.prepared.parsed.sop_instance_uid for s in staged})
    known: dict[str, list[tuple[int | None, str, str | None, int, Instance | None]]] = {}
    for start in range(0, len(uids), 500):
        for row in session.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.header_sha256, Instance.pixel_sha256,
                   Instance.conflict_seq).where(Instance.sop_instance_uid.in_(uids[start:start + 500]))
            .order_by(Instance.conflict_seq)
        ):
            known.setdefault(row.sop_instance_uid, []).append(
                (row.id, row.header_sha256, row.pixel_sha256, row.conflict_seq, None))
    blob_rows: dict[str, int] = {}
    for item in staged:
        blob_rows.update(item.blob_sizes)
    _ensure_blob_rows(session, blob_rows)
    studies: dict[str, Study] = {}
    series_by_uid: dict[str, Series] = {}
    for item in staged:  # before any instance is added: no autoflush per series, one batched flush at the end
        parsed = item.prepared.parsed
        if parsed.study_uid not in studies:
            studies[parsed.study_uid] = _get_or_create_study(session, parsed)
        if parsed.series_uid not in series_by_uid:
            series_by_uid[parsed.series_uid] = _get_or_create_series(session, parsed, studies[parsed.study_uid])
    results: list[tuple[FileOutcome, int | None]] = []
    new_instances: list[Instance] = []
    for item in staged:
        prepared = item.prepared
        parsed = prepared.parsed
        earlier = known.setdefault(parsed.sop_instance_uid, [])
        same = next((e for e in earlier if e[1] == prepared.header_sha256 and e[2] == prepared.pixel_sha256), None)
        if same is not None:
            other = same[0] if same[0] is not None else "in this batch"
            results.append((FileOutcome(parsed.source_path, Outcome.DUPLICATE,
                                        f"same SOP instance as already archived (instance {other})",
                                        study_uid=parsed.study_uid), None))
            continue
        study = studies[parsed.study_uid]
        series = series_by_uid[parsed.series_uid]
        first = earlier[0] if earlier else None
        instance = _instance_row(item, series, job_id, conflict_seq=(earlier[-1][3] + 1) if earlier else 0)
        if first is not None:
            instance.status = InstanceStatus.CONFLICT
            if first[0] is None and first[4] is not None:
                session.flush()  # the first arrival is earlier in this batch: it needs its id
            instance.conflict_of_id = first[0] if first[0] is not None else (first[4].id if first[4] else None)
        session.add(instance)
        session.add(Encoding(
            instance=instance, generation=1, is_current=True,
            frames=[EncodedFrame(frame_index=i, blob_sha256=digest, nbytes=size)
                    for i, (digest, size) in enumerate(item.frames)],
            **item.encoding,
        ))
        new_instances.append(instance)
        earlier.append((None, prepared.header_sha256, prepared.pixel_sha256, instance.conflict_seq, instance))
        stored = len(prepared.header_blob) + (item.encoding["bytes_after"] if parsed.mode is not StorageMode.WHOLE else 0)
        if first is not None:
            first_label = first[0] if first[0] is not None else "in this batch"
            outcome = FileOutcome(parsed.source_path, Outcome.CONFLICT,
                                  f"SOP Instance UID already archived with different content (instance {first_label}); "
                                  "kept as a recorded conflict", parsed.study_uid, len(parsed.source_bytes), stored)
        else:
            outcome = FileOutcome(parsed.source_path, Outcome.STORED, parsed.mode_reason, parsed.study_uid,
                                  len(parsed.source_bytes), stored)
        results.append((outcome, study.id))
    session.flush()
    return results


def _instance_row(staged: StagedInstance, series: Series, job_id: int | None, *, conflict_seq: int) -> Instance:
    prepared = staged.prepared
    parsed = prepared.parsed
    layout = parsed.layout
    return Instance(
        series=series,
        sop_instance_uid=parsed.sop_instance_uid,
        conflict_seq=conflict_seq,
        status=InstanceStatus.STORED,
        sop_class_uid=parsed.sop_class_uid,
        instance_number=parsed.integer("InstanceNumber"),
        transfer_syntax_uid=parsed.transfer_syntax_uid,
        had_file_meta=parsed.had_file_meta,
        storage_mode=parsed.mode,
        storage_reason=parsed.mode_reason,
        rows=layout.rows if layout else None,
        columns=layout.columns if layout else None,
        number_of_frames=layout.number_of_frames if layout else None,
        samples_per_pixel=layout.samples_per_pixel if layout else None,
        bits_allocated=layout.bits_allocated if layout else None,
        bits_stored=layout.bits_stored if layout else None,
        high_bit=layout.high_bit if layout else None,
        pixel_representation=layout.pixel_representation if layout else None,
        photometric_interpretation=layout.photometric_interpretation if layout else None,
        planar_configuration=layout.planar_configuration if layout else None,
        pixel_dtype=layout.dtype if layout else None,
        header_sha256=prepared.header_sha256,
        pixel_sha256=prepared.pixel_sha256,
        header_blob=staged.header_digest,
        assigned_uids=parsed.assigned_uids or None,
        source_path=str(parsed.source_path),
        source_size=len(parsed.source_bytes),
        source_sha256=parsed.source_sha256,
        job_id=job_id,
    )


def _prepare(parsed: ParsedInstance, codec: Codec, zstd_level: int) -> _Prepared:
    header = serialize_header(parsed.dataset)
    frames: list[np.ndarray] | None = None
    fragments: list[bytes] | None = None
    hasher = hashlib.sha256()
    if parsed.mode is StorageMode.PIXELS:
        frames = list(iter_frames(parsed))
        digest = pixel_hash(frames)
        header_blob = compress_bytes(header.part10, zstd_level)
    elif parsed.mode is StorageMode.PASSTHROUGH:
        fragments = list(iter_fragments(parsed))
        for fragment in fragments:
            hasher.update(len(fragment).to_bytes(8, "little"))
            hasher.update(fragment)
        header_blob = compress_bytes(header.part10, zstd_level)
    else:
        hasher.update(bytes(parsed.dataset.get("PixelData") or b""))
        header_blob = compress_bytes(parsed.source_bytes, zstd_level)  # the whole object is the header
    return _Prepared(
        parsed=parsed,
        header_blob=header_blob,
        header_sha256=header.dataset_sha256,
        pixel_sha256=digest if frames is not None else hasher.hexdigest(),
        frames=frames,
        fragments=fragments,
        codec=codec,
    )


def pixel_hash(frames: Iterable[np.ndarray]) -> str:
    """The pixel hash of decoded frames: dtype and shape, then the C-ordered values (no copy when contiguous).

    Duplicate detection and re-compression both compare against it.
    """
    digest = hashlib.sha256()
    for frame in frames:
        frame = np.ascontiguousarray(frame)
        digest.update(f"{frame.dtype.str}{frame.shape}".encode())
        digest.update(frame.data)
    return digest.hexdigest()


def _find_duplicate(session: Session, prepared: _Prepared) -> FileOutcome | None:
    parsed = prepared.parsed
    other = session.scalar(
        select(Instance.id).where(
            Instance.sop_instance_uid == parsed.sop_instance_uid,
            Instance.header_sha256 == prepared.header_sha256,
            Instance.pixel_sha256 == prepared.pixel_sha256,
        ).limit(1)
    )
    if other is None:
        return None
    return FileOutcome(parsed.source_path, Outcome.DUPLICATE, f"same SOP instance as already archived (instance {other})",
                       study_uid=parsed.study_uid)


def _stage(store: BlobStore, prepared: _Prepared) -> StagedInstance:
    parsed = prepared.parsed
    layout = parsed.layout
    blob_sizes: dict[str, int] = {}

    def put(data: bytes) -> str:
        digest = store.put(data)
        blob_sizes[digest] = len(data)
        return digest

    header_digest = put(prepared.header_blob)
    side_info: dict[str, Any] = {"modality": parsed.text("Modality")}
    if layout is not None:
        side_info.update(
            photometric=layout.output_photometric,
            bits_allocated=layout.bits_allocated,
            bits_stored=layout.bits_stored,
            pixel_representation=layout.pixel_representation,
            dtype=layout.dtype,
            frame_shape=list(layout.frame_shape),
        )
    if parsed.mode is StorageMode.PIXELS:
        assert prepared.frames is not None and layout is not None
        encoding, frames = encode_frames(prepared.codec, prepared.frames, layout.bits_stored, layout.total_pixels,
                                         layout.frame_bytes * layout.number_of_frames, side_info, str(parsed.source_path))
        frame_refs = [(put(data), len(data)) for data in frames]
    elif parsed.mode is StorageMode.PASSTHROUGH:
        assert prepared.fragments is not None and layout is not None
        frame_refs = [(put(f), len(f)) for f in prepared.fragments]
        after = sum(len(f) for f in prepared.fragments)
        before = layout.frame_bytes * layout.number_of_frames
        encoding = dict(
            kind="passthrough", codec_id="passthrough",
            codec_config={"id": "passthrough", "transfer_syntax": parsed.transfer_syntax_uid},
            actual_codecs={"passthrough": len(frame_refs)}, library_versions={}, side_info=side_info,
            num_frames=len(frame_refs), bytes_before=before, bytes_after=after, ratio=before / max(after, 1),
            bits_per_pixel=after * 8 / max(layout.total_pixels, 1), mse=0.0, psnr=None, psnr_range=None,
            max_abs_error=0.0,
        )
    else:  # WHOLE: the header blob is the whole object; the encoding records what that cost
        frame_refs = []
        size = len(prepared.header_blob)
        pixels = layout.total_pixels if layout else 0
        encoding = dict(
            kind="whole", codec_id="zstd", codec_config={"id": "zstd", "level": 0, "scope": "whole file"},
            actual_codecs={"zstd": 1}, library_versions=_zstd_versions(), side_info=side_info, num_frames=0,
            bytes_before=len(parsed.source_bytes), bytes_after=size, ratio=len(parsed.source_bytes) / max(size, 1),
            bits_per_pixel=size * 8 / pixels if pixels else 0.0, mse=0.0, psnr=None, psnr_range=None,
            max_abs_error=0.0,
        )
    return StagedInstance(prepared=prepared, header_digest=header_digest, encoding=encoding, frames=frame_refs,
                          blob_sizes=blob_sizes)


def encode_frames(
    codec: Codec,
    frames: Sequence[np.ndarray],
    bits_stored: int,
    total_pixels: int,
    bytes_before: int,
    side_info: dict[str, Any],
    label: str,
    max_error: float | None = None,
) -> tuple[dict[str, Any], list[bytes]]:
    """Encode frames and decode each back to measure it; returns Encoding columns and the frame bytes.

    A lossless codec that does not round-trip a frame falls back to zstd
    rather than store wrong pixels; a lossy one beyond ``max_error`` raises.
    """
    fallback = get_codec({"id": "zstd"})
    stats = ErrorStats(peak=float(2**bits_stored - 1))
    actual: Counter[str] = Counter()
    offsets: list[int] = []
    encoded: list[bytes] = []
    encode_s = decode_s = 0.0
    for index, frame in enumerate(frames):
        t0 = time.perf_counter()
        data = codec.encode(frame)
        t1 = time.perf_counter()
        decoded = decode_frame(data)
        t2 = time.perf_counter()
        encode_s += t1 - t0
        decode_s += t2 - t1
        exact = np.array_equal(decoded, frame)
        if codec.lossless and not exact:
            data = fallback.encode(frame)  # never keep a "lossless" frame that does not round-trip
            decoded = decode_frame(data)
            exact = np.array_equal(decoded, frame)
            if not exact:
                raise ArchiveError(f"frame {index} of {label} does not round-trip through zstd")
        stats.add(frame, decoded, exact=exact)
        header = read_frame_header(data)
        actual[header.codec_id] += 1
        offsets.append(header.offset)
        encoded.append(data)
    if max_error is not None and (stats.max_abs_error or 0.0) > max_error:
        raise ArchiveError(f"{label}: {codec.codec_id} error {stats.max_abs_error} exceeds the bound {max_error}")
    side_info["value_offsets"] = offsets if len(offsets) <= 64 else {"min": min(offsets), "max": max(offsets)}
    after = sum(len(d) for d in encoded)
    columns = dict(
        kind="lossless" if codec.lossless else "lossy",
        codec_id=codec.codec_id,
        codec_config=codec.get_config(),
        actual_codecs=dict(actual),
        library_versions=codec.library_versions(),
        side_info=side_info,
        num_frames=len(encoded),
        bytes_before=bytes_before,
        bytes_after=after,
        ratio=bytes_before / max(after, 1),
        bits_per_pixel=after * 8 / max(total_pixels, 1),
        mse=stats.mse,
        psnr=stats.psnr,
        psnr_range=stats.psnr_range,
        max_abs_error=stats.max_abs_error,
        encode_ms=encode_s * 1000,
        decode_ms=decode_s * 1000,
    )
    return columns, encoded


def _insert(
    session: Session, model: type[Any], values: dict[str, Any] | list[dict[str, Any]], key: str,
    refresh: tuple[str, ...] = (),
) -> None:
    """INSERT ... ON CONFLICT: concurrent workers may create the same study, series or blob.

    Columns in ``refresh`` are overwritten on conflict (a blob's ``created_at``
    restarts the garbage collector's grace period when a new row references it).
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        statement: Any = pg_insert(model).values(values)
    elif dialect == "sqlite":
        statement = sqlite_insert(model).values(values)
    else:  # pragma: no cover - other databases are not supported yet
        raise ArchiveError(f"unsupported catalog database {dialect}")
    if refresh:
        statement = statement.on_conflict_do_update(
            index_elements=[key], set_={name: statement.excluded[name] for name in refresh}
        )
    else:
        statement = statement.on_conflict_do_nothing(index_elements=[key])
    session.execute(statement)


def ensure_blob_row(session: Session, digest: str, size: int) -> None:
    """Record a blob (or refresh its age) in the transaction that references it."""
    _ensure_blob_rows(session, {digest: size})


def _ensure_blob_rows(session: Session, sizes: dict[str, int]) -> None:
    """One multi-row upsert; sorted, so concurrent writers lock rows in the same order."""
    now = _now()
    rows = [{"sha256": digest, "size": size, "created_at": now} for digest, size in sorted(sizes.items())]
    for start in range(0, len(rows), 500):
        _insert(session, Blob, rows[start:start + 500], "sha256", refresh=("created_at",))


def _get_or_create_study(session: Session, parsed: ParsedInstance) -> Study:
    study = session.scalar(select(Study).where(Study.study_uid == parsed.study_uid))
    if study is None:
        now = _now()
        _insert(session, Study, dict(
            study_uid=parsed.study_uid,
            patient_id=parsed.text("PatientID"),
            patient_name=parsed.text("PatientName"),
            study_date=(parsed.text("StudyDate") or "")[:8] or None,
            study_time=parsed.text("StudyTime"),
            accession_number=parsed.text("AccessionNumber"),
            study_description=(parsed.text("StudyDescription") or "")[:256] or None,
            num_series=0, num_instances=0, bytes_original=0, bytes_stored=0, created_at=now, updated_at=now,
        ), "study_uid")
        study = session.scalars(select(Study).where(Study.study_uid == parsed.study_uid)).one()
    return study


def _get_or_create_series(session: Session, parsed: ParsedInstance, study: Study) -> Series:
    series = session.scalar(select(Series).where(Series.series_uid == parsed.series_uid))
    if series is None:
        _insert(session, Series, dict(
            study_id=study.id,
            series_uid=parsed.series_uid,
            modality=parsed.text("Modality"),
            series_number=parsed.integer("SeriesNumber"),
            series_description=(parsed.text("SeriesDescription") or "")[:256] or None,
            body_part=parsed.text("BodyPartExamined"),
            num_instances=0, created_at=_now(),
        ), "series_uid")
        series = session.scalars(select(Series).where(Series.series_uid == parsed.series_uid)).one()
    return series


def quarantine_file(archive: Archive, path: Path, reason: str, error_type: str, *, job_id: int | None = None) -> FileOutcome:
    """Copy ``path`` into the quarantine folder with its reason; the source is left as it is."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    folder = archive.settings.quarantine_dir / digest[:2]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{digest[:16]}__{safe_filename(path.name)}"
    if not target.exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        target.with_name(target.name + ".reason.txt").write_text(f"{path}\n{error_type}: {reason}\n")
    with archive.unit_of_work() as uow:
        known = uow.session.scalar(
            select(func.count()).select_from(QuarantineEntry).where(
                QuarantineEntry.sha256 == digest, QuarantineEntry.source_path == str(path)
            )
        )
        if not known:
            uow.session.add(QuarantineEntry(
                source_path=str(path), stored_path=str(target), reason=reason, error_type=error_type,
                sha256=digest, size=len(data), job_id=job_id,
            ))
            uow.commit()
    return FileOutcome(path, Outcome.QUARANTINED, reason, bytes_in=len(data))


def _zstd_versions() -> dict[str, str]:
    import imagecodecs

    return {"imagecodecs": imagecodecs.__version__, "zstd": imagecodecs.zstd_version()}


def _now() -> datetime:
    return datetime.now(timezone.utc)
