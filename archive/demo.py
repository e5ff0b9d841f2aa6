"""A demo inbox from real files: pydicom's bundled test files plus one generated CT series."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def build_demo_inbox(inbox: Path, slices: int = 24) -> Path:
    """Copy pydicom's test files into ``inbox/pydicom`` and write a phantom series to ``inbox/generated``."""
    source_dir = Path(pydicom.data.__file__).parent / "test_files"
    target = inbox / "pydicom"
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() not in (".py", ".gz", ".bz2"):
            shutil.copyfile(path, target / path.name)
    write_phantom_series(inbox / "generated", slices)
    return inbox


def write_phantom_series(folder: Path, slices: int, size: int = 128) -> list[Path]:
    """A CT-like series (signed 16-bit, air/soft tissue/bone) in one new study, built on CT_small's header."""
    folder.mkdir(parents=True, exist_ok=True)
    template_path = get_testdata_file("CT_small.dcm")
    assert template_path is not None
    study_uid, series_uid = generate_uid(), generate_uid()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size - 0.5
    rng = np.random.default_rng(7)
    written = []
    for index in range(slices):
        ds = pydicom.dcmread(template_path)
        z = index / max(slices - 1, 1) - 0.5
        body = (xx**2 / 0.16 + yy**2 / 0.12 + z**2 / 0.5) < 1
        bone = ((xx - 0.12) ** 2 + (yy + 0.05) ** 2) < 0.004 + 0.002 * np.cos(6 * z)
        image = np.full((size, size), -1000.0)
        image[body] = 40 + 30 * np.sin(8 * xx[body] + 5 * z)
        image[bone] = 700
        image += rng.normal(0, 12, image.shape)
        pixels = np.clip(image, -1024, 3071).astype(np.int16)
        ds.Rows = ds.Columns = size
        ds.PixelData = pixels.tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        ds.SeriesNumber = 900
        ds.SeriesDescription = "medarchive demo phantom"
        ds.StudyDescription = "medarchive demo"
        ds.PatientName = "Demo^Phantom"
        ds.PatientID = "DEMO-0001"
        ds.ImagePositionPatient = [0.0, 0.0, float(index * 2.5)]
        ds.SliceLocation = float(index * 2.5)
        path = folder / f"phantom-{index + 1:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
