"""Content-addressed blob storage."""

from archive.store.blobstore import BlobStore, FileBlobStore, sha256_hex

__all__ = ["BlobStore", "FileBlobStore", "sha256_hex"]
