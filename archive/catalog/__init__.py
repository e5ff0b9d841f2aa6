"""The SQLAlchemy catalog: models, engine factory, schema migrations."""

from archive.catalog.database import create_engine_for, make_session_factory, upgrade_schema
from archive.catalog.models import (
    Base,
    Blob,
    EncodedFrame,
    Encoding,
    Instance,
    InstanceStatus,
    Job,
    JobStatus,
    QuarantineEntry,
    Series,
    Study,
)

__all__ = [
    "Base", "Blob", "EncodedFrame", "Encoding", "Instance", "InstanceStatus", "Job", "JobStatus",
    "QuarantineEntry", "Series", "Study",
    "create_engine_for", "make_session_factory", "upgrade_schema",
]
