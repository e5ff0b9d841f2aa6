"""Retrieval keeps identity and never lets one instance block its study."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from sqlalchemy import select

from archive.catalog.models import Blob, Instance
from archive.errors import BlobCorruptError, NotFoundError
from archive.services.ingest import Outcome, ingest_paths
from archive.services.retrieve import current_encoding, read_frame, retrieve, retrieve_study
from archive.services.runtime import Archive
from tests.conftest import shared_data
from tests.dicom_compare import header_differences, read, stored_values


def _ingest(archive: Archive, tmp_path: Path, *names: str) -> dict[str, str]:
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copyfile(str(get_testdata_file(name)), folder / name)
    report = ingest_paths(archive, [folder / n for n in names])
    assert all(o.outcome is Outcome.STORED for o in report.outcomes), report.outcomes
    return {o.path.name: str(o.study_uid) for o in report.outcomes}


@pytest.mark.parametrize("name, syntax", [
    ("MR_small_RLE.dcm", "original"),  # re-encoded as RLE
    ("MR_small_jpeg_ls_lossless.dcm", "original"),  # re-encoded as JPEG-LS
    ("MR_small.dcm", "jpegls"),
    ("MR_small.dcm", "jpeg2000"),
    ("JPEG-lossy.dcm", "explicit-le"),  # lossy original decoded to native pixels
    ("SC_rgb_jpeg_dcmtk.dcm", "explicit-le"),
])
def test_retrieved_file_keeps_its_sop_instance_uid(sqlite_archive: Archive, tmp_path: Path, name: str,
                                                   syntax: str) -> None:
    study = _ingest(sqlite_archive, tmp_path, name)[name]
    result = retrieve_study(sqlite_archive, study, tmp_path / "out", transfer_syntax=syntax)
    (item,) = result.files
    source, retrieved = read(tmp_path / "in" / name), read(item.path)
    assert retrieved.SOPInstanceUID == source.SOPInstanceUID
    assert retrieved.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
    assert item.sop_instance_uid == source.SOPInstanceUID


def test_requested_lossless_syntaxes_are_bit_exact(sqlite_archive: Archive, tmp_path: Path) -> None:
    study = _ingest(sqlite_archive, tmp_path, "CT_small.dcm")["CT_small.dcm"]
    source = read(tmp_path / "in" / "CT_small.dcm")
    for syntax, uid in (("jpegls", pydicom.uid.JPEGLSLossless), ("jpeg2000", pydicom.uid.JPEG2000Lossless),
                        ("explicit-le", pydicom.uid.ExplicitVRLittleEndian)):
        (item,) = retrieve_study(sqlite_archive, study, tmp_path / syntax, transfer_syntax=syntax).files
        retrieved = read(item.path)
        assert retrieved.file_meta.TransferSyntaxUID == uid == item.transfer_syntax
        assert np.array_equal(stored_values(retrieved), stored_values(source)), syntax
        assert not header_differences(source, retrieved, {"SOPInstanceUID"}), syntax


@pytest.mark.parametrize("name", ["SC_rgb_rle_32bit.dcm", "rtdose_rle.dcm", "rtdose_expb_1frame.dcm"])
def test_whole_instance_retrieves_as_explicit_le(sqlite_archive: Archive, tmp_path: Path, name: str) -> None:
    """Kept whole (32-bit RLE, 32-bit big endian): native pixels asked for, the same values given back."""
    study = _ingest(sqlite_archive, tmp_path, name)[name]
    (item,) = retrieve_study(sqlite_archive, study, tmp_path / "out", transfer_syntax="explicit-le").files
    source, retrieved = read(tmp_path / "in" / name), read(item.path)
    assert np.array_equal(stored_values(retrieved), stored_values(source))
    assert not header_differences(source, retrieved)


def test_undecodable_lossy_instance_does_not_block_its_study(sqlite_archive: Archive, tmp_path: Path) -> None:
    """pydicom's JPEG2000-embedded-sequence-delimiter.dcm cannot be decoded; its study-mates still can."""
    studies = _ingest(sqlite_archive, tmp_path, "JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm")
    assert len(set(studies.values())) == 1
    result = retrieve_study(sqlite_archive, studies["JPEG-lossy.dcm"], tmp_path / "out", transfer_syntax="explicit-le")
    assert len(result.files) == 2
    for item in result.files:
        assert item.source_path is not None
        assert read(item.path).SOPInstanceUID == read(Path(item.source_path)).SOPInstanceUID


def test_read_frame_alone(sqlite_archive: Archive, tmp_path: Path) -> None:
    _ingest(sqlite_archive, tmp_path, "SC_rgb_rle_2frame.dcm")
    source = read(tmp_path / "in" / "SC_rgb_rle_2frame.dcm")
    frames = stored_values(source)
    assert frames.ndim == 4 and frames.shape[0] == 2  # frames × rows × columns × samples
    for index in (0, frames.shape[0] - 1):
        assert np.array_equal(read_frame(sqlite_archive, str(source.SOPInstanceUID), index), frames[index])


def _series_study(archive: Archive, tmp_path: Path) -> tuple[str, list[Path]]:
    """One real chest CT study of three series (axial, coronal, sagittal; one instance each)."""
    chest = shared_data() / "ct-chest-tcia" / "A002304"
    files = sorted(p for p in chest.rglob("19001231-*.dcm"))
    folder = tmp_path / "chest"
    folder.mkdir()
    copies = []
    for path in files:
        copies.append(folder / f"{path.parent.name}.dcm")
        shutil.copyfile(path, copies[-1])
    report = ingest_paths(archive, copies)
    assert {o.outcome for o in report.outcomes} == {Outcome.STORED}
    (study,) = report.studies
    return study, copies


def test_retrieve_one_series_by_its_uid(sqlite_archive: Archive, tmp_path: Path) -> None:
    study, files = _series_study(sqlite_archive, tmp_path)
    coronal = read(files[1])
    result = retrieve(sqlite_archive, str(coronal.SeriesInstanceUID), tmp_path / "out")
    assert (result.study_uid, result.series_uid) == (study, coronal.SeriesInstanceUID)
    (item,) = result.files
    assert item.sop_instance_uid == coronal.SOPInstanceUID
    assert np.array_equal(stored_values(read(item.path)), stored_values(coronal))
    assert len(retrieve(sqlite_archive, study, tmp_path / "all").files) == 3
    with pytest.raises(NotFoundError, match="no study or series"):
        retrieve(sqlite_archive, "1.2.3.4", tmp_path / "none")
    with pytest.raises(NotFoundError):  # retrieve_study wants a study UID
        retrieve_study(sqlite_archive, str(coronal.SeriesInstanceUID), tmp_path / "none")


def _corrupt_first_frame(archive: Archive, sop_instance_uid: str) -> None:
    """Flip one byte of the instance's first frame blob where the catalog says it lies."""
    with archive.unit_of_work() as uow:
        instance = uow.session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).one()
        digest = current_encoding(instance).frames[0].blob_sha256
        blob = uow.session.get_one(Blob, digest)
        pack, offset, size = blob.pack, blob.offset, blob.size
    assert pack is not None and offset is not None
    path = archive.store.packs.root / pack
    data = bytearray(path.read_bytes())
    data[offset + size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_instance_stops_retrieval_unless_keep_going(sqlite_archive: Archive, tmp_path: Path) -> None:
    study, files = _series_study(sqlite_archive, tmp_path)
    sagittal = read(files[2])
    _corrupt_first_frame(sqlite_archive, str(sagittal.SOPInstanceUID))
    with pytest.raises(BlobCorruptError) as stopped:
        retrieve(sqlite_archive, study, tmp_path / "strict")
    assert str(sagittal.SOPInstanceUID) in str(stopped.value) and "--keep-going" in str(stopped.value)

    result = retrieve(sqlite_archive, study, tmp_path / "out", keep_going=True)
    assert [u.sop_instance_uid for u in result.unreadable] == [sagittal.SOPInstanceUID]
    assert result.unreadable[0].problem == "corrupt" and result.unreadable[0].series_uid == sagittal.SeriesInstanceUID
    assert {f.sop_instance_uid for f in result.files} == {read(f).SOPInstanceUID for f in files[:2]}
    assert all(f.path.is_file() for f in result.files)
