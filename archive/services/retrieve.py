"""Use case: give a study or one series back as DICOM Part 10 files, or one frame alone."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from archive.catalog.models import Derivation, Encoding, Instance, InstanceStatus, Series, Study
from archive.kinds import DerivationKind, StorageMode, Variant
from archive.codecs import decode_frame
from archive.dicom.reader import PixelLayout
from archive.dicom.uids import safe_component
from archive.dicom.writer import (
    OUTPUT_SYNTAXES,
    attach_fragments,
    attach_native_pixels,
    original_target,
    read_header,
    to_part10,
)
from archive.errors import ArchiveError, BlobCorruptError, BlobNotFoundError, LossyOnlyError, NotFoundError
from archive.services.blobs import read_blob, read_blobs, read_context
from archive.services.query import resolve_uid
from archive.services.runtime import Archive
from archive.services.unit_of_work import UnitOfWork

TRANSFER_SYNTAX_CHOICES = ("explicit-le", "jpegls", "jpeg2000", "original")


@dataclass
class RetrievedInstance:
    path: Path
    sop_instance_uid: str
    transfer_syntax: str
    source_path: str | None = None  # where it was ingested from (provenance)
    note: str = ""


@dataclass(frozen=True)
class UnreadableInstance:
    """An instance ``get --keep-going`` could not write: a blob it needs is missing or corrupt."""

    sop_instance_uid: str
    series_uid: str
    problem: str  # "missing" or "corrupt"
    error: str


@dataclass
class RetrieveReport:
    study_uid: str
    files: list[RetrievedInstance] = field(default_factory=list)
    series_uid: str | None = None  # set when one series was asked for
    unreadable: list[UnreadableInstance] = field(default_factory=list)
    # originals whose lossless form was released: (original SOP Instance UID, its lossy derivative's or None)
    lossy_only: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def syntaxes(self) -> Counter[str]:
        return Counter(UID(f.transfer_syntax).name for f in self.files)


def retrieve_study(
    archive: Archive,
    study_uid: str,
    out_dir: Path,
    *,
    transfer_syntax: str = "explicit-le",
    include_conflicts: bool = False,
    keep_going: bool = False,
) -> RetrieveReport:
    """Write one Part 10 file per instance of a study under ``out_dir/<series>/<instance>.dcm``."""
    with archive.unit_of_work() as uow:
        if uow.session.scalar(select(Study.id).where(Study.study_uid == study_uid)) is None:
            raise NotFoundError(f"no study with Study Instance UID {study_uid!r}")
    return retrieve(archive, study_uid, out_dir, transfer_syntax=transfer_syntax,
                    include_conflicts=include_conflicts, keep_going=keep_going)


def retrieve(
    archive: Archive,
    uid: str,
    out_dir: Path,
    *,
    transfer_syntax: str = "explicit-le",
    include_conflicts: bool = False,
    keep_going: bool = False,
    variant: Variant = Variant.ORIGINAL,
    allow_lossy: bool = False,
) -> RetrieveReport:
    """Write a study's or one series' instances (``uid`` is either UID) as Part 10 files.

    For a study, ``variant`` chooses its original series (the default), its
    current normalized series, or both; a Series UID names one series, whatever it is.

    An instance whose blob is missing or corrupt stops the retrieval with an
    error naming it; with ``keep_going`` it is listed in ``unreadable`` and
    the rest is written.

    An original whose lossless form a policy released is never written under
    its own UID: it is listed in ``lossy_only`` with its lossy derivative,
    which ``allow_lossy`` writes instead (under the derivative's own UID, in
    the derivative's series folder).
    """
    if transfer_syntax not in TRANSFER_SYNTAX_CHOICES:
        raise ArchiveError(f"unknown transfer syntax {transfer_syntax!r}; choose from {', '.join(TRANSFER_SYNTAX_CHOICES)}")
    out_dir = Path(out_dir)
    with archive.unit_of_work() as uow:
        study, series = resolve_uid(uow.session, uid)
        report = RetrieveReport(study.study_uid, series_uid=series.series_uid if series is not None else None)
        where = Instance.series_id == series.id if series is not None else Series.study_id == study.id
        if series is None:
            where = where & variant_filter(variant)
        instances = uow.session.scalars(
            select(Instance)
            .join(Series)
            .where(where)
            .options(selectinload(Instance.series), selectinload(Instance.encodings).selectinload(Encoding.frames))
            .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
        ).all()
        written: set[int] = set()
        for instance in instances:
            if instance.status is InstanceStatus.CONFLICT and not include_conflicts:
                continue
            if instance.id in written:
                continue
            if instance.status is InstanceStatus.LOSSY_ONLY:
                derivative = lossy_derivative(uow.session, instance)
                report.lossy_only.append((instance.sop_instance_uid,
                                          derivative.sop_instance_uid if derivative else None))
                if not allow_lossy or derivative is None:
                    continue
                instance = derivative
                if instance.id in written:
                    continue
            written.add(instance.id)
            try:
                data, syntax, note = instance_part10(uow, instance, transfer_syntax)
            except (BlobNotFoundError, BlobCorruptError) as exc:
                problem = "missing" if isinstance(exc, BlobNotFoundError) else "corrupt"
                if not keep_going:
                    raise type(exc)(
                        f"instance {instance.sop_instance_uid} (series {instance.series.series_uid}) cannot be read: "
                        f"{exc}. {len(report.files)} instance(s) were written to {out_dir}; `medarchive get "
                        f"--keep-going` writes the readable rest, `medarchive verify` lists every damaged blob, "
                        f"and ingesting the original file again (or `medarchive verify --repair-from DIR`) repairs it"
                    ) from exc
                report.unreadable.append(
                    UnreadableInstance(instance.sop_instance_uid, instance.series.series_uid, problem, str(exc)))
                continue
            name = safe_component(instance.sop_instance_uid)
            if instance.conflict_seq:
                name += f".conflict-{instance.conflict_seq}"
            target = out_dir / safe_component(instance.series.series_uid) / f"{name}.dcm"
            _write_atomically(target, data, out_dir)
            report.files.append(RetrievedInstance(target, instance.sop_instance_uid, str(syntax), instance.source_path, note))
    return report


def variant_filter(variant: Variant) -> Any:
    """A condition on ``Series``: originals, current normalized or lossy (derived) series, or all of them."""
    original = Series.derived_from_id.is_(None)
    if variant is Variant.ORIGINAL:
        return original
    current: Any = Derivation.is_current
    if variant is Variant.NORMALIZED:
        current = current & (Derivation.kind == DerivationKind.NORMALIZED)
    elif variant is Variant.LOSSY:
        current = current & (Derivation.kind == DerivationKind.LOSSY)
    derived = Series.id.in_(select(Derivation.series_id).where(current))
    return derived if variant is not Variant.ALL else original | derived


def instance_part10(uow: UnitOfWork, instance: Instance, transfer_syntax: str) -> tuple[bytes, UID, str]:
    """One instance as Part 10 bytes, the syntax actually written, and why it differs if it does."""
    header = uow.read_header(instance.header_blob, instance.header_dictionary)
    ds = read_header(header)
    original = UID(instance.transfer_syntax_uid)
    if instance.storage_mode is StorageMode.WHOLE:
        ds.file_meta.TransferSyntaxUID = original  # the whole object, exactly as it arrived
        native = transfer_syntax == "explicit-le" and not original.is_compressed
        target = ExplicitVRLittleEndian if native else original
        note = "" if native or transfer_syntax == "original" else "kept whole: given back as received"
        return _write(ds, target, original, note)
    encoding = current_encoding(instance)
    blobs = read_blobs(uow.session, uow.store, [f.blob_sha256 for f in encoding.frames])
    if instance.storage_mode is StorageMode.PASSTHROUGH:
        attach_fragments(ds, blobs, instance.transfer_syntax_uid)
        if transfer_syntax == "explicit-le":
            try:
                ds.decompress(generate_instance_uid=False)  # lossy input decoded for viewers needing native pixels
            except Exception as exc:  # a decoder that cannot read it: the original is still there
                return _write(ds, original, original, f"lossy original cannot be decoded ({exc}): given as received")
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            return _write(ds, ExplicitVRLittleEndian, original, "lossy original decoded to native pixels")
        note = "" if transfer_syntax == "original" else "lossy original kept in its own transfer syntax"
        return _write(ds, original, original, note)
    layout = layout_of(instance)
    context = read_context(uow.session, uow.store, encoding.context_blob)
    attach_native_pixels(ds, [decode_frame(b, context) for b in blobs], layout)
    target = original_target(original) if transfer_syntax == "original" else OUTPUT_SYNTAXES[transfer_syntax]
    note = ""
    if transfer_syntax == "original" and target != original:
        note = f"{original.name} cannot be written: given as {target.name}"
    return _write(ds, target, original, note)


def _write(ds: Dataset, target: UID, original: UID, note: str) -> tuple[bytes, UID, str]:
    """Write as ``target``; native pixels that an encoder refuses are given as Explicit VR Little Endian."""
    try:
        return to_part10(ds, target), target, note
    except Exception as exc:
        if UID(ds.file_meta.TransferSyntaxUID).is_compressed or target == ExplicitVRLittleEndian:
            raise ArchiveError(f"cannot write {target.name}: {exc}") from exc
        return to_part10(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian, f"{target.name} failed ({exc}): native pixels"


def current_encoding(instance: Instance) -> Encoding:
    for encoding in instance.encodings:
        if encoding.is_current:
            return encoding
    raise ArchiveError(f"instance {instance.sop_instance_uid} has no current encoding")


def layout_of(instance: Instance) -> PixelLayout:
    return layout_from_columns(instance, current_encoding(instance).side_info)


def layout_from_columns(row: Any, side_info: dict[str, Any] | None) -> PixelLayout:
    """The pixel layout from an Instance row, or a selected row with the same column names, and its encoding's
    side information (the photometric the frames decode to)."""
    assert row.rows and row.columns and row.bits_allocated and row.pixel_dtype
    return PixelLayout(
        rows=row.rows,
        columns=row.columns,
        samples_per_pixel=row.samples_per_pixel or 1,
        number_of_frames=row.number_of_frames or 1,
        bits_allocated=row.bits_allocated,
        bits_stored=row.bits_stored or row.bits_allocated,
        high_bit=row.high_bit or 0,
        pixel_representation=row.pixel_representation or 0,
        photometric_interpretation=row.photometric_interpretation or "MONOCHROME2",
        planar_configuration=row.planar_configuration,
        dtype=row.pixel_dtype,
        output_photometric=str((side_info or {}).get("photometric") or row.photometric_interpretation),
    )


def read_frame(archive: Archive, sop_instance_uid: str, index: int) -> np.ndarray:
    """One frame of an archived instance, decoded alone: one ranged read, checked against the frame's digest."""
    with archive.unit_of_work() as uow:
        instance = uow.session.scalar(
            select(Instance).where(Instance.sop_instance_uid == sop_instance_uid, Instance.conflict_seq == 0)
        )
        if instance is None:
            raise NotFoundError(f"no instance with SOP Instance UID {sop_instance_uid!r}")
        if instance.storage_mode is not StorageMode.PIXELS:
            raise ArchiveError(f"instance {sop_instance_uid} is stored {instance.storage_mode.value}, not as frames")
        if instance.status is InstanceStatus.LOSSY_ONLY:
            raise _lossy_only(uow, instance)
        encoding = current_encoding(instance)
        frames = encoding.frames
        if not 0 <= index < len(frames):
            raise NotFoundError(f"instance {sop_instance_uid} has {len(frames)} frames, not {index + 1}")
        context = read_context(uow.session, uow.store, encoding.context_blob)
        return decode_frame(read_blob(uow.session, uow.store, frames[index].blob_sha256), context)


def lossy_derivative(session: Session, instance: Instance) -> Instance | None:
    """The lossy derivative of an original instance (the current one first), if there is one."""
    return session.scalar(
        select(Instance).join(Derivation, Derivation.series_id == Instance.series_id)
        .where(Instance.derived_from_id == instance.id, Derivation.kind == DerivationKind.LOSSY)
        .order_by(Derivation.is_current.desc(), Derivation.generation.desc(), Instance.id.desc()).limit(1))


def _lossy_only(uow: UnitOfWork, instance: Instance) -> LossyOnlyError:
    derivative = lossy_derivative(uow.session, instance)
    named = f"{derivative.sop_instance_uid} (series {derivative.series.series_uid})" if derivative else "(none found)"
    return LossyOnlyError(f"instance {instance.sop_instance_uid}: its lossless original was released by a "
                          f"policy; only a lossy derivative is held: {named}")


def _write_atomically(target: Path, data: bytes, root: Path) -> None:
    resolved_root = root.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if resolved_root not in target.resolve().parents:
        raise ArchiveError(f"refusing to write outside {root}: {target}")
    tmp = target.with_name(target.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, target)
