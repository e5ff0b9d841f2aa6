"""STOW-RS (PS3.18 10.5): ``POST /studies`` and ``POST /studies/{study}`` of ``multipart/related`` DICOM parts.

The body is read as it arrives, with a running size check, and split into its
parts by a small streaming parser that writes each part to a file of a
receipt folder (:func:`archive.services.receive.new_receipt`): never more
than a chunk of the body in memory. The parts are then archived inside the
request (:func:`archive.services.receive.ingest_received`, in the thread
pool), so the answer tells the truth: when it is sent, every instance it
lists as stored is committed and its blobs are durable.
"""

from __future__ import annotations

import email.message
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from archive.api.deps import archive_of, principal_of, record
from archive.errors import ArchiveError, PayloadTooLargeError, TransientError
from archive.kinds import AccessAction
from archive.services import receive
from archive.services.outcomes import TRANSIENT_ERRNOS, Outcome
from archive.services.receive import ReceivedOutcome

router = APIRouter(tags=["STOW-RS"])

DICOM_JSON = "application/dicom+json"
FEED_BYTES = 1024 * 1024  # body bytes gathered before the parser writes them (in a worker thread)
MAX_PART_HEADERS = 16 * 1024

# PS3.18 Table 10.5.3-4 / PS3.4 Annex C.4.2.1.4 status codes
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_NOT_MATCHING = 0xA900  # the instance's study is not the one of POST /studies/{study}
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_PROCESSING = 0x0110
# A conflict (the SOP Instance UID is known, the object differs) is kept as a recorded conflict and the
# UID keeps serving the first object: what a client retrieves under that UID is not what it sent. PS3.18
# defines no "kept as a duplicate" warning; Coercion of Data Elements (B000) is the defined warning that
# tells a sender "stored, but what you get back under this UID differs from what you sent".
WARNING_CONFLICT = 0xB000

_FAILURE_BY_ERROR_TYPE = {receive.STUDY_MISMATCH: FAILURE_NOT_MATCHING, receive.NOT_ARCHIVED: FAILURE_CANNOT_UNDERSTAND,
                          "InvalidDicomError": FAILURE_CANNOT_UNDERSTAND, "NotDicomError": FAILURE_CANNOT_UNDERSTAND}

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance stored (or already archived)", "content": {DICOM_JSON: {}}},
    202: {"description": "some instances failed or were stored with a warning (FailedSOPSequence, WarningReason)",
          "content": {DICOM_JSON: {}}},
    400: {"description": "malformed multipart body"},
    409: {"description": "no instance stored (FailedSOPSequence says why for each)", "content": {DICOM_JSON: {}}},
    413: {"description": "larger than api_max_upload_bytes"},
    415: {"description": "not multipart/related; type=\"application/dicom\""},
}
_BODY_DOC = {"requestBody": {"required": True, "content": {
    'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/studies", responses=_RESPONSES, openapi_extra=_BODY_DOC)
async def store_instances(request: Request) -> Response:
    """Store the DICOM instances of a ``multipart/related; type="application/dicom"`` body."""
    return await _store(request, None)


@router.post("/studies/{study}", responses=_RESPONSES, openapi_extra=_BODY_DOC)
async def store_study_instances(request: Request, study: str) -> Response:
    """Store instances of one study: a part of another study fails with 0xA900 (and is quarantined)."""
    return await _store(request, study)


class MultipartWriter:
    """A streaming ``multipart/related`` parser (RFC 2046 5.1) that writes each part's body to its own file.

    A CRLF is put before the body so that the first delimiter, like every
    other, is ``CRLF--boundary``; a buffer tail shorter than the delimiter is
    all that is held back between feeds.
    """

    def __init__(self, boundary: str, folder: Path) -> None:
        self.delimiter = b"\r\n--" + boundary.encode("latin-1")
        self.folder = folder
        self.buffer = bytearray(b"\r\n")
        self.phase = "preamble"  # preamble, after-delimiter, headers, body, done
        self.files: list[Path] = []
        self.part: IO[bytes] | None = None

    def feed(self, data: bytes) -> None:
        self.buffer += data
        keep = len(self.delimiter) - 1
        while True:
            if self.phase == "preamble":
                at = self.buffer.find(self.delimiter)
                if at < 0:
                    del self.buffer[:max(len(self.buffer) - keep, 0)]
                    return
                del self.buffer[:at + len(self.delimiter)]
                self.phase = "after-delimiter"
            elif self.phase == "after-delimiter":
                stripped = self.buffer.lstrip(b" \t")  # transport padding
                if len(stripped) < 2:
                    return
                if stripped.startswith(b"--"):
                    self.phase = "done"
                    self.buffer.clear()
                    return
                if not stripped.startswith(b"\r\n"):
                    raise ArchiveError("malformed multipart body: a delimiter is not followed by a line end")
                del self.buffer[:len(self.buffer) - len(stripped) + 2]
                self.phase = "headers"
            elif self.phase == "headers":
                end = 0 if self.buffer.startswith(b"\r\n") else self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_PART_HEADERS:
                        raise ArchiveError("malformed multipart body: a part's headers are too long")
                    return
                del self.buffer[:end + (2 if end == 0 else 4)]  # the part's headers are not needed
                path = receive.part_path(self.folder, len(self.files))
                self.files.append(path)
                self.part = path.open("wb")
                self.phase = "body"
            elif self.phase == "body":
                assert self.part is not None
                at = self.buffer.find(self.delimiter)
                if at < 0:
                    cut = max(len(self.buffer) - keep, 0)
                    self.part.write(self.buffer[:cut])
                    del self.buffer[:cut]
                    return
                self.part.write(self.buffer[:at])
                self.part.close()
                self.part = None
                del self.buffer[:at + len(self.delimiter)]
                self.phase = "after-delimiter"
            else:  # done: the epilogue is ignored
                self.buffer.clear()
                return

    def close(self) -> None:
        if self.part is not None:
            self.part.close()
            self.part = None

    def finish(self) -> list[Path]:
        """The part files, once the closing delimiter was seen (a truncated body is an error)."""
        self.close()
        if self.phase != "done":
            raise ArchiveError("malformed multipart body: it ends before its closing delimiter "
                               "(a truncated upload? send it again)")
        return self.files


def multipart_boundary(content_type: str | None) -> str | None:
    """The boundary of ``multipart/related; type="application/dicom"``, or None for any other media type."""
    if not content_type:
        return None
    message = email.message.Message()
    message["content-type"] = content_type
    part_type = message.get_param("type")
    boundary = message.get_param("boundary")
    if message.get_content_type() != "multipart/related" or not isinstance(part_type, str) \
            or part_type.strip().lower() != "application/dicom":
        return None
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise ArchiveError("multipart/related without a usable boundary parameter")
    return boundary


async def _store(request: Request, study: str | None) -> Response:
    boundary = multipart_boundary(request.headers.get("content-type"))
    if boundary is None:
        return JSONResponse({"error": 'STOW-RS takes Content-Type: multipart/related; type="application/dicom"; '
                                      "boundary=..."}, status_code=415)
    archive = archive_of(request)
    limit = archive.settings.api_max_upload_bytes
    origin = f"stow-rs:{principal_of(request).token_name}"
    folder = await run_in_threadpool(receive.new_receipt, archive)
    writer = MultipartWriter(boundary, folder)
    received = 0
    try:
        pending = bytearray()
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise PayloadTooLargeError(f"the upload is larger than the limit of {limit} bytes "
                                           "(setting api_max_upload_bytes); send fewer instances per request")
            pending += chunk
            if len(pending) >= FEED_BYTES:
                await run_in_threadpool(writer.feed, bytes(pending))
                pending.clear()
        await run_in_threadpool(writer.feed, bytes(pending))
        files = writer.finish()
        if not files:
            raise ArchiveError("the multipart body holds no part")
    except BaseException:
        writer.close()
        shutil.rmtree(folder, ignore_errors=True)
        await run_in_threadpool(record, request, AccessAction.STORE, study or "studies", nbytes=received,
                                status=413 if received > limit else 400)
        raise
    try:
        outcomes = await run_in_threadpool(receive.ingest_received, archive, files, origin=origin, study_uid=study)
    except (TransientError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in TRANSIENT_ERRNOS:
            raise
        # the machine failed (disk full, catalog unreachable): nothing is known to be stored; the sender retries
        # (what a batch had committed comes back as duplicates, which are successes)
        outcomes = [ReceivedOutcome(i, Outcome.QUARANTINED, str(exc), None, None, None, "OutOfResources")
                    for i in range(len(files))]
    status, body = stow_answer(str(request.base_url).rstrip("/"), outcomes, study)
    stored = sum(1 for o in outcomes if o.outcome in (Outcome.STORED, Outcome.CONFLICT))
    studies = sorted({o.study_uid for o in outcomes if o.succeeded and o.study_uid})
    target = study or (studies[0] if len(studies) == 1 else "studies")  # UIDs only: no patient data
    await run_in_threadpool(record, request, AccessAction.STORE, target, nbytes=received, instances=stored,
                            status=status)
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


def failure_reason(outcome: ReceivedOutcome) -> int:
    """The Failure Reason (0008,1197) of a part that was not archived."""
    if outcome.error_type == "OutOfResources":
        return FAILURE_OUT_OF_RESOURCES
    if outcome.outcome is Outcome.SKIPPED:
        return FAILURE_CANNOT_UNDERSTAND
    return _FAILURE_BY_ERROR_TYPE.get(outcome.error_type, FAILURE_PROCESSING)


def stow_answer(base_url: str, outcomes: Sequence[ReceivedOutcome], study: str | None) -> tuple[int, dict[str, Any]]:
    """The HTTP status (200, 202, 409) and the DICOM JSON Store Instances Response (PS3.18 10.5.3)."""
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    warned = False
    for outcome in outcomes:
        item: dict[str, Any] = {}
        if outcome.sop_class_uid:
            item["00081150"] = {"vr": "UI", "Value": [outcome.sop_class_uid]}
        if outcome.sop_instance_uid:
            item["00081155"] = {"vr": "UI", "Value": [outcome.sop_instance_uid]}
        if outcome.succeeded:
            if outcome.study_uid and outcome.series_uid and outcome.sop_instance_uid:
                url = (f"{base_url}/studies/{outcome.study_uid}/series/{outcome.series_uid}"
                       f"/instances/{outcome.sop_instance_uid}")
                item["00081190"] = {"vr": "UR", "Value": [url]}
            if outcome.outcome is Outcome.CONFLICT:
                item["00081196"] = {"vr": "US", "Value": [WARNING_CONFLICT]}
                warned = True
            referenced.append(item)
        else:
            item["00081197"] = {"vr": "US", "Value": [failure_reason(outcome)]}
            failed.append(item)
    body: dict[str, Any] = {}
    studies = {o.study_uid for o in outcomes if o.succeeded and o.study_uid}
    retrieve_study = study if study is not None else (next(iter(studies)) if len(studies) == 1 else None)
    if retrieve_study is not None and referenced:
        body["00081190"] = {"vr": "UR", "Value": [f"{base_url}/studies/{retrieve_study}"]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    status = 409 if not referenced else 202 if failed or warned else 200
    return status, body
