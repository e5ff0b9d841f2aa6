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

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from archive.catalog.models import HeaderRevision, Instance
from archive.codecs import Codec, decode_frame
from archive.codecs.fragment import FragmentLayout, wrap_fragment
from archive.dicom.header import header_of
from archive.dicom.reader import (
    LOSSLESS,
    ParsedInstance,
    fidelity,
    is_lossless_compressed,
    iter_fragments,
    iter_frames,
    parse_instance,
    read_instance,
)
from archive.dicom.uids import uid_text
from archive.dicom.writer import canonical_header_sha256, read_header
from archive.errors import ArchiveError, InstanceTimeLimitExceeded, InvalidDicomError, NotDicomError
from archive.kinds import EncodingKind, StorageMode
from archive.services.codec_choice import series_codecs
from archive.services.encoding import RECENT_FRAMES, encode_frames, pixel_hash
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
    context: BlobRef | None = None  # the codec's side blob the frames decode with
    mode_reason: str = ""
    bytes_stored: int = 0
    header_key: str = ""  # modality and manufacturer: which header dictionary fits
    fidelity: int = LOSSLESS  # archive.dicom.reader.fidelity: lossless beats lossy for one SOP Instance UID

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
        return [self.header, *self.frames, *([self.context] if self.context is not None else [])]


@dataclass(frozen=True)
class MadeInstance:
    """An instance medarchive made in memory (a normalized image): Part 10 bytes and a label for the catalog.

    It is staged like a file, except that a failure is a bug to report, not
    bad input to quarantine: the error propagates.
    """

    data: bytes
    label: str  # recorded as the instance's source_path, e.g. "normalized:ct:<source SOP Instance UID>"
    encoded: PreEncoded | None = None  # frames already encoded (a lossy representation): stored as they are


@dataclass(frozen=True)
class PreEncoded:
    """Frames a caller encoded itself (a lossy codec, perhaps with a context blob) and their Encoding columns.

    Staging checks that they decode (``decoded``, or decoding them here) to
    the made instance's pixels, bit for bit, and stores them instead of
    encoding the pixels again.
    """

    frames: list[bytes]
    columns: dict[str, Any]
    context: bytes | None = None
    decoded: list[np.ndarray] | None = None  # what ``frames`` decode to, when the caller decoded them already


Source = Path | MadeInstance


@dataclass
class _Read:
    """What staging learned from the file before anything is written."""

    parsed: ParsedInstance
    header_part10: bytes
    header_sha256: str
    pixel_sha256: str
    frames: list[np.ndarray] | None = None  # decoded stored values (PIXELS)
    fragments: list[bytes] | None = None  # original compressed frames (PASSTHROUGH, lossless compressed PIXELS)
    encoded: PreEncoded | None = None  # a made instance's own encoding

    @property
    def pixel_bytes(self) -> int:
        """Memory held until the write phase."""
        if self.frames is not None:
            return sum(frame.nbytes for frame in self.frames) + sum(len(f) for f in self.fragments or ())
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
    archive: Archive, paths: Sequence[Source], codec: Codec, *, job_id: int | None = None,
    session: Session | None = None, sync: bool = True, guard: Guard | None = None,
) -> list[StagedInstance | FileOutcome]:
    """Stage several files (or instances made in memory): read them, look their SOP instances up in one query,
    then encode and write.

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
            chosen = series_codecs(archive, codec, [  # auto: one trial per series, recorded
                (read.parsed.series_uid, read.frames) for _, read in pending
                if read.frames is not None and read.encoded is None and id(read) not in duplicates])
            for index, read in pending:
                duplicate = duplicates.get(id(read))
                own = chosen.get(read.parsed.series_uid, codec)
                if duplicate is not None:
                    results[index] = duplicate
                elif isinstance(paths[index], MadeInstance):
                    results[index] = _write(archive.store, archive.headers, lookups, read, own,
                                            archive.settings.header_zstd_level)
                else:
                    source = paths[index]
                    assert not isinstance(source, MadeInstance)
                    write = partial(_stage_write, archive, lookups, read, own, job_id)
                    results[index] = _guarded(archive, Path(source), job_id, guard, write)
            pending.clear()

        for index, path in enumerate(paths):
            if isinstance(path, MadeInstance):
                outcome: _Read | StagedInstance | FileOutcome = _read_made(path)
            else:
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
    return _read_parsed(read_instance(path))


def _read_made(made: MadeInstance) -> _Read:
    read = _read_parsed(parse_instance(made.data, Path(made.label)))
    read.encoded = made.encoded
    return read


def _read_parsed(parsed: ParsedInstance) -> _Read:
    header = header_of(parsed)
    if parsed.mode is StorageMode.PIXELS:
        frames = list(iter_frames(parsed))
        kept = list(iter_fragments(parsed)) if is_lossless_compressed(parsed) else None
        return _Read(parsed, header.part10, header.dataset_sha256, pixel_hash(frames), frames=frames, fragments=kept)
    if parsed.mode is StorageMode.PASSTHROUGH:
        fragments = list(iter_fragments(parsed))
        return _Read(parsed, header.part10, header.dataset_sha256, fragments_sha256(fragments), fragments=fragments)
    return _Read(parsed, header.part10, header.dataset_sha256, whole_pixel_sha256(parsed))


def fragments_sha256(fragments: Sequence[bytes]) -> str:
    """The pixel identity of a passthrough instance: its codestreams (lossy pixels have no other)."""
    hasher = hashlib.sha256()
    for fragment in fragments:
        hasher.update(len(fragment).to_bytes(8, "little"))
        hasher.update(fragment)
    return hasher.hexdigest()


_FLOAT_PIXEL_TAGS = ((Tag(0x7FE00008), 4), (Tag(0x7FE00009), 8))  # Float / Double Float Pixel Data


def whole_pixel_sha256(parsed: ParsedInstance) -> str:
    """The pixel identity of a whole-kept object: its pixel values as little-endian bytes, whatever the syntax.

    Pixel Data arrives big endian in Explicit VR Big Endian (OW words, or
    samples of BitsAllocated bits, swapped); deflate is undone by the reader.
    Little-endian Pixel Data alone hashes as it always did (catalogs keep
    their hashes); float pixel data is hashed too, each after its tag.
    """
    ds = parsed.dataset
    big = parsed.transfer_syntax_uid == ExplicitVRBigEndian
    hasher = hashlib.sha256()
    element = ds.get(Tag(0x7FE00010))
    if element is not None:
        width = max(int(ds.get("BitsAllocated") or 8) // 8, 2 if element.VR == "OW" else 1)
        hasher.update(_little_endian(bytes(element.value or b""), width if big else 1))
    for tag, width in _FLOAT_PIXEL_TAGS:
        element = ds.get(tag)
        if element is not None:
            hasher.update(int(tag).to_bytes(4, "little"))
            hasher.update(_little_endian(bytes(element.value or b""), width if big else 1))
    return hasher.hexdigest()


def _little_endian(data: bytes, width: int) -> bytes:
    if width <= 1:
        return data
    usable = len(data) - len(data) % width
    return np.frombuffer(data[:usable], dtype=f">u{width}").byteswap().tobytes() + data[usable:]


def archived_pixel_sha256(data: bytes) -> str | None:
    """The pixel identity a whole-kept object's stored file has today (None when it cannot be read).

    A catalog row keeps the hash of the day it was stored; an object kept
    whole in another syntax (or before the hash was syntax-independent)
    is compared by reading it back.
    """
    try:
        parsed = parse_instance(data, Path("archived.dcm"))
        if parsed.mode is StorageMode.PIXELS:
            return pixel_hash(iter_frames(parsed))
        if parsed.mode is StorageMode.PASSTHROUGH:
            return fragments_sha256(list(iter_fragments(parsed)))
        return whole_pixel_sha256(parsed)
    except ArchiveError:
        return None


def find_duplicates(archive: Archive, session: Session, reads: Sequence[_Read]) -> dict[int, FileOutcome]:
    """Reads whose SOP instance is already archived (same pixels, same header elements), by ``id(read)``.

    One query for all of them, and one for earlier headers of the instances
    found (an administrator's correction keeps the header as received: the
    modality re-sending it sends a duplicate). Header hashes are compared
    first; when they differ but the pixels match, the headers' elements are
    compared independently of their encoding (an instance kept as received and
    its copy re-sent in another transfer syntax are the same elements written
    differently). A whole-kept instance whose stored pixel hash differs is
    read back and its pixel values compared. The duplicates' archived blobs
    are re-hashed (once per chunk) and a damaged one is repaired from the
    arriving file.
    """
    uids = sorted({read.parsed.sop_instance_uid for read in reads})
    known: dict[str, list[Any]] = {}
    for start in range(0, len(uids), 500):
        for row in session.connection().execute(  # Core: no ORM layer
            select(Instance.id, Instance.sop_instance_uid, Instance.pixel_sha256, Instance.header_sha256,
                   Instance.header_blob, Instance.header_dictionary, Instance.storage_mode)
            .where(Instance.sop_instance_uid.in_(uids[start:start + 500])).order_by(Instance.id)
        ):
            known.setdefault(row.sop_instance_uid, []).append(row)
    if not known:
        return {}
    previous = previous_headers(session, [row.id for rows in known.values() for row in rows])
    canonical: dict[str, str | None] = {}  # header blob digest -> canonical element hash
    archived_pixels: dict[int, str | None] = {}  # whole-kept instance id -> its pixel identity read back

    def canonical_of(blob: str, dictionary: str | None) -> str | None:
        if blob not in canonical:
            try:
                canonical[blob] = canonical_header_sha256(
                    read_header(archive.headers.read_header(session, blob, dictionary)))
            except ArchiveError:  # a damaged blob: not proof of sameness (repair is another path)
                canonical[blob] = None
        return canonical[blob]

    def same_pixels(row: Any, read: _Read) -> bool:
        if row.pixel_sha256 == read.pixel_sha256:
            return True
        if row.storage_mode is not StorageMode.WHOLE and read.parsed.mode is not StorageMode.WHOLE:
            return False
        if row.storage_mode is StorageMode.WHOLE and row.id not in archived_pixels:
            try:
                archived_pixels[row.id] = archived_pixel_sha256(
                    archive.headers.read_header(session, row.header_blob, row.header_dictionary))
            except ArchiveError:
                archived_pixels[row.id] = None
        return archived_pixels.get(row.id) == read.pixel_sha256

    duplicates: dict[int, tuple[_Read, int]] = {}
    for read in reads:
        parsed = read.parsed
        rows = [row for row in known.get(parsed.sop_instance_uid, []) if same_pixels(row, read)]
        variants = [(row.id, row.header_sha256, row.header_blob, row.header_dictionary) for row in rows]
        variants += [(row.id, *header) for row in rows for header in previous.get(row.id, ())]
        same = next((row_id for row_id, sha, _, _ in variants if sha == read.header_sha256), None)
        if same is None and variants:
            mine = canonical_header_sha256(parsed.dataset)
            same = next((row_id for row_id, _, blob, dictionary in variants
                         if canonical_of(blob, dictionary) == mine), None)
        if same is not None:
            duplicates[id(read)] = (read, same)

    from archive.services.repair import repair_duplicates  # repair stages through this module

    # a damaged blob of an archived instance is written again from the duplicate's source
    repaired = repair_duplicates(archive, session, {same: read.parsed.source_path for read, same in duplicates.values()})
    found: dict[int, FileOutcome] = {}
    for key, (read, same) in duplicates.items():
        note = repaired.get(same)
        found[key] = FileOutcome(read.parsed.source_path, Outcome.DUPLICATE,
                                 f"same SOP instance as already archived (instance {same})" + (f"; {note}" if note else ""),
                                 study_uid=read.parsed.study_uid)
    return found


def previous_headers(session: Session, instance_ids: Sequence[int]) -> dict[int, list[tuple[str, str, str | None]]]:
    """Headers the instances had before a correction: instance id -> [(header hash, blob, dictionary)]."""
    found: dict[int, list[tuple[str, str, str | None]]] = {}
    ids = sorted(set(instance_ids))
    for start in range(0, len(ids), 500):
        for row in session.connection().execute(
            select(HeaderRevision.instance_id, HeaderRevision.header_sha256, HeaderRevision.header_blob,
                   HeaderRevision.header_dictionary).where(HeaderRevision.instance_id.in_(ids[start:start + 500]))
        ):
            found.setdefault(row.instance_id, []).append((row.header_sha256, row.header_blob, row.header_dictionary))
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
    reason = parsed.mode_reason
    mode = parsed.mode
    encoded: list[bytes]
    if mode is StorageMode.WHOLE:
        header_bytes, dictionary, encoded = compress_bytes(parsed.source_bytes, zstd_level), None, []
        encoding = _whole_encoding(parsed, header_bytes, zstd_level, side_info)
    else:
        header_bytes, dictionary = headers.compress(header_key_of(parsed), read.header_part10, session)
        assert layout is not None
        if mode is StorageMode.PIXELS and read.encoded is not None:
            assert read.frames is not None
            encoding, encoded = _pre_encoded(read.encoded, read.frames, str(parsed.source_path), side_info)
        elif mode is StorageMode.PIXELS:
            assert read.frames is not None
            encoding, encoded = encode_frames(codec, read.frames, layout.bits_stored, layout.total_pixels,
                                              layout.frame_bytes * layout.number_of_frames, side_info,
                                              str(parsed.source_path))
            if read.fragments is not None:
                kept = _keep_original_fragments(read, encoded, side_info, codec.codec_id)
                if kept is not None:
                    encoding, encoded, reason = kept
        else:
            assert read.fragments is not None
            encoded = list(read.fragments)
            encoding = _passthrough_encoding(parsed, encoded, side_info, parsed.transfer_syntax_uid)
        stored_size = len(header_bytes) + sum(len(data) for data in encoded)
        if parsed.transfer_syntax_uid == DeflatedExplicitVRLittleEndian and stored_size > len(parsed.source_bytes):
            whole = compress_bytes(parsed.source_bytes, zstd_level)
            if len(whole) < stored_size:  # the sender's deflate beat our codec: keep the deflated object whole
                reason = (f"deflated input kept whole: {len(whole)} bytes stored, "
                          f"{stored_size} re-encoded, {len(parsed.source_bytes)} received")
                mode, header_bytes, dictionary, encoded = StorageMode.WHOLE, whole, None, []
                encoding = _whole_encoding(parsed, whole, zstd_level, side_info)
    header = store.put(header_bytes)
    frames = [store.put(data) for data in encoded]
    context = None
    if read.encoded is not None and read.encoded.context is not None and mode is StorageMode.PIXELS:
        context = store.put(read.encoded.context)
        encoding["context_blob"] = context.digest
    if mode is StorageMode.PIXELS and read.frames is not None and encoding.get("max_abs_error") == 0 \
            and len(frames) == len(read.frames):  # exact: what decoding the blob gives back
        for ref, frame in zip(frames, read.frames):
            RECENT_FRAMES.put(ref.digest, frame)
    stored = header.size + sum(ref.size for ref in frames)
    if mode is StorageMode.WHOLE:
        encoding.update(bytes_after=header.size, ratio=len(parsed.source_bytes) / max(header.size, 1))
    instance = dict(_instance_columns(read), header_dictionary=dictionary, storage_mode=mode, storage_reason=reason)
    return StagedInstance(
        path=parsed.source_path,
        study=_study_columns(parsed),
        series=_series_columns(parsed),
        instance=instance,
        encoding=encoding,
        header=header,
        frames=frames,
        context=context,
        mode_reason=reason,
        bytes_stored=stored,
        header_key=header_key_of(parsed),
        fidelity=fidelity(parsed),
    )


def _pre_encoded(pre: PreEncoded, frames: Sequence[np.ndarray], label: str, side_info: dict[str, Any]
                 ) -> tuple[dict[str, Any], list[bytes]]:
    """A made instance's own frames, checked to decode to its pixels exactly."""
    if len(pre.frames) != len(frames):
        raise ArchiveError(f"{label}: {len(pre.frames)} encoded frames for {len(frames)} frames of pixels")
    decoded = pre.decoded if pre.decoded is not None else [decode_frame(data, pre.context) for data in pre.frames]
    for index, (back, frame) in enumerate(zip(decoded, frames)):
        if not np.array_equal(back, frame):
            raise ArchiveError(f"{label}: encoded frame {index} does not decode to the instance's pixels")
    columns = dict(pre.columns)
    columns["side_info"] = {**side_info, **columns.get("side_info", {})}
    return columns, list(pre.frames)


def _whole_encoding(parsed: ParsedInstance, blob: bytes, zstd_level: int, side_info: dict[str, Any]) -> dict[str, Any]:
    """The encoding of an object kept whole: the header blob is the whole file; this records what that cost."""
    layout = parsed.layout
    pixels = layout.total_pixels if layout else 0
    side_info["scope"] = "whole file"
    return dict(
        kind=EncodingKind.WHOLE, codec_id="zstd", codec_config={"id": "zstd", "level": zstd_level},
        actual_codecs={"zstd": 1}, library_versions=_zstd_versions(), side_info=side_info, num_frames=0,
        bytes_before=len(parsed.source_bytes), bytes_after=len(blob),
        ratio=len(parsed.source_bytes) / max(len(blob), 1),
        bits_per_pixel=len(blob) * 8 / pixels if pixels else 0.0, mse=0.0, psnr=None, psnr_range=None,
        max_abs_error=0.0,
    )


def _passthrough_encoding(parsed: ParsedInstance, encoded: Sequence[bytes], side_info: dict[str, Any],
                          transfer_syntax_uid: str, codec_id: str = "passthrough", why: str | None = None
                          ) -> dict[str, Any]:
    layout = parsed.layout
    assert layout is not None
    after = sum(len(f) for f in encoded)
    before = layout.frame_bytes * layout.number_of_frames
    config: dict[str, Any] = {"id": codec_id, "transfer_syntax": transfer_syntax_uid}
    if why is not None:
        config["reason"] = why
    return dict(
        kind=EncodingKind.PASSTHROUGH, codec_id=codec_id, codec_config=config,
        actual_codecs={codec_id: len(encoded)}, library_versions={}, side_info=side_info,
        num_frames=len(encoded), bytes_before=before, bytes_after=after, ratio=before / max(after, 1),
        bits_per_pixel=after * 8 / max(layout.total_pixels, 1), mse=0.0, psnr=None, psnr_range=None,
        max_abs_error=0.0,
    )


def _keep_original_fragments(read: _Read, encoded: Sequence[bytes], side_info: dict[str, Any], codec_id: str
                             ) -> tuple[dict[str, Any], list[bytes], str] | None:
    """The original lossless codestreams, when they are smaller than what our codec made of them.

    Each is wrapped in a frame container that decodes to the values read at
    ingest (checked here, and by CRC on every later decode), so retrieval
    serves them bit-exactly in any transfer syntax. None when re-encoding wins.
    """
    parsed, layout = read.parsed, read.parsed.layout
    assert layout is not None and read.frames is not None and read.fragments is not None
    if len(read.fragments) != len(read.frames):
        return None
    fragment_layout = FragmentLayout(parsed.transfer_syntax_uid, layout.bits_allocated, layout.bits_stored,
                                     layout.pixel_representation, layout.planar_configuration or 0,
                                     layout.photometric_interpretation)
    ours = sum(len(data) for data in encoded)
    if sum(len(f) for f in read.fragments) >= ours:
        return None
    wrapped = [wrap_fragment(fragment, frame, fragment_layout) for fragment, frame in zip(read.fragments, read.frames)]
    if sum(len(w) for w in wrapped) >= ours:
        return None
    try:
        if not all(np.array_equal(decode_frame(w), frame) for w, frame in zip(wrapped, read.frames)):
            return None
    except ArchiveError:  # our decoder of the original cannot give the values back: re-encoding it is
        return None
    original = sum(len(f) for f in read.fragments)
    why = (f"lossless compressed input: original fragments kept ({original} bytes; {codec_id} gave {ours})")
    encoding = _passthrough_encoding(parsed, wrapped, side_info, parsed.transfer_syntax_uid, "dicom-fragment", why)
    encoding["library_versions"] = {"pydicom": _pydicom_version()}
    return encoding, wrapped, why


def _pydicom_version() -> str:
    import pydicom

    return str(pydicom.__version__)


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
        **qido_study_columns(parsed.dataset),
    )


def qido_study_columns(ds: Dataset) -> dict[str, Any]:
    """The Study columns of revision 0007 (what QIDO-RS returns) from a header.

    ``specific_character_set`` is "" when the header has none: NULL marks a
    study archived before the revision, which :mod:`archive.services.backfill` fills.
    """
    def text(keyword: str, length: int) -> str | None:
        return (uid_text(ds, keyword) or "")[:length] or None

    return dict(patient_birth_date=text("PatientBirthDate", 8), patient_sex=text("PatientSex", 16),
                referring_physician_name=text("ReferringPhysicianName", 330), dicom_study_id=text("StudyID", 64),
                specific_character_set=text("SpecificCharacterSet", 128) or "")


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
