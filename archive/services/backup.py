"""Use cases: a consistent copy of a running archive (backup), and bringing it back into an empty home (restore).

Why the copy is consistent without stopping ingest: a blob is durable in its
pack before any catalog row references it, and packs are only appended to. So
the catalog is copied first — SQLite's online backup API, or ``pg_dump`` on an
exported snapshot — and the blobs after it: every blob the snapshot references
is already in its pack, within the pack's length at copy time. The only thing
that moves blobs is the garbage collector's compaction; it needs
``home/backup.lock`` exclusively and the backup holds it shared from before
the snapshot until the last byte is copied (a running compaction is waited
for; a GC started meanwhile deletes rows only, see
:mod:`archive.services.integrity`).

A backup folder of an SQLite archive is itself a home (``catalog.sqlite``,
``blobs/``, ``quarantine/``): ``MEDARCHIVE_HOME=DEST medarchive studies``
reads it in place. ``manifest.json``, written last, marks it complete.

The equivalent by hand for a PostgreSQL catalog:
``pg_dump --format=custom --file=DEST/catalog.pgdump "$URL"`` then copy
``$MEDARCHIVE_HOME/blobs`` (after the dump, with no ``medarchive gc`` running);
restore with ``pg_restore --clean --if-exists --no-owner --dbname="$URL" catalog.pgdump``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, func, select, text, update
from sqlalchemy.engine import URL, make_url

from archive.catalog.database import sqlite_path
from archive.catalog.models import Blob, Instance, QuarantineEntry, Study
from archive.config import Settings
from archive.errors import ArchiveError, ConfigError, NotFoundError, UnavailableError
from archive.kinds import AuditAction
from archive.services.audit import record
from archive.services.integrity import VerifyReport, backup_lock, verify_blobs
from archive.services.runtime import Archive
from archive.store.blobstore import fsync_dir

FORMAT = 1
MANIFEST = "manifest.json"
SQLITE_COPY = "catalog.sqlite"
PG_DUMP = "catalog.pgdump"
CONFIG_FILE = "medarchive.toml"
_CHUNK = 4 * 1024**2


@dataclass
class BackupReport:
    dest: str
    catalog_kind: str  # "sqlite" or "postgresql"
    catalog_file: str
    catalog_sha256: str
    revision: str | None
    studies: int = 0
    instances: int = 0
    blobs: int = 0
    packs: int = 0
    pack_bytes: int = 0
    loose_blobs: int = 0
    quarantine_files: int = 0
    missing_loose: list[str] = field(default_factory=list)  # referenced loose blobs already gone (verify names them)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RestoreReport:
    source: str
    home: str
    catalog_kind: str
    revision: str | None
    packs: int = 0
    loose_blobs: int = 0
    quarantine_files: int = 0
    verify: VerifyReport | None = None

    def as_dict(self) -> dict[str, Any]:
        values = {k: v for k, v in asdict(self).items() if k != "verify"}
        values["verify"] = self.verify.as_dict() if self.verify is not None else None
        values["ok"] = self.verify is not None and self.verify.ok
        return values


# ---------------------------------------------------------------------------------------------- backup


@dataclass
class _Snapshot:
    revision: str | None
    counts: dict[str, int]
    pack_ends: dict[str, int]  # pack name -> bytes the snapshot can reference
    loose: list[str]


def backup(archive: Archive, dest: Path) -> BackupReport:
    """Copy the archive's catalog, blobs, quarantine and configuration into ``dest`` (new or empty)."""
    started = time.monotonic()
    dest = Path(dest).absolute()
    settings = archive.settings
    if dest == settings.home or settings.home in dest.parents:
        raise ConfigError(f"the backup folder {dest} is inside the archive's home {settings.home}; choose another")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"the backup folder {dest} is not empty; give a new or empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    with _shared_lock(settings.home):
        if settings.is_sqlite:
            kind, name = "sqlite", SQLITE_COPY
            snapshot = _backup_sqlite(settings, dest / name)
        else:
            kind, name = "postgresql", PG_DUMP
            snapshot = _backup_postgres(archive, dest / name)
        counts = snapshot.counts
        report = BackupReport(str(dest), kind, name, _sha256_file(dest / name), snapshot.revision,
                              studies=counts["studies"], instances=counts["instances"], blobs=counts["blobs"])
        packs_dir = dest / "blobs" / "packs"
        for pack, end in sorted(snapshot.pack_ends.items()):
            report.pack_bytes += _copy_range(_pack_path(archive, pack), packs_dir / pack, end)
            report.packs += 1
        for digest in snapshot.loose:
            source = archive.store.loose.path_for(digest)
            target = dest / "blobs" / source.relative_to(settings.blob_dir)
            try:
                _copy_range(source, target, None)
            except FileNotFoundError:
                report.missing_loose.append(digest)
                continue
            report.loose_blobs += 1
    report.quarantine_files = _copy_tree(settings.quarantine_dir, dest / "quarantine")
    config = settings.home / CONFIG_FILE
    if config.is_file():
        _copy_range(config, dest / CONFIG_FILE, None)
    report.seconds = round(time.monotonic() - started, 3)
    manifest = {
        "format": FORMAT, "medarchive_version": _version(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime()),
        "home": str(settings.home), "quarantine_dir": str(settings.quarantine_dir),
        "catalog": {"kind": kind, "file": name, "sha256": report.catalog_sha256, "revision": snapshot.revision},
        "counts": snapshot.counts, "packs": snapshot.pack_ends, "loose_blobs": report.loose_blobs,
        "quarantine_files": report.quarantine_files,
    }
    _write_durably(dest / MANIFEST, json.dumps(manifest, indent=2).encode())
    return report


@contextmanager
def _shared_lock(home: Path) -> Iterator[None]:
    """The backup lock, shared; a home that cannot be written (a mounted copy) has no collector to hold off."""
    if not os.access(home, os.W_OK):
        yield
        return
    with backup_lock(home, exclusive=False, wait=True):
        yield


def _backup_sqlite(settings: Settings, target: Path) -> _Snapshot:
    source_path = sqlite_path(settings.database_url)
    if source_path is None or not source_path.is_file():
        raise NotFoundError(f"there is no catalog at {source_path}: is MEDARCHIVE_HOME the archive's home?")
    source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True, timeout=30)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)  # one step: a consistent snapshot while writers go on (WAL)
        copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        copy.commit()
    finally:
        copy.close()
        source.close()
    fsync_dir(target)  # the copy's bytes
    engine = create_engine(f"sqlite:///{target}")
    try:
        with engine.connect() as connection:
            return _read_snapshot(connection)
    finally:
        engine.dispose()


def _backup_postgres(archive: Archive, target: Path) -> _Snapshot:
    """``pg_dump`` of an exported snapshot; the blob list is read in that same snapshot."""
    url = make_url(archive.settings.database_url)
    with archive.engine.connect().execution_options(isolation_level="REPEATABLE READ") as connection:
        with connection.begin():
            snapshot_id = connection.execute(text("SELECT pg_export_snapshot()")).scalar_one()
            snapshot = _read_snapshot(connection)
            _run_pg("pg_dump", url, ["--format=custom", f"--file={target}", f"--snapshot={snapshot_id}"])
    fsync_dir(target)  # the copy's bytes
    return snapshot


def _read_snapshot(connection: Connection) -> _Snapshot:
    revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    counts = {
        "studies": connection.execute(select(func.count()).select_from(Study)).scalar_one(),
        "instances": connection.execute(select(func.count()).select_from(Instance)).scalar_one(),
        "blobs": connection.execute(select(func.count()).select_from(Blob)).scalar_one(),
    }
    ends = {str(pack): int(end or 0) for pack, end in connection.execute(
        select(Blob.pack, func.max(Blob.offset + Blob.size)).where(Blob.pack.is_not(None)).group_by(Blob.pack))}
    loose = list(connection.execute(select(Blob.sha256).where(Blob.pack.is_(None)).order_by(Blob.sha256)).scalars())
    return _Snapshot(revision, counts, ends, loose)


def _pack_path(archive: Archive, name: str) -> Path:
    path = archive.store.packs.root / name
    if path.exists():
        return path
    retired = sorted(archive.store.packs.root.glob(f"{name}.retired-*"))
    return retired[0] if retired else path  # a missing pack is reported by the copy


# ---------------------------------------------------------------------------------------------- restore


def restore(settings: Settings, source: Path, *, force: bool = False) -> RestoreReport:
    """Bring a backup back into the configured home (empty unless ``force``), then verify every blob."""
    source = Path(source).absolute()
    manifest = _manifest(source)
    catalog = manifest["catalog"]
    kind = str(catalog["kind"])
    wanted = "sqlite" if settings.is_sqlite else "postgresql"
    if kind != wanted:
        raise ConfigError(f"the backup in {source} has a {kind} catalog but this home is configured for {wanted}; "
                          "set MEDARCHIVE_DATABASE_URL to a catalog of that kind")
    if settings.home == source:
        raise ConfigError("restore into another home than the backup folder (it is already a home)")
    if _sha256_file(source / catalog["file"]) != catalog["sha256"]:
        raise ArchiveError(f"the catalog copy in {source} does not match its manifest's sha256: the backup is damaged")
    if not force:
        _refuse_non_empty(settings)
    report = RestoreReport(str(source), str(settings.home), kind, catalog.get("revision"))
    settings.home.mkdir(parents=True, exist_ok=True)
    report.packs = _copy_tree(source / "blobs" / "packs", settings.blob_dir / "packs")
    report.loose_blobs = _copy_tree(source / "blobs", settings.blob_dir, skip=("packs",))
    report.quarantine_files = _copy_tree(source / "quarantine", settings.quarantine_dir)
    if (source / CONFIG_FILE).is_file():
        config = settings.home / CONFIG_FILE
        _copy_range(source / CONFIG_FILE, config if not config.exists() else config.with_name(CONFIG_FILE + ".from-backup"),
                    None)
    if kind == "sqlite":
        target = sqlite_path(settings.database_url)
        assert target is not None
        for stale in (target.with_name(target.name + "-wal"), target.with_name(target.name + "-shm")):
            stale.unlink(missing_ok=True)
        partial = target.with_name(target.name + ".restoring")
        _copy_range(source / SQLITE_COPY, partial, None)
        os.replace(partial, target)
        fsync_dir(target.parent)
    else:
        _run_pg("pg_restore", make_url(settings.database_url),
                ["--clean", "--if-exists", "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
                 str(source / PG_DUMP)])
    with Archive.open(settings, migrate=True) as archive:
        _move_quarantine_paths(archive, str(manifest.get("quarantine_dir") or ""))
        report.verify = verify_blobs(archive)
        with archive.unit_of_work() as uow:
            record(uow.session, AuditAction.RESTORE, str(source)[-128:], reason="medarchive restore",
                   details={"backup_created_at": manifest.get("created_at"), "backup_home": manifest.get("home"),
                            "revision": report.revision, "counts": manifest.get("counts"),
                            "verify_ok": report.verify.ok, "bad_blobs": report.verify.bad_blobs})
            uow.commit()
    return report


def _manifest(source: Path) -> dict[str, Any]:
    path = source / MANIFEST
    if not path.is_file():
        raise NotFoundError(f"{source} is not a complete medarchive backup (no {MANIFEST}); give the folder "
                            "`medarchive backup` wrote")
    manifest: dict[str, Any] = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{path}: backup format {manifest.get('format')!r} is not {FORMAT}; use the medarchive "
                          "version that wrote it")
    return manifest


def _refuse_non_empty(settings: Settings) -> None:
    """The target must hold no blobs and no catalog rows: a restore never mixes two archives."""
    blobs = settings.blob_dir
    if blobs.is_dir() and any(path.is_file() for path in blobs.rglob("*")):
        raise ConfigError(f"the home {settings.home} already holds blobs; restore into an empty home "
                          "(or pass --force to overwrite its catalog and add the backup's blobs)")
    url = settings.database_url
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return
    engine = create_engine(url if path is None else f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            tables = set(connection.dialect.get_table_names(connection))
            for table in ("instances", "blobs", "studies"):
                if table in tables and connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one():
                    raise ConfigError(f"the catalog {engine.url.render_as_string(hide_password=True)} is not empty "
                                      f"({table} has rows); restore into an empty one (or pass --force)")
    finally:
        engine.dispose()


def _move_quarantine_paths(archive: Archive, old_dir: str) -> None:
    """Quarantine rows name their kept copies by absolute path: point them into this home."""
    new_dir = str(archive.settings.quarantine_dir)
    if not old_dir or old_dir == new_dir:
        return
    with archive.unit_of_work() as uow:
        entries = uow.session.execute(select(QuarantineEntry.id, QuarantineEntry.stored_path)
                                      .where(QuarantineEntry.stored_path.startswith(old_dir))).all()
        for entry_id, stored in entries:
            uow.session.execute(update(QuarantineEntry).where(QuarantineEntry.id == entry_id)
                                .values(stored_path=new_dir + stored[len(old_dir):]))
        uow.commit()


# ---------------------------------------------------------------------------------------------- PostgreSQL tools


def _run_pg(tool: str, url: URL, args: list[str]) -> None:
    """Run pg_dump / pg_restore with the URL's connection parameters (the password through PGPASSWORD)."""
    binary = shutil.which(tool) or f"/usr/bin/{tool}"
    if not Path(binary).exists():
        raise UnavailableError(f"{tool} is not installed; install the PostgreSQL client tools of the server's version")
    env = dict(os.environ)
    query = dict(url.query)
    host = url.host or (str(query["host"]) if "host" in query else None)
    for name, value in (("PGHOST", host), ("PGPORT", url.port), ("PGUSER", url.username),
                        ("PGPASSWORD", url.password), ("PGSSLMODE", query.get("sslmode"))):
        if value is not None:
            env[name] = str(value)
    command = [binary, *args]
    if url.database:
        command.insert(1, f"--dbname={url.database}")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UnavailableError(f"{tool} failed ({detail}); check the database URL and that the client tools "
                               "match the server's version")


# ---------------------------------------------------------------------------------------------- files


def _copy_range(source: Path, target: Path, length: int | None) -> int:
    """Copy the first ``length`` bytes (all: None) of ``source`` to ``target`` durably; returns the bytes copied."""
    target.parent.mkdir(parents=True, exist_ok=True)
    copied = 0
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while length is None or copied < length:
            chunk = reader.read(_CHUNK if length is None else min(_CHUNK, length - copied))
            if not chunk:
                break
            writer.write(chunk)
            copied += len(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    if length is not None and copied < length:
        raise ArchiveError(f"{source} ends at {copied} bytes, before the {length} its catalog references")
    return copied


def _copy_tree(source: Path, target: Path, *, skip: tuple[str, ...] = ()) -> int:
    """Copy a folder's files (not hidden or temporary ones) durably; returns how many."""
    if not source.is_dir():
        return 0
    count = 0
    for folder, dirs, files in os.walk(source):
        here = Path(folder)
        if here == source:
            dirs[:] = [d for d in dirs if d not in skip]
        for name in files:
            if name.startswith(".") or name.endswith(".tmp"):
                continue
            _copy_range(here / name, target / (here / name).relative_to(source), None)
            count += 1
    if count:
        for folder, _, _ in os.walk(target):
            fsync_dir(Path(folder))
    return count


def _write_durably(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    fsync_dir(path.parent)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medarchive")
    except PackageNotFoundError:
        return "unknown"
