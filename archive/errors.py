"""One exception hierarchy for the whole archive.

Callers catch :class:`ArchiveError`; the CLI and the API alone turn these into
exit codes or HTTP answers. Subclasses say *what kind* of failure happened so
that a batch can decide between skipping, quarantining and retrying.
"""

from __future__ import annotations


class ArchiveError(Exception):
    """Base of every error medarchive raises on purpose."""


class ConfigError(ArchiveError):
    """Configuration is missing or malformed."""


class CodecError(ArchiveError):
    """A codec was misconfigured, or its input or output is invalid."""


class NotDicomError(ArchiveError):
    """The file is plainly not DICOM (README, PNG, DICOMDIR): skip it, say why."""


class InvalidDicomError(ArchiveError):
    """The file claims to be DICOM but cannot be archived faithfully: quarantine it."""


class BlobNotFoundError(ArchiveError):
    """A blob the catalog references is missing from the store."""


class BlobCorruptError(ArchiveError):
    """A blob's content no longer matches its sha256 address."""


class NotFoundError(ArchiveError):
    """A study, series or instance asked for is not in the catalog."""


class TransientError(ArchiveError):
    """The machine, not the input, failed (database or broker unreachable, disk full): retry later."""


class InstanceTimeLimitExceeded(ArchiveError):
    """One instance took longer than ``instance_time_limit``: it is quarantined, its series goes on."""
