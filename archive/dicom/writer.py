"""Headers out and Part 10 files back: the other half of :mod:`archive.dicom.reader`."""

from __future__ import annotations

import copy
import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
)

from archive.dicom.reader import NATIVE_SYNTAXES, PixelLayout

PIXEL_TAGS = (Tag(0x7FE00010), Tag(0x7FE00008), Tag(0x7FE00009))
IMPLEMENTATION_VERSION = "MEDARCHIVE_01"
#: Requested output syntaxes (CLI names) and their UIDs; "original" is resolved per instance.
OUTPUT_SYNTAXES: dict[str, UID] = {
    "explicit-le": ExplicitVRLittleEndian,
    "jpegls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}
#: Compressed syntaxes pydicom can write for us, so "original" can give them back.
_REENCODABLE = frozenset({RLELossless, JPEGLSLossless, JPEG2000Lossless})


@dataclass(frozen=True)
class SerializedHeader:
    part10: bytes  # a Part 10 file without Pixel Data, its data set in Explicit VR Little Endian
    dataset_sha256: str  # identity of the data set alone: independent of transfer syntax and file meta
    kept: bool = False  # the original bytes, not a pydicom re-serialisation


def serialize_header(ds: Dataset) -> SerializedHeader:
    """Everything but Pixel Data, private tags included, as Explicit VR Little Endian.

    Pixel Data is lifted out of ``ds`` for the write and put back, so raw
    (unparsed) elements are written as read, without a costly conversion.
    """
    lifted = {tag: ds._dict.pop(tag) for tag in PIXEL_TAGS if tag in ds._dict}
    original_meta = ds.file_meta
    original_preamble = ds.preamble
    meta = FileMetaDataset()
    for elem in original_meta:
        meta.add(copy.deepcopy(elem))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    try:
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # values are kept as received, valid or not
            try:
                pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
            except TypeError:
                # raw elements whose encoding differs from the declared one (a file that says
                # explicit VR but is implicit): convert every element, then write again
                _ = [elem.value for elem in ds]
                buffer = io.BytesIO()
                pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    finally:
        ds.file_meta = original_meta
        ds.preamble = original_preamble
        ds._dict.update(lifted)
    part10 = buffer.getvalue()
    meta_end = 132 + 12 + int.from_bytes(part10[140:144], "little")
    return SerializedHeader(part10=part10, dataset_sha256=hashlib.sha256(part10[meta_end:]).hexdigest())


def canonical_header_sha256(ds: Dataset) -> str:
    """An identity of the header's elements that no encoding choice changes.

    The data set without Pixel Data and group lengths, written as Implicit VR
    Little Endian with every sequence and item of undefined length: the same
    elements kept as received in Explicit VR and re-sent in Implicit VR (where
    private elements come back as UN) or big endian (where sequences may carry
    explicit lengths) hash the same. Used only to tell a re-sent copy from a
    conflict when the pixels already match; never stored.
    """
    lifted = {tag: ds._dict.pop(tag) for tag in list(ds._dict) if tag in PIXEL_TAGS or tag.element == 0}
    lengths = _undefined_lengths(ds)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_dataset(fp, ds)
    finally:
        for target, attribute, value in lengths:
            setattr(target, attribute, value)
        ds._dict.update(lifted)
    return hashlib.sha256(fp.getvalue()).hexdigest()


def _undefined_lengths(ds: Dataset) -> list[tuple[object, str, bool]]:
    """Mark every sequence and item of ``ds`` undefined length; returns what to restore."""
    changed: list[tuple[object, str, bool]] = []
    for elem in ds:
        if elem.VR != "SQ":
            continue
        changed.append((elem, "is_undefined_length", elem.is_undefined_length))
        elem.is_undefined_length = True
        for item in elem.value:
            changed.append((item, "is_undefined_length_sequence_item", item.is_undefined_length_sequence_item))
            item.is_undefined_length_sequence_item = True
            changed.extend(_undefined_lengths(item))
    return changed


def read_header(part10: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(part10), force=True)


def pack_frames(frames: list[np.ndarray], layout: PixelLayout) -> bytes:
    """Frames back to native little-endian Pixel Data in the layout they came in."""
    parts = []
    for frame in frames:
        array = frame.astype(np.dtype(layout.dtype), copy=False)
        if layout.samples_per_pixel > 1 and layout.planar_configuration == 1:
            array = array.transpose(2, 0, 1)
        parts.append(np.ascontiguousarray(array).tobytes())
    data = b"".join(parts)
    return data + b"\x00" if len(data) % 2 else data


def attach_native_pixels(ds: Dataset, frames: list[np.ndarray], layout: PixelLayout) -> None:
    if "PhotometricInterpretation" in ds and ds.PhotometricInterpretation != layout.output_photometric:
        ds.PhotometricInterpretation = layout.output_photometric  # e.g. YBR_RCT decoded from JPEG 2000 is RGB
    ds.PixelData = pack_frames(frames, layout)
    ds["PixelData"].VR = "OW" if layout.bits_allocated > 8 else "OB"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def attach_fragments(ds: Dataset, fragments: list[bytes], transfer_syntax: str) -> None:
    ds.PixelData = encapsulate(fragments, has_bot=len(fragments) > 1)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)


def to_part10(ds: Dataset, transfer_syntax: UID) -> bytes:
    """Write ``ds`` (pixels attached, native or encapsulated as its file meta says) as ``transfer_syntax``.

    Re-encodes native pixels with pydicom's encoders where the target is
    compressed, and checks the result decodes to the same values.
    """
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    current = UID(ds.file_meta.TransferSyntaxUID)
    if transfer_syntax != current:
        if current in NATIVE_SYNTAXES and transfer_syntax in _REENCODABLE:
            original = pixel_array(ds, raw=True).copy()
            _interleave(ds)  # an encapsulated colour stream is not planar (PS3.5 8.2.2-8.2.4)
            if transfer_syntax == JPEG2000Lossless:
                _compress_j2k(ds)
            else:
                ds.compress(transfer_syntax, generate_instance_uid=False)
            decoded = pixel_array(ds, raw=True)
            if not np.array_equal(decoded, original):
                raise ValueError(f"{transfer_syntax.name} round trip changed pixel values")
        elif current in NATIVE_SYNTAXES and transfer_syntax in NATIVE_SYNTAXES:
            if (current == ExplicitVRBigEndian) != (transfer_syntax == ExplicitVRBigEndian) and "PixelData" in ds:
                ds.PixelData = _swap_words(ds)
            ds.file_meta.TransferSyntaxUID = transfer_syntax
        else:
            raise ValueError(f"cannot write {current.name} as {transfer_syntax.name}")
    buffer = io.BytesIO()
    ds.preamble = b"\x00" * 128
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _interleave(ds: Dataset) -> None:
    """Colour Pixel Data with PlanarConfiguration 1 rewritten pixel-interleaved (0), values unchanged."""
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples == 1 or int(ds.get("PlanarConfiguration") or 0) == 0:
        if samples > 1:
            ds.PlanarConfiguration = 0
        return
    rows, columns = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames") or 1)
    dtype = np.dtype(f"<u{max(int(ds.BitsAllocated) // 8, 1)}")
    count = frames * samples * rows * columns
    planar = np.frombuffer(bytes(ds.PixelData), dtype=dtype, count=count).reshape(frames, samples, rows, columns)
    data = np.ascontiguousarray(planar.transpose(0, 2, 3, 1)).tobytes()
    ds.PixelData = data + b"\x00" if len(data) % 2 else data
    ds.PlanarConfiguration = 0


def _compress_j2k(ds: Dataset) -> None:
    """JPEG 2000 lossless; RGB with the reversible colour transform, and YBR_RCT exactly when it was used.

    PS3.5 8.2.4: a JPEG 2000 codestream that applies the multi-component
    transform is YBR_RCT (its decoder gives back the RGB values); one that
    does not keeps its Photometric Interpretation.
    """
    photometric = str(ds.get("PhotometricInterpretation") or "")
    rgb = int(ds.get("SamplesPerPixel") or 1) == 3 and photometric == "RGB"
    if rgb:
        ds.PhotometricInterpretation = "YBR_RCT"  # pydicom applies the transform only when told so
    ds.compress(JPEG2000Lossless, use_mct=rgb, generate_instance_uid=False)
    if rgb and not any(j2k_uses_mct(fragment) for fragment in generate_frames(
            ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1))):
        ds.PhotometricInterpretation = "RGB"


def j2k_uses_mct(codestream: bytes) -> bool:
    """True when the COD segment's SGcod says the multiple component transform is used (ISO 15444-1 A.6.1)."""
    start = codestream.find(b"\xff\x4f\xff\x51")
    cod = codestream.find(b"\xff\x52", max(start, 0))
    return start >= 0 and 0 <= cod and cod + 9 <= len(codestream) and codestream[cod + 8] == 1


def _swap_words(ds: Dataset) -> bytes:
    """Pixel Data bytes in the other byte order: words of BitsAllocated bits (OW of 8-bit samples: 16)."""
    data = bytes(ds.PixelData)
    size = max(int(ds.get("BitsAllocated", 8)) // 8, 2 if ds["PixelData"].VR == "OW" else 1)
    if size == 1:
        return data
    usable = len(data) - len(data) % size
    swapped = np.frombuffer(data[:usable], dtype=f"<u{size}").byteswap().tobytes()
    return swapped + data[usable:]


def original_target(original: str) -> UID:
    """The syntax ``--transfer-syntax original`` aims for (the caller falls back when writing fails)."""
    uid = UID(original)
    if uid in NATIVE_SYNTAXES or uid in _REENCODABLE:
        return uid
    return ExplicitVRLittleEndian


__all__ = [
    "OUTPUT_SYNTAXES",
    "SerializedHeader",
    "attach_fragments",
    "attach_native_pixels",
    "canonical_header_sha256",
    "j2k_uses_mct",
    "original_target",
    "pack_frames",
    "read_header",
    "serialize_header",
    "to_part10",
]
