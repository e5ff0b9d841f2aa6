"""The one clock: aware UTC for the catalog, local time of day for re-compression windows."""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone

import pytest

from archive import clock, config
from archive.clock import aware_utc, local_time_now, utcnow
from archive.config import RecompressPolicy


def test_utcnow_is_aware_utc() -> None:
    now = utcnow()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    assert abs((datetime.now(timezone.utc) - now).total_seconds()) < 5


def test_aware_utc_reads_naive_values_as_utc() -> None:
    assert aware_utc(None) is None
    naive = datetime(2026, 1, 1, 12, 0)  # what SQLite hands back for a UTC column
    assert aware_utc(naive) == datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    paris = datetime(2026, 1, 1, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    converted = aware_utc(paris)
    assert converted == datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc) and converted is not None
    assert converted.utcoffset() == timedelta(0)


def test_local_time_now_is_a_time_of_day() -> None:
    now = local_time_now()
    assert isinstance(now, time) and now.tzinfo is None


def test_in_window_takes_an_injected_time_and_defaults_to_the_local_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    night = RecompressPolicy(name="night", codec={"id": "zstd"}, window="22:00-04:00")
    assert night.in_window(time(23, 0)) and night.in_window(time(3, 59)) and not night.in_window(time(4, 0))
    assert RecompressPolicy(name="always", codec={"id": "zstd"}).in_window()
    # no argument: the one local clock decides (set here to a fixed time of day, not waited for)
    assert config.local_time_now is clock.local_time_now
    monkeypatch.setattr(config, "local_time_now", lambda: time(2, 30))
    assert night.in_window()
    monkeypatch.setattr(config, "local_time_now", lambda: time(12, 0))
    assert not night.in_window()
