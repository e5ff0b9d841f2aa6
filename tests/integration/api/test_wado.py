"""WADO-RS against the real served archive: every pixel and header element compared with the ingested files."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import imagecodecs
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from archive.catalog.models import Encoding, Instance
from archive.config import RecompressPolicy, Settings
from archive.kinds import AccessAction
from archive.services.access import list_access
from archive.services.blobs import read_blobs
from archive.services.ingest import ingest_paths
from archive.services.lossy import derive_lossy
from archive.services.runtime import Archive
from archive.services.retrieve import current_encoding, layout_of
from archive.services.wado import jpegls_precision, plan_retrieval, stored_jpegls
from tests.dicom_compare import header_differences, read, stored_values
from tests.integration.api.conftest import NEAR2, TOKEN, Served, serve

IGNORE = {"PixelData"}


@pytest.fixture(scope="module")
def client(served: Served) -> DICOMwebClient:
    return DICOMwebClient(url=served.url, headers=served.headers)


@pytest.fixture(scope="module")
def sources(served: Served) -> dict[str, Dataset]:
    """The ingested files by SOP Instance UID (CT and MR)."""
    out = {}
    for folder in ("ct", "mr"):
        for path in served.sources(folder):
            ds = read(path)
            out[str(ds.SOPInstanceUID)] = ds
    return out


def _check_same(retrieved: Dataset, sources: dict[str, Dataset]) -> None:
    original = sources[str(retrieved.SOPInstanceUID)]
    assert header_differences(original, retrieved, IGNORE) == []
    assert np.array_equal(stored_values(retrieved), stored_values(original))


def test_retrieve_study_is_bit_exact_in_explicit_le(served: Served, client: DICOMwebClient,
                                                    sources: dict[str, Dataset]) -> None:
    instances = client.retrieve_study(served.ct_study_uid)
    originals = [i for i in instances if i.SOPInstanceUID in sources]
    assert len(originals) == 3
    with httpx.Client(headers=served.headers, timeout=30) as http:
        rows = http.get(f"{served.url}/studies/{served.ct_study_uid}/encodings").json()["instances"]
    derived = {row["sop_instance_uid"] for row in rows if row["derived"]}
    assert derived and not derived & {i.SOPInstanceUID for i in instances}  # the originals, as QIDO lists the study
    for ds in instances:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    for ds in originals:
        _check_same(ds, sources)


def test_concurrent_clients_each_get_the_whole_study_bit_exact(served: Served, sources: dict[str, Dataset]) -> None:
    """Eight clients at once (the server's thread pool, the catalog and the blob reads shared): every answer whole."""
    from concurrent.futures import ThreadPoolExecutor

    def fetch(_: int) -> list[Dataset]:
        return DICOMwebClient(url=served.url, headers=served.headers).retrieve_study(served.mr_study_uid)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(fetch, range(8)))
    expected = {uid for uid, ds in sources.items() if ds.StudyInstanceUID == served.mr_study_uid}
    for instances in answers:
        assert {str(ds.SOPInstanceUID) for ds in instances} == expected
        for ds in instances:
            _check_same(ds, sources)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, "*", JPEG2000Lossless])
def test_retrieve_series_in_other_syntaxes(served: Served, client: DICOMwebClient, sources: dict[str, Dataset],
                                           syntax: str) -> None:
    mr_series = str(next(iter(s for s in sources.values() if s.Modality == "MR")).SeriesInstanceUID)
    instances = client.retrieve_series(served.mr_study_uid, mr_series,
                                       media_types=(("application/dicom", syntax),))
    assert len(instances) == 8
    for ds in instances:
        expected = {JPEGLSLossless, ExplicitVRLittleEndian} if syntax == "*" else {syntax}
        assert ds.file_meta.TransferSyntaxUID in expected
        _check_same(ds, sources)
    if syntax == "*":  # the MR frames with a zero minimum and P = Bits Stored go out as stored
        assert {ds.file_meta.TransferSyntaxUID for ds in instances} == {JPEGLSLossless, ExplicitVRLittleEndian}


def test_stored_codestreams_are_conformant_jpegls(served: Served, sources: dict[str, Dataset]) -> None:
    """The stripped container's codestream decodes through pydicom to the source values, bit for bit."""
    plan = plan_retrieval(served.archive, served.mr_study_uid)
    qualified = 0
    with served.archive.unit_of_work() as uow:
        for planned in plan.instances:
            instance = uow.session.scalar(select(Instance).where(Instance.id == planned.id).options(
                selectinload(Instance.encodings).selectinload(Encoding.frames)))
            assert instance is not None
            blob = read_blobs(uow.session, uow.store, [current_encoding(instance).frames[0].blob_sha256])[0]
            fragment = stored_jpegls(blob, layout_of(instance))
            if fragment is None:
                continue
            qualified += 1
            assert jpegls_precision(fragment) <= (instance.bits_stored or 16)
            ds = sources[planned.sop_instance_uid].copy()
            ds.file_meta.TransferSyntaxUID = JPEGLSLossless
            ds.PixelData = pydicom.encaps.encapsulate([fragment])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
            assert np.array_equal(stored_values(ds), stored_values(sources[planned.sop_instance_uid]))
    assert qualified >= 1


def test_signed_ct_is_never_sent_as_stored(served: Served, client: DICOMwebClient,
                                           sources: dict[str, Dataset]) -> None:
    """pydicom sign-extends JPEG-LS at P: signed CT with P < Bits Stored is transcoded, and its values survive."""
    instances = client.retrieve_study(served.ct_study_uid, media_types=(("application/dicom", "*"),))
    for ds in instances:
        if ds.SOPInstanceUID in sources:
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            _check_same(ds, sources)


def test_metadata_equals_the_source_headers(served: Served, client: DICOMwebClient,
                                            sources: dict[str, Dataset]) -> None:
    items = client.retrieve_study_metadata(served.ct_study_uid)
    assert len(items) >= 3
    for item in items:
        ds = Dataset.from_json(item, bulk_data_uri_handler=lambda *_: b"")
        if ds.SOPInstanceUID not in sources:
            continue
        assert "BulkDataURI" in item["7FE00010"]
        original = sources[ds.SOPInstanceUID]
        assert header_differences(original, ds, IGNORE | {"PixelData"}) == []
    one = next(s for s in sources.values() if s.StudyInstanceUID == served.ct_study_uid)
    item = client.retrieve_instance_metadata(served.ct_study_uid, one.SeriesInstanceUID, one.SOPInstanceUID)
    assert Dataset.from_json(item, bulk_data_uri_handler=lambda *_: b"").PatientID == one.PatientID
    assert item["7FE00010"]["BulkDataURI"].endswith(f"/instances/{one.SOPInstanceUID}/frames/1")


def test_frames_are_the_source_frames(served: Served, client: DICOMwebClient, sources: dict[str, Dataset]) -> None:
    for ds in list(sources.values())[:2] + [s for s in sources.values() if s.Modality == "MR"][:2]:
        frames = client.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [1])
        assert frames[0] == stored_values(ds).astype(stored_values(ds).dtype.newbyteorder("<")).tobytes()
        jls = client.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [1],
                                              media_types=("image/jls",))
        decoded = imagecodecs.jpegls_decode(jls[0])
        expected = stored_values(ds)
        if expected.dtype.kind == "i":  # JPEG-LS carries Bits Stored bits of two's complement
            decoded = (decoded.astype(np.int32) << (32 - ds.BitsStored) >> (32 - ds.BitsStored))
        assert np.array_equal(decoded.astype(np.int64), expected.astype(np.int64))


def test_rendered_and_thumbnail_are_png_of_the_right_size(served: Served, sources: dict[str, Dataset]) -> None:
    ds = next(s for s in sources.values() if s.Modality == "MR")
    base = f"{served.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    with httpx.Client(headers=served.headers, timeout=30) as http:
        rendered = http.get(f"{base}/instances/{ds.SOPInstanceUID}/rendered")
        assert rendered.status_code == 200 and rendered.headers["content-type"] == "image/png"
        assert imagecodecs.png_decode(rendered.content).shape[:2] == (ds.Rows, ds.Columns)
        windowed = http.get(f"{base}/instances/{ds.SOPInstanceUID}/rendered", params={"window": "300,600"})
        assert windowed.content != rendered.content
        jpeg = http.get(f"{base}/instances/{ds.SOPInstanceUID}/frames/1/rendered",
                        params={"accept": "image/jpeg", "viewport": "64,64"})
        assert jpeg.headers["content-type"] == "image/jpeg"
        assert max(imagecodecs.jpeg8_decode(jpeg.content).shape[:2]) <= 64
        for url in (f"{base}/thumbnail", f"{served.url}/studies/{served.ct_study_uid}/thumbnail"):
            thumb = http.get(url)
            assert thumb.status_code == 200, thumb.text
            assert max(imagecodecs.png_decode(thumb.content).shape[:2]) <= 128
        assert http.get(f"{base}/rendered", headers={"Accept": "image/gif"}).status_code == 406


def test_errors_406_and_404(served: Served, sources: dict[str, Dataset]) -> None:
    ct = next(s for s in sources.values() if s.StudyInstanceUID == served.ct_study_uid)
    study = f"{served.url}/studies/{served.ct_study_uid}"
    with httpx.Client(headers=served.headers, timeout=30) as http:
        baseline = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
        assert http.get(study, headers={"Accept": baseline}).status_code == 406
        unknown = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.3.4.5'
        assert http.get(study, headers={"Accept": unknown}).status_code == 406
        # several ranges: the first one that can be produced wins
        both = f'{baseline}, multipart/related; type="application/dicom"; transfer-syntax={JPEGLSLossless};q=0.5'
        answer = http.get(f"{study}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}",
                          headers={"Accept": both})
        assert answer.status_code == 200 and f"transfer-syntax={JPEGLSLossless}" in answer.text[:400]
        assert http.get(f"{served.url}/studies/1.2.3.999").status_code == 404
        assert http.get(f"{study}/series/1.2.3.999").status_code == 404
        assert http.get(f"{study}/series/{ct.SeriesInstanceUID}/instances/1.2.3.999").status_code == 404
        instance = f"{study}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"
        assert http.get(f"{instance}/frames/2").status_code == 404
        assert http.get(f"{instance}/metadata").status_code == 200
        assert http.get(f"{served.url}/studies/1.2.3.999/metadata").status_code == 404


def test_lossy_derivative_is_retrievable_and_listed_in_encodings(served: Served, client: DICOMwebClient,
                                                                sources: dict[str, Dataset]) -> None:
    with httpx.Client(headers=served.headers, timeout=30) as http:
        answer = http.get(f"{served.url}/studies/{served.ct_study_uid}/encodings")
        assert http.get(f"{served.url}/studies/1.2.3.999/encodings").status_code == 404
    assert answer.status_code == 200
    rows = answer.json()["instances"]
    lossy = [row for row in rows if row["derivation"] == "lossy"]
    assert len(lossy) == 1
    assert lossy[0]["derived"] and lossy[0]["codec_config"] == {"id": "jpegls", "near": 2}
    assert lossy[0]["max_error_bound"] == 2 and 0 < lossy[0]["max_abs_error"] <= 2
    assert lossy[0]["psnr"] is not None and lossy[0]["psnr_peak"] == 2 ** 16 - 1
    originals = [row for row in rows if row["sop_instance_uid"] in sources]
    assert len(originals) == 3 and all(row["max_error_bound"] == 0 and not row["derived"] for row in originals)
    instances = client.retrieve_series(served.ct_study_uid, lossy[0]["series_uid"])
    assert [ds.SOPInstanceUID for ds in instances] == [lossy[0]["sop_instance_uid"]]
    assert stored_values(instances[0]).shape == (instances[0].Rows, instances[0].Columns)


def test_study_with_its_derived_series(served: Served, sources: dict[str, Dataset]) -> None:
    with httpx.Client(headers=served.headers, timeout=30) as http:
        answer = http.get(f"{served.url}/studies/{served.ct_study_uid}/metadata", params={"includederived": "true"})
    items = [Dataset.from_json(i, bulk_data_uri_handler=lambda *_: b"") for i in answer.json()]
    assert len(items) >= 5  # three originals, the lossy derivative, the normalized series
    assert sum(1 for ds in items if ds.SOPInstanceUID in sources) == 3


def test_access_log_records_retrievals(served: Served) -> None:
    """One RETRIEVE row with the bytes sent, written when the stream ends (so polled for a moment)."""
    with httpx.Client(headers=served.headers, timeout=30) as http:
        body = http.get(f"{served.url}/studies/{served.ct_study_uid}").content
    deadline = time.monotonic() + 5
    while True:
        rows = [r for r in list_access(served.archive, action=AccessAction.RETRIEVE, token_name="tests")
                if r.target == served.ct_study_uid and r.nbytes == len(body) and r.instances >= 3]
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert rows and rows[0].status == 200


def test_released_original_is_left_out_with_a_warning(tmp_path: Path) -> None:
    """An original whose lossless form a policy released: named in a Warning, 404 alone; its derivative is served."""
    source = tmp_path / "in" / "ct.dcm"
    source.parent.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), source)
    settings = Settings.load(environ={}, home=tmp_path / "home", normalize=False, api_tokens={"tests": TOKEN})
    archive = Archive.open(settings, migrate=True)
    try:
        ingest_paths(archive, [source])
        original = read(source)
        with archive.unit_of_work() as uow:
            instance_id = uow.session.scalar(select(Instance.id).where(
                Instance.sop_instance_uid == original.SOPInstanceUID))
        assert instance_id is not None
        derive_lossy(archive, instance_id, RecompressPolicy(name="near2", codec=NEAR2, keep_lossless=False))
        url, server = serve(archive)
        try:
            with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:
                study = f"{url}/studies/{original.StudyInstanceUID}"
                answer = http.get(study, params={"includederived": "true"})
                assert answer.status_code == 200
                assert answer.headers["warning"].startswith("299 medarchive")
                assert original.SOPInstanceUID in answer.headers["warning"]
                assert answer.content.count(b"Content-Type: application/dicom;") == 1  # the derivative only
                alone = f"{study}/series/{original.SeriesInstanceUID}/instances/{original.SOPInstanceUID}"
                assert http.get(alone).status_code == 404
                assert http.get(f"{alone}/frames/1").status_code == 404
        finally:
            server.stop()
    finally:
        archive.close()
