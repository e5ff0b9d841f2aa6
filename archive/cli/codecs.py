"""Codec benchmarks: ``bench rd`` (rate against distortion, with the standard codecs as anchors) and ``bench auto``."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from archive.cli._app import bench_app, run_benchmark


class Part(enum.StrEnum):
    """The parts of ``bench rd`` that ``--only`` can pick."""

    LEARNED = "learned"
    LOSSY = "lossy"


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
    learned: Annotated[bool, typer.Option("--learned/--no-learned", help="Also learned and gan with their anchors, "
                                          "on the validation split (archive/learned/data.py).")] = True,
    only: Annotated[Optional[Part], typer.Option("--only", help="Run one part: 'learned' (learned, gan and "
                                                 "their anchors) or 'lossy' (the grid above).")] = None,
    learned_slices: Annotated[Optional[int], typer.Option("--learned-slices", min=1, help="At most this many "
                                                          "validation images per modality, spread evenly.")] = None,
    learned_bounds: Annotated[str, typer.Option("--learned-bounds", help="Max errors N of learned and its "
                                                "JPEG-LS anchor (0: lossless, with JPEG-XL e7).")] = "0,1,2,4",
    gan_rates: Annotated[str, typer.Option("--gan-rates", help="Target bpp of the gan rows (JPEG 2000 at the "
                                           "gan's real bpp beside each).")] = "0.05,0.1,0.25,0.5",
    gan_betas: Annotated[str, typer.Option("--gan-betas", help="Adversarial weights of the shipped gan models.")
                         ] = "0,1",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables.")] = False,
) -> None:
    """Bits per pixel against PSNR, max error and SSIM for pca, kmeans, bounded, learned and gan, with the anchors
    in the same run."""
    from archive.bench_learned import LearnedGrid
    from archive.bench_rd import print_rd_benchmark, run_rd_benchmark

    grid = LearnedGrid(bounds=_ints(learned_bounds), gan_rates=_floats(gan_rates), gan_betas=_ints(gan_betas),
                       slices=learned_slices)
    options: dict[str, Any] = dict(out_dir=out, slices=slices, bounds=_ints(bounds), variances=_floats(variances),
                                   ks=_ints(ks), j2k_rates=_floats(j2k_rates),
                                   learned=grid if (learned or only is Part.LEARNED) and only is not Part.LOSSY
                                   else None,
                                   lossy=only is not Part.LEARNED)
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
