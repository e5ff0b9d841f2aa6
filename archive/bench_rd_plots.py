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


def write_learned_plots(part: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """The learned part: bpp against N for learned and its anchors; PSNR against bpp for gan and JPEG 2000 at
    equal bpp. One column per modality (validation images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in part["rows"] if r["status"] == "ok" and r.get("bpp") is not None]
    modalities = sorted({r["modality"] for r in rows}) or ["-"]
    fig, axes = plt.subplots(2, len(modalities), figsize=(6.5 * len(modalities), 9.0), squeeze=False)
    for col, modality in enumerate(modalities):
        mine = [r for r in rows if r["modality"] == modality]
        top, bottom = axes[0][col], axes[1][col]
        for family, members in _families(mine).items():
            anchor = bool(members[0]["anchor"])
            style = {"linestyle": "--" if anchor else "-", "marker": "s" if anchor else "o", "markersize": 4}
            if members[0].get("bound") is not None:
                by_n = sorted((int(r["bound"]), float(r["bpp"])) for r in members)
                top.plot([p[0] for p in by_n], [p[1] for p in by_n], label=family, **style)
            elif all(r.get("psnr") is not None for r in members):
                points = sorted((float(r["bpp"]), float(r["psnr"])) for r in members)
                bottom.plot([p[0] for p in points], [p[1] for p in points], label=family, **style)
        top.set_xlabel("max |error| N (0 = lossless)")
        top.set_ylabel("bits per pixel")
        top.set_title(f"{modality} (validation): learned and its anchors")
        bottom.set_xscale("log")
        bottom.set_xlabel("bits per pixel (real bitstream)")
        bottom.set_ylabel("PSNR (dB), peak 2^BitsStored-1")
        bottom.set_title(f"{modality} (validation): gan and JPEG 2000 at equal bpp")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "rd_learned.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def _families(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        family = row["method"] if row["family"] == "lossless" else row["family"]
        out.setdefault(family, []).append(row)
    return out


# ------------------------------------------------------------------------------------------------- printing
