"""medarchive: an archive service for medical images (see README.md)."""

from __future__ import annotations


def package_version() -> str | None:
    """The installed distribution's version; None in a tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medarchive")
    except PackageNotFoundError:
        return None
