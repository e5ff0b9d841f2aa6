"""The blob store on a real folder.

First the contract every backend passes (``put(data) -> BlobRef``, ``sync``,
``get(ref)``, ``exists(ref)``), run against the pack store, the archive's store
(packs plus the older loose layout) and the loose one-file-per-blob store.
Then what is particular to each: the loose layout's digest-named files, and
the pack files (scan, seal, retire, roll over, fork).
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from archive.errors import ArchiveError, BlobCorruptError, BlobNotFoundError
from archive.store import ArchiveStore, BlobRef, BlobStore
from archive.store import packs as packs_module
from archive.store.blobstore import FileBlobStore, sha256_hex
from archive.store.packs import PACK_MAGIC, RECORD_HEADER, RECORD_MAGIC, PackRecord, PackStore

PAYLOADS = [b"", b"\x00", b"DICM" * 1000, os.urandom(70_000)]
PAYLOAD_IDS = ["empty", "one-byte", "text", "random"]

BACKENDS: dict[str, Callable[[Path], Any]] = {
    "packs": lambda root: PackStore(root),
    "archive": lambda root: ArchiveStore(root),
    "loose": lambda root: FileBlobStore(root),
}

fork_only = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")


def _close(store: Any) -> None:
    if hasattr(store, "close"):
        store.close()


def _pack_store(store: Any) -> PackStore | None:
    if isinstance(store, ArchiveStore):
        return store.packs
    return store if isinstance(store, PackStore) else None


def _on_disk(store: Any, ref: BlobRef) -> tuple[Path, int]:
    """The file holding a blob's bytes and where they start in it."""
    packs = _pack_store(store)
    if packs is None or ref.pack is None:
        loose = store.loose if isinstance(store, ArchiveStore) else store
        assert isinstance(loose, FileBlobStore)
        return loose.path_for(ref.digest), 0
    assert ref.offset is not None
    return packs.root / ref.pack, ref.offset


def _payload(rng: random.Random, i: int) -> bytes:
    return f"blob {i}:".encode() + rng.randbytes(rng.choice([0, 1, 17, 500, 4096, 65_536, 70_000]))


# ====================================================================== the contract, every backend


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(backend: str) -> Iterator[Callable[[Path], BlobStore]]:
    opened: list[Any] = []

    def factory(root: Path) -> BlobStore:
        store = BACKENDS[backend](root)
        opened.append(store)
        return store  # type: ignore[no-any-return]

    yield factory
    for store in opened:
        _close(store)


@pytest.fixture
def store(make: Callable[[Path], BlobStore], tmp_path: Path) -> BlobStore:
    return make(tmp_path / "blobs")


@pytest.mark.parametrize("data", PAYLOADS, ids=PAYLOAD_IDS)
def test_round_trip_and_content_address(store: BlobStore, data: bytes) -> None:
    ref = store.put(data)
    assert ref.digest == hashlib.sha256(data).hexdigest() == sha256_hex(data) and ref.size == len(data)
    store.sync()
    assert store.get(ref) == data
    assert store.exists(ref)


def test_distinct_content_distinct_refs_and_same_content_reads_from_either_ref(store: BlobStore) -> None:
    a, b = store.put(b"a"), store.put(b"b")
    again = store.put(b"a")
    store.sync()
    assert a.digest != b.digest and again.digest == a.digest
    assert store.get(a) == store.get(again) == b"a" and store.get(b) == b"b"


def test_many_blobs_each_read_alone(store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of blobs, read back one at a time in any order; from a pack with one ranged read each."""
    rng = random.Random(7)
    stored = [(store.put(data), data) for data in (_payload(rng, i) for i in range(300))]
    store.sync()
    reads: list[tuple[int, int]] = []
    real_pread = os.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        reads.append((length, offset))
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    rng.shuffle(stored)
    for ref, data in stored:
        reads.clear()
        assert store.get(ref) == data
        if _pack_store(store) is not None:
            assert reads == [(ref.size, ref.offset)], "one ranged read of exactly the blob's bytes"


def test_flipped_byte_on_disk_is_an_error_never_wrong_bytes(store: BlobStore) -> None:
    data = bytes(range(256)) * 40
    neighbour = store.put(b"the blob before")
    ref = store.put(data)
    after = store.put(b"the blob after")
    store.sync()
    path, offset = _on_disk(store, ref)
    with open(path, "r+b") as handle:
        handle.seek(offset + 1234)
        byte = handle.read(1)
        handle.seek(offset + 1234)
        handle.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(BlobCorruptError, match=ref.digest):
        store.get(ref)
    assert store.get(neighbour) == b"the blob before" and store.get(after) == b"the blob after"


def test_truncated_file_is_an_error(store: BlobStore) -> None:
    ref = store.put(b"0123456789" * 100)
    store.sync()
    path, offset = _on_disk(store, ref)
    os.truncate(path, offset + ref.size - 1)
    with pytest.raises(BlobCorruptError, match=ref.digest):
        store.get(ref)


def test_missing_blob_is_not_found(store: BlobStore, make: Callable[[Path], BlobStore], tmp_path: Path) -> None:
    elsewhere = make(tmp_path / "another-root")
    never_here = elsewhere.put(b"stored in another store only")
    elsewhere.sync()
    assert not store.exists(never_here)
    with pytest.raises(BlobNotFoundError):
        store.get(never_here)

    lost = store.put(b"stored then lost")
    store.sync()
    _on_disk(store, lost)[0].unlink()
    assert not store.exists(lost)
    with pytest.raises(BlobNotFoundError):
        store.get(lost)


def test_after_sync_a_new_store_on_the_same_folder_reads_everything(
        store: BlobStore, make: Callable[[Path], BlobStore], tmp_path: Path) -> None:
    rng = random.Random(11)
    stored = [(store.put(data), data) for data in [*PAYLOADS, *(_payload(rng, i) for i in range(40))]]
    store.sync()  # the writer is still open: nothing relies on closing it
    reader = make(tmp_path / "blobs")
    for ref, data in stored:
        assert reader.exists(ref) and reader.get(ref) == data


def _write_in_child(backend: str, root: str, seed: int, barrier: Any, queue: Any) -> None:
    store = BACKENDS[backend](Path(root))
    rng = random.Random(seed)
    barrier.wait()  # both processes write at the same time
    refs = []
    for i in range(60):
        data = b"shared content, put by both" if i % 10 == 0 else _payload(rng, i)
        refs.append((store.put(data), data))
    store.sync()
    queue.put(refs)  # the process then exits without closing: its exit seals its pack


@fork_only
def test_two_processes_writing_at_once_each_get_their_own_pack(
        backend: str, make: Callable[[Path], BlobStore], tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    context = multiprocessing.get_context("fork")
    barrier, queue = context.Barrier(2, timeout=30), context.Queue()
    children = [context.Process(target=_write_in_child, args=(backend, str(root), seed, barrier, queue))
                for seed in (1, 2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    reader = make(root)
    for refs in results:
        for ref, data in refs:
            assert reader.get(ref) == data
    if backend != "loose":
        names = [{ref.pack for ref, _ in refs} for refs in results]
        assert all(len(n) == 1 for n in names) and names[0] != names[1], names
        packs = _pack_store(reader)
        assert packs is not None and {p.name for p in packs.packs()} == names[0] | names[1]


# ====================================================================== the loose layout (archives before packs)


@pytest.fixture
def loose(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs")


@pytest.mark.parametrize("data", PAYLOADS, ids=PAYLOAD_IDS)
def test_loose_path_layout(loose: FileBlobStore, data: bytes) -> None:
    digest = loose.put_digest(data)
    assert digest == sha256_hex(data) and loose.get(digest) == data and loose.exists(digest)
    path = loose.path_for(digest)
    assert path.read_bytes() == data
    assert path.relative_to(loose.root).parts == (digest[:2], digest[2:4], digest)
    assert loose.put(data) == BlobRef(digest, len(data))  # the contract's ref: no pack, no offset


def test_loose_put_is_idempotent(loose: FileBlobStore) -> None:
    data = b"same bytes twice"
    first = loose.put_digest(data)
    inode = loose.path_for(first).stat().st_ino
    assert loose.put_digest(data) == first
    assert loose.path_for(first).stat().st_ino == inode, "an existing blob is not rewritten"
    assert list(loose.digests()) == [first]


def test_loose_put_of_stored_content_refreshes_its_mtime(loose: FileBlobStore) -> None:
    """The garbage collector's grace period runs from the last put: content about to be referenced is kept."""
    digest = loose.put_digest(b"referenced again later")
    os.utime(loose.path_for(digest), (1_000_000_000, 1_000_000_000))
    assert loose.mtime(digest) == 1_000_000_000
    before = time.time()
    loose.put_digest(b"referenced again later")
    assert (loose.mtime(digest) or 0) >= before - 1
    assert loose.mtime(sha256_hex(b"never stored")) is None


def test_loose_delete_if_older_deletes_only_old_blobs(loose: FileBlobStore) -> None:
    old, young = loose.put_digest(b"old blob" * 10), loose.put_digest(b"young blob")
    os.utime(loose.path_for(old), (1_000_000_000, 1_000_000_000))
    cutoff = time.time() - 3600
    assert loose.delete_if_older(old, cutoff) == 80
    assert loose.delete_if_older(young, cutoff) is None
    assert not loose.exists(old) and loose.get(young) == b"young blob"
    assert loose.delete_if_older(old, cutoff) is None  # already gone
    assert [p.name for p in loose.root.rglob(".*")] == []  # nothing left aside
    assert loose.put_digest(b"old blob" * 10) == old and loose.get(old) == b"old blob" * 10  # put again after GC


def test_loose_put_again_repairs_a_corrupt_blob(loose: FileBlobStore) -> None:
    """Re-archiving the same bytes must leave a readable blob, even when the copy on disk went bad."""
    data = b"pixel bytes " * 100
    digest = loose.put_digest(data)
    path = loose.path_for(digest)
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(raw))
    with pytest.raises(BlobCorruptError):
        loose.get(digest)
    loose.put_digest(data)
    assert loose.get(digest) == data


def test_loose_delete(loose: FileBlobStore) -> None:
    digest = loose.put_digest(b"to delete")
    loose.delete(digest)
    assert not loose.exists(digest)
    loose.delete(digest)  # deleting what is gone is not an error
    with pytest.raises(BlobNotFoundError):
        loose.get(digest)


def test_loose_no_temporary_files_left_after_put(loose: FileBlobStore) -> None:
    for data in PAYLOADS:
        loose.put_digest(data)
        loose.put_digest(data)
    files = [p for p in loose.root.rglob("*") if p.is_file()]
    assert len(files) == len(PAYLOADS)
    assert all(p.name == sha256_hex(p.read_bytes()) for p in files)


def test_loose_digests_lists_exactly_what_was_put(loose: FileBlobStore) -> None:
    assert list(loose.digests()) == []  # root does not exist yet
    expected = {loose.put_digest(d) for d in PAYLOADS}
    (loose.root / "ab" / "cd").mkdir(parents=True, exist_ok=True)
    (loose.root / "ab" / "cd" / ".tmp-leftover").write_bytes(b"x")  # a crash leftover is not a blob
    assert set(loose.digests()) == expected
    assert len(list(loose.digests())) == len(expected)


def test_loose_digests_ignore_the_packs_folder_beside_them(tmp_path: Path) -> None:
    archive_store = ArchiveStore(tmp_path / "blobs")
    packed = archive_store.put(b"packed")
    archive_store.close()
    assert packed.pack is not None and list(archive_store.loose.digests()) == []


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
def test_loose_path_for_rejects_non_digests(loose: FileBlobStore, name: str) -> None:
    with pytest.raises(ValueError):
        loose.path_for(name)
    with pytest.raises(ValueError):
        loose.get(name)
    with pytest.raises(ValueError):
        loose.delete(name)


# ====================================================================== pack files


@pytest.fixture
def packs(tmp_path: Path) -> Iterator[PackStore]:
    store = PackStore(tmp_path / "packs")
    yield store
    store.close()


def _records(store: PackStore, name: str) -> list[PackRecord]:
    return list(store.records(name))


def test_records_scan_what_was_put(packs: PackStore) -> None:
    refs = [packs.put(data) for data in PAYLOADS]
    packs.sync()
    (name,) = {ref.pack for ref in refs}
    assert name is not None
    assert _records(packs, name) == [PackRecord(r.digest, r.offset or 0, r.size) for r in refs]
    (info,) = packs.packs()
    assert info.name == name and info.size == (packs.root / name).stat().st_size
    assert info.size == len(PACK_MAGIC) + sum(RECORD_HEADER + len(d) for d in PAYLOADS)


def test_records_stop_at_a_torn_tail_and_refuse_a_foreign_file(packs: PackStore) -> None:
    refs = [packs.put(b"whole record %d" % i) for i in range(3)]
    packs.close()
    name = refs[0].pack
    assert name is not None
    expected = _records(packs, name)
    with open(packs.root / name, "ab") as handle:  # a crashed writer: header written, data cut short
        handle.write(RECORD_MAGIC + hashlib.sha256(b"x" * 1000).digest() + (1000).to_bytes(8, "little") + b"x" * 10)
    assert _records(packs, name) == expected
    with open(packs.root / name, "r+b") as handle:  # only part of a header
        handle.truncate(expected[-1].offset + expected[-1].size + 7)
    assert _records(packs, name) == expected
    foreign = packs.root / "20000101T000000-1-deadbeef.pack"
    foreign.write_bytes(b"not a pack at all")
    with pytest.raises(BlobCorruptError):
        _records(packs, foreign.name)


def test_a_pack_a_live_writer_holds_is_not_sealed_and_a_closed_one_is(packs: PackStore) -> None:
    ref = packs.put(b"appended by a live writer")
    packs.sync()
    assert ref.pack is not None
    observer = PackStore(packs.root)  # another process, as far as flock is concerned (another open file)
    with observer.sealed(ref.pack) as sealed:
        assert sealed is False
    with packs.sealed(ref.pack) as sealed:  # the writer's own store does not see its pack as sealed either
        assert sealed is False
    packs.close()
    with observer.sealed(ref.pack) as sealed:
        assert sealed is True
    with observer.sealed("20000101T000000-1-deadbeef.pack") as sealed:  # absent
        assert sealed is False
    assert observer.get(ref) == b"appended by a live writer"


def _hold_a_pack(root: str, queue: Any, release: Any) -> None:
    store = PackStore(Path(root))
    ref = store.put(b"held by another process")
    store.sync()
    queue.put(ref)
    release.wait(30)  # exits without closing: the kernel releases the flock


@fork_only
def test_a_pack_is_sealed_once_its_writing_process_exits(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    queue, release = context.Queue(), context.Event()
    child = context.Process(target=_hold_a_pack, args=(str(tmp_path / "packs"), queue, release))
    child.start()
    ref: BlobRef = queue.get(timeout=30)
    observer = PackStore(tmp_path / "packs")
    assert ref.pack is not None
    with observer.sealed(ref.pack) as sealed:
        assert sealed is False
    release.set()
    child.join(30)
    assert child.exitcode == 0
    with observer.sealed(ref.pack) as sealed:
        assert sealed is True
    assert observer.get(ref) == b"held by another process"


def test_a_retired_pack_still_reads_until_it_is_purged(packs: PackStore) -> None:
    stored = [(packs.put(data), data) for data in PAYLOADS]
    packs.close()
    name = stored[0][0].pack
    assert name is not None
    size = (packs.root / name).stat().st_size
    packs.retire(name, now=1_000)
    assert packs.packs() == [] and packs.retired_bytes() == size
    for reader in (packs, PackStore(packs.root)):  # a reader that looked the location up before compaction
        for ref, data in stored:
            assert reader.exists(ref) and reader.get(ref) == data
    assert packs.purge_retired(1_000) == 0  # retired at the cutoff: not yet
    assert packs.get(stored[0][0]) == PAYLOADS[0]
    assert packs.purge_retired(1_001) == size
    assert packs.retired_bytes() == 0 and list(packs.root.iterdir()) == []
    for ref, _ in stored:
        assert not packs.exists(ref)
        with pytest.raises(BlobNotFoundError):
            packs.get(ref)


def test_the_pack_rolls_over_at_max_pack_bytes(tmp_path: Path) -> None:
    store = PackStore(tmp_path / "packs", max_pack_bytes=1000)
    stored = [(store.put(bytes([i]) * 300), bytes([i]) * 300) for i in range(10)]
    big = store.put(b"B" * 5000)  # larger than a pack: a pack of its own
    after = store.put(b"small after big")
    store.sync()
    names = [ref.pack for ref, _ in stored]
    assert len(set(names)) == 5 and names == sorted(names, key=names.index)  # two 300-byte records a pack
    assert big.pack not in names and after.pack not in {*names, big.pack}
    infos = {info.name: info.size for info in store.packs()}
    assert set(infos) == {*names, big.pack, after.pack}
    assert all(size <= 1000 for name, size in infos.items() if name != big.pack)
    assert [r.digest for r in store.records(big.pack or "")] == [big.digest]
    observer = PackStore(store.root)
    for name in {*names, big.pack}:  # rolled over: sealed and durable
        with observer.sealed(name or "") as sealed:
            assert sealed is True
    with observer.sealed(after.pack or "") as sealed:
        assert sealed is False
    for ref, data in [*stored, (big, b"B" * 5000), (after, b"small after big")]:
        assert observer.get(ref) == data
    store.close()


def _put_in_forked_child(store: PackStore, queue: Any) -> None:
    store.sync()  # the parent's unsynced pack is not the child's to touch
    ref = store.put(b"written by the child")
    store.sync()
    queue.put(ref)
    store.close()


@fork_only
def test_a_forked_child_never_appends_to_its_parents_pack(packs: PackStore) -> None:
    before = packs.put(b"parent, before the fork")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_put_in_forked_child, args=(packs, queue))
    child.start()
    child_ref: BlobRef = queue.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    after = packs.put(b"parent, after the fork")
    packs.sync()
    assert child_ref.pack != before.pack and after.pack == before.pack and before.pack is not None
    assert after.offset == (before.offset or 0) + before.size + RECORD_HEADER
    assert [r.digest for r in packs.records(before.pack)] == [before.digest, after.digest]
    assert [r.digest for r in packs.records(child_ref.pack or "")] == [child_ref.digest]
    assert packs.get(child_ref) == b"written by the child"
    assert packs.get(before) == b"parent, before the fork" and packs.get(after) == b"parent, after the fork"


def test_a_write_that_fails_part_way_leaves_no_torn_record(packs: PackStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk mid-record: the torn bytes are cut off, so the next blobs' offsets stay right."""
    first = packs.put(b"before the full disk")
    real_write_all = packs_module._write_all

    def half_then_full(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packs_module, "_write_all", half_then_full)
    with pytest.raises(OSError):
        packs.put(b"x" * 5000)
    monkeypatch.setattr(packs_module, "_write_all", real_write_all)
    second = packs.put(b"after space was freed")
    packs.sync()
    assert second.pack == first.pack and second.offset == (first.offset or 0) + first.size + RECORD_HEADER
    assert packs.get(first) == b"before the full disk" and packs.get(second) == b"after space was freed"
    assert [r.digest for r in packs.records(first.pack or "")] == [first.digest, second.digest]


def test_a_torn_record_that_cannot_be_cut_off_seals_the_pack(packs: PackStore, monkeypatch: pytest.MonkeyPatch) -> None:
    first = packs.put(b"before the failing disk")

    def half_then_fail(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.EIO, "Input/output error")

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    real_write_all = packs_module._write_all
    monkeypatch.setattr(packs_module, "_write_all", half_then_fail)
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    with pytest.raises(OSError):
        packs.put(b"y" * 5000)
    monkeypatch.setattr(packs_module, "_write_all", real_write_all)
    second = packs.put(b"in a new pack")
    packs.sync()
    assert second.pack != first.pack
    assert packs.get(first) == b"before the failing disk" and packs.get(second) == b"in a new pack"
    assert [r.digest for r in packs.records(first.pack or "")] == [first.digest]  # the torn tail ends the scan
    with packs.sealed(first.pack or "") as sealed:
        assert sealed is True


def test_pack_refs_are_checked(packs: PackStore) -> None:
    digest = sha256_hex(b"abc")
    with pytest.raises(BlobNotFoundError):
        packs.get(BlobRef(digest, 3))  # no pack location: a loose blob is not the pack store's
    assert not packs.exists(BlobRef(digest, 3))
    for bad in ("../../etc/passwd", "x.pack/../..", "a.pack\n", ".pack"):
        with pytest.raises(ValueError):
            packs.get(BlobRef(digest, 3, bad, 8))


def test_make_durable_syncs_packs_other_processes_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stager = PackStore(tmp_path / "blobs" / "packs")  # a staging process's store
    staged = [stager.put(b"staged %d" % i) for i in range(3)]
    writer = ArchiveStore(tmp_path / "blobs")  # the batch writer, which wrote nothing itself
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    writer.make_durable(staged)
    assert len(synced) == 2  # the stager's pack, and once the folder that names it
    synced.clear()
    writer.make_durable(staged)
    assert len(synced) == 1  # the folder entry is durable already
    writer.make_durable([BlobRef(sha256_hex(b"loose"), 5)])  # loose blobs were durable when put
    assert len(synced) == 1
    stager.close()
    writer.close()


def test_archive_store_puts_into_packs_and_reads_loose_refs(tmp_path: Path) -> None:
    store = ArchiveStore(tmp_path / "blobs")
    packed = store.put(b"new blob")
    store.sync()
    assert packed.pack is not None and (tmp_path / "blobs" / "packs" / packed.pack).is_file()
    old = store.loose.put(b"written before packs")  # the layout older archives hold
    assert old.pack is None and old.offset is None
    assert store.get(old) == b"written before packs" and store.exists(old)
    assert store.get(packed) == b"new blob"
    store.loose.delete(old.digest)
    assert not store.exists(old)
    with pytest.raises(BlobNotFoundError):
        store.get(old)
    store.close()


def test_a_read_only_store_reads_packs_and_loose_blobs_and_creates_nothing(tmp_path: Path) -> None:
    """A mounted backup: every blob reads (and is re-hashed); nothing is created, written or removed."""
    root = tmp_path / "blobs"
    writer = ArchiveStore(root)
    packed = [writer.put(data) for data in PAYLOADS]
    writer.close()
    loose = BlobRef(FileBlobStore(root).put_digest(b"from before packs"), len(b"from before packs"))

    def listing() -> dict[str, tuple[int, float]]:
        return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in sorted(root.rglob("*"))}

    before = listing()
    reader = ArchiveStore(root, read_only=True)
    assert [reader.get(ref) for ref in packed] == PAYLOADS
    assert reader.get(loose) == b"from before packs" and reader.exists(loose)
    for attempt in (lambda: reader.put(b"new"), lambda: reader.packs.put(b"new"),
                    lambda: reader.loose.put(b"new"), lambda: reader.loose.delete(loose.digest),
                    lambda: reader.loose.delete_if_older(loose.digest, time.time() + 60),
                    lambda: reader.packs.purge_retired(time.time() + 60),
                    lambda: reader.packs.retire(str(packed[0].pack))):
        with pytest.raises(ArchiveError, match="read-only"):
            attempt()
    reader.sync()
    reader.close()
    assert listing() == before
    assert not (tmp_path / "elsewhere").exists()
    ArchiveStore(tmp_path / "elsewhere", read_only=True).close()  # opening a missing store creates nothing
    assert not (tmp_path / "elsewhere").exists()
