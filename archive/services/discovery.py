"""Which files under the paths handed in are candidates, in a stable order; sources are only read."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from archive.errors import NotFoundError
from archive.services.outcomes import FileOutcome, Outcome

HIDDEN_OR_TEMPORARY = (".", "~")
TEMPORARY_SUFFIXES = ("~", ".part", ".tmp", ".partial", ".crdownload")


def is_hidden_or_temporary(name: str) -> bool:
    """``.name``, ``name~``, ``.part``/``.tmp`` and friends: never archived, never moved."""
    return name.startswith(HIDDEN_OR_TEMPORARY) or name.endswith(TEMPORARY_SUFFIXES)


def discover(paths: Iterable[Path]) -> tuple[list[Path], list[FileOutcome]]:
    """Files under ``paths`` in a stable order, and those set aside before reading.

    A path that does not exist is an error (:class:`NotFoundError`), raised
    before anything is read or recorded: a misspelt folder must not look like
    an empty one.
    """
    roots = [Path(root) for root in paths]
    missing = [root for root in roots if not root.is_file() and not root.is_dir()]
    if missing:
        names = ", ".join(str(root) for root in missing)
        raise NotFoundError(f"no such file or folder: {names}; check the path (nothing was archived)")
    found: list[Path] = []
    skipped: list[FileOutcome] = []
    for root in roots:
        if root.is_file():
            found.append(root)
            continue
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                path = Path(folder) / name
                if is_hidden_or_temporary(name):
                    skipped.append(FileOutcome(path, Outcome.SKIPPED, "hidden or temporary file"))
                elif path.is_file():
                    found.append(path)
    return found, skipped
