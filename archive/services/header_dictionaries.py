"""zstd dictionaries for headers, trained on the archive's own headers of one modality and manufacturer.

Small MR instances are mostly header, and headers of one scanner repeat most
of their bytes; compressed with a dictionary of their kind they shrink
severalfold (see README). A dictionary is trained once enough headers of a
kind have been archived without one, kept only when it pays on those
samples (its own size included), stored as a content-addressed blob and
named by every instance whose header needs it: old headers keep decoding,
and the garbage collector and verify follow dictionaries like any blob.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import zstandard
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from archive.catalog.models import HeaderDictionary
from archive.errors import BlobCorruptError
from archive.services.blobs import read_blob, record_blobs
from archive.store import BlobRef, BlobStore
from archive.store.compression import compress_bytes, decompress_bytes

if TYPE_CHECKING:
    from archive.services.runtime import Archive
    from archive.services.staging import StagedInstance

MIN_SAMPLES = 16  # headers of one kind archived without a dictionary before one is trained
MAX_SAMPLE_BYTES = 4 * 1024**2  # the training set is cut here (a Siemens header is ~150 kB)
DICTIONARY_BYTES = 16 * 1024
REFRESH_SECONDS = 0.25  # how often a process looks for dictionaries trained elsewhere


def header_key(modality: str | None, manufacturer: str | None) -> str:
    return f"{(modality or '').strip().upper()}|{(manufacturer or '').strip()}"[:200]


class HeaderDictionaries:
    """Per process: compresses headers with their kind's newest dictionary, decompresses with the one named."""

    def __init__(self, session_factory: sessionmaker[Session], store: BlobStore, level: int) -> None:
        self.session_factory = session_factory
        self.store = store
        self.level = level
        self.refresh_seconds = REFRESH_SECONDS
        self._pid = os.getpid()
        self._current: dict[str, tuple[str, zstandard.ZstdCompressor]] = {}
        self._loaded_at = float("-inf")
        self._decompressors: dict[str, zstandard.ZstdDecompressor] = {}

    def compress(self, key: str, header: bytes, session: Session | None = None) -> tuple[bytes, str | None]:
        """The header blob's bytes and the digest of the dictionary they need (None: plain zstd).

        ``session`` serves the look-up of new dictionaries (else a short one is opened).
        """
        current = self._newest(session).get(key)
        if current is None:
            return compress_bytes(header, self.level), None
        digest, compressor = current
        return compressor.compress(header), digest

    def read_header(self, session: Session, header: BlobRef | str, dictionary: str | None) -> bytes:
        """An instance's header blob (a ref, or a digest the catalog locates), decompressed: Part 10 without pixels."""
        data = self.store.get(header) if isinstance(header, BlobRef) else read_blob(session, self.store, header)
        return self.decompress(session, data, dictionary)

    def decompress(self, session: Session, data: bytes, dictionary: str | None) -> bytes:
        if dictionary is None:
            return decompress_bytes(data)
        decompressor = self._decompressors.get(dictionary)
        if decompressor is None:
            raw = read_blob(session, self.store, dictionary)
            decompressor = zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(raw))
            self._decompressors[dictionary] = decompressor
        try:
            return decompressor.decompress(data)
        except zstandard.ZstdError as exc:
            raise BlobCorruptError(f"header blob cannot be decompressed with dictionary {dictionary}: {exc}") from exc

    def forget(self) -> None:
        """Look for new dictionaries on the next compress (after one was trained here)."""
        self._loaded_at = float("-inf")

    def _newest(self, session: Session | None) -> dict[str, tuple[str, zstandard.ZstdCompressor]]:
        if self._pid != os.getpid():  # forked: compressors are not shared with the parent
            self._pid, self._current, self._decompressors, self._loaded_at = os.getpid(), {}, {}, float("-inf")
        if time.monotonic() - self._loaded_at < self.refresh_seconds:
            return self._current
        if session is None:
            with self.session_factory() as own:
                self._load(own)
        else:
            self._load(session)
        self._loaded_at = time.monotonic()
        return self._current

    def _load(self, session: Session) -> None:
        rows = session.execute(select(HeaderDictionary.key, HeaderDictionary.blob_sha256)
                               .order_by(HeaderDictionary.id)).all()
        newest = {key: digest for key, digest in rows}  # the last trained wins
        for key, digest in newest.items():
            if key not in self._current or self._current[key][0] != digest:
                raw = zstandard.ZstdCompressionDict(read_blob(session, self.store, digest))
                self._current[key] = (digest, zstandard.ZstdCompressor(level=self.level, dict_data=raw))


def train(session: Session, store: BlobStore, key: str, samples: Sequence[BlobRef], level: int) -> HeaderDictionary | None:
    """Train a dictionary on plain-compressed header blobs of one kind; add its rows when it pays (caller commits).

    The dictionary blob is made durable before its rows are added. Returns
    None when there are too few samples or the dictionary would not pay.
    """
    if len(samples) < MIN_SAMPLES:
        return None
    headers: list[bytes | bytearray | memoryview] = []
    plain = total = 0  # the samples are plain-compressed blobs: their sizes are what no dictionary costs
    for ref in samples:  # staged, maybe not committed yet: read where staging put them
        header = decompress_bytes(store.get(ref))
        if total + len(header) > MAX_SAMPLE_BYTES and len(headers) >= MIN_SAMPLES:
            break
        headers.append(header)
        total += len(header)
        plain += ref.size
    try:
        trained = zstandard.train_dictionary(DICTIONARY_BYTES, headers, level=level)
    except zstandard.ZstdError:
        return None  # too little material to learn from
    raw = trained.as_bytes()
    compressor = zstandard.ZstdCompressor(level=level, dict_data=trained)
    with_dictionary = sum(len(compressor.compress(h)) for h in headers)
    if with_dictionary + len(raw) >= plain:
        return None  # does not pay even on the headers it was trained on
    ref = store.put(raw)
    store.sync()
    record_blobs(session, [ref])
    row = HeaderDictionary(key=key, blob_sha256=ref.digest, samples=len(headers), bytes_plain=plain,
                           bytes_with=with_dictionary)
    session.add(row)
    session.flush()
    return row


def keys_with_dictionaries(session: Session) -> set[str]:
    return set(session.scalars(select(HeaderDictionary.key).distinct()))


class SampleCollector:
    """Headers archived without a dictionary, by kind, until there are enough to train one."""

    def __init__(self) -> None:
        self.samples: dict[str, list[BlobRef]] = {}
        self.tried: set[str] = set()

    def add(self, staged: Iterable[StagedInstance]) -> None:
        for item in staged:
            if item.header_dictionary is None and item.frames_or_pixels and item.header_key not in self.tried:
                self.samples.setdefault(item.header_key, []).append(item.header)

    def train_ready(self, archive: Archive) -> list[HeaderDictionary]:
        """Train a dictionary for every kind with enough samples and none yet; each kind is tried once."""
        ready = [key for key, refs in self.samples.items() if len(refs) >= MIN_SAMPLES and key not in self.tried]
        if not ready:
            return []
        trained: list[HeaderDictionary] = []
        with archive.unit_of_work() as uow:
            existing = keys_with_dictionaries(uow.session)
            for key in ready:
                self.tried.add(key)
                refs = self.samples.pop(key)
                if key in existing:
                    continue
                row = train(uow.session, uow.store, key, refs, archive.settings.header_zstd_level)
                if row is not None:
                    trained.append(row)
            uow.commit()
        if trained:
            archive.headers.forget()
        return trained
