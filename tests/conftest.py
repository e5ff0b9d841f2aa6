"""Shared fixtures: a real archive on SQLite or PostgreSQL, real DICOM copied into tmp folders."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from archive.config import Settings
from archive.services.runtime import Archive

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDARCHIVE_SHARED_DATA", REPO.parent / "shared" / "data"))
POSTGRES_ADMIN_URL = os.environ.get("MEDARCHIVE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def shared_data() -> Path:
    """The shared real-DICOM folder; in CI its absence is a failure, elsewhere a visible skip."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data missing at {SHARED_DATA}")
        pytest.skip(f"shared data not found at {SHARED_DATA} (set MEDARCHIVE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def shared_copy(tmp_path: Path) -> Path:
    """A private copy of ../shared/data: tests never read the shared folder in place."""
    target = tmp_path / "shared-data"
    shutil.copytree(shared_data(), target)
    for path in target.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    return target


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    name = f"medarchive_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _reset_postgres(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'home' / 'catalog.sqlite'}"
    url = request.getfixturevalue("postgres_url")
    _reset_postgres(url)
    return str(url)


@pytest.fixture
def archive(tmp_path: Path, database_url: str) -> Iterator[Archive]:
    """A real archive (blob store on disk, catalog on SQLite or PostgreSQL), migrated to head.

    Normalization is off here, so that what a test of another feature counts is what it stored;
    the normalization tests (and the round trip of every pydicom file) turn it on.
    """
    settings = Settings.load(environ={}, home=tmp_path / "home", database_url=database_url, normalize=False)
    opened = Archive.open(settings, migrate=True)
    yield opened
    opened.close()


@pytest.fixture
def sqlite_archive(tmp_path: Path) -> Iterator[Archive]:
    settings = Settings.load(environ={}, home=tmp_path / "home", normalize=False)  # as ``archive``
    opened = Archive.open(settings)
    yield opened
    opened.close()


def copy_ct_and_mr(source: Path) -> None:
    """The server tests' archive: CT patient A002304 (two studies of three one-instance series) under
    ``source/ct`` and eight MR instances of one series (mr-siemens-prisma) under ``source/mr``."""
    data = shared_data()
    shutil.copytree(data / "ct-chest-tcia" / "A002304", source / "ct")
    (source / "mr").mkdir(parents=True)
    for path in sorted((data / "mr-siemens-prisma").rglob("*.dcm"))[:8]:
        shutil.copy2(path, source / "mr" / path.name)
