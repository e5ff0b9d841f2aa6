"""The self-describing binary container around every encoded frame.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic  b"MACF"
    4       1     container version (1 or 2)
    5       1     n = length of the codec id
    6       n     codec id, ASCII: the codec that ACTUALLY produced the payload
    .       1     m = length of the pixel dtype string
    .       m     pixel dtype, numpy ``dtype.str`` ("|u1", "|i1", "<u2", "<i2")
    .       1     k = length of the payload dtype string
    .       k     payload dtype, same vocabulary
    .       1     ndim (2 or 3)
    .       4*nd  shape, one uint32 per dimension
    .       1     flags (version 2 only): bit 0 lossy, bit 1 deterministic decoding
    .       1     c = length of the context digest (version 2 only): 0, or 32
    .       c     sha256 of the context blob the payload needs (a basis, a codebook)
    .       8     offset, int64: stored_payload_value = original_value - offset
    .       4     CRC-32 of the pixels decoding must give (C order, little-endian
                  bytes): the original for a lossless frame, the reconstruction
                  computed at encode time for a deterministic lossy one, 0 and
                  unchecked for a non-deterministic one (the payload CRC guards it)
    .       8     payload length, uint64
    .       4     CRC-32 of the payload
    .       4     CRC-32 of every header byte before this field
    h       ...   payload: the codec's raw codestream (J2K, JPEG-LS, JXL, zstd)

``h`` is ``FrameHeader.header_length``. Version 1 (lossless only, no flags,
no context) keeps decoding; new frames are written as version 2. The container must end exactly at
the end of the payload. Decoding checks the header CRC before trusting any
field, the payload CRC before handing bytes to a C library, and the pixel
CRC after undoing the mapping, so corrupt or truncated input raises
:class:`~archive.errors.CodecError` and never yields wrong pixels.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from archive.codecs._pixels import SUPPORTED_DTYPES, Pixels
from archive.errors import CodecError

MAGIC = b"MACF"
VERSION = 2
READABLE_VERSIONS = (1, 2)
FLAG_LOSSY = 0x01
FLAG_DETERMINISTIC = 0x02

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
    version: int = VERSION
    lossy: bool = False
    deterministic: bool = True
    context_sha256: str | None = None  # hex digest of the context blob decoding needs

    @property
    def checks_pixels(self) -> bool:
        """Whether decoded pixels are compared with ``pixel_crc32`` (all but non-deterministic lossy frames)."""
        return not self.lossy or self.deterministic


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
    lossy: bool = False,
    deterministic: bool = True,
    reconstruction_crc32: int | None = None,
    context_sha256: str | None = None,
) -> bytes:
    """Wrap ``payload`` (produced from ``pixels``) in a frame container.

    A lossy frame gives ``reconstruction_crc32``, the CRC of what decoding
    gives (computed at encode time by one decode), unless its decoding is not
    deterministic; ``context_sha256`` names the side blob decoding needs.
    """
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
    head.append((FLAG_LOSSY if lossy else 0) | (FLAG_DETERMINISTIC if deterministic else 0))
    digest = bytes.fromhex(context_sha256) if context_sha256 else b""
    if len(digest) not in (0, 32):
        raise CodecError(f"context digest must be a sha256, got {context_sha256!r}")
    head.append(len(digest))
    head += digest
    if not lossy:
        crc = pixel_crc32(pixels)
    elif deterministic:
        if reconstruction_crc32 is None:
            raise CodecError("a deterministic lossy frame needs the CRC of its reconstruction")
        crc = reconstruction_crc32
    else:
        crc = 0
    head += _TAIL.pack(
        offset,
        crc,
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
    if version not in READABLE_VERSIONS:
        raise CodecError(f"unsupported frame container version {version}")
    codec_id = r.short_str()
    dtype_str = r.short_str()
    payload_dtype_str = r.short_str()
    ndim = r.byte()
    if ndim not in (2, 3):
        raise CodecError(f"frame header gives ndim {ndim}")
    shape = struct.unpack(f"<{ndim}I", r.take(4 * ndim))
    flags, context_sha256 = FLAG_DETERMINISTIC, None
    if version >= 2:
        flags = r.byte()
        digest_length = r.byte()
        if digest_length not in (0, 32):
            raise CodecError(f"frame header gives a context digest of {digest_length} bytes")
        context_sha256 = r.take(digest_length).hex() or None
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
        version=version,
        lossy=bool(flags & FLAG_LOSSY),
        deterministic=bool(flags & FLAG_DETERMINISTIC),
        context_sha256=context_sha256,
    )


def payload_of(data: bytes, header: FrameHeader) -> bytes:
    """Return the checked payload bytes of a frame."""
    payload = bytes(data[header.header_length :])
    if zlib.crc32(payload) & 0xFFFFFFFF != header.payload_crc32:
        raise CodecError("frame payload checksum mismatch (corrupt data)")
    return payload


def unmap(payload_pixels: Pixels, header: FrameHeader, *, check: bool = True) -> Pixels:
    """Undo the recorded mapping and verify the result against the pixel CRC (when ``check`` and the frame has one)."""
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
    if check and header.checks_pixels and pixel_crc32(out) != header.pixel_crc32:
        raise CodecError("decoded pixels do not match the recorded checksum")
    return out


def check_context(header: FrameHeader, context: bytes | None) -> bytes | None:
    """The context to decode with: refused when the frame needs one and it is missing or another."""
    if header.context_sha256 is None:
        return None
    if context is None:
        raise CodecError(f"{header.codec_id} frame needs its context blob {header.context_sha256[:16]}…")
    if hashlib.sha256(context).hexdigest() != header.context_sha256:
        raise CodecError(f"{header.codec_id} frame was given the wrong context blob (needs {header.context_sha256[:16]}…)")
    return context


def decode_frame(data: bytes, context: bytes | None = None) -> Pixels:
    """Decode any frame container, dispatching on the codec that produced it.

    ``context`` is the side blob (basis, codebook) the frame names, if any.
    """
    # Imported here: the registry imports codec modules, which import this module.
    from archive.codecs.registry import codec_class

    header = read_frame_header(data)
    needed = check_context(header, context)
    cls = codec_class(header.codec_id)
    payload = payload_of(data, header)
    try:
        decoded = cls.decode_payload(payload, header, needed)
    except CodecError:
        raise
    except Exception as exc:  # library errors on corrupt codestreams
        raise CodecError(f"{header.codec_id} payload failed to decode: {exc}") from exc
    return unmap(decoded, header)
