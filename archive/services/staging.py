"""Staging: read, classify, encode, verify and write one file's blobs, without touching the catalog's rows.

Staging holds no transaction, so a pool of processes (``ingest --jobs``) or
the Celery workers stage in parallel while one writer commits catalog rows in
batches. A :class:`StagedInstance` is plain data (it crosses process
boundaries) and its blobs are durable before it is returned: a crash before
its rows are committed leaves only unreferenced blobs for the garbage
collector.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from archive.catalog.models import Instance
from archive.codecs import Codec
from archive.dicom.header import header_of
from archive.dicom.reader import ParsedInstance, iter_fragments, iter_frames, read_instance
from archive.dicom.writer import canonical_header_sha256, read_header
from archive.errors import ArchiveError, InstanceTimeLimitExceeded, InvalidDicomError, NotDicomError
from archive.kinds import EncodingKind, StorageMode
from archive.services.encoding import encode_frames, pixel_hash
from archive.services.header_dictionaries import HeaderDictionaries, header_key
from archive.services.outcomes import TRANSIENT_ERRNOS, FileOutcome, Outcome
from archive.services.quarantine import quarantine_file
from archive.services.runtime import Archive
from archive.store import BlobRef, BlobStore
from archive.store.compression import compress_bytes


_T = TypeVar("_T")


@dataclass
class StagedInstance:
    """An instance read, encoded, verified and durably written to the blob store, not yet in the catalog."""

    path: Path
    study: dict[str, Any]  # Study columns
    series: dict[str, Any]  # Series columns, without study_id
    instance: dict[str, Any]  # Instance columns, without series, conflict and job fields
    encoding: dict[str, Any]  # Encoding columns
    header: BlobRef
    frames: list[BlobRef] = field(default_factory=list)
    mode_reason: str = ""
    bytes_stored: int = 0
    header_key: str = ""  # modality and manufacturer: which header dictionary fits

    @property
    def frames_or_pixels(self) -> bool:
        """False for an object kept whole (its header blob is the whole file: no dictionary for it)."""
        return self.encoding.get("kind") is not EncodingKind.WHOLE

    @property
    def header_dictionary(self) -> str | None:
        value = self.instance.get("header_dictionary")
        return None if value is None else str(value)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.instance["sop_instance_uid"])

    @property
    def study_uid(self) -> str:
        return str(self.study["study_uid"])

    @property
    def series_uid(self) -> str:
        return str(self.series["series_uid"])

    @property
    def header_sha256(self) -> str:
        return str(self.instance["header_sha256"])

    @property
    def pixel_sha256(self) -> str | None:
        value = self.instance["pixel_sha256"]
        return None if value is None else str(value)

    @property
    def bytes_in(self) -> int:
        return int(self.instance["source_size"])

    @property
    def blobs(self) -> list[BlobRef]:
        return [self.header, *self.frames]


@dataclass
class _Read:
    """What staging learned from the file before anything is written."""

    parsed: ParsedInstance
    header_part10: bytes
    header_sha256: str
    pixel_sha256: str
    frames: list[np.ndarray] | None = None  # decoded stored values (PIXELS)
    fragments: list[bytes] | None = None  # original compressed frames (PASSTHROUGH)

    @property
    def pixel_bytes(self) -> int:
        """Memory held until the write phase."""
        if self.frames is not None:
            return sum(frame.nbytes for frame in self.frames)
        return len(self.parsed.source_bytes)


Guard = Callable[[Path], AbstractContextManager[object]]
MAX_PENDING_BYTES = 256 * 1024**2  # decoded pixels held between the read and the write phase


def stage_file(
    archive: Archive, path: Path, codec: Codec, *, job_id: int | None = None, session: Session | None = None,
    sync: bool = True,
) -> StagedInstance | FileOutcome:
    """Read, classify, encode and verify one file; bad input becomes a skip or quarantine outcome.

    ``session`` (read only) serves the duplicate look-up; without one a short unit of work does.
    With ``sync`` the blobs are durable on return; a batch writer passes False
    and makes the whole batch durable at once (``ArchiveStore.make_durable``)
    before committing it.
    """
    return stage_files(archive, [path], codec, job_id=job_id, session=session, sync=sync)[0]


def stage_files(
    archive: Archive, paths: Sequence[Path], codec: Codec, *, job_id: int | None = None,
    session: Session | None = None, sync: bool = True, guard: Guard | None = None,
) -> list[StagedInstance | FileOutcome]:
    """Stage several files: read them, look their SOP instances up in one query, then encode and write.

    ``guard(path)`` wraps each file's read and its write (the batch service's
    per-instance time limit); an instance that exceeds it is quarantined.
    Decoded pixels wait between the phases up to ``MAX_PENDING_BYTES``.
    """
    results: list[StagedInstance | FileOutcome | None] = [None] * len(paths)
    pending: list[tuple[int, _Read]] = []
    pending_bytes = 0
    with _lookups(archive, session) as lookups:

        def write_pending() -> None:
            duplicates = find_duplicates(archive, lookups, [read for _, read in pending])
            for index, read in pending:
                duplicate = duplicates.get(id(read))
                if duplicate is not None:
                    results[index] = duplicate
                else:
                    write = partial(_stage_write, archive, lookups, read, codec, job_id)
                    results[index] = _guarded(archive, paths[index], job_id, guard, write)
            pending.clear()

        for index, path in enumerate(paths):
            outcome = _guarded(archive, path, job_id, guard, partial(_read_or_outcome, archive, path, job_id))
            if isinstance(outcome, (StagedInstance, FileOutcome)):
                results[index] = outcome
                continue
            pending.append((index, outcome))
            pending_bytes += outcome.pixel_bytes
            if pending_bytes >= MAX_PENDING_BYTES:
                write_pending()
                pending_bytes = 0
        write_pending()
    if sync:
        archive.store.sync()  # durable before anyone commits rows that reference them
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def _guarded(archive: Archive, path: Path, job_id: int | None, guard: Guard | None,
             step: Callable[[], _T]) -> _T | FileOutcome:
    if guard is None:
        return step()
    try:
        with guard(path):
            return step()
    except InstanceTimeLimitExceeded as exc:
        return quarantine_file(archive, path, str(exc), type(exc).__name__, job_id=job_id)


def _read_or_outcome(archive: Archive, path: Path, job_id: int | None) -> _Read | FileOutcome:
    try:
        return _read(path)
    except InstanceTimeLimitExceeded:
        raise
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


def _stage_write(archive: Archive, lookups: Session, read: _Read, codec: Codec, job_id: int | None
                 ) -> StagedInstance | FileOutcome:
    try:
        return _write(archive.store, archive.headers, lookups, read, codec, archive.settings.header_zstd_level)
    except InstanceTimeLimitExceeded:
        raise
    except ArchiveError as exc:
        path = read.parsed.source_path
        return quarantine_file(archive, path, str(exc), type(exc).__name__, job_id=job_id)


@contextmanager
def _lookups(archive: Archive, session: Session | None) -> Iterator[Session]:
    if session is not None:
        yield session
        return
    with archive.unit_of_work() as uow:
        yield uow.session


def lookup_session(archive: Archive) -> Session:
    """A read-only session without a transaction (each query sees what is committed): for a stager's look-ups.

    One per staging process saves a pool checkout, a ping and a BEGIN/ROLLBACK per file.
    """
    connection = archive.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    return Session(bind=connection)


def _read(path: Path) -> _Read:
    parsed = read_instance(path)
    header = header_of(parsed)
    if parsed.mode is StorageMode.PIXELS:
        frames = list(iter_frames(parsed))
        return _Read(parsed, header.part10, header.dataset_sha256, pixel_hash(frames), frames=frames)
    hasher = hashlib.sha256()
    if parsed.mode is StorageMode.PASSTHROUGH:
        fragments = list(iter_fragments(parsed))
        for fragment in fragments:
            hasher.update(len(fragment).to_bytes(8, "little"))
            hasher.update(fragment)
        return _Read(parsed, header.part10, header.dataset_sha256, hasher.hexdigest(), fragments=fragments)
    hasher.update(bytes(parsed.dataset.get("PixelData") or b""))
    return _Read(parsed, header.part10, header.dataset_sha256, hasher.hexdigest())


def find_duplicates(archive: Archive, session: Session, reads: Sequence[_Read]) -> dict[int, FileOutcome]:
    """Reads whose SOP instance is already archived (same pixels, same header elements), by ``id(read)``.

    One query for all of them. Header hashes are compared first; when they
    differ but the pixels match, both headers' elements are compared
    independently of their encoding (an instance kept as received and its copy
    re-sent in another transfer syntax are the same elements written
    differently).
    """
    uids = sorted({read.parsed.sop_instance_uid for read in reads})
    known: dict[tuple[str, str | None], list[Any]] = {}
    for start in range(0, len(uids), 500):
        for row in session.connection().execute(  # Core: no ORM layer
            select(Instance.id, Instance.sop_instance_uid, Instance.pixel_sha256, Instance.header_sha256,
                   Instance.header_blob, Instance.header_dictionary)
            .where(Instance.sop_instance_uid.in_(uids[start:start + 500])).order_by(Instance.id)
        ):
            known.setdefault((row.sop_instance_uid, row.pixel_sha256), []).append(row)
    found: dict[int, FileOutcome] = {}
    for read in reads:
        parsed = read.parsed
        rows = known.get((parsed.sop_instance_uid, read.pixel_sha256), [])
        same = next((row.id for row in rows if row.header_sha256 == read.header_sha256), None)
        if same is None and rows:
            canonical = canonical_header_sha256(parsed.dataset)
            for row in rows:
                part10 = archive.headers.read_header(session, row.header_blob, row.header_dictionary)
                if canonical_header_sha256(read_header(part10)) == canonical:
                    same = row.id
                    break
        if same is not None:
            found[id(read)] = FileOutcome(parsed.source_path, Outcome.DUPLICATE,
                                          f"same SOP instance as already archived (instance {same})",
                                          study_uid=parsed.study_uid)
    return found


def _write(
    store: BlobStore, headers: HeaderDictionaries, session: Session, read: _Read, codec: Codec, zstd_level: int
) -> StagedInstance:
    parsed = read.parsed
    layout = parsed.layout
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
    if parsed.mode is StorageMode.WHOLE:  # the header blob is the whole object; the encoding records what that cost
        header = store.put(compress_bytes(parsed.source_bytes, zstd_level))
        pixels = layout.total_pixels if layout else 0
        side_info["scope"] = "whole file"
        encoding: dict[str, Any] = dict(
            kind=EncodingKind.WHOLE, codec_id="zstd", codec_config={"id": "zstd", "level": zstd_level},
            actual_codecs={"zstd": 1}, library_versions=_zstd_versions(), side_info=side_info, num_frames=0,
            bytes_before=len(parsed.source_bytes), bytes_after=header.size,
            ratio=len(parsed.source_bytes) / max(header.size, 1),
            bits_per_pixel=header.size * 8 / pixels if pixels else 0.0, mse=0.0, psnr=None, psnr_range=None,
            max_abs_error=0.0,
        )
        frames: list[BlobRef] = []
        stored = header.size
        dictionary = None
    else:
        header_bytes, dictionary = headers.compress(header_key_of(parsed), read.header_part10, session)
        header = store.put(header_bytes)
        assert layout is not None
        if parsed.mode is StorageMode.PIXELS:
            assert read.frames is not None
            encoding, encoded = encode_frames(codec, read.frames, layout.bits_stored, layout.total_pixels,
                                              layout.frame_bytes * layout.number_of_frames, side_info,
                                              str(parsed.source_path))
        else:
            assert read.fragments is not None
            encoded = read.fragments
            after = sum(len(f) for f in encoded)
            before = layout.frame_bytes * layout.number_of_frames
            encoding = dict(
                kind=EncodingKind.PASSTHROUGH, codec_id="passthrough",
                codec_config={"id": "passthrough", "transfer_syntax": parsed.transfer_syntax_uid},
                actual_codecs={"passthrough": len(encoded)}, library_versions={}, side_info=side_info,
                num_frames=len(encoded), bytes_before=before, bytes_after=after, ratio=before / max(after, 1),
                bits_per_pixel=after * 8 / max(layout.total_pixels, 1), mse=0.0, psnr=None, psnr_range=None,
                max_abs_error=0.0,
            )
        frames = [store.put(data) for data in encoded]
        stored = header.size + int(encoding["bytes_after"])
    return StagedInstance(
        path=parsed.source_path,
        study=_study_columns(parsed),
        series=_series_columns(parsed),
        instance=dict(_instance_columns(read), header_dictionary=dictionary),
        encoding=encoding,
        header=header,
        frames=frames,
        mode_reason=parsed.mode_reason,
        bytes_stored=stored,
        header_key=header_key_of(parsed),
    )


def header_key_of(parsed: ParsedInstance) -> str:
    return header_key(parsed.text("Modality"), parsed.text("Manufacturer"))


def _study_columns(parsed: ParsedInstance) -> dict[str, Any]:
    return dict(
        study_uid=parsed.study_uid,
        patient_id=parsed.text("PatientID"),
        patient_name=parsed.text("PatientName"),
        study_date=(parsed.text("StudyDate") or "")[:8] or None,
        study_time=parsed.text("StudyTime"),
        accession_number=parsed.text("AccessionNumber"),
        study_description=(parsed.text("StudyDescription") or "")[:256] or None,
    )


def _series_columns(parsed: ParsedInstance) -> dict[str, Any]:
    return dict(
        series_uid=parsed.series_uid,
        modality=parsed.text("Modality"),
        series_number=parsed.integer("SeriesNumber"),
        series_description=(parsed.text("SeriesDescription") or "")[:256] or None,
        body_part=parsed.text("BodyPartExamined"),
    )


def _instance_columns(read: _Read) -> dict[str, Any]:
    parsed = read.parsed
    layout = parsed.layout
    return dict(
        sop_instance_uid=parsed.sop_instance_uid,
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
        header_sha256=read.header_sha256,
        pixel_sha256=read.pixel_sha256,
        assigned_uids=parsed.assigned_uids or None,
        source_path=str(parsed.source_path),
        source_size=len(parsed.source_bytes),
        source_sha256=parsed.source_sha256,
    )


def _zstd_versions() -> dict[str, str]:
    import imagecodecs

    return {"imagecodecs": imagecodecs.__version__, "zstd": imagecodecs.zstd_version()}
