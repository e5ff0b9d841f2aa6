"""The access log: every retrieval and store an API client makes, by token name, with bytes. No patient data.

The audit log (:mod:`archive.services.audit`) records changes an administrator
makes; this one records who read or sent what. Targets are UIDs (or a query's
attribute names), never names or other patient attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from archive.catalog.models import AccessEvent
from archive.kinds import AccessAction
from archive.services.runtime import Archive


@dataclass(frozen=True)
class AccessRecord:
    id: int
    created_at: datetime
    token_name: str
    action: AccessAction
    target: str
    status: int
    nbytes: int
    instances: int
    client: str | None


def record_access(archive: Archive, *, token_name: str, action: AccessAction, target: str, status: int = 200,
                  nbytes: int = 0, instances: int = 0, client: str | None = None) -> None:
    """Commit one access row (its own short transaction: a failed request is recorded too)."""
    with archive.unit_of_work() as uow:
        uow.session.add(AccessEvent(token_name=token_name[:64], action=action, target=target[:200], status=status,
                                    nbytes=nbytes, instances=instances, client=(client or None) and client[:64]))
        uow.commit()


def list_access(archive: Archive, *, limit: int = 100, token_name: str | None = None,
                action: AccessAction | None = None, since: datetime | None = None) -> list[AccessRecord]:
    """The newest ``limit`` rows first, optionally of one token, one action, or after ``since``."""
    query = select(AccessEvent).order_by(AccessEvent.id.desc()).limit(limit)
    if token_name is not None:
        query = query.where(AccessEvent.token_name == token_name)
    if action is not None:
        query = query.where(AccessEvent.action == action)
    if since is not None:
        query = query.where(AccessEvent.created_at >= since)
    with archive.unit_of_work() as uow:
        return [AccessRecord(e.id, e.created_at, e.token_name, e.action, e.target, e.status, e.nbytes, e.instances,
                             e.client) for e in uow.session.scalars(query)]
