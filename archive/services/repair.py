"""Use case: write a missing or corrupt blob again from the file it came from.

A blob is content-addressed, so the original file (or any copy of the same
object) is all a repair needs: the file is read and encoded again exactly as
staging does, with the configuration the instance's current encoding records.

- When the fresh blob has the digest of the damaged one (every codec here is
  deterministic for one version of its library), it is appended to a pack
  again and its ``blobs`` row pointed there: every instance that shares the
  blob is repaired at once, no other row changes.
- When the digest differs (a codec library that changed its output, a header
  dictionary that is itself lost), the fresh encoding becomes a new current
  generation, committed only after it decodes to the instance's recorded
  pixel hash; the old generation is released for the garbage collector. A
  header is compressed again without a dictionary and the instance (or the
  kept revision) points at the new blob.

Nothing is trusted from the source beyond what identifies the object: the same
SOP Instance UID, the same pixel identity, and for a header the same header
hash (the header as received for a corrected instance: its revision is what
the source can give back). Every repaired instance gets an audit record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import zstandard
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from archive.catalog.models import EncodedFrame, Encoding, HeaderRevision, Instance
from archive.codecs import Codec, decode_frame, get_codec
from archive.errors import ArchiveError, BlobCorruptError, BlobNotFoundError, NotFoundError
from archive.kinds import AuditAction, EncodingKind, StorageMode
from archive.services import staging
from archive.services.audit import record
from archive.services.blobs import blob_refs, read_blob, record_blobs
from archive.services.discovery import discover
from archive.services.encoding import pixel_hash
from archive.services.recompress import release_encoding
from archive.services.runtime import Archive
from archive.store import BlobRef, BlobStore
from archive.store.compression import compress_bytes, decompress_bytes

MISSING = "missing"
CORRUPT = "corrupt"
LOSSLESS_FALLBACK = {"id": "jpegls"}  # a lossy generation cannot be re-derived: a lossless one replaces it


@dataclass(frozen=True)
class Damage:
    """One bad blob of one instance, and what the instance uses it for."""

    digest: str
    problem: str  # MISSING or CORRUPT
    role: str  # "header", "header dictionary", "frame 3", "revision 1 header", ...


@dataclass
class InstanceRepair:
    """What one repair did to one instance."""

    instance_id: int
    sop_instance_uid: str
    study_uid: str
    source: str
    rewritten: list[str] = field(default_factory=list)  # digests put again under the same address
    replaced: list[str] = field(default_factory=list)  # digests replaced by new blobs (new generation or header)
    new_generation: int | None = None
    remaining: list[Damage] = field(default_factory=list)  # still damaged after the repair
    reason: str = ""  # why something could not be repaired from this source

    @property
    def blobs(self) -> int:
        return len(self.rewritten) + len(self.replaced)

    @property
    def note(self) -> str:
        parts = [f"repaired {self.blobs} blob(s)"]
        if self.new_generation is not None:
            parts.append(f"new generation {self.new_generation}")
        if self.remaining:
            parts.append(f"{len(self.remaining)} still damaged: {self.reason or 'not derivable from this source'}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "sop_instance_uid": self.sop_instance_uid,
                "study_uid": self.study_uid, "source": self.source, "rewritten": self.rewritten,
                "replaced": self.replaced, "new_generation": self.new_generation,
                "remaining": [d.__dict__ for d in self.remaining], "reason": self.reason}


@dataclass
class RepairReport:
    files_scanned: int = 0
    files_matched: int = 0  # files whose SOP instance is archived with a damaged blob
    repaired: list[InstanceRepair] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why) sources that could not repair

    @property
    def blobs_repaired(self) -> int:
        return sum(r.blobs for r in self.repaired)

    def as_dict(self) -> dict[str, Any]:
        return {"files_scanned": self.files_scanned, "files_matched": self.files_matched,
                "blobs_repaired": self.blobs_repaired, "repaired": [r.as_dict() for r in self.repaired],
                "failed": [{"path": p, "reason": why} for p, why in self.failed]}


# ---------------------------------------------------------------------------------------------- checking


def damaged_blobs(session: Session, store: BlobStore, instance_ids: Iterable[int]) -> dict[int, list[Damage]]:
    """The missing or corrupt blobs each instance needs (instances with none are left out).

    Reads and re-hashes every blob once however many instances share it: the
    header, its dictionary, the current encoding's frames and kept header revisions.
    """
    ids = sorted(set(instance_ids))
    if not ids:
        return {}
    uses: dict[int, list[tuple[str, str]]] = {i: [] for i in ids}
    for instance_id, blob, dictionary in session.execute(
            select(Instance.id, Instance.header_blob, Instance.header_dictionary).where(Instance.id.in_(ids))):
        uses[instance_id].append((blob, "header"))
        if dictionary is not None:
            uses[instance_id].append((dictionary, "header dictionary"))
    for instance_id, index, digest in session.execute(
        select(Encoding.instance_id, EncodedFrame.frame_index, EncodedFrame.blob_sha256)
        .join(EncodedFrame, EncodedFrame.encoding_id == Encoding.id)
        .where(Encoding.instance_id.in_(ids), Encoding.is_current)
    ):
        uses[instance_id].append((digest, f"frame {index}"))
    for instance_id, revision, blob, dictionary in session.execute(
            select(HeaderRevision.instance_id, HeaderRevision.revision, HeaderRevision.header_blob,
                   HeaderRevision.header_dictionary).where(HeaderRevision.instance_id.in_(ids))):
        uses[instance_id].append((blob, f"revision {revision} header"))
        if dictionary is not None:
            uses[instance_id].append((dictionary, f"revision {revision} header dictionary"))
    refs = blob_refs(session, {digest for items in uses.values() for digest, _ in items})
    state: dict[str, str | None] = {}
    for digest in sorted({digest for items in uses.values() for digest, _ in items}):
        state[digest] = _check(store, refs.get(digest), digest)
    found: dict[int, list[Damage]] = {}
    for instance_id, items in uses.items():
        bad = [Damage(digest, problem, role) for digest, role in items if (problem := state[digest]) is not None]
        if bad:
            found[instance_id] = bad
    return found


def _check(store: BlobStore, ref: BlobRef | None, digest: str) -> str | None:
    if ref is None:
        return MISSING
    try:
        store.get(ref)
    except BlobNotFoundError:
        return MISSING
    except BlobCorruptError:
        return CORRUPT
    return None


# ---------------------------------------------------------------------------------------------- repairing


def repair_duplicates(archive: Archive, session: Session, sources: dict[int, Path]) -> dict[int, str]:
    """For ingest's duplicate path: repair the instances (id -> source file) that have a damaged blob.

    One check for a whole chunk of duplicates (each blob read and re-hashed
    once, through the caller's look-up ``session``); only damaged instances
    are re-staged. Returns a note per repaired instance ("repaired 2 blob(s)").
    """
    notes: dict[int, str] = {}
    for instance_id in damaged_blobs(session, archive.store, sources):
        try:
            notes[instance_id] = repair_instance(archive, instance_id, Path(sources[instance_id])).note
        except ArchiveError as exc:
            notes[instance_id] = f"damaged blob(s) not repaired: {exc}"
    return notes


def repair_duplicate(archive: Archive, path: Path, instance_id: int) -> str | None:
    """:func:`repair_duplicates` for one instance: None when it is intact."""
    with archive.unit_of_work() as uow:
        return repair_duplicates(archive, uow.session, {instance_id: path}).get(instance_id)


def repair_from_paths(archive: Archive, paths: Sequence[Path], *, only: set[str] | None = None) -> RepairReport:
    """Repair every archived instance with a damaged blob whose source is among ``paths`` (files, folders).

    ``only``: SOP Instance UIDs worth reading (e.g. those ``verify`` named);
    other files are skipped after a look at their header.
    """
    files, _ = discover(paths)
    report = RepairReport()
    for path in files:
        report.files_scanned += 1
        uid = _peek_sop_instance_uid(path)
        if only is not None and uid is not None and uid not in only:
            continue
        try:
            read = staging._read(path)
        except (ArchiveError, OSError):
            continue  # not an archivable object: nothing of the archive came from it
        sop = read.parsed.sop_instance_uid
        if only is not None and sop not in only:
            continue
        with archive.unit_of_work() as uow:
            ids = list(uow.session.scalars(select(Instance.id).where(Instance.sop_instance_uid == sop)
                                           .order_by(Instance.id)))
            damaged = damaged_blobs(uow.session, uow.store, ids)
        if not damaged:
            continue
        matched = False
        for instance_id in sorted(damaged):
            try:
                repair = repair_instance(archive, instance_id, path, read=read)
            except NotSameObjectError:
                continue
            except ArchiveError as exc:
                matched = True
                report.failed.append((str(path), str(exc)))
                continue
            matched = True
            report.repaired.append(repair)
        report.files_matched += matched
    return report


def _peek_sop_instance_uid(path: Path) -> str | None:
    """The file's SOP Instance UID from its header alone (None: unreadable or absent, e.g. ACR-NEMA)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPInstanceUID"])
        value = ds.get("SOPInstanceUID")
    except Exception:  # anything unreadable is read in full (and skipped) below
        return None
    return str(value).strip("\x00 ") if value else None


class NotSameObjectError(ArchiveError):
    """The source is not the archived object (another object under its SOP Instance UID)."""


def repair_instance(archive: Archive, instance_id: int, path: Path, *,
                    read: staging._Read | None = None) -> InstanceRepair:
    """Repair one instance's damaged blobs from ``path``; raises NotSameObjectError when it is another object."""
    read = read if read is not None else staging._read(path)
    parsed = read.parsed
    with archive.unit_of_work() as uow:
        session = uow.session
        instance = session.get(Instance, instance_id)
        if instance is None:
            raise NotFoundError(f"no instance with id {instance_id}")
        if instance.sop_instance_uid != parsed.sop_instance_uid or not _same_pixels(instance, read):
            raise NotSameObjectError(f"{path} is not archived instance {instance_id} ({instance.sop_instance_uid})")
        damage = damaged_blobs(session, uow.store, [instance_id]).get(instance_id, [])
        repair = InstanceRepair(instance_id, instance.sop_instance_uid, instance.series.study.study_uid, str(path))
        if not damage:
            return repair
        bad = {d.digest for d in damage}
        encoding = session.scalar(select(Encoding).where(Encoding.instance_id == instance_id, Encoding.is_current))
        plan = _Plan()
        reasons: list[str] = []
        if instance.storage_mode is StorageMode.WHOLE:
            _plan_whole(instance, encoding, parsed, bad, plan, reasons)
        else:
            _plan_headers(session, uow.store, archive, instance, read, bad, plan, reasons)
            if encoding is not None and any(f.blob_sha256 in bad for f in encoding.frames):
                _plan_frames(archive, session, instance, encoding, read, bad, plan, reasons)
        study_id = instance.series.study_id
        instance_pixels = instance.pixel_sha256
        current_id = encoding.id if encoding is not None else None
    refs = [archive.store.put(data) for data in plan.blobs.values()]
    archive.store.sync()  # durable before any row points at them
    written = {ref.digest: archive.store.get(ref) for ref in refs}  # re-hashed: what is on disk is what was meant
    if plan.new_frames is not None and plan.verify_pixels:  # decode what is now on disk, as re-compression does
        if pixel_hash(decode_frame(written[d]) for d in plan.new_frames) != instance_pixels:
            raise ArchiveError(f"instance {instance_id}: the repaired frames do not decode to the archived pixels; "
                               "nothing was changed")
    old_encoding_id: int | None = None
    with archive.unit_of_work() as uow:
        session = uow.session
        record_blobs(session, refs)  # the rows of rewritten blobs now point at the fresh copies
        for target, digest in plan.header_updates:
            session.execute(update(target[0]).where(target[0].id == target[1])
                            .values(header_blob=digest, header_dictionary=None))
        if plan.new_frames is not None and plan.encoding is not None and current_id is not None:
            old_encoding_id = current_id
            flipped = session.execute(update(Encoding).where(Encoding.id == current_id, Encoding.is_current.is_(True))
                                      .values(is_current=False)).rowcount  # type: ignore[attr-defined]
            if flipped != 1:
                raise ArchiveError(f"instance {instance_id}: its encoding changed while it was being repaired; try again")
            generation = (session.scalar(select(func.max(Encoding.generation))
                                         .where(Encoding.instance_id == instance_id)) or 0) + 1
            sizes = {ref.digest: ref.size for ref in refs}
            session.add(Encoding(
                instance_id=instance_id, generation=generation, is_current=True, derived_from_id=None,
                frames=[EncodedFrame(frame_index=i, blob_sha256=d, nbytes=sizes[d]) for i, d in enumerate(plan.new_frames)],
                **plan.encoding,
            ))
            repair.new_generation = generation
        repair.rewritten = sorted(plan.rewritten)
        repair.replaced = sorted(plan.replaced)
        session.flush()
        remaining = damaged_blobs(session, uow.store, [instance_id]).get(instance_id, [])
        repair.remaining = remaining
        repair.reason = "; ".join(reasons)
        if repair.blobs:
            record(session, AuditAction.REPAIR, repair.sop_instance_uid, reason=f"repaired from {path}",
                   details={"instance_id": instance_id, "rewritten": repair.rewritten, "replaced": repair.replaced,
                            "new_generation": repair.new_generation,
                            "damage": [d.__dict__ for d in damage], "remaining": [d.__dict__ for d in remaining]})
        uow.commit()
    if old_encoding_id is not None:
        release_encoding(archive, old_encoding_id, study_id)
    return repair


@dataclass
class _Plan:
    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes to put
    rewritten: set[str] = field(default_factory=set)
    replaced: set[str] = field(default_factory=set)
    header_updates: list[tuple[tuple[Any, int], str]] = field(default_factory=list)  # ((model, id), new digest)
    new_frames: list[str] | None = None
    encoding: dict[str, Any] | None = None
    verify_pixels: bool = False  # new frames that decode to pixels (not lossy passthrough codestreams)


def _same_pixels(instance: Instance, read: staging._Read) -> bool:
    if instance.pixel_sha256 == read.pixel_sha256:
        return True
    return instance.storage_mode is StorageMode.WHOLE and instance.source_sha256 == read.parsed.source_sha256


def _plan_whole(instance: Instance, encoding: Encoding | None, parsed: Any, bad: set[str], plan: _Plan,
                reasons: list[str]) -> None:
    """An object kept whole: its header blob is the whole file, zstd-compressed."""
    if instance.header_blob not in bad:
        return
    level = int((encoding.codec_config if encoding is not None else {}).get("level", 9))
    data = compress_bytes(parsed.source_bytes, level)
    digest = hashlib.sha256(data).hexdigest()
    if digest == instance.header_blob:
        plan.blobs[digest] = data
        plan.rewritten.add(digest)
    elif parsed.source_sha256 == instance.source_sha256 and decompress_bytes(data) == parsed.source_bytes:
        plan.blobs[digest] = data
        plan.replaced.add(instance.header_blob)
        plan.header_updates.append(((Instance, instance.id), digest))
    else:
        reasons.append("the source's bytes differ from the object kept whole")


def _plan_headers(session: Session, store: BlobStore, archive: Archive, instance: Instance, read: staging._Read,
                  bad: set[str], plan: _Plan, reasons: list[str]) -> None:
    """The served header (when the source has it) and the kept revision the source is."""
    targets: list[tuple[tuple[Any, int], str, str | None]] = []
    if instance.header_sha256 == read.header_sha256:
        targets.append(((Instance, instance.id), instance.header_blob, instance.header_dictionary))
    elif instance.header_blob in bad or instance.header_dictionary in bad:
        reasons.append("the served header was corrected after ingest; the source has the header as received")
    for revision in session.scalars(select(HeaderRevision).where(HeaderRevision.instance_id == instance.id)):
        if revision.header_sha256 == read.header_sha256:
            targets.append(((HeaderRevision, revision.id), revision.header_blob, revision.header_dictionary))
    level = archive.settings.header_zstd_level
    header = read.header_part10
    for target, blob, dictionary in targets:
        if blob not in bad and dictionary not in bad:
            continue
        if dictionary is None or dictionary not in bad:
            data = _compress_header(session, store, header, dictionary, level)
            digest = hashlib.sha256(data).hexdigest()
            if digest == blob:
                plan.blobs[digest] = data
                plan.rewritten.add(digest)
                continue
        data = compress_bytes(header, level)  # the blob or its dictionary cannot be had again: a plain one
        if decompress_bytes(data) != header:
            raise ArchiveError(f"header of {instance.sop_instance_uid} does not round-trip through zstd")
        digest = hashlib.sha256(data).hexdigest()
        plan.blobs[digest] = data
        plan.replaced.add(blob)
        plan.header_updates.append((target, digest))


def _compress_header(session: Session, store: BlobStore, header: bytes, dictionary: str | None, level: int) -> bytes:
    if dictionary is None:
        return compress_bytes(header, level)
    raw = zstandard.ZstdCompressionDict(read_blob(session, store, dictionary))
    return zstandard.ZstdCompressor(level=level, dict_data=raw).compress(header)


class _Capture:
    """A store that keeps what staging puts in memory: only the blobs a repair needs reach the packs."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def put(self, data: bytes) -> BlobRef:
        digest = hashlib.sha256(data).hexdigest()
        self.data[digest] = data
        return BlobRef(digest, len(data))

    def sync(self) -> None:
        return None

    def get(self, ref: BlobRef) -> bytes:
        return self.data[ref.digest]

    def exists(self, ref: BlobRef) -> bool:
        return ref.digest in self.data


def _plan_frames(archive: Archive, session: Session, instance: Instance, encoding: Encoding, read: staging._Read,
                 bad: set[str], plan: _Plan, reasons: list[str]) -> None:
    """Encode the source as the current encoding did; same digests are rewritten, else a verified new generation."""
    old = [f.blob_sha256 for f in encoding.frames]
    if encoding.kind in (EncodingKind.LOSSLESS, EncodingKind.LOSSY):
        codec = get_codec(encoding.codec_config)
    else:  # passthrough: the source's own fragments; kept originals are compared with the configured codec
        codec = get_codec(archive.settings.codec)
    fresh, columns, blobs = _stage(archive, session, read, codec)
    if fresh == old:
        damaged = [d for d in old if d in bad]
        plan.rewritten.update(damaged)
        plan.blobs.update({d: blobs[d] for d in damaged})
        return
    if columns["kind"] is EncodingKind.LOSSY:  # a lossy generation is not reproducible: store a lossless one
        fallback = get_codec(archive.settings.codec)
        fresh, columns, blobs = _stage(archive, session, read,
                                       fallback if fallback.lossless else get_codec(LOSSLESS_FALLBACK))
    raw_codestreams = columns["kind"] is EncodingKind.PASSTHROUGH and columns["codec_id"] == "passthrough"
    if raw_codestreams:
        identity = staging.fragments_sha256([blobs[d] for d in fresh])
    else:
        identity = pixel_hash(decode_frame(blobs[d]) for d in fresh)
    if identity != instance.pixel_sha256:
        reasons.append("the re-encoded frames do not decode to the archived pixels")
        return
    plan.blobs.update(blobs)
    plan.replaced.update(old)
    plan.new_frames = fresh
    columns["side_info"] = dict(columns.get("side_info") or {}, repaired_from=str(read.parsed.source_path))
    plan.encoding = columns
    plan.verify_pixels = not raw_codestreams


def _stage(archive: Archive, session: Session, read: staging._Read, codec: Codec
           ) -> tuple[list[str], dict[str, Any], dict[str, bytes]]:
    """The frame digests, Encoding columns and frame bytes staging makes of ``read`` with ``codec`` (nothing stored)."""
    capture = _Capture()
    staged = staging._write(capture, archive.headers, session, read, codec, archive.settings.header_zstd_level)
    frames = [ref.digest for ref in staged.frames]
    return frames, dict(staged.encoding), {d: capture.data[d] for d in frames}
