"""What happened to each file handed to the archive: the vocabulary of ingest reports."""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from archive.kinds import NormalizeOutcome

# Errors of the machine, not of the file: the task is retried, nothing is quarantined.
TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.ENOMEM, errno.ESTALE})


class Outcome(str, Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    SKIPPED = "skipped"
    QUARANTINED = "quarantined"


@dataclass(frozen=True)
class FileOutcome:
    path: Path
    outcome: Outcome
    reason: str = ""
    study_uid: str | None = None
    bytes_in: int = 0
    bytes_stored: int = 0


@dataclass
class IngestReport:
    outcomes: list[FileOutcome] = field(default_factory=list)
    seconds: float = 0.0
    job_id: int | None = None
    files: int = 0  # files found under the paths (those set aside before reading included)
    interrupted: bool = False  # stopped by SIGINT/SIGTERM: the outcomes are what was done before
    normalized: list[Any] = field(default_factory=list)  # services.normalization.SeriesNormalization per series

    def count(self, outcome: Outcome) -> int:
        return sum(1 for o in self.outcomes if o.outcome is outcome)

    @property
    def remaining(self) -> int:
        """Files found but never reached (an interrupted ingest)."""
        return max(self.files - len(self.outcomes), 0)

    def job_counts(self, more: Iterable[FileOutcome] = ()) -> dict[str, int]:
        """What ``jobs`` shows for a direct ingest: outcome value -> files, and ``files`` found in all."""
        counts = Counter(o.outcome.value for o in self.outcomes)
        counts.update(o.outcome.value for o in more)
        normalized = sum(1 for n in self.normalized if n.outcome is NormalizeOutcome.NORMALIZED)
        return {**{o.value: counts.get(o.value, 0) for o in Outcome}, "files": self.files,
                **({"normalized_series": normalized} if normalized else {})}

    def nothing_to_archive(self, paths: Sequence[Path]) -> str | None:
        """The error when every file was set aside as not DICOM, hidden or temporary (None otherwise)."""
        if self.interrupted or any(o.outcome is not Outcome.SKIPPED for o in self.outcomes):
            return None
        return nothing_to_archive_message(paths, self.outcomes)

    @property
    def studies(self) -> set[str]:
        return {o.study_uid for o in self.outcomes if o.study_uid and o.outcome is not Outcome.DUPLICATE}

    @property
    def instances(self) -> int:
        return self.count(Outcome.STORED) + self.count(Outcome.CONFLICT)

    @property
    def bytes_in(self) -> int:
        return sum(o.bytes_in for o in self.outcomes if o.outcome in (Outcome.STORED, Outcome.CONFLICT))

    @property
    def bytes_stored(self) -> int:
        return sum(o.bytes_stored for o in self.outcomes)

    @property
    def ratio(self) -> float:
        return self.bytes_in / self.bytes_stored if self.bytes_stored else 0.0

    def with_outcome(self, outcome: Outcome) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.outcome is outcome]


def nothing_to_archive_message(paths: Sequence[Path], skipped: Sequence[FileOutcome]) -> str:
    """``nothing to archive in X (N files skipped: a (why), ...)``: the folder holds no DICOM file."""
    where = ", ".join(str(p) for p in paths)
    if not skipped:
        return f"nothing to archive in {where}: no files found"
    shown = "; ".join(f"{o.path.name} ({o.reason})" for o in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"nothing to archive in {where} ({len(skipped)} file(s) skipped: {shown}{more})"
