"""``medarchive features``: PCA per series of a study, written as NumPy arrays and plots for analysis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from archive.cli._app import app, console, err_console, open_archive
from archive.cli._format import JSON_HELP, cell, short_uid, table


@app.command()
def features(
    study: Annotated[str, typer.Argument(metavar="STUDY_UID", help="The study whose series are analysed.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the files (created): one folder per series.")],
    series: Annotated[Optional[str], typer.Option(
        "--series", help="Only this series of the study (default: every original series).")] = None,
    images: Annotated[int, typer.Option("--images", min=0, help="Components drawn next to the mean image.")] = 4,
    components: Annotated[Optional[int], typer.Option(
        "--components", min=1, help="Components kept in pca.npz (default: as many as --variance needs).")] = None,
    variance: Annotated[float, typer.Option(
        "--variance", min=0.0, max=1.0, help="Share of the variance the kept components explain.")] = 0.999,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Fit PCA per series (frames as samples): components, explained variance, scores (.npz) and plots (PNG)."""
    from archive.services.features import extract_features  # scikit-learn and matplotlib load only here

    with open_archive(read_only=True) as archive:
        result = extract_features(archive, study, out, series_uid=series, components=components, variance=variance,
                                  images=images)
    fitted = [s for s in result.series if s.fitted]
    if as_json:
        console.print_json(json.dumps(result.as_dict()))
    else:
        listing = table(f"PCA features of {len(fitted)} of {len(result.series)} series (files in {cell(out)}/<series>/)",
                        ("series", 22), ("mod", 4), ("n", 4, "right"), ("95 %", 5, "right"), ("98 %", 5, "right"),
                        ("kept", 5, "right"), "files")
        for s in result.series:
            files = cell(", ".join(p.name for p in s.files))
            listing.add_row(short_uid(s.series_uid, 22), s.modality or "", str(s.instances), _count(s.components_95),
                            _count(s.components_98), str(s.components or ""), files or f"not fitted: {cell(s.reason)}")
        console.print(listing)
        for s in fitted:
            if s.units == "stored":
                err_console.print(f"  {short_uid(s.series_uid, 22)}: no Rescale Slope/Intercept, stored values used",
                                  highlight=False)
    if not fitted:
        err_console.print("no series could be fitted (each needs 2 or more frames of one shape)", highlight=False)
        raise typer.Exit(1)


def _count(needed: int | None) -> str:
    return "-" if needed is None else str(needed)
