"""Engines come from this factory, never at import time; the schema from Alembic."""

from __future__ import annotations

import fcntl
import logging

import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from archive.errors import ConfigError

# Alembic announces its dialect at INFO on every schema check: noise in a worker's log
logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def create_engine_for(database_url: str) -> Engine:
    """An engine with the settings each backend needs (SQLite: WAL, foreign keys, busy timeout)."""
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(database_url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(database_url, pool_pre_ping=True)


def sqlite_path(database_url: str) -> Path | None:
    """The file of an SQLite catalog URL (None: not SQLite, or in memory)."""
    if not database_url.startswith("sqlite"):
        return None
    database = make_url(database_url).database
    return Path(database) if database and database != ":memory:" else None


@dataclass
class ReadOnlyCatalog:
    """An engine that cannot write, and the temporary copy it reads when the original could not be opened in place."""

    engine: Engine
    mode: str  # "read-only", "immutable" or "copy"
    copy_dir: Path | None = None

    def close(self) -> None:
        self.engine.dispose()
        if self.copy_dir is not None:
            shutil.rmtree(self.copy_dir, ignore_errors=True)


def open_read_only(database_url: str) -> ReadOnlyCatalog:
    """Open a catalog for reading only, e.g. on a mounted read-only backup.

    A server database is opened as usual (its rights are the server's
    business). An SQLite file is opened ``mode=ro``; a WAL-mode catalog whose
    ``-shm`` index cannot be created there opens ``immutable`` when it has no
    ``-wal`` content to lose, and otherwise from a temporary copy of the file and
    its ``-wal``, so committed transactions still in the log are seen.
    """
    path = sqlite_path(database_url)
    if path is None:
        return ReadOnlyCatalog(create_engine_for(database_url), "server")
    if not path.is_file():
        from archive.errors import NotFoundError

        raise NotFoundError(f"there is no catalog at {path}: is MEDARCHIVE_HOME the archive's home?")
    wal = path.with_name(path.name + "-wal")
    has_log = wal.exists() and wal.stat().st_size > 0
    for mode, query in (("read-only", "mode=ro"), ("immutable", "mode=ro&immutable=1")):
        if mode == "immutable" and has_log:
            break
        engine = _read_only_sqlite_engine(path, query)
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql("SELECT count(*) FROM sqlite_master").all()
            return ReadOnlyCatalog(engine, mode)
        except Exception:
            engine.dispose()
    copy_dir = Path(tempfile.mkdtemp(prefix="medarchive-ro-"))
    try:
        for source in (path, wal):
            if source.exists():
                shutil.copyfile(source, copy_dir / source.name)
        engine = _read_only_sqlite_engine(copy_dir / path.name, "mode=ro")
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT count(*) FROM sqlite_master").all()
    except BaseException:
        shutil.rmtree(copy_dir, ignore_errors=True)
        raise
    return ReadOnlyCatalog(engine, "copy", copy_dir)


def _read_only_sqlite_engine(path: Path, query: str) -> Engine:
    uri = f"file:{quote(str(path.absolute()))}?{query}"

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
        connection.execute("PRAGMA query_only=ON")
        return connection

    return create_engine(f"sqlite:///{path}", creator=connect)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(database_url: str) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade_schema(database_url: str, revision: str = "head") -> None:
    """Bring the catalog to ``revision`` (``medarchive db upgrade``; also run on first use).

    An unknown revision, or one behind the catalog's, is a :class:`ConfigError`.
    """
    path = sqlite_path(database_url)
    try:
        if path is None:
            command.upgrade(alembic_config(database_url), revision)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".migrate-lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # processes opening a new catalog at once migrate one after the other
            command.upgrade(alembic_config(database_url), revision)
    except CommandError as exc:
        raise ConfigError(f"cannot upgrade the catalog to revision {revision!r}: {exc}") from exc


def current_revision(database_url: str) -> str | None:
    """The schema revision the catalog is at, read from its ``alembic_version`` table (None: no schema)."""
    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
