"""The named kinds the archive records and reports: one Enum each, shared by the reader, catalog and services.

They live outside :mod:`archive.catalog` so that the DICOM reader and the
codecs never import the catalog; the catalog stores their values as strings.
"""

from __future__ import annotations

import enum


class StorageMode(str, enum.Enum):
    """How an instance's pixels are kept."""

    PIXELS = "pixels"  # decoded frames, each encoded by a codec
    PASSTHROUGH = "passthrough"  # already lossy input: original compressed frames, untouched
    WHOLE = "whole"  # non-image or unusual objects: the whole file, zstd-compressed


class EncodingKind(str, enum.Enum):
    """What an encoding row is, as far as its pixels' fidelity goes."""

    LOSSLESS = "lossless"
    LOSSY = "lossy"
    PASSTHROUGH = "passthrough"  # the original compressed frames, as received
    WHOLE = "whole"  # the object kept whole (header blob), no frames


class JobKind(str, enum.Enum):
    """What a job does; each kind has one handler in :mod:`archive.services.job_kinds`."""

    INGEST = "ingest"
    RECOMPRESS = "recompress"
    NORMALIZE = "normalize"  # items are source series (their first instance)


class Lane(str, enum.Enum):
    """Which worker queue a job task is sent to.

    Learned codecs get a queue of their own (setting ``learned_queue``) so that machines
    with a GPU or many cores can take that work while the others keep ingesting.
    """

    DEFAULT = "default"
    LEARNED = "learned"


class DerivationKind(str, enum.Enum):
    """What made a derived series (``derivations.kind``)."""

    NORMALIZED = "normalized"
    LOSSY = "lossy"  # a lossy representation made by a re-compression policy with a lossy target


class NormalizeOutcome(str, enum.Enum):
    """What normalization did with one source series."""

    NORMALIZED = "normalized"
    UNCHANGED = "unchanged"  # its series for this profile exists already
    WOULD_NORMALIZE = "would-normalize"  # a dry run
    NOT_MATCHED = "not-matched"  # no enabled profile applies (or one that keeps it as acquired)
    SKIPPED = "skipped"  # a profile applies but it cannot or must not be done (reason recorded)
    FAILED = "failed"  # an error (logged); the original is untouched


class Variant(str, enum.Enum):
    """Which series of a study to retrieve: the originals (default), the current normalized or lossy ones, or all."""

    ORIGINAL = "original"
    NORMALIZED = "normalized"
    LOSSY = "lossy"
    ALL = "all"


class ItemOutcome(str, enum.Enum):
    """What became of one item of a job (the ``job_items.outcome`` column and task reports)."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    SKIPPED = "skipped"
    QUARANTINED = "quarantined"
    RECOMPRESSED = "recompressed"
    NORMALIZED = "normalized"
    UNCHANGED = "unchanged"  # already in the target configuration (or another run did it)
    FAILED = "failed"


class AuditAction(str, enum.Enum):
    """What an administrator did to archived data (the ``audit_log.action`` column)."""

    DELETE_STUDY = "delete-study"
    DELETE_SERIES = "delete-series"
    UPDATE = "update"  # patient or study attributes corrected
    MERGE_PATIENT = "merge-patient"
    QUARANTINE_RETRY = "quarantine-retry"
    QUARANTINE_PURGE = "quarantine-purge"
    REPAIR = "repair"  # a missing or corrupt blob written again from a source
    RESTORE = "restore"


class AccessAction(str, enum.Enum):
    """What a client of the API did (the ``access_log.action`` column): every retrieval and store is recorded."""

    SEARCH = "search"  # QIDO-RS
    RETRIEVE = "retrieve"  # WADO-RS instances
    METADATA = "metadata"
    FRAMES = "frames"
    RENDERED = "rendered"  # rendered images and thumbnails, the web page's included
    STORE = "store"  # STOW-RS
    ENCODINGS = "encodings"
    SIGN_IN = "sign-in"
    # the DICOM network service (medarchive scp); the "token name" is then dimse:<calling AE title>
    ASSOCIATE = "associate"  # one row per association: accepted and released, aborted, or rejected
    MOVE = "move"  # C-MOVE (C-GET is a retrieve, C-FIND a search, C-STORE a store)
    COMMIT = "commit"  # storage commitment
