"""Shipped model bundles: a folder with ``weights.safetensors`` and ``manifest.json``.

The manifest says what the weights are (files and their SHA-256, the command and commit that
trained them, the data split, the validation metrics) so a retrained model can be compared
with the shipped one. Loading needs neither torch nor the network: safetensors' numpy reader
gives plain arrays (a codec that runs torch converts them itself). A bundle whose files do not
match their digests is refused.

Shipped bundles live in ``archive/learned/models/<name>``; a stored frame names its bundle and
the weights' digest, so a frame is never decoded with other weights.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from archive.errors import CodecError

MODELS_DIR: Final[Path] = Path(__file__).parent / "models"
WEIGHTS: Final[str] = "weights.safetensors"
MANIFEST: Final[str] = "manifest.json"


@dataclass(frozen=True)
class Bundle:
    """A model's weights (numpy arrays by name) and its manifest."""

    name: str
    manifest: dict[str, Any]
    tensors: dict[str, npt.NDArray[Any]]

    @property
    def weights_sha256(self) -> str:
        return str(self.manifest["files"][WEIGHTS])


def bundle_dir(name_or_path: str | Path) -> Path:
    """A shipped bundle's folder by name, or the folder itself when a path is given."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if not isinstance(name_or_path, str) or not name_or_path.replace("-", "").replace("_", "").isalnum():
        raise CodecError(f"no model bundle {name_or_path!r}")
    return MODELS_DIR / name_or_path


@functools.cache
def load_bundle(name_or_path: str) -> Bundle:
    """Load and check a bundle (cached per process: codecs ask for it per frame)."""
    from safetensors.numpy import load_file

    folder = bundle_dir(name_or_path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CodecError(f"model bundle {name_or_path!r} has no readable manifest: {exc}") from exc
    for file_name, digest in manifest.get("files", {}).items():
        actual = _sha256(folder / file_name)
        if actual != digest:
            raise CodecError(f"model bundle {name_or_path!r}: {file_name} does not match its manifest "
                             f"({actual[:12]} != {str(digest)[:12]})")
    tensors = load_file(str(folder / WEIGHTS))
    return Bundle(folder.name, manifest, dict(tensors))


def save_bundle(out_dir: Path, tensors: dict[str, npt.NDArray[Any]], manifest: dict[str, Any]) -> Path:
    """Write weights and manifest (files, commit, command, versions added here); returns the folder."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS
    tmp = weights.with_suffix(".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    os.chmod(tmp, 0o644)  # shipped in the package: readable by whoever runs it
    os.replace(tmp, weights)
    full = {
        **manifest,
        "files": {WEIGHTS: _sha256(weights)},
        "commit": git_commit(),
        "command": " ".join(["medarchive", *sys.argv[1:]]) if Path(sys.argv[0]).name == "medarchive"
        else " ".join(sys.argv),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    (out_dir / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    load_bundle.cache_clear()
    return out_dir


@dataclass(frozen=True)
class MetricCheck:
    """One validation figure of a retrained model next to the shipped one's."""

    name: str
    retrained: float
    shipped: float
    tolerance: float
    absolute: bool = False  # tolerance in the figure's units (dB), not relative

    @property
    def within(self) -> bool:
        allowed = self.tolerance if self.absolute else self.tolerance * max(abs(self.shipped), 1e-12)
        return abs(self.retrained - self.shipped) <= allowed


def tolerance_for(name: str, stated: object) -> tuple[float, bool]:
    """The (tolerance, absolute?) a manifest states for a figure.

    ``stated`` is one relative number, or a table whose keys name a figure kind and say how it is
    measured: ``{"bpp": 0.05}`` or ``{"bpp_relative": 0.15}`` relative, ``{"psnr_db": 1.0}`` in dB.
    A figure no key names gets 5 % relative.
    """
    if isinstance(stated, (int, float)):
        return float(stated), False
    leaf = name.rsplit(".", 1)[-1].lower()
    if isinstance(stated, dict):
        for key, value in stated.items():
            kind, _, unit = str(key).lower().partition("_")
            if isinstance(value, (int, float)) and (kind in leaf or kind in name.lower()):
                return float(value), unit in ("db", "abs", "absolute")
    return 0.05, False


def compare_metrics(retrained: dict[str, Any], shipped: dict[str, Any], tolerance: object) -> list[MetricCheck]:
    """Every numeric figure the two metric trees share (keys joined by '.'), each with its tolerance."""
    checks: list[MetricCheck] = []

    def walk(new: object, old: object, prefix: str) -> None:
        if isinstance(new, dict) and isinstance(old, dict):
            for key in sorted(set(new) & set(old)):
                walk(new[key], old[key], f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(new, (int, float)) and isinstance(old, (int, float)) and not isinstance(new, bool):
            allowed, absolute = tolerance_for(prefix, tolerance)
            checks.append(MetricCheck(prefix, float(new), float(old), allowed, absolute))

    walk(retrained, shipped, "")
    return checks


def git_commit() -> str:
    """The commit of the checkout the code runs from ('unknown' outside git), '+dirty' when modified."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "numpy": np.__version__}
    try:
        import torch

        versions["torch"] = str(torch.__version__)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return versions


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise CodecError(f"cannot read {path}: {exc}") from exc
