"""The figures an operator watches (``/health``, ``/metrics``): plain functions over the catalog and the home.

Each function is cheap (one grouped count, or a ``statvfs``) so that a
Prometheus scrape every few seconds costs the catalog nothing noticeable.

Verify failures: ``medarchive verify`` (and beat's scheduled verify) re-hash
every blob but the catalog keeps no record of what they found, so
:func:`record_verify` writes the last run's figures to ``home/last-verify.json``
and :func:`last_verify` reads them back; until a run has been recorded there
is no figure (``None``), never a made-up zero.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

from archive.catalog.models import Job, JobItem, JobStatus, ItemStatus, QuarantineEntry
from archive.clock import utcnow
from archive.services.runtime import Archive

LAST_VERIFY = "last-verify.json"


@dataclass(frozen=True)
class VerifyFigures:
    """What the last recorded verify found."""

    finished_at: datetime
    blobs_checked: int
    missing: int
    corrupt: int

    @property
    def failures(self) -> int:
        return self.missing + self.corrupt


@dataclass(frozen=True)
class Health:
    """Whether the server can do its work: the catalog answers, the blob store folder is there and writable."""

    catalog: str  # "ok" or what failed (no paths, no patient data: /health is public)
    store: str

    @property
    def ok(self) -> bool:
        return self.catalog == "ok" and self.store == "ok"

    def as_dict(self) -> dict[str, str]:
        return {"status": "ok" if self.ok else "unavailable", "catalog": self.catalog, "store": self.store}


def check_health(archive: Archive) -> Health:
    """One trivial catalog query and a look at the store's folder."""
    try:
        with archive.unit_of_work() as uow:
            uow.session.execute(text("SELECT 1"))
        catalog = "ok"
    except Exception as exc:  # noqa: BLE001  (any failure is the answer)
        catalog = f"unavailable ({type(exc).__name__})"
    return Health(catalog, _store_state(archive))


def _store_state(archive: Archive) -> str:
    """A fresh archive has no blob folder until its first write: then its home must be a writable folder."""
    root = archive.store.root
    folder = root if root.exists() else root.parent
    if not folder.is_dir():
        return "unavailable (the blob folder is not a folder)" if folder == root else \
            "unavailable (the blob folder and its home are missing)"
    if not archive.store.read_only and not os.access(folder, os.W_OK | os.X_OK):
        return "unavailable (the blob folder is not writable)"
    return "ok"


def queue_depth(archive: Archive) -> dict[ItemStatus, int]:
    """Job items waiting for a worker (queued) and being worked on (running)."""
    with archive.unit_of_work() as uow:
        rows = uow.session.execute(
            select(JobItem.status, func.count()).where(JobItem.status.in_([ItemStatus.QUEUED, ItemStatus.RUNNING]))
            .group_by(JobItem.status)).all()
    counts = {ItemStatus.QUEUED: 0, ItemStatus.RUNNING: 0}
    counts.update({ItemStatus(status): int(n) for status, n in rows})
    return counts


def jobs_by_status(archive: Archive) -> dict[JobStatus, int]:
    """Every job status with its count (zero included, so a dashboard's series never vanish)."""
    with archive.unit_of_work() as uow:
        rows = uow.session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    counts = {status: 0 for status in JobStatus}
    counts.update({JobStatus(status): int(n) for status, n in rows})
    return counts


def quarantine_entries(archive: Archive) -> int:
    with archive.unit_of_work() as uow:
        return int(uow.session.scalar(select(func.count()).select_from(QuarantineEntry)) or 0)


def free_disk_bytes(archive: Archive) -> int:
    """Free bytes on the file system of the archive's home (blobs, spool and quarantine live there)."""
    return int(shutil.disk_usage(archive.settings.home).free)


def record_verify(archive: Archive, *, blobs_checked: int, missing: int, corrupt: int) -> None:
    """Keep what a whole-archive verify run found (verify_blobs calls it: the command and beat alike)."""
    figures = {"finished_at": utcnow().isoformat(), "blobs_checked": blobs_checked, "missing": missing,
               "corrupt": corrupt}
    path = archive.settings.home / LAST_VERIFY
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(figures))
    os.replace(tmp, path)


def last_verify(archive: Archive) -> VerifyFigures | None:
    """The last recorded verify run, or None when none was recorded (or the record is unreadable)."""
    path: Path = archive.settings.home / LAST_VERIFY
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
        return VerifyFigures(datetime.fromisoformat(raw["finished_at"]), int(raw["blobs_checked"]),
                             int(raw["missing"]), int(raw["corrupt"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify_as_dict(figures: VerifyFigures | None) -> dict[str, Any] | None:
    return None if figures is None else {**asdict(figures), "failures": figures.failures}
