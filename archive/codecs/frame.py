"""The self-describing binary container around every encoded frame.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic  b"MACF"
    4       1     container version (1)
    5       1     n = length of the codec id
    6       n     codec id, ASCII: the codec that ACTUALLY produced the payload
    .       1     m = length of the pixel dtype string
    .       m     pixel dtype, numpy ``dtype.str`` ("|u1", "|i1", "<u2", "<i2")
    .       1     k = length of the payload dtype string
    .       k     payload dtype, same vocabulary
    .       1     ndim (2 or 3)
    .       4*nd  shape, one uint32 per dimension
    .       8     offset, int64: stored_payload_value = original_value - offset
    .       4     CRC-32 of the original pixels (C order, little-endian bytes)
    .       8     payload length, uint64
    .       4     CRC-32 of the payload
    .       4     CRC-32 of every header byte before this field
    h       ...   payload: the codec's raw codestream (J2K, JPEG-LS, JXL, zstd)

``h`` is ``FrameHeader.header_length``. The container must end exactly at
the end of the payload. Decoding checks the header CRC before trusting any
field, the payload CRC before handing bytes to a C library, and the pixel
CRC after undoing the mapping, so corrupt or truncated input raises
:class:`~archive.errors.CodecError` and never yields wrong pixels.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from archive.codecs._pixels import SUPPORTED_DTYPES, Pixels
from archive.errors import CodecError

MAGIC = b"MACF"
VERSION = 1

_TAIL = struct.Struct("<qIQI")  # offset, pixel crc, payload length, payload crc
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class FrameHeader:
    """Everything the container says about one encoded frame."""

    codec_id: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int
    payload_dtype: np.dtype[Any]
    header_length: int
    payload_length: int = 0
    pixel_crc32: int = 0
    payload_crc32: int = 0


def pixel_crc32(arr: Pixels) -> int:
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return zlib.crc32(np.ascontiguousarray(little).data) & 0xFFFFFFFF


def _short_str(value: str) -> bytes:
    raw = value.encode("ascii")
    if not 0 < len(raw) < 256:
        raise CodecError(f"container string of bad length: {value!r}")
    return bytes([len(raw)]) + raw


def pack_frame(
    *,
    codec_id: str,
    pixels: Pixels,
    offset: int,
    payload_dtype: np.dtype[Any],
    payload: bytes,
) -> bytes:
    """Wrap ``payload`` (produced from ``pixels``) in a frame container."""
    dtype = pixels.dtype.newbyteorder("<")
    pdtype = payload_dtype.newbyteorder("<")
    if dtype.str not in SUPPORTED_DTYPES or pdtype.str not in SUPPORTED_DTYPES:
        raise CodecError(f"unsupported dtype in frame: {dtype.str} / {pdtype.str}")
    if pixels.ndim not in (2, 3):
        raise CodecError(f"unsupported frame shape {pixels.shape}")
    head = bytearray(MAGIC)
    head.append(VERSION)
    head += _short_str(codec_id)
    head += _short_str(dtype.str)
    head += _short_str(pdtype.str)
    head.append(pixels.ndim)
    head += struct.pack(f"<{pixels.ndim}I", *pixels.shape)
    head += _TAIL.pack(
        offset,
        pixel_crc32(pixels),
        len(payload),
        zlib.crc32(payload) & 0xFFFFFFFF,
    )
    head += _U32.pack(zlib.crc32(head) & 0xFFFFFFFF)
    return bytes(head) + payload


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise CodecError("truncated frame header")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def short_str(self) -> str:
        raw = self.take(self.byte())
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise CodecError("frame header holds a non-ASCII string") from exc


def read_frame_header(data: bytes) -> FrameHeader:
    """Parse and check a frame container's header (not its payload)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"frame must be bytes, not {type(data).__name__}")
    data = bytes(data)
    r = _Reader(data)
    if r.take(4) != MAGIC:
        raise CodecError("not a medarchive frame (bad magic)")
    version = r.byte()
    if version != VERSION:
        raise CodecError(f"unsupported frame container version {version}")
    codec_id = r.short_str()
    dtype_str = r.short_str()
    payload_dtype_str = r.short_str()
    ndim = r.byte()
    if ndim not in (2, 3):
        raise CodecError(f"frame header gives ndim {ndim}")
    shape = struct.unpack(f"<{ndim}I", r.take(4 * ndim))
    offset, pix_crc, payload_length, payload_crc = _TAIL.unpack(r.take(_TAIL.size))
    body_end = r.pos
    (head_crc,) = _U32.unpack(r.take(4))
    if zlib.crc32(data[:body_end]) & 0xFFFFFFFF != head_crc:
        raise CodecError("frame header checksum mismatch")
    if dtype_str not in SUPPORTED_DTYPES or payload_dtype_str not in SUPPORTED_DTYPES:
        raise CodecError(f"frame header gives unsupported dtypes {dtype_str!r}/{payload_dtype_str!r}")
    if any(d == 0 for d in shape):
        raise CodecError(f"frame header gives empty shape {shape}")
    header_length = r.pos
    if len(data) != header_length + payload_length:
        raise CodecError(
            f"frame is {len(data)} bytes, header says {header_length + payload_length} (truncated or padded)"
        )
    return FrameHeader(
        codec_id=codec_id,
        dtype=np.dtype(dtype_str),
        shape=tuple(int(d) for d in shape),
        offset=int(offset),
        payload_dtype=np.dtype(payload_dtype_str),
        header_length=header_length,
        payload_length=int(payload_length),
        pixel_crc32=int(pix_crc),
        payload_crc32=int(payload_crc),
    )


def payload_of(data: bytes, header: FrameHeader) -> bytes:
    """Return the checked payload bytes of a frame."""
    payload = bytes(data[header.header_length :])
    if zlib.crc32(payload) & 0xFFFFFFFF != header.payload_crc32:
        raise CodecError("frame payload checksum mismatch (corrupt data)")
    return payload


def unmap(payload_pixels: Pixels, header: FrameHeader) -> Pixels:
    """Undo the recorded mapping and verify the result against the pixel CRC."""
    if payload_pixels.shape != header.shape:
        raise CodecError(f"payload decoded to shape {payload_pixels.shape}, header says {header.shape}")
    if payload_pixels.dtype.newbyteorder("<") != header.payload_dtype:
        raise CodecError(f"payload decoded to dtype {payload_pixels.dtype}, header says {header.payload_dtype}")
    native = header.dtype.newbyteorder("=")
    if header.offset == 0 and header.payload_dtype == header.dtype:
        out = np.ascontiguousarray(payload_pixels, dtype=native)
    else:
        info = np.iinfo(native)
        wide = np.add(payload_pixels, header.offset, dtype=np.int64)
        if wide.min() < info.min or wide.max() > info.max:
            raise CodecError("decoded values fall outside the frame dtype (corrupt data)")
        out = wide.astype(native)
    if pixel_crc32(out) != header.pixel_crc32:
        raise CodecError("decoded pixels do not match the recorded checksum")
    return out


def decode_frame(data: bytes) -> Pixels:
    """Decode any frame container, dispatching on the codec that produced it."""
    # Imported here: the registry imports every codec, which import this module.
    from archive.codecs.registry import codec_class

    header = read_frame_header(data)
    cls = codec_class(header.codec_id)
    payload = payload_of(data, header)
    try:
        decoded = cls.decode_payload(payload, header)
    except CodecError:
        raise
    except Exception as exc:  # library errors on corrupt codestreams
        raise CodecError(f"{header.codec_id} payload failed to decode: {exc}") from exc
    return unmap(decoded, header)
