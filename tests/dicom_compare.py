"""Independent oracles for tests: pixels and headers read straight with pydicom."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array


def read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True)


def stored_values(ds: Dataset) -> np.ndarray:
    """Pixel values as stored: no colour conversion, no masking of bits above BitsStored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "TransferSyntaxUID" not in ds.file_meta:
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (
                pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
            )
        if "PhotometricInterpretation" not in ds:  # old ACR-NEMA files
            ds.PhotometricInterpretation = "MONOCHROME2"
        if "SamplesPerPixel" not in ds:
            ds.SamplesPerPixel = 1
        return pixel_array(ds, raw=True, correct_unused_bits=False)


def header_differences(original: Dataset, retrieved: Dataset, ignore: set[str] = frozenset()) -> list[str]:
    """Elements (outside group 0002 and Pixel Data) whose value differs or that are missing.

    Group lengths (gggg,0000) are left out: retired since 2008, their value
    depends on the encoding, and pydicom drops them when it writes.
    """
    differences = []
    for elem in original:
        if elem.tag.group == 0x0002 or elem.tag == 0x7FE00010 or elem.tag.element == 0 or elem.keyword in ignore:
            continue
        if elem.tag not in retrieved:
            differences.append(f"{elem.tag} {elem.keyword} missing")
            continue
        if not _same(elem.value, retrieved[elem.tag].value):
            differences.append(f"{elem.tag} {elem.keyword}: {str(elem.value)[:60]!r} != {str(retrieved[elem.tag].value)[:60]!r}")
    for elem in retrieved:
        if (elem.tag.group != 0x0002 and elem.tag != 0x7FE00010 and elem.tag.element != 0
                and elem.tag not in original and elem.keyword not in ignore):
            differences.append(f"{elem.tag} {elem.keyword} added")
    return differences


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, pydicom.Sequence) and isinstance(b, pydicom.Sequence):
        return len(a) == len(b) and all(not header_differences(x, y) for x, y in zip(a, b))
    return bool(a == b)
