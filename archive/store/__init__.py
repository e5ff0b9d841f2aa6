"""Content-addressed blob storage: pack files for new blobs, loose files of the older layout still read."""

from __future__ import annotations

from pathlib import Path

from archive.store.blobstore import BlobRef, BlobStore, FileBlobStore, fsync_dir, read_only_error, sha256_hex
from archive.store.packs import PackStore


class ArchiveStore:
    """The archive's store: new blobs are appended to packs; a ref without a pack is a loose file.

    Loose files are what archives written before packs hold; they keep reading
    and the garbage collector keeps collecting them, nothing converts them.
    """

    def __init__(self, root: Path, *, fsync: bool = True, max_pack_bytes: int | None = None,
                 read_only: bool = False) -> None:
        self.root = Path(root)
        self.read_only = read_only  # a mounted backup: reads work, nothing is created or written
        self.loose = FileBlobStore(self.root, fsync=fsync, read_only=read_only)
        packs_kwargs = {"max_pack_bytes": max_pack_bytes} if max_pack_bytes else {}
        self.packs = PackStore(self.root / "packs", fsync=fsync, read_only=read_only, **packs_kwargs)

    def put(self, data: bytes) -> BlobRef:
        if self.read_only:
            raise read_only_error()
        return self.packs.put(data)

    def sync(self) -> None:
        self.packs.sync()

    def make_durable(self, refs: list[BlobRef]) -> None:
        """Every blob in ``refs`` is durable when this returns, whichever process wrote it."""
        self.packs.sync_packs({ref.pack for ref in refs if ref.pack is not None})

    def get(self, ref: BlobRef) -> bytes:
        return self.packs.get(ref) if ref.pack is not None else self.loose.get(ref.digest)

    def exists(self, ref: BlobRef) -> bool:
        return self.packs.exists(ref) if ref.pack is not None else self.loose.exists(ref.digest)

    def close(self) -> None:
        self.packs.close()


__all__ = ["ArchiveStore", "BlobRef", "BlobStore", "FileBlobStore", "PackStore", "fsync_dir", "sha256_hex"]
