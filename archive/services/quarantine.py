"""Setting a file aside: a byte-identical copy with its reason, and a catalog row; the source is left as it is."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from sqlalchemy import func, select

from archive.catalog.models import QuarantineEntry
from archive.dicom.uids import safe_filename
from archive.services.outcomes import FileOutcome, Outcome
from archive.services.runtime import Archive


def quarantine_file(archive: Archive, path: Path, reason: str, error_type: str, *, job_id: int | None = None) -> FileOutcome:
    """Copy ``path`` into the quarantine folder with its reason (once per content and path)."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    folder = archive.settings.quarantine_dir / digest[:2]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{digest[:16]}__{safe_filename(path.name)}"
    if not target.exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        target.with_name(target.name + ".reason.txt").write_text(f"{path}\n{error_type}: {reason}\n")
    with archive.unit_of_work() as uow:
        known = uow.session.scalar(
            select(func.count()).select_from(QuarantineEntry).where(
                QuarantineEntry.sha256 == digest, QuarantineEntry.source_path == str(path)
            )
        )
        if not known:
            uow.session.add(QuarantineEntry(
                source_path=str(path), stored_path=str(target), reason=reason, error_type=error_type,
                sha256=digest, size=len(data), job_id=job_id,
            ))
            uow.commit()
    return FileOutcome(path, Outcome.QUARANTINED, reason, bytes_in=len(data))


def quarantine_unless_kept(
    archive: Archive, outcome: FileOutcome, *, job_id: int | None, keep_skipped: bool
) -> FileOutcome:
    """A skipped file of a spooled job is quarantined too: its spool folder is deleted when the job ends."""
    if outcome.outcome is Outcome.SKIPPED and not keep_skipped:
        return quarantine_file(archive, outcome.path, f"not archived: {outcome.reason}", "NotArchived", job_id=job_id)
    return outcome
