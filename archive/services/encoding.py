"""Encode and measure: the pipeline ingest and re-compression share.

Every frame is encoded, decoded again and compared with its original, so the
catalog records the error that was really made (and a "lossless" codec that
does not round-trip a frame is replaced by zstd for that frame).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from archive.codecs import Codec, decode_frame, get_codec, read_frame_header
from archive.errors import ArchiveError, ConfigError, QualityError
from archive.kinds import EncodingKind
from archive.services.metrics import ErrorStats


class RecentFrames:
    """Decoded frames of blobs this process has just written and verified, by blob digest (bounded, LRU).

    The normalization step of an ingest reads the series it has just
    stored; with the frames still in memory it need not read and decode them
    again. Blobs are content-addressed, so an entry is never stale. Off
    unless a caller that will read back turns it on (``enable``).
    """

    def __init__(self, max_bytes: int = 256 * 1024**2) -> None:
        self.max_bytes = max_bytes
        self.enabled = False
        self._frames: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0

    def enable(self, on: bool = True) -> None:
        self.enabled = on
        if not on:
            self._frames.clear()
            self._bytes = 0

    def put(self, digest: str, frame: np.ndarray) -> None:
        if not self.enabled or digest in self._frames or frame.nbytes > self.max_bytes:
            return
        self._frames[digest] = frame
        self._bytes += frame.nbytes
        while self._bytes > self.max_bytes:
            _, dropped = self._frames.popitem(last=False)
            self._bytes -= dropped.nbytes

    def get(self, digest: str) -> np.ndarray | None:
        frame = self._frames.get(digest)
        if frame is not None:
            self._frames.move_to_end(digest)
        return frame


RECENT_FRAMES = RecentFrames()


def archive_codec(config: Mapping[str, Any]) -> Codec:
    """The codec ingest stores originals with: it must be lossless (``auto`` chooses among lossless ones).

    Lossy representations come only from a re-compression policy, as derived
    series next to the original (see :mod:`archive.services.lossy`).
    """
    codec = get_codec(config)
    if not codec.lossless:
        raise ConfigError(f"the archive's codec must be lossless, not {codec.get_config()}: originals are kept "
                          "exactly; a lossy representation comes from a re-compression policy (see the README)")
    return codec


def pixel_hash(frames: Iterable[np.ndarray]) -> str:
    """The pixel hash of decoded frames: dtype and shape, then the C-ordered values (no copy when contiguous).

    Duplicate detection and re-compression both compare against it.
    """
    digest = hashlib.sha256()
    for frame in frames:
        frame = np.ascontiguousarray(frame)
        digest.update(f"{frame.dtype.str}{frame.shape}".encode())
        digest.update(frame.data)
    return digest.hexdigest()


def encode_frames(
    codec: Codec,
    frames: Sequence[np.ndarray],
    bits_stored: int,
    total_pixels: int,
    bytes_before: int,
    side_info: dict[str, Any],
    label: str,
    max_error: float | None = None,
    context: bytes | None = None,
    min_psnr: float | None = None,
    decoded: list[np.ndarray] | None = None,
) -> tuple[dict[str, Any], list[bytes]]:
    """Encode frames and decode each back to measure it; returns Encoding columns and the frame bytes.

    A lossless codec that does not round-trip a frame falls back to zstd
    rather than store wrong pixels. A lossy one that breaks its own promised
    bound, ``max_error`` or ``min_psnr`` raises :class:`QualityError`: the
    caller keeps the instance lossless and records why. ``context`` is the
    codec's side blob fitted on the series (see ``Codec.fit``). ``decoded``,
    when given, receives what each stored frame decodes to (no second decode).
    """
    fallback = get_codec({"id": "zstd"})
    promised = codec.max_error
    stats = ErrorStats(peak=float(2**bits_stored - 1))
    actual: Counter[str] = Counter()
    offsets: list[int] = []
    encoded: list[bytes] = []
    encode_s = decode_s = 0.0
    chosen: list[dict[str, Any]] = []
    for index, frame in enumerate(frames):
        t0 = time.perf_counter()
        data, stats_of_frame = codec.encode_with_stats(frame, context)
        t1 = time.perf_counter()
        back = decode_frame(data, context)
        t2 = time.perf_counter()
        encode_s += t1 - t0
        decode_s += t2 - t1
        exact = np.array_equal(back, frame)
        if codec.lossless and not exact:
            data = fallback.encode(frame)  # never keep a "lossless" frame that does not round-trip
            back = decode_frame(data)
            exact = np.array_equal(back, frame)
            if not exact:
                raise ArchiveError(f"frame {index} of {label} does not round-trip through zstd")
        stats.add(frame, back, exact=exact)
        if decoded is not None:
            decoded.append(back)
        if stats_of_frame:
            chosen.append(stats_of_frame)
        header = read_frame_header(data)
        actual[header.codec_id] += 1
        offsets.append(header.offset)
        encoded.append(data)
    measured = stats.max_abs_error or 0.0
    if promised is not None and measured > promised:
        raise QualityError(f"{label}: {codec.codec_id} promised a per-pixel error of at most {promised} and made "
                           f"{measured:g}")
    if max_error is not None and measured > max_error:
        raise QualityError(f"{label}: {codec.codec_id} error {measured:g} exceeds the bound {max_error:g}")
    if min_psnr is not None and stats.psnr is not None and stats.psnr < min_psnr:
        raise QualityError(f"{label}: {codec.codec_id} PSNR {stats.psnr:.2f} dB is below the floor {min_psnr:g} dB")
    side_info["value_offsets"] = offsets if len(offsets) <= 64 else {"min": min(offsets), "max": max(offsets)}
    if chosen:  # what the codec chose: components kept, variance explained, k, WCSS, bytes per part
        side_info["codec"] = chosen if len(chosen) <= 16 else {"frames": len(chosen), "first": chosen[0]}
    after = sum(len(d) for d in encoded)
    columns = dict(
        kind=EncodingKind.LOSSLESS if codec.lossless else EncodingKind.LOSSY,
        max_error_bound=promised,
        codec_id=codec.codec_id,
        codec_config=codec.get_config(),
        actual_codecs=dict(actual),
        library_versions=codec.library_versions(),
        side_info=side_info,
        num_frames=len(encoded),
        bytes_before=bytes_before,
        bytes_after=after,
        ratio=bytes_before / max(after, 1),
        bits_per_pixel=after * 8 / max(total_pixels, 1),
        mse=stats.mse,
        psnr=stats.psnr,
        psnr_range=stats.psnr_range,
        max_abs_error=stats.max_abs_error,
        encode_ms=encode_s * 1000,
        decode_ms=decode_s * 1000,
    )
    return columns, encoded
