"""Exit codes: the hierarchy carries them, and the CLI maps real failures of other libraries to them."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from archive.cli import describe_failure
from archive.errors import (
    ArchiveError,
    BlobCorruptError,
    ConfigError,
    NotFoundError,
    TransientError,
    UnavailableError,
)


def test_exit_codes_of_the_hierarchy() -> None:
    assert ArchiveError.exit_code == 2 and ConfigError.exit_code == 2 and NotFoundError.exit_code == 2
    assert TransientError.exit_code == 3 and UnavailableError.exit_code == 3
    assert issubclass(UnavailableError, TransientError)  # the service retries it like any machine failure
    assert describe_failure(NotFoundError("no study 'x'")) == ("no study 'x'", 2)
    assert describe_failure(UnavailableError("home gone")) == ("home gone", 3)
    assert describe_failure(BlobCorruptError("blob 12 is corrupt")) == ("blob 12 is corrupt", 1)  # damaged


def test_a_garbled_database_url_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDARCHIVE_HOME", str(tmp_path))
    monkeypatch.setenv("MEDARCHIVE_DATABASE_URL", "notaurl")
    with pytest.raises(sa.exc.ArgumentError) as raised:
        sa.create_engine("notaurl")
    message, code = describe_failure(raised.value)
    assert code == 2 and "'notaurl'" in message and "MEDARCHIVE_DATABASE_URL" in message


def test_a_database_nobody_listens_for_is_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = "postgresql+psycopg://archive:s3cret@127.0.0.1:5999/test"
    monkeypatch.setenv("MEDARCHIVE_HOME", str(tmp_path))
    monkeypatch.setenv("MEDARCHIVE_DATABASE_URL", url)
    engine = sa.create_engine(url)
    with pytest.raises(sa.exc.OperationalError) as raised:
        engine.connect()
    engine.dispose()
    message, code = describe_failure(raised.value)
    assert code == 3 and message.startswith("cannot reach the catalog database at 127.0.0.1:5999 (connection refused)")
    assert "s3cret" not in message and "MEDARCHIVE_DATABASE_URL" in message


def test_file_system_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(OSError) as raised:
        (Path("/proc") / "medarchive" / "x").mkdir(parents=True)
    message, code = describe_failure(raised.value)
    assert code == 3 and "/proc/medarchive" in message and "MEDARCHIVE_HOME" in message


def test_interrupt_anywhere_in_the_chain_is_130_and_the_unexpected_is_1() -> None:
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("cleanup failed") from exc
    except RuntimeError as exc:
        assert describe_failure(exc) == ("interrupted", 130)
    message, code = describe_failure(ZeroDivisionError("division by zero"))
    assert code == 1 and "ZeroDivisionError" in message and "--debug" in message
