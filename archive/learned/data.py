"""The fixed train / validation split of the shared data, used by training and by ``bench rd``.

Validation images are never trained on. The rule works on paths under the data folder, so
it is stated in a line and gives the same split on any machine:

* CT (``ct-chest-tcia``): by patient -- the last two patient folders in name order are
  validation (12 slices), the first four train (24 slices);
* MR: within every series, the last third of its instances in file-name order are
  validation, the rest train (series too short to split train only).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from archive.bench_rd import RdImage, load_images

#: validation patients of the shared CT (the last two of six, in name order)
CT_VALIDATION_PATIENTS: Final[int] = 2
#: share of every MR series kept for validation
MR_VALIDATION_SHARE: Final[float] = 1 / 3
RULE: Final[str] = ("CT: the last 2 patient folders (name order) validate, the other 4 train; MR: in every "
                    "series the last third of its instances (file-name order) validate, the rest train")


@dataclass(frozen=True)
class Split:
    """Greyscale frames of stored values, by modality, on each side of the split."""

    train: dict[str, list[RdImage]]
    validation: dict[str, list[RdImage]]

    def describe(self) -> dict[str, Any]:
        """What a manifest records: the rule, counts and the validation labels."""
        return {
            "rule": RULE,
            "train": {m: len(v) for m, v in self.train.items()},
            "validation": {m: len(v) for m, v in self.validation.items()},
            "validation_labels": sorted(i.label for v in self.validation.values() for i in v),
        }

    def train_images(self) -> list[RdImage]:
        return [i for m in sorted(self.train) for i in self.train[m]]

    def validation_images(self) -> list[RdImage]:
        return [i for m in sorted(self.validation) for i in self.validation[m]]


def split_images(images: dict[str, list[RdImage]]) -> Split:
    """Apply the rule to frames loaded by :func:`archive.bench_rd.load_images`."""
    train: dict[str, list[RdImage]] = defaultdict(list)
    validation: dict[str, list[RdImage]] = defaultdict(list)
    for modality, frames in images.items():
        if modality == "CT":
            patients = sorted({_patient(i.label) for i in frames})
            held = set(patients[len(patients) - CT_VALIDATION_PATIENTS:]) if len(patients) > 2 else set()
            for image in frames:
                (validation if _patient(image.label) in held else train)[modality].append(image)
            continue
        by_series: dict[str, list[RdImage]] = defaultdict(list)
        for image in frames:
            by_series[image.series].append(image)
        for series in sorted(by_series):
            members = sorted(by_series[series], key=lambda i: i.label)
            keep = len(members) - math.floor(len(members) * MR_VALIDATION_SHARE) if len(members) >= 3 else len(members)
            train[modality].extend(members[:keep])
            validation[modality].extend(members[keep:])
    return Split(dict(train), dict(validation))


def _patient(label: str) -> str:
    """'ct-chest-tcia/A002304/axial/x.dcm' -> 'A002304' (the folder under the data set)."""
    parts = Path(label).parts
    return parts[1] if len(parts) > 2 else parts[0]


def load_split(data_dir: Path) -> Split:
    """Every greyscale CT and MR frame under ``data_dir`` (``broken/`` and ``misc-barre/`` left out), split."""
    images, _left_out = load_images(data_dir, skip=("broken", "misc-barre"))
    return split_images(images)
