"""Use case: a lossy representation of an archived instance, as honest DICOM, never losing the original by accident.

A re-compression policy whose codec is lossy does not replace the original's
pixels under its UID. It makes a *derived* instance in a derived series of
the same study (new UIDs, minted deterministically from the source, the
policy's codec configuration and the software version), whose header says
what happened: Lossy Image Compression "01", the ratio and method appended to
any earlier ones, Image Type DERIVED, a Derivation Code "Lossy Compression"
and a Source Image Sequence naming the original. Its pixels are the codec's
reconstruction; its frames are the codec's bitstream (and, for a codec that
fits a basis or codebook on the series, a context blob shared by the series).

The original stays lossless unless the policy says ``keep_lossless = false``;
then its lossless encoding is released in the same transaction that commits
the derivative, and the instance is marked :attr:`InstanceStatus.LOSSY_ONLY`.
An encoding that breaks its codec's promised bound or the policy's quality
floor (``max_error``, ``min_psnr``) is not stored: the instance stays
lossless and the result says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from archive.catalog.models import Derivation, Encoding, Instance, InstanceStatus, Series
from archive.clock import utcnow
from archive.codecs import Codec, get_codec
from archive.config import RecompressPolicy
from archive.dicom.derive import (
    LOSSY_COMPRESSION,
    LossyCompression,
    attach_pixels,
    derive_header,
    derived_instance_uid,
    derived_series_uid,
    params_sha256,
)
from archive.dicom.geometry import plane_geometries
from archive.dicom.writer import read_header, to_part10
from archive.errors import ArchiveError, BlobCorruptError, CodecError, ConfigError, NotFoundError, QualityError
from archive.kinds import DerivationKind, EncodingKind, ItemOutcome, StorageMode
from archive.services.blobs import decode_encoding, read_context
from archive.services.encoding import encode_frames, pixel_hash
from archive.services.ingest import FileOutcome
from archive.services.normalization import software_version
from archive.services.recording import commit_staged_batch
from archive.services.retrieve import current_encoding, layout_of
from archive.services.runtime import Archive
from archive.services.staging import MadeInstance, PreEncoded, StagedInstance, stage_files
from archive.services.totals import write_counted
from archive.services.unit_of_work import UnitOfWork

#: Instances of a series a codec's ``fit`` sees (spread evenly): enough for a basis, cheap to read.
FIT_SAMPLE = 8

#: Lossy Image Compression Method (0028,2114): the defined terms of PS3.3 C.7.6.1.1.5 where one fits,
#: else a medarchive name (documented in the README).
_DEFINED_METHODS = {"jpegls": "ISO_14495_1", "jpeg2000": "ISO_15444_1", "htj2k": "ISO_15444_15",
                    "jpegxl": "ISO_18181_1"}


def lossy_method(config: dict[str, Any]) -> str:
    """The DICOM name of the method a lossy codec configuration applies."""
    codec_id = str(config.get("id"))
    if codec_id in _DEFINED_METHODS:
        return _DEFINED_METHODS[codec_id]
    if codec_id == "bounded":
        inner = config.get("inner") or {}
        return f"MEDARCHIVE_BOUNDED_{str(inner.get('id', 'CODEC')).upper()}"
    return f"MEDARCHIVE_{codec_id.upper().replace('-', '_')}"


@dataclass(frozen=True)
class LossyResult:
    """What one call did to one instance (the shape of a re-compression result)."""

    instance_id: int
    outcome: ItemOutcome  # RECOMPRESSED (derivative made), UNCHANGED (it exists), SKIPPED (stays lossless)
    reason: str
    bytes_before: int
    bytes_after: int
    study_id: int
    derived_sop_instance_uid: str | None = None
    released: bool = False


@dataclass
class _Source:
    instance_id: int
    study_id: int
    series_id: int
    series_uid: str
    sop_instance_uid: str
    header: bytes
    header_dictionary: str | None
    digests: list[str]
    context_digest: str | None
    pixel_sha256: str | None
    bits_stored: int
    total_pixels: int
    bytes_before: int
    bytes_after: int
    photometric: str
    sop_class_uid: str | None
    series_description: str | None
    series_number: int | None


def lossy_params(policy: RecompressPolicy) -> tuple[dict[str, Any], str]:
    """The parameters a lossy derivative's UIDs derive from, and their hash."""
    params = {"kind": DerivationKind.LOSSY.value, "policy": policy.name, "codec": get_codec(policy.codec).get_config()}
    return params, params_sha256(params)


def policy_codec(policy: RecompressPolicy, modality: str | None = None) -> Codec:
    """The policy's codec for a series of ``modality``.

    A codec whose reconstruction is not bit-exact across machines (``deterministic = False``:
    the GAN) is refused where a per-pixel bound is promised; a codec conditioned on the modality
    (``"modality": "auto"``) gets the series' own ("OT" when the codec does not know it).
    """
    codec = get_codec(policy.codec)
    if not type(codec).deterministic and (policy.max_error or codec.max_error is not None):
        raise ConfigError(f"policy {policy.name}: {codec.codec_id} cannot promise a per-pixel bound (its decoder is "
                          "not bit-exact across machines); remove max_error or use a deterministic codec")
    config = codec.get_config()
    if config.get("modality") == "auto" and modality is not None:
        try:
            return get_codec({**config, "modality": modality or "OT"})
        except CodecError:
            return get_codec({**config, "modality": "OT"})
    return codec


def derive_lossy(archive: Archive, instance_id: int, policy: RecompressPolicy) -> LossyResult:
    """Make (or find) the lossy derivative of one original instance under ``policy``; idempotent."""
    codec = policy_codec(policy)
    if codec.lossless:
        raise ArchiveError(f"policy {policy.name}: {codec.codec_id} is lossless; it re-encodes in place")
    params, sha = lossy_params(policy)
    version = software_version()
    with archive.unit_of_work() as uow:
        instance = uow.session.get(Instance, instance_id)
        if instance is None:
            raise NotFoundError(f"no instance with id {instance_id}")
        study_id = instance.series.study_id
        derived_uid = derived_instance_uid(instance.sop_instance_uid, sha, version)
        existing = uow.session.scalar(select(Instance.id).where(Instance.sop_instance_uid == derived_uid,
                                                                Instance.conflict_seq == 0))
        why_not = _why_not(instance)
        if existing is not None:
            if not policy.keep_lossless and instance.status is InstanceStatus.STORED:
                released = _release_lossless(uow, instance)  # a run that stopped between the two steps
                uow.commit()
                return LossyResult(instance_id, ItemOutcome.RECOMPRESSED, "lossless original released",
                                   released, 0, study_id, derived_uid, released=True)
            return LossyResult(instance_id, ItemOutcome.UNCHANGED, f"lossy derivative {derived_uid} exists",
                               0, 0, study_id, derived_uid)
        if why_not is not None:
            return LossyResult(instance_id, ItemOutcome.SKIPPED, why_not, 0, 0, study_id)
        source = _source(uow, instance)
        codec = policy_codec(policy, instance.series.modality or "")
        derived_series = derived_series_uid(source.series_uid, sha, version)
        context_digest = uow.session.scalar(
            select(Encoding.context_blob).join(Instance, Instance.id == Encoding.instance_id)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.series_uid == derived_series, Encoding.is_current, Encoding.context_blob.is_not(None))
            .limit(1))
        context = read_context(uow.session, uow.store, context_digest)
        frames = _decode(uow, source)
        if context is None:
            context = codec.fit(_fit_sample(uow, source, frames))
    if pixel_hash(frames) != source.pixel_sha256:
        raise BlobCorruptError(f"instance {instance_id} ({source.sop_instance_uid}): stored frames decode to pixels "
                               "that differ from those archived; no lossy derivative made")
    side_info: dict[str, Any] = {"source_sop_instance_uid": source.sop_instance_uid}
    reconstruction: list[np.ndarray] = []  # what the stored bytes decode to (encode_frames decodes them once)
    try:
        columns, encoded = encode_frames(codec, frames, source.bits_stored, source.total_pixels, source.bytes_before,
                                         side_info, source.sop_instance_uid, max_error=policy.max_error or None,
                                         context=context, min_psnr=policy.min_psnr, decoded=reconstruction)
    except QualityError as exc:
        return LossyResult(instance_id, ItemOutcome.SKIPPED, f"kept lossless: {exc}", source.bytes_after,
                           source.bytes_after, study_id)
    if columns["kind"] is not EncodingKind.LOSSY:  # the codec fell back (input it cannot take): nothing gained
        return LossyResult(instance_id, ItemOutcome.SKIPPED, f"kept lossless: {codec.codec_id} could not encode it "
                           f"({columns['actual_codecs']})", source.bytes_after, source.bytes_after, study_id)
    made = _made_instance(source, policy, codec, columns, encoded, context, reconstruction, derived_uid,
                          derived_series)
    staged = stage_files(archive, [made], codec)[0]
    if isinstance(staged, FileOutcome):
        raise ArchiveError(f"lossy derivative of {source.sop_instance_uid} could not be staged: {staged.reason}")
    staged.series["derived_from_id"] = source.series_id
    staged.instance["derived_from_id"] = source.instance_id
    released = _commit(archive, source, staged, params, sha, version, policy)
    reason = (f"lossy derivative {derived_uid}: {codec.codec_id}, {columns['bits_per_pixel']:.2f} bpp, "
              f"max error {columns['max_abs_error'] or 0:g}"
              + ("; lossless original released" if released else ""))
    return LossyResult(instance_id, ItemOutcome.RECOMPRESSED, reason, source.bytes_after,
                       int(columns["bytes_after"]), study_id, derived_uid, released=bool(released))


def _why_not(instance: Instance) -> str | None:
    if instance.series.derived_from_id is not None:
        return "a derived instance: lossy representations are made from originals"
    if instance.storage_mode is not StorageMode.PIXELS:
        return f"stored {instance.storage_mode.value}, not as encoded frames"
    if instance.status is not InstanceStatus.STORED:
        return f"instance status is {instance.status.value}"
    encoding = next((e for e in instance.encodings if e.is_current), None)
    if encoding is None:
        return "no current encoding"
    if encoding.kind is not EncodingKind.LOSSLESS:
        return f"current encoding is {encoding.kind.value}; lossy representations derive only from a lossless one"
    return None


def _source(uow: UnitOfWork, instance: Instance) -> _Source:
    encoding = current_encoding(instance)
    series = instance.series
    return _Source(
        instance_id=instance.id, study_id=series.study_id, series_id=series.id, series_uid=series.series_uid,
        sop_instance_uid=instance.sop_instance_uid,
        header=uow.read_header(instance.header_blob, instance.header_dictionary),
        header_dictionary=instance.header_dictionary,
        digests=[f.blob_sha256 for f in encoding.frames], context_digest=encoding.context_blob,
        pixel_sha256=instance.pixel_sha256,
        bits_stored=instance.bits_stored or instance.bits_allocated or 16,
        total_pixels=(instance.rows or 0) * (instance.columns or 0) * (instance.number_of_frames or 1),
        bytes_before=encoding.bytes_before, bytes_after=encoding.bytes_after,
        photometric=layout_of(instance).output_photometric, sop_class_uid=instance.sop_class_uid,
        series_description=series.series_description, series_number=series.series_number,
    )


def _decode(uow: UnitOfWork, source: _Source) -> list[np.ndarray]:
    return decode_encoding(uow.session, uow.store, source.digests, source.context_digest)


def _fit_sample(uow: UnitOfWork, source: _Source, own: list[np.ndarray]) -> list[np.ndarray]:
    """Frames of up to FIT_SAMPLE instances of the series, spread evenly: the same sample whichever instance
    asks, so two workers fitting the series at once make the same context blob."""
    rows = uow.session.execute(
        select(Instance.id).where(Instance.series_id == source.series_id, Instance.status == InstanceStatus.STORED,
                                  Instance.storage_mode == StorageMode.PIXELS)
        .order_by(Instance.instance_number, Instance.id)).scalars().all()
    if len(rows) <= 1:
        return own
    picks = sorted({rows[round(i * (len(rows) - 1) / max(FIT_SAMPLE - 1, 1))] for i in range(min(FIT_SAMPLE, len(rows)))})
    frames: list[np.ndarray] = []
    shape = own[0].shape
    for other_id in picks:
        if other_id == source.instance_id:  # decoded already
            frames.extend(own)
            continue
        other = uow.session.get(Instance, other_id)
        assert other is not None
        encoding = next((e for e in other.encodings if e.is_current), None)
        if encoding is None or encoding.kind is not EncodingKind.LOSSLESS:
            continue
        decoded = decode_encoding(uow.session, uow.store, [f.blob_sha256 for f in encoding.frames],
                                  encoding.context_blob)
        frames.extend(f for f in decoded if f.shape == shape and f.dtype == own[0].dtype)
    return frames or own


def _made_instance(source: _Source, policy: RecompressPolicy, codec: Codec, columns: dict[str, Any],
                   encoded: list[bytes], context: bytes | None, reconstruction: list[np.ndarray],
                   derived_uid: str, derived_series: str) -> MadeInstance:
    ds = read_header(source.header)
    if "SOPClassUID" not in ds:
        ds.SOPClassUID = source.sop_class_uid or SecondaryCaptureImageStorage
    if "SOPInstanceUID" not in ds:
        ds.SOPInstanceUID = source.sop_instance_uid
    ds.PhotometricInterpretation = source.photometric
    if reconstruction[0].ndim == 3:
        ds.PlanarConfiguration = 0
    config = codec.get_config()
    ratio = float(columns["ratio"])
    method = lossy_method(config)
    max_error = columns.get("max_abs_error") or 0
    description = (f"lossy compression {method} ({codec.codec_id}), ratio {ratio:.2f}:1, "
                   f"max error {max_error:g}, PSNR {columns.get('psnr') or float('inf'):.1f} dB")
    derived = derive_header(
        ds, series_uid=derived_series, sop_instance_uid=derived_uid, planes=plane_geometries(ds), sources=[ds],
        profile=policy.name, made_by="policy", description=description,
        series_number=None,
        series_description=f"{source.series_description or ''} (lossy {codec.codec_id})".strip(),
        instance_number=int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None,
        derivation=LOSSY_COMPRESSION, lossy=LossyCompression(ratio, method))
    stack = np.stack(reconstruction)
    attach_pixels(derived, stack if stack.shape[0] > 1 else stack[0])
    data = to_part10(derived, derived.file_meta.TransferSyntaxUID)
    return MadeInstance(data, f"lossy:{policy.name}:{source.sop_instance_uid}",
                        encoded=PreEncoded(encoded, columns, context, reconstruction))


def _commit(archive: Archive, source: _Source, staged: StagedInstance, params: dict[str, Any], sha: str,
            version: str, policy: RecompressPolicy) -> int:
    """The derivative's rows, its derivation (created with the series' first instance) and, when the policy
    says so, the original's lossless encoding released -- in one transaction. Returns the bytes released."""

    def work(uow: UnitOfWork) -> tuple[int, list[int]]:
        outcomes = commit_staged_batch(uow, [staged], None)
        session = uow.session
        derived_id = session.scalar(select(Series.id).where(Series.series_uid == staged.series_uid))
        assert derived_id is not None
        row = session.scalar(select(Derivation).where(Derivation.series_id == derived_id))
        if row is None:
            lossy = (Derivation.source_series_id == source.series_id) & (Derivation.kind == DerivationKind.LOSSY)
            generation = 1 + (session.scalar(select(Derivation.generation).where(lossy)
                                             .order_by(Derivation.generation.desc()).limit(1)) or 0)
            session.execute(update(Derivation).where(lossy).values(is_current=False))
            row = Derivation(
                series_id=derived_id, source_series_id=source.series_id, kind=DerivationKind.LOSSY,
                generation=generation, is_current=True, profile=policy.name[:64],
                params={**params, "context_blob": staged.context.digest if staged.context else None,
                        "keep_lossless": policy.keep_lossless},
                params_sha256=sha, software_version=version, source_geometry={}, target_geometry={},
                transform={}, interpolation="none", across_slices=False, warnings={"items": []},
                num_instances=0)
            session.add(row)
        row.num_instances = (row.num_instances or 0) + 1
        released = 0
        if not policy.keep_lossless:
            original = session.get(Instance, source.instance_id)
            assert original is not None
            released = _release_lossless(uow, original)
        session.flush()
        return released, [sid for _, sid in outcomes if sid is not None] + [source.study_id]

    archive.store.make_durable(staged.blobs)
    return write_counted(archive, work)


def _release_lossless(uow: UnitOfWork, instance: Instance) -> int:
    """Release an original's lossless encoding (its frames go to the GC); returns the bytes it held."""
    _lock(uow.session, instance.id)
    encoding = next((e for e in instance.encodings if e.is_current), None)
    if encoding is None or instance.status is InstanceStatus.LOSSY_ONLY:
        return 0
    held = encoding.bytes_after
    encoding.is_current = False
    encoding.released_at = utcnow()
    encoding.frames.clear()
    instance.status = InstanceStatus.LOSSY_ONLY
    return held


def _lock(session: Session, instance_id: int) -> None:
    session.execute(select(Instance.id).where(Instance.id == instance_id).with_for_update())
