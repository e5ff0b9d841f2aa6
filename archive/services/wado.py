"""Use case: WADO-RS (PS3.18 10.4): instances as Part 10, their metadata as DICOM JSON, frames, and /encodings.

Which frames are sent as stored and which are transcoded:

* **Sent as stored** (no decode): a frame whose container says codec ``jpegls``,
  lossless, offset 0, a payload dtype as wide as Bits Allocated (16-bit data not
  narrowed to 8 bits), one sample per pixel, and a JPEG-LS codestream whose
  precision P (SOF55) is at most Bits Stored for unsigned data, and exactly Bits
  Stored for signed data. That codestream already is a conformant JPEG-LS
  Lossless (1.2.840.10008.1.2.4.80) fragment: the container is stripped, and the
  fragment goes out under the stored header. P below Bits Stored is safe only for
  unsigned data: pydicom sign-extends JPEG-LS samples at the codestream's P, not
  at Bits Stored, so a signed frame coded with P < Bits Stored would come back
  with its upper half negative (signed frames with a zero minimum are therefore
  never sent as stored: they are transcoded).
* **Transcoded**: everything else (an offset-mapped frame, a narrowed payload,
  another codec, colour, lossy derivatives): decoded (sha256- and CRC-checked),
  then written in the syntax asked for. Explicit VR Little Endian is assembled
  from the stored header bytes and the decoded pixels directly; JPEG-LS and JPEG
  2000 go through :func:`archive.dicom.writer.to_part10`, which checks the round trip.

``transfer-syntax=*`` takes the stored JPEG-LS where every frame of an instance
qualifies, else Explicit VR Little Endian (decode only). Passthrough (lossy input)
and whole objects go out in their own syntax, or decoded/re-serialised as
Explicit VR Little Endian where that can be done.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    PYDICOM_IMPLEMENTATION_UID,
)
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from archive.catalog.models import Derivation, EncodedFrame, Encoding, Instance, InstanceStatus, Series, Study
from archive.codecs import decode_frame, read_frame_header
from archive.codecs.frame import payload_of
from archive.dicom.reader import NATIVE_SYNTAXES, PixelLayout
from archive.dicom.writer import IMPLEMENTATION_VERSION, PIXEL_TAGS, original_target, pack_frames, read_header
from archive.errors import LossyOnlyError, NotAcceptableError, NotFoundError
from archive.kinds import StorageMode
from archive.services.blobs import blob_refs, read_context
from archive.services.retrieve import instance_part10, layout_from_columns, lossy_derivative
from archive.services.runtime import Archive
from archive.services.unit_of_work import UnitOfWork
from archive.store import BlobRef

#: ``transfer-syntax=*``: the cheapest syntax to produce, per instance.
ANY_SYNTAX = "*"
#: No transfer syntax asked for: Explicit VR Little Endian, or the stored syntax where that cannot be produced.
DEFAULT_SYNTAX = "default"
#: Syntaxes offered for every instance stored as frames (besides its own syntax as received, where standard).
OFFERED = (ExplicitVRLittleEndian, JPEGLSLossless, JPEG2000Lossless)
_CLI_NAME = {ExplicitVRLittleEndian: "explicit-le", JPEGLSLossless: "jpegls", JPEG2000Lossless: "jpeg2000"}
_AHEAD = 4  # instances built ahead of the one being sent: parallel decoding, bounded memory
_POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="wado")
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_PIXEL_TAG = 0x7FE00010
_TAG = struct.Struct("<HH")


# --- what is asked for


@dataclass(frozen=True)
class StoredPixels:
    """Where an instance's header and frames are, found for a whole plan in a few queries (none per instance)."""

    header: BlobRef
    dictionary: str | None
    frames: tuple[BlobRef, ...]
    context_blob: str | None
    layout: PixelLayout


@dataclass(frozen=True)
class PlannedInstance:
    """What building one instance needs, read in the plan's one short transaction."""

    id: int
    sop_instance_uid: str
    series_uid: str
    storage_mode: StorageMode
    transfer_syntax_uid: str  # as received
    number_of_frames: int
    stored: StoredPixels | None = None  # where the frames of an instance stored as frames are

    def producible(self) -> frozenset[str]:
        """The transfer syntaxes this instance can be sent in (checked before any byte is streamed)."""
        received = UID(self.transfer_syntax_uid)
        if self.storage_mode is StorageMode.PIXELS:
            own = {received} if original_target(received) == received else set()
            return frozenset({*OFFERED, *own})
        if self.storage_mode is StorageMode.PASSTHROUGH:
            decodable = _decoder_available(received)
            return frozenset({received, ExplicitVRLittleEndian} if decodable else {received})
        native = received in NATIVE_SYNTAXES
        return frozenset({received, ExplicitVRLittleEndian} if native else {received})


@dataclass
class RetrievalPlan:
    """The instances of a study, a series or one instance to send, in order, and the originals left out."""

    study_uid: str
    instances: list[PlannedInstance]
    lossy_only: list[str] = field(default_factory=list)  # originals whose lossless form was released

    def warning(self) -> str | None:
        """A ``Warning: 299`` value naming the originals left out (PS3.18 8.4.3), or None."""
        if not self.lossy_only:
            return None
        named = ", ".join(self.lossy_only[:20]) + (" ..." if len(self.lossy_only) > 20 else "")
        return (f'299 medarchive "{len(self.lossy_only)} original instance(s) left out: only a lossy derivative '
                f'(its own series) is held: {named}"')


def _stored_pixels(row: Any, digests: list[str], refs: dict[str, BlobRef]) -> StoredPixels | None:
    """None for passthrough and whole objects, or when a blob has no catalog row (the slow path then says which)."""
    if row.storage_mode is not StorageMode.PIXELS or not digests or not row.pixel_dtype:
        return None
    found = [refs.get(d) for d in (row.header_blob, *digests)]
    if any(ref is None for ref in found):
        return None
    header, *frame_refs = [ref for ref in found if ref is not None]
    layout = layout_from_columns(row, row.side_info)
    return StoredPixels(header, row.header_dictionary, tuple(frame_refs), row.context_blob, layout)


def _decoder_available(syntax: UID) -> bool:
    try:
        return bool(get_decoder(syntax).is_available)
    except (NotImplementedError, ValueError):
        return False


def plan_retrieval(archive: Archive, study_uid: str, series_uid: str | None = None,
                   sop_instance_uid: str | None = None, *, include_derived: bool = False) -> RetrievalPlan:
    """The instances to send, or :class:`NotFoundError` naming what is unknown. Conflicts are never sent.

    A whole study is its original series (as QIDO lists it), its derived series
    too with ``include_derived``; a derived series named by its UID is an ordinary series.
    """
    with archive.unit_of_work() as uow:
        study_id = uow.session.scalar(select(Study.id).where(Study.study_uid == study_uid))
        if study_id is None:
            raise NotFoundError(f"no study with Study Instance UID {study_uid!r}")
        where: Any = Series.study_id == study_id
        if not include_derived:
            where = where & Series.derived_from_id.is_(None)
        if series_uid is not None:
            series_id = uow.session.scalar(select(Series.id).where(Series.series_uid == series_uid,
                                                                    Series.study_id == study_id))
            if series_id is None:
                raise NotFoundError(f"no series {series_uid!r} in study {study_uid!r}")
            where = Instance.series_id == series_id
        if sop_instance_uid is not None:
            where = where & (Instance.sop_instance_uid == sop_instance_uid)
        rows = uow.session.execute(
            select(Instance.id, Instance.sop_instance_uid, Series.series_uid, Instance.storage_mode,
                   Instance.transfer_syntax_uid, Instance.number_of_frames, Instance.status, Instance.header_blob,
                   Instance.header_dictionary, Instance.rows, Instance.columns, Instance.samples_per_pixel,
                   Instance.bits_allocated, Instance.bits_stored, Instance.high_bit, Instance.pixel_representation,
                   Instance.photometric_interpretation, Instance.planar_configuration, Instance.pixel_dtype,
                   Encoding.id.label("encoding_id"), Encoding.context_blob, Encoding.side_info)
            .join(Series, Instance.series_id == Series.id)
            .outerjoin(Encoding, (Encoding.instance_id == Instance.id) & Encoding.is_current)
            .where(where, Instance.conflict_seq == 0)
            .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
        ).all()
        plan = RetrievalPlan(study_uid, [])
        sendable = [row for row in rows if row.status not in (InstanceStatus.LOSSY_ONLY, InstanceStatus.CONFLICT)]
        plan.lossy_only = [row.sop_instance_uid for row in rows if row.status is InstanceStatus.LOSSY_ONLY]
        frames: dict[int, list[str]] = {}
        encodings = [row.encoding_id for row in sendable if row.storage_mode is StorageMode.PIXELS and row.encoding_id]
        for start in range(0, len(encodings), 500):
            for encoding_id, digest in uow.session.execute(
                    select(EncodedFrame.encoding_id, EncodedFrame.blob_sha256)
                    .where(EncodedFrame.encoding_id.in_(encodings[start:start + 500]))
                    .order_by(EncodedFrame.encoding_id, EncodedFrame.frame_index)):
                frames.setdefault(encoding_id, []).append(digest)
        refs = blob_refs(uow.session, [d for row in sendable if row.encoding_id in frames
                                       for d in (row.header_blob, *frames[row.encoding_id])])
        for row in sendable:
            plan.instances.append(PlannedInstance(
                row.id, row.sop_instance_uid, row.series_uid, row.storage_mode, row.transfer_syntax_uid,
                row.number_of_frames or 1, _stored_pixels(row, frames.get(row.encoding_id, []), refs)))
        if sop_instance_uid is not None and not plan.instances:
            if plan.lossy_only:
                instance = uow.session.get(Instance, rows[0].id)
                assert instance is not None
                derivative = lossy_derivative(uow.session, instance)
                named = derivative.sop_instance_uid if derivative else "(none found)"
                raise LossyOnlyError(f"instance {sop_instance_uid}: its lossless original was released by a policy;"
                                     f" only a lossy derivative is held: {named}")
            raise NotFoundError(f"no instance {sop_instance_uid!r} in series {series_uid!r} of study {study_uid!r}")
        if not plan.instances and not plan.lossy_only and series_uid is None:
            raise NotFoundError(f"study {study_uid!r} holds no instance to send")
        return plan


# --- Accept negotiation (PS3.18 8.7.3)


@dataclass(frozen=True)
class MediaRange:
    media_type: str  # "type/subtype", lower case
    params: dict[str, str]
    q: float = 1.0


def parse_accept(header: str | None) -> list[MediaRange]:
    """Media ranges of an ``Accept`` header, best first (by q, then order); q=0 ranges are left out."""
    ranges = []
    for item in _split_outside_quotes(header or "*/*", ","):
        pieces = _split_outside_quotes(item, ";")
        media_type = pieces[0].strip().lower()
        if not media_type:
            continue
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1") or 1)
        except ValueError:
            q = 1.0
        if q > 0:
            ranges.append(MediaRange(media_type, params, q))
    return sorted(ranges, key=lambda r: -r.q)


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _part_type(media_range: MediaRange) -> str | None:
    """The media type of the parts a range asks for (``multipart/related; type=X`` -> X), or None for ``*/*``."""
    if media_range.media_type in ("*/*", "multipart/*"):
        return None
    if media_range.media_type == "multipart/related":
        return media_range.params.get("type", "").lower() or None
    return media_range.media_type


def choose_syntax(accept: str | None, plan: RetrievalPlan) -> str:
    """The first acceptable range every instance can be sent in: a syntax UID, ``*`` or the default.

    :class:`NotAcceptableError` (406) when none: an unknown or impossible syntax, or a media type not offered.
    """
    asked = []
    for media_range in parse_accept(accept):
        part = _part_type(media_range)
        if part not in (None, "application/dicom", "application/*"):
            asked.append(media_range.media_type + (f' type="{part}"' if part else ""))
            continue
        syntax = media_range.params.get("transfer-syntax")
        if syntax is None:
            return DEFAULT_SYNTAX
        if syntax == ANY_SYNTAX:
            return ANY_SYNTAX
        asked.append(f"transfer-syntax={syntax}")
        if all(syntax in instance.producible() for instance in plan.instances):
            return syntax
    offered = ", ".join(str(s) for s in OFFERED)
    raise NotAcceptableError(f"cannot send these instances as {'; '.join(asked) or 'asked'}: "
                             f"multipart/related; type=\"application/dicom\" with transfer-syntax {offered}, "
                             "the stored syntax where standard, or *")


# --- building instances


@dataclass(frozen=True)
class BuiltInstance:
    sop_instance_uid: str
    series_uid: str
    transfer_syntax: str
    data: bytes


def stream_instances(archive: Archive, plan: RetrievalPlan, syntax: str, *, ahead: int = _AHEAD
                     ) -> Iterator[BuiltInstance]:
    """Each instance of ``plan`` as Part 10, in order; up to ``ahead`` are built in parallel threads.

    Every build is its own short unit of work, so no transaction stays open while
    a slow client reads; closing the generator cancels the builds not started.
    """
    pending: deque[Future[BuiltInstance]] = deque()
    todo = iter(plan.instances)
    try:
        for instance in todo:
            pending.append(_POOL.submit(build_instance, archive, instance, syntax))
            if len(pending) >= max(ahead, 1):
                break
        while pending:
            built = pending.popleft().result()
            following = next(todo, None)
            if following is not None:
                pending.append(_POOL.submit(build_instance, archive, following, syntax))
            yield built
    finally:
        for future in pending:
            future.cancel()


def build_instance(archive: Archive, planned: PlannedInstance, syntax: str) -> BuiltInstance:
    """One instance as Part 10 bytes in ``syntax`` (a UID, ``*`` or the default)."""
    with archive.unit_of_work() as uow:
        built = _direct(uow, planned.stored, syntax) if planned.stored is not None else None
        if built is None:
            instance = uow.session.scalar(
                select(Instance).where(Instance.id == planned.id)
                .options(selectinload(Instance.encodings).selectinload(Encoding.frames)))
            if instance is None:  # removed since the plan was made
                raise NotFoundError(f"instance {planned.sop_instance_uid} is no longer archived")
            built = _through_pydicom(uow, instance, syntax)
        data, written = built
        return BuiltInstance(planned.sop_instance_uid, planned.series_uid, str(written), data)


def _direct(uow: UnitOfWork, stored: StoredPixels, syntax: str) -> tuple[bytes, UID] | None:
    """Explicit VR LE or stored JPEG-LS assembled from the blobs' bytes (no catalog query); None: take the slow path."""
    if syntax not in (ANY_SYNTAX, JPEGLSLossless, ExplicitVRLittleEndian, DEFAULT_SYNTAX):
        return None
    header = uow.headers.decompress(uow.session, uow.store.get(stored.header), stored.dictionary)
    blobs = [uow.store.get(ref) for ref in stored.frames]
    if syntax in (ANY_SYNTAX, JPEGLSLossless):
        fragments = [stored_jpegls(blob, stored.layout) for blob in blobs]
        if all(f is not None for f in fragments):
            built = assemble(header, JPEGLSLossless, encapsulated_pixels([f for f in fragments if f is not None]))
            if built is not None:
                return built, JPEGLSLossless
        if syntax == JPEGLSLossless:
            return None  # transcoded by pydicom, round trip checked
    layout = stored.layout
    if layout.output_photometric != layout.photometric_interpretation:
        return None  # e.g. YBR_RCT decoded to RGB: the header changes, pydicom writes it
    context = read_context(uow.session, uow.store, stored.context_blob)
    pixels = pack_frames([decode_frame(b, context) for b in blobs], layout)
    built = assemble(header, ExplicitVRLittleEndian, native_pixels(pixels, layout.bits_allocated))
    return (built, ExplicitVRLittleEndian) if built is not None else None


def _through_pydicom(uow: UnitOfWork, instance: Instance, syntax: str) -> tuple[bytes, UID]:
    """Every other case through :func:`instance_part10` (transcodes checked by a round trip)."""
    received = UID(instance.transfer_syntax_uid)
    if instance.storage_mode is not StorageMode.PIXELS:
        name = "explicit-le" if syntax in (ExplicitVRLittleEndian, DEFAULT_SYNTAX) else "original"
    elif syntax == received:
        name = "original"
    else:
        name = _CLI_NAME.get(UID(syntax), "explicit-le")
    data, written, _ = instance_part10(uow, instance, name)
    return data, written


def stored_jpegls(blob: bytes, layout: PixelLayout) -> bytes | None:
    """The frame's JPEG-LS codestream when it is a conformant JPEG-LS Lossless fragment as stored, else None."""
    header = read_frame_header(blob)
    bits_allocated = layout.bits_allocated
    bits_stored = layout.bits_stored
    if (header.codec_id != "jpegls" or header.lossy or header.offset != 0 or len(header.shape) != 2
            or header.payload_dtype.itemsize * 8 != bits_allocated):
        return None
    payload = payload_of(blob, header)
    precision = jpegls_precision(payload)
    if precision is None:
        return None
    signed = layout.pixel_representation == 1
    if precision > bits_stored or (signed and precision != bits_stored):
        return None
    return payload


def jpegls_precision(codestream: bytes) -> int | None:
    """P of a JPEG-LS codestream: the byte after the SOF55 (0xFFF7) marker's length (ITU-T T.87 C.2.2)."""
    position = codestream.find(b"\xff\xf7", 2)
    if position < 0 or position + 5 > len(codestream):
        return None
    return codestream[position + 4]


def native_pixels(data: bytes, bits_allocated: int) -> bytes:
    """(7FE0,0010) with native Pixel Data, Explicit VR Little Endian."""
    vr = b"OW" if bits_allocated > 8 else b"OB"
    if len(data) % 2:
        data += b"\x00"
    return _TAG.pack(0x7FE0, 0x0010) + vr + b"\x00\x00" + struct.pack("<I", len(data)) + data


def encapsulated_pixels(fragments: list[bytes]) -> bytes:
    """(7FE0,0010) encapsulated (PS3.5 A.4): a Basic Offset Table, one fragment per frame, the delimiter."""
    items = []
    offsets = []
    position = 0
    for fragment in fragments:
        padded = fragment + b"\x00" if len(fragment) % 2 else fragment
        offsets.append(position)
        items.append(_TAG.pack(0xFFFE, 0xE000) + struct.pack("<I", len(padded)) + padded)
        position += 8 + len(padded)
    table = struct.pack(f"<{len(offsets)}I", *offsets) if len(fragments) > 1 else b""
    return b"".join([_TAG.pack(0x7FE0, 0x0010), b"OB\x00\x00\xff\xff\xff\xff",
                     _TAG.pack(0xFFFE, 0xE000), struct.pack("<I", len(table)), table, *items,
                     _TAG.pack(0xFFFE, 0xE0DD), b"\x00\x00\x00\x00"])


def assemble(header: bytes, syntax: UID, pixel_element: bytes) -> bytes | None:
    """A Part 10 file from a stored header (Part 10 without Pixel Data, Explicit VR LE) and a Pixel Data element.

    The file meta is rewritten for ``syntax``; Pixel Data goes before the first
    top-level element that follows it. None when the header is not what this
    byte-level path expects (the caller then writes through pydicom).
    """
    if header[128:132] != b"DICM":
        return None
    meta: dict[int, tuple[bytes, bytes]] = {}
    position = 132
    try:
        while position + 8 <= len(header) and _TAG.unpack_from(header, position)[0] == 0x0002:
            tag, vr, value, position = _element(header, position)
            meta[tag] = (vr, value)
        split = _pixel_position(header, position)
    except (struct.error, ValueError):
        return None
    if split is None:
        return None
    meta.pop(0x00020000, None)
    meta[0x00020010] = (b"UI", _even(str(syntax).encode("ascii"), b"\x00"))
    meta[0x00020012] = (b"UI", _even(PYDICOM_IMPLEMENTATION_UID.encode("ascii"), b"\x00"))
    meta[0x00020013] = (b"SH", _even(IMPLEMENTATION_VERSION.encode("ascii"), b" "))
    body = b"".join(_write_element(tag, vr, value) for tag, (vr, value) in sorted(meta.items()))
    group_length = _write_element(0x00020000, b"UL", struct.pack("<I", len(body)))
    return b"".join([header[:132], group_length, body, header[position:split], pixel_element, header[split:]])


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _element(data: bytes, position: int) -> tuple[int, bytes, bytes, int]:
    """One Explicit VR LE element of defined length: (tag, VR, value, position after it)."""
    group, element = _TAG.unpack_from(data, position)
    vr, length, start = _vr_length_start(data, position)
    if length == 0xFFFFFFFF or start + length > len(data):
        raise ValueError("undefined or overlong length in file meta")
    return (group << 16) | element, vr, data[start:start + length], start + length


def _vr_length_start(data: bytes, position: int) -> tuple[bytes, int, int]:
    """VR, value length and value position of the Explicit VR LE element at ``position``."""
    vr = data[position + 4:position + 6]
    if vr in _LONG_VRS:
        return vr, struct.unpack_from("<I", data, position + 8)[0], position + 12
    return vr, struct.unpack_from("<H", data, position + 6)[0], position + 8


def _write_element(tag: int, vr: bytes, value: bytes) -> bytes:
    head = _TAG.pack(tag >> 16, tag & 0xFFFF) + vr
    if vr in _LONG_VRS:
        return head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _pixel_position(data: bytes, position: int) -> int | None:
    """Where (7FE0,0010) belongs among the top-level elements from ``position``; None if one is already there."""
    while position < len(data):
        group, element = _TAG.unpack_from(data, position)
        tag = (group << 16) | element
        if tag == _PIXEL_TAG:
            return None
        if tag > _PIXEL_TAG:
            return position
        next_position = _skip(data, position)
        if next_position is None:
            return None
        position = next_position
    return position


def _skip(data: bytes, position: int) -> int | None:
    """The position after the Explicit VR LE element at ``position`` (sequences of undefined length walked)."""
    vr, length, start = _vr_length_start(data, position)
    if length != 0xFFFFFFFF:
        return start + length if start + length <= len(data) else None
    if vr != b"SQ":
        return None  # UN of undefined length is implicit VR inside: leave it to pydicom
    return _skip_items(data, start)


def _skip_items(data: bytes, position: int) -> int | None:
    """Past the items of a sequence of undefined length and its delimiter."""
    while position + 8 <= len(data):
        group, element = _TAG.unpack_from(data, position)
        (length,) = struct.unpack_from("<I", data, position + 4)
        position += 8
        if (group, element) == (0xFFFE, 0xE0DD):
            return position
        if (group, element) != (0xFFFE, 0xE000):
            return None
        if length != 0xFFFFFFFF:
            position += length
            continue
        while True:  # an item of undefined length: its elements, then the item delimiter
            if position + 8 > len(data):
                return None
            if _TAG.unpack_from(data, position) == (0xFFFE, 0xE00D):
                position += 8
                break
            following = _skip(data, position)
            if following is None:
                return None
            position = following
    return None


# --- metadata (PS3.18 F.2)


def stream_metadata(archive: Archive, plan: RetrievalPlan, base_url: str, *, batch: int = 32) -> Iterator[bytes]:
    """A JSON array of DICOM JSON objects, one per instance, written item by item from the header blobs.

    No pixel is decoded: Pixel Data is a ``BulkDataURI`` naming the instance's
    frames; other binary values are ``InlineBinary``. One short unit of work per batch.
    """
    yield b"["
    first = True
    for start in range(0, len(plan.instances), batch):
        chunk = plan.instances[start:start + batch]
        with archive.unit_of_work() as uow:
            ids = [planned.id for planned in chunk]
            rows = {i.id: i for i in uow.session.scalars(select(Instance).where(Instance.id.in_(ids)))}
            for planned in chunk:
                instance = rows.get(planned.id)
                if instance is None:
                    continue
                item = instance_json(uow, instance, f"{base_url}/studies/{plan.study_uid}/series/{planned.series_uid}"
                                                    f"/instances/{planned.sop_instance_uid}")
                yield (b"" if first else b",") + json.dumps(item, separators=(",", ":")).encode()
                first = False
    yield b"]"


def instance_json(uow: UnitOfWork, instance: Instance, instance_url: str) -> dict[str, Any]:
    """One instance's header as DICOM JSON; Pixel Data, if the instance has any, as a BulkDataURI to its frames."""
    ds = read_header(uow.read_header(instance.header_blob, instance.header_dictionary))
    had_pixels = any(tag in ds for tag in PIXEL_TAGS)
    for tag in PIXEL_TAGS:
        if tag in ds:
            del ds[tag]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        item: dict[str, Any] = ds.to_json_dict(suppress_invalid_tags=True)
    if instance.rows or had_pixels:
        frames = ",".join(str(n) for n in range(1, (instance.number_of_frames or 1) + 1))
        item["7FE00010"] = {"vr": "OW" if (instance.bits_allocated or 8) > 8 else "OB",
                            "BulkDataURI": f"{instance_url}/frames/{frames}"}
    return item


# --- /encodings


def study_encodings(archive: Archive, study_uid: str) -> dict[str, Any]:
    """Per instance of a study (originals and derived series), its current encoding: codec, sizes, error, bound."""
    with archive.unit_of_work() as uow:
        study_id = uow.session.scalar(select(Study.id).where(Study.study_uid == study_uid))
        if study_id is None:
            raise NotFoundError(f"no study with Study Instance UID {study_uid!r}")
        kinds = {series_id: kind for series_id, kind in uow.session.execute(
            select(Derivation.series_id, Derivation.kind)
            .join(Series, Derivation.series_id == Series.id).where(Series.study_id == study_id))}
        rows = uow.session.execute(
            select(Series.id, Series.series_uid, Series.derived_from_id, Instance, Encoding)
            .join(Instance, Instance.series_id == Series.id)
            .join(Encoding, (Encoding.instance_id == Instance.id) & Encoding.is_current)
            .where(Series.study_id == study_id, Instance.conflict_seq == 0)
            .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)).all()
        instances = []
        for series_id, series_uid, derived_from, instance, encoding in rows:
            kind = kinds.get(series_id)
            instances.append({
                "series_uid": series_uid,
                "sop_instance_uid": instance.sop_instance_uid,
                "derived": derived_from is not None,
                "derivation": kind.value if kind is not None else None,
                "status": instance.status.value,
                "storage_mode": instance.storage_mode.value,
                "codec": encoding.codec_id,
                "codec_config": encoding.codec_config,
                "actual_codecs": encoding.actual_codecs,
                "bytes_before": encoding.bytes_before,
                "bytes_after": encoding.bytes_after,
                "ratio": round(encoding.ratio, 4),
                "bits_per_pixel": round(encoding.bits_per_pixel, 4),
                "psnr": encoding.psnr,
                "psnr_peak": (2 ** instance.bits_stored - 1) if instance.bits_stored else None,
                "max_abs_error": encoding.max_abs_error,
                "max_error_bound": encoding.max_error_bound,
            })
        return {"study_uid": study_uid, "instances": instances}

