"""The ``medarchive`` command: argument parsing and presentation only; the work is in services.

One module per group of commands; importing them registers their commands on :data:`app`.
"""

from __future__ import annotations

from archive.cli import browse, ingest, maintenance, service  # noqa: F401  (registers the commands)
from archive.cli._app import app
from archive.errors import ArchiveError
from archive.cli._app import err_console

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except ArchiveError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from exc
