"""The one wall clock: timezone-aware UTC for the catalog, local time of day for policy windows.

The catalog stores UTC; SQLite hands datetimes back without a zone, so
:func:`aware_utc` treats a naive value as UTC. Re-compression windows
("01:00-05:00") are local time of day, read through :func:`local_time_now`.
Code that decides by the clock takes the time (or a callable like these) as a
parameter, so tests pass a fixed one instead of waiting or patching.
"""

from __future__ import annotations

from datetime import datetime, time, timezone


def utcnow() -> datetime:
    """Now, timezone-aware, in UTC."""
    return datetime.now(timezone.utc)


def aware_utc(value: datetime | None) -> datetime | None:
    """``value`` as an aware UTC datetime; a naive one (SQLite's) is taken to be UTC already."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def local_time_now() -> time:
    """The local time of day (no date, no zone): what a policy's window is written in."""
    return datetime.now().time()
