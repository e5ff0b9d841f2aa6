"""QIDO-RS over real HTTP with dicomweb-client (and httpx where headers matter), checked against the source files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset

from archive.kinds import AccessAction
from archive.services.access import list_access
from archive.services.ingest import ingest_paths
from tests.integration.api.conftest import Served
from tests.synthetic import with_new_uids

DERIVED_PARAM = {"includederived": "true"}


@pytest.fixture(scope="module")
def client(served: Served) -> DICOMwebClient:
    return DICOMwebClient(url=served.url, headers=served.headers)


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, headers=served.headers, timeout=30) as session:
        yield session


@pytest.fixture(scope="module")
def latin1(served: Served, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dataset]:
    """chrFren (Buc^Jérôme) and chrGerm (Äneas^Rüdiger), ISO_IR 100, with fresh UIDs, ingested into the archive."""
    folder = tmp_path_factory.mktemp("latin1")
    made = {}
    for name in ("chrFren.dcm", "chrGerm.dcm"):
        ds = with_new_uids(pydicom.dcmread(get_charset_files(name)[0]))
        ds.save_as(folder / name, enforce_file_format=True)
        made[name] = ds
    assert b"Buc^J\xe9r\xf4me" in (folder / "chrFren.dcm").read_bytes()  # Latin-1 on disk, not UTF-8
    report = ingest_paths(served.archive, [folder])
    assert report.instances == 2, report.outcomes
    return made


def _value(match: dict[str, Any], tag: str) -> Any:
    values = match.get(tag, {}).get("Value")
    return values[0] if values else None


def _name(match: dict[str, Any]) -> str | None:
    value = _value(match, "00100010")
    return value["Alphabetic"] if value else None


def _uids(matches: list[dict[str, Any]], tag: str = "0020000D") -> set[str]:
    return {_value(m, tag) for m in matches}


def _headers(paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def test_studies_by_patient_id_answer_what_the_files_say(served: Served, client: DICOMwebClient) -> None:
    sources = _headers(served.sources("ct"))
    patient = sources[0].PatientID
    found = {_value(m, "0020000D"): m for m in client.search_for_studies(search_filters={"PatientID": patient})}
    assert set(found) == {ds.StudyInstanceUID for ds in sources}
    for uid, match in found.items():
        files = [ds for ds in sources if ds.StudyInstanceUID == uid]
        first = files[0]
        assert _name(match) == str(first.PatientName)
        assert _value(match, "00100020") == first.PatientID
        assert _value(match, "00080020") == first.StudyDate
        assert _value(match, "00080030") == first.StudyTime
        assert _value(match, "00100040") == first.PatientSex
        assert _value(match, "00081030") == first.StudyDescription
        assert match["00080061"]["Value"] == sorted({ds.Modality for ds in files})
        assert _value(match, "00201206") == len({ds.SeriesInstanceUID for ds in files})  # originals only
        assert _value(match, "00201208") == len(files)
        assert _value(match, "00081190").endswith(f"/studies/{uid}")  # dicomweb-client's Host header has no port
        assert _value(match, "00080005") == "ISO_IR 192"
        assert _value(match, "00080056") == "ONLINE"
        assert match["00080050"] == {"vr": "SH"}  # empty in the files: present without a value
    # the same search by tag
    assert _uids(client.search_for_studies(search_filters={"00100020": patient})) == set(found)


def test_wildcards_dates_and_modalities(served: Served, client: DICOMwebClient) -> None:
    mr = _headers(served.sources("mr"))[0]
    ct = _headers(served.sources("ct"))
    name = str(mr.PatientName)  # acdc_221p: "_" must stay a literal, "?" matches it
    for pattern in (name.upper(), name[:4].upper() + "*", name[:4] + "?" + name[5:].upper(), "*" + name[-3:]):
        assert served.mr_study_uid in _uids(client.search_for_studies(search_filters={"PatientName": pattern}))
    assert served.mr_study_uid not in _uids(client.search_for_studies(search_filters={"PatientName": "acdc%"}))
    dates = {ds.StudyInstanceUID: ds.StudyDate for ds in ct}
    (old, first), (new, second) = sorted(dates.items(), key=lambda kv: kv[1])
    for query, expected, absent in ((first, {old}, {new}), (f"{second}-", {new, served.mr_study_uid}, {old}),
                                    (f"-{first}", {old}, {new, served.mr_study_uid}),
                                    (f"{first}-{second}", {old, new}, {served.mr_study_uid})):
        got = _uids(client.search_for_studies(search_filters={"StudyDate": query}))
        assert expected <= got and not (absent & got), query
    by_modality = _uids(client.search_for_studies(search_filters={"ModalitiesInStudy": "MR"}))
    assert served.mr_study_uid in by_modality and not ({old, new} & by_modality)
    both = _uids(client.search_for_studies(search_filters={"ModalitiesInStudy": "MR,CT", "PatientID": "A002304"}))
    assert both == {old, new}
    assert _uids(client.search_for_studies(search_filters={"StudyInstanceUID": f"{old},{served.mr_study_uid}"})) \
        == {old, served.mr_study_uid}


def test_includefield_reads_the_header_only_for_what_is_asked(served: Served, client: DICOMwebClient) -> None:
    axial = _headers([p for p in served.sources("ct") if p.parent.name == "axial"])
    source = next(ds for ds in axial if ds.StudyInstanceUID == served.ct_study_uid)
    plain = client.search_for_studies(search_filters={"StudyInstanceUID": served.ct_study_uid})
    assert "00101010" not in plain[0]
    [match] = client.search_for_studies(search_filters={"StudyInstanceUID": served.ct_study_uid},
                                        fields=["PatientAge", "00080070"])
    assert _value(match, "00101010") == source.PatientAge
    assert _value(match, "00080070") == source.Manufacturer
    [everything] = client.search_for_instances(served.ct_study_uid, source.SeriesInstanceUID, fields=["all"])
    assert _value(everything, "00180060") == float(source.KVP)
    assert everything["00080008"]["Value"] == list(source.ImageType)
    assert _value(everything, "00080005") == "ISO_IR 192" and "7FE00010" not in everything


def test_limit_and_offset_page_through_the_matches(served: Served, client: DICOMwebClient,
                                                   http: httpx.Client) -> None:
    patient = {"PatientID": "A002304"}
    pages = [client.search_for_studies(search_filters=patient, limit=1, offset=n) for n in range(3)]
    assert [len(p) for p in pages] == [1, 1, 0]
    assert _uids(pages[0] + pages[1]) == _uids(client.search_for_studies(search_filters=patient))
    answer = http.get("/studies", params={**patient, "limit": 1})
    assert answer.status_code == 200 and "warning" not in answer.headers  # the client's limit: no warning
    [match] = answer.json()
    assert match["00081190"] == {"vr": "UR", "Value": [f"{served.url}/studies/{match['0020000D']['Value'][0]}"]}
    assert http.get("/studies", params={"limit": "many"}).status_code == 400


def test_series_and_instances_leave_derived_series_out_unless_asked(served: Served, client: DICOMwebClient) -> None:
    files = [ds for ds in _headers(served.sources("ct")) if ds.StudyInstanceUID == served.ct_study_uid]
    series = client.search_for_series(served.ct_study_uid)
    assert _uids(series, "0020000E") == {ds.SeriesInstanceUID for ds in files}
    for match in series:
        [ds] = [d for d in files if d.SeriesInstanceUID == _value(match, "0020000E")]
        assert (_value(match, "00080060"), _value(match, "00200011")) == (ds.Modality, ds.SeriesNumber)
        assert _value(match, "00201209") == 1 and "00080008" not in match
        assert _value(match, "00081190").endswith(f"/studies/{served.ct_study_uid}/series/{ds.SeriesInstanceUID}")
    assert served.lossy_series_uid not in _uids(client.search_for_series(search_filters={"Modality": "CT"}), "0020000E")

    derived = client.search_for_series(served.ct_study_uid, additional_params=DERIVED_PARAM)
    extra = {_value(m, "0020000E"): m for m in derived}
    assert served.lossy_series_uid in extra and len(extra) > len(series)
    for uid in set(extra) - _uids(series, "0020000E"):
        assert "DERIVED" in extra[uid]["00080008"]["Value"], uid
    counted = client.search_for_studies(search_filters={"StudyInstanceUID": served.ct_study_uid},
                                        additional_params=DERIVED_PARAM)
    assert _value(counted[0], "00201206") == len(extra)
    instances = client.search_for_instances(served.ct_study_uid, additional_params=DERIVED_PARAM)
    assert len(instances) > len(client.search_for_instances(served.ct_study_uid)) == len(files)
    # a derived series named in the path is listed without the parameter
    assert len(client.search_for_instances(served.ct_study_uid, served.lossy_series_uid)) == 1


def test_instances_answer_what_the_files_say(served: Served, client: DICOMwebClient) -> None:
    files = _headers(served.sources("mr"))
    series = files[0].SeriesInstanceUID
    matches = client.search_for_instances(served.mr_study_uid, series)
    assert [_value(m, "00080018") for m in matches] == \
        [ds.SOPInstanceUID for ds in sorted(files, key=lambda ds: int(ds.InstanceNumber))]
    for match, ds in zip(matches, sorted(files, key=lambda ds: int(ds.InstanceNumber))):
        assert _value(match, "00080016") == ds.SOPClassUID
        assert (_value(match, "00280010"), _value(match, "00280011"), _value(match, "00280100")) == \
            (ds.Rows, ds.Columns, ds.BitsAllocated)
        assert _value(match, "00200013") == ds.InstanceNumber
        assert _value(match, "0020000D") == ds.StudyInstanceUID and _value(match, "0020000E") == series
    third = files[2]
    assert _uids(client.search_for_instances(search_filters={"SOPInstanceUID": third.SOPInstanceUID}),
                 "00080018") == {third.SOPInstanceUID}
    by_number = client.search_for_instances(served.mr_study_uid, search_filters={"InstanceNumber": "3"})
    assert [_value(m, "00200013") for m in by_number] == [3]
    mr_only = client.search_for_instances(search_filters={"ModalitiesInStudy": "MR", "PatientID": files[0].PatientID})
    assert _uids(mr_only, "00080018") == {ds.SOPInstanceUID for ds in files}


def test_warnings_errors_and_the_access_log(served: Served, http: httpx.Client) -> None:
    fuzzy = http.get("/studies", params={"PatientName": "nobody*", "fuzzymatching": "true", "PatientWeight": "80"})
    assert fuzzy.status_code == 200 and fuzzy.json() == []
    assert fuzzy.headers["content-type"].startswith("application/dicom+json")
    warnings = fuzzy.headers.get_list("warning")
    assert '299 medarchive "fuzzymatching is not supported and was ignored"' in warnings
    assert any("PatientWeight" in w and w.startswith("299 ") for w in warnings)
    assert http.get("/studies/1.2.3.404/series").status_code == 404
    assert http.get(f"/studies/{served.ct_study_uid}/series/1.2.3.404/instances").status_code == 404
    assert http.get("/studies/1.2.3.404/instances").status_code == 404
    assert http.get(f"/studies/{served.ct_study_uid}/series", params={"Modality": "XA"}).json() == []
    assert http.get("/studies", params={"StudyDate": "2024-13"}).status_code == 400
    assert http.get("/studies", headers={"Accept": "application/dicom+xml"}).status_code == 406
    rows = list_access(served.archive, action=AccessAction.SEARCH, limit=20)
    assert any(r.target == "studies?PatientName,PatientWeight,fuzzymatching" for r in rows)
    assert not any("nobody" in r.target for r in rows)
    assert any(r.status == 404 and r.target.startswith("1.2.3.404/") for r in rows)


def test_latin1_names_are_found_by_their_letters(served: Served, client: DICOMwebClient,
                                                 latin1: dict[str, Dataset]) -> None:
    fren, germ = latin1["chrFren.dcm"], latin1["chrGerm.dcm"]
    for pattern in ("Buc^Jérôme", "BUC^JÉRÔME", "buc^j?r?me", "*ÉRÔ*", "Buc*"):
        assert fren.StudyInstanceUID in _uids(client.search_for_studies(search_filters={"PatientName": pattern})), \
            pattern
    for pattern in ("äneas^rüdiger", "ÄNEAS*", "?neas*"):
        assert germ.StudyInstanceUID in _uids(client.search_for_studies(search_filters={"PatientName": pattern})), \
            pattern
    assert fren.StudyInstanceUID not in _uids(client.search_for_studies(search_filters={"PatientName": "Buc^Jerome"}))
    [match] = client.search_for_studies(search_filters={"StudyInstanceUID": fren.StudyInstanceUID})
    assert _name(match) == "Buc^Jérôme" and _value(match, "00080005") == "ISO_IR 192"
