"""Entropy coding of signed integer arrays with constriction, deterministic on any machine.

Values are split into a magnitude symbol (``|v|`` below an escape level, else the
escape level plus the bit length of the excess, Exp-Golomb style), a sign bit and
raw refinement bits. Magnitude symbols are range coded (constriction's
``RangeEncoder``) with a categorical model per *context* whose integer
frequencies are stored in the stream, one byte per symbol in a small
floating-point form (3-bit mantissa), so the decoder rebuilds exactly the same
model from integers: no transcendental function ever shapes a probability (libm
``exp`` may differ by an ulp between machines; integer tables cannot).

The caller supplies the contexts; the decoder must be able to compute them from
what it has already decoded, so coding is organised as a sequence of ``write``
calls mirrored by the same sequence of ``read`` calls.
"""

from __future__ import annotations

from typing import Any

import constriction
import numpy as np
import numpy.typing as npt

from archive.errors import CodecError

IntArray = npt.NDArray[np.int64]

#: magnitudes below this are symbols of their own; larger ones escape.
ESCAPE = 14
#: escape symbols cover excess bit lengths 0..MAX_EXTRA_BITS.
MAX_EXTRA_BITS = 40
_ALPHABET = ESCAPE + MAX_EXTRA_BITS + 1


def _freq_from_code(code: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Byte code -> frequency: 0 -> 0, else a 3-bit-mantissa float ((8 + m) << e) >> 3, integer only."""
    c = code - 1
    f = ((8 + (c & 7)) << (c >> 3)) >> 3
    return np.where(code == 0, 0, np.maximum(f, 1)).astype(np.int64)


_CODE_TABLE = _freq_from_code(np.arange(256, dtype=np.int64))


def _code_from_count(count: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Nearest byte code for each count (0 stays 0, any positive count gets a positive code)."""
    idx = np.searchsorted(_CODE_TABLE[1:], count, side="left") + 1
    idx = np.clip(idx, 1, 255)
    lower = np.clip(idx - 1, 1, 255)
    pick_lower = np.abs(_CODE_TABLE[lower] - count) < np.abs(_CODE_TABLE[idx] - count)
    out = np.where(pick_lower, lower, idx)
    return np.where(count == 0, 0, out).astype(np.int64)


def _split(values: IntArray) -> tuple[IntArray, IntArray, IntArray]:
    """values -> (magnitude symbols, number of raw bits, raw bit values)."""
    mag = np.abs(values)
    excess = mag - ESCAPE + 1  # >= 1 where escaped
    escaped = mag >= ESCAPE
    nbits = np.zeros_like(mag)
    safe = np.where(escaped, excess, 1)
    nb = np.floor(np.log2(safe.astype(np.float64))).astype(np.int64)
    # exact bit length: fix float rounding near powers of two
    nb = np.where((np.int64(1) << (nb + 1)) <= safe, nb + 1, nb)
    nb = np.where((np.int64(1) << nb) > safe, nb - 1, nb)
    nbits = np.where(escaped, nb, 0)
    if int(nbits.max(initial=0)) > MAX_EXTRA_BITS:
        raise CodecError("value too large for the entropy coder")
    sym = np.where(escaped, ESCAPE + nbits, mag)
    raw = np.where(escaped, safe - (np.int64(1) << nbits), 0)
    return sym, nbits, raw


def pack_bits(values: IntArray, widths: IntArray) -> bytes:
    """Concatenate the low ``widths`` bits of each value, MSB first (raw refinement bits, fixed-width fields)."""
    total = int(widths.sum())
    if total == 0:
        return b""
    owner = np.repeat(np.arange(values.size), widths)
    starts = np.cumsum(widths) - widths
    pos = np.arange(total) - starts[owner]
    bits = (values[owner] >> (widths[owner] - 1 - pos)) & 1
    return np.packbits(bits.astype(np.uint8)).tobytes()


def unpack_bits(bits: IntArray, bit_offset: int, widths: IntArray) -> tuple[IntArray, int]:
    """Mirror of :func:`pack_bits` on the stream's bits (``np.unpackbits`` once, by the caller), from ``bit_offset``;
    returns the values and the new offset."""
    total = int(widths.sum())
    if total == 0:
        return np.zeros(widths.size, np.int64), bit_offset
    if bit_offset + total > bits.size:
        raise CodecError("entropy stream truncated (raw bits)")
    owner = np.repeat(np.arange(widths.size), widths)
    starts = np.cumsum(widths) - widths
    pos = np.arange(total) - starts[owner]
    contrib = bits[bit_offset : bit_offset + total] << (widths[owner] - 1 - pos)
    out = np.zeros(widths.size, np.int64)
    np.add.at(out, owner, contrib)
    return out, bit_offset + total


def _probabilities(codes: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    freq = _CODE_TABLE[codes].astype(np.float64)
    out: npt.NDArray[np.float64] = freq / freq.sum()
    return out


def put_varint(out: bytearray, value: int) -> None:
    """LEB128 unsigned varint."""
    if value < 0:
        raise CodecError("varint must be non-negative")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def zigzag(value: int) -> int:
    """A signed integer as an unsigned one for a varint: 0, -1, 1, -2 ... -> 0, 1, 2, 3 ..."""
    return value * 2 if value >= 0 else -value * 2 - 1


def unzigzag(value: int) -> int:
    return value // 2 if value % 2 == 0 else -(value + 1) // 2


def get_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Read a LEB128 varint at ``pos``; returns (value, new position)."""
    value = 0
    shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise CodecError("truncated or oversized varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


class SymbolWriter:
    """Collects ``write(values, contexts, n_contexts)`` calls into one byte string."""

    def __init__(self) -> None:
        self._tables = bytearray()
        self._coder = constriction.stream.queue.RangeEncoder()
        self._signs: list[npt.NDArray[np.bool_]] = []
        self._raw: list[tuple[IntArray, IntArray]] = []

    def write(self, values: npt.NDArray[Any], contexts: npt.NDArray[Any] | None = None, n_contexts: int = 1) -> None:
        """Code ``values`` (any int array, flattened) under per-value contexts in 0..n_contexts-1."""
        v = np.asarray(values, dtype=np.int64).ravel()
        ctx = np.zeros(v.size, np.int64) if contexts is None else np.asarray(contexts, np.int64).ravel()
        sym, nbits, raw = _split(v)
        for c in range(n_contexts):
            sel = ctx == c
            s = sym[sel]
            if s.size == 0:
                continue
            counts = np.bincount(s, minlength=1)
            codes = _code_from_count(counts)
            self._tables.append(codes.size - 1)
            self._tables.extend(codes.astype(np.uint8).tobytes())
            if codes.size > 1:
                model = constriction.stream.model.Categorical(_probabilities(codes), perfect=False)
                self._coder.encode(s.astype(np.int32), model)
        self._signs.append(v[v != 0] < 0)
        self._raw.append((raw, nbits))

    def finish(self) -> bytes:
        words = self._coder.get_compressed().astype("<u4").tobytes()
        signs = np.packbits(np.concatenate(self._signs)).tobytes() if self._signs else b""
        raws = [r for r, _ in self._raw]
        nbs = [n for _, n in self._raw]
        raw = pack_bits(np.concatenate(raws), np.concatenate(nbs)) if raws else b""
        out = bytearray()
        for part in (self._tables, words, signs):
            put_varint(out, len(part))
        out += self._tables + words + signs + raw
        return bytes(out)


class SymbolReader:
    """Mirror of :class:`SymbolWriter`: the same ``read`` calls, in the same order."""

    def __init__(self, data: bytes) -> None:
        pos = 0
        lengths = []
        for _ in range(3):
            n, pos = get_varint(data, pos)
            lengths.append(n)
        if pos + sum(lengths) > len(data):
            raise CodecError("entropy stream truncated")
        self._tables = data[pos : pos + lengths[0]]
        pos += lengths[0]
        words = data[pos : pos + lengths[1]]
        if len(words) % 4:
            raise CodecError("entropy stream corrupt (range coder words)")
        pos += lengths[1]
        self._signs = np.unpackbits(np.frombuffer(data[pos : pos + lengths[2]], np.uint8)).astype(bool)
        pos += lengths[2]
        self._raw = np.unpackbits(np.frombuffer(data[pos:], np.uint8)).astype(np.int64)  # once, not per read
        self._decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(words, "<u4").astype(np.uint32))
        self._tpos = 0
        self._spos = 0
        self._rpos = 0

    def read(self, contexts: npt.NDArray[Any] | int, n_contexts: int = 1) -> IntArray:
        """Decode values; ``contexts`` is the per-value context array, or a count when there is one context."""
        ctx = np.zeros(contexts, np.int64) if isinstance(contexts, int) else np.asarray(contexts, np.int64).ravel()
        sym = np.zeros(ctx.size, np.int64)
        try:
            for c in range(n_contexts):
                sel = np.flatnonzero(ctx == c)
                if sel.size == 0:
                    continue
                if self._tpos >= len(self._tables):
                    raise CodecError("entropy stream corrupt (tables)")
                n = self._tables[self._tpos] + 1
                if n > _ALPHABET or self._tpos + 1 + n > len(self._tables):
                    raise CodecError("entropy stream corrupt (table size)")
                codes = np.frombuffer(self._tables[self._tpos + 1 : self._tpos + 1 + n], np.uint8).astype(np.int64)
                self._tpos += 1 + n
                if not codes.any():
                    raise CodecError("entropy stream corrupt (empty table)")
                if n > 1:
                    model = constriction.stream.model.Categorical(_probabilities(codes), perfect=False)
                    sym[sel] = self._decoder.decode(model, int(sel.size))
        except (ValueError, RuntimeError, AssertionError) as exc:
            raise CodecError(f"entropy stream corrupt: {exc}") from exc
        escaped = sym >= ESCAPE
        nbits = np.where(escaped, sym - ESCAPE, 0)
        raw, self._rpos = unpack_bits(self._raw, self._rpos, nbits)
        mag = np.where(escaped, (np.int64(1) << nbits) + raw + ESCAPE - 1, sym)
        nz = np.flatnonzero(mag)
        if self._spos + nz.size > self._signs.size:
            raise CodecError("entropy stream truncated (signs)")
        neg = self._signs[self._spos : self._spos + nz.size]
        self._spos += nz.size
        mag[nz[neg]] *= -1
        return mag
