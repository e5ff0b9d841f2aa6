"""DICOM input and output: classify and read files, pixels frame by frame, rebuild Part 10 files."""

import pydicom.config

from archive.dicom.reader import ParsedInstance, PixelLayout, read_instance
from archive.dicom.uids import safe_component

__all__ = ["ParsedInstance", "PixelLayout", "read_instance", "safe_component"]

# An archive keeps values as received, valid or not: validating them is not its job,
# and pydicom's default would warn once per odd value on every read and write.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
