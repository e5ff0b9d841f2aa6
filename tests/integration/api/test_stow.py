"""STOW-RS against the real served archive: stored instances come back bit-exact; failures are answered per part."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from sqlalchemy import select

from archive.api.stow import (
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_NOT_MATCHING,
    WARNING_CONFLICT,
    MultipartWriter,
)
from archive.catalog.models import Instance, InstanceStatus, QuarantineEntry
from archive.config import Settings
from archive.kinds import AccessAction
from archive.services.access import list_access
from archive.services.runtime import Archive
from tests.integration.api.conftest import TOKEN, Served, serve
from tests.synthetic import part10_bytes, with_new_uids

BOUNDARY = "stow-test-boundary-5f1c"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def _new_instance(served: Served, *, study: str | None = None) -> Dataset:
    """A CT source file under new UIDs (a new study unless ``study`` is given)."""
    return with_new_uids(pydicom.dcmread(served.sources("ct")[0]), study=study)


def _multipart(parts: list[bytes]) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return b"".join(head + part + b"\r\n" for part in parts) + f"--{BOUNDARY}--\r\n".encode()


def _post(served: Served, parts: list[bytes], path: str = "/studies") -> httpx.Response:
    return httpx.post(served.url + path, content=_multipart(parts), timeout=60,
                      headers={**served.headers, "Content-Type": STOW_TYPE})


def _codes(answer: dict[str, object], sequence: str, tag: str) -> list[int]:
    items = answer.get(sequence, {}).get("Value", [])  # type: ignore[attr-defined]
    return [item[tag]["Value"][0] for item in items if tag in item]


def test_stored_instances_are_archived_and_come_back_bit_exact(served: Served) -> None:
    first = _new_instance(served)
    second = _new_instance(served, study=first.StudyInstanceUID)
    client = DICOMwebClient(url=served.url, headers=served.headers)
    answer = client.store_instances([first, second])
    referenced = answer.ReferencedSOPSequence
    assert {item.ReferencedSOPInstanceUID for item in referenced} == {first.SOPInstanceUID, second.SOPInstanceUID}
    assert "FailedSOPSequence" not in answer and all("WarningReason" not in item for item in referenced)
    assert answer.RetrieveURL == f"{served.url}/studies/{first.StudyInstanceUID}"
    for sent in (first, second):
        url = next(i.RetrieveURL for i in referenced if i.ReferencedSOPInstanceUID == sent.SOPInstanceUID)
        assert url.endswith(f"/studies/{sent.StudyInstanceUID}/series/{sent.SeriesInstanceUID}"
                            f"/instances/{sent.SOPInstanceUID}")
        back = client.retrieve_instance(sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID)
        assert np.array_equal(back.pixel_array, sent.pixel_array)
        assert back.PatientID == sent.PatientID
    found = client.search_for_studies(search_filters={"StudyInstanceUID": first.StudyInstanceUID})
    assert len(found) == 1
    again = httpx.post(served.url + "/studies", content=_multipart([part10_bytes(first)]), timeout=60,
                       headers={**served.headers, "Content-Type": STOW_TYPE})
    assert again.status_code == 200  # a duplicate is a success: the archive holds exactly this object
    rows = [r for r in list_access(served.archive, limit=50, action=AccessAction.STORE)
            if r.target == first.StudyInstanceUID]
    assert rows and rows[-1].token_name == "tests" and rows[-1].instances == 2 and rows[-1].nbytes > 0
    assert not any((served.archive.settings.home / "received").iterdir())  # the temporary copies are gone


def test_a_part_that_is_not_dicom_fails_alone_and_is_kept_in_quarantine(served: Served) -> None:
    good = _new_instance(served)
    bad = f"not DICOM at all {uuid.uuid4()}".encode() * 20
    answer = _post(served, [part10_bytes(good), bad])
    assert answer.status_code == 202 and answer.headers["content-type"].startswith("application/dicom+json")
    body = answer.json()
    assert _codes(body, "00081198", "00081197") == [FAILURE_CANNOT_UNDERSTAND]
    assert [i["00081155"]["Value"][0] for i in body["00081199"]["Value"]] == [good.SOPInstanceUID]
    with served.archive.unit_of_work() as uow:
        reason, stored = uow.session.execute(select(QuarantineEntry.reason, QuarantineEntry.stored_path).where(
            QuarantineEntry.sha256 == hashlib.sha256(bad).hexdigest())).one()
    assert "stow-rs:tests" in reason and Path(stored).read_bytes() == bad


def test_a_request_with_nothing_archivable_answers_409(served: Served) -> None:
    answer = _post(served, [b"first " + uuid.uuid4().bytes * 30, b"second " + uuid.uuid4().bytes * 30])
    assert answer.status_code == 409
    assert _codes(answer.json(), "00081198", "00081197") == [FAILURE_CANNOT_UNDERSTAND] * 2
    assert "00081199" not in answer.json()


def test_a_conflicting_sop_instance_uid_is_kept_as_a_conflict_and_answered_as_a_warning(served: Served) -> None:
    original = _new_instance(served)
    assert _post(served, [part10_bytes(original)]).status_code == 200
    changed = pydicom.dcmread(io.BytesIO(part10_bytes(original)))
    pixels = changed.pixel_array.copy()
    pixels[0, 0] += 7
    changed.PixelData = pixels.tobytes()
    answer = _post(served, [part10_bytes(changed)])
    assert answer.status_code == 202
    assert _codes(answer.json(), "00081199", "00081196") == [WARNING_CONFLICT]
    with served.archive.unit_of_work() as uow:
        statuses = sorted(uow.session.scalars(select(Instance.status).where(
            Instance.sop_instance_uid == original.SOPInstanceUID)), key=str)
    assert statuses == sorted([InstanceStatus.STORED, InstanceStatus.CONFLICT], key=str)
    back = DICOMwebClient(url=served.url, headers=served.headers).retrieve_instance(
        original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    assert np.array_equal(back.pixel_array, original.pixel_array)  # the UID keeps serving the first object


def test_an_instance_of_another_study_is_refused_with_a900(served: Served) -> None:
    stray = _new_instance(served)
    answer = _post(served, [part10_bytes(stray)], path=f"/studies/{served.ct_study_uid}")
    assert answer.status_code == 409
    assert _codes(answer.json(), "00081198", "00081197") == [FAILURE_NOT_MATCHING]
    with served.archive.unit_of_work() as uow:
        assert uow.session.scalar(select(Instance.id).where(Instance.sop_instance_uid == stray.SOPInstanceUID)) is None
        error_type = uow.session.scalars(select(QuarantineEntry.error_type).where(
            QuarantineEntry.sha256 == hashlib.sha256(part10_bytes(stray)).hexdigest())).one()
    assert error_type == "StudyMismatch"


@pytest.mark.parametrize("content_type", ["application/dicom", 'multipart/related; type="application/dicom+json"; '
                                          "boundary=x", "multipart/form-data; boundary=x"])
def test_other_media_types_answer_415(served: Served, content_type: str) -> None:
    answer = httpx.post(served.url + "/studies", content=b"--x--\r\n", timeout=30,
                        headers={**served.headers, "Content-Type": content_type})
    assert answer.status_code == 415


def test_a_truncated_body_answers_400(served: Served) -> None:
    body = _multipart([b"some bytes"])[:-10]
    answer = httpx.post(served.url + "/studies", content=body, timeout=30,
                        headers={**served.headers, "Content-Type": STOW_TYPE})
    assert answer.status_code == 400 and "closing delimiter" in answer.json()["error"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second server whose archive takes at most 4 kB per request."""
    settings = Settings.load(environ={}, home=tmp_path_factory.mktemp("tiny") / "home", normalize=False,
                             api_tokens={"tests": TOKEN}, api_max_upload_bytes=4096)
    archive = Archive.open(settings, migrate=True)
    url, server = serve(archive)
    try:
        yield url
    finally:
        server.stop()
        archive.close()


def test_an_upload_over_the_limit_answers_413(served: Served, tiny: str) -> None:
    body = _multipart([b"x" * 6000])
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": STOW_TYPE}
    assert httpx.post(tiny + "/studies", content=body, headers=headers, timeout=30).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the running count decides
        for start in range(0, len(body), 1000):
            yield body[start:start + 1000]

    assert httpx.post(tiny + "/studies", content=chunks(), headers=headers, timeout=30).status_code == 413
    small = httpx.post(tiny + "/studies", content=_multipart([b"y" * 100]), headers=headers, timeout=30)
    assert small.status_code == 409  # under the limit: read and answered (not DICOM)


@pytest.mark.parametrize("step", [1, 7, 64, 100000])
def test_the_multipart_parser_finds_the_same_parts_however_the_body_is_cut(tmp_path: Path, step: int) -> None:
    parts = [b"", b"\r\n--stow-test-boundary-5f1", b"a" * 300 + b"\r\n", bytes(range(256)) * 3]
    body = b"preamble\r\n" + _multipart(parts) + b"epilogue"
    folder = tmp_path / str(step)
    folder.mkdir()
    writer = MultipartWriter(BOUNDARY, folder)
    for start in range(0, len(body), step):
        writer.feed(body[start:start + step])
    assert [p.read_bytes() for p in writer.finish()] == parts
