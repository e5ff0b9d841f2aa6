"""Header blobs: the original bytes minus Pixel Data where the encoding allows it, else a pydicom re-serialisation."""

from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.filereader import data_element_generator
from pydicom.uid import ExplicitVRLittleEndian

from archive.dicom.header import header_of, kept_header
from archive.dicom.reader import read_instance
from archive.dicom.writer import serialize_header
from tests.dicom_compare import header_differences

PIXEL_TAG = b"\xe0\x7f\x10\x00"


def _copy(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copyfile(str(get_testdata_file(name)), target)
    return target


def _pixel_span(source: bytes) -> tuple[int, int]:
    """Where the top-level Pixel Data element starts and ends, found by walking the data set after the file meta."""
    meta_end = 144 + int.from_bytes(source[140:144], "little")
    fp = io.BytesIO(source)
    fp.seek(meta_end)
    for elem in data_element_generator(fp, False, True, defer_size=None):
        if elem.tag == 0x7FE00010:
            assert isinstance(elem, RawDataElement)
            return elem.value_tell - 12, fp.tell()  # the generator has read the value (and any delimiter)
    raise AssertionError("no Pixel Data")


def _read(data: bytes) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data), force=True)


def _assert_original_minus_pixels(path: Path) -> bytes:
    source = path.read_bytes()
    parsed = read_instance(path)
    kept = kept_header(parsed)
    assert kept is not None and kept.kept
    assert header_of(parsed) == kept
    start, end = _pixel_span(source)
    assert source[start:start + 4] == PIXEL_TAG
    assert kept.part10 == source[:start] + source[end:]
    assert PIXEL_TAG not in kept.part10
    back, original = _read(kept.part10), _read(source)
    assert 0x7FE00010 not in back
    assert back.file_meta == original.file_meta
    assert not header_differences(original, back)
    assert len(back) == len(original) - 1
    return kept.part10


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm"])
def test_native_explicit_le_header_is_the_original_bytes(name: str, tmp_path: Path) -> None:
    path = _copy(name, tmp_path)
    part10 = _assert_original_minus_pixels(path)
    if name == "MR_small.dcm":
        assert part10[-138:] == path.read_bytes()[-138:], "elements after Pixel Data are kept"
    parsed = read_instance(path)
    kept = kept_header(parsed)
    assert kept is not None
    assert kept.dataset_sha256 == serialize_header(parsed.dataset).dataset_sha256
    assert path.read_bytes() == Path(str(get_testdata_file(name))).read_bytes(), "the source is untouched"


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_encapsulated_header_with_undefined_length_is_kept(name: str, tmp_path: Path) -> None:
    path = _copy(name, tmp_path)
    source = path.read_bytes()
    start, end = _pixel_span(source)
    assert int.from_bytes(source[start + 8:start + 12], "little") == 0xFFFFFFFF, "undefined length Pixel Data"
    assert source[end - 8:end] == b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    part10 = _assert_original_minus_pixels(path)
    assert _read(part10).file_meta.TransferSyntaxUID == _read(source).file_meta.TransferSyntaxUID


@pytest.mark.parametrize("name", [
    "MR_small_implicit.dcm",  # implicit VR little endian
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "image_dfl.dcm",  # deflated
    "ExplVR_LitEndNoMeta.dcm",  # explicit VR little endian, but no preamble or file meta
])
def test_other_encodings_are_reserialised(name: str, tmp_path: Path) -> None:
    path = _copy(name, tmp_path)
    parsed = read_instance(path)
    assert kept_header(parsed) is None
    header = header_of(parsed)
    assert header.kept is False
    assert header == serialize_header(parsed.dataset)
    back, original = _read(header.part10), _read(path.read_bytes())
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert 0x7FE00010 not in back
    assert not header_differences(original, back)
