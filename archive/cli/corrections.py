"""Commands that correct archived data: update attributes, merge patients, and show what was changed."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from archive.cli._app import app, console, open_archive
from archive.cli._format import short_uid
from archive.services import corrections

_JSON_HELP = "Print the result as JSON (full UIDs) instead of a table."


def _clip(text: str | None, width: int = 24) -> str:
    text = text or ""
    return text if len(text) <= width else text[:width - 1] + "…"


def _print_report(report: corrections.CorrectionReport) -> None:
    data = report.as_dict()
    verb = "would change" if report.dry_run else "changed"
    what = f"series {short_uid(report.series_uid, 24)}" if report.series_uid else (
        f"study {short_uid(report.studies[0], 24)}" if len(report.studies) == 1 else f"{len(report.studies)} studies")
    suffix = " (dry run: nothing written)" if report.dry_run else (
        f" (audit {report.audit_id})" if report.audit_id is not None else "")
    console.print(f"{verb.capitalize()} {report.instances} instance(s) of {what}{suffix}; "
                  f"{report.unchanged} already had these values.", highlight=False)
    changed = [c for c in data["changes"] if c["instances"]]
    if not changed:
        return
    table = Table(show_edge=False)
    for column in ("attribute", "previous", "new", "instances"):
        table.add_column(column, overflow="fold")
    for change in changed:
        previous = "\n".join(f"{_clip(p['value']) or '(empty)'}" + (f" ×{p['instances']}" if len(
            change["previous"]) > 1 else "") for p in change["previous"])
        table.add_row(change["keyword"], previous, _clip(change["new"]) or "(cleared)", str(change["instances"]))
    console.print(table)


_KEYWORDS_EPILOG = (f"Patient: {', '.join(corrections.PATIENT_KEYWORDS)}.  "
                    f"Study: {', '.join(corrections.STUDY_KEYWORDS)}.  "
                    f"Series (with --series): {', '.join(corrections.SERIES_KEYWORDS)}.")


@app.command(epilog=_KEYWORDS_EPILOG)
def update(
    study_uid: Annotated[Optional[str], typer.Argument(
        help="Study Instance UID (may be left out with --series).")] = None,
    assignments: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEYWORD=VALUE",
        help="An attribute and its corrected value, e.g. PatientID=12345; repeat for several; "
             "KEYWORD= clears the value.")] = None,
    reason: Annotated[Optional[str], typer.Option(
        "--reason", help="Why the data is changed (required; kept in the audit log).")] = None,
    series: Annotated[Optional[str], typer.Option(
        "--series", metavar="SERIES_UID",
        help="Correct series attributes (SeriesDescription, BodyPartExamined, ...) of this series.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would change; write nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=_JSON_HELP)] = False,
) -> None:
    """Correct patient and study attributes (or, with --series, series attributes) of archived headers.

    The previous header of every instance is kept (see `medarchive history`); pixel data and UIDs never change.
    """
    values = corrections.parse_assignments(assignments or [], series_level=series is not None)
    with open_archive() as archive:
        report = corrections.update_attributes(archive, study_uid, values, reason=reason or "",
                                               series_uid=series, dry_run=dry_run)
    if as_json:
        console.print_json(json.dumps(report.as_dict()))
        return
    _print_report(report)


@app.command("merge-patient")
def merge_patient(
    old_id: Annotated[str, typer.Argument(help="The Patient ID to replace.")],
    new_id: Annotated[str, typer.Argument(help="The Patient ID every study of OLD_ID gets.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Also set the Patient Name (DICOM PN, "
                                                "e.g. Doe^Jane).")] = None,
    reason: Annotated[Optional[str], typer.Option(
        "--reason", help="Why the studies are moved (required; kept in the audit log).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would change; write nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=_JSON_HELP)] = False,
) -> None:
    """Move every study of patient OLD_ID to NEW_ID (headers corrected and kept as revisions, one audit entry)."""
    with open_archive() as archive:
        report = corrections.merge_patient(archive, old_id, new_id, reason=reason or "", name=name,
                                           dry_run=dry_run)
    if as_json:
        console.print_json(json.dumps(report.as_dict()))
        return
    verb = "Would move" if dry_run else "Moved"
    console.print(f"{verb} {len(report.studies)} study(ies) from Patient ID {old_id} to {new_id}.", highlight=False)
    for uid in report.studies:
        console.print(f"  {short_uid(uid, 40)}", highlight=False)
    _print_report(report)


@app.command()
def history(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the audit entries and every kept header revision "
                                          "as JSON.")] = False,
) -> None:
    """Corrections and other recorded changes of a study: who, when, why, what; previous headers are kept."""
    with open_archive() as archive:
        result = corrections.study_history(archive, study_uid)
    if as_json:
        console.print_json(json.dumps(result))
        return
    console.print(f"Study {short_uid(study_uid, 40)}: patient {result['patient_name'] or ''} "
                  f"({result['patient_id'] or ''}); {len(result['events'])} recorded change(s), "
                  f"{len(result['revisions'])} kept header revision(s).", highlight=False)
    for event in result["events"]:
        when = event["created_at"][:19].replace("T", " ")
        console.print(f"[bold]#{event['id']}[/bold] {when} UTC  {event['action']}  by {event['actor']}",
                      highlight=False)
        console.print(f"    why: {event['reason'] or '-'}", highlight=False, markup=False)
        if event["instances"]:
            revisions = ", ".join(map(str, event["revisions"]))
            console.print(f"    {event['instances']} instance(s); previous header kept as revision {revisions}",
                          highlight=False)
        elif event["target"] != result["study_uid"]:
            console.print(f"    target: {event['target']}", highlight=False, markup=False)
        for keyword, change in event["changes"].items():
            previous = ", ".join(_clip(v, 24) or "(empty)" for v in change["previous"][:3])
            if len(change["previous"]) > 3:
                previous += f" (+{len(change['previous']) - 3} more)"
            console.print(f"    {keyword}: {previous} → {_clip(change['new'], 24) or '(cleared)'}",
                          highlight=False, markup=False)
