"""WADO-RS (PS3.18 10.4): instances, metadata, frames, rendered images and thumbnails; medarchive's /encodings.

Routes parse the request and present the answer; the work is in :mod:`archive.services.wado`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from archive.api import multipart
from archive.api.deps import archive_of, record, status_of
from archive.dicom.writer import read_header
from archive.errors import ArchiveError, NotAcceptableError, NotFoundError
from archive.kinds import AccessAction
from archive.services import rendering
from archive.services.wado import (
    BuiltInstance,
    RetrievalPlan,
    choose_syntax,
    parse_accept,
    plan_retrieval,
    stream_instances,
    stream_metadata,
    study_encodings,
)
from archive.services.wado_render import FrameSource, jpegls_frame, native_frame, read_frames, representative_instance

router = APIRouter(tags=["WADO-RS"])
DICOM_JSON = "application/dicom+json"
THUMBNAIL_SIZE = 128
_ERRORS: dict[int | str, dict[str, Any]] = {404: {"description": "unknown study, series, instance or frame"},
                                            406: {"description": "no acceptable media type or transfer syntax"}}
_DICOM = {200: {"content": {'multipart/related; type="application/dicom"': {}},
                "description": "one Part 10 instance per part"}, **_ERRORS}
_JSON = {200: {"content": {DICOM_JSON: {}}, "description": "DICOM JSON, one object per instance"}, **_ERRORS}
_FRAMES = {200: {"content": {'multipart/related; type="application/octet-stream"': {},
                             'multipart/related; type="image/jls"': {}}, "description": "one frame per part"},
           **_ERRORS}
_IMAGE = {200: {"content": {"image/png": {}, "image/jpeg": {}}, "description": "a rendered image"}, **_ERRORS}


def _target(*uids: str | None) -> str:
    return "/".join(uid for uid in uids if uid)


# --- instances


@router.get("/studies/{study}", summary="Retrieve a study (multipart/related; type=\"application/dicom\")",
            responses=_DICOM, response_class=Response)
def retrieve_study(study: str, request: Request) -> StreamingResponse:
    return _retrieve(request, study)


@router.get("/studies/{study}/series/{series}", summary="Retrieve a series",
            responses=_DICOM, response_class=Response)
def retrieve_series(study: str, series: str, request: Request) -> StreamingResponse:
    return _retrieve(request, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}", summary="Retrieve an instance",
            responses=_DICOM, response_class=Response)
def retrieve_instance(study: str, series: str, sop: str, request: Request) -> StreamingResponse:
    return _retrieve(request, study, series, sop)


def _retrieve(request: Request, study: str, series: str | None = None, sop: str | None = None) -> StreamingResponse:
    """Negotiated before the first byte (404, 406 as plain answers), then streamed instance by instance."""
    archive = archive_of(request)
    target = _target(study, series, sop)
    try:
        plan = plan_retrieval(archive, study, series, sop, include_derived=_include_derived(request))
        syntax = choose_syntax(request.headers.get("accept"), plan)
    except ArchiveError as exc:
        record(request, AccessAction.RETRIEVE, target, status=status_of(exc))
        raise
    boundary = multipart.new_boundary()
    headers = {}
    warning = plan.warning()
    if warning:
        headers["Warning"] = warning
    body = _counted(request, target, plan, multipart.stream_parts(_parts(stream_instances(archive, plan, syntax)),
                                                                   boundary))
    return StreamingResponse(body, media_type=multipart.content_type("application/dicom", boundary),
                             headers=headers)


def _parts(built: Iterator[BuiltInstance]) -> Iterator[tuple[str, bytes]]:
    for instance in built:
        yield f"application/dicom; transfer-syntax={instance.transfer_syntax}", instance.data


def _counted(request: Request, target: str, plan: RetrievalPlan, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The body, with one access-log row when it ends (bytes sent; 499 when the client went away or it failed)."""
    sent, status = 0, 499
    try:
        for chunk in chunks:
            sent += len(chunk)
            yield chunk
        status = 200
    finally:
        record(request, AccessAction.RETRIEVE, target, status=status, nbytes=sent,
               instances=len(plan.instances) if status == 200 else 0)


def _include_derived(request: Request) -> bool:
    """medarchive's ``includederived=true`` (as in QIDO): a study's derived series too, not only its originals."""
    return request.query_params.get("includederived", "").lower() in ("true", "1", "yes")


# --- metadata


@router.get("/studies/{study}/metadata", summary="Study metadata (DICOM JSON)",
            responses=_JSON, response_class=Response)
def study_metadata(study: str, request: Request) -> StreamingResponse:
    return _metadata(request, study)


@router.get("/studies/{study}/series/{series}/metadata", summary="Series metadata (DICOM JSON)",
            responses=_JSON, response_class=Response)
def series_metadata(study: str, series: str, request: Request) -> StreamingResponse:
    return _metadata(request, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata", summary="Instance metadata (DICOM JSON)",
            responses=_JSON, response_class=Response)
def instance_metadata(study: str, series: str, sop: str, request: Request) -> StreamingResponse:
    return _metadata(request, study, series, sop)


def _metadata(request: Request, study: str, series: str | None = None, sop: str | None = None) -> StreamingResponse:
    target = _target(study, series, sop)
    _accepts(request, (DICOM_JSON, "application/json"))
    try:
        plan = plan_retrieval(archive_of(request), study, series, sop, include_derived=_include_derived(request))
    except ArchiveError as exc:
        record(request, AccessAction.METADATA, target, status=status_of(exc))
        raise
    record(request, AccessAction.METADATA, target, instances=len(plan.instances))
    base = str(request.base_url).rstrip("/")
    headers = {"Warning": plan.warning() or ""} if plan.warning() else {}
    return StreamingResponse(stream_metadata(archive_of(request), plan, base), media_type=DICOM_JSON,
                             headers=headers)


def _accepts(request: Request, offered: tuple[str, ...]) -> str:
    """The first offered media type the Accept header allows (``*/*``, ``type/*`` included), else 406."""
    for media_range in parse_accept(request.headers.get("accept")):
        for media_type in offered:
            major = media_type.split("/")[0]
            if media_range.media_type in (media_type, "*/*", f"{major}/*"):
                return media_type
    raise NotAcceptableError(f"this resource is offered as {' or '.join(offered)}")


# --- frames


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}", summary="Frames of an instance",
            responses=_FRAMES, response_class=Response)
def retrieve_frames(study: str, series: str, sop: str, frames: str, request: Request) -> StreamingResponse:
    """Native little-endian bytes per frame (``application/octet-stream``), or ``image/jls``."""
    target = _target(study, series, sop)
    numbers = _frame_numbers(frames)
    try:
        part_type = _frame_media_type(request.headers.get("accept"))
        source = read_frames(archive_of(request), study, series, sop, numbers, decode=part_type != "image/jls")
        if part_type == "application/octet-stream" and source.bits_allocated not in (8, 16):
            raise NotAcceptableError(f"{source.bits_allocated}-bit frames are not offered as native bytes")
        bodies = [_frame_body(source, index, part_type) for index in range(len(numbers))]
    except ArchiveError as exc:
        record(request, AccessAction.FRAMES, target, status=status_of(exc))
        raise
    record(request, AccessAction.FRAMES, target, nbytes=sum(len(b) for b in bodies), instances=1)
    boundary = multipart.new_boundary()
    part_header = part_type if part_type != "application/octet-stream" else \
        "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    parts = ((part_header, body) for body in bodies)
    return StreamingResponse(multipart.stream_parts(parts, boundary),
                             media_type=multipart.content_type(part_type, boundary))


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(piece) for piece in text.split(",") if piece.strip()]
    except ValueError:
        raise ArchiveError(f"frame list must be comma-separated numbers from 1, not {text!r}") from None
    if not numbers or any(n < 1 for n in numbers):
        raise NotFoundError(f"frame numbers start at 1: {text!r}")
    return numbers


def _frame_media_type(accept: str | None) -> str:
    for media_range in parse_accept(accept):
        part = media_range.params.get("type", "").lower() if media_range.media_type == "multipart/related" \
            else media_range.media_type
        syntax = media_range.params.get("transfer-syntax")
        if part in ("", "*/*", "application/octet-stream", "multipart/*") and syntax in (None, "*",
                                                                                       "1.2.840.10008.1.2.1"):
            return "application/octet-stream"
        if part == "image/jls" and syntax in (None, "*", "1.2.840.10008.1.2.4.80"):
            return "image/jls"
    raise NotAcceptableError("frames are offered as multipart/related; type=\"application/octet-stream\" "
                             "(Explicit VR Little Endian) or type=\"image/jls\" (JPEG-LS Lossless)")


def _frame_body(source: FrameSource, index: int, part_type: str) -> bytes:
    if part_type == "image/jls":
        return jpegls_frame(source, index)
    return native_frame(source.frame(index), source)


# --- rendered and thumbnails


@router.get("/studies/{study}/rendered", summary="A rendered image of the study (its representative instance)",
            responses=_IMAGE, response_class=Response)
def rendered_study(study: str, request: Request) -> Response:
    return _rendered(request, study, thumbnail=False)


@router.get("/studies/{study}/series/{series}/rendered", summary="A rendered image of the series (its middle instance)",
            responses=_IMAGE, response_class=Response)
def rendered_series(study: str, series: str, request: Request) -> Response:
    return _rendered(request, study, series, thumbnail=False)


@router.get("/studies/{study}/series/{series}/instances/{sop}/rendered", summary="An instance rendered (first frame)",
            responses=_IMAGE, response_class=Response)
def rendered_instance(study: str, series: str, sop: str, request: Request) -> Response:
    return _rendered(request, study, series, sop, thumbnail=False)


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/rendered", summary="A frame rendered",
            responses=_IMAGE, response_class=Response)
def rendered_frame(study: str, series: str, sop: str, frame: int, request: Request) -> Response:
    return _rendered(request, study, series, sop, frame=frame, thumbnail=False)


@router.get("/studies/{study}/thumbnail", summary="Thumbnail of the study (middle instance of its first series)",
            responses=_IMAGE, response_class=Response)
def thumbnail_study(study: str, request: Request) -> Response:
    return _rendered(request, study, thumbnail=True)


@router.get("/studies/{study}/series/{series}/thumbnail", summary="Thumbnail of the series (its middle instance)",
            responses=_IMAGE, response_class=Response)
def thumbnail_series(study: str, series: str, request: Request) -> Response:
    return _rendered(request, study, series, thumbnail=True)


@router.get("/studies/{study}/series/{series}/instances/{sop}/thumbnail", summary="Thumbnail of an instance",
            responses=_IMAGE, response_class=Response)
def thumbnail_instance(study: str, series: str, sop: str, request: Request) -> Response:
    return _rendered(request, study, series, sop, thumbnail=True)


def _rendered(request: Request, study: str, series: str | None = None, sop: str | None = None, *,
              frame: int = 1, thumbnail: bool) -> Response:
    """PNG (default) or JPEG; ``window=c,w[,linear]`` overrides the header's window; ``viewport=cols,rows`` shrinks."""
    archive = archive_of(request)
    target = _target(study, series, sop)
    try:
        media_type = _rendered_media_type(request)
        window = rendering.Window.parse(request.query_params["window"]) if "window" in request.query_params else None
        viewport = _viewport(request.query_params.get("viewport"))
        if thumbnail:
            viewport = viewport or (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
        if series is None or sop is None:
            series, sop = representative_instance(archive, study, series)
            target = _target(study, series, sop)
        source = read_frames(archive, study, series, sop, [frame])
        image = rendering.render_frame(source.frame(0), read_header(source.header), window=window,
                                       photometric=source.photometric)
        if viewport is not None:
            image = rendering.fit_viewport(image, viewport[1], viewport[0])
        body = rendering.encode_image(image, media_type)
    except ArchiveError as exc:
        record(request, AccessAction.RENDERED, target, status=status_of(exc))
        raise
    record(request, AccessAction.RENDERED, target, nbytes=len(body), instances=1)
    return Response(body, media_type=media_type)


def _rendered_media_type(request: Request) -> str:
    asked = request.query_params.get("accept")
    if asked:
        if asked.split(";")[0].strip().lower() not in rendering.MEDIA_TYPES:
            raise NotAcceptableError(f"rendered images are offered as {' or '.join(rendering.MEDIA_TYPES)}")
        return asked.split(";")[0].strip().lower()
    return _accepts(request, rendering.MEDIA_TYPES)


def _viewport(text: str | None) -> tuple[int, int] | None:
    """``viewport=columns,rows`` (PS3.18 8.3.5.1.3: vw,vh; the optional region after them is ignored)."""
    if not text:
        return None
    try:
        columns, rows = (int(float(v)) for v in text.split(",")[:2])
    except ValueError:
        raise ArchiveError(f"viewport must be 'columns,rows', not {text!r}") from None
    if columns < 1 or rows < 1:
        raise ArchiveError(f"viewport must be positive, not {text!r}")
    return columns, rows


# --- medarchive's own


@router.get("/studies/{study}/encodings", summary="medarchive: codec, parameters, sizes and error per instance")
def encodings(study: str, request: Request) -> JSONResponse:
    try:
        result = study_encodings(archive_of(request), study)
    except ArchiveError as exc:
        record(request, AccessAction.ENCODINGS, study, status=status_of(exc))
        raise
    record(request, AccessAction.ENCODINGS, study, instances=len(result["instances"]))
    return JSONResponse(result)
