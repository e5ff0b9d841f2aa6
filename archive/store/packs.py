"""Blobs appended to pack files: few, full files instead of one small file per header and per frame.

Each writing process appends to a pack of its own (``packs/<time>-<pid>-<random>.pack``),
holding an exclusive ``flock`` on it for as long as it may append; a pack nobody
holds is sealed and is never written again. A record is a small header (magic,
sha256, length) followed by the blob's bytes, so a pack can be scanned without
the catalog, and a blob is read with one ranged read whose content is re-hashed:
a flipped bit is an error, never wrong pixels.

Durability is per batch, not per blob: ``sync`` fsyncs the pack (and its folder
when the pack is new) and callers commit the catalog rows that reference the
blobs only after it. A crash before ``sync`` leaves records nobody references;
compaction (driven by the garbage collector) copies the live records of a
sealed pack into a new one and retires the old file, so space released by
re-compression and GC comes back.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from archive.errors import BlobCorruptError, BlobNotFoundError
from archive.store.blobstore import BlobRef, fsync_dir, read_only_error

PACK_MAGIC = b"MAPACK01"  # first 8 bytes of every pack
RECORD_MAGIC = b"MABR"  # then records: magic, sha256 (32 raw bytes), length (8, little endian), data
RECORD_HEADER = len(RECORD_MAGIC) + 32 + 8
DEFAULT_MAX_PACK_BYTES = 256 * 1024**2
_PACK_NAME = re.compile(r"^[0-9A-Za-z_-]{1,48}\.pack$")
_RETIRED = re.compile(r"^(?P<name>[0-9A-Za-z_-]{1,48}\.pack)\.retired-(?P<at>\d+)$")


@dataclass(frozen=True)
class PackInfo:
    name: str
    size: int
    mtime: float


@dataclass(frozen=True)
class PackRecord:
    digest: str
    offset: int  # of the data, after the record header
    size: int


class PackStore:
    """Append-only pack files under ``root``; one open pack per writing process."""

    def __init__(self, root: Path, *, fsync: bool = True, max_pack_bytes: int = DEFAULT_MAX_PACK_BYTES,
                 read_only: bool = False) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.read_only = read_only  # reads only: no pack is created, appended to, retired or purged
        self.max_pack_bytes = max_pack_bytes
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._fd: int | None = None
        self._name = ""
        self._size = 0
        self._dirty = False
        self._new_pack = False
        self._dir_synced: set[str] = set()  # packs of other processes whose folder entry this one made durable
        _STORES.add(self)

    # ------------------------------------------------------------------ writing

    def put(self, data: bytes) -> BlobRef:
        """Append ``data``; durable once :meth:`sync` returns."""
        if self.read_only:
            raise read_only_error()
        digest = hashlib.sha256(data).digest()
        with self._lock:
            fd = self._writer(len(data))
            header = RECORD_MAGIC + digest + len(data).to_bytes(8, "little")
            offset = self._size + len(header)
            try:
                _write_all(fd, header + data if len(data) < 65536 else header)
                if len(data) >= 65536:
                    _write_all(fd, data)
            except BaseException:
                self._drop_torn_record(fd)
                raise
            self._size = offset + len(data)
            self._dirty = True
            return BlobRef(digest.hex(), len(data), self._name, offset)

    def sync(self) -> None:
        """Make every put so far durable (one fsync of the pack, plus its folder when the pack is new)."""
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                return
            if self._dirty and self.fsync:
                os.fsync(self._fd)
            if self._new_pack and self.fsync:
                fsync_dir(self.root)
            self._dirty = self._new_pack = False

    def sync_packs(self, names: set[str]) -> None:
        """Make packs other processes wrote durable (fsync works on any descriptor of the file).

        The ingest writer calls this for the packs of its staging processes
        before it commits the rows that reference them.
        """
        own = self._name if self._fd is not None and self._pid == os.getpid() else None
        if own in names:
            self.sync()
        others = sorted(n for n in names if n != own)
        if not others or not self.fsync:
            return
        for name in others:
            fd = os.open(self._path(name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        unseen = [n for n in others if n not in self._dir_synced]
        if unseen:
            fsync_dir(self.root)
            self._dir_synced.update(unseen)

    def close(self) -> None:
        """Seal the current pack (after making it durable)."""
        self.sync()
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)  # releases the flock: the pack is sealed
            self._fd = None

    def _drop_torn_record(self, fd: int) -> None:
        """A write failed part way (a full disk): cut the torn record off, or never append to this pack again.

        Offsets are computed from ``self._size``, so appending after a torn
        record would hand out locations that point into it.
        """
        try:
            os.ftruncate(fd, self._size)
            return
        except OSError:
            pass
        try:
            if self.fsync:
                os.fsync(fd)  # the records before the torn one stay durable for sync_packs / readers
        except OSError:
            pass
        os.close(fd)  # sealed with a torn tail (records() stops there); the next put opens a new pack
        self._fd = None
        if self._new_pack and self.fsync:
            try:
                fsync_dir(self.root)
            except OSError:
                pass
        self._dirty = self._new_pack = False

    def _writer(self, incoming: int) -> int:
        if self._pid != os.getpid():  # a forked child must not append to its parent's pack
            self._pid, self._fd, self._dirty, self._new_pack = os.getpid(), None, False, False
        if (self._fd is not None and self._size + RECORD_HEADER + incoming > self.max_pack_bytes
                and self._size > len(PACK_MAGIC)):
            if self.fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._fd is None:
            self.root.mkdir(parents=True, exist_ok=True)
            name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{secrets.token_hex(4)}.pack"
            # created under a name compaction never lists, locked, then renamed: no moment in which
            # the garbage collector could take an unlocked new pack for a sealed one
            creating = self.root / f".creating-{name}"
            fd = os.open(creating, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)  # held while this process may append
            _write_all(fd, PACK_MAGIC)
            os.rename(creating, self.root / name)
            self._fd, self._name, self._size, self._new_pack, self._dirty = fd, name, len(PACK_MAGIC), True, True
        return self._fd

    # ------------------------------------------------------------------ reading

    def get(self, ref: BlobRef) -> bytes:
        if ref.pack is None or ref.offset is None:
            raise BlobNotFoundError(f"blob {ref.digest} has no pack location")
        try:
            fd = os.open(self._path(ref.pack), os.O_RDONLY)
        except FileNotFoundError:
            fd = self._open_retired(ref)  # compacted after the caller read the location: still readable
        try:
            data = os.pread(fd, ref.size, ref.offset) if ref.size else b""
        finally:
            os.close(fd)
        if len(data) != ref.size:
            raise BlobCorruptError(f"blob {ref.digest}: pack {ref.pack} ends before its {ref.size} bytes at {ref.offset}")
        actual = hashlib.sha256(data).hexdigest()
        if actual != ref.digest:
            raise BlobCorruptError(f"blob {ref.digest} is corrupt in pack {ref.pack}: its content hashes to {actual}")
        return data

    def _open_retired(self, ref: BlobRef) -> int:
        assert ref.pack is not None
        for entry in sorted(self.root.glob(f"{ref.pack}.retired-*")):
            try:
                return os.open(entry, os.O_RDONLY)
            except FileNotFoundError:
                continue
        raise BlobNotFoundError(f"blob {ref.digest}: pack {ref.pack} is missing from {self.root}")

    def exists(self, ref: BlobRef) -> bool:
        """Whether the pack holds the blob's whole range (a retired copy counts, as it does for :meth:`get`)."""
        if ref.pack is None or ref.offset is None:
            return False
        candidates = [self._path(ref.pack), *sorted(self.root.glob(f"{ref.pack}.retired-*"))]
        for path in candidates:
            try:
                return path.stat().st_size >= ref.offset + ref.size
            except FileNotFoundError:
                continue
        return False

    # ------------------------------------------------------------------ maintenance (garbage collector)

    def packs(self) -> list[PackInfo]:
        """Every live pack file, oldest name first."""
        if not self.root.exists():
            return []
        found = []
        for entry in os.scandir(self.root):
            if _PACK_NAME.fullmatch(entry.name):
                info = entry.stat()
                found.append(PackInfo(entry.name, info.st_size, info.st_mtime))
        return sorted(found, key=lambda p: p.name)

    def records(self, name: str) -> Iterator[PackRecord]:
        """Scan a pack's records (a torn record at the end of a crashed writer's pack ends the scan)."""
        with open(self._path(name), "rb") as handle:
            if handle.read(len(PACK_MAGIC)) != PACK_MAGIC:
                raise BlobCorruptError(f"pack {name} does not start with {PACK_MAGIC!r}")
            end = os.fstat(handle.fileno()).st_size
            position = len(PACK_MAGIC)
            while True:
                header = handle.read(RECORD_HEADER)
                if len(header) < RECORD_HEADER or not header.startswith(RECORD_MAGIC):
                    return
                size = int.from_bytes(header[36:44], "little")
                if position + RECORD_HEADER + size > end:
                    return  # the header made it to disk, not all of the data
                yield PackRecord(header[4:36].hex(), position + RECORD_HEADER, size)
                position += RECORD_HEADER + size
                handle.seek(position)

    @contextmanager
    def sealed(self, name: str) -> Iterator[bool]:
        """Hold a sealed pack against writers; yields False when a live process still appends to it."""
        try:
            fd = os.open(self._path(name), os.O_RDONLY)
        except FileNotFoundError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def retire(self, name: str, now: float | None = None) -> None:
        """Set a compacted pack aside; :meth:`purge_retired` deletes it once no reader can still use it."""
        if self.read_only:
            raise read_only_error()
        at = int(now if now is not None else time.time())
        os.replace(self._path(name), self.root / f"{name}.retired-{at}")
        if self.fsync:
            fsync_dir(self.root)

    def purge_retired(self, cutoff: float) -> int:
        """Delete retired packs set aside before ``cutoff``; returns the bytes freed."""
        if self.read_only:
            raise read_only_error()
        freed = 0
        if not self.root.exists():
            return 0
        for entry in os.scandir(self.root):
            match = _RETIRED.fullmatch(entry.name)
            if match and int(match["at"]) < cutoff:
                freed += entry.stat().st_size
                os.unlink(entry.path)
        return freed

    def retired_bytes(self) -> int:
        if not self.root.exists():
            return 0
        return sum(e.stat().st_size for e in os.scandir(self.root) if _RETIRED.fullmatch(e.name))

    def _path(self, name: str) -> Path:
        if not _PACK_NAME.fullmatch(name):
            raise ValueError(f"not a pack name: {name!r}")
        return self.root / name


_STORES: weakref.WeakSet[PackStore] = weakref.WeakSet()


def _forget_parent_packs() -> None:
    """In a forked child: close the copies of the parent's pack descriptors (the parent keeps its locks)."""
    for store in list(_STORES):
        if store._fd is not None:
            try:
                os.close(store._fd)
            except OSError:
                pass
        store._fd, store._dirty, store._new_pack = None, False, False
        store._pid = os.getpid()
        store._lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_parent_packs)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
