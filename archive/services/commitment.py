"""Storage commitment: which referenced instances the archive holds safely now, and why the others are not.

A modality deletes its own copy once the archive commits, so an instance is
committed only when it is in the catalog under the SOP class the modality
names, with its lossless content kept, and every blob it references re-reads
intact now (the store re-hashes what it reads, as ``medarchive verify`` does).
An instance still on its way (C-STOREd, waiting in the incoming area for its
study to be stable, or queued for the workers) is *pending*:
:func:`await_commitment` looks again until it is archived or the time is up.
Failure reasons are those of PS3.3 C.14.1.1 (Failure Reason, 0008,1197).
Used by the DIMSE Storage Commitment SCP; nothing here needs pynetdicom.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from archive.catalog.models import Instance, InstanceStatus, QuarantineEntry
from archive.services.integrity import verify_instances
from archive.services.runtime import Archive

log = logging.getLogger(__name__)

FIRST_POLL = 0.5  # seconds between looks at the catalog, growing to LAST_POLL for long waits
LAST_POLL = 2.0
_BATCH = 200  # UIDs per catalog query


class FailureReason(enum.IntEnum):
    """Why an instance is not committed (PS3.3 C.14.1.1)."""

    PROCESSING_FAILURE = 0x0110  # quarantined, only a lossy copy kept, or a stored blob fails verification
    NO_SUCH_OBJECT_INSTANCE = 0x0112  # never archived (still absent when the wait ended)
    CLASS_INSTANCE_CONFLICT = 0x0119  # archived under another SOP class


@dataclass(frozen=True)
class Reference:
    """One instance a commitment request names."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Failure:
    reference: Reference
    reason: FailureReason
    detail: str  # for the archive's log; never sent to the peer (it may name paths)


@dataclass
class Commitment:
    """The verdict on each reference, in the order asked; ``pending`` ones are still on their way."""

    committed: list[Reference] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    pending: list[Reference] = field(default_factory=list)

    @property
    def settled(self) -> bool:
        return not self.pending


def assess(archive: Archive, references: Sequence[Reference]) -> Commitment:
    """One look now: committed, failed for good, or pending (not archived yet, nothing says it failed)."""
    verdict: dict[Reference, Failure | None] = {}  # None: committed
    wanted = list(dict.fromkeys(references))
    for start in range(0, len(wanted), _BATCH):
        verdict.update(_assess_batch(archive, wanted[start:start + _BATCH]))
    result = Commitment()
    for reference in wanted:
        if reference not in verdict:
            result.pending.append(reference)
            continue
        failure = verdict[reference]
        if failure is None:
            result.committed.append(reference)
        else:
            result.failed.append(failure)
    return result


def await_commitment(
    archive: Archive,
    references: Sequence[Reference],
    *,
    timeout: float,
    stopping: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Commitment:
    """Look until every reference is settled or ``timeout`` seconds passed; what is still absent then fails (0x0112).

    Settled references are not looked at again, so an instance verified once
    is not re-read on every round. ``stopping`` ends the wait early (the SCP
    is shutting down): the still pending ones fail the same way.
    """
    deadline = clock() + timeout
    result = Commitment(pending=list(dict.fromkeys(references)))
    pause = FIRST_POLL
    while True:
        look = assess(archive, result.pending)
        result.committed.extend(look.committed)
        result.failed.extend(look.failed)
        result.pending = look.pending
        left = deadline - clock()
        if result.settled or left <= 0 or (stopping is not None and stopping.is_set()):
            break
        if stopping is not None:
            stopping.wait(min(pause, left))
        else:
            time.sleep(min(pause, left))
        pause = min(pause * 1.5, LAST_POLL)
    for reference in result.pending:
        result.failed.append(Failure(reference, FailureReason.NO_SUCH_OBJECT_INSTANCE,
                                     f"not archived within {timeout:g} s"))
    result.pending = []
    order = {reference: index for index, reference in enumerate(dict.fromkeys(references))}
    result.committed.sort(key=order.__getitem__)
    result.failed.sort(key=lambda failure: order[failure.reference])
    return result


def _assess_batch(archive: Archive, references: list[Reference]) -> dict[Reference, Failure | None]:
    uids = sorted({reference.sop_instance_uid for reference in references})
    with archive.unit_of_work() as uow:
        rows = uow.session.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.sop_class_uid, Instance.status)
            .where(Instance.sop_instance_uid.in_(uids))
        ).all()
        archived = {row.sop_instance_uid for row in rows}
        quarantined = _quarantined(uow.session, [uid for uid in uids if uid not in archived])
    by_uid: dict[str, list[tuple[int, str | None, InstanceStatus]]] = {}
    for row in rows:
        by_uid.setdefault(row.sop_instance_uid, []).append((row.id, row.sop_class_uid, row.status))
    verdict: dict[Reference, Failure | None] = {}
    to_verify: dict[Reference, list[int]] = {}
    for reference in references:
        found = by_uid.get(reference.sop_instance_uid)
        if not found:
            if reference.sop_instance_uid in quarantined:
                verdict[reference] = Failure(reference, FailureReason.PROCESSING_FAILURE,
                                             f"quarantined: {quarantined[reference.sop_instance_uid]}")
            continue  # pending: perhaps still in the incoming area or queued
        # a row without a SOP class (an old ACR-NEMA file) conflicts with no class
        same_class = [(i, status) for i, sop_class, status in found
                      if sop_class is None or sop_class == reference.sop_class_uid]
        if not same_class:
            classes = ", ".join(sorted({str(sop_class) for _, sop_class, _ in found}))
            verdict[reference] = Failure(reference, FailureReason.CLASS_INSTANCE_CONFLICT,
                                         f"archived as SOP class {classes}")
        elif any(status is InstanceStatus.LOSSY_ONLY for _, status in same_class):
            verdict[reference] = Failure(reference, FailureReason.PROCESSING_FAILURE,
                                         "its lossless pixels were released: only a lossy derivative is kept")
        else:
            to_verify[reference] = [i for i, _ in same_class]
    problems = verify_instances(archive, [i for ids in to_verify.values() for i in ids])
    for reference, ids in to_verify.items():
        bad = [problems[i] for i in ids if i in problems]
        verdict[reference] = (Failure(reference, FailureReason.PROCESSING_FAILURE, "; ".join(bad))
                              if bad else None)
    return verdict


def _quarantined(session: Session, uids: list[str]) -> dict[str, str]:
    """Instances set aside instead of archived: by their UID, or by the file name C-STORE gave them (``<uid>.dcm``)."""
    if not uids:
        return {}
    names = {f"/{uid}.dcm": uid for uid in uids}
    rows = session.execute(
        select(QuarantineEntry.sop_instance_uid, QuarantineEntry.source_path, QuarantineEntry.error_type)
        .where(or_(QuarantineEntry.sop_instance_uid.in_(uids),
                   *(QuarantineEntry.source_path.endswith(name, autoescape=True) for name in names)))
    ).all()
    found: dict[str, str] = {}
    for sop_instance_uid, source_path, error_type in rows:
        uid = sop_instance_uid if sop_instance_uid in uids else names.get(source_path[source_path.rfind("/"):])
        if uid is not None:
            found.setdefault(uid, error_type)
    return found
