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
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from archive.catalog.models import EncodedFrame, Encoding, Instance, InstanceStatus, Series, Study
from archive.clock import utcnow
from archive.dicom.reader import LOSSLESS, LOSSY_CODESTREAM, ONCE_LOSSY, says_once_lossy, stores_lossy_codestream
from archive.dicom.writer import canonical_header_sha256, read_header
from archive.services.blobs import record_blobs, upsert
from archive.services.outcomes import FileOutcome, Outcome
from archive.services.staging import StagedInstance, previous_headers
from archive.services.totals import refresh_totals
from archive.services.unit_of_work import UnitOfWork
from archive.store import BlobRef

_PAGE = 500
_INSTANCES = cast(Table, Instance.__table__)


class Identity(NamedTuple):
    """What makes two arrivals the same SOP instance: the UID, the header's data set, the pixels."""

    sop_instance_uid: str
    header_sha256: str
    pixel_sha256: str | None
    fidelity: int = LOSSLESS  # archive.dicom.reader.fidelity: which of two objects with one UID is the instance


HeaderVariant = tuple[str, "BlobRef | str", str | None]  # header hash, header blob, its dictionary


class Known(NamedTuple):
    """An instance already archived (or earlier in the same batch, ``instance_id`` None until inserted)."""

    identity: Identity
    conflict_seq: int
    instance_id: int | None
    batch_index: int | None = None  # position in the batch when it arrived in this one
    header: BlobRef | str | None = None  # its header blob (a digest for archived rows)
    dictionary: str | None = None  # the dictionary that header blob needs
    previous: tuple[HeaderVariant, ...] = ()  # headers it had before an administrator corrected it
    fidelity: int | None = LOSSLESS  # None: archived, lossless or once lossy (read from its header when needed)
    study_id: int | None = None  # archived rows: their study (its totals change when the row is displaced)

    @property
    def header_hashes(self) -> tuple[str, ...]:
        return (self.identity.header_sha256, *(variant[0] for variant in self.previous))


class Arrival(NamedTuple):
    outcome: Outcome  # STORED, DUPLICATE or CONFLICT
    conflict_seq: int  # for a new row
    same: Known | None  # DUPLICATE: the instance it repeats
    first: Known | None  # CONFLICT: the instance with this SOP Instance UID
    displaces: Known | None = None  # STORED over a less faithful instance, which becomes a conflict
    displaced_seq: int | None = None  # the conflict number the displaced instance takes


def decide_arrival(
    identity: Identity, known: Sequence[Known], same_elements: frozenset[tuple[str, str]] = frozenset()
) -> Arrival:
    """Duplicate when an instance with the same UID, header and pixels exists; conflict when the UID alone matches.

    ``known`` holds every instance with this SOP Instance UID, the instance
    (conflict number 0) first. ``same_elements`` holds pairs of header hashes
    (known, arriving) whose headers hold the same elements written differently
    (a copy re-sent in another transfer syntax): those are the same header. A
    header an instance had before a correction counts as its header. An
    arrival more faithful than the instance (lossless over lossy) becomes the
    instance, and the instance a recorded conflict, whichever came first.
    """
    def same_header(k: Known) -> bool:
        return any(h == identity.header_sha256 or (h, identity.header_sha256) in same_elements
                   for h in k.header_hashes)

    same = next((k for k in known if k.identity.sop_instance_uid == identity.sop_instance_uid
                 and k.identity.pixel_sha256 == identity.pixel_sha256 and same_header(k)), None)
    if same is not None:
        return Arrival(Outcome.DUPLICATE, same.conflict_seq, same, None)
    if not known:
        return Arrival(Outcome.STORED, 0, None, None)
    instance = next((k for k in known if k.conflict_seq == 0), known[0])
    next_seq = max(k.conflict_seq for k in known) + 1
    current = LOSSLESS if instance.fidelity is None else instance.fidelity
    if identity.fidelity > current:
        return Arrival(Outcome.STORED, 0, None, None, displaces=instance, displaced_seq=next_seq)
    return Arrival(Outcome.CONFLICT, next_seq, None, instance)


def commit_staged(uow: UnitOfWork, staged: StagedInstance, job_id: int | None) -> tuple[FileOutcome, int | None]:
    """Add one staged instance's catalog rows to ``uow`` (the caller commits)."""
    return commit_staged_batch(uow, [staged], job_id)[0]


def commit_staged_batch(
    uow: UnitOfWork, staged: Sequence[StagedInstance], job_id: int | None
) -> list[tuple[FileOutcome, int | None]]:
    """Add the catalog rows of staged instances to ``uow``; returns each outcome and its study id.

    The caller commits; the blobs were made durable by staging, so a crash
    before the commit leaves only unreferenced blobs. An arrival that displaces
    an archived instance (lossless over lossy) renumbers that row in the same
    transaction; the totals of its study are refreshed here when it is not the
    arrival's own.
    """
    session = uow.session
    if not staged:
        return []
    lines = _known(session, sorted({s.sop_instance_uid for s in staged}))
    record_blobs(session, [ref for item in staged for ref in item.blobs])
    study_ids = _ensure_studies(session, staged)
    series_ids = _ensure_series(session, staged, study_ids)

    decisions: list[Arrival] = []
    canonical = _CanonicalHeaders(uow)
    moved: dict[int, int] = {}  # archived instance id -> its new conflict number (displaced)
    for index, item in enumerate(staged):
        identity = Identity(item.sop_instance_uid, item.header_sha256, item.pixel_sha256, item.fidelity)
        line = lines.setdefault(item.sop_instance_uid, [])
        _resolve_fidelity(uow, line, identity)
        arrival = decide_arrival(identity, line, canonical.same_elements(line, identity, item))
        decisions.append(arrival)
        if arrival.outcome is Outcome.DUPLICATE:
            continue
        mine = Known(identity, arrival.conflict_seq, None, index, item.header, item.header_dictionary,
                     fidelity=item.fidelity)
        displaced = arrival.displaces
        if displaced is not None:
            assert arrival.displaced_seq is not None
            line[line.index(displaced)] = displaced._replace(conflict_seq=arrival.displaced_seq)
            if displaced.instance_id is not None:
                moved[displaced.instance_id] = arrival.displaced_seq
            line.insert(0, mine)
        else:
            line.append(mine)

    final = {k.batch_index: k for line in lines.values() for k in line if k.batch_index is not None}
    heads = {uid: line[0] for uid, line in lines.items() if line}
    now = utcnow()
    if moved:  # free conflict number 0 before the new instance takes it
        session.execute(  # Core (the table, not the entity): an executemany without ORM synchronisation
            update(_INSTANCES).where(_INSTANCES.c.id == bindparam("b_id"))
            .values(conflict_seq=bindparam("b_seq"), status=InstanceStatus.CONFLICT),
            [{"b_id": instance_id, "b_seq": seq} for instance_id, seq in sorted(moved.items())])

    # instances in two waves: a conflict whose instance is new in this batch needs that row's id
    instance_ids: dict[int, int] = {}
    waves: tuple[list[int], list[int]] = ([], [])
    for index, arrival in enumerate(decisions):
        if arrival.outcome is Outcome.DUPLICATE:
            continue
        head = heads[staged[index].sop_instance_uid]
        waves[1 if head.batch_index not in (None, index) else 0].append(index)
    for wave in waves:
        rows = []
        for index in wave:
            item, place = staged[index], final[index]
            head = heads[item.sop_instance_uid]
            conflict_of = None
            if place.conflict_seq != 0:
                if head.instance_id is not None:
                    conflict_of = head.instance_id
                else:  # the instance is new in this batch: inserted in the first wave
                    assert head.batch_index is not None
                    conflict_of = instance_ids[head.batch_index]
            rows.append(dict(
                item.instance, series_id=series_ids[item.series_uid], conflict_seq=place.conflict_seq,
                status=InstanceStatus.CONFLICT if place.conflict_seq else InstanceStatus.STORED,
                conflict_of_id=conflict_of, header_blob=item.header.digest, job_id=job_id, created_at=now,
            ))
        if rows:
            ids = session.scalars(insert(Instance).returning(Instance.id, sort_by_parameter_order=True), rows).all()
            instance_ids.update(zip(wave, ids))

    # archived rows of a UID whose instance is now a new row point at it
    repoint = [{"b_new": instance_ids[head.batch_index], "b_id": k.instance_id}
               for uid, head in heads.items() if head.batch_index is not None
               for k in lines[uid] if k.instance_id is not None]
    if repoint:
        session.execute(update(_INSTANCES).where(_INSTANCES.c.id == bindparam("b_id"))
                        .values(conflict_of_id=bindparam("b_new")), repoint)
    other_studies = {k.study_id for line in lines.values() for k in line
                     if k.instance_id in moved and k.study_id is not None} - set(study_ids.values())
    if other_studies:
        refresh_totals(session, other_studies)

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

    return [_result(item, arrival, final.get(index), heads.get(item.sop_instance_uid), study_ids)
            for index, (item, arrival) in enumerate(zip(staged, decisions))]


def _label(known: Known | None) -> str:
    return str(known.instance_id) if known is not None and known.instance_id is not None else "in this batch"


def _result(item: StagedInstance, arrival: Arrival, place: Known | None, head: Known | None,
            study_ids: dict[str, int]) -> tuple[FileOutcome, int | None]:
    """What the file's outcome says, from where it finally stands in its UID's line."""
    if arrival.outcome is Outcome.DUPLICATE:
        return FileOutcome(item.path, Outcome.DUPLICATE,
                           f"same SOP instance as already archived (instance {_label(arrival.same)})",
                           study_uid=item.study_uid), None
    study_id = study_ids[item.study_uid]
    assert place is not None and head is not None
    if place.conflict_seq == 0:
        reason = item.mode_reason
        if arrival.displaces is not None:
            reason += (f"; lossless, so it is the instance: the lossy object archived before (instance "
                       f"{_label(arrival.displaces)}) is kept as a recorded conflict")
        return FileOutcome(item.path, Outcome.STORED, reason, item.study_uid, item.bytes_in, item.bytes_stored), study_id
    if arrival.outcome is Outcome.STORED:  # displaced later in its own batch
        reason = ("a more faithful (lossless) object with this SOP Instance UID in this batch is the instance; "
                  "this one is kept as a recorded conflict")
    else:
        reason = (f"SOP Instance UID already archived with different content (instance {_label(head)}); "
                  "kept as a recorded conflict")
        if item.fidelity < (LOSSLESS if head.fidelity is None else head.fidelity):
            reason += " (it is the less faithful, lossy copy: the archived instance stays)"
    return FileOutcome(item.path, Outcome.CONFLICT, reason, item.study_uid, item.bytes_in, item.bytes_stored), study_id


def _known(session: Session, uids: Sequence[str]) -> dict[str, list[Known]]:
    known: dict[str, list[Known]] = {}
    rows: list[Any] = []
    for start in range(0, len(uids), _PAGE):
        rows += session.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.header_sha256, Instance.pixel_sha256,
                   Instance.conflict_seq, Instance.header_blob, Instance.header_dictionary, Instance.storage_mode,
                   Instance.transfer_syntax_uid, Series.study_id)
            .join(Series, Instance.series_id == Series.id)
            .where(Instance.sop_instance_uid.in_(uids[start:start + _PAGE])).order_by(Instance.conflict_seq)
        ).all()
    previous = previous_headers(session, [row.id for row in rows]) if rows else {}
    for row in rows:
        identity = Identity(row.sop_instance_uid, row.header_sha256, row.pixel_sha256)
        fidelity = LOSSY_CODESTREAM if stores_lossy_codestream(row.transfer_syntax_uid, row.storage_mode) else None
        known.setdefault(row.sop_instance_uid, []).append(
            Known(identity, row.conflict_seq, row.id, None, row.header_blob, row.header_dictionary,
                  tuple(previous.get(row.id, ())), fidelity, row.study_id))
    return known


def _resolve_fidelity(uow: UnitOfWork, line: list[Known], identity: Identity) -> None:
    """Read the archived instance's header when only its LossyImageCompression decides who is the instance."""
    if identity.fidelity != LOSSLESS or not line or line[0].fidelity is not None:
        return
    head = line[0]
    assert isinstance(head.header, str)
    ds = read_header(uow.read_header(head.header, head.dictionary))
    line[0] = head._replace(fidelity=ONCE_LOSSY if says_once_lossy(ds) else LOSSLESS)


class _CanonicalHeaders:
    """Header identities independent of encoding, computed only when UID and pixels match but header hashes differ."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow
        self.cache: dict[str, str] = {}  # header hash -> canonical hash

    def same_elements(self, known: Sequence[Known], identity: Identity, item: StagedInstance) -> frozenset[tuple[str, str]]:
        pairs = set()
        for k in known:
            if k.identity.pixel_sha256 != identity.pixel_sha256 or k.header is None:
                continue
            variants: list[HeaderVariant] = [(k.identity.header_sha256, k.header, k.dictionary), *k.previous]
            if identity.header_sha256 in (variant[0] for variant in variants):
                continue
            mine = self._canonical(identity.header_sha256, item.header, item.header_dictionary)
            for sha, blob, dictionary in variants:
                if self._canonical(sha, blob, dictionary) == mine:
                    pairs.add((sha, identity.header_sha256))
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
