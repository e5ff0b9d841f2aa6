"""The archive as the services see it: settings, catalog engine, blob store."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from archive.catalog.database import (
    ReadOnlyCatalog,
    alembic_config,
    create_engine_for,
    make_session_factory,
    open_read_only,
    sqlite_path,
    upgrade_schema,
)
from archive.config import Settings
from archive.errors import ConfigError, UnavailableError
from archive.services.header_dictionaries import HeaderDictionaries
from archive.services.unit_of_work import UnitOfWork
from archive.store import ArchiveStore


@dataclass
class Archive:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    store: ArchiveStore
    read_only: bool = False
    catalog: ReadOnlyCatalog | None = None  # set when the catalog was opened for reading only
    headers: HeaderDictionaries = field(init=False)

    def __post_init__(self) -> None:
        self.headers = HeaderDictionaries(self.session_factory, self.store, self.settings.header_zstd_level)

    @classmethod
    def open(cls, settings: Settings | None = None, *, migrate: bool | None = None,
             read_only: bool = False) -> Archive:
        """Open the archive; the embedded SQLite catalog is created or upgraded on first use.

        A server database is only migrated by ``medarchive db upgrade`` (or
        ``migrate=True``): an administrator decides when its schema changes.
        ``read_only`` is for callers that only look (``studies``, ``show``,
        ``get``, ``info``): when the home cannot be written (a mounted backup)
        the archive opens without creating, migrating or writing anything;
        when it can, it opens as usual. A home that cannot be written is
        otherwise an :class:`UnavailableError`.
        """
        settings = settings or Settings.load()
        if read_only and not _writable(settings):
            return cls._open_read_only(settings)
        try:
            settings.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _home_unavailable(settings.home, exc) from exc
        if not _writable(settings):
            raise _home_unavailable(settings.home, OSError(30, "read-only or not writable"))
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

    @classmethod
    def _open_read_only(cls, settings: Settings) -> Archive:
        if not settings.home.is_dir():
            from archive.errors import NotFoundError

            raise NotFoundError(f"there is no archive at {settings.home}: set MEDARCHIVE_HOME to the archive's home")
        catalog = open_read_only(settings.database_url)
        try:
            _check_schema_current(catalog.engine, settings.database_url, read_only=True)
        except BaseException:
            catalog.close()
            raise
        return cls(
            settings=settings,
            engine=catalog.engine,
            session_factory=make_session_factory(catalog.engine),
            store=ArchiveStore(settings.blob_dir, read_only=True),
            read_only=True,
            catalog=catalog,
        )

    def unit_of_work(self) -> UnitOfWork:
        return UnitOfWork(self.session_factory, self.store, self.headers)

    def close(self) -> None:
        self.store.close()
        if self.catalog is not None:
            self.catalog.close()
        else:
            self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _writable(settings: Settings) -> bool:
    """Whether the home (and an SQLite catalog file) can be written; a missing home counts if it can be created.

    ``os.access`` reports a read-only mount (EROFS) even to root, who ignores permission bits.
    """
    if not os.access(_existing_parent(settings.home), os.W_OK):
        return False
    catalog = sqlite_path(settings.database_url)
    if catalog is not None and catalog.exists() and not os.access(catalog, os.W_OK):
        return False
    return True


def _home_unavailable(home: Path, exc: OSError) -> UnavailableError:
    reason = exc.strerror or str(exc)
    return UnavailableError(
        f"the archive home {home} cannot be written ({reason.lower()}); set MEDARCHIVE_HOME to a writable folder "
        "(a read-only copy opens for studies, show, get and info)"
    )


def schema_head(database_url: str) -> str | None:
    """The newest schema revision this version of medarchive knows."""
    return ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()


def schema_revision(engine: Engine) -> str | None:
    """The schema revision the catalog is at (None: no schema)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _check_schema_current(engine: Engine, database_url: str, *, read_only: bool = False) -> None:
    head = schema_head(database_url)
    current = schema_revision(engine)
    if current != head:
        remedy = ("it is open read-only, so it cannot be upgraded here: upgrade a writable copy with "
                  "`medarchive db upgrade`" if read_only else "run `medarchive db upgrade`")
        raise ConfigError(
            f"the catalog at {engine.url.render_as_string(hide_password=True)} is at schema revision "
            f"{current or 'none'}, not {head}: {remedy}"
        )


def describe(settings: Settings, archive: Archive | None = None, *, catalog_error: str | None = None) -> dict[str, Any]:
    """What ``medarchive info`` shows: where the archive lives, what it talks to, what it holds, how full the disk is.

    Counts are cheap catalog aggregates; bytes on disk are the pack files'
    sizes (one directory listing), plus the catalog's sizes of loose blobs.
    """
    from sqlalchemy import func, select
    from sqlalchemy.engine import make_url

    from archive.catalog.models import Blob, Instance, QuarantineEntry, Study

    info: dict[str, Any] = {
        "home": str(settings.home),
        "home_exists": settings.home.is_dir(),
        "read_only": archive.read_only if archive is not None else None,
        "catalog": {"url": _display_url(settings.database_url), "kind": "sqlite" if settings.is_sqlite else
                    make_url(settings.database_url).get_backend_name()},
        "broker_url": _display_url(settings.effective_broker_url),
        "result_backend": _display_url(settings.effective_result_backend),
        "codec": settings.codec,
        "policies": sorted(settings.policies),
    }
    try:
        usage = shutil.disk_usage(settings.home if settings.home.is_dir() else _existing_parent(settings.home))
        info["disk"] = {"total": usage.total, "used": usage.used, "free": usage.free}
    except OSError as exc:
        info["disk"] = {"error": exc.strerror or str(exc)}
    packs = archive.store.packs.packs() if archive is not None else []
    info["packs"] = {"files": len(packs), "bytes": sum(p.size for p in packs)}
    if archive is None:
        info["catalog"]["error"] = catalog_error
        return info
    info["catalog"]["revision"] = schema_revision(archive.engine)
    info["catalog"]["head"] = schema_head(settings.database_url)
    if archive.catalog is not None:
        info["catalog"]["opened"] = archive.catalog.mode
    with archive.session_factory() as session:
        info["studies"] = session.scalar(select(func.count()).select_from(Study)) or 0
        info["instances"] = session.scalar(select(func.count()).select_from(Instance)) or 0
        info["quarantined"] = session.scalar(select(func.count()).select_from(QuarantineEntry)) or 0
        blobs, blob_bytes = session.execute(select(func.count(), func.coalesce(func.sum(Blob.size), 0))).one()
        loose = session.scalar(select(func.coalesce(func.sum(Blob.size), 0)).where(Blob.pack.is_(None))) or 0
    info["blobs"] = {"count": int(blobs), "bytes": int(blob_bytes), "loose_bytes": int(loose)}
    return info


def _display_url(url: str) -> str:
    """A URL with its password hidden (an unparsable one is shown as given, minus anything like a password)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
