"""Alembic environment: the engine comes from medarchive's factory; SQLite uses batch mode."""

from __future__ import annotations

import logging

from alembic import context

from archive.catalog.database import create_engine_for
from archive.catalog.models import Base

config = context.config
# No "Context impl SQLiteImpl" / "Running upgrade" INFO lines in medarchive's output (a service logging at INFO
# included); this file deliberately does not call logging.config.fileConfig, which would reconfigure the
# host's logging. `medarchive db upgrade` prints the revision reached itself.
logging.getLogger("alembic").setLevel(logging.WARNING)
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_engine_for(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
