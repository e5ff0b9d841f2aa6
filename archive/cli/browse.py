"""Commands that look into the archive: studies, one study, retrieval, jobs, the quarantine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from archive.cli._app import app, console, human, open_archive, quarantine_app
from archive.services import query
from archive.services.retrieve import TRANSFER_SYNTAX_CHOICES, retrieve_study

def print_jobs(summaries: list[query.JobSummary], title: str = "Jobs") -> None:
    table = Table(title=f"{title} ({len(summaries)})")
    for column in ("id", "kind", "status", "study / policy", "instances", "outcomes", "created", "error"):
        table.add_column(column, overflow="fold")
    for s in summaries:
        table.add_row(str(s.id), s.kind, s.status, s.policy or s.study_uid or "", f"{s.final}/{s.total}",
                      ", ".join(f"{k} {v}" for k, v in sorted(s.outcomes.items())),
                      s.created_at.strftime("%Y-%m-%d %H:%M:%S"), s.error or "")
    console.print(table)


@app.command()
def studies(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List archived studies."""
    with open_archive() as archive:
        rows = query.list_studies(archive)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title=f"Studies ({len(rows)})")
    for column in ("Study Instance UID", "patient", "date", "modalities", "series", "instances", "original", "stored", "ratio"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r["study_uid"], f"{r['patient_name'] or ''} ({r['patient_id'] or ''})", r["study_date"] or "",
                      r["modalities"] or "", str(r["series"]), str(r["instances"]), human(r["bytes_original"]),
                      human(r["bytes_stored"]), f"{r['ratio'] or 0:.2f}")
    console.print(table)


@app.command()
def show(study_uid: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Series, instances, codec, parameters, errors and sizes of one study."""
    with open_archive() as archive:
        study = query.show_study(archive, study_uid)
    if as_json:
        console.print_json(json.dumps(study, default=str))
        return
    console.print(f"[bold]{study['study_uid']}[/bold]  {study['patient_name'] or ''}  {study['study_date'] or ''}  "
                  f"{study['modalities'] or ''}  {study['instances']} instances, "
                  f"{human(study['bytes_original'])} → {human(study['bytes_stored'])}")
    for series in study["series"]:
        table = Table(title=f"Series {series['series_number']} {series['modality'] or ''} {series['description'] or ''} "
                            f"({series['series_uid']})", title_justify="left")
        for column in ("instance", "mode", "codec", "config", "ran", "bytes", "ratio", "bpp", "max err", "PSNR dB", "status"):
            table.add_column(column, overflow="fold")
        for inst in series["instances"]:
            for enc in inst["encodings"]:
                table.add_row(
                    inst["sop_instance_uid"], inst["storage_mode"], enc["codec"], json.dumps(enc["config"]),
                    ",".join(f"{k}×{v}" for k, v in enc["actual_codecs"].items()),
                    f"{enc['bytes_before']}→{enc['bytes_after']}", f"{enc['ratio']:.2f}", f"{enc['bits_per_pixel']:.3f}",
                    f"{enc['max_abs_error']:g}" if enc["max_abs_error"] is not None else "-",
                    "exact" if enc["psnr"] is None and enc["mse"] == 0 else f"{enc['psnr']:.2f}",
                    inst["status"] + ("" if enc["current"] else " (old)"),
                )
        console.print(table)


@app.command()
def get(
    study_uid: str,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the DICOM files into.")],
    transfer_syntax: Annotated[str, typer.Option("--transfer-syntax", help="|".join(TRANSFER_SYNTAX_CHOICES))] = "explicit-le",
    include_conflicts: Annotated[bool, typer.Option(help="Also write recorded conflicts.")] = False,
) -> None:
    """Write a study's instances as DICOM Part 10 files."""
    with open_archive() as archive:
        report = retrieve_study(archive, study_uid, out, transfer_syntax=transfer_syntax,
                                include_conflicts=include_conflicts)
    syntaxes = ", ".join(f"{n} {name}" for name, n in report.syntaxes.items())
    console.print(f"wrote {len(report.files)} instance(s) to {out} ({syntaxes})")
    for f in report.files:
        if f.note:
            console.print(f"  {f.path.name}: {f.note}")


@quarantine_app.command("list")
def quarantine_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Quarantined files, with the reason each was refused."""
    with open_archive() as archive:
        rows = query.list_quarantine(archive)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title=f"Quarantine ({len(rows)})")
    for column in ("id", "source", "reason", "copy"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(str(r["id"]), r["source_path"], r["reason"], r["stored_path"])
    console.print(table)


@app.command("jobs")
def jobs_command(
    status: Annotated[Optional[str], typer.Option(help="queued | running | done | failed | spooling")] = None,
    job_id: Annotated[Optional[int], typer.Option("--id", help="One job, with its failed instances.")] = None,
    limit: Annotated[int, typer.Option()] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Jobs from the catalog: state, instance counts, outcomes, errors."""
    with open_archive() as archive, archive.unit_of_work() as uow:
        summaries = query.list_jobs(uow.session, status=status, job_id=job_id, limit=limit)
        errors = query.job_errors(uow.session, job_id) if job_id is not None else []
    if as_json:
        console.print_json(json.dumps({"jobs": [s.as_dict() for s in summaries],
                                       "errors": [{"item": i, "status": st, "error": e} for i, st, e in errors]}))
        return
    print_jobs(summaries)
    if errors:
        table = Table(title=f"Instances of job {job_id} that did not archive")
        for column in ("item", "status", "error"):
            table.add_column(column, overflow="fold")
        for row in errors:
            table.add_row(*row)
        console.print(table)
