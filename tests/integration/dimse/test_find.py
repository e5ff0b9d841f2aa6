"""C-FIND at every level, from dcmtk's findscu and from pynetdicom, against the session's real SCP.

The archive holds patient A002304 (two CT studies of three one-instance
series, 19001231 and 19010112), eight MR instances of one series, the
normalized series ingest makes and a lossy derivative of the CT axial series;
this module adds one Latin-1 named patient for the character set tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from archive.dimse.find import CANCEL, PENDING, handle_find
from archive.kinds import AccessAction
from archive.services import cfind
from archive.services.access import list_access
from archive.services.ingest import ingest_paths
from tests.integration.dimse.conftest import DERIVED_AE, Scp, dcmtk
from tests.synthetic import with_new_uids

CT_PATIENT = "A002304"
CHARSET_PATIENT = "CHARSET-A19"
LATIN1_NAME = "Müller^Jörg"


def findscu(scp: Scp, folder: Path, model: str, *keys: str, aet: str = "FINDER") -> list[Dataset]:
    """findscu's answers, each written as a file by ``-X`` and read back with pydicom."""
    folder.mkdir(parents=True, exist_ok=True)
    arguments = [model, "-X", "--output-directory", str(folder), "-aet", aet]
    for key in keys:
        arguments += ["-k", key]
    dcmtk("findscu", *arguments, *scp.address())
    return [pydicom.dcmread(path) for path in sorted(folder.glob("rsp*.dcm"))]


def pynetdicom_find(scp: Scp, identifier: Dataset, model: str = StudyRootQueryRetrieveInformationModelFind,
                    aet: str = "FINDER") -> tuple[list[Dataset], Dataset]:
    """The pending answers and the final status of one C-FIND sent by pynetdicom."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(model)
    assoc = ae.associate(scp.host, scp.port, ae_title=scp.aet)
    assert assoc.is_established
    answers: list[Dataset] = []
    final = Dataset()
    try:
        for status, answer in assoc.send_c_find(identifier, model):
            assert status is not None, "no answer from the SCP"
            if status.Status == 0xFF00:
                assert answer is not None
                answers.append(answer)
            else:
                final = status
    finally:
        assoc.release()
    return answers, final


def keywords_of(answer: Dataset) -> set[str]:
    return {element.keyword for element in answer}


@pytest.fixture(scope="module")
def latin1_patient(scp: Scp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """pydicom's CT_small as a patient of its own named in ISO_IR 100 (Latin-1): its study UID."""
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    ds = with_new_uids(pydicom.dcmread(path))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID = LATIN1_NAME, CHARSET_PATIENT
    folder = tmp_path_factory.mktemp("latin1")
    ds.save_as(folder / "latin1.dcm", enforce_file_format=True)
    raw = (folder / "latin1.dcm").read_bytes()
    assert LATIN1_NAME.encode("latin-1") in raw and LATIN1_NAME.encode("utf-8") not in raw
    report = ingest_paths(scp.archive, [folder])
    assert report.instances == 1, report.outcomes
    yield str(ds.StudyInstanceUID)


def test_patient_level_counts_what_the_ae_may_see(scp: Scp, tmp_path: Path) -> None:
    keys = ("QueryRetrieveLevel=PATIENT", f"PatientID={CT_PATIENT}", "PatientName", "PatientSex",
            "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances")
    [answer] = findscu(scp, tmp_path / "plain", "-P", *keys)
    assert answer.PatientID == CT_PATIENT and str(answer.PatientName) == CT_PATIENT and answer.PatientSex == "M"
    assert (answer.NumberOfPatientRelatedStudies, answer.NumberOfPatientRelatedSeries,
            answer.NumberOfPatientRelatedInstances) == (2, 6, 6)
    assert answer.QueryRetrieveLevel == "PATIENT" and answer.RetrieveAETitle == scp.aet
    assert keywords_of(answer) == {"PatientID", "PatientName", "PatientSex", "NumberOfPatientRelatedStudies",
                                   "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances",
                                   "QueryRetrieveLevel", "RetrieveAETitle", "SpecificCharacterSet"}
    [derived] = findscu(scp, tmp_path / "derived", "-P", *keys, aet=DERIVED_AE)
    assert derived.NumberOfPatientRelatedStudies == 2 and derived.NumberOfPatientRelatedSeries > 6
    everyone = findscu(scp, tmp_path / "all", "-P", "QueryRetrieveLevel=PATIENT", "PatientID")
    assert CT_PATIENT in {a.PatientID for a in everyone} and len(everyone) == len({a.PatientID for a in everyone})


def test_study_level_wildcards_and_date_ranges(scp: Scp, tmp_path: Path) -> None:
    def studies(name: str, *keys: str) -> dict[str, Dataset]:
        answers = findscu(scp, tmp_path / name, "-S", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "StudyDate",
                          *keys)
        return {a.StudyInstanceUID: a for a in answers}

    both = studies("star", "PatientName=a0023*")  # case does not matter for names, as in QIDO
    assert len(both) == 2 and scp.ct_study_uid in both
    assert studies("question", "PatientName=A00230?").keys() == both.keys()
    assert studies("none", "PatientName=A00230??") == {}
    first = studies("range", f"PatientID={CT_PATIENT}", "StudyDate=19001201-19001231")
    assert list(first) == [scp.ct_study_uid] and first[scp.ct_study_uid].StudyDate == "19001231"
    later = studies("open", f"PatientID={CT_PATIENT}", "StudyDate=19010101-")
    assert len(later) == 1 and scp.ct_study_uid not in later
    [answer] = studies("counts", f"StudyInstanceUID={scp.ct_study_uid}", "NumberOfStudyRelatedSeries",
                       "ModalitiesInStudy", "PatientAge").values()
    assert answer.NumberOfStudyRelatedSeries == 3 and answer.ModalitiesInStudy == "CT"
    assert answer.PatientAge  # not in the catalog: read from the study's header


def test_series_of_a_study_hide_derived_series_from_ordinary_aes(scp: Scp, tmp_path: Path) -> None:
    keys = ("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={scp.ct_study_uid}", "SeriesInstanceUID", "Modality",
            "SeriesNumber")
    plain = {a.SeriesInstanceUID: a for a in findscu(scp, tmp_path / "plain", "-S", *keys)}
    assert len(plain) == 3 and scp.lossy_series_uid not in plain
    assert {a.Modality for a in plain.values()} == {"CT"}
    assert {a.StudyInstanceUID for a in plain.values()} == {scp.ct_study_uid}
    derived = {a.SeriesInstanceUID for a in findscu(scp, tmp_path / "derived", "-S", *keys, aet=DERIVED_AE)}
    assert scp.lossy_series_uid in derived and set(plain) < derived
    listed = "\\".join([*sorted(plain)[:2], scp.lossy_series_uid])  # a UID list: originals only, for this AE
    picked = findscu(scp, tmp_path / "list", "-S", "QueryRetrieveLevel=SERIES", f"SeriesInstanceUID={listed}")
    assert {a.SeriesInstanceUID for a in picked} == set(sorted(plain)[:2])


def test_images_of_a_series_patient_root(scp: Scp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfind, "PAGE", 3)  # eight instances: three QIDO pages, none lost or repeated
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in scp.sources("mr")]
    series_uid = sources[0].SeriesInstanceUID
    answers = findscu(scp, tmp_path, "-P", "QueryRetrieveLevel=IMAGE", f"PatientID={sources[0].PatientID}",
                      f"StudyInstanceUID={scp.mr_study_uid}", f"SeriesInstanceUID={series_uid}", "SOPInstanceUID",
                      "InstanceNumber", "SOPClassUID")
    assert len(answers) == len(sources) == 8
    assert {a.SOPInstanceUID for a in answers} == {s.SOPInstanceUID for s in sources}
    assert sorted(int(a.InstanceNumber) for a in answers) == sorted(int(s.InstanceNumber) for s in sources)
    assert {a.SeriesInstanceUID for a in answers} == {series_uid}
    assert all(a.QueryRetrieveLevel == "IMAGE" and a.SOPClassUID == sources[0].SOPClassUID for a in answers)


def test_a_latin1_query_finds_a_latin1_name(scp: Scp, latin1_patient: str) -> None:
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 100"
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = "Mü*"
    identifier.PatientID = ""
    identifier.StudyInstanceUID = ""
    answers, final = pynetdicom_find(scp, identifier)
    assert final.Status == 0x0000
    [answer] = answers
    assert answer.SpecificCharacterSet == "ISO_IR 100"  # as the study was received
    assert str(answer.PatientName) == LATIN1_NAME and answer.PatientID == CHARSET_PATIENT
    assert answer.StudyInstanceUID == latin1_patient
    identifier.SpecificCharacterSet = "ISO_IR 192"  # the same name asked in UTF-8, another case
    identifier.PatientName = "müller^j?rg"
    again, _ = pynetdicom_find(scp, identifier)
    assert [str(a.PatientName) for a in again] == [LATIN1_NAME]
    patients, _ = pynetdicom_find(scp, _patient_query("*jörg"), PatientRootQueryRetrieveInformationModelFind)
    assert [(a.PatientID, str(a.PatientName)) for a in patients] == [(CHARSET_PATIENT, LATIN1_NAME)]


def _patient_query(name: str) -> Dataset:
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 192"
    identifier.QueryRetrieveLevel = "PATIENT"
    identifier.PatientName = name
    identifier.PatientID = ""
    return identifier


def test_identifiers_the_model_cannot_answer_fail_with_a_comment(scp: Scp) -> None:
    identifier = _patient_query("*")
    answers, final = pynetdicom_find(scp, identifier)  # Study Root has no PATIENT level
    assert answers == [] and final.Status == 0xA900 and "PATIENT" in final.ErrorComment
    del identifier.QueryRetrieveLevel
    answers, final = pynetdicom_find(scp, identifier, PatientRootQueryRetrieveInformationModelFind)
    assert answers == [] and final.Status == 0xA900
    bad_date = Dataset()
    bad_date.QueryRetrieveLevel = "STUDY"
    bad_date.StudyDate = "1900"
    answers, final = pynetdicom_find(scp, bad_date)
    assert answers == [] and 0xC000 <= final.Status <= 0xCFFF and "StudyDate" in final.ErrorComment


def test_searches_are_in_the_access_log_without_values(scp: Scp) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = scp.ct_study_uid
    identifier.SeriesDescription = "CHEST*"
    answers, _ = pynetdicom_find(scp, identifier, aet="AUDITED")
    assert len(answers) >= 1
    target = "C-FIND SERIES: SeriesDescription, StudyInstanceUID"
    deadline = time.monotonic() + 10  # the row is written when the association's connection closes
    while not (rows := [r for r in list_access(scp.archive, token_name="dimse:AUDITED", action=AccessAction.SEARCH)
                        if r.target == target]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(r.instances, r.status) for r in rows] == [(len(answers), 0)]
    assert "CHEST" not in rows[0].target


@dataclass
class _Requestor:
    ae_title: str = "CANCELLER"
    address: str = "127.0.0.1"


@dataclass
class _Association:
    requestor: _Requestor = field(default_factory=_Requestor)


@dataclass
class _CancelAfterOne:
    """What pynetdicom hands EVT_C_FIND (identifier, request, association), with a C-CANCEL after one answer."""

    identifier: Dataset
    request: Dataset
    assoc: _Association = field(default_factory=_Association)
    answered: int = 0

    @property
    def is_cancelled(self) -> bool:
        return self.answered >= 1


def test_a_cancel_stops_the_answers_between_matches(scp: Scp) -> None:
    """A C-CANCEL's arrival cannot be timed over a socket; pynetdicom's event is given as it would be."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = scp.mr_study_uid
    identifier.SOPInstanceUID = ""
    request = Dataset()
    request.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
    event = _CancelAfterOne(identifier, request)
    ctx = scp.server.context
    statuses = []
    for status, answer in handle_find(event, ctx):
        statuses.append(status)
        event.answered += answer is not None
    assert statuses == [PENDING, CANCEL]
    association = ctx.end(event.assoc)
    assert association is not None
    [(key, tally)] = association.tallies.items()
    assert key == (AccessAction.SEARCH, "C-FIND IMAGE: SOPInstanceUID, StudyInstanceUID")
    assert (tally.instances, tally.status) == (1, CANCEL)
