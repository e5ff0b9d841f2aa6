"""Use case: move archived instances to another codec under a policy, never losing data.

A re-compression adds a generation: the new encoding is derived from the
current lossless one, verified against the pixel hash recorded at ingest, and
committed before the old generation is released. Its frame rows go, its blobs
stay until the garbage collector's grace period has passed (the same content
may be referenced by another instance). Every step is idempotent, so a
redelivered task does nothing twice.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import func, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from archive.catalog.models import (
    Derivation,
    EncodedFrame,
    Encoding,
    Instance,
    InstanceStatus,
    Job,
    JobItem,
    Series,
    Study,
)
from archive.kinds import EncodingKind, ItemOutcome, JobKind, StorageMode
from archive.codecs import decode_frame, get_codec
from archive.config import RecompressPolicy
from archive.errors import ArchiveError, BlobCorruptError, NotFoundError
from archive.services.blobs import read_blobs, record_blobs
from archive.services.encoding import encode_frames, pixel_hash
from archive.services.lossy import derive_lossy, lossy_params
from archive.services.runtime import Archive
from archive.clock import aware_utc, utcnow
from archive.services.totals import refresh_study_totals

RECOMPRESSED = ItemOutcome.RECOMPRESSED
UNCHANGED = ItemOutcome.UNCHANGED  # already in the target configuration (or another run did it)
SKIPPED = ItemOutcome.SKIPPED  # not (or no longer) a candidate of the policy
OUTCOMES = (RECOMPRESSED, UNCHANGED, SKIPPED)
_SCAN_BATCH = 1000


@dataclass(frozen=True)
class RecompressResult:
    """What one call did to one instance; sizes are the pixel bytes of the current encoding."""

    instance_id: int
    outcome: ItemOutcome  # one of OUTCOMES
    reason: str
    bytes_before: int
    bytes_after: int
    study_id: int


@dataclass(frozen=True)
class RecompressPlan:
    """A dry run: what a sweep of the policy would touch now."""

    policy: str
    target: dict[str, Any]
    instances: int = 0
    studies: int = 0
    bytes_stored: int = 0  # pixel bytes of the current encodings that would be replaced
    by_codec: dict[str, int] = field(default_factory=dict)
    by_modality: dict[str, int] = field(default_factory=dict)
    lossy: bool = False  # the target is lossy: it makes derived series, the originals stay under their UIDs
    keep_lossless: bool = True  # with a lossy target and False: the lossless originals are released

    @property
    def words(self) -> str:
        """What the policy would do to the originals, said plainly."""
        if not self.lossy:
            return (f"re-encodes {self.instances} instance(s) losslessly with {self.target.get('id')}; "
                    "the previous encodings are released once the new ones are verified")
        made = (f"makes a lossy derivative of {self.instances} instance(s) with {self.target.get('id')} "
                "(new UIDs in derived series, marked Lossy Image Compression 01)")
        if self.keep_lossless:
            return made + "; the lossless originals are kept (keep_lossless = true)"
        return (made + f"; keep_lossless = false: the LOSSLESS ORIGINALS OF {self.instances} INSTANCE(S) WILL BE "
                f"RELEASED ({self.bytes_stored} bytes) and only the lossy derivatives held")

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "words": self.words}


class _Candidate(NamedTuple):
    instance_id: int
    study_id: int
    codec_id: str
    bytes_after: int
    modality: str | None


def target_config(policy: RecompressPolicy) -> dict[str, Any]:
    """The policy's codec config with defaults filled in, as encodings record it."""
    return get_codec(policy.codec).get_config()


def select_candidates(
    session: Session,
    policy: RecompressPolicy,
    *,
    limit: int | None,
    now: datetime | None = None,
    exclude: Collection[int] = (),
) -> list[int]:
    """Ids of the instances the policy would re-compress now, by instance id, at most ``limit``."""
    return [c.instance_id for c in _candidates(session, policy, limit=limit, now=now, exclude=exclude)]


def plan(session: Session, policy: RecompressPolicy, *, limit: int | None = None,
         now: datetime | None = None) -> RecompressPlan:
    """Count what :func:`select_candidates` would return, without changing anything."""
    found = list(_candidates(session, policy, limit=limit, now=now, exclude=()))
    target = target_config(policy)
    return RecompressPlan(
        lossy=not get_codec(target).lossless,
        keep_lossless=policy.keep_lossless,
        policy=policy.name,
        target=target,
        instances=len(found),
        studies=len({c.study_id for c in found}),
        bytes_stored=sum(c.bytes_after for c in found),
        by_codec=dict(Counter(c.codec_id for c in found)),
        by_modality=dict(Counter(c.modality or "" for c in found)),
    )


def _candidates(session: Session, policy: RecompressPolicy, *, limit: int | None, now: datetime | None,
                exclude: Collection[int]) -> Iterator[_Candidate]:
    """Stream candidates in instance-id order; JSON configs are compared here, not in SQL."""
    if limit is not None and limit <= 0:
        return
    target = target_config(policy)
    lossy = not get_codec(target).lossless
    excluded = set(exclude)
    if lossy:
        excluded |= kept_lossless(session, policy, target)
    statement = (
        select(Instance.id, Series.study_id, Encoding.codec_id, Encoding.codec_config, Encoding.bytes_after,
               Series.modality)
        .join(Encoding, (Encoding.instance_id == Instance.id) & Encoding.is_current)
        .join(Series, Series.id == Instance.series_id)
        .where(
            Instance.status.in_((InstanceStatus.STORED, InstanceStatus.CONFLICT)),
            Instance.storage_mode == StorageMode.PIXELS,
            Encoding.kind == EncodingKind.LOSSLESS,
            Series.derived_from_id.is_(None),  # normalized copies follow their profile's codec, not a policy
        )
        .order_by(Instance.id)
    )
    if lossy:  # candidates: originals without this policy's derivative yet
        _, sha = lossy_params(policy)
        derivative = aliased(Instance)
        has_derivative = (select(derivative.derived_from_id)
                          .join(Derivation, Derivation.series_id == derivative.series_id)
                          .where(Derivation.params_sha256 == sha, derivative.derived_from_id.is_not(None)))
        statement = statement.where(Instance.status == InstanceStatus.STORED, Instance.id.not_in(has_derivative))
    if policy.from_codecs:
        statement = statement.where(Encoding.codec_id.in_(policy.from_codecs))
    if policy.modalities:
        statement = statement.where(Series.modality.in_(policy.modalities))
    if policy.study_date_before:
        statement = statement.join(Study, Study.id == Series.study_id).where(
            Study.study_date < policy.study_date_before
        )
    if policy.archived_before_days is not None:
        statement = statement.where(Instance.created_at < (aware_utc(now) or utcnow()) - timedelta(days=policy.archived_before_days))
    found = 0
    last_id = 0
    while True:  # keyset pages: no long-lived cursor, bounded memory
        rows = session.execute(statement.where(Instance.id > last_id).limit(_SCAN_BATCH)).all()
        for instance_id, study_id, codec_id, config, bytes_after, modality in rows:
            last_id = instance_id
            if instance_id in excluded or (config == target and not lossy):
                continue
            yield _Candidate(instance_id, study_id, codec_id, bytes_after, modality)
            found += 1
            if limit is not None and found >= limit:
                return
        if len(rows) < _SCAN_BATCH:
            return


def kept_lossless(session: Session, policy: RecompressPolicy, target: dict[str, Any]) -> set[int]:
    """Instances a run of this policy, with today's codec and floors, left lossless (quality floor or bound):
    a sweep does not try them again until the policy's codec or floors change."""
    rows = session.execute(
        select(JobItem.source_instance_id, Job.params).join(Job, Job.id == JobItem.job_id)
        .where(Job.kind == JobKind.RECOMPRESS, Job.policy == policy.name, JobItem.outcome == ItemOutcome.SKIPPED,
               JobItem.error.like("kept lossless:%"))).all()
    return {instance_id for instance_id, params in rows
            if instance_id is not None and params.get("codec") == target
            and params.get("max_error") == policy.max_error and params.get("min_psnr") == policy.min_psnr}


def recompress_instance(archive: Archive, instance_id: int, policy: RecompressPolicy) -> RecompressResult:
    """Re-encode one instance with the policy's codec; idempotent and safe to run concurrently.

    Raises :class:`BlobCorruptError` (or :class:`BlobNotFoundError`) when the
    stored pixels cannot be read back exactly as archived, and
    :class:`ArchiveError` when the new encoding cannot be verified; the old
    encoding then stays current and nothing is added to the catalog.
    """
    target = target_config(policy)
    codec = get_codec(target)
    if not codec.lossless:  # never in place: a lossy representation is a derived instance with its own UID
        made = derive_lossy(archive, instance_id, policy)
        return RecompressResult(made.instance_id, made.outcome, made.reason, made.bytes_before, made.bytes_after,
                                made.study_id)
    with archive.unit_of_work() as uow:
        instance = uow.session.get(Instance, instance_id)
        if instance is None:
            raise NotFoundError(f"no instance with id {instance_id}")
        study_id = instance.series.study_id
        old = _current(uow.session, instance_id)
        reason = _not_a_candidate(instance, old, policy, target)
        if reason is not None:
            size = old.bytes_after if old is not None else 0
            # Only a run that finds its own target current finishes an interrupted release: any other
            # previous generation is left exactly as it is.
            leftover = _unreleased_parent(uow.session, old) if reason[0] == UNCHANGED else None
        else:
            assert old is not None
            old_id, old_generation, old_codec, bytes_before = old.id, old.generation, old.codec_id, old.bytes_after
            digests = [f.blob_sha256 for f in old.frames]
            side_info = copy.deepcopy(old.side_info)
            raw_bytes = old.bytes_before
            expected_hash = instance.pixel_sha256
            bits_stored = instance.bits_stored or instance.bits_allocated or 16
            total_pixels = (instance.rows or 0) * (instance.columns or 0) * (instance.number_of_frames or 1)
            label = instance.sop_instance_uid
    if reason is not None:
        if leftover is not None:  # an earlier run committed its generation but stopped before releasing
            release_encoding(archive, leftover, study_id)
        return RecompressResult(instance_id, reason[0], reason[1], size, size, study_id)

    with archive.unit_of_work() as uow:
        frames = [decode_frame(b) for b in read_blobs(uow.session, uow.store, digests)]  # each blob re-hashed
    if pixel_hash(frames) != expected_hash:
        raise BlobCorruptError(
            f"instance {instance_id} ({label}): stored frames decode to pixels that differ from those archived; "
            "not re-encoding"
        )
    columns, encoded = encode_frames(codec, frames, bits_stored, total_pixels, raw_bytes, side_info, label,
                                     max_error=policy.max_error)
    new_refs = [archive.store.put(data) for data in encoded]
    archive.store.sync()  # durable before the generation that references them is committed
    if columns["kind"] == EncodingKind.LOSSLESS:  # decode what is now on disk: it must be the archived pixels, bit for bit
        stored = [decode_frame(archive.store.get(ref)) for ref in new_refs]
        if pixel_hash(stored) != expected_hash:
            raise ArchiveError(f"instance {instance_id} ({label}): {codec.codec_id} did not reproduce the archived "
                               "pixels; the previous encoding stays current")

    replaced = f"generation {old_generation} was already replaced by a concurrent run"
    with archive.unit_of_work() as uow:
        session = uow.session
        # Compare-and-set first: exactly one run flips the old generation (PostgreSQL waits on the row
        # lock and re-checks; on SQLite this statement takes the database's write lock).
        flipped = cast(CursorResult[Any], session.execute(
            update(Encoding).where(Encoding.id == old_id, Encoding.is_current.is_(True)).values(is_current=False)
        )).rowcount
        if flipped != 1:
            return RecompressResult(instance_id, UNCHANGED, replaced, bytes_before, bytes_before, study_id)
        record_blobs(session, new_refs)  # in the referencing transaction: restarts the GC's grace period
        generation = (session.scalar(
            select(func.max(Encoding.generation)).where(Encoding.instance_id == instance_id)
        ) or old_generation) + 1
        session.add(Encoding(
            instance_id=instance_id,
            generation=generation,
            is_current=True,
            derived_from_id=old_id,
            frames=[EncodedFrame(frame_index=i, blob_sha256=r.digest, nbytes=r.size) for i, r in enumerate(new_refs)],
            **columns,
        ))
        try:
            uow.commit()
        except IntegrityError:  # a concurrent run added this generation first
            uow.rollback()
            return RecompressResult(instance_id, UNCHANGED, replaced, bytes_before, bytes_before, study_id)

    release_encoding(archive, old_id, study_id)
    return RecompressResult(instance_id, RECOMPRESSED,
                            f"{old_codec} generation {old_generation} -> {codec.codec_id} generation {generation}",
                            bytes_before, int(columns["bytes_after"]), study_id)


def release_encoding(archive: Archive, encoding_id: int, study_id: int) -> None:
    """Drop a superseded encoding's frame rows (its blobs go to the GC) and refresh the study totals.

    Runs only after the new generation is committed; a crash in between
    leaves a non-current encoding with frames, which calling this again
    releases. Releasing a current encoding is refused.
    """
    with archive.unit_of_work() as uow:
        encoding = _lock_encoding(uow.session, encoding_id)
        if encoding is None:
            raise NotFoundError(f"no encoding with id {encoding_id}")
        if encoding.is_current:
            raise ArchiveError(f"encoding {encoding_id} is current; only superseded encodings are released")
        encoding.frames.clear()  # delete-orphan: the EncodedFrame rows go
        if encoding.released_at is None:
            encoding.released_at = utcnow()
        refresh_study_totals(uow.session, study_id)
        uow.commit()


def _not_a_candidate(instance: Instance, current: Encoding | None, policy: RecompressPolicy,
                     target: dict[str, Any]) -> tuple[ItemOutcome, str] | None:
    """(outcome, reason) when the instance must be left as it is, else None."""
    if instance.storage_mode is not StorageMode.PIXELS:
        return SKIPPED, f"stored {instance.storage_mode.value}, not as encoded frames"
    if instance.status not in (InstanceStatus.STORED, InstanceStatus.CONFLICT):
        return SKIPPED, f"instance status is {instance.status.value}"
    if current is None:
        return SKIPPED, "no current encoding"
    if current.codec_config == target:
        return UNCHANGED, f"already encoded as {target} (generation {current.generation})"
    if current.kind is not EncodingKind.LOSSLESS:
        return SKIPPED, f"current encoding is {current.kind.value}; new generations derive only from a lossless one"
    if policy.from_codecs and current.codec_id not in policy.from_codecs:
        return SKIPPED, f"current codec {current.codec_id} is not one of {list(policy.from_codecs)}"
    return None


def _unreleased_parent(session: Session, current: Encoding | None) -> int | None:
    """The generation ``current`` replaced, when it still has frame rows (a run stopped before releasing it)."""
    if current is None or current.derived_from_id is None:
        return None
    parent = session.get(Encoding, current.derived_from_id)
    if parent is None or parent.is_current or (parent.released_at is not None and not parent.frames):
        return None
    return parent.id


def _current(session: Session, instance_id: int) -> Encoding | None:
    return session.scalar(select(Encoding).where(Encoding.instance_id == instance_id, Encoding.is_current))


def _lock_encoding(session: Session, encoding_id: int) -> Encoding | None:
    """Read an encoding under a row lock (PostgreSQL; SQLite serializes writers anyway)."""
    return session.scalar(
        select(Encoding).where(Encoding.id == encoding_id).with_for_update().execution_options(populate_existing=True)
    )
