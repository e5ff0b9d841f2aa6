"""What a correction accepts and refuses, and how it writes values back (no catalog needed)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from archive.errors import ArchiveError
from archive.services import corrections
from archive.services.corrections import _check_encodable, _column_value, _set, _whole_file
from tests.dicom_compare import header_differences

REFUSED = {
    "SOPInstanceUID=1.2.3": "UIDs never change",
    "StudyInstanceUID=1.2.3": "UIDs never change",
    "Rows=12": "pixel data never changes",
    "PhotometricInterpretation=RGB": "pixel data never changes",
    "RescaleSlope=2": "pixel data never changes",
    "TransferSyntaxUID=1.2.840.10008.1.2": "file meta",
    "PatientIdentity=X": "unknown DICOM keyword",
    "patientid=X": "unknown DICOM keyword",
    "Modality=MR": "not an attribute medarchive corrects",
    "ImageType=DERIVED": "not an attribute medarchive corrects",
    "SeriesDescription=x": "give --series",
    "StudyDate=2024-01-01": "not a valid DA value",
    "StudyTime=25:00": "not a valid TM value",
    "PatientAge=45": "not a valid AS value",
    "PatientWeight=heavy": "not a valid DS value",
    "PatientSex=male": "not a valid CS value",
    "PatientSex=X": "one of M, F, O",
    "PatientID=" + "9" * 65: "maximum length of 64",
    "PatientID=A\\B": "takes one value",
    "PatientID": "expected Keyword=value",
    "=X": "expected Keyword=value",
}


@pytest.mark.parametrize("assignment", sorted(REFUSED))
def test_refused(assignment: str) -> None:
    with pytest.raises(ArchiveError, match=REFUSED[assignment].replace("(", r"\(").replace(".", r"\.")):
        corrections.parse_assignments([assignment])


def test_accepted_values() -> None:
    values = corrections.parse_assignments([
        "PatientID=12345", "PatientName=Doe^Jane", "PatientBirthDate=19700101", "PatientSex=F", "PatientAge=054Y",
        "PatientWeight=72.5", "OtherPatientIDs=A1\\B2", "AccessionNumber=", "StudyDescription=CT chest",
    ])
    assert values["OtherPatientIDs"] == "A1\\B2" and values["AccessionNumber"] == ""


def test_levels() -> None:
    assert corrections.parse_assignments(["SeriesNumber=5", "BodyPartExamined=HEAD"], series_level=True)
    with pytest.raises(ArchiveError, match="whole study"):
        corrections.parse_assignments(["PatientID=1"], series_level=True)
    with pytest.raises(ArchiveError, match="given twice"):
        corrections.parse_assignments(["PatientID=1", "PatientID=2"])
    with pytest.raises(ArchiveError, match="nothing to change"):
        corrections.parse_assignments([])


def test_set_and_columns() -> None:
    ds = Dataset()
    _set(ds, "OtherPatientIDs", "A1\\B2")
    _set(ds, "SeriesNumber", "7")
    _set(ds, "PatientName", "")
    assert list(ds.OtherPatientIDs) == ["A1", "B2"] and ds["OtherPatientIDs"].VR == "LO"
    assert ds.SeriesNumber == 7 and ds["PatientName"].VR == "PN" and ds.PatientName == ""
    assert _column_value("SeriesNumber", "7") == 7 and _column_value("StudyDate", "20240101") == "20240101"
    assert _column_value("PatientID", "") is None


@pytest.mark.parametrize(("charset", "value", "ok"), [
    (None, "Muller^Hans", True),
    (None, "Müller^Hans", False),  # no Specific Character Set: ASCII only
    ("ISO_IR 100", "Müller^Hans", True),
    ("ISO_IR 100", "山田^太郎", False),
    ("ISO_IR 192", "山田^太郎", True),
])
def test_values_must_fit_the_character_set(charset: str | None, value: str, ok: bool) -> None:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    if ok:
        _check_encodable(ds, "PatientName", value, "1.2.3")
    else:
        with pytest.raises(ArchiveError, match="Specific Character Set"):
            _check_encodable(ds, "PatientName", value, "1.2.3")


def test_whole_file_keeps_its_encoding() -> None:
    """rtstruct.dcm (implicit VR, no preamble, no file meta) is written back the same way, one element changed."""
    source = Path(str(get_testdata_file("rtstruct.dcm"))).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(source), force=True)
    original = pydicom.dcmread(io.BytesIO(source), force=True)
    _set(ds, "PatientID", "NEW-1")
    written = _whole_file(ds)
    assert written[128:132] != b"DICM" and abs(len(written) - len(source)) < 16
    again = pydicom.dcmread(io.BytesIO(written), force=True)
    assert again.original_encoding == original.original_encoding == (True, True)
    assert again.PatientID == "NEW-1"
    assert header_differences(original, again, ignore={"PatientID"}) == []
