"""Same object, same answer: identity independent of encoding, lossless over lossy, nothing stored larger than it came.

Real files from pydicom and pydicom-data, ingested and retrieved through the
services on a real catalog; SQLAlchemy warnings are errors here.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from sqlalchemy import select

from archive.catalog.models import Encoding, HeaderRevision, Instance, InstanceStatus
from archive.dicom.writer import j2k_uses_mct
from archive.services.ingest import Outcome, ingest_paths
from archive.services.retrieve import retrieve_study
from archive.services.runtime import Archive
from tests.dicom_compare import header_differences, read, stored_values

pytestmark = pytest.mark.filterwarnings("error::sqlalchemy.exc.SAWarning")


def _data(name: str) -> Path:
    return Path(str(get_testdata_file(name)))


def _folder(root: Path, name: str, *files: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for index, file in enumerate(files):
        shutil.copyfile(_data(file), folder / f"{index}-{file}")  # names sort in arrival order
    return folder


def _outcomes(archive: Archive, folder: Path) -> list[Outcome]:
    return [o.outcome for o in ingest_paths(archive, [folder]).outcomes]


def _rows(archive: Archive, uid: str) -> list[tuple[int, InstanceStatus, str, int | None, int]]:
    with archive.unit_of_work() as uow:
        rows = uow.session.execute(select(Instance.conflict_seq, Instance.status, Instance.transfer_syntax_uid,
                                          Instance.conflict_of_id, Instance.id)
                                   .where(Instance.sop_instance_uid == uid).order_by(Instance.conflict_seq)).all()
        return [tuple(row) for row in rows]  # type: ignore[misc]


@pytest.mark.parametrize("order", [("liver.dcm", "liver_expb.dcm"), ("liver_expb.dcm", "liver.dcm")])
def test_whole_kept_object_in_another_syntax_is_a_duplicate(archive: Archive, tmp_path: Path,
                                                            order: tuple[str, str]) -> None:
    """liver.dcm (Explicit LE) and liver_expb.dcm (Explicit BE): 1-bit pixels, kept whole, the same object."""
    first, second = order
    assert _outcomes(archive, _folder(tmp_path, "one", first)) == [Outcome.STORED]
    assert _outcomes(archive, _folder(tmp_path, "two", second)) == [Outcome.DUPLICATE]
    assert _outcomes(archive, _folder(tmp_path, "both", first, second)) == [Outcome.DUPLICATE, Outcome.DUPLICATE]
    uid = str(read(_data(first)).SOPInstanceUID)
    assert [(seq, status) for seq, status, *_ in _rows(archive, uid)] == [(0, InstanceStatus.STORED)]


def test_whole_kept_object_twice_in_one_batch_is_a_duplicate(archive: Archive, tmp_path: Path) -> None:
    folder = _folder(tmp_path, "batch", "liver_expb.dcm", "liver.dcm")
    report = ingest_paths(archive, [folder])
    assert [o.outcome for o in report.outcomes] == [Outcome.STORED, Outcome.DUPLICATE]
    assert "in this batch" in report.outcomes[1].reason


@pytest.mark.parametrize("layout", ["lossy first", "lossless first", "one batch, lossy first"])
def test_lossless_is_the_instance_whichever_arrives_first(archive: Archive, tmp_path: Path, layout: str) -> None:
    """RG1_J2KI (irreversible JPEG 2000) and RG1_UNCI (its decoded pixels, native) share a SOP Instance UID."""
    lossy, lossless = "RG1_J2KI.dcm", "RG1_UNCI.dcm"
    if layout == "one batch, lossy first":
        report = ingest_paths(archive, [_folder(tmp_path, "both", lossy, lossless)])
        assert [o.outcome for o in report.outcomes] == [Outcome.CONFLICT, Outcome.STORED]
    else:
        first, second = (lossy, lossless) if layout == "lossy first" else (lossless, lossy)
        assert _outcomes(archive, _folder(tmp_path, "one", first)) == [Outcome.STORED]
        report = ingest_paths(archive, [_folder(tmp_path, "two", second)])
        assert [o.outcome for o in report.outcomes] == [Outcome.STORED if second == lossless else Outcome.CONFLICT]
    source = read(_data(lossless))
    rows = _rows(archive, str(source.SOPInstanceUID))
    (seq0, status0, ts0, of0, id0), (seq1, status1, ts1, of1, _id1) = rows
    assert (seq0, status0, ts0, of0) == (0, InstanceStatus.STORED, "1.2.840.10008.1.2.1", None)
    assert (seq1, status1, ts1, of1) == (1, InstanceStatus.CONFLICT, "1.2.840.10008.1.2.4.91", id0)

    got = retrieve_study(archive, str(source.StudyInstanceUID), tmp_path / "get")
    assert len(got.files) == 1
    assert np.array_equal(stored_values(read(got.files[0].path)), stored_values(source))
    both = retrieve_study(archive, str(source.StudyInstanceUID), tmp_path / "all", include_conflicts=True,
                          transfer_syntax="original")
    assert sorted(f.transfer_syntax for f in both.files) == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.91"]
    with archive.unit_of_work() as uow:  # the lossy object's original codestream is still there, untouched
        lossy_file = next(f for f in both.files if f.transfer_syntax.endswith(".91"))
        kept = next(generate_frames(read(lossy_file.path).PixelData, number_of_frames=1))
        assert kept == next(generate_frames(read(_data(lossy)).PixelData, number_of_frames=1))
        assert uow.session.scalar(select(Instance.id).where(Instance.status == InstanceStatus.STORED)) == id0


def test_re_sent_original_header_of_a_corrected_instance_is_a_duplicate(sqlite_archive: Archive,
                                                                        tmp_path: Path) -> None:
    """An administrator corrected the header; the modality re-sends its original, wrong one: a duplicate."""
    from archive.services.corrections import update_attributes

    archive = sqlite_archive
    folder = _folder(tmp_path, "ct", "CT_small.dcm")
    assert _outcomes(archive, folder) == [Outcome.STORED]
    source = read(_data("CT_small.dcm"))
    update_attributes(archive, str(source.StudyInstanceUID), {"PatientID": "CORRECTED-1"}, reason="wrong ID")
    with archive.unit_of_work() as uow:
        assert uow.session.scalar(select(HeaderRevision.id)) is not None
    assert _outcomes(archive, folder) == [Outcome.DUPLICATE]
    # the same wrong header re-sent in another transfer syntax
    implicit = tmp_path / "implicit" / "ct.dcm"
    implicit.parent.mkdir()
    source.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    source.save_as(implicit, enforce_file_format=True)
    assert _outcomes(archive, implicit.parent) == [Outcome.DUPLICATE]
    changed = tmp_path / "changed" / "ct.dcm"  # a header that never was the instance's: a conflict
    changed.parent.mkdir()
    source.PatientID = "SOMEONE-ELSE"
    source.save_as(changed, enforce_file_format=True)
    assert _outcomes(archive, changed.parent) == [Outcome.CONFLICT]


def test_lossless_compressed_input_is_never_stored_larger(sqlite_archive: Archive, tmp_path: Path) -> None:
    """US1_J2KR (reversible JPEG 2000, YBR_RCT): our JPEG-LS is larger, so the original codestream is kept."""
    archive = sqlite_archive
    report = ingest_paths(archive, [_folder(tmp_path, "in", "US1_J2KR.dcm", "MR_small_RLE.dcm")])
    assert [o.outcome for o in report.outcomes] == [Outcome.STORED, Outcome.STORED]
    kept = report.outcomes[0]
    assert "original fragments kept" in kept.reason and kept.bytes_stored <= kept.bytes_in
    with archive.unit_of_work() as uow:
        codec = uow.session.scalar(select(Encoding.codec_id).join(Instance, Encoding.instance_id == Instance.id)
                                   .where(Instance.source_path == str(kept.path)))
        assert codec == "dicom-fragment"
    source = read(_data("US1_J2KR.dcm"))
    for syntax in ("explicit-le", "jpegls", "jpeg2000", "original"):
        got = retrieve_study(archive, str(source.StudyInstanceUID), tmp_path / syntax, transfer_syntax=syntax)
        out = read(got.files[0].path)
        assert np.array_equal(stored_values(out), stored_values(source)), syntax  # YBR_RCT decodes to RGB
        assert out.PlanarConfiguration == 0 and not header_differences(
            source, out, ignore={"PhotometricInterpretation", "PlanarConfiguration"})


def test_deflated_input_is_kept_deflated_when_smaller(sqlite_archive: Archive, tmp_path: Path) -> None:
    archive = sqlite_archive
    report = ingest_paths(archive, [_folder(tmp_path, "in", "image_dfl.dcm")])
    outcome = report.outcomes[0]
    assert outcome.outcome is Outcome.STORED and outcome.bytes_stored <= outcome.bytes_in, outcome
    source = read(_data("image_dfl.dcm"))
    for syntax in ("explicit-le", "original"):
        got = retrieve_study(archive, str(source.StudyInstanceUID), tmp_path / syntax, transfer_syntax=syntax)
        out = read(got.files[0].path)
        assert np.array_equal(stored_values(out), stored_values(source))
        assert not header_differences(source, out)
    assert _outcomes(archive, _folder(tmp_path, "again", "image_dfl.dcm")) == [Outcome.DUPLICATE]


@pytest.mark.parametrize("name", ["color-pl.dcm", "SC_rgb_16bit_2frame.dcm", "SC_ybr_full_uncompressed.dcm"])
def test_colour_output_is_interleaved_and_names_its_colour_transform(sqlite_archive: Archive, tmp_path: Path,
                                                                     name: str) -> None:
    """PS3.5 8.2.3-8.2.4: PlanarConfiguration 0 in JPEG-LS and JPEG 2000; YBR_RCT exactly when MCT was used."""
    archive = sqlite_archive
    ingest_paths(archive, [_folder(tmp_path, "in", name)])
    source = read(_data(name))
    for syntax in ("jpegls", "jpeg2000"):
        got = retrieve_study(archive, str(source.StudyInstanceUID), tmp_path / syntax, transfer_syntax=syntax)
        data = got.files[0].path.read_bytes()
        out = pydicom.dcmread(io.BytesIO(data))
        assert out.file_meta.TransferSyntaxUID.is_compressed and out.PlanarConfiguration == 0
        assert np.array_equal(stored_values(out), stored_values(source)), syntax
        if syntax == "jpeg2000":
            frames = list(generate_frames(out.PixelData, number_of_frames=int(out.get("NumberOfFrames") or 1)))
            mct = all(j2k_uses_mct(f) for f in frames)
            assert mct == (source.PhotometricInterpretation == "RGB")
            assert out.PhotometricInterpretation == ("YBR_RCT" if mct else source.PhotometricInterpretation)


def test_bit_exact_coverage(sqlite_archive: Archive, tmp_path: Path) -> None:
    """What the README promises: bits above BitsStored survive native output; YBR_ICT passes through as received."""
    archive = sqlite_archive
    folder = tmp_path / "in"
    folder.mkdir()
    ds = read(_data("CT_small.dcm"))  # 16 bits allocated: keep 12, set bit 14 in every other pixel
    values = ds.pixel_array.astype(np.uint16) & 0x0FFF
    values[::2] |= 0x4000
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.PixelData = values.tobytes()
    ds.save_as(folder / "high-bits.dcm", enforce_file_format=True)
    shutil.copyfile(_data("US1_J2KI.dcm"), folder / "ybr-ict.dcm")
    report = ingest_paths(archive, [folder])
    assert [o.outcome for o in report.outcomes] == [Outcome.STORED, Outcome.STORED]
    got = retrieve_study(archive, str(ds.StudyInstanceUID), tmp_path / "native")
    assert read(got.files[0].path).PixelData == ds.PixelData
    ict = read(_data("US1_J2KI.dcm"))
    got = retrieve_study(archive, str(ict.StudyInstanceUID), tmp_path / "ict", transfer_syntax="original")
    out = read(got.files[0].path)
    assert out.PhotometricInterpretation == "YBR_ICT" and out.file_meta.TransferSyntaxUID == ict.file_meta.TransferSyntaxUID
    assert list(generate_frames(out.PixelData, number_of_frames=1)) == list(generate_frames(ict.PixelData,
                                                                                            number_of_frames=1))
