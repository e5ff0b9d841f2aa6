"""The archive as the services see it: settings, catalog engine, blob store."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from archive.catalog.database import alembic_config, create_engine_for, make_session_factory, upgrade_schema
from archive.config import Settings
from archive.errors import ConfigError
from archive.services.header_dictionaries import HeaderDictionaries
from archive.services.unit_of_work import UnitOfWork
from archive.store import ArchiveStore


@dataclass
class Archive:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    store: ArchiveStore
    headers: HeaderDictionaries = field(init=False)

    def __post_init__(self) -> None:
        self.headers = HeaderDictionaries(self.session_factory, self.store, self.settings.header_zstd_level)

    @classmethod
    def open(cls, settings: Settings | None = None, *, migrate: bool | None = None) -> Archive:
        """Open the archive; the embedded SQLite catalog is created or upgraded on first use.

        A server database is only migrated by ``medarchive db upgrade`` (or
        ``migrate=True``): an administrator decides when its schema changes.
        """
        settings = settings or Settings.load()
        settings.home.mkdir(parents=True, exist_ok=True)
        if migrate is None:
            migrate = settings.is_sqlite
        if migrate:
            upgrade_schema(settings.database_url)
        engine = create_engine_for(settings.database_url)
        _check_schema_current(engine, settings.database_url)
        return cls(
            settings=settings,
            engine=engine,
            session_factory=make_session_factory(engine),
            store=ArchiveStore(settings.blob_dir),
        )

    def unit_of_work(self) -> UnitOfWork:
        return UnitOfWork(self.session_factory, self.store, self.headers)

    def close(self) -> None:
        self.store.close()
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _check_schema_current(engine: Engine, database_url: str) -> None:
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current != head:
        raise ConfigError(
            f"the catalog at {engine.url.render_as_string(hide_password=True)} is at schema revision "
            f"{current or 'none'}, not {head}: run `medarchive db upgrade`"
        )
