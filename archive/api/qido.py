"""QIDO-RS routes (PS3.18 10.6): thin, the search itself is :mod:`archive.services.qido`.

Every search writes one access-log row whose target is the path and the
query's attribute NAMES (never their values: they may be patient names).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response

from archive.api.deps import archive_of, record, status_of
from archive.errors import ArchiveError, NotAcceptableError
from archive.kinds import AccessAction
from archive.services.qido import (
    DEFAULT_LIMIT,
    MAX_HEADER_LIMIT,
    MAX_LIMIT,
    QidoResult,
    query_attribute_names,
    search_instances,
    search_series,
    search_studies,
)

router = APIRouter(tags=["QIDO-RS"])

DICOM_JSON = "application/dicom+json"
_ACCEPTED = ("application/dicom+json", "application/json", "*/*", "application/*")

_DESCRIPTION = f"""Search (QIDO-RS, PS3.18 10.6), answered as `{DICOM_JSON}` (DICOM JSON, PS3.18 F.2).

Matching keys by keyword or tag (`PatientName` or `00100010`): PatientID, PatientName (wildcards `*` `?`, any case),
StudyDate and PatientBirthDate (`YYYYMMDD`, `A-B`, `A-`, `-B`), AccessionNumber, StudyInstanceUID (a list, comma
separated), ModalitiesInStudy, StudyDescription, StudyID, ReferringPhysicianName, PatientSex; at series level also
Modality, SeriesInstanceUID, SeriesNumber, SeriesDescription; at instance level also SOPInstanceUID, SOPClassUID,
InstanceNumber. Other keys are ignored with a `Warning: 299` header naming them; so is `fuzzymatching=true`.

`includefield` (repeatable, comma separated, keywords or tags, or `all`): attributes beyond the catalog's are read
from the first instance's header. `limit` defaults to {DEFAULT_LIMIT}, at most {MAX_LIMIT} ({MAX_HEADER_LIMIT} when
headers are read); `offset` skips matches.

medarchive's own parameter `includederived=true`: list derived series (normalized and lossy representations, marked
DERIVED in ImageType) with the originals, and count them; by default they are left out so that a viewer shows the
originals. Conflicting objects (same SOP Instance UID, different content) are never listed."""


def _parameter(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_OPENAPI: dict[str, Any] = {
    "parameters": [
        _parameter("includefield", "attributes to return as well (keywords or tags, comma separated), or `all`",
                   {"type": "array", "items": {"type": "string"}}),
        _parameter("limit", f"at most this many matches (default {DEFAULT_LIMIT}, at most {MAX_LIMIT})",
                   {"type": "integer", "minimum": 0}),
        _parameter("offset", "skip this many matches", {"type": "integer", "minimum": 0}),
        _parameter("fuzzymatching", "accepted and ignored (with a 299 Warning header)", {"type": "boolean"}),
        _parameter("includederived", "medarchive: include derived series (normalized, lossy), marked DERIVED",
                   {"type": "boolean", "default": False}),
        _parameter("PatientName", "an example matching key; any attribute listed above is one",
                   {"type": "string"}),
    ],
    "responses": {"200": {"description": "the matches (possibly none)", "content": {DICOM_JSON: {}}}},
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "a malformed parameter (a date, a number)"},
    404: {"description": "the study or series in the path is not archived"},
    406: {"description": "the client accepts no JSON"},
}
_ROUTE: dict[str, Any] = {"description": _DESCRIPTION, "openapi_extra": _OPENAPI, "responses": _RESPONSES,
                          "response_class": Response}


@router.get("/studies", summary="Search for studies", **_ROUTE)
def studies(request: Request) -> Response:
    return _answer(request, "studies", lambda params, base: search_studies(archive_of(request), params, base_url=base))


@router.get("/series", summary="Search for series", **_ROUTE)
def all_series(request: Request) -> Response:
    return _answer(request, "series",
                   lambda params, base: search_series(archive_of(request), None, params, base_url=base))


@router.get("/instances", summary="Search for instances", **_ROUTE)
def all_instances(request: Request) -> Response:
    return _answer(request, "instances",
                   lambda params, base: search_instances(archive_of(request), None, None, params, base_url=base))


@router.get("/studies/{study}/series", summary="Search for a study's series", **_ROUTE)
def study_series(request: Request, study: str) -> Response:
    return _answer(request, f"{study}/series",
                   lambda params, base: search_series(archive_of(request), study, params, base_url=base))


@router.get("/studies/{study}/instances", summary="Search for a study's instances", **_ROUTE)
def study_instances(request: Request, study: str) -> Response:
    return _answer(request, f"{study}/instances",
                   lambda params, base: search_instances(archive_of(request), study, None, params, base_url=base))


@router.get("/studies/{study}/series/{series}/instances", summary="Search for a series' instances", **_ROUTE)
def series_instances(request: Request, study: str, series: str) -> Response:
    return _answer(request, f"{study}/{series}/instances",
                   lambda params, base: search_instances(archive_of(request), study, series, params, base_url=base))


def _answer(request: Request, path: str,
            search: Callable[[dict[str, list[str]], str], QidoResult]) -> Response:
    """Run one search, record it (failures too) and answer DICOM JSON with a 299 Warning header per warning."""
    params: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        params.setdefault(name, []).append(value)
    target = f"{path}?{','.join(query_attribute_names(params))}"
    try:
        _check_accept(request)
        result = search(params, str(request.base_url).rstrip("/"))
    except ArchiveError as exc:
        record(request, AccessAction.SEARCH, target, status=status_of(exc))
        raise
    body = json.dumps(result.matches, ensure_ascii=False, separators=(",", ":")).encode()
    record(request, AccessAction.SEARCH, target, nbytes=len(body), instances=len(result.matches))
    response = Response(body, media_type=DICOM_JSON)
    for warning in result.warnings:
        text = warning.encode("ascii", "replace").decode().replace('"', "'").replace("\r", " ").replace("\n", " ")
        response.headers.append("Warning", f'299 medarchive "{text}"')
    return response


def _check_accept(request: Request) -> None:
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return
    kinds = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if not any(kind in _ACCEPTED for kind in kinds):
        raise NotAcceptableError(f"QIDO-RS answers {DICOM_JSON}; the client accepts only {accept[:100]}")
