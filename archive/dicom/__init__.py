"""DICOM input and output: classify and read files, pixels frame by frame, rebuild Part 10 files."""

from archive.dicom.reader import ParsedInstance, PixelLayout, read_instance
from archive.dicom.uids import safe_component

__all__ = ["ParsedInstance", "PixelLayout", "read_instance", "safe_component"]
