"""The C-FIND identifier -> QIDO translation, and QIDO matches -> C-FIND answers (no network, no catalog)."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode, encode
from sqlalchemy import insert

from archive.catalog.models import Study

from archive.errors import IdentifierError
from archive.services.cfind import (
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    UTF8,
    answer_character_set,
    answer_of,
    query_of,
)
from archive.services.qido import search_patients
from archive.services.runtime import Archive
from tests.unit.dimse import identifier


def over_the_wire(ds: Dataset) -> Dataset:
    """``ds`` encoded as an SCU sends it (Explicit VR Little Endian) and decoded as pynetdicom hands it over."""
    encoded = encode(ds, False, True)
    assert encoded is not None
    return decode(BytesIO(encoded), False, True)


def test_keys_with_values_match_and_every_key_is_returned() -> None:
    query = query_of(identifier("STUDY", PatientName="Smith*", StudyDate="20200101-20201231", StudyInstanceUID="",
                                PatientAge="", ProcedureCodeSequence=Sequence()),
                     STUDY_ROOT_FIND, include_derived=False)
    assert query.level == "STUDY"
    assert query.params["PatientName"] == ["Smith*"] and query.params["StudyDate"] == ["20200101-20201231"]
    assert "StudyInstanceUID" not in query.params and "PatientAge" not in query.params
    assert set(query.params["includefield"][0].split(",")) == {"00100010", "00080020", "0020000D", "00101010",
                                                                "00081032"}
    assert "includederived" not in query.params
    assert query.keywords == ["PatientAge", "PatientName", "ProcedureCodeSequence", "StudyDate", "StudyInstanceUID"]


def test_uid_lists_go_as_one_backslash_separated_value_and_the_level_key_is_always_asked() -> None:
    query = query_of(over_the_wire(identifier("IMAGE", SeriesInstanceUID=["1.2.3", "1.2.4"], PatientID="P1")),
                     PATIENT_ROOT_FIND, include_derived=True)
    assert query.params["SeriesInstanceUID"] == ["1.2.3\\1.2.4"] and query.params["PatientID"] == ["P1"]
    assert 0x00080018 in query.asked  # SOPInstanceUID: the unique key of the IMAGE level
    assert query.params["includederived"] == ["true"]


def test_a_latin1_identifier_is_matched_as_unicode() -> None:
    sent = identifier("PATIENT", PatientName="Mü*", PatientID="")
    sent.SpecificCharacterSet = "ISO_IR 100"
    assert b"M\xfc*" in (encode(sent, False, True) or b"")  # Latin-1 on the wire
    received = over_the_wire(sent)
    query = query_of(received, PATIENT_ROOT_FIND, include_derived=False)
    assert query.params["PatientName"] == ["Mü*"] and query.level == "PATIENT"
    assert 0x00080005 not in query.asked


@pytest.mark.parametrize("sop_class, level", [
    (STUDY_ROOT_FIND, "PATIENT"), (STUDY_ROOT_FIND, None), (PATIENT_ROOT_FIND, ""), (PATIENT_ROOT_FIND, "FRAME"),
    ("1.2.840.10008.5.1.4.31", "STUDY"),  # Modality Worklist: not this SCP's
])
def test_identifiers_without_a_level_of_the_model_do_not_match_the_sop_class(sop_class: str, level: str | None
                                                                               ) -> None:
    with pytest.raises(IdentifierError):
        query_of(identifier(level, PatientID=""), sop_class, include_derived=False)


def test_the_answer_has_the_asked_keys_only_empty_where_unknown() -> None:
    query = query_of(identifier("SERIES", StudyInstanceUID="1.2", SeriesInstanceUID="", Modality="",
                                ReferencedSeriesSequence=Sequence(), OperatorsName=""),
                     STUDY_ROOT_FIND, include_derived=False)
    match = {"0020000D": {"vr": "UI", "Value": ["1.2"]}, "0020000E": {"vr": "UI", "Value": ["1.2.5"]},
             "00080060": {"vr": "CS", "Value": ["MR"]}, "0008103E": {"vr": "LO", "Value": ["not asked"]},
             "00080005": {"vr": "CS", "Value": ["ISO_IR 192"]}}
    answer = answer_of(match, query, "ISO_IR 100", "MEDARCHIVE")
    assert {e.keyword for e in answer} == {"StudyInstanceUID", "SeriesInstanceUID", "Modality",
                                           "ReferencedSeriesSequence", "OperatorsName", "QueryRetrieveLevel",
                                           "RetrieveAETitle", "SpecificCharacterSet"}
    assert answer.SeriesInstanceUID == "1.2.5" and answer.Modality == "MR" and answer.OperatorsName is None
    assert len(answer.ReferencedSeriesSequence) == 0
    assert (answer.QueryRetrieveLevel, answer.RetrieveAETitle) == ("SERIES", "MEDARCHIVE")
    assert answer.SpecificCharacterSet == "ISO_IR 100"  # the study's, not QIDO's UTF-8


def test_a_name_is_answered_in_the_studys_character_set_when_it_fits() -> None:
    query = query_of(identifier("STUDY", PatientName=""), STUDY_ROOT_FIND, include_derived=False)
    match = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jörg"}]}}
    answer = answer_of(match, query, "ISO_IR 100", "AE")
    assert answer.SpecificCharacterSet == "ISO_IR 100"
    back = over_the_wire(answer)
    assert str(back.PatientName) == "Müller^Jörg"
    assert "Müller".encode("latin-1") in (encode(answer, False, True) or b"")


@pytest.mark.parametrize("stored, values, expected", [
    (None, ["Smith^John"], None),
    ("ISO_IR 100", ["Smith^John"], "ISO_IR 100"),
    ("ISO_IR 100", ["Müller^Jörg", "Chest"], "ISO_IR 100"),
    ("ISO_IR 100", ["山田^太郎"], UTF8),  # Latin-1 cannot hold it: UTF-8
    ("\\ISO 2022 IR 87", ["Yamada^Tarou=山田^太郎"], "\\ISO 2022 IR 87"),
    ("", ["Müller"], UTF8),
    ("ISO_IR 6", ["Müller"], UTF8),
    ("NOT A CHARSET", ["Müller"], UTF8),
])
def test_answer_character_set(stored: str | None, values: list[str], expected: str | None) -> None:
    assert answer_character_set(stored, values) == expected


def test_patient_level_search_one_row_per_patient_named_by_the_newest_study(archive: Archive) -> None:
    with archive.unit_of_work() as uow:
        uow.session.execute(insert(Study), [
            dict(study_uid="2.25.1", patient_id="P1", patient_name="Old^Name", patient_sex="F", num_series=2,
                 num_instances=5, num_derived_series=1, num_derived_instances=5),
            dict(study_uid="2.25.2", patient_id="P1", patient_name="Müller^Jörg", patient_sex="F",
                 patient_birth_date="19700101", num_series=1, num_instances=1, specific_character_set="ISO_IR 100"),
            dict(study_uid="2.25.3", patient_id="P2", patient_name="Other^One", num_series=1, num_instances=3),
            dict(study_uid="2.25.4", patient_id=None, patient_name="No^Id", num_series=1, num_instances=1),
        ])
        uow.commit()
    asked = {"includefield": ["NumberOfPatientRelatedStudies,NumberOfPatientRelatedSeries,"
                              "NumberOfPatientRelatedInstances"]}

    def patients(**params: str) -> dict[str, dict[str, object]]:
        found = search_patients(archive, {**asked, **{k: [v] for k, v in params.items()}}).matches
        return {m["00100020"]["Value"][0]: m for m in found}

    everyone = patients()
    assert list(everyone) == ["P1", "P2"]  # no Patient ID, no patient
    p1 = everyone["P1"]
    assert p1["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jörg"}]}  # the newest study's name
    assert [p1[t]["Value"][0] for t in ("00201200", "00201202", "00201204")] == [2, 3, 6]  # type: ignore[index]
    # a match on the old name still finds the patient, and counts all of its studies
    assert list(patients(PatientName="old*")) == ["P1"]
    assert list(patients(PatientName="*JÖRG")) == ["P1"] and list(patients(PatientID="P?")) == ["P1", "P2"]
    derived = patients(includederived="true")["P1"]
    assert [derived[t]["Value"][0] for t in ("00201202", "00201204")] == [4, 11]  # type: ignore[index]
    assert list(patients(limit="1", offset="1")) == ["P2"]
    assert "00201200" not in search_patients(archive, {}).matches[0]  # counted only when asked
