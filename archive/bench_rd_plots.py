"""The plots of ``medarchive bench rd``: bpp against PSNR (two peaks), max error and SSIM, and the WCSS elbow.

Kept apart from :mod:`archive.bench_rd` (the measuring) so each reads on its own; matplotlib (Agg) is
imported only when plots are written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_plots(result: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """bpp against PSNR (two peaks), max error and SSIM, one line per family (anchors dashed); the WCSS elbow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    modalities = sorted({r["modality"] for r in rows}) or ["-"]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {family: cycle[i % len(cycle)] for i, family in enumerate(_families(rows))}  # same in every panel
    paths: list[Path] = []
    panels = (("rd_psnr.png", (("psnr", "PSNR (dB), peak 2^BitsStored-1"), ("range_psnr", "PSNR (dB), peak max-min"))),
              ("rd_max_error.png", (("max_error", "max |error| (all images)"),)),
              ("rd_ssim.png", (("ssim", "SSIM (mean)"),)))
    for name, metrics in panels:
        fig, axes = plt.subplots(len(metrics), len(modalities), figsize=(6.5 * len(modalities), 4.5 * len(metrics)),
                                 squeeze=False)
        for col, modality in enumerate(modalities):
            for line, (key, label) in enumerate(metrics):
                ax = axes[line][col]
                for family, members in _families([r for r in rows if r["modality"] == modality]).items():
                    points = [(r["bpp"], r[key]) for r in members
                              if r.get("bpp") is not None and r.get(key) is not None]
                    if not points:
                        continue
                    points.sort()
                    anchor = members[0]["anchor"]
                    ax.plot([p[0] for p in points], [p[1] for p in points], linestyle="--" if anchor else "-",
                            marker="s" if anchor else "o", markersize=4, label=family, color=colours[family])
                if key == "max_error":
                    ax.set_yscale("symlog", linthresh=1)
                ax.set_xlabel("bits per pixel")
                ax.set_ylabel(label)
                ax.set_title(f"{modality}: {label}")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for curve in result.get("wcss_elbow", []):
        ax.plot(curve["k"], [w / curve["pixels"] for w in curve["wcss"]], marker="o", markersize=3,
                label=f"{curve['modality']} {Path(curve['image']).name}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("WCSS / pixels (mean squared error)")
    ax.set_title("k-means on intensities: WCSS elbow (Ckmeans.1d.dp)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / "wcss_elbow.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
    return paths


def _families(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        family = row["method"] if row["family"] == "lossless" else row["family"]
        out.setdefault(family, []).append(row)
    return out


# ------------------------------------------------------------------------------------------------- printing
