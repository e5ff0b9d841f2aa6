"""C-STORE: parse, write durably to the incoming area, then answer; the study is queued once it is stable.

Success is answered only after the instance is on disk (temporary file,
fsync, rename, fsync of the folder), so an association that drops loses only
the instance in flight. The file is handed to the watcher's stable-study
logic (:class:`archive.watcher.InboxWatcher`, in this process): a study sent
over one association or several, in any order, is spooled and queued for the
workers once no instance of it arrived for ``stable_age`` seconds. Failures
are answered, never dropped: 0xA700 when the disk is nearly full, 0xC210 when
the data set cannot be parsed, 0xA900 when it does not match its SOP class;
what was not understood is also copied to the quarantine with the reason.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from archive.dimse.context import ScpContext
from archive.kinds import AccessAction
from archive.services.quarantine import quarantine_file
from archive.store import fsync_dir

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900  # Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC210
PROCESSING_FAILURE = 0x0110
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # PS3.5 9.1 (also keeps paths inside the incoming area)
NOT_UNDERSTOOD = "NotUnderstood"  # the quarantine's error type of a C-STORE answered 0xC210 or 0xA900


def failure(status: int, comment: str) -> Dataset:
    """A status data set with an Error Comment (at most 64 characters, PS3.7 C.4.1)."""
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = comment[:64]
    return answer


def handle_store(event: Any, ctx: ScpContext) -> int | Dataset:
    """pynetdicom's EVT_C_STORE handler."""
    association = ctx.log_of(event.assoc)
    with ctx.lock:
        ctx.received[id(event.assoc)] = 0
    try:
        data = event.encoded_dataset(include_meta=True)
    except Exception as exc:  # noqa: BLE001  (pynetdicom could not even frame it)
        return failure(CANNOT_UNDERSTAND, f"cannot read the data set: {exc}")
    try:
        dataset = event.dataset
        sop_class = str(dataset.get("SOPClassUID", "")).strip()
        sop_instance = str(dataset.get("SOPInstanceUID", "")).strip()
        study = str(dataset.get("StudyInstanceUID", "")).strip()
    except Exception as exc:  # noqa: BLE001  (whatever pydicom raises on a malformed data set)
        return _refuse(ctx, event, data, CANNOT_UNDERSTAND, f"cannot parse the data set: {exc}", "")
    if not sop_class and not sop_instance:  # pydicom is lenient: bytes with no identity are not a data set to us
        return _refuse(ctx, event, data, CANNOT_UNDERSTAND, "no SOP Class or Instance UID: not a data set", "")
    request = event.request
    if sop_class != str(request.AffectedSOPClassUID).strip():
        return _refuse(ctx, event, data, DATASET_MISMATCH,
                       f"SOP Class {sop_class or '(none)'} is not the one sent ({request.AffectedSOPClassUID})", study)
    if sop_instance != str(request.AffectedSOPInstanceUID).strip() or not UID_PATTERN.match(sop_instance):
        return _refuse(ctx, event, data, DATASET_MISMATCH,
                       f"SOP Instance UID {sop_instance or '(none)'} is missing, malformed or not the one sent", study)
    if not UID_PATTERN.match(study) or len(study) > 64:
        return _refuse(ctx, event, data, DATASET_MISMATCH, "Study Instance UID is missing or malformed", study)
    incoming = ctx.settings.incoming_dir
    free = shutil.disk_usage(incoming).free
    if free - len(data) < ctx.settings.scp_min_free_bytes:
        log.warning("refusing %s from %s: %d bytes free", sop_instance, association.calling_ae, free)
        association.add(AccessAction.STORE, study, status=OUT_OF_RESOURCES)
        return failure(OUT_OF_RESOURCES, "out of resources: the archive's disk is nearly full")
    try:
        path = write_durably(incoming / study, f"{sop_instance}.dcm", data)
    except OSError as exc:
        log.error("cannot write %s: %s", sop_instance, exc)
        association.add(AccessAction.STORE, study, status=OUT_OF_RESOURCES)
        return failure(OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}")
    ctx.arrived(path)
    association.add(AccessAction.STORE, study, nbytes=len(data), instances=1)
    return SUCCESS


def write_durably(folder: Path, name: str, data: bytes) -> Path:
    """``folder/name`` holds ``data`` and survives a power cut once this returns."""
    new_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    tmp = folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"  # hidden: the watcher ignores it
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    if new_folder:
        fsync_dir(folder.parent)
    return target


def _refuse(ctx: ScpContext, event: Any, data: bytes, status: int, reason: str, study: str) -> Dataset:
    """Answer a failure and keep a copy with its reason: the sender keeps its own, the administrator sees ours."""
    association = ctx.log_of(event.assoc)
    origin = f"c-store:{association.calling_ae}@{association.address}"
    log.warning("refused an instance from %s: %s", origin, reason)
    association.add(AccessAction.STORE, study or "(unreadable)", status=status)
    try:
        holding = ctx.settings.home / "received"
        holding.mkdir(parents=True, exist_ok=True)
        path = holding / f"{uuid.uuid4().hex}.dcm"
        path.write_bytes(data)
        try:
            quarantine_file(ctx.archive, path, f"received from {origin}, answered 0x{status:04X}: {reason}",
                            NOT_UNDERSTOOD)
        finally:
            path.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001  (the answer matters more than the copy; the log keeps the reason)
        log.exception("could not quarantine a refused instance from %s", origin)
    return failure(status, reason)


def count_received(event: Any, ctx: ScpContext) -> None:
    """EVT_DATA_RECV: a data set larger than ``scp_max_dataset_bytes`` closes its association, not the server."""
    key = id(event.assoc)
    with ctx.lock:
        total = ctx.received.get(key, 0) + len(event.data)
        ctx.received[key] = total
    if total > ctx.settings.scp_max_dataset_bytes:
        with ctx.lock:
            ctx.received[key] = 0
        log.warning("aborting the association of %s: more than %d bytes in one message",
                    event.assoc.requestor.ae_title, ctx.settings.scp_max_dataset_bytes)
        ctx.log_of(event.assoc).add(AccessAction.STORE, "(oversized data set)", status=OUT_OF_RESOURCES)
        event.assoc.abort(block=False)  # from the network thread: queue the A-ABORT, do not wait for it
