"""UIDs as data: turning them into file names safely, and minting the ones a file lacks."""

from __future__ import annotations

import hashlib
import re

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

_VALID_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNSAFE = re.compile(r"[^0-9A-Za-z.\-]")


def uid_text(ds: Dataset, keyword: str) -> str | None:
    """The element's value as one string, whatever it holds (``\\`` splits it into a MultiValue)."""
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None:
        return None
    if isinstance(value, MultiValue):
        text = "\\".join(str(v) for v in value)
    elif isinstance(value, bytes):
        text = value.decode("ascii", "replace")
    else:
        text = str(value)
    text = text.rstrip("\x00 ")
    return text or None


def safe_component(uid: str) -> str:
    """A file-name component for ``uid`` that can never leave its folder.

    Valid UIDs are used as they are; anything else is reduced to safe characters
    and suffixed with a hash of the original so that distinct UIDs stay distinct.
    """
    if _VALID_UID.fullmatch(uid) and len(uid) <= 64:
        return uid
    cleaned = _UNSAFE.sub("_", uid).strip(".")[:48] or "uid"
    return f"{cleaned}_{hashlib.sha256(uid.encode('utf-8', 'surrogateescape')).hexdigest()[:12]}"


def derived_uid(*parts: str) -> str:
    """A deterministic UID under the UUID-derived root 2.25 (PS3.5 B.2) from ``parts``."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogateescape")).digest()[:16]
    return "2.25." + str(int.from_bytes(digest, "big"))


def safe_filename(name: str) -> str:
    """A readable file name (extension kept) with nothing but safe characters and no leading dot."""
    return _UNSAFE.sub("_", name).lstrip(".")[:120] or "file"
