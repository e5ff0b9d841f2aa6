"""What every command shares: the Typer app, the consoles, opening the archive, formatting."""

from __future__ import annotations

import typer
from rich.console import Console

from archive.config import Settings
from archive.services.runtime import Archive

app = typer.Typer(help="medarchive: archive DICOM studies compressed, verified, and retrievable by Study Instance UID.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Catalog schema.", no_args_is_help=True)
quarantine_app = typer.Typer(help="Files that could not be archived.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks on a folder of DICOM.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(bench_app, name="bench")
console = Console()
err_console = Console(stderr=True)


def open_archive() -> Archive:
    return Archive.open(Settings.load())


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)
