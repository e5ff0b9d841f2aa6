"""Recording staged instances in the catalog: a whole batch in a handful of statements.

The writer decides, for each staged instance, whether it is new, a duplicate
of an archived one, or a conflict (same SOP Instance UID, different content):
:func:`decide_arrival` is that decision, a pure function. Rows are written with
multi-row inserts (SQLAlchemy Core through the session): one look-up of the
SOP Instance UIDs already archived, one upsert of blob rows, studies and
series created once, then instances, encodings and frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from archive.catalog.models import EncodedFrame, Encoding, Instance, InstanceStatus, Series, Study
from archive.clock import utcnow
from archive.dicom.writer import canonical_header_sha256, read_header
from archive.services.blobs import record_blobs, upsert
from archive.services.outcomes import FileOutcome, Outcome
from archive.services.staging import StagedInstance
from archive.services.unit_of_work import UnitOfWork
from archive.store import BlobRef

_PAGE = 500


class Identity(NamedTuple):
    """What makes two arrivals the same SOP instance: the UID, the header's data set, the pixels."""

    sop_instance_uid: str
    header_sha256: str
    pixel_sha256: str | None


class Known(NamedTuple):
    """An instance already archived (or earlier in the same batch, ``instance_id`` None until inserted)."""

    identity: Identity
    conflict_seq: int
    instance_id: int | None
    batch_index: int | None = None  # position in the batch when it arrived in this one
    header: BlobRef | str | None = None  # its header blob (a digest for archived rows)
    dictionary: str | None = None  # the dictionary that header blob needs


class Arrival(NamedTuple):
    outcome: Outcome  # STORED, DUPLICATE or CONFLICT
    conflict_seq: int  # for a new row
    same: Known | None  # DUPLICATE: the instance it repeats
    first: Known | None  # CONFLICT: the first arrival with this SOP Instance UID


def decide_arrival(
    identity: Identity, known: Sequence[Known], same_elements: frozenset[tuple[str, str]] = frozenset()
) -> Arrival:
    """Duplicate when an instance with the same UID, header and pixels exists; conflict when the UID alone matches.

    ``known`` holds every instance with this SOP Instance UID, first arrival
    first. ``same_elements`` holds pairs of header hashes (known, arriving)
    whose headers hold the same elements written differently (a copy re-sent
    in another transfer syntax): those are the same header.
    """
    def same_header(k: Known) -> bool:
        return (k.identity.header_sha256 == identity.header_sha256
                or (k.identity.header_sha256, identity.header_sha256) in same_elements)

    same = next((k for k in known if k.identity.sop_instance_uid == identity.sop_instance_uid
                 and k.identity.pixel_sha256 == identity.pixel_sha256 and same_header(k)), None)
    if same is not None:
        return Arrival(Outcome.DUPLICATE, same.conflict_seq, same, None)
    if not known:
        return Arrival(Outcome.STORED, 0, None, None)
    return Arrival(Outcome.CONFLICT, max(k.conflict_seq for k in known) + 1, None, known[0])


def commit_staged(uow: UnitOfWork, staged: StagedInstance, job_id: int | None) -> tuple[FileOutcome, int | None]:
    """Add one staged instance's catalog rows to ``uow`` (the caller commits)."""
    return commit_staged_batch(uow, [staged], job_id)[0]


def commit_staged_batch(
    uow: UnitOfWork, staged: Sequence[StagedInstance], job_id: int | None
) -> list[tuple[FileOutcome, int | None]]:
    """Add the catalog rows of staged instances to ``uow``; returns each outcome and its study id.

    The caller commits; the blobs were made durable by staging, so a crash
    before the commit leaves only unreferenced blobs.
    """
    session = uow.session
    if not staged:
        return []
    known = _known(session, sorted({s.sop_instance_uid for s in staged}))
    record_blobs(session, [ref for item in staged for ref in item.blobs])
    study_ids = _ensure_studies(session, staged)
    series_ids = _ensure_series(session, staged, study_ids)

    decisions: list[Arrival] = []
    canonical = _CanonicalHeaders(uow)
    for index, item in enumerate(staged):
        identity = Identity(item.sop_instance_uid, item.header_sha256, item.pixel_sha256)
        earlier = known.setdefault(item.sop_instance_uid, [])
        arrival = decide_arrival(identity, earlier, canonical.same_elements(earlier, identity, item))
        decisions.append(arrival)
        if arrival.outcome is not Outcome.DUPLICATE:
            earlier.append(Known(identity, arrival.conflict_seq, None, index, item.header, item.header_dictionary))

    # instances in two waves: a conflict whose first arrival is in this batch needs that row's id
    instance_ids: dict[int, int] = {}
    waves: tuple[list[int], list[int]] = ([], [])
    for index, arrival in enumerate(decisions):
        if arrival.outcome is Outcome.DUPLICATE:
            continue
        waves[1 if arrival.first is not None and arrival.first.instance_id is None else 0].append(index)
    now = utcnow()
    for wave in waves:
        rows = []
        for index in wave:
            item, arrival = staged[index], decisions[index]
            first = arrival.first
            conflict_of = None
            if first is not None:
                if first.instance_id is not None:
                    conflict_of = first.instance_id
                else:  # the first arrival is earlier in this batch: inserted in the first wave
                    assert first.batch_index is not None
                    conflict_of = instance_ids[first.batch_index]
            rows.append(dict(
                item.instance, series_id=series_ids[item.series_uid], conflict_seq=arrival.conflict_seq,
                status=InstanceStatus.CONFLICT if first is not None else InstanceStatus.STORED,
                conflict_of_id=conflict_of, header_blob=item.header.digest, job_id=job_id, created_at=now,
            ))
        if rows:
            ids = session.scalars(insert(Instance).returning(Instance.id, sort_by_parameter_order=True), rows).all()
            instance_ids.update(zip(wave, ids))

    stored = [index for index, arrival in enumerate(decisions) if arrival.outcome is not Outcome.DUPLICATE]
    if stored:
        encoding_rows = [dict(staged[i].encoding, instance_id=instance_ids[i], generation=1, is_current=True,
                              created_at=now) for i in stored]
        encoding_ids = session.scalars(
            insert(Encoding).returning(Encoding.id, sort_by_parameter_order=True), encoding_rows).all()
        frame_rows = [dict(encoding_id=encoding_id, frame_index=n, blob_sha256=ref.digest, nbytes=ref.size)
                      for i, encoding_id in zip(stored, encoding_ids) for n, ref in enumerate(staged[i].frames)]
        for start in range(0, len(frame_rows), _PAGE):
            session.execute(insert(EncodedFrame), frame_rows[start:start + _PAGE])

    results: list[tuple[FileOutcome, int | None]] = []
    for index, (item, arrival) in enumerate(zip(staged, decisions)):
        if arrival.outcome is Outcome.DUPLICATE:
            same = arrival.same
            other = same.instance_id if same and same.instance_id is not None else "in this batch"
            results.append((FileOutcome(item.path, Outcome.DUPLICATE,
                                        f"same SOP instance as already archived (instance {other})",
                                        study_uid=item.study_uid), None))
        elif arrival.outcome is Outcome.CONFLICT:
            first = arrival.first
            label = first.instance_id if first and first.instance_id is not None else "in this batch"
            results.append((FileOutcome(item.path, Outcome.CONFLICT,
                                        f"SOP Instance UID already archived with different content (instance {label}); "
                                        "kept as a recorded conflict", item.study_uid, item.bytes_in,
                                        item.bytes_stored), study_ids[item.study_uid]))
        else:
            results.append((FileOutcome(item.path, Outcome.STORED, item.mode_reason, item.study_uid, item.bytes_in,
                                        item.bytes_stored), study_ids[item.study_uid]))
    return results


def _known(session: Session, uids: Sequence[str]) -> dict[str, list[Known]]:
    known: dict[str, list[Known]] = {}
    for start in range(0, len(uids), _PAGE):
        for row in session.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.header_sha256, Instance.pixel_sha256,
                   Instance.conflict_seq, Instance.header_blob, Instance.header_dictionary)
            .where(Instance.sop_instance_uid.in_(uids[start:start + _PAGE])).order_by(Instance.conflict_seq)
        ):
            identity = Identity(row.sop_instance_uid, row.header_sha256, row.pixel_sha256)
            known.setdefault(row.sop_instance_uid, []).append(
                Known(identity, row.conflict_seq, row.id, None, row.header_blob, row.header_dictionary))
    return known


class _CanonicalHeaders:
    """Header identities independent of encoding, computed only when UID and pixels match but header hashes differ."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow
        self.cache: dict[str, str] = {}  # header hash -> canonical hash

    def same_elements(self, known: Sequence[Known], identity: Identity, item: StagedInstance) -> frozenset[tuple[str, str]]:
        pairs = set()
        for k in known:
            if (k.identity.pixel_sha256 != identity.pixel_sha256 or k.header is None
                    or k.identity.header_sha256 == identity.header_sha256):
                continue
            if self._canonical(k.identity.header_sha256, k.header, k.dictionary) == self._canonical(
                    identity.header_sha256, item.header, item.header_dictionary):
                pairs.add((k.identity.header_sha256, identity.header_sha256))
        return frozenset(pairs)

    def _canonical(self, header_sha256: str, header: BlobRef | str, dictionary: str | None) -> str:
        if header_sha256 not in self.cache:
            part10 = self.uow.headers.read_header(self.uow.session, header, dictionary)
            self.cache[header_sha256] = canonical_header_sha256(read_header(part10))
        return self.cache[header_sha256]


def _ensure_studies(session: Session, staged: Sequence[StagedInstance]) -> dict[str, int]:
    wanted = {item.study_uid: item.study for item in staged}
    ids = dict(session.execute(select(Study.study_uid, Study.id).where(Study.study_uid.in_(list(wanted)))).all())
    missing = [uid for uid in wanted if uid not in ids]
    if missing:
        now = utcnow()
        upsert(session, Study, [dict(wanted[uid], num_series=0, num_instances=0, bytes_original=0, bytes_stored=0,
                                     created_at=now, updated_at=now) for uid in sorted(missing)], "study_uid")
        ids.update(session.execute(select(Study.study_uid, Study.id).where(Study.study_uid.in_(missing))).all())
    return ids


def _ensure_series(session: Session, staged: Sequence[StagedInstance], study_ids: dict[str, int]) -> dict[str, int]:
    wanted = {item.series_uid: (item.series, item.study_uid) for item in staged}
    ids = dict(session.execute(select(Series.series_uid, Series.id).where(Series.series_uid.in_(list(wanted)))).all())
    missing = [uid for uid in wanted if uid not in ids]
    if missing:
        now = utcnow()
        rows: list[dict[str, Any]] = [dict(wanted[uid][0], study_id=study_ids[wanted[uid][1]], num_instances=0,
                                           created_at=now) for uid in sorted(missing)]
        upsert(session, Series, rows, "series_uid")
        ids.update(session.execute(select(Series.series_uid, Series.id).where(Series.series_uid.in_(missing))).all())
    return ids
