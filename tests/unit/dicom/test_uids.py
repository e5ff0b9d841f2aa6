"""UIDs as file-name components and minted UIDs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from archive.dicom.uids import derived_uid, safe_component, safe_filename, uid_text

HOSTILE = [
    "..", ".", "../../../../tmp/escape", "1.2.3/../../x", "..\\..\\evil", "\\", "/", "/etc/passwd", ".hidden",
    "...", ". .", "a/b", "1.2.3\n", "1.2.3\x00", "", " ", "C:\\Windows", "..\\", "1.2..3", "é.1", "\udcff",
    "1." * 40, "9" * 65, "1.2.3 ", "-1.2", "1.2.3\n..", "\n", "1.2.3\r",
]
VALID = ["1.2.840.10008.1.2", "2.25.123456789012345678901234567890", "0", "1.2.3", "9" * 64]


@pytest.mark.parametrize("uid", HOSTILE + VALID)
def test_safe_component_never_leaves_its_folder(uid: str, tmp_path: Path) -> None:
    component = safe_component(uid)
    assert component not in ("", ".", "..")
    assert "/" not in component and "\\" not in component and "\x00" not in component
    assert not component.startswith(".")
    assert re.fullmatch(r"[0-9A-Za-z._\-]+", component), repr(component)  # no control characters or spaces
    assert (tmp_path / component).resolve().parent == tmp_path.resolve()


@pytest.mark.parametrize("uid", VALID)
def test_valid_uids_are_kept_as_they_are(uid: str) -> None:
    assert safe_component(uid) == uid


def test_distinct_inputs_stay_distinct() -> None:
    inputs = HOSTILE + VALID + ["1.2.3/4", "1.2.3\\4", "1.2.3_4", "1.2.3:4", "a" * 48 + "x", "a" * 48 + "y"]
    outputs = [safe_component(uid) for uid in inputs]
    assert len(set(outputs)) == len(set(inputs))


def test_safe_component_is_deterministic() -> None:
    assert safe_component("../x") == safe_component("../x")


@pytest.mark.parametrize("name", ["../../x.dcm", ".hidden.dcm", "a/b\\c.dcm", "", "...", "ok-name_1.dcm"])
def test_safe_filename(name: str) -> None:
    result = safe_filename(name)
    assert result and not result.startswith(".")
    assert "/" not in result and "\\" not in result
    if name == "ok-name_1.dcm":
        assert result == name


def test_derived_uid_is_deterministic_valid_and_distinct() -> None:
    a = derived_uid("study", "P1", "20240101")
    assert a == derived_uid("study", "P1", "20240101")
    assert a != derived_uid("study", "P1", "20240102")
    assert derived_uid("ab", "c") != derived_uid("a", "bc"), "parts are separated, not concatenated"
    for uid in (a, derived_uid(""), derived_uid("x" * 1000)):
        assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid)
        assert len(uid) <= 64


def test_uid_text_joins_multivalue_and_strips_padding() -> None:
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3\x00"
    ds.add_new(0x0020000E, "UI", ["..", "..", "evil"])
    assert uid_text(ds, "StudyInstanceUID") == "1.2.3"
    assert uid_text(ds, "SeriesInstanceUID") == "..\\..\\evil"
    assert uid_text(ds, "SOPInstanceUID") is None
    ds.SOPInstanceUID = ""
    assert uid_text(ds, "SOPInstanceUID") is None
