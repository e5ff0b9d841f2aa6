"""The ``medarchive`` command: argument parsing and presentation only; the work is in services.

One module per group of commands; importing them registers their commands on :data:`app`.
:func:`main` turns every failure into one ``error: <cause>; <remedy>`` line and an exit code
(0 done; 1 done but something was quarantined, failed or is damaged; 2 usage error or not
found; 3 a service or the file system is unavailable; 130 interrupted); ``--debug`` (or
``MEDARCHIVE_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import errno
import re
import traceback
from collections.abc import Iterator

from rich.markup import escape

# importing the command modules registers their commands on the app
from archive.cli import backup, bench_scp, bench_serve, browse, codecs, corrections, features, info, ingest, maintenance, manage, normalize, scp, serve, service, train  # noqa: F401,E501
from archive.cli._app import app, debug_enabled, err_console
from archive.errors import ArchiveError

__all__ = ["app", "describe_failure", "main"]

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        if exc.code == EXIT_INTERRUPTED and _interrupted_silently(exc):
            err_console.print("[red]interrupted[/red]", highlight=False)
        raise
    except BaseException as exc:  # noqa: BLE001  (the one place every failure is turned into an exit code)
        if debug_enabled():
            traceback.print_exc()
        message, code = describe_failure(exc)
        text = escape(message)
        err_console.print(f"[red]error:[/red] {text}" if code != EXIT_INTERRUPTED else f"[red]{text}[/red]",
                          highlight=False, soft_wrap=True)
        raise SystemExit(code) from None


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """The ``error:`` line (cause; remedy) and the exit code for a failure that ended a command."""
    chain = list(_chain(exc))
    if any(isinstance(e, KeyboardInterrupt) for e in chain):
        return "interrupted", EXIT_INTERRUPTED
    for e in chain:
        if isinstance(e, ArchiveError):
            return str(e), e.exit_code
    from sqlalchemy import exc as sa_exc

    for e in chain:
        if isinstance(e, (sa_exc.ArgumentError, sa_exc.NoSuchModuleError)):
            return (f"the catalog URL {_catalog_url_for_display()!r} is not a database URL ({_first_line(e)}); "
                    "check MEDARCHIVE_DATABASE_URL (or database_url in the configuration file), e.g. "
                    "postgresql+psycopg://user@host/medarchive or sqlite:////path/catalog.sqlite"), EXIT_USAGE
        if isinstance(e, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return _database_unavailable(e), EXIT_UNAVAILABLE
    for e in chain:
        if _is_broker_error(e):
            from workers.service import broker_unavailable

            return str(broker_unavailable(e)), EXIT_UNAVAILABLE
    for e in chain:
        if isinstance(e, OSError):
            return _os_error(e), EXIT_UNAVAILABLE
    return (f"unexpected {type(exc).__name__}: {_first_line(exc) or 'no message'}; "
            "run with --debug for the traceback and report it"), EXIT_INTERNAL


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _interrupted_silently(exc: SystemExit) -> bool:
    """Typer turns Ctrl-C into a bare exit 130; a command that printed its own "interrupted" raised no KeyboardInterrupt."""
    exit_exc = exc.__context__
    return exit_exc is not None and isinstance(exit_exc.__cause__, KeyboardInterrupt)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("(Background")]
    return lines[0] if lines else ""


def _settings_url() -> str | None:
    try:
        from archive.config import Settings

        return Settings.load().database_url
    except Exception:  # noqa: BLE001  (the message must not fail too)
        return None


def _catalog_url_for_display() -> str:
    url = _settings_url() or "?"
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _database_unavailable(e: BaseException) -> str:
    from sqlalchemy.engine import make_url

    url = _settings_url()
    reason = _db_reason(e)
    try:
        parsed = make_url(url) if url else None
    except Exception:  # noqa: BLE001
        parsed = None
    if parsed is not None and parsed.get_backend_name() == "sqlite":
        return (f"cannot use the SQLite catalog {parsed.database} ({reason}); check that MEDARCHIVE_HOME is "
                "writable, has free space, and that no other program holds the file")
    where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}" if parsed is not None else "?"
    return (f"cannot reach the catalog database at {where} ({reason}): is PostgreSQL running? "
            "check MEDARCHIVE_DATABASE_URL")


def _db_reason(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e)
    for known in ("connection refused", "could not translate host name", "name or service not known",
                  "timeout expired", "password authentication failed", "no password supplied",
                  "does not exist", "no route to host", "connection timed out", "database is locked",
                  "unable to open database file", "readonly database", "disk i/o error", "database or disk is full"):
        if known in text.lower():
            match = re.search(r"FATAL:\s*(.+)", text)
            return match.group(1).strip() if match and known in ("does not exist", "password authentication failed",
                                                                 "no password supplied") else known
    return _first_line(e) or type(e).__name__


def _is_broker_error(e: BaseException) -> bool:
    module = type(e).__module__
    return module.startswith(("kombu", "redis", "amqp")) and type(e).__name__ in (
        "OperationalError", "ConnectionError", "TimeoutError", "ConnectionRefusedError")


def _os_error(e: OSError) -> str:
    path = f" {e.filename}" if e.filename else ""
    reason = (e.strerror or str(e)).lower()
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        remedy = "free some space (`medarchive gc` reclaims unreferenced blobs) or move MEDARCHIVE_HOME"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        remedy = "make it writable or set MEDARCHIVE_HOME to a writable folder"
    else:
        remedy = "check the path, its file system and MEDARCHIVE_HOME"
    return f"cannot use{path} ({reason}); {remedy}"
