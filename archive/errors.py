"""One exception hierarchy for the whole archive.

Callers catch :class:`ArchiveError`; the CLI and the API alone turn these into
exit codes or HTTP answers. Subclasses say *what kind* of failure happened so
that a batch can decide between skipping, quarantining and retrying.
"""

from __future__ import annotations


class ArchiveError(Exception):
    """Base of every error medarchive raises on purpose.

    ``exit_code`` is what the CLI exits with when this error ends a command:
    2 for usage errors and things not found, 3 when a service or the file
    system is unavailable (see the README's exit code table).
    """

    exit_code: int = 2


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

    exit_code = 1  # the archive is damaged (as `verify` reports it), not the command misused


class BlobCorruptError(ArchiveError):
    """A blob's content no longer matches its sha256 address."""

    exit_code = 1


class NotFoundError(ArchiveError):
    """A study, series or instance asked for is not in the catalog."""


class TransientError(ArchiveError):
    """The machine, not the input, failed (database or broker unreachable, disk full): retry later."""

    exit_code = 3


class UnavailableError(TransientError):
    """A service or the file system is unavailable (database or broker down, home not writable)."""


class InstanceTimeLimitExceeded(ArchiveError):
    """One instance took longer than ``instance_time_limit``: it is quarantined, its series goes on."""


class QualityError(ArchiveError):
    """A lossy encoding broke its codec's promised bound or a policy's quality floor: the instance stays lossless."""


class LossyOnlyError(NotFoundError):
    """The lossless original was released by a policy; only a lossy derivative (named in the message) is held."""


class NotAcceptableError(ArchiveError):
    """No representation the client accepts can be produced (a transfer syntax or media type): HTTP 406."""


class PayloadTooLargeError(ArchiveError):
    """An upload is larger than the configured limit (``api_max_upload_bytes``): HTTP 413."""


class IdentifierError(ArchiveError):
    """A DIMSE query or retrieve identifier the SCP cannot act on (no or a wrong level, a missing unique key):
    answered 0xA900, Identifier does not match SOP Class."""
