"""Alembic migrations and the SQLAlchemy models describe the same schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from archive.catalog.database import alembic_config, create_engine_for, upgrade_schema
from archive.catalog.models import Base


def _diff(url: str) -> list[object]:
    engine = create_engine_for(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _revision_and_tables(url: str) -> tuple[str | None, set[str]]:
    engine = create_engine_for(url)
    try:
        with engine.connect() as conn:
            revision = MigrationContext.configure(conn).get_current_revision()
            tables = set(sa.inspect(conn).get_table_names())
        return revision, tables
    finally:
        engine.dispose()


def _head(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def test_migrations_match_models(database_url: str) -> None:
    upgrade_schema(database_url)
    revision, tables = _revision_and_tables(database_url)
    assert revision == _head(database_url)
    assert set(Base.metadata.tables) <= tables
    assert _diff(database_url) == []


def test_downgrade_to_base_and_upgrade_again(database_url: str) -> None:
    upgrade_schema(database_url)
    command.downgrade(alembic_config(database_url), "base")
    revision, tables = _revision_and_tables(database_url)
    assert revision is None
    assert not set(Base.metadata.tables) & tables, "downgrade to base leaves no catalog table behind"

    upgrade_schema(database_url)
    revision, tables = _revision_and_tables(database_url)
    assert revision == _head(database_url)
    assert _diff(database_url) == []


def test_upgrade_is_idempotent(database_url: str) -> None:
    upgrade_schema(database_url)
    upgrade_schema(database_url)
    assert _revision_and_tables(database_url)[0] == _head(database_url)
