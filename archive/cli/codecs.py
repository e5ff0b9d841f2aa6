"""Codec benchmarks: ``bench rd`` (rate against distortion, with the standard codecs as anchors) and ``bench auto``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from archive.cli._app import bench_app, run_benchmark


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


@bench_app.command("rd")
def bench_rd(
    folder: Annotated[Path, typer.Argument(help="Folder of DICOM files (read recursively, never modified).")],
    out: Annotated[Path, typer.Option("--out", help="Where rd.json and the PNG plots go.")] = Path("rd-bench"),
    slices: Annotated[Optional[int], typer.Option("--slices", min=1, help="At most this many images per "
                                                  "modality, spread evenly (default: all).")] = None,
    bounds: Annotated[str, typer.Option("--bounds", help="Max errors N of the bounded rows and of JPEG-LS "
                                        "near-lossless.")] = "1,2,4,8",
    variances: Annotated[str, typer.Option("--variances", help="Explained-variance targets of the pca rows.")
                         ] = "0.95,0.98,0.999",
    ks: Annotated[str, typer.Option("--ks", help="k of the kmeans rows.")] = "16,64,256",
    j2k_rates: Annotated[str, typer.Option("--j2k-rates", help="Target bpp of the JPEG 2000 lossy anchors.")
                         ] = "0.25,0.5,1,2",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables.")] = False,
) -> None:
    """Bits per pixel against PSNR, max error and SSIM for pca, kmeans and bounded, with the anchors in the same run."""
    from archive.bench_rd import print_rd_benchmark, run_rd_benchmark

    options: dict[str, Any] = dict(out_dir=out, slices=slices, bounds=_ints(bounds), variances=_floats(variances),
                                   ks=_ints(ks), j2k_rates=_floats(j2k_rates))
    run_benchmark(run_rd_benchmark, print_rd_benchmark, folder, options, as_json)


@bench_app.command("auto")
def bench_auto(
    folder: Annotated[Path, typer.Argument(help="Folder of DICOM files (read recursively, never modified).")],
    min_instances: Annotated[int, typer.Option("--min-instances", min=1, help="Series with fewer instances are "
                                               "left out.")] = 10,
    max_encode_ms: Annotated[Optional[float], typer.Option("--max-encode-ms", help="auto's speed budget: "
                                                           "candidates slower per 512² slice are excluded.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")] = False,
) -> None:
    """auto's per-series choice against the best single lossless codec for each series, in one run."""
    from archive.bench_auto import print_auto_benchmark, run_auto_benchmark

    options: dict[str, Any] = dict(min_instances=min_instances, max_encode_ms=max_encode_ms)
    run_benchmark(run_auto_benchmark, print_auto_benchmark, folder, options, as_json)
