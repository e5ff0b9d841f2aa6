"""Commands that look into the archive: find studies, show one, retrieve, jobs, the quarantine.

Tables fit 80 columns: UIDs and paths are shortened in the middle (``1.2.840.1…45.6``);
``--json`` gives every value in full, for scripts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from archive.cli._app import app, console, err_console, human, open_archive, quarantine_app
from archive.cli._format import JSON_HELP, UID_WIDTH, cell, short_path, short_time, short_uid, table
from archive.kinds import Variant
from archive.services import query
from archive.services.retrieve import TRANSFER_SYNTAX_CHOICES, RetrieveReport, retrieve

# --- jobs


def print_jobs(summaries: list[query.JobSummary], title: str = "Jobs") -> None:
    out = table(f"{title} ({len(summaries)})", ("id", 5, "right"), ("kind", 7), ("status", 11),
                ("study / policy", 14), ("done", 9, "right"), ("created", 11), "result")
    for s in summaries:
        detail = ", ".join(f"{v} {k}" for k, v in sorted(s.outcomes.items(), key=lambda kv: -kv[1]))
        if s.error:
            detail = f"error: {s.error}" + (f" ({detail})" if detail else "")
        out.add_row(str(s.id), s.kind, s.status, cell(s.policy or short_uid(s.study_uid, 14)), f"{s.final}/{s.total}",
                    short_time(s.created_at), cell(detail))
    console.print(out)


@app.command("jobs")
def jobs_command(
    status: Annotated[Optional[str], typer.Option(help="queued | running | done | failed | interrupted | spooling")] = None,
    job_id: Annotated[Optional[int], typer.Option("--id", help="One job, with its failed instances.")] = None,
    limit: Annotated[int, typer.Option(help="Newest jobs shown.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Jobs from the catalog (service jobs and direct ingests): state, instance counts, outcomes, errors."""
    with open_archive(read_only=True) as archive, archive.unit_of_work() as uow:
        summaries = query.list_jobs(uow.session, status=status, job_id=job_id, limit=limit)
        errors = query.job_errors(uow.session, job_id) if job_id is not None else []
    if as_json:
        console.print_json(json.dumps({"jobs": [s.as_dict() for s in summaries],
                                       "errors": [{"item": i, "status": st, "error": e} for i, st, e in errors]}))
        return
    print_jobs(summaries)
    if errors:
        out = table(f"Instances of job {job_id} that did not archive", ("item", 30), ("status", 11), "error")
        for item, item_status, error in errors:
            out.add_row(cell(short_path(item)), item_status, cell(error))
        console.print(out)


# --- studies


@app.command()
def studies(
    patient_id: Annotated[Optional[str], typer.Option("--patient-id", help="Patient ID; wildcards * and ?.")] = None,
    patient_name: Annotated[Optional[str], typer.Option(
        "--patient-name", help="Patient's Name, any case; wildcards * and ? (e.g. 'DOE^J*').")] = None,
    date: Annotated[Optional[str], typer.Option(
        "--date", help="StudyDate YYYYMMDD, or a range FROM-TO; FROM- and -TO leave one end open.")] = None,
    modality: Annotated[Optional[str], typer.Option(help="Studies with a series of this modality (CT, MR, ...).")] = None,
    accession: Annotated[Optional[str], typer.Option(help="Accession Number; wildcards * and ?.")] = None,
    description: Annotated[Optional[str], typer.Option(help="Study Description, any case; wildcards * and ?.")] = None,
    limit: Annotated[int, typer.Option(help="Most studies listed, newest StudyDate first.")] = query.DEFAULT_STUDY_LIMIT,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP + " A list of studies.")] = False,
) -> None:
    """Find archived studies by patient, date, modality, accession number or description (newest first)."""
    date_from, date_to = query.parse_date_range(date) if date else (None, None)
    filters = query.StudyFilter(patient_id=patient_id, patient_name=patient_name, date_from=date_from,
                                date_to=date_to, modality=modality, accession=accession, description=description)
    with open_archive(read_only=True) as archive:
        page = query.find_studies(archive, filters, limit=limit)
    if page.truncated:
        err_console.print(f"showing the newest {len(page.studies)} of {page.matched} matching studies: "
                          "narrow the search or raise --limit", highlight=False)
    if as_json:
        console.print_json(json.dumps(page.studies))
        return
    out = table(f"Studies ({len(page.studies)} of {page.matched})" if page.truncated else f"Studies ({page.matched})",
                ("Study UID", UID_WIDTH), "patient", ("date", 8), ("mod", 5), ("inst", 5, "right"),
                ("stored", 9, "right"), ("ratio", 5, "right"), ("norm", 4, "right"))
    for r in page.studies:
        patient = f"{r['patient_name'] or ''} ({r['patient_id'] or ''})" if r["patient_id"] else r["patient_name"] or ""
        out.add_row(short_uid(r["study_uid"]), cell(patient), r["study_date"] or "",
                    cell((r["modalities"] or "").replace("\\", ",")), str(r["instances"]), human(r["bytes_stored"]),
                    f"{r['ratio'] or 0:.2f}", str(r["derived_series"] or ""))
    console.print(out)
    if any(r["derived_series"] for r in page.studies):
        console.print("inst, stored, ratio: the originals; norm: normalized series, counted apart "
                      "(`show` lists them, `get --variant normalized` retrieves them)", highlight=False)


@app.command()
def show(
    uid: Annotated[str, typer.Argument(metavar="UID", help="A Study Instance UID, or a Series Instance UID for one series.")],
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Series, instances, codec, sizes and errors of one study (or one series of it)."""
    with open_archive(read_only=True) as archive:
        study = query.show_study(archive, uid)
    if as_json:
        console.print_json(json.dumps(study, default=str))
        return
    console.print(f"[bold]Study {cell(study['study_uid'])}[/bold]", soft_wrap=True)
    console.print(f"{cell(study['patient_name'] or '')} ({cell(study['patient_id'] or '')})  "
                  f"{study['study_date'] or ''}  {cell(study['study_description'] or '')}", highlight=False)
    console.print(f"{study['num_series']} series, {study['instances']} instances, "
                  f"{human(study['bytes_original'])} → {human(study['bytes_stored'])}", highlight=False)
    if study["derived_series"]:
        console.print(f"derived (not counted above): {study['derived_series']} series, "
                      f"{study['derived_instances']} instances, {human(study['bytes_derived'])} stored", highlight=False)
    for series in study["series"]:
        derivation = series["derivation"]
        heading = ""
        if derivation:
            made = "lossy" if derivation["kind"] == "lossy" else "normalized"
            heading = (f" · {made} ({derivation['profile']}, gen {derivation['generation']}"
                       f"{'' if derivation['current'] else ', superseded'}) of {short_uid(series['derived_from'], 20)}")
        out = table(f"Series {series['series_number'] if series['series_number'] is not None else '-'} "
                    f"{series['modality'] or ''} {cell(series['description'] or '')} "
                    f"({short_uid(series['series_uid'], 24)}){heading}",
                    ("instance", UID_WIDTH), ("mode", 11), "codec", ("stored", 9, "right"), ("ratio", 5, "right"),
                    ("error", 8, "right"), ("status", 8))
        for inst in series["instances"]:
            for enc in inst["encodings"]:
                if enc["max_abs_error"] is None and enc["mse"] is None:
                    error = "-"
                elif enc["psnr"] is None and enc["mse"] == 0:
                    error = "exact"
                else:
                    error = f"{enc['psnr']:.1f} dB" if enc["psnr"] is not None else f"±{enc['max_abs_error']:g}"
                ran = ",".join(enc["actual_codecs"])
                codec = enc["codec"] if not ran or ran == enc["codec"] else f"{enc['codec']}>{ran}"
                if enc["max_error_bound"] not in (None, 0):
                    error += f" ≤{enc['max_error_bound']}"
                state = inst["status"] if enc["current"] else ("released" if enc["released"] else "old")
                out.add_row(short_uid(inst["sop_instance_uid"]), inst["storage_mode"], cell(codec),
                            human(enc["bytes_after"]), f"{enc['ratio']:.2f}", error, state)
        console.print(out)
        if derivation:
            console.print("  " + _derivation_line(derivation), highlight=False, soft_wrap=True)
        released = sum(1 for inst in series["instances"] if inst["status"] == "lossy-only")
        if released:
            console.print(f"  {released} instance(s) lossy-only: their lossless originals were released by a policy; "
                          "`medarchive get --allow-lossy` gives their lossy derivatives (listed in the lossy series)",
                          highlight=False, soft_wrap=True)


def _derivation_line(derivation: dict[str, Any]) -> str:
    if derivation["kind"] == "lossy":
        params = derivation["params"]
        kept = "kept" if params.get("keep_lossless", True) else "released"
        context = f"; series context blob {params['context_blob'][:12]}…" if params.get("context_blob") else ""
        return (f"lossy representation: codec {json.dumps(params.get('codec'))}, policy {params.get('policy')}, "
                f"lossless originals {kept}{context}")
    target = derivation["target_geometry"]
    spacing = target.get("spacing")
    grid = f"{target.get('rows')}x{target.get('columns')}" + (f" at {spacing[1]:.4g} mm" if spacing else " (no spacing)")
    error = ("" if derivation["rmse"] is None else
             f"; normalization error RMSE {derivation['rmse']:.2f}, max {derivation['max_abs_error']:.0f} (modality units)")
    across = " and across slices" if derivation["across_slices"] else ""
    warnings = "".join(f"\n  warning: {w}" for w in derivation["warnings"])
    return f"{grid}, {derivation['interpolation']} in-plane{across}{error}{warnings}"


# --- retrieval


@app.command()
def get(
    uid: Annotated[str, typer.Argument(metavar="UID", help="A Study Instance UID, or a Series Instance UID for one series.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the DICOM files into.")],
    transfer_syntax: Annotated[str, typer.Option("--transfer-syntax", help="|".join(TRANSFER_SYNTAX_CHOICES))] = "explicit-le",
    include_conflicts: Annotated[bool, typer.Option(help="Also write recorded conflicts.")] = False,
    keep_going: Annotated[bool, typer.Option(
        "--keep-going", help="Write every readable instance and list the damaged ones (exit 1) instead of stopping.")] = False,
    variant: Annotated[Variant, typer.Option(
        "--variant", help="For a study: its original series, its current normalized or lossy series, or all.")
    ] = Variant.ORIGINAL,
    allow_lossy: Annotated[bool, typer.Option(
        "--allow-lossy", help="Where a policy released an original's lossless form, write its lossy derivative "
        "(under the derivative's own UID) instead of leaving it out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Write a study's (or one series') instances as DICOM Part 10 files."""
    with open_archive(read_only=True) as archive:
        report = retrieve(archive, uid, out, transfer_syntax=transfer_syntax, include_conflicts=include_conflicts,
                          keep_going=keep_going, variant=variant, allow_lossy=allow_lossy)
    if as_json:
        console.print_json(json.dumps(_retrieve_dict(report, out)))
    else:
        syntaxes = ", ".join(f"{n} {name}" for name, n in report.syntaxes.items())
        console.print(f"wrote {len(report.files)} instance(s) to {cell(out)}" + (f" ({syntaxes})" if syntaxes else ""),
                      highlight=False, soft_wrap=True)
        for f in report.files:
            if f.note:
                console.print(f"  {cell(f.path.name)}: {cell(f.note)}", highlight=False, soft_wrap=True)
    if report.lossy_only:
        verb = "written instead" if allow_lossy else "NOT written (use --allow-lossy)"
        held = table(f"{len(report.lossy_only)} original(s) held only as lossy derivatives: {verb}",
                     ("original", UID_WIDTH), ("lossy derivative", UID_WIDTH))
        for original, derivative in report.lossy_only:
            held.add_row(original, derivative or "(none)")
        err_console.print(held)
    if report.unreadable:
        damaged = table(f"{len(report.unreadable)} instance(s) could not be read", ("instance", UID_WIDTH),
                        ("series", UID_WIDTH), ("problem", 7), "error")
        for u in report.unreadable:
            damaged.add_row(short_uid(u.sop_instance_uid), short_uid(u.series_uid), u.problem, cell(u.error))
        err_console.print(damaged)
        err_console.print(f"`medarchive verify --study {report.study_uid}` lists the damaged blobs; ingesting the "
                          "original files again repairs them", highlight=False)
        raise typer.Exit(1)


def _retrieve_dict(report: RetrieveReport, out: Path) -> dict[str, Any]:
    return {
        "study_uid": report.study_uid, "series_uid": report.series_uid, "out": str(out),
        "files": [{"path": str(f.path), "sop_instance_uid": f.sop_instance_uid, "transfer_syntax": f.transfer_syntax,
                   "source_path": f.source_path, "note": f.note} for f in report.files],
        "unreadable": [{"sop_instance_uid": u.sop_instance_uid, "series_uid": u.series_uid, "problem": u.problem,
                        "error": u.error} for u in report.unreadable],
        "lossy_only": [{"sop_instance_uid": original, "lossy_derivative": derivative}
                       for original, derivative in report.lossy_only],
    }


# --- the quarantine (retry and purge: archive.cli.manage)


@quarantine_app.command("list")
def quarantine_list(as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False) -> None:
    """Quarantined files, with the reason each was refused (`quarantine retry`, `quarantine purge` manage them)."""
    with open_archive(read_only=True) as archive:
        rows = query.list_quarantine(archive)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    out = table(f"Quarantine ({len(rows)})", ("id", 5, "right"), ("since", 11), ("source", 28), "reason")
    for r in rows:
        out.add_row(str(r["id"]), short_time(r["created_at"]), cell(short_path(r["source_path"], 28)),
                    cell(f"{r['error_type']}: {r['reason']}"))
    console.print(out)
