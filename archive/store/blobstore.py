"""Content-addressed blobs: a blob's name is the sha256 of its bytes, checked on every read.

:class:`BlobStore` is the contract every backend passes (tests/unit/store). New
blobs go to pack files (:mod:`archive.store.packs`); :class:`FileBlobStore`,
one file per blob, is the layout archives written before packs still read.

Writes are atomic (temporary file, fsync, rename, fsync of the folder) so a
crash leaves either the whole blob or nothing; every read re-hashes, so a
flipped bit on disk is an error, never wrong pixels.

A blob's modification time is the last time it was put: putting content that
is already stored refreshes it, so the garbage collector's grace period
protects content that is about to be referenced again.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from dataclasses import dataclass
from typing import Protocol

from archive.errors import ArchiveError, BlobCorruptError, BlobNotFoundError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class BlobRef:
    """Where a blob is: its digest and size, and for packed blobs the pack and the offset of its bytes.

    The catalog's ``blobs`` rows hold these; a reader needs nothing else.
    """

    digest: str
    size: int
    pack: str | None = None  # None: a loose file of the layout before packs
    offset: int | None = None


class BlobStore(Protocol):
    """What the services need from a store (a file system today, an object store tomorrow).

    ``put`` may buffer: a blob is durable once ``sync`` returns, and callers
    commit catalog rows that reference blobs only after that. ``get`` re-hashes
    what it reads and raises BlobNotFoundError / BlobCorruptError.
    """

    def put(self, data: bytes) -> BlobRef: ...

    def sync(self) -> None: ...

    def get(self, ref: BlobRef) -> bytes: ...

    def exists(self, ref: BlobRef) -> bool: ...


class FileBlobStore:
    """Blobs as files under ``root/ab/cd/abcd…`` (two fan-out levels): the layout before packs."""

    def __init__(self, root: Path, *, fsync: bool = True, read_only: bool = False) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.read_only = read_only

    def path_for(self, digest: str) -> Path:
        if not _HEX64.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.root / digest[:2] / digest[2:4] / digest

    def put(self, data: bytes) -> BlobRef:
        return BlobRef(self.put_digest(data), len(data))

    def sync(self) -> None:
        """Every put is durable when it returns (file and folder fsynced)."""

    def put_digest(self, data: bytes) -> str:
        if self.read_only:
            raise read_only_error()
        digest = sha256_hex(data)
        target = self.path_for(digest)
        try:
            if target.stat().st_size == len(data) and sha256_hex(target.read_bytes()) == digest:
                os.utime(target)  # about to be referenced again: restart the GC's grace period
                return digest  # already stored intact (a corrupt copy is rewritten below)
        except FileNotFoundError:
            pass  # not stored, or the garbage collector took it meanwhile: write it
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        if self.fsync:
            fsync_dir(target.parent)
        return digest

    def get(self, ref: BlobRef | str) -> bytes:
        digest = ref if isinstance(ref, str) else ref.digest
        path = self.path_for(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise BlobNotFoundError(f"blob {digest} is missing from {self.root}") from exc
        actual = sha256_hex(data)
        if actual != digest:
            raise BlobCorruptError(f"blob {digest} is corrupt: its content hashes to {actual}")
        return data

    def exists(self, ref: BlobRef | str) -> bool:
        return self.path_for(ref if isinstance(ref, str) else ref.digest).exists()

    def delete(self, digest: str) -> None:
        if self.read_only:
            raise read_only_error()
        self.path_for(digest).unlink(missing_ok=True)

    def digests(self) -> Iterator[str]:
        if not self.root.exists():
            return
        for path in self.root.glob("*/*/*"):
            if _HEX64.fullmatch(path.name):
                yield path.name

    def mtime(self, digest: str) -> float | None:
        """When the blob was last put (epoch seconds), or None when it is absent."""
        try:
            return self.path_for(digest).stat().st_mtime
        except FileNotFoundError:
            return None

    def delete_if_older(self, digest: str, cutoff: float) -> int | None:
        """Delete the blob unless it was put at or after ``cutoff`` (epoch seconds); returns the bytes freed.

        The file is first renamed aside and its age read there, so a ``put`` of
        the same content that races with the collector either refreshed the
        mtime before the rename (the file is put back) or finds no file and
        writes a new one: content about to be referenced is never lost.
        """
        if self.read_only:
            raise read_only_error()
        path = self.path_for(digest)
        aside = path.with_name(f".gc-{digest}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        info = aside.stat()
        if info.st_mtime >= cutoff:
            os.replace(aside, path)  # put again meanwhile: keep it (identical content if rewritten)
            return None
        aside.unlink()
        return info.st_size


def read_only_error() -> ArchiveError:
    return ArchiveError("the archive is open read-only: nothing can be stored in it or removed from it")


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in the folder ``path`` durable (given a file: make its bytes durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
