"""WADO-RS building blocks: which stored JPEG-LS frames go out as they are, the Part 10 assembly, Accept parsing."""

from __future__ import annotations

import io
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.pixels.utils import pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from archive.codecs import get_codec
from archive.dicom.reader import PixelLayout
from archive.dicom.writer import serialize_header
from archive.errors import NotAcceptableError
from archive.kinds import StorageMode
from archive.services.wado import (
    ANY_SYNTAX,
    DEFAULT_SYNTAX,
    PlannedInstance,
    RetrievalPlan,
    assemble,
    choose_syntax,
    encapsulated_pixels,
    jpegls_precision,
    native_pixels,
    parse_accept,
    stored_jpegls,
)


def _dataset(pixels: np.ndarray, bits_stored: int, *, trailing: bool = False) -> FileDataset:
    ds = FileDataset("wado.dcm", Dataset(), file_meta=FileMetaDataset(), preamble=b"\x00" * 128)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "TEST^WADO"
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence.is_undefined_length = True
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if trailing:
        ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 4)  # Data Set Trailing Padding: after Pixel Data
    return ds


def _layout(pixels: np.ndarray, bits_stored: int) -> PixelLayout:
    return PixelLayout(rows=pixels.shape[0], columns=pixels.shape[1], samples_per_pixel=1, number_of_frames=1,
                       bits_allocated=16, bits_stored=bits_stored, high_bit=bits_stored - 1,
                       pixel_representation=1 if pixels.dtype.kind == "i" else 0,
                       photometric_interpretation="MONOCHROME2", planar_configuration=None, dtype=pixels.dtype.str,
                       output_photometric="MONOCHROME2")


def _frame(high: int, dtype: str = "<u2", low: int = 0) -> np.ndarray:
    rng = np.random.default_rng(7)
    frame = rng.integers(low, high + 1, (64, 48)).astype(dtype)
    frame[0, 0], frame[0, 1] = low, high
    return frame


def _read(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data))


def test_unsigned_frame_with_p_below_bits_stored_is_sent_as_stored_and_decodes_everywhere(tmp_path: Path) -> None:
    """P = 10 for 12 stored bits: pydicom (pyjpegls and pylibjpeg) and dcmtk give the values back."""
    frame = _frame(1000)
    container = get_codec({"id": "jpegls"}).encode(frame)
    fragment = stored_jpegls(container, _layout(frame, 12))
    assert fragment is not None and jpegls_precision(fragment) == 10
    header = serialize_header(_dataset(frame, 12, trailing=True)).part10
    data = assemble(header, JPEGLSLossless, encapsulated_pixels([fragment]))
    assert data is not None
    ds = _read(data)
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert list(ds.keys())[-1] == 0xFFFCFFFC  # Pixel Data went before the trailing element
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    for plugin in ("pyjpegls", "pylibjpeg"):
        assert np.array_equal(pixel_array(ds, decoding_plugin=plugin, raw=True), frame), plugin
    if shutil.which("dcmdjpls") is None:
        pytest.skip("dcmtk's dcmdjpls is not installed")
    (tmp_path / "in.dcm").write_bytes(data)
    subprocess.run(["dcmdjpls", str(tmp_path / "in.dcm"), str(tmp_path / "out.dcm")], check=True,
                   capture_output=True)
    assert np.array_equal(pydicom.dcmread(tmp_path / "out.dcm").pixel_array, frame)


@pytest.mark.parametrize("frame, bits_stored", [
    (_frame(3000, "<i2"), 16),  # signed, zero minimum: pydicom would sign-extend at P = 12
    (_frame(1200, low=200), 12),  # offset-mapped
    (_frame(200), 12),  # narrowed to 8 bits
    (_frame(8000), 12),  # values above Bits Stored: P > Bits Stored
], ids=["signed", "offset", "narrowed", "over-bits-stored"])
def test_frames_that_are_transcoded(frame: np.ndarray, bits_stored: int) -> None:
    container = get_codec({"id": "jpegls"}).encode(frame)
    assert stored_jpegls(container, _layout(frame, bits_stored)) is None


def test_explicit_le_assembly_equals_the_dataset() -> None:
    frame = _frame(4000)
    source = _dataset(frame, 12, trailing=True)
    header = serialize_header(source).part10
    data = assemble(header, ExplicitVRLittleEndian, native_pixels(frame.tobytes(), 16))
    assert data is not None
    ds = _read(data)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.ImplementationVersionName == "MEDARCHIVE_01"
    assert ds.PatientName == "TEST^WADO" and list(ds.keys())[-1] == 0xFFFCFFFC
    assert np.array_equal(ds.pixel_array, frame)


def test_accept_parsing_orders_by_quality_and_keeps_quoted_commas() -> None:
    ranges = parse_accept('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.80;q=0.4,'
                          ' multipart/related; type="application/dicom"; transfer-syntax=*, text/html;q=0')
    assert [r.params.get("transfer-syntax") for r in ranges] == ["*", "1.2.840.10008.1.2.4.80"]


def test_choose_syntax() -> None:
    plan = RetrievalPlan("1.2.3", [PlannedInstance(1, "1.2.3.4", "1.2.3.5", StorageMode.PIXELS,
                                                   "1.2.840.10008.1.2.1", 1)])
    dicom = 'multipart/related; type="application/dicom"'
    assert choose_syntax(None, plan) == DEFAULT_SYNTAX
    assert choose_syntax("*/*", plan) == DEFAULT_SYNTAX
    assert choose_syntax(f"{dicom}; transfer-syntax=*", plan) == ANY_SYNTAX
    assert choose_syntax(f"{dicom}; transfer-syntax=1.2.840.10008.1.2.4.50, {dicom}; transfer-syntax="
                         f"1.2.840.10008.1.2.4.90;q=0.9", plan) == "1.2.840.10008.1.2.4.90"
    for refused in (f"{dicom}; transfer-syntax=1.2.840.10008.1.2.4.50", "image/png",
                    'multipart/related; type="application/octet-stream"'):
        with pytest.raises(NotAcceptableError):
            choose_syntax(refused, plan)
