"""Use case: normalize archived series into derived series of the same study, and record how.

The original is stored first, losslessly, by ingest; the normalized series is
derived from what the archive holds (so ``medarchive normalize`` can run again
later, after a profile changed). A derived series has new UIDs, derived
deterministically from the source UID, a hash of the profile's full
parameters and the software version: the same profile run again finds its
series and adds nothing; a changed profile makes a new series and a new
current :class:`~archive.catalog.models.Derivation` generation, and the
earlier one stays as history. Derived instances are staged and committed like
any instance (the same blob store, codecs and duplicate rules), linked to
their source (``derived_from``) and counted apart in the study's totals.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import select, update
from sqlalchemy.orm import selectinload

from archive import package_version
from archive.catalog.models import Derivation, Encoding, Instance, InstanceStatus, Job, Series, Study
from archive.dicom.derive import derived_series_uid
from archive.dicom.writer import attach_fragments, read_header, to_part10
from archive.errors import ArchiveError, NotFoundError
from archive.kinds import DerivationKind, NormalizeOutcome, StorageMode
from archive.normalize.grid import Interpolation
from archive.normalize.pipeline import NormalizedSeries, SourceImage, normalize_series_images, profile_sha256
from archive.normalize.profiles import NormalizeProfile, SeriesFacts, choose_profile
from archive.services.blobs import decode_encoding, read_blobs
from archive.services.encoding import archive_codec, RECENT_FRAMES
from archive.services.failures import is_transient
from archive.services.outcomes import FileOutcome, Outcome
from archive.services.recording import commit_staged_batch
from archive.services.retrieve import current_encoding, layout_of
from archive.services.runtime import Archive
from archive.services.staging import MadeInstance, StagedInstance, stage_files
from archive.services.totals import write_counted
from archive.services.unit_of_work import UnitOfWork

_log = logging.getLogger(__name__)


@dataclass
class SeriesNormalization:
    """What became of one source series."""

    study_uid: str
    source_series_uid: str
    modality: str | None
    outcome: NormalizeOutcome
    profile: str | None = None
    derived_series_uid: str | None = None
    instances: int = 0
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    rmse: float | None = None
    max_abs_error: float | None = None
    bytes_stored: int = 0
    seconds: float = 0.0
    target: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "outcome": self.outcome.value}


def software_version() -> str:
    return package_version() or "0+unknown"  # a tree that was never installed


def original_series_ids(archive: Archive, study_uids: Sequence[str] | None = None,
                        study_ids: Sequence[int] | None = None) -> list[int]:
    """The original (not derived) series of some studies, or of every study."""
    with archive.unit_of_work() as uow:
        query = select(Series.id).join(Study, Series.study_id == Study.id).where(Series.derived_from_id.is_(None))
        if study_uids is not None:
            found = set(uow.session.scalars(select(Study.study_uid).where(Study.study_uid.in_(list(study_uids)))))
            missing = [uid for uid in study_uids if uid not in found]
            if missing:
                raise NotFoundError(f"no study with Study Instance UID {missing[0]!r} is archived")
            query = query.where(Study.study_uid.in_(list(study_uids)))
        if study_ids is not None:
            query = query.where(Study.id.in_(list(study_ids)))
        return list(uow.session.scalars(query.order_by(Study.id, Series.series_number, Series.id)))


def normalize_studies(archive: Archive, *, study_uids: Sequence[str] | None = None,
                      study_ids: Sequence[int] | None = None, profile_name: str | None = None,
                      dry_run: bool = False, job_id: int | None = None, sources: Sequence[str] = (),
                      codec: dict[str, Any] | None = None, jobs: int = 1) -> list[SeriesNormalization]:
    """Normalize every original series of the studies (all studies when none are named) that a profile matches.

    ``profile_name`` forces one profile (its selectors still apply). With
    ``jobs`` > 1 series are normalized in that many forked processes, each
    committing its own (writers that lose a race run again, as ingest's do).
    """
    profile = _named_profile(archive, profile_name) if profile_name else None
    series_ids = original_series_ids(archive, study_uids, study_ids)
    options = _Options(profile, dry_run, job_id, tuple(sources), codec)
    if jobs <= 1:
        return [_normalize_isolated(archive, series_id, options) for series_id in series_ids]
    # big series are split between the processes one after the other; small ones go to the processes whole
    with archive.unit_of_work() as uow:
        sizes = dict(uow.session.execute(select(Series.id, Series.num_instances).where(Series.id.in_(series_ids))).all())
    big = [s for s in series_ids if sizes.get(s, 0) >= 2 * MIN_PART]
    small = [s for s in series_ids if s not in set(big)]
    results = {s: _normalize_isolated(archive, s, dataclasses.replace(options, jobs=jobs)) for s in big}
    if len(small) > 1:
        with ProcessPoolExecutor(min(jobs, len(small)), mp_context=multiprocessing.get_context("fork"),
                                 initializer=_start_normalizer, initargs=(archive,)) as pool:
            results.update(zip(small, pool.map(_normalize_in_child, small, [options] * len(small))))
    else:
        results.update((s, _normalize_isolated(archive, s, options)) for s in small)
    return [results[s] for s in series_ids]


@dataclass(frozen=True)
class _Options:
    profile: NormalizeProfile | None
    dry_run: bool
    job_id: int | None
    sources: tuple[str, ...]
    codec: dict[str, Any] | None
    jobs: int = 1  # processes one series may be split between


def _normalize_isolated(archive: Archive, series_id: int, options: _Options) -> SeriesNormalization:
    """One series; an error becomes a FAILED result (logged): it must not stop the others, the original is safe."""
    try:
        return normalize_series(archive, series_id, profile=options.profile, dry_run=options.dry_run,
                                job_id=options.job_id, sources=options.sources, codec=options.codec,
                                jobs=options.jobs)
    except Exception as exc:
        if is_transient(exc):
            raise
        _log.exception("normalizing series %d failed", series_id)
        result = SeriesNormalization("", str(series_id), None, NormalizeOutcome.FAILED,
                                     reason=f"{type(exc).__name__}: {exc}")
        with archive.unit_of_work() as uow:
            row = uow.session.get(Series, series_id)
            if row is not None:
                result.source_series_uid, result.modality = row.series_uid, row.modality
                result.study_uid = uow.session.scalar(select(Study.study_uid).where(Study.id == row.study_id)) or ""
        return result


_child_archive: Archive | None = None


def _start_normalizer(parent: Archive) -> None:
    """A forked normalizing process: its own engine (the parent's connections stay the parent's)."""
    global _child_archive
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the parent decides
    parent.engine.dispose(close=False)
    _child_archive = Archive.open(parent.settings, migrate=False)


def _normalize_in_child(series_id: int, options: _Options) -> SeriesNormalization:
    assert _child_archive is not None
    return _normalize_isolated(_child_archive, series_id, options)


def normalize_series(archive: Archive, series_id: int, *, profile: NormalizeProfile | None = None,
                     dry_run: bool = False, job_id: int | None = None, sources: Sequence[str] = (),
                     codec: dict[str, Any] | None = None, jobs: int = 1) -> SeriesNormalization:
    """Normalize one original series (a no-op when its current profile's series exists already).

    The copy is encoded with the profile's codec, else ``codec`` (the ingest's), else the archive's.
    With ``jobs`` > 1 a big series resampled in-plane only is split between that many processes,
    which resample and stage their part; this process commits the whole series at once.
    """
    started = time.perf_counter()
    with archive.unit_of_work() as uow:
        series = uow.session.get(Series, series_id)
        if series is None:
            raise NotFoundError(f"no series with id {series_id}")
        study_uid = uow.session.scalar(select(Study.study_uid).where(Study.id == series.study_id)) or ""
        result = SeriesNormalization(study_uid, series.series_uid, series.modality, NormalizeOutcome.NOT_MATCHED)
        if series.derived_from_id is not None:
            result.outcome, result.reason = NormalizeOutcome.SKIPPED, "a derived series is never normalized again"
            return result
        first = uow.session.scalar(select(Instance).where(Instance.series_id == series.id,
                                                          Instance.status == InstanceStatus.STORED)
                                   .order_by(Instance.id).limit(1))
        if first is None:
            result.reason = "no stored instance"
            return result
        needs_manufacturer = any(p.manufacturers for p in archive.settings.normalize_profiles) or (
            profile is not None and bool(profile.manufacturers))
        manufacturer = None
        if needs_manufacturer:
            header = read_header(uow.read_header(first.header_blob, first.header_dictionary))
            manufacturer = str(header.get("Manufacturer", "") or "")
        facts = SeriesFacts(modality=series.modality, sop_class_uid=first.sop_class_uid,
                            body_part=series.body_part, manufacturer=manufacturer, sources=tuple(sources))
        chosen = profile if profile is not None and profile.matches(facts) else None
        if profile is None and archive.settings.normalize:
            chosen = choose_profile(archive.settings.normalize_profiles, facts)
        if chosen is None:
            result.reason = _why_not(archive, facts, profile)
            return result
        result.profile = chosen.name
        version = software_version()
        expected = derived_series_uid(series.series_uid, profile_sha256(chosen, version), version)
        if uow.session.scalar(select(Series.id).where(Series.series_uid == expected)) is not None:
            result.derived_series_uid = expected
            result.outcome, result.reason = NormalizeOutcome.UNCHANGED, "normalized with this profile already"
            if not dry_run:
                _make_current(archive, expected, series_id)
            return result
        instances = image_instances(uow, series.id)
        if not instances:
            result.outcome, result.reason = NormalizeOutcome.SKIPPED, "no images (nothing with pixels to resample)"
            return result
        images = load_headers(uow, instances)
        plan = normalize_series_images(images, chosen, version=version, plan_only=True)
        codec_config = chosen.codec or codec or archive.settings.codec
        split = not plan.skipped and not dry_run and chosen.slice_spacing_mm is None and jobs > 1 \
            and len(instances) >= 2 * MIN_PART
        if not plan.skipped and not dry_run and not split:  # pixels are read only when they will be resampled
            images = decode_images(uow, instances, images)
        instance_ids = [i.id for i in instances]
    if plan.skipped or dry_run:
        _fill(result, plan)
        result.outcome, result.reason = ((NormalizeOutcome.SKIPPED, plan.skipped or "") if plan.skipped
                                         else (NormalizeOutcome.WOULD_NORMALIZE, ""))
        return result
    work = _Part(series_id, chosen, version, Interpolation(plan.interpolation), codec_config, job_id)
    if split:
        parts = _split(instance_ids, jobs)
        with ProcessPoolExecutor(len(parts), mp_context=multiprocessing.get_context("fork"),
                                 initializer=_start_normalizer, initargs=(archive,)) as pool:
            done = list(pool.map(_normalize_part_in_child, [dataclasses.replace(work, instance_ids=ids)
                                                            for ids in parts]))
        made, staged = _merge([m for m, _ in done]), [item for _, items in done for item in items]
    else:
        if not images:
            result.outcome, result.reason = NormalizeOutcome.SKIPPED, "no decodable images"
            return result
        made, staged = _normalize_part(archive, work, images)
    _fill(result, made)
    result.instances = len(staged)
    _commit(archive, series_id, made, staged, job_id, result)
    result.seconds = time.perf_counter() - started
    return result


MIN_PART = 8  # instances below which a series is not split between processes


@dataclass(frozen=True)
class _Part:
    """Some instances of one series to resample and stage (a picklable order for a child process)."""

    series_id: int
    profile: NormalizeProfile
    version: str
    kernel: Interpolation
    codec: dict[str, Any]
    job_id: int | None
    instance_ids: tuple[int, ...] = ()


def _split(ids: Sequence[int], jobs: int) -> list[tuple[int, ...]]:
    size = -(-len(ids) // jobs)
    return [tuple(ids[start:start + size]) for start in range(0, len(ids), size)]


def _normalize_part_in_child(part: _Part) -> tuple[NormalizedSeries, list[StagedInstance]]:
    assert _child_archive is not None
    archive = _child_archive
    with archive.unit_of_work() as uow:
        instances = list(uow.session.scalars(
            select(Instance).where(Instance.id.in_(part.instance_ids))
            .options(selectinload(Instance.encodings).selectinload(Encoding.frames)).order_by(Instance.id)))
        order = {instance_id: n for n, instance_id in enumerate(part.instance_ids)}
        instances.sort(key=lambda i: order[i.id])
        images = decode_images(uow, instances, load_headers(uow, instances))
    return _normalize_part(archive, part, images)  # staged blobs are durable (stage_files syncs)


def _normalize_part(archive: Archive, part: _Part, images: Sequence[SourceImage]
                    ) -> tuple[NormalizedSeries, list[StagedInstance]]:
    """Resample, derive and stage these images; the made images are dropped once staged (they go back by pipe)."""
    made = normalize_series_images(images, part.profile, version=part.version, kernel=part.kernel)
    staged = _stage_made(archive, part.series_id, images, made, part.codec, part.job_id)
    made.images = []
    return made, staged


def _merge(parts: Sequence[NormalizedSeries]) -> NormalizedSeries:
    """One series' record from its parts: errors pooled over all the pixels, warnings once each."""
    merged = dataclasses.replace(parts[0], images=[], warnings=list(dict.fromkeys(
        w for part in parts for w in part.warnings)))
    measured = [p for p in parts if p.error_pixels]
    pixels = sum(p.error_pixels or 0 for p in measured)
    if pixels:
        merged.rmse = math.sqrt(sum((p.rmse or 0.0) ** 2 * (p.error_pixels or 0) for p in measured) / pixels)
        merged.max_abs_error = max(p.max_abs_error or 0.0 for p in measured)
    merged.error_pixels = pixels
    merged.source_geometry = {**parts[0].source_geometry,
                              "instances": sum(p.source_geometry.get("instances", 0) for p in parts)}
    return merged


def _named_profile(archive: Archive, name: str) -> NormalizeProfile:
    for candidate in archive.settings.normalize_profiles:
        if candidate.name == name:
            if candidate.keep:
                raise ArchiveError(f"normalize profile {name!r} keeps series as they are: nothing to run")
            return candidate
    known = ", ".join(p.name for p in archive.settings.normalize_profiles)
    raise ArchiveError(f"no normalize profile {name!r} (known: {known})")


def _why_not(archive: Archive, facts: SeriesFacts, forced: NormalizeProfile | None) -> str:
    if forced is not None:
        return f"profile {forced.name} does not match (modality {facts.modality or '?'})"
    if not archive.settings.normalize:
        return "normalization is off (MEDARCHIVE_NORMALIZE=off)"
    for candidate in archive.settings.normalize_profiles:
        if candidate.matches(facts):
            if candidate.keep:
                return f"profile {candidate.name} keeps {facts.modality or 'these'} series as acquired"
            if not candidate.enabled:
                return f"profile {candidate.name} matches but is off ([normalize.{candidate.name}] enabled = true)"
    return f"no normalize profile matches modality {facts.modality or '?'}"


def image_instances(uow: UnitOfWork, series_id: int) -> list[Instance]:
    return list(uow.session.scalars(
        select(Instance).where(Instance.series_id == series_id, Instance.status == InstanceStatus.STORED,
                               Instance.storage_mode != StorageMode.WHOLE, Instance.rows.is_not(None))
        .options(selectinload(Instance.encodings).selectinload(Encoding.frames))
        .order_by(Instance.instance_number, Instance.id)))


def load_headers(uow: UnitOfWork, instances: Sequence[Instance]) -> list[SourceImage]:
    """The archived headers (no pixels yet), with the UIDs the catalog knows where the file had none."""
    images = []
    for instance in instances:
        ds = read_header(uow.read_header(instance.header_blob, instance.header_dictionary))
        if "SOPClassUID" not in ds:  # an ACR-NEMA file: its derived images are secondary captures
            ds.SOPClassUID = instance.sop_class_uid or SecondaryCaptureImageStorage
        if "SOPInstanceUID" not in ds:
            ds.SOPInstanceUID = instance.sop_instance_uid
        images.append(SourceImage(ds, np.empty((0, 0, 0)), instance.sop_instance_uid, instance.id))
    return images


def decode_images(uow: UnitOfWork, instances: Sequence[Instance], images: list[SourceImage]) -> list[SourceImage]:
    """The images' frames as the archive holds them (checked on read; frames this process just stored and
    verified come from :data:`RECENT_FRAMES`). A lossy original no decoder reads is left out."""
    decoded = []
    for instance, image in zip(instances, images):
        ds = image.dataset
        encoding = current_encoding(instance)
        if instance.storage_mode is StorageMode.PASSTHROUGH:
            attach_fragments(ds, read_blobs(uow.session, uow.store, [f.blob_sha256 for f in encoding.frames]),
                             instance.transfer_syntax_uid)
            try:
                pixels = np.asarray(ds.pixel_array)
            except Exception:  # noqa: BLE001 - pydicom's decoders raise many types; the rest goes on
                _log.warning("normalization leaves out %s: its lossy pixels cannot be decoded", instance.sop_instance_uid)
                continue
            finally:
                del ds.PixelData
            frames = pixels[np.newaxis] if int(instance.number_of_frames or 1) == 1 else pixels
            photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        else:
            layout = layout_of(instance)
            digests = [f.blob_sha256 for f in encoding.frames]
            cached = [RECENT_FRAMES.get(d) for d in digests]
            if any(c is None for c in cached):
                cached = decode_encoding(uow.session, uow.store, digests, encoding.context_blob)
            frames = np.stack([np.asarray(c).reshape(layout.frame_shape) for c in cached])
            photometric = layout.output_photometric
        ds.PhotometricInterpretation = photometric
        if frames.ndim == 4:
            ds.PlanarConfiguration = 0
        decoded.append(SourceImage(ds, frames, image.sop_instance_uid, image.instance_id))
    return decoded


def _fill(result: SeriesNormalization, made: NormalizedSeries) -> None:
    result.derived_series_uid = made.series_uid
    result.instances = len(made.images)
    result.warnings = [message for _kind, message in made.warnings]
    result.rmse, result.max_abs_error = made.rmse, made.max_abs_error
    result.target = made.target_geometry


def _make_current(archive: Archive, series_uid: str, source_series_id: int) -> None:
    """Running an earlier profile again makes its (kept) series current again."""
    with archive.unit_of_work() as uow:
        derived = uow.session.scalar(select(Series.id).where(Series.series_uid == series_uid))
        row = uow.session.scalar(select(Derivation).where(Derivation.series_id == derived))
        if row is None or row.is_current:
            return
        uow.session.execute(update(Derivation).where(Derivation.source_series_id == source_series_id,
                                                     Derivation.kind == DerivationKind.NORMALIZED)
                            .values(is_current=False))
        row.is_current = True
        uow.commit()


def _stage_made(archive: Archive, source_series_id: int, images: Sequence[SourceImage], made: NormalizedSeries,
                codec_config: dict[str, Any], job_id: int | None) -> list[StagedInstance]:
    """The made images staged like any instance (encoded, verified, blobs written), linked to their sources."""
    codec = archive_codec(codec_config)  # a normalized copy is stored losslessly: its header claims no lossy step
    parts = [MadeInstance(to_part10(image.dataset, image.dataset.file_meta.TransferSyntaxUID),
                          f"normalized:{made.profile}:{images[image.main_source].sop_instance_uid}")
             for image in made.images]
    staged: list[StagedInstance] = []
    for item, image in zip(stage_files(archive, parts, codec, job_id=job_id), made.images):
        if isinstance(item, FileOutcome):  # a made instance never becomes a skip: that would be a bug
            raise ArchiveError(f"normalized instance could not be staged: {item.reason}")
        item.series["derived_from_id"] = source_series_id
        item.instance["derived_from_id"] = images[image.main_source].instance_id
        staged.append(item)
    return staged


def _commit(archive: Archive, source_series_id: int, made: NormalizedSeries, staged: Sequence[StagedInstance],
            job_id: int | None, result: SeriesNormalization) -> None:
    """The derived series' rows and its derivation, current from now on, in one transaction."""

    def work(uow: UnitOfWork) -> tuple[list[FileOutcome], list[int]]:
        outcomes = commit_staged_batch(uow, staged, job_id)
        session = uow.session
        derived_id = session.scalar(select(Series.id).where(Series.series_uid == made.series_uid))
        assert derived_id is not None
        if session.scalar(select(Derivation.id).where(Derivation.series_id == derived_id)) is None:
            normalized = (Derivation.source_series_id == source_series_id) & (Derivation.kind == DerivationKind.NORMALIZED)
            generation = 1 + (session.scalar(select(Derivation.generation).where(normalized)
                                             .order_by(Derivation.generation.desc()).limit(1)) or 0)
            session.execute(update(Derivation).where(normalized).values(is_current=False))
            session.add(Derivation(
                series_id=derived_id, source_series_id=source_series_id, kind=DerivationKind.NORMALIZED,
                generation=generation, is_current=True, profile=made.profile, params=made.params,
                params_sha256=made.params_sha256, software_version=made.version,
                source_geometry=made.source_geometry, target_geometry=made.target_geometry, transform=made.transform,
                interpolation=made.interpolation, across_slices=made.across_slices,
                warnings={"items": [{"kind": kind.value if kind else None, "message": message}
                                    for kind, message in made.warnings]},
                rmse=made.rmse, max_abs_error=made.max_abs_error, error_pixels=made.error_pixels,
                num_instances=len(staged), job_id=job_id))
            session.flush()
        return [outcome for outcome, _ in outcomes], [sid for _, sid in outcomes if sid is not None]

    archive.store.make_durable([ref for item in staged for ref in item.blobs])
    outcomes = write_counted(archive, work)
    result.outcome = NormalizeOutcome.NORMALIZED
    result.bytes_stored = sum(o.bytes_stored for o in outcomes if o.outcome is not Outcome.DUPLICATE)


def after_ingest(archive: Archive, *, study_uids: Sequence[str] = (), study_ids: Sequence[int] = (),
                 job_id: int | None, sources: Sequence[str] = (), codec: dict[str, Any] | None = None,
                 jobs: int = 1) -> list[SeriesNormalization]:
    """The normalization step of an ingest job: every matching series of the studies it touched."""
    if not archive.settings.normalize or not (study_uids or study_ids):
        return []
    return normalize_studies(archive, study_uids=sorted(set(study_uids)) or None,
                             study_ids=sorted(set(study_ids)) or None, job_id=job_id, sources=sources, codec=codec,
                             jobs=jobs)


def job_sources(job: Job) -> list[str]:
    """What profiles' ``sources`` selectors see for a job: its source folders, calling AE, API token."""
    params = job.params or {}
    found = [str(p) for p in params.get("paths", [])]
    if params.get("inbox"):  # a watcher's job: the inbox folders its files arrived in
        inbox = Path(str(params["inbox"]))
        found += sorted({str(inbox / Path(str(entry[0])).parent) for entry in params.get("files", [])} or {str(inbox)})
    if params.get("source_dir"):
        found.append(str(params["source_dir"]))
    if params.get("calling_ae"):
        found.append(f"ae:{params['calling_ae']}")
    if params.get("token"):
        found.append(f"token:{params['token']}")
    return found


def summarize(results: Sequence[SeriesNormalization]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
    return counts
