"""Commands for normalized copies: run the profiles on archived studies, export volumes for ML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from archive.cli._app import app, console, err_console, human, open_archive
from archive.cli._format import JSON_HELP, cell, short_uid, table
from archive.kinds import NormalizeOutcome, Variant
from archive.services.normalization import SeriesNormalization, normalize_studies


@app.command()
def normalize(
    study: Annotated[Optional[list[str]], typer.Option(
        "--study", help="A Study Instance UID (repeatable); default: every archived study.")] = None,
    profile: Annotated[Optional[str], typer.Option(
        "--profile", help="Run this [normalize.NAME] profile (its selectors still apply), even if it is off.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be made; change nothing.")] = False,
    jobs: Annotated[Optional[int], typer.Option("--jobs", help="Processes (default: one per core).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Normalize archived series with the profiles (again after a profile changed: a new generation)."""
    from archive.services.ingest import default_jobs

    with open_archive() as archive:
        results = normalize_studies(archive, study_uids=study, profile_name=profile, dry_run=dry_run,
                                    jobs=jobs or default_jobs())
    if as_json:
        console.print_json(json.dumps([r.as_dict() for r in results], default=str))
        return
    print_normalizations(results, dry_run=dry_run)
    if any(r.outcome is NormalizeOutcome.FAILED for r in results):
        raise typer.Exit(1)


def print_normalizations(results: list[SeriesNormalization], *, dry_run: bool = False) -> None:
    """One line per source series a profile applied to, and a count of the rest."""
    shown = [r for r in results if r.outcome is not NormalizeOutcome.NOT_MATCHED]
    out = table(f"Normalization{' (dry run, nothing changed)' if dry_run else ''} ({len(shown)} series)",
                ("source series", 22), ("mod", 4), ("profile", 10), ("result", 15), ("n", 4, "right"), "detail")
    for r in shown:
        detail = r.reason
        if r.outcome in (NormalizeOutcome.NORMALIZED, NormalizeOutcome.WOULD_NORMALIZE):
            grid = f"{r.target.get('rows')}x{r.target.get('columns')}"
            detail = grid + (f", RMSE {r.rmse:.2f} max {r.max_abs_error:.0f}" if r.rmse is not None else "")
            if r.bytes_stored:
                detail += f", {human(r.bytes_stored)}"
        if r.warnings:
            detail += ("; " if detail else "") + "; ".join(r.warnings)
        out.add_row(short_uid(r.source_series_uid, 22), r.modality or "", r.profile or "", r.outcome.value,
                    str(r.instances or ""), cell(detail))
    if shown:
        console.print(out)
    rest = len(results) - len(shown)
    if rest:
        console.print(f"{rest} series matched no enabled profile", highlight=False)


@app.command()
def export(
    studies: Annotated[list[str], typer.Argument(metavar="STUDY_UID...", help="Studies (or series) to export.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the volumes (created).")],
    variant: Annotated[Variant, typer.Option("--variant", help="Which series: normalized (default) or original.")
                       ] = Variant.NORMALIZED,
    format_: Annotated[str, typer.Option("--format", help="nifti | npz")] = "nifti",
    deidentify: Annotated[bool, typer.Option(
        "--deidentify", help="Apply the PS3.15 Annex E basic profile to what is exported.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Write each series as one volume (NIfTI with its RAS affine, or NumPy with a JSON sidecar) for ML tools."""
    from archive.services.export import export_series

    if format_ not in ("nifti", "npz"):
        raise typer.BadParameter("--format must be nifti or npz")
    with open_archive(read_only=True) as archive:
        written = export_series(archive, studies, out, variant=variant, file_format=format_, deidentify=deidentify)
    if as_json:
        console.print_json(json.dumps([w.as_dict() for w in written]))
        return
    if not written:
        err_console.print(f"no {variant.value} series to export", highlight=False)
        raise typer.Exit(1)
    listing = table(f"Exported {len(written)} volume(s) to {cell(out)}", ("series", 24), ("shape", 14),
                    ("spacing mm", 18), "file")
    for w in written:
        listing.add_row(short_uid(w.series_uid, 24), "x".join(str(n) for n in w.shape),
                        "x".join(f"{v:.4g}" for v in w.spacing), cell(w.path.name))
    console.print(listing)
    for w in written:
        for note in w.notes:
            err_console.print(f"  {cell(w.path.name)}: {note}", highlight=False)
