"""What every command shares: the Typer app, the consoles, opening the archive, formatting."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from archive.config import Settings, unknown_environment
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

_debug = False


def debug_enabled() -> bool:
    """``--debug`` or ``MEDARCHIVE_DEBUG=1``: failures show their traceback instead of one ``error:`` line."""
    return _debug or os.environ.get("MEDARCHIVE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def version() -> str:
    from archive import package_version

    return package_version() or "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        console.print(f"medarchive {version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", envvar="MEDARCHIVE_DEBUG",
                                        help="Show the traceback of a failure instead of one error line.")] = False,
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print medarchive's version and exit.")] = False,
) -> None:
    """medarchive: archive DICOM studies compressed, verified, and retrievable by Study Instance UID."""
    global _debug
    _debug = debug
    for warning in unknown_environment():
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True)


def open_archive(*, read_only: bool = False) -> Archive:
    """The archive of the configured home; ``read_only`` for commands that only look (a mounted backup opens too)."""
    return Archive.open(Settings.load(), read_only=read_only)


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def run_benchmark(run: Callable[..., Any], show: Callable[[Any, Console], None], folder: Path,
                  options: dict[str, Any], as_json: bool) -> None:
    """One benchmark command: JSON on stdout, or a status line while it runs and then its tables."""
    if as_json:
        console.print_json(json.dumps(run(folder, **options), default=str))
        return
    with err_console.status("benchmark…") as status:
        result = run(folder, progress=status.update, **options)
    show(result, console)
