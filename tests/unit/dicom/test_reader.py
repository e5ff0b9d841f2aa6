"""Classifying real files: not DICOM (skip), invalid DICOM (quarantine), or an archivable instance."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from archive.kinds import StorageMode
from archive.dicom.reader import iter_frames, read_instance, sniff
from archive.errors import InvalidDicomError, NotDicomError
from tests.conftest import shared_data
from tests.dicom_compare import read, stored_values

INVALID = [
    "truncated-pixel-data.dcm",
    "truncated-header.dcm",
    "rows-larger-than-pixel-data.dcm",
    "absurd-rows-columns.dcm",
    "bits-allocated-inconsistent.dcm",
    "dicm-magic-then-garbage.dcm",
    "empty.dcm",
]


def _testdata(name: str, tmp_path: Path) -> Path:
    source = Path(str(get_testdata_file(name)))
    target = tmp_path / name
    shutil.copyfile(source, target)
    return target


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(shared_data() / "broken", target)
    return target


@pytest.mark.parametrize("name", ["README.txt", "photo.png"])
def test_shared_not_dicom(broken: Path, name: str) -> None:
    with pytest.raises(NotDicomError, match="not DICOM"):
        read_instance(broken / name)


@pytest.mark.parametrize("name", ["DICOMDIR", "DICOMDIR-bigEnd", "DICOMDIR-implicit", "DICOMDIR-empty.dcm"])
def test_dicomdir_is_not_an_instance(name: str, tmp_path: Path) -> None:
    path = _testdata(name, tmp_path)
    with pytest.raises(NotDicomError, match="DICOMDIR"):
        read_instance(path)
    renamed = tmp_path / "index.dcm"  # recognised by content, not only by its name
    shutil.copyfile(path, renamed)
    with pytest.raises(NotDicomError, match="DICOMDIR"):
        read_instance(renamed)


@pytest.mark.parametrize("name", INVALID)
def test_shared_invalid_dicom_has_a_reason(broken: Path, name: str) -> None:
    with pytest.raises(InvalidDicomError) as info:
        read_instance(broken / name)
    assert len(str(info.value)) > 5


def test_specific_reasons(broken: Path) -> None:
    with pytest.raises(InvalidDicomError, match="empty"):
        read_instance(broken / "empty.dcm")
    with pytest.raises(InvalidDicomError, match="shorter than"):
        read_instance(broken / "rows-larger-than-pixel-data.dcm")
    with pytest.raises(InvalidDicomError, match="(?i)implausible|geometry"):
        read_instance(broken / "absurd-rows-columns.dcm")
    with pytest.raises(InvalidDicomError, match="BitsStored|HighBit|BitsAllocated"):
        read_instance(broken / "bits-allocated-inconsistent.dcm")


def test_corrupt_jpeg2000_fails_when_decoded(broken: Path) -> None:
    parsed = read_instance(broken / "jpeg2000-corrupt-codestream.dcm")
    if parsed.mode is StorageMode.PIXELS:
        with pytest.raises(InvalidDicomError):
            list(iter_frames(parsed))
    else:
        assert parsed.mode is StorageMode.PASSTHROUGH


def test_pydicom_truncated_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidDicomError, match="shorter than"):
        read_instance(_testdata("MR_truncated.dcm", tmp_path))


@pytest.mark.parametrize("name", ["valid-but-path-traversal-uids.dcm", "deeply-nested-sequence.dcm",
                                  "duplicate-of-pydicom-MR_small.dcm", "conflict-with-pydicom-MR_small.dcm"])
def test_shared_valid_files_read(broken: Path, name: str) -> None:
    parsed = read_instance(broken / name)
    assert parsed.study_uid and parsed.series_uid and parsed.sop_instance_uid
    assert parsed.mode is StorageMode.PIXELS
    frames = list(iter_frames(parsed))
    assert np.array_equal(np.stack(frames).reshape(stored_values(read(broken / name)).shape),
                          stored_values(read(broken / name)))


def test_sniff() -> None:
    with pytest.raises(NotDicomError):
        sniff(Path("x"), b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    with pytest.raises(NotDicomError):
        sniff(Path("notes.txt"), b"hello world, this is text")
    with pytest.raises(NotDicomError, match="DICOMDIR"):
        sniff(Path("dicomdir"), b"\x00" * 128 + b"DICM")
    sniff(Path("noext"), b"\x00" * 128 + b"DICM")  # the marker decides
    sniff(Path("image.DCM"), b"garbage")  # the name claims DICOM: quarantined later, not skipped
    sniff(Path("noext"), b"\x08\x00\x05\x00CS\x0a\x00")  # headless data set at group 0008
    with pytest.raises(NotDicomError):
        sniff(Path("image.dcm"), b"%PDF-1.7 ..." + b"\x00" * 200)


def test_read_never_modifies_the_source(tmp_path: Path) -> None:
    path = _testdata("SC_rgb_small_odd_big_endian.dcm", tmp_path)
    before = path.read_bytes()
    read_instance(path)
    assert path.read_bytes() == before


def test_big_endian_8bit_ow_rgb_equals_little_endian_twin(tmp_path: Path) -> None:
    big = read_instance(_testdata("SC_rgb_small_odd_big_endian.dcm", tmp_path))
    little = read_instance(_testdata("SC_rgb_small_odd.dcm", tmp_path))
    assert big.transfer_syntax_uid == "1.2.840.10008.1.2.2"
    assert big.dataset["PixelData"].VR == "OW" and big.layout and big.layout.bits_allocated == 8
    big_frames, little_frames = list(iter_frames(big)), list(iter_frames(little))
    assert len(big_frames) == len(little_frames) >= 1
    for b, lt in zip(big_frames, little_frames):
        assert b.dtype == lt.dtype and np.array_equal(b, lt)
    assert np.array_equal(np.stack(little_frames).reshape(stored_values(read(little.source_path)).shape),
                          stored_values(read(little.source_path)))


@pytest.mark.parametrize("big, little", [("MR_small_bigendian.dcm", "MR_small.dcm"),
                                         ("rtdose_expb_1frame.dcm", "rtdose_1frame.dcm")])
def test_big_endian_16bit_and_more_equals_little_endian_twin(big: str, little: str, tmp_path: Path) -> None:
    b = read_instance(_testdata(big, tmp_path))
    lt = read_instance(_testdata(little, tmp_path))
    if b.mode is StorageMode.PIXELS:
        assert [f.tobytes() for f in iter_frames(b)] == [f.tobytes() for f in iter_frames(lt)]
    assert np.array_equal(stored_values(read(b.source_path)), stored_values(read(lt.source_path)))


def test_acr_nema_file_gets_deterministic_assigned_uids(tmp_path: Path) -> None:
    source = shared_data() / "misc-barre" / "CT_Implicit_Little_Headless_Retired.dcm"
    first_copy, second_copy = tmp_path / "a.dcm", tmp_path / "b"
    shutil.copyfile(source, first_copy)
    shutil.copyfile(source, second_copy)
    first, second = read_instance(first_copy), read_instance(second_copy)
    assert not first.had_file_meta
    assert set(first.assigned_uids) == {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}
    assert first.assigned_uids == second.assigned_uids, "same content, same UIDs, whatever the file name"
    assert first.study_uid == first.assigned_uids["StudyInstanceUID"]
    assert first.sop_instance_uid == first.assigned_uids["SOPInstanceUID"]
    assert len({first.study_uid, first.series_uid, first.sop_instance_uid}) == 3
    assert all(uid.startswith("2.25.") and len(uid) <= 64 for uid in first.assigned_uids.values())
    assert first.transfer_syntax_uid == "1.2.840.10008.1.2"
    assert first.mode is StorageMode.PIXELS
    assert np.array_equal(np.stack(list(iter_frames(first)))[0], stored_values(read(first_copy)))


def test_files_with_uids_get_none_assigned(tmp_path: Path) -> None:
    parsed = read_instance(_testdata("CT_small.dcm", tmp_path))
    assert parsed.assigned_uids == {}
    assert parsed.had_file_meta


@pytest.mark.parametrize("name, mode", [
    ("CT_small.dcm", StorageMode.PIXELS),
    ("MR_small_RLE.dcm", StorageMode.PIXELS),
    ("MR_small_jpeg_ls_lossless.dcm", StorageMode.PIXELS),
    ("MR_small_jp2klossless.dcm", StorageMode.PIXELS),
    ("JPEG-lossy.dcm", StorageMode.PASSTHROUGH),
    ("SC_rgb_jpeg_dcmtk.dcm", StorageMode.PASSTHROUGH),
    ("JPEG2000.dcm", StorageMode.PASSTHROUGH),  # irreversible 9/7 wavelet, LossyImageCompression 01
    ("rtplan.dcm", StorageMode.WHOLE),
    ("SC_rgb_rle_32bit.dcm", StorageMode.WHOLE),
    ("SC_ybr_full_422_uncompressed.dcm", StorageMode.WHOLE),
])
def test_storage_mode(name: str, mode: StorageMode, tmp_path: Path) -> None:
    parsed = read_instance(_testdata(name, tmp_path))
    assert parsed.mode is mode, parsed.mode_reason
    assert parsed.mode_reason


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_implicit.dcm", "MR_small_expb.dcm"])
def test_lossless_variants_decode_to_mr_small(name: str, tmp_path: Path) -> None:
    reference = [f.tobytes() for f in iter_frames(read_instance(_testdata("MR_small.dcm", tmp_path)))]
    assert [f.tobytes() for f in iter_frames(read_instance(_testdata(name, tmp_path)))] == reference


def test_header_of_a_file_that_lies_about_its_vr_encoding_is_kept(tmp_path: Path) -> None:
    """SC_rgb_jpeg.dcm declares explicit VR but is implicit: its header must still serialise whole."""
    from archive.dicom.writer import read_header, serialize_header

    source = tmp_path / "SC_rgb_jpeg.dcm"
    shutil.copyfile(get_testdata_file("SC_rgb_jpeg.dcm"), source)
    parsed = read_instance(source)
    header = read_header(serialize_header(parsed.dataset).part10)
    assert list(header.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
    assert header.SOPInstanceUID == parsed.dataset.SOPInstanceUID
