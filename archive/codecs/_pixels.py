"""Pixel helpers shared by every codec: input validation, reversible value
mappings and the raw zstd payload used by the zstd codec and by fallbacks.

This module depends on nothing else in the package, so that ``base`` and the
codec modules can all import it without cycles.
"""

from __future__ import annotations

from typing import Any

import imagecodecs
import numpy as np
import numpy.typing as npt

from archive.errors import CodecError

#: The sample types every codec must accept, as little-endian dtype strings.
SUPPORTED_DTYPES: frozenset[str] = frozenset({"|u1", "|i1", "<u2", "<i2"})

#: zstd level used when a codec falls back to zstd.
FALLBACK_ZSTD_LEVEL = 19

Pixels = npt.NDArray[Any]


def canonical_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """Return the little-endian form of a supported dtype, or raise."""
    if dtype.kind not in "ui" or dtype.itemsize not in (1, 2):
        raise CodecError(f"unsupported pixel dtype {dtype!s}: need uint8, int8, uint16 or int16")
    canonical = dtype.newbyteorder("<")
    if canonical.str not in SUPPORTED_DTYPES:  # pragma: no cover - guarded above
        raise CodecError(f"unsupported pixel dtype {dtype!s}")
    return canonical


def validate_pixels(pixels: object) -> Pixels:
    """Check a frame and return it as a C-contiguous little-endian array.

    A frame is 2-D (rows, cols) or 3-D (rows, cols, samples). Any number of
    samples is accepted here; codecs that cannot take it fall back to zstd.
    """
    if not isinstance(pixels, np.ndarray):
        raise CodecError(f"pixels must be a numpy array, not {type(pixels).__name__}")
    dtype = canonical_dtype(pixels.dtype)
    if pixels.ndim not in (2, 3):
        raise CodecError(f"pixels must be (rows, cols) or (rows, cols, samples), got shape {pixels.shape}")
    if pixels.size == 0:
        raise CodecError(f"empty frame of shape {pixels.shape}")
    if any(d > 0xFFFFFFFF for d in pixels.shape):
        raise CodecError(f"frame dimension too large: {pixels.shape}")
    return np.ascontiguousarray(pixels, dtype=dtype)


def is_gray_or_rgb(arr: Pixels) -> bool:
    """True for a 2-D frame or a 3-sample colour frame."""
    return arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)


def offset_to_unsigned(arr: Pixels) -> tuple[Pixels, int, int]:
    """Map a frame reversibly to unsigned samples: ``stored = value - min``.

    Returns (mapped, offset, bits) where ``mapped`` is uint8 when the range
    fits in 8 bits, else uint16 (little-endian); ``offset`` is the frame
    minimum and ``bits`` the bit length of the mapped range (at least 1).
    """
    lo = int(arr.min())
    hi = int(arr.max())
    span = hi - lo
    bits = max(1, span.bit_length())
    out_dtype = np.dtype("|u1") if span <= 0xFF else np.dtype("<u2")
    if lo == 0 and arr.dtype == out_dtype:
        return arr, 0, bits
    mapped = np.subtract(arr, lo, dtype=np.int32).astype(out_dtype)
    return mapped, lo, bits


def native_bits(arr: Pixels) -> int:
    """Bits needed to hold the frame's values in its own signedness."""
    lo = int(arr.min())
    hi = int(arr.max())
    if arr.dtype.kind == "u":
        return max(1, hi.bit_length())
    return max(hi.bit_length(), (-lo - 1).bit_length() if lo < 0 else 0) + 1


def zstd_encode_raw(arr: Pixels, level: int) -> bytes:
    """zstd of the raw little-endian bytes of ``arr``."""
    return bytes(imagecodecs.zstd_encode(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(), level=level))


def zstd_decode_raw(payload: bytes, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Pixels:
    raw = imagecodecs.zstd_decode(payload)
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise CodecError(f"zstd payload decoded to {len(raw)} bytes, expected {expected}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)
