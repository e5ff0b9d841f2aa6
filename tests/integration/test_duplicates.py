"""Same SOP instance twice: a duplicate is a no-op, different content is a recorded conflict, never an overwrite."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from archive.catalog.models import Blob, Encoding, Instance, InstanceStatus, Series, Study
from archive.dicom.uids import uid_text
from archive.services.ingest import Outcome, ingest_paths
from archive.services.retrieve import retrieve_study
from archive.services.runtime import Archive
from tests.conftest import shared_data
from tests.dicom_compare import header_differences, read, stored_values

MR_SMALL = Path(str(get_testdata_file("MR_small.dcm")))


def _row_counts(archive: Archive) -> dict[str, int]:
    with archive.unit_of_work() as uow:
        return {
            model.__tablename__: uow.session.scalar(select(func.count()).select_from(model)) or 0
            for model in (Study, Series, Instance, Encoding, Blob)
        }


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    shutil.copyfile(MR_SMALL, folder / "a-MR_small.dcm")  # names sort in arrival order
    for name in ("duplicate-of-pydicom-MR_small.dcm", "conflict-with-pydicom-MR_small.dcm"):
        shutil.copyfile(shared_data() / "broken" / name, folder / f"{'b' if 'duplicate' in name else 'c'}-{name}")
    return folder


def test_duplicate_and_conflict(archive: Archive, inbox: Path, tmp_path: Path) -> None:
    report = ingest_paths(archive, [inbox])
    outcomes = {o.path.name: o for o in report.outcomes}
    assert [o.outcome for o in report.outcomes] == [Outcome.STORED, Outcome.DUPLICATE, Outcome.CONFLICT]
    assert all(o.reason for o in report.outcomes)
    uid = str(read(MR_SMALL).SOPInstanceUID)

    with archive.unit_of_work() as uow:
        rows = uow.session.scalars(select(Instance).where(Instance.sop_instance_uid == uid)
                                   .order_by(Instance.conflict_seq)).all()
        assert len(rows) == 2
        first, conflict = rows
        assert first.status is InstanceStatus.STORED and first.conflict_seq == 0 and first.conflict_of_id is None
        assert first.source_path == str(inbox / "a-MR_small.dcm")
        assert conflict.status is InstanceStatus.CONFLICT and conflict.conflict_seq == 1
        assert conflict.conflict_of_id == first.id
        assert conflict.source_path == str(outcomes["c-conflict-with-pydicom-MR_small.dcm"].path)

    # without conflicts: only the first, untouched
    study_uid = str(read(MR_SMALL).StudyInstanceUID)
    plain = retrieve_study(archive, study_uid, tmp_path / "plain")
    assert len(plain.files) == 1
    retrieved = read(plain.files[0].path)
    assert np.array_equal(stored_values(retrieved), stored_values(read(MR_SMALL)))
    assert not header_differences(read(MR_SMALL), retrieved)

    # with conflicts: both, each equal to its own source
    both = retrieve_study(archive, study_uid, tmp_path / "both", include_conflicts=True)
    assert len(both.files) == 2
    for item in both.files:
        assert item.source_path is not None
        assert np.array_equal(stored_values(read(item.path)), stored_values(read(Path(item.source_path))))
    conflict_pixels = stored_values(read(inbox / "c-conflict-with-pydicom-MR_small.dcm"))
    assert not np.array_equal(conflict_pixels, stored_values(read(MR_SMALL))), "the conflict file really differs"


def test_duplicate_adds_no_rows(archive: Archive, inbox: Path) -> None:
    ingest_paths(archive, [inbox / "a-MR_small.dcm"])
    before = _row_counts(archive)
    packs_before = archive.store.packs.packs()
    report = ingest_paths(archive, [inbox / "b-duplicate-of-pydicom-MR_small.dcm"])
    assert [o.outcome for o in report.outcomes] == [Outcome.DUPLICATE]
    assert _row_counts(archive) == before
    assert archive.store.packs.packs() == packs_before, "a duplicate writes no blob"


def test_reingesting_a_folder_is_all_duplicates(archive: Archive, inbox: Path) -> None:
    first = ingest_paths(archive, [inbox])
    counts = _row_counts(archive)
    for _ in range(2):
        again = ingest_paths(archive, [inbox])
        assert [o.outcome for o in again.outcomes] == [Outcome.DUPLICATE] * len(first.outcomes)
        assert again.studies == set()
        assert _row_counts(archive) == counts


def test_jpeg_ls_copy_is_a_duplicate(archive: Archive, tmp_path: Path) -> None:
    ds = read(MR_SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.compress(pydicom.uid.JPEGLSLossless, generate_instance_uid=False)
    copy = tmp_path / "MR_small_jls.dcm"
    ds.save_as(copy, enforce_file_format=True)
    assert read(copy).file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless
    assert read(copy).SOPInstanceUID == read(MR_SMALL).SOPInstanceUID

    ingest_paths(archive, [MR_SMALL])
    counts = _row_counts(archive)
    report = ingest_paths(archive, [copy])
    assert [o.outcome for o in report.outcomes] == [Outcome.DUPLICATE], report.outcomes
    assert _row_counts(archive) == counts


def test_path_traversal_uids_stay_inside(archive: Archive, tmp_path: Path) -> None:
    source = tmp_path / "in" / "valid-but-path-traversal-uids.dcm"
    source.parent.mkdir()
    shutil.copyfile(shared_data() / "broken" / source.name, source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = read(source)
    study_uid = uid_text(original, "StudyInstanceUID")
    assert study_uid and ".." in study_uid

    sandbox = tmp_path / "sandbox"
    out = sandbox / "a" / "b" / "c" / "d" / "out"  # deep enough that ../../../../ stays inside the sandbox
    out.mkdir(parents=True)
    watched = [tmp_path, Path("/tmp")]
    before = {p: set(p.rglob("*")) if p == tmp_path else set(p.iterdir()) for p in watched}

    report = ingest_paths(archive, [source])
    assert [o.outcome for o in report.outcomes] == [Outcome.STORED], report.outcomes
    assert report.studies == {study_uid}

    result = retrieve_study(archive, study_uid, out)
    assert len(result.files) == 1
    written = result.files[0].path
    assert out.resolve() in written.resolve().parents
    assert not (Path("/tmp") / "escape").exists()
    new_in_tmp = set(Path("/tmp").iterdir()) - before[Path("/tmp")]
    assert not [p for p in new_in_tmp if "escape" in p.name or p.name == "x" or p.name == "evil"]
    home = archive.settings.home
    outside = [p for p in set(tmp_path.rglob("*")) - before[tmp_path]
               if p.is_file() and home not in p.parents and out not in p.parents]
    assert outside == [], outside

    retrieved = read(written)
    assert uid_text(retrieved, "StudyInstanceUID") == study_uid
    assert uid_text(retrieved, "SOPInstanceUID") == uid_text(original, "SOPInstanceUID")
    assert not header_differences(original, retrieved)
    assert np.array_equal(stored_values(retrieved), stored_values(original))
