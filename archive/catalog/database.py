"""Engines come from this factory, never at import time; the schema from Alembic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from archive.errors import ConfigError

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
    try:
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
