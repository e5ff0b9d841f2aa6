"""Formatting every command's tables share: compact columns for 80 columns, shortened UIDs and paths."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from rich import box
from rich.markup import escape
from rich.table import Table

JSON_HELP = "Print the result as JSON (every value in full) instead of a table."
UID_WIDTH = 16


def short_uid(uid: str | None, width: int = UID_WIDTH) -> str:
    """A UID shortened in the middle for a table (``1.2.840.1…45.6``); ``--json`` has it whole."""
    if not uid:
        return ""
    if len(uid) <= width:
        return uid
    head = (width - 1) // 2
    return uid[:head] + "…" + uid[-(width - 1 - head):]


def short_path(path: str | None, width: int = 30) -> str:
    """A path keeping its end (the file name and its folder), which is what tells files apart."""
    if not path:
        return ""
    return path if len(path) <= width else "…" + path[-(width - 1):]


def short_time(value: datetime | str | None) -> str:
    if value is None:
        return ""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone().strftime("%m-%d %H:%M")


Column = str | tuple[str, Optional[int]] | tuple[str, Optional[int], str]


def table(title: str, *columns: Column) -> Table:
    """A compact table the width of the console: ``(name, width[, justify])`` columns keep their width, the others
    (a bare name, or width None) share what is left and cut their text with an ellipsis."""
    result = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, expand=True,
                   title_justify="left")
    for column in columns:
        name, width, justify = (column, None, "left") if isinstance(column, str) else (*column, "left")[:3]
        result.add_column(name, width=width, ratio=None if width else 1, justify=justify,
                          no_wrap=True, overflow="ellipsis")
    return result


def cell(text: Any) -> str:
    """Catalog text as a table cell: escaped, so ``[...]`` in a patient name is not taken as markup."""
    return escape(str(text)) if text is not None else ""


def number(value: float | None, digits: int = 2) -> str:
    """A benchmark figure, or ``-`` where it was not measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def print_goals_and_notes(console: Any, result: dict[str, Any]) -> None:
    """A benchmark's goal lines (met, missed, not measured; with the ratio when it has one), then its notes."""
    marks = {True: "[green]met[/green]", False: "[red]missed[/red]", None: "[yellow]not measured[/yellow]"}
    for goal in result["goals"]:
        ratio = f" (× {number(goal['ratio'])})" if "ratio" in goal else ""
        console.print(f"{marks[goal['met']]}  {goal['goal']}{ratio}", highlight=False)
    for note in result["notes"]:
        console.print(f"• {note}", markup=False)
