"""What the writer decides for each arrival: stored, duplicate of a known instance, or a recorded conflict."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom.data import get_testdata_file
from sqlalchemy import select

from archive.catalog.models import Instance, InstanceStatus
from archive.dicom.reader import LOSSLESS, LOSSY_CODESTREAM, ONCE_LOSSY
from archive.services.ingest import Outcome, ingest_paths
from archive.services.recording import Identity, Known, decide_arrival
from archive.services.runtime import Archive
from tests.conftest import shared_data
from tests.dicom_compare import read

UID = "1.2.3.4"
FIRST = Identity(UID, "header-a", "pixels-a")


def test_new_uid_is_stored_first_in_its_line() -> None:
    arrival = decide_arrival(FIRST, [])
    assert arrival.outcome is Outcome.STORED
    assert arrival.conflict_seq == 0
    assert arrival.same is None and arrival.first is None


def test_other_uids_are_not_consulted() -> None:
    """``known`` is the line of one UID; an instance of another UID with the same content is not a duplicate."""
    other = Identity("1.2.3.5", "header-a", "pixels-a")
    assert decide_arrival(other, []).outcome is Outcome.STORED


def test_same_identity_is_a_duplicate_of_the_known_instance() -> None:
    known = [Known(FIRST, 0, 17)]
    arrival = decide_arrival(Identity(UID, "header-a", "pixels-a"), known)
    assert arrival.outcome is Outcome.DUPLICATE
    assert arrival.same is known[0] and arrival.same.instance_id == 17
    assert arrival.first is None
    assert arrival.conflict_seq == 0


def test_duplicate_of_an_arrival_earlier_in_the_same_batch() -> None:
    known = [Known(FIRST, 0, None, batch_index=3)]
    arrival = decide_arrival(FIRST, known)
    assert arrival.outcome is Outcome.DUPLICATE
    assert arrival.same is known[0] and arrival.same.batch_index == 3


def test_same_uid_with_other_header_or_pixels_is_a_conflict() -> None:
    known = [Known(FIRST, 0, 17)]
    for identity in (Identity(UID, "header-b", "pixels-a"), Identity(UID, "header-a", "pixels-b"),
                     Identity(UID, "header-a", None)):
        arrival = decide_arrival(identity, known)
        assert arrival.outcome is Outcome.CONFLICT, identity
        assert arrival.conflict_seq == 1
        assert arrival.first is known[0]
        assert arrival.same is None


def test_conflict_takes_the_next_number_and_names_the_first_arrival() -> None:
    second = Identity(UID, "header-b", "pixels-b")
    third = Identity(UID, "header-c", "pixels-c")
    known = [Known(FIRST, 0, 10), Known(second, 1, 11), Known(third, 4, 12)]  # numbers need not be dense
    arrival = decide_arrival(Identity(UID, "header-d", "pixels-d"), known)
    assert arrival.outcome is Outcome.CONFLICT
    assert arrival.conflict_seq == 5
    assert arrival.first is known[0] and arrival.first.instance_id == 10


def test_duplicate_of_a_conflict_repeats_that_conflict() -> None:
    second = Identity(UID, "header-b", "pixels-b")
    known = [Known(FIRST, 0, 10), Known(second, 1, 11)]
    arrival = decide_arrival(Identity(UID, "header-b", "pixels-b"), known)
    assert arrival.outcome is Outcome.DUPLICATE
    assert arrival.same is known[1] and arrival.same.instance_id == 11
    assert arrival.conflict_seq == 1
    assert arrival.first is None


def test_one_batch_through_the_staging_pool(archive: Archive, tmp_path: Path) -> None:
    """jobs=2: the three files are staged in the pool before anything is committed, so the writer decides."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copyfile(str(get_testdata_file("MR_small.dcm")), inbox / "a-MR_small.dcm")
    shutil.copyfile(shared_data() / "broken" / "duplicate-of-pydicom-MR_small.dcm", inbox / "b-duplicate.dcm")
    shutil.copyfile(shared_data() / "broken" / "conflict-with-pydicom-MR_small.dcm", inbox / "c-conflict.dcm")

    report = ingest_paths(archive, [inbox], jobs=2)

    assert [(o.path.name, o.outcome) for o in report.outcomes] == [
        ("a-MR_small.dcm", Outcome.STORED), ("b-duplicate.dcm", Outcome.DUPLICATE),
        ("c-conflict.dcm", Outcome.CONFLICT)]
    # decided by the writer against the same batch, not by a stager's look-up of committed rows
    assert "in this batch" in report.outcomes[1].reason
    assert "in this batch" in report.outcomes[2].reason
    uid = str(read(inbox / "a-MR_small.dcm").SOPInstanceUID)
    with archive.unit_of_work() as uow:
        rows = uow.session.scalars(select(Instance).order_by(Instance.conflict_seq)).all()
        assert [r.sop_instance_uid for r in rows] == [uid, uid]
        first, conflict = rows
        assert (first.status, first.conflict_seq, first.conflict_of_id) == (InstanceStatus.STORED, 0, None)
        assert (conflict.status, conflict.conflict_seq) == (InstanceStatus.CONFLICT, 1)
        assert conflict.conflict_of_id == first.id
        assert first.source_path == str(inbox / "a-MR_small.dcm")
        assert conflict.source_path == str(inbox / "c-conflict.dcm")
        assert first.created_at == conflict.created_at, "committed together"
        assert first.job_id == conflict.job_id == report.job_id
        assert first.pixel_sha256 != conflict.pixel_sha256


LOSSY = Identity(UID, "header-lossy", "codestream", fidelity=LOSSY_CODESTREAM)
LOSSLESS_COPY = Identity(UID, "header-lossless", "values", fidelity=LOSSLESS)


def test_lossless_arrival_displaces_a_lossy_instance() -> None:
    known = [Known(LOSSY, 0, 10, fidelity=LOSSY_CODESTREAM), Known(Identity(UID, "h", "p"), 2, 11)]
    arrival = decide_arrival(LOSSLESS_COPY, known)
    assert arrival.outcome is Outcome.STORED and arrival.conflict_seq == 0
    assert arrival.displaces is known[0] and arrival.displaced_seq == 3
    assert arrival.first is None and arrival.same is None


def test_lossy_arrival_is_a_conflict_of_a_lossless_instance() -> None:
    known = [Known(LOSSLESS_COPY, 0, 10)]
    arrival = decide_arrival(LOSSY, known)
    assert arrival.outcome is Outcome.CONFLICT and arrival.conflict_seq == 1
    assert arrival.first is known[0] and arrival.displaces is None


def test_once_lossy_pixels_rank_between_a_codestream_and_lossless() -> None:
    once = Identity(UID, "header-once", "values", fidelity=ONCE_LOSSY)
    assert decide_arrival(once, [Known(LOSSY, 0, 10, fidelity=LOSSY_CODESTREAM)]).displaces is not None
    assert decide_arrival(once, [Known(LOSSLESS_COPY, 0, 10)]).outcome is Outcome.CONFLICT
    assert decide_arrival(LOSSLESS_COPY, [Known(once, 0, 10, fidelity=ONCE_LOSSY)]).displaces is not None
    # an archived instance whose header was not read yet is taken as lossless: no displacement
    assert decide_arrival(LOSSLESS_COPY, [Known(once, 0, 10, fidelity=None)]).outcome is Outcome.CONFLICT


def test_equal_fidelity_keeps_the_first_arrival() -> None:
    other = Identity(UID, "header-other", "values-2", fidelity=LOSSLESS)
    assert decide_arrival(other, [Known(LOSSLESS_COPY, 0, 10)]).outcome is Outcome.CONFLICT


def test_header_before_a_correction_is_the_instance_header() -> None:
    corrected = Identity(UID, "header-corrected", "pixels-a")
    known = [Known(corrected, 0, 10, previous=(("header-as-received", "blob", None),))]
    assert decide_arrival(Identity(UID, "header-as-received", "pixels-a"), known).outcome is Outcome.DUPLICATE
    assert decide_arrival(Identity(UID, "header-as-received", "pixels-b"), known).outcome is Outcome.CONFLICT
    same = frozenset({("header-as-received", "header-re-encoded")})
    assert decide_arrival(Identity(UID, "header-re-encoded", "pixels-a"), known, same).outcome is Outcome.DUPLICATE
