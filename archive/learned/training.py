"""What every trainer shares: device choice, seeding, a time budget, checkpoints that resume.

A trainer is a function ``train(split, out_dir, *, minutes, resume, seed, device, log) -> metrics``
that writes its bundle with :func:`archive.learned.bundle.save_bundle` (see ``medarchive train``).
Float training is not bit-reproducible across machines or thread counts; the shipped weights are
what is frozen, and a retrain is compared with the manifest's metrics within a tolerance.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

Log = Callable[[str], None]
CHECKPOINT = "checkpoint.pt"


def pick_device(name: str | None = None) -> torch.device:
    """``name`` when given, else CUDA when present, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Budget:
    """Wall-clock budget of a training run (what was spent before a resume counts too)."""

    minutes: float
    spent_before: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @property
    def spent(self) -> float:
        return self.spent_before + time.monotonic() - self.started

    def expired(self) -> bool:
        return self.spent >= self.minutes * 60.0

    def fraction(self) -> float:
        return min(1.0, self.spent / max(self.minutes * 60.0, 1e-9))


class Checkpointer:
    """``out_dir/checkpoint.pt``: written atomically, read with ``weights_only=True``.

    The state holds only tensors and plain containers (model and optimizer state dicts, step,
    seconds spent, numpy RNG state as a list) so the safe loader accepts it.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / CHECKPOINT

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state: dict[str, Any] = torch.load(self.path, map_location="cpu", weights_only=True)
        return state

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
