"""``medarchive train gan|learned``: retrain a shipped model from the shared data, on the fixed split."""

from __future__ import annotations

import enum
import importlib
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from archive.cli._app import app, console, err_console


class Model(enum.StrEnum):
    """What ``medarchive train`` can train, and the trainer module of each."""

    GAN = "gan"
    LEARNED = "learned"

    @property
    def trainer(self) -> str:
        return {"gan": "archive.learned.train_gan", "learned": "archive.learned.train_learned"}[self.value]


@app.command()
def train(
    model: Annotated[Model, typer.Argument(help="Which model: the GAN codec or the learned predictive codec.")],
    data: Annotated[Path, typer.Option("--data", exists=True, file_okay=False,
                                       help="Folder of real DICOM (the shared data; the split is fixed by path).")],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder written (weights, manifest, checkpoint).")],
    minutes: Annotated[float, typer.Option("--minutes", min=0.1, help="Wall-clock budget, resumes included.")] = 25.0,
    resume: Annotated[bool, typer.Option("--resume/--fresh",
                                         help="Go on from OUT/checkpoint.pt when there is one.")] = True,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every random generator.")] = 0,
    device: Annotated[Optional[str], typer.Option("--device", help="torch device (default: CUDA when present).")] = None,
    option: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Trainer option KEY=VALUE (JSON value), e.g. --set beta=0.01; repeatable.")] = None,
) -> None:
    """Train on the fixed train split, report validation metrics, write the bundle; compare with the shipped one."""
    from archive.learned.bundle import MODELS_DIR
    from archive.learned.data import load_split
    from archive.learned.training import pick_device

    trainer = importlib.import_module(model.trainer)
    options = dict(_parse_option(o) for o in option or [])
    split = load_split(data)
    counts = split.describe()
    err_console.print(f"split: train {counts['train']}, validation {counts['validation']}", highlight=False)
    metrics: dict[str, Any] = trainer.train(split, out, minutes=minutes, resume=resume, seed=seed,
                                            device=pick_device(device), log=lambda m: err_console.print(m, highlight=False),
                                            **options)
    console.print_json(json.dumps({"out": str(out), "metrics": metrics}))
    shipped = getattr(trainer, "SHIPPED", None)
    if isinstance(shipped, dict):  # the GAN ships one bundle per beta
        shipped = shipped.get(int(bool(options.get("beta", 0))))
    if isinstance(shipped, str) and Path(out).resolve() != (MODELS_DIR / shipped).resolve():
        _compare_with_shipped(shipped, metrics)


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise typer.BadParameter(f"--set needs KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _compare_with_shipped(shipped_name: str, metrics: dict[str, Any]) -> None:
    """Print the retrained model's validation figures next to the shipped bundle's, within its tolerance."""
    from archive.cli._format import table
    from archive.learned.bundle import MANIFEST, bundle_dir, compare_metrics

    try:
        manifest = json.loads((bundle_dir(shipped_name) / MANIFEST).read_text())
    except (OSError, ValueError):
        err_console.print(f"no shipped bundle {shipped_name!r} to compare with", highlight=False)
        return
    stated = manifest.get("tolerance", 0.05)
    checks = [c for c in compare_metrics(metrics, manifest.get("metrics", {}), stated)
              if not c.name.rsplit(".", 1)[-1].startswith(("steps", "train_", "images"))]  # validation figures
    listing = table(f"validation figures against the shipped {shipped_name} (tolerance {json.dumps(stated)})",
                    ("figure", 34), ("retrained", 10, "right"), ("shipped", 10, "right"), ("allowed", 10, "right"),
                    ("", 8))
    for check in checks:
        allowed = f"±{check.tolerance:g} dB" if check.absolute else f"±{check.tolerance:.0%}"
        listing.add_row(check.name, f"{check.retrained:.4g}", f"{check.shipped:.4g}", allowed,
                        "ok" if check.within else "OUTSIDE")
    console.print(listing)
