"""The header blob of an instance: the original bytes where their encoding can be kept, else re-serialised.

Most files arrive as Explicit VR Little Endian (natively or inside an
encapsulated transfer syntax) with a Part 10 preamble and file meta: their
bytes up to Pixel Data, and whatever follows it, *are* a Part 10 file without
Pixel Data, so they are kept as they are, with no pydicom write at all.
Implicit VR, big endian, deflated and meta-less files are re-serialised as
Explicit VR Little Endian (:func:`archive.dicom.writer.serialize_header`).
Either way retrieval reads the blob with pydicom and gets the same elements.
"""

from __future__ import annotations

import hashlib

from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from archive.dicom.reader import ParsedInstance
from archive.dicom.writer import SerializedHeader, serialize_header

_PIXEL_DATA = Tag(0x7FE00010)
_PIXEL_TAG_BYTES = b"\xe0\x7f\x10\x00"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED = 0xFFFFFFFF
_NOT_KEPT = frozenset({ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian})


def header_of(parsed: ParsedInstance) -> SerializedHeader:
    """The header blob's content and the data set's identity hash."""
    return kept_header(parsed) or serialize_header(parsed.dataset)


def kept_header(parsed: ParsedInstance) -> SerializedHeader | None:
    """The original bytes minus Pixel Data, or None when the encoding cannot be kept as it is."""
    data = parsed.source_bytes
    if not parsed.had_file_meta or parsed.transfer_syntax_uid in _NOT_KEPT or parsed.assigned_uids:
        return None
    if parsed.dataset.original_encoding != (False, True):
        return None  # e.g. declares explicit VR but is implicit: re-serialised so retrieval writes it cleanly
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00" or data[136:138] != b"UL":
        return None  # no preamble, or file meta without its group length
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    span = _pixel_data_span(parsed, meta_end)
    if span is None:
        return None
    start, end = span
    view = memoryview(data)
    identity = hashlib.sha256(view[meta_end:start])  # the data set without Pixel Data, hashed in place
    identity.update(view[end:])
    return SerializedHeader(part10=data[:start] + data[end:], dataset_sha256=identity.hexdigest(),
                            kept=True)


def _pixel_data_span(parsed: ParsedInstance, meta_end: int) -> tuple[int, int] | None:
    """Byte range of the whole Pixel Data element in the source, checked against the bytes themselves."""
    data = parsed.source_bytes
    element = parsed.dataset._dict.get(_PIXEL_DATA)
    if element is None:
        return None
    value_at = getattr(element, "value_tell", None) or getattr(element, "file_tell", None)
    if not isinstance(value_at, int) or value_at < meta_end + 12:
        return None
    start = value_at - 12  # tag (4), VR (2), reserved (2), length (4)
    if data[start:start + 4] != _PIXEL_TAG_BYTES or data[start + 4:start + 6] not in (b"OB", b"OW"):
        return None
    length = int.from_bytes(data[value_at - 4:value_at], "little")
    if length != _UNDEFINED:
        end = value_at + length
    else:
        value = element.value
        if not isinstance(value, (bytes, bytearray)):
            return None
        end = value_at + len(value) + len(_SEQUENCE_DELIMITER)
        if data[end - len(_SEQUENCE_DELIMITER):end] != _SEQUENCE_DELIMITER:
            return None
    if end > len(data):
        return None
    return start, end
