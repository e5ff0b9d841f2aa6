"""What happened to each file handed to the archive: the vocabulary of ingest reports."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

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

    def count(self, outcome: Outcome) -> int:
        return sum(1 for o in self.outcomes if o.outcome is outcome)

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
