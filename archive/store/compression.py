"""zstd for opaque blobs (headers, whole non-image objects): the codec layer handles pixels."""

from __future__ import annotations

import imagecodecs

from archive.errors import BlobCorruptError


def compress_bytes(data: bytes, level: int) -> bytes:
    return bytes(imagecodecs.zstd_encode(data, level=level))


def decompress_bytes(data: bytes) -> bytes:
    try:
        return bytes(imagecodecs.zstd_decode(data))
    except Exception as exc:  # imagecodecs raises its own ZstdError
        raise BlobCorruptError(f"zstd blob cannot be decompressed: {exc}") from exc
