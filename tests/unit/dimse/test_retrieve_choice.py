"""What a C-GET/C-MOVE identifier names and which transfer syntax each instance goes in (no network, no catalog)."""

from __future__ import annotations

import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
)

from archive.kinds import StorageMode
from archive.errors import IdentifierError
from archive.services.dimse_retrieve import (
    SelectedInstance,
    Selection,
    choose_syntax,
    move_proposal,
    parse_identifier,
    sendable_syntaxes,
)
from archive.services.wado import PlannedInstance
from tests.unit.dimse import identifier

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"


def planned(mode: StorageMode, syntax: str) -> PlannedInstance:
    return PlannedInstance(1, "1.2.3.4", "1.2.3", mode, syntax, 1)


def test_unique_key_lists_and_missing_upper_keys_are_accepted() -> None:
    request = parse_identifier(identifier("IMAGE", SOPInstanceUID="1.2.3\\1.2.4\\1.2.3"), patient_root=False)
    assert request.level == "IMAGE" and request.instance_uids == ("1.2.3", "1.2.4")
    request = parse_identifier(identifier("PATIENT", PatientID="A002304"), patient_root=True)
    assert request.patient_ids == ("A002304",)


@pytest.mark.parametrize(("level", "keys", "patient_root", "named"), [
    ("PATIENT", {"PatientID": "X"}, False, "Study Root"),  # no PATIENT level in Study Root
    (None, {"StudyInstanceUID": "1.2"}, False, "(none)"),
    ("SERIES", {"StudyInstanceUID": "1.2"}, False, "SeriesInstanceUID"),
    ("STUDY", {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3"}, True, "below"),
    ("IMAGE", {"SeriesInstanceUID": "1.2\\1.3", "SOPInstanceUID": "1.4"}, False, "single value"),
])
def test_identifiers_the_scp_cannot_act_on_are_refused(level: str | None, keys: dict[str, str], patient_root: bool,
                                                        named: str) -> None:
    with pytest.raises(IdentifierError, match=named):
        parse_identifier(identifier(level, **keys), patient_root=patient_root)


def test_preference_is_stored_then_explicit_then_implicit_then_the_rest() -> None:
    received_implicit = planned(StorageMode.PIXELS, ImplicitVRLittleEndian)
    assert sendable_syntaxes(received_implicit)[:2] == [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    received_explicit = planned(StorageMode.PIXELS, ExplicitVRLittleEndian)
    assert sendable_syntaxes(received_explicit) == [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                                    JPEGLSLossless, JPEG2000Lossless]
    assert choose_syntax(received_explicit, {JPEGLSLossless, ImplicitVRLittleEndian}) == ImplicitVRLittleEndian
    assert choose_syntax(received_explicit, {JPEGLSLossless}) == JPEGLSLossless
    assert choose_syntax(received_explicit, {JPEGBaseline8Bit}) is None  # fails rather than a lossy transcode


def test_lossy_input_goes_as_received_or_decoded_never_recompressed() -> None:
    lossy = planned(StorageMode.PASSTHROUGH, JPEGBaseline8Bit)
    assert sendable_syntaxes(lossy)[0] == JPEGBaseline8Bit
    assert JPEGLSLossless not in sendable_syntaxes(lossy)
    assert choose_syntax(lossy, {JPEGBaseline8Bit, ExplicitVRLittleEndian}) == JPEGBaseline8Bit


def test_move_proposes_the_stored_syntax_where_standard_then_both_little_endians() -> None:
    selection = Selection([SelectedInstance(planned(StorageMode.PIXELS, ExplicitVRLittleEndian), MR, "s"),
                           SelectedInstance(planned(StorageMode.PASSTHROUGH, JPEGBaseline8Bit), CT, "s"),
                           SelectedInstance(planned(StorageMode.PIXELS, JPEGLSLossless), CT, "s")])
    proposal = move_proposal(selection)
    assert proposal[MR] == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert proposal[CT][-2:] == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert set(proposal[CT][:2]) == {JPEGBaseline8Bit, JPEGLSLossless}
    assert selection.suboperations == 3 and selection.sop_classes() == sorted([CT, MR])
