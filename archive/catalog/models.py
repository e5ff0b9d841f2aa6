"""The catalog: what is archived, how it was encoded, and what that cost.

Designed for what follows: encodings keep their history (generation, current
flag, derived-from link) so that lossy and normalized variants and scheduled
re-compression add rows, not tables. Blob references are foreign keys, so a
garbage collector can tell what is still in use with one query.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from archive.clock import utcnow
from archive.kinds import AccessAction, AuditAction, DerivationKind, EncodingKind, ItemOutcome, JobKind, StorageMode

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class InstanceStatus(str, enum.Enum):
    STORED = "stored"
    CONFLICT = "conflict"  # same SOP Instance UID as an earlier, different object
    # its lossless pixels were released by a policy with keep_lossless = false: only a lossy derivative
    # (an instance of a derived series, derived_from_id = this one) is held
    LOSSY_ONLY = "lossy-only"


class JobStatus(str, enum.Enum):
    SPOOLING = "spooling"  # the watcher is moving the study's files into the job's spool folder
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # a direct ingest stopped by Ctrl-C or SIGTERM; what it committed stays


class ItemStatus(str, enum.Enum):
    """One instance of a job; ``done``, ``quarantined`` and ``failed`` are final."""

    QUEUED = "queued"
    RUNNING = "running"  # claimed by a worker process (``owner``) until ``lease_until``
    DONE = "done"
    QUARANTINED = "quarantined"
    FAILED = "failed"  # re-compression could not verify; the previous encoding stays current


FINAL_ITEM_STATUSES = (ItemStatus.DONE, ItemStatus.QUARANTINED, ItemStatus.FAILED)


def _str_enum(kind: type[enum.Enum], length: int = 16) -> Enum:
    """An Enum stored as its string value (no database enum type, no CHECK constraint)."""
    return Enum(kind, native_enum=False, length=length, values_callable=lambda e: [m.value for m in e])


class Blob(Base):
    """A stored blob and where it is: a pack and an offset, or (older archives) a loose file."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    pack: Mapped[str | None] = mapped_column(String(64), index=True)  # None: a loose file (layout before packs)
    offset: Mapped[int | None] = mapped_column(BigInteger)  # of the blob's bytes in the pack


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(128), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(128), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(330), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    study_time: Mapped[str | None] = mapped_column(String(32))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_description: Mapped[str | None] = mapped_column(String(256))
    modalities_in_study: Mapped[str | None] = mapped_column(String(128))
    # what QIDO-RS returns besides the above (revision 0007; NULL for studies archived before it)
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    referring_physician_name: Mapped[str | None] = mapped_column(String(330))
    dicom_study_id: Mapped[str | None] = mapped_column(String(64))  # Study ID (0020,0010), not the row's id
    specific_character_set: Mapped[str | None] = mapped_column(String(128))  # as received, e.g. "ISO_IR 100"
    num_series: Mapped[int] = mapped_column(default=0)
    num_instances: Mapped[int] = mapped_column(default=0)
    bytes_original: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_stored: Mapped[int] = mapped_column(BigInteger, default=0)
    # derived series (normalized, later lossy or learned representations): counted apart from the originals
    num_derived_series: Mapped[int] = mapped_column(default=0)
    num_derived_instances: Mapped[int] = mapped_column(default=0)
    bytes_derived: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.series_number")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(128), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None]
    series_description: Mapped[str | None] = mapped_column(String(256))
    body_part: Mapped[str | None] = mapped_column(String(64))
    num_instances: Mapped[int] = mapped_column(default=0)
    # a derived series (new UIDs made by medarchive) points at the series it was made from; None: an original
    derived_from_id: Mapped[int | None] = mapped_column(ForeignKey("series.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.instance_number")


class Instance(Base):
    """One archived SOP instance; a conflicting object with a known UID gets its own row."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "conflict_seq"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(128), index=True)
    conflict_seq: Mapped[int] = mapped_column(default=0)  # 0 = first arrival
    conflict_of_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))
    status: Mapped[InstanceStatus] = mapped_column(_str_enum(InstanceStatus), default=InstanceStatus.STORED)
    sop_class_uid: Mapped[str | None] = mapped_column(String(128))
    instance_number: Mapped[int | None]
    transfer_syntax_uid: Mapped[str] = mapped_column(String(128))  # as received
    had_file_meta: Mapped[bool] = mapped_column(Boolean, default=True)
    storage_mode: Mapped[StorageMode] = mapped_column(_str_enum(StorageMode))
    storage_reason: Mapped[str | None] = mapped_column(Text)
    # pixel geometry as received (side information needed to rebuild Pixel Data)
    rows: Mapped[int | None]
    columns: Mapped[int | None]
    number_of_frames: Mapped[int | None]
    samples_per_pixel: Mapped[int | None]
    bits_allocated: Mapped[int | None]
    bits_stored: Mapped[int | None]
    high_bit: Mapped[int | None]
    pixel_representation: Mapped[int | None]
    photometric_interpretation: Mapped[str | None] = mapped_column(String(32))
    planar_configuration: Mapped[int | None]
    pixel_dtype: Mapped[str | None] = mapped_column(String(8))
    # identity for duplicate detection, independent of transfer syntax
    header_sha256: Mapped[str] = mapped_column(String(64))
    pixel_sha256: Mapped[str | None] = mapped_column(String(64))
    header_blob: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    # the zstd dictionary the header blob was compressed with (a blob too: GC and verify follow it)
    header_dictionary: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    assigned_uids: Mapped[dict[str, Any] | None]  # UIDs medarchive had to create (ACR-NEMA files)
    source_path: Mapped[str | None] = mapped_column(Text)
    source_size: Mapped[int] = mapped_column(BigInteger, default=0)
    source_sha256: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    # a derived instance's main source (its Source Image Sequence lists every one)
    derived_from_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")
    encodings: Mapped[list[Encoding]] = relationship(
        back_populates="instance", order_by="Encoding.generation", foreign_keys="Encoding.instance_id"
    )


class Encoding(Base):
    """One way an instance's pixels are stored, with what it cost in size and error.

    At most one encoding per instance is current: a partial unique index says so to the database.
    """

    __tablename__ = "encodings"
    __table_args__ = (
        UniqueConstraint("instance_id", "generation"),
        Index("ix_encodings_current", "instance_id", "is_current"),
        Index("uq_encodings_one_current", "instance_id", unique=True,
              sqlite_where=text("is_current"), postgresql_where=text("is_current")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    generation: Mapped[int] = mapped_column(default=1)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    kind: Mapped[EncodingKind] = mapped_column(_str_enum(EncodingKind))
    codec_id: Mapped[str] = mapped_column(String(32))  # as configured
    codec_config: Mapped[dict[str, Any]]
    actual_codecs: Mapped[dict[str, Any]]  # codec id that really ran -> frame count (fallbacks show here)
    library_versions: Mapped[dict[str, Any]]
    side_info: Mapped[dict[str, Any]]  # modality, photometric, bits, value mappings
    num_frames: Mapped[int] = mapped_column(default=1)
    bytes_before: Mapped[int] = mapped_column(BigInteger)
    bytes_after: Mapped[int] = mapped_column(BigInteger)
    ratio: Mapped[float] = mapped_column(Float)
    bits_per_pixel: Mapped[float] = mapped_column(Float)
    mse: Mapped[float | None] = mapped_column(Float)
    psnr: Mapped[float | None] = mapped_column(Float)  # peak 2**BitsStored - 1; None when exact
    psnr_range: Mapped[float | None] = mapped_column(Float)  # peak = max - min of the original
    max_abs_error: Mapped[float | None] = mapped_column(Float)
    encode_ms: Mapped[float] = mapped_column(Float, default=0.0)
    decode_ms: Mapped[float] = mapped_column(Float, default=0.0)
    derived_from_id: Mapped[int | None] = mapped_column(ForeignKey("encodings.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    released_at: Mapped[datetime | None]  # superseded: its frame rows are gone, the GC frees the blobs
    # the side blob every frame of this encoding decodes with (a basis, a codebook), fitted on the series
    context_blob: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    max_error_bound: Mapped[int | None]  # what the codec promised per pixel: 0 lossless, None no bound
    fallback_reason: Mapped[str | None] = mapped_column(Text)  # why the configured codec was not kept

    instance: Mapped[Instance] = relationship(back_populates="encodings", foreign_keys=[instance_id])
    frames: Mapped[list[EncodedFrame]] = relationship(
        back_populates="encoding", order_by="EncodedFrame.frame_index", cascade="all, delete-orphan"
    )


class EncodedFrame(Base):
    """Frame-addressable storage: one blob per frame, so one frame reads alone."""

    __tablename__ = "encoded_frames"

    encoding_id: Mapped[int] = mapped_column(ForeignKey("encodings.id"), primary_key=True)
    frame_index: Mapped[int] = mapped_column(primary_key=True)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    nbytes: Mapped[int] = mapped_column(BigInteger)

    encoding: Mapped[Encoding] = relationship(back_populates="frames")


class Derivation(Base):
    """How a derived series was made from its source: the profile, the geometry both sides, and what it cost.

    One row per generation: running a changed profile makes a new derived
    series (new UIDs) and a new current row; earlier ones stay as history.
    The normalization error (the derived image resampled back onto the source
    grid) is kept apart from any codec's error, which the encodings record.
    """

    __tablename__ = "derivations"
    __table_args__ = (Index("ix_derivations_source_current", "source_series_id", "is_current"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), unique=True)  # the derived series
    source_series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    kind: Mapped[DerivationKind] = mapped_column(_str_enum(DerivationKind))
    generation: Mapped[int] = mapped_column(default=1)  # per source series
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    profile: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]]  # the profile's full parameters as applied
    params_sha256: Mapped[str] = mapped_column(String(64))  # with the software version: what the UIDs derive from
    software_version: Mapped[str] = mapped_column(String(32))
    source_geometry: Mapped[dict[str, Any]]
    target_geometry: Mapped[dict[str, Any]]
    transform: Mapped[dict[str, Any]]  # scale, offsets, padding, crop, slice plan
    interpolation: Mapped[str] = mapped_column(String(16))
    across_slices: Mapped[bool] = mapped_column(Boolean, default=False)
    warnings: Mapped[dict[str, Any]]  # {"items": [{"kind": StackWarning value, "message": ...}]}
    rmse: Mapped[float | None] = mapped_column(Float)  # normalization error, in modality units (HU for CT)
    max_abs_error: Mapped[float | None] = mapped_column(Float)
    error_pixels: Mapped[int | None]  # source pixels both grids cover, over which the error was measured
    num_instances: Mapped[int] = mapped_column(default=0)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CodecTrial(Base):
    """What ``auto`` tried on a sample of a series, and the codec it chose for the whole series."""

    __tablename__ = "codec_trials"

    id: Mapped[int] = mapped_column(primary_key=True)
    # by UID, not id: the trial runs while the series is being staged, before its row exists
    series_uid: Mapped[str] = mapped_column(String(128), index=True)
    config: Mapped[dict[str, Any]]  # the auto codec's configuration
    winner: Mapped[dict[str, Any]]  # the chosen codec's configuration
    result: Mapped[dict[str, Any]]  # every candidate's bytes and times on the sample
    sampled: Mapped[int] = mapped_column(default=0)  # instances encoded in the trial
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """A unit of work the batch service tracks: a study to ingest, a re-compression sweep.

    The catalog, not the broker, is the source of truth: every instance of a job
    is a :class:`JobItem`, grouped into :class:`JobTask` rows that are what is
    sent to the workers, so lost messages can be re-sent by the reconciler.
    """

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[JobKind] = mapped_column(_str_enum(JobKind, 32))
    status: Mapped[JobStatus] = mapped_column(_str_enum(JobStatus), default=JobStatus.QUEUED, index=True)
    study_uid: Mapped[str | None] = mapped_column(String(128), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    spool_dir: Mapped[str | None] = mapped_column(Text)  # removed once every item is final
    fingerprint: Mapped[str | None] = mapped_column(String(64), unique=True)  # study + file set: queued once
    policy: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    tasks: Mapped[list[JobTask]] = relationship(back_populates="job", order_by="JobTask.id")


class JobTask(Base):
    """What one broker message carries: a chunk of one series' instances."""

    __tablename__ = "job_tasks"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    series_uid: Mapped[str | None] = mapped_column(String(128))
    celery_id: Mapped[str | None] = mapped_column(String(64))
    dispatched_at: Mapped[datetime | None]  # last time a message was sent; None = never
    dispatches: Mapped[int] = mapped_column(default=0)
    deliveries: Mapped[int] = mapped_column(default=0)  # executions that found work to do
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship(back_populates="tasks")
    items: Mapped[list[JobItem]] = relationship(back_populates="task", order_by="JobItem.id")


class JobItem(Base):
    """One instance of a job and its state; claimed by one worker process at a time."""

    __tablename__ = "job_items"
    __table_args__ = (Index("ix_job_items_job_id_status", "job_id", "status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    task_id: Mapped[int] = mapped_column(ForeignKey("job_tasks.id"), index=True)
    path: Mapped[str | None] = mapped_column(Text)  # ingest: the file (in the spool folder)
    source_instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))  # re-compression
    status: Mapped[ItemStatus] = mapped_column(_str_enum(ItemStatus), default=ItemStatus.QUEUED)
    outcome: Mapped[ItemOutcome | None] = mapped_column(_str_enum(ItemOutcome))
    attempts: Mapped[int] = mapped_column(default=0)
    owner: Mapped[str | None] = mapped_column(String(128))  # host:pid:start of the claiming process
    lease_until: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    task: Mapped[JobTask] = relationship(back_populates="items")


class HeaderDictionary(Base):
    """A zstd dictionary trained on archived headers of one modality and manufacturer.

    Headers of a kind repeat most of their bytes (private groups, protocol
    text); compressed with a dictionary of their kind, small MR headers shrink
    severalfold. The dictionary is a content-addressed blob; an instance
    records the one its header needs, so old headers keep decoding whatever
    is trained later.
    """

    __tablename__ = "header_dictionaries"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(200), index=True)  # "MODALITY|Manufacturer"
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), unique=True)
    samples: Mapped[int] = mapped_column(default=0)
    bytes_plain: Mapped[int] = mapped_column(BigInteger, default=0)  # the samples zstd-compressed without it
    bytes_with: Mapped[int] = mapped_column(BigInteger, default=0)  # with it (the dictionary not counted)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class QuarantineEntry(Base):
    """A file that claimed to be DICOM but could not be archived; a copy is kept with the reason."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(primary_key=True)
    source_path: Mapped[str] = mapped_column(Text)
    stored_path: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    error_type: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(128))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """Who changed archived data, when, why, and what exactly (deletes, corrections, merges, repairs)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    action: Mapped[AuditAction] = mapped_column(_str_enum(AuditAction, 32), index=True)
    target: Mapped[str] = mapped_column(String(128), index=True)  # a Study or Series UID, a Patient ID, a path
    actor: Mapped[str] = mapped_column(String(128))  # user@host of the process that did it
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class HeaderRevision(Base):
    """A header an instance had before a correction: kept, so that every change can be seen and undone.

    The instance's ``header_blob`` is always the header served; a revision row
    keeps the previous one (GC and verify follow these blobs too).
    """

    __tablename__ = "header_revisions"
    __table_args__ = (UniqueConstraint("instance_id", "revision"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    revision: Mapped[int]  # 1 = the header as received
    header_blob: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    header_dictionary: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"))
    header_sha256: Mapped[str] = mapped_column(String(64))
    changes: Mapped[dict[str, Any]]  # keyword -> [previous, new] of the change that replaced this header
    audit_id: Mapped[int | None] = mapped_column(ForeignKey("audit_log.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AccessEvent(Base):
    """One request of an API client: who (the token's name), what, when, how many bytes. No patient data."""

    __tablename__ = "access_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_name: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[AccessAction] = mapped_column(_str_enum(AccessAction, 32), index=True)
    target: Mapped[str] = mapped_column(String(200), index=True)  # a UID path: study[/series[/instance]], or a query
    status: Mapped[int] = mapped_column(default=200)  # the HTTP status answered
    nbytes: Mapped[int] = mapped_column(BigInteger, default=0)  # sent (retrievals) or received (stores)
    instances: Mapped[int] = mapped_column(default=0)
    client: Mapped[str | None] = mapped_column(String(64))  # the peer address
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
