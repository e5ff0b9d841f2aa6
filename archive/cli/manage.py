"""Commands that change what is archived: delete a study or series, retry or purge the quarantine.

Each leaves an audit record; deletes ask first (``--yes`` for scripts, which
must say so: without a terminal and without ``--yes`` nothing is deleted).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from archive.cli._app import app, console, err_console, human, open_archive, quarantine_app
from archive.cli._format import JSON_HELP, cell, short_path, table
from archive.errors import ArchiveError
from archive.services.deletion import (
    DeletionReport,
    delete_series,
    delete_study,
    plan_series_deletion,
    plan_study_deletion,
)
from archive.services.quarantine import purge_quarantine, retry_quarantined


@app.command()
def delete(
    study_uid: Annotated[Optional[str], typer.Argument(metavar="[STUDY_UID]", help="The study to delete.")] = None,
    series: Annotated[Optional[str], typer.Option("--series", metavar="UID", help="Delete one series instead.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask (needed when not run from a terminal).")] = False,
    reason: Annotated[Optional[str], typer.Option(help="Why, for the audit log.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Delete a study (or --series UID) from the catalog, with an audit record; `medarchive gc` then frees its blobs."""
    if (study_uid is None) == (series is None):
        raise ArchiveError("give either a STUDY_UID or --series UID (see `medarchive studies`, `medarchive show`)")
    with open_archive() as archive:
        plan = plan_study_deletion(archive, study_uid) if study_uid else plan_series_deletion(archive, series or "")
        if not yes:
            if not sys.stdin.isatty():
                raise ArchiveError("refusing to delete without confirmation: not run from a terminal; pass --yes")
            err_console.print(_describe(plan, "will delete"), highlight=False, soft_wrap=True)
            if not typer.confirm("Delete?", default=False, err=True):
                err_console.print("nothing deleted")
                raise typer.Exit(1)
        report = delete_study(archive, study_uid, reason=reason) if study_uid else \
            delete_series(archive, series or "", reason=reason)
        grace = archive.settings.gc_grace
    if as_json:
        console.print_json(json.dumps(report.as_dict()))
        return
    console.print(_describe(report, "deleted"), highlight=False, soft_wrap=True)
    console.print(f"audit record {report.audit_id}; `medarchive gc` frees the blobs nothing else uses once "
                  f"{grace:g} s have passed", highlight=False, soft_wrap=True)


def _describe(report: DeletionReport, verb: str) -> str:
    what = f"series {report.series_uid} of study {report.study_uid}" if report.series_uid else f"study {report.study_uid}"
    patient = " ".join(p for p in (report.patient_name, f"({report.patient_id})" if report.patient_id else None) if p)
    conflicts = f" and {report.conflicts} recorded conflict(s)" if report.conflicts else ""
    emptied = " (its last series: the study goes too)" if report.series_uid and report.study_deleted else ""
    return (f"{verb} {cell(what)}{emptied}\n  patient {cell(patient) or '-'}, {report.study_date or 'no date'}, "
            f"{cell(report.study_description or 'no description')}\n  {report.series} series, {report.instances} "
            f"instance(s){conflicts}, {human(report.bytes_original)} received, {human(report.bytes_stored)} stored")


@quarantine_app.command("retry")
def quarantine_retry(
    entry_ids: Annotated[Optional[list[int]], typer.Argument(metavar="[ID]...", help="Entries to retry (see `quarantine list`).")] = None,
    all_entries: Annotated[bool, typer.Option("--all", help="Retry every entry.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Ingest quarantined copies again; archived ones leave the quarantine. Exits 1 while any stays."""
    if bool(entry_ids) == all_entries:
        raise ArchiveError("give the entry IDs to retry, or --all (see `medarchive quarantine list`)")
    with open_archive() as archive:
        report = retry_quarantined(archive, None if all_entries else entry_ids)
    if as_json:
        console.print_json(json.dumps(report.as_dict()))
    else:
        out = table(f"Retried {len(report.results)}: {len(report.released)} archived, "
                    f"{len(report.still_quarantined)} still quarantined",
                    ("id", 5, "right"), ("source", 28), ("result", 11), "reason")
        for r in report.results:
            out.add_row(str(r.entry_id), cell(short_path(r.source_path, 28)), r.outcome,
                        cell(r.reason or (f"study {r.study_uid}" if r.study_uid else "")))
        console.print(out)
    if report.still_quarantined:
        raise typer.Exit(1)


@quarantine_app.command("purge")
def quarantine_purge(
    older_than: Annotated[float, typer.Option("--older-than", metavar="DAYS", help="Entries quarantined more than "
                                              "DAYS days ago (0: all).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be purged; delete nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Delete old quarantine entries and their kept copies (with an audit record)."""
    with open_archive() as archive:
        report = purge_quarantine(archive, older_than_days=older_than, dry_run=dry_run)
    if as_json:
        console.print_json(json.dumps(report.as_dict()))
        return
    verb = "would purge" if dry_run else "purged"
    console.print(f"{verb} {len(report.entries)} entr{'y' if len(report.entries) == 1 else 'ies'} older than "
                  f"{older_than:g} day(s), {human(report.bytes)} of copies"
                  + (f" (audit record {report.audit_id})" if report.audit_id else ""), highlight=False)
    if dry_run and report.entries:
        out = table("Would purge", ("id", 5, "right"), ("source", 30), "reason")
        for e in report.entries:
            out.add_row(str(e["id"]), cell(short_path(e["source_path"])), cell(e["reason"]))
        console.print(out)
