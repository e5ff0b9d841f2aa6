"""Who holds a job item: process identity, leases, claims.

A worker *claims* an item (status, owner ``host:pid:start``, lease) before
touching it, so a task delivered twice does each instance once; a claim whose
owner is provably dead, or whose lease has expired, may be taken over.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.orm import Session

from archive.catalog.models import ItemStatus, JobItem
from archive.kinds import ItemOutcome
from archive.clock import aware_utc, utcnow
from archive.services.runtime import Archive

def process_owner() -> str:
    """``host:pid:start`` of this process: a claim's owner can be proven dead on the same host."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


def owner_is_dead(owner: str | None) -> bool:
    """True only when the owner ran on this host and that process is gone (or its pid was reused)."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine's worker: only its lease can expire
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return start not in ("?", _start_ticks(pid))


def reclaimable(item: JobItem, now: datetime, owner: str) -> bool:
    if item.status is ItemStatus.QUEUED:
        return True
    if item.status is not ItemStatus.RUNNING:
        return False
    if item.owner == owner:
        return True
    lease = aware_utc(item.lease_until)
    return lease is None or lease < now or owner_is_dead(item.owner)


def claim_item(session: Session, item: JobItem, owner: str, lease_seconds: float) -> bool:
    """Take an item for this process; False when another live worker holds it (or it is done)."""
    result = session.execute(
        update(JobItem)
        .where(JobItem.id == item.id, JobItem.status == item.status, JobItem.attempts == item.attempts)
        .values(status=ItemStatus.RUNNING, owner=owner, attempts=JobItem.attempts + 1,
                lease_until=utcnow() + timedelta(seconds=lease_seconds), updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def lease_seconds(archive: Archive, count: int = 1) -> float:
    return archive.settings.instance_time_limit * count + 60.0


def release_claims(archive: Archive, task_id: int, owner: str) -> None:
    """Best effort: hand this process's claims back so a retry starts in batch mode again."""
    try:
        with archive.unit_of_work() as uow:
            uow.session.execute(
                update(JobItem)
                .where(JobItem.task_id == task_id, JobItem.owner == owner, JobItem.status == ItemStatus.RUNNING)
                .values(status=ItemStatus.QUEUED, owner=None, lease_until=None, attempts=JobItem.attempts - 1)
                .execution_options(synchronize_session=False)
            )
            uow.commit()
    except Exception:  # the database may be the thing that is down; leases expire on their own
        pass


def finish_item(session: Session, item_id: int, status: ItemStatus, outcome: ItemOutcome, error: str | None) -> None:
    session.execute(
        update(JobItem).where(JobItem.id == item_id).values(
            status=status, outcome=outcome, error=error, owner=None, lease_until=None, updated_at=utcnow()
        ).execution_options(synchronize_session=False)
    )
