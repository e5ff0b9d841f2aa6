"""The content-addressed blob store on a real folder."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from archive.errors import BlobCorruptError, BlobNotFoundError
from archive.store.blobstore import FileBlobStore, sha256_hex

PAYLOADS = [b"", b"\x00", b"DICM" * 1000, os.urandom(70_000)]


@pytest.fixture
def store(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs")


@pytest.mark.parametrize("data", PAYLOADS, ids=["empty", "one-byte", "text", "random"])
def test_put_get_round_trip_and_content_address(store: FileBlobStore, data: bytes) -> None:
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest() == sha256_hex(data)
    assert store.get(digest) == data
    assert store.exists(digest)
    path = store.path_for(digest)
    assert path.read_bytes() == data
    assert path.relative_to(store.root).parts == (digest[:2], digest[2:4], digest)


def test_put_is_idempotent(store: FileBlobStore) -> None:
    data = b"same bytes twice"
    first = store.put(data)
    inode = store.path_for(first).stat().st_ino
    assert store.put(data) == first
    assert store.path_for(first).stat().st_ino == inode, "an existing blob is not rewritten"
    assert list(store.digests()) == [first]
    assert store.get(first) == data


def test_put_of_stored_content_refreshes_its_mtime(store: FileBlobStore) -> None:
    """The garbage collector's grace period runs from the last put: content about to be referenced is kept."""
    digest = store.put(b"referenced again later")
    path = store.path_for(digest)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    assert store.mtime(digest) == 1_000_000_000
    before = time.time()
    store.put(b"referenced again later")
    assert (store.mtime(digest) or 0) >= before - 1
    assert store.mtime(sha256_hex(b"never stored")) is None


def test_delete_if_older_deletes_only_old_blobs(store: FileBlobStore) -> None:
    old, young = store.put(b"old blob" * 10), store.put(b"young blob")
    os.utime(store.path_for(old), (1_000_000_000, 1_000_000_000))
    cutoff = time.time() - 3600
    assert store.delete_if_older(old, cutoff) == 80
    assert store.delete_if_older(young, cutoff) is None
    assert not store.exists(old) and store.get(young) == b"young blob"
    assert store.delete_if_older(old, cutoff) is None  # already gone
    assert [p.name for p in store.root.rglob(".*")] == []  # nothing left aside
    assert store.put(b"old blob" * 10) == old and store.get(old) == b"old blob" * 10  # put again after GC


def test_distinct_content_distinct_blobs(store: FileBlobStore) -> None:
    a, b = store.put(b"a"), store.put(b"b")
    assert a != b
    assert store.get(a) == b"a" and store.get(b) == b"b"


def test_flipped_byte_on_disk_is_an_error_never_wrong_bytes(store: FileBlobStore) -> None:
    data = bytes(range(256)) * 40
    digest = store.put(data)
    path = store.path_for(digest)
    raw = bytearray(path.read_bytes())
    raw[1234] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(BlobCorruptError, match=digest):
        store.get(digest)


def test_truncated_blob_on_disk_is_an_error(store: FileBlobStore) -> None:
    digest = store.put(b"0123456789" * 100)
    path = store.path_for(digest)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(BlobCorruptError):
        store.get(digest)


def test_put_again_repairs_a_corrupt_blob(store: FileBlobStore) -> None:
    """Re-archiving the same bytes must leave a readable blob, even when the copy on disk went bad."""
    data = b"pixel bytes " * 100
    digest = store.put(data)
    path = store.path_for(digest)
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(raw))
    store.put(data)
    assert store.get(digest) == data


def test_missing_blob_is_not_found(store: FileBlobStore) -> None:
    digest = sha256_hex(b"never stored")
    assert not store.exists(digest)
    with pytest.raises(BlobNotFoundError):
        store.get(digest)
    stored = store.put(b"stored then lost")
    store.path_for(stored).unlink()
    with pytest.raises(BlobNotFoundError):
        store.get(stored)


def test_delete(store: FileBlobStore) -> None:
    digest = store.put(b"to delete")
    store.delete(digest)
    assert not store.exists(digest)
    store.delete(digest)  # deleting what is gone is not an error
    with pytest.raises(BlobNotFoundError):
        store.get(digest)


def test_no_temporary_files_left_after_put(store: FileBlobStore) -> None:
    for data in PAYLOADS:
        store.put(data)
        store.put(data)
    files = [p for p in store.root.rglob("*") if p.is_file()]
    assert len(files) == len(PAYLOADS)
    assert all(p.name == sha256_hex(p.read_bytes()) for p in files)
    assert not [p for p in files if p.name.startswith(".")]


def test_digests_lists_exactly_what_was_put(store: FileBlobStore) -> None:
    assert list(store.digests()) == []  # root does not exist yet
    expected = {store.put(d) for d in PAYLOADS}
    (store.root / "ab" / "cd").mkdir(parents=True, exist_ok=True)
    (store.root / "ab" / "cd" / ".tmp-leftover").write_bytes(b"x")  # a crash leftover is not a blob
    assert set(store.digests()) == expected
    assert len(list(store.digests())) == len(expected)


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "..",
        "",
        "A" * 64,  # upper case is not how digests are written
        "0" * 63,
        "0" * 65,
        "0" * 62 + "/x",
        "0" * 63 + "\n",
        "0" * 64 + "\n",  # `$` matches before a final newline: the pattern must anchor at the very end
        "../" + "0" * 61,
        "g" * 64,
    ],
)
def test_path_for_rejects_non_digests(store: FileBlobStore, name: str) -> None:
    with pytest.raises(ValueError):
        store.path_for(name)
    with pytest.raises(ValueError):
        store.get(name)
    with pytest.raises(ValueError):
        store.delete(name)
