"""Read one file into what the archive needs: identity, header, pixel layout, storage mode.

Three outcomes, decided here once: a file that is plainly not DICOM raises
:class:`NotDicomError` (skip, say why); a file that claims to be DICOM but
cannot be archived faithfully raises :class:`InvalidDicomError` (quarantine);
everything else becomes a :class:`ParsedInstance` whose pixels are read
frame by frame later, so a large multi-frame object is never held twice.
"""

from __future__ import annotations

import hashlib
import io
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from archive.kinds import StorageMode
from archive.dicom.uids import derived_uid, uid_text
from archive.errors import InvalidDicomError, NotDicomError

NATIVE_SYNTAXES = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
)
#: Encapsulated syntaxes that are always lossless: decoded and re-encoded by our codec.
LOSSLESS_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless, process 14
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
        "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Multi-component Lossless Only
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    }
)
#: Syntaxes that may be either: lossless only when the codestream uses the reversible 5/3 wavelet.
J2K_EITHER_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203"})
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
MAX_PIXEL_BYTES = 4 * 1024**3  # beyond this a header is not believed before decoding
_NOT_DICOM_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive",
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
}
_SERIES_INSTANCE_UID = 0x0020000E
_RECURSION_LIMIT = 20_000  # 200-level nested sequences are valid DICOM


@dataclass(frozen=True)
class PixelLayout:
    """Geometry and sample format: the side information that rebuilds Pixel Data."""

    rows: int
    columns: int
    samples_per_pixel: int
    number_of_frames: int
    bits_allocated: int
    bits_stored: int
    high_bit: int
    pixel_representation: int
    photometric_interpretation: str  # as received
    planar_configuration: int | None
    dtype: str  # numpy dtype of decoded frames, little-endian ("<u2")
    output_photometric: str  # what the decoded values are (RGB for a J2K YBR_RCT source)

    @property
    def frame_shape(self) -> tuple[int, ...]:
        if self.samples_per_pixel == 1:
            return (self.rows, self.columns)
        return (self.rows, self.columns, self.samples_per_pixel)

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.samples_per_pixel * (self.bits_allocated // 8)

    @property
    def total_pixels(self) -> int:
        return self.rows * self.columns * self.number_of_frames


@dataclass
class ParsedInstance:
    """One readable DICOM object, before anything is stored."""

    source_path: Path
    source_bytes: bytes
    dataset: Dataset
    transfer_syntax_uid: str
    had_file_meta: bool
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str | None
    mode: StorageMode
    mode_reason: str
    layout: PixelLayout | None
    assigned_uids: dict[str, str] = field(default_factory=dict)

    @property
    def source_sha256(self) -> str:
        return hashlib.sha256(self.source_bytes).hexdigest()

    def text(self, keyword: str) -> str | None:
        return uid_text(self.dataset, keyword)

    def integer(self, keyword: str) -> int | None:
        value = self.dataset.get(keyword)
        try:
            return int(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            return None


def sniff(path: Path, head: bytes) -> None:
    """Raise :class:`NotDicomError` unless the file at least claims to be DICOM."""
    if path.name.upper() == "DICOMDIR":
        raise NotDicomError("DICOMDIR index file (a directory of other files, not an instance)")
    if len(head) >= 132 and head[128:132] == b"DICM":
        return
    for magic, what in _NOT_DICOM_MAGIC.items():
        if head.startswith(magic):
            raise NotDicomError(f"not DICOM: {what}")
    if path.suffix.lower() in DICOM_SUFFIXES:
        return  # claims to be DICOM by its name: whatever is wrong with it gets quarantined
    if len(head) >= 8 and head[1] == 0 and head[0] in (0x02, 0x08) and head[3] == 0x00:
        return  # a headless (no preamble) little-endian data set starting at group 0002 or 0008
    raise NotDicomError("not DICOM: no 'DICM' marker, no DICOM file name and no data elements at the start")


def peek_uids(path: Path) -> tuple[str, str] | None:
    """Study and Series Instance UID from a file's header, or None when they cannot be read.

    Cheap: parsing stops after (0020,000E), before private groups and pixels
    (a file whose elements are out of order is grouped as unreadable, and
    archived or quarantined by the worker like any other). The watcher and
    ``ingest --wait`` group files by study and series with it.
    """
    try:
        with open(path, "rb") as handle:
            ds = read_partial(handle, stop_when=_past_series_uid, force=True)
        study, series = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
    except Exception:  # anything unreadable is grouped apart and quarantined by the worker
        return None
    if not study or not series:
        return None
    return str(study).strip("\x00 "), str(series).strip("\x00 ")


def _past_series_uid(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return bool(tag > _SERIES_INSTANCE_UID)


def read_instance(path: Path) -> ParsedInstance:
    """Read and validate ``path``; never modifies it."""
    return parse_instance(path.read_bytes(), path)


def parse_instance(data: bytes, path: Path) -> ParsedInstance:
    """Validate and classify a file's bytes (``path`` names it: a source, or a whole-kept object read back)."""
    sniff(path, data[:132])
    if not data:
        raise InvalidDicomError("empty file")
    if sys.getrecursionlimit() < _RECURSION_LIMIT:
        sys.setrecursionlimit(_RECURSION_LIMIT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd values are kept as they are, not reported per element
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except NotDicomError:
        raise
    except Exception as exc:  # pydicom raises many types for malformed input
        raise InvalidDicomError(f"unreadable DICOM: {type(exc).__name__}: {exc}") from exc
    if len(ds) == 0 and not ds.file_meta:
        raise InvalidDicomError("no data elements could be read")
    if uid_text(ds.file_meta, "MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise NotDicomError("DICOMDIR index file (a directory of other files, not an instance)")
    if "SOPClassUID" not in ds and "PixelData" not in ds and "Modality" not in ds:
        raise InvalidDicomError("no SOP Class, Modality or Pixel Data: nothing recognisable as a DICOM object")

    had_file_meta = "TransferSyntaxUID" in ds.file_meta
    ts = _transfer_syntax(ds)
    if had_file_meta:
        missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not uid_text(ds, k)]
        if missing:
            raise InvalidDicomError(f"missing {', '.join(missing)}: cannot be filed by study (header incomplete or truncated)")
        assigned: dict[str, str] = {}
    else:
        assigned = _ensure_uids(ds, data)  # ACR-NEMA style file without file meta or UIDs
    layout, mode, reason = _classify_pixels(ds, ts)
    return ParsedInstance(
        source_path=path,
        source_bytes=data,
        dataset=ds,
        transfer_syntax_uid=str(ts),
        had_file_meta=had_file_meta,
        study_uid=uid_text(ds, "StudyInstanceUID") or "",
        series_uid=uid_text(ds, "SeriesInstanceUID") or "",
        sop_instance_uid=uid_text(ds, "SOPInstanceUID") or "",
        sop_class_uid=uid_text(ds, "SOPClassUID"),
        mode=mode,
        mode_reason=reason,
        layout=layout,
        assigned_uids=assigned,
    )


def _transfer_syntax(ds: Dataset) -> UID:
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts:
        return UID(str(ts).rstrip("\x00 "))
    implicit, little = ds.original_encoding
    syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return syntax


def _ensure_uids(ds: Dataset, data: bytes) -> dict[str, str]:
    """Mint deterministic UIDs for old ACR-NEMA style files that have none, and say so."""
    assigned: dict[str, str] = {}
    content = hashlib.sha256(data).hexdigest()
    study_key = [uid_text(ds, k) or "" for k in ("PatientID", "StudyDate", "StudyTime", "StudyID")]
    if not any(study_key):
        study_key = [content]
    wanted = {
        "StudyInstanceUID": ["study", *study_key],
        "SeriesInstanceUID": ["series", *study_key, uid_text(ds, "SeriesNumber") or content],
        "SOPInstanceUID": ["instance", content],
    }
    for keyword, parts in wanted.items():
        if not uid_text(ds, keyword):
            assigned[keyword] = derived_uid(*parts)
            setattr(ds, keyword, assigned[keyword])
    return assigned


def _classify_pixels(ds: Dataset, ts: UID) -> tuple[PixelLayout | None, StorageMode, str]:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            return None, StorageMode.WHOLE, "floating-point pixel data: kept whole"
        return None, StorageMode.WHOLE, "no pixel data: kept whole"
    layout = _layout(ds, ts)
    if layout.bits_allocated not in (8, 16):
        return layout, StorageMode.WHOLE, f"BitsAllocated {layout.bits_allocated}: kept whole"
    if layout.samples_per_pixel not in (1, 3):
        return layout, StorageMode.WHOLE, f"SamplesPerPixel {layout.samples_per_pixel}: kept whole"
    if ts in NATIVE_SYNTAXES:
        if layout.photometric_interpretation.endswith(("_422", "_420")):
            return layout, StorageMode.WHOLE, "chroma-subsampled native pixel data: kept whole"
        _check_native_length(ds, layout)
        return layout, StorageMode.PIXELS, "native pixel data"
    if ts in LOSSLESS_SYNTAXES:
        return layout, StorageMode.PIXELS, "lossless compressed input: decoded and re-encoded"
    if ts in J2K_EITHER_SYNTAXES:
        first = next(iter(_fragments(ds, layout)), b"")
        if _j2k_is_reversible(first) and str(ds.get("LossyImageCompression", "")).strip() != "01":
            return layout, StorageMode.PIXELS, "reversible JPEG 2000 input: decoded and re-encoded"
        return layout, StorageMode.PASSTHROUGH, "lossy JPEG 2000 input: original fragments kept"
    return layout, StorageMode.PASSTHROUGH, f"lossy or unknown compressed input ({ts.name}): original fragments kept"


#: How faithful an object's archived pixels are, for choosing which of two objects with one SOP Instance UID
#: is the instance: a lossy codestream ranks lowest, pixels once lossy-compressed (LossyImageCompression
#: "01") but kept losslessly next, lossless highest.
LOSSY_CODESTREAM, ONCE_LOSSY, LOSSLESS = 0, 1, 2


def stores_lossy_codestream(transfer_syntax_uid: str, mode: StorageMode) -> bool:
    """True when what the archive keeps of the pixels is a lossy (or unknown) compressed codestream."""
    if mode is StorageMode.PASSTHROUGH:
        return True
    if mode is StorageMode.WHOLE:
        return transfer_syntax_uid not in NATIVE_SYNTAXES and transfer_syntax_uid not in LOSSLESS_SYNTAXES
    return False


def says_once_lossy(ds: Dataset) -> bool:
    """LossyImageCompression "01": the pixel values went through lossy compression at some point."""
    return str(ds.get("LossyImageCompression") or "").strip() == "01"


def fidelity(parsed: ParsedInstance) -> int:
    """:data:`LOSSY_CODESTREAM`, :data:`ONCE_LOSSY` or :data:`LOSSLESS` for an arriving object."""
    if stores_lossy_codestream(parsed.transfer_syntax_uid, parsed.mode):
        return LOSSY_CODESTREAM
    return ONCE_LOSSY if says_once_lossy(parsed.dataset) else LOSSLESS


def is_lossless_compressed(parsed: ParsedInstance) -> bool:
    """Encapsulated input decoded losslessly (its original fragments could be kept instead of re-encoding)."""
    return parsed.mode is StorageMode.PIXELS and parsed.transfer_syntax_uid not in NATIVE_SYNTAXES


def _layout(ds: Dataset, ts: UID) -> PixelLayout:
    def required(keyword: str) -> int:
        value = ds.get(keyword)
        if value in (None, ""):
            raise InvalidDicomError(f"image without {keyword}")
        try:
            return int(value)
        except (TypeError, ValueError) as exc:
            raise InvalidDicomError(f"{keyword} is not an integer: {value!r}") from exc

    def optional(keyword: str, default: int) -> int:
        return required(keyword) if ds.get(keyword) not in (None, "") else default

    rows, columns = required("Rows"), required("Columns")
    bits_allocated = required("BitsAllocated")
    bits_stored = optional("BitsStored", bits_allocated)
    high_bit = optional("HighBit", bits_stored - 1)
    spp = optional("SamplesPerPixel", 1)
    frames = optional("NumberOfFrames", 1)
    pixel_representation = optional("PixelRepresentation", 0)
    photometric = str(ds.get("PhotometricInterpretation") or ("MONOCHROME2" if spp == 1 else "RGB")).strip()
    planar = ds.get("PlanarConfiguration")
    if bits_allocated not in (1, 8, 16, 32, 64):
        raise InvalidDicomError(f"BitsAllocated {bits_allocated} is not 1, 8, 16, 32 or 64")
    if not 1 <= bits_stored <= bits_allocated:
        raise InvalidDicomError(f"BitsStored {bits_stored} is inconsistent with BitsAllocated {bits_allocated}")
    if not bits_stored - 1 <= high_bit < bits_allocated:
        raise InvalidDicomError(
            f"HighBit {high_bit} is inconsistent with BitsStored {bits_stored} / BitsAllocated {bits_allocated}"
        )
    if rows < 1 or columns < 1 or frames < 1 or spp < 1:
        raise InvalidDicomError(f"empty geometry: {rows}×{columns}, {frames} frames, {spp} samples")
    declared = rows * columns * spp * frames * max(bits_allocated, 8) // 8
    if declared > MAX_PIXEL_BYTES:
        raise InvalidDicomError(
            f"implausible geometry: {rows}×{columns}×{spp} × {frames} frames = {declared} bytes declared"
        )
    if pixel_representation not in (0, 1):
        raise InvalidDicomError(f"PixelRepresentation {pixel_representation} is not 0 or 1")
    kind = "i" if pixel_representation else "u"
    dtype = f"<{kind}{max(bits_allocated // 8, 1)}" if bits_allocated in (8, 16) else f"<{kind}{bits_allocated // 8 or 1}"
    output_photometric = photometric
    if ts not in NATIVE_SYNTAXES:
        output_photometric = {"YBR_RCT": "RGB", "YBR_ICT": "RGB", "YBR_FULL_422": "YBR_FULL"}.get(photometric, photometric)
    return PixelLayout(
        rows=rows,
        columns=columns,
        samples_per_pixel=spp,
        number_of_frames=frames,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        high_bit=high_bit,
        pixel_representation=pixel_representation,
        photometric_interpretation=photometric,
        planar_configuration=int(planar) if planar is not None and spp > 1 else None,
        dtype=dtype,
        output_photometric=output_photometric,
    )


def _check_native_length(ds: Dataset, layout: PixelLayout) -> None:
    expected = layout.frame_bytes * layout.number_of_frames
    actual = len(ds.PixelData)
    if actual < expected:
        raise InvalidDicomError(
            f"Pixel Data holds {actual} bytes, shorter than the {expected} declared "
            f"({layout.rows}×{layout.columns}×{layout.samples_per_pixel} × {layout.number_of_frames} frames "
            f"at {layout.bits_allocated} bits)"
        )


def _fragments(ds: Dataset, layout: PixelLayout) -> Iterator[bytes]:
    try:
        yield from generate_frames(ds.PixelData, number_of_frames=layout.number_of_frames)
    except Exception as exc:
        raise InvalidDicomError(f"encapsulated Pixel Data is malformed: {exc}") from exc


def _j2k_is_reversible(codestream: bytes) -> bool:
    """True when the COD segment names the reversible 5/3 wavelet (ISO 15444-1 A.6.1)."""
    start = codestream.find(b"\xff\x4f\xff\x51")
    if start < 0:
        return False
    cod = codestream.find(b"\xff\x52", start)
    # marker(2) length(2) Scod(1) progression(1) layers(2) MCT(1) levels(1) cbw(1) cbh(1) style(1) transform(1)
    if cod < 0 or cod + 14 > len(codestream):
        return False
    return codestream[cod + 13] == 1


def iter_fragments(parsed: ParsedInstance) -> Iterator[bytes]:
    """The original compressed frames of a passthrough instance, one bytes object per frame."""
    assert parsed.layout is not None
    count = 0
    for fragment in _fragments(parsed.dataset, parsed.layout):
        count += 1
        yield bytes(fragment)
    if count != parsed.layout.number_of_frames:
        raise InvalidDicomError(f"encapsulated Pixel Data holds {count} frames, {parsed.layout.number_of_frames} declared")


def iter_frames(parsed: ParsedInstance) -> Iterator[np.ndarray]:
    """Stored sample values frame by frame: native bytes as they are, compressed input decoded.

    Native data is viewed straight from the Pixel Data bytes (so bits above
    BitsStored survive); compressed input goes through pydicom's decoders
    with ``raw=True`` (no colour conversion).
    """
    layout = parsed.layout
    assert layout is not None
    if parsed.transfer_syntax_uid in NATIVE_SYNTAXES:
        yield from _native_frames(parsed.dataset, layout, parsed.transfer_syntax_uid == ExplicitVRBigEndian)
        return
    dtype = np.dtype(layout.dtype)
    count = 0
    try:
        for frame in iter_pixels(parsed.dataset, raw=True):
            if frame.shape != layout.frame_shape:
                raise InvalidDicomError(f"decoded frame has shape {frame.shape}, expected {layout.frame_shape}")
            if frame.dtype.kind != dtype.kind or frame.dtype.itemsize != dtype.itemsize:
                raise InvalidDicomError(f"decoded frame has dtype {frame.dtype}, expected {dtype}")
            count += 1
            yield np.ascontiguousarray(frame)
    except InvalidDicomError:
        raise
    except Exception as exc:
        raise InvalidDicomError(f"compressed Pixel Data cannot be decoded: {type(exc).__name__}: {exc}") from exc
    if count != layout.number_of_frames:
        raise InvalidDicomError(f"decoded {count} frames, {layout.number_of_frames} declared")


def _native_frames(ds: Dataset, layout: PixelLayout, big_endian: bool) -> Iterator[np.ndarray]:
    buffer = ds.PixelData
    if big_endian and layout.bits_allocated == 8 and ds["PixelData"].VR == "OW":
        # OW is a stream of 16-bit words: in big endian, byte pairs of 8-bit samples are swapped
        padded = buffer + b"\x00" if len(buffer) % 2 else buffer
        buffer = np.frombuffer(padded, dtype=">u2").astype("<u2").tobytes()
    dtype = np.dtype(layout.dtype)
    file_dtype = dtype.newbyteorder(">") if big_endian and dtype.itemsize > 1 else dtype
    count = layout.rows * layout.columns * layout.samples_per_pixel
    for index in range(layout.number_of_frames):
        flat = np.frombuffer(buffer, dtype=file_dtype, count=count, offset=index * layout.frame_bytes)
        flat = flat.astype(dtype, copy=False)
        frame: np.ndarray
        if layout.samples_per_pixel == 1:
            frame = flat.reshape(layout.rows, layout.columns)
        elif layout.planar_configuration == 1:
            frame = flat.reshape(layout.samples_per_pixel, layout.rows, layout.columns).transpose(1, 2, 0)
        else:
            frame = flat.reshape(layout.rows, layout.columns, layout.samples_per_pixel)
        yield np.ascontiguousarray(frame)
