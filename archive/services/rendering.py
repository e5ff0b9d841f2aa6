"""Stored values to an 8-bit picture: rescale, window centre/width, MONOCHROME1 inverted, PNG or JPEG.

One place for it: WADO-RS ``/rendered`` and ``/thumbnail`` and the web page's
viewer (original, reconstruction and difference) all render through here.
"""

from __future__ import annotations

from dataclasses import dataclass

import imagecodecs
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from archive.errors import ArchiveError, NotAcceptableError

PNG = "image/png"
JPEG = "image/jpeg"
MEDIA_TYPES = (PNG, JPEG)


@dataclass(frozen=True)
class Window:
    """A VOI window in modality units (after Rescale Slope/Intercept), as in (0028,1050)/(0028,1051)."""

    center: float
    width: float

    @classmethod
    def parse(cls, text: str) -> Window:
        """PS3.18 ``window=center,width[,function]``; only the linear function is offered."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].lower() not in ("linear", "")):
            raise ArchiveError(f"window must be 'center,width[,linear]', not {text!r}")
        try:
            center, width = float(parts[0]), float(parts[1])
        except ValueError:
            raise ArchiveError(f"window must be two numbers, not {text!r}") from None
        if width <= 0:
            raise ArchiveError(f"window width must be positive, not {width}")
        return cls(center, width)


def modality_values(pixels: np.ndarray, header: Dataset) -> np.ndarray:
    """Stored values through Rescale Slope and Intercept (HU for CT), as float64."""
    slope = float(header.get("RescaleSlope", 1) or 1)
    intercept = float(header.get("RescaleIntercept", 0) or 0)
    return pixels.astype(np.float64) * slope + intercept


def header_window(header: Dataset) -> Window | None:
    """The first window the header declares, if any."""
    center, width = header.get("WindowCenter"), header.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(center[0] if isinstance(center, MultiValue) else center)
        w = float(width[0] if isinstance(width, MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return Window(c, w) if w > 0 else None


def full_range_window(values: np.ndarray) -> Window:
    low, high = float(values.min()), float(values.max())
    return Window((low + high) / 2, max(high - low, 1.0))


def to_display(values: np.ndarray, window: Window, *, invert: bool = False) -> np.ndarray:
    """Modality values to uint8 with the linear VOI function of PS3.3 C.11.2.1.2."""
    c, w = window.center, window.width
    scaled = ((values - (c - 0.5)) / max(w - 1, 1) + 0.5) * 255.0
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return 255 - out if invert else out


def render_frame(pixels: np.ndarray, header: Dataset, *, window: Window | None = None,
                 photometric: str | None = None) -> np.ndarray:
    """One decoded frame as 8-bit grey (or RGB): the request's window, else the header's, else the full range."""
    photometric = photometric or str(header.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3:  # colour: shown as stored, scaled to 8 bits
        if pixels.dtype == np.uint8:
            return pixels
        top = float(pixels.max()) or 1.0
        return np.clip(np.rint(pixels.astype(np.float64) * 255.0 / top), 0, 255).astype(np.uint8)
    values = modality_values(pixels, header)
    chosen = window or header_window(header) or full_range_window(values)
    return to_display(values, chosen, invert=photometric == "MONOCHROME1")


def difference_display(original: np.ndarray, reconstruction: np.ndarray, *, scale: float | None = None
                       ) -> np.ndarray:
    """Signed difference (reconstruction - original) as 8-bit grey: 128 is zero, ``scale`` values reach 0 / 255.

    Without ``scale`` the largest absolute difference is the full swing, so any
    error shows; an exact reconstruction is flat grey.
    """
    if original.shape != reconstruction.shape:
        raise ArchiveError(f"cannot subtract images of shapes {original.shape} and {reconstruction.shape}")
    diff = reconstruction.astype(np.float64) - original.astype(np.float64)
    if diff.ndim == 3:
        diff = diff.mean(axis=2)
    top = scale if scale is not None else float(np.abs(diff).max())
    if top <= 0:
        return np.full(diff.shape, 128, dtype=np.uint8)
    return np.clip(np.rint(128.0 + diff * 127.0 / top), 0, 255).astype(np.uint8)


def fit_viewport(image: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Shrink (never enlarge) by whole-pixel area averaging so the image fits rows x columns."""
    factor = max(1, -(-image.shape[0] // max(rows, 1)), -(-image.shape[1] // max(columns, 1)))
    if factor == 1:
        return image
    h, w = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    cropped = image[:h, :w].astype(np.float64)
    shape = (h // factor, factor, w // factor, factor) + image.shape[2:]
    averaged: np.ndarray = np.rint(cropped.reshape(shape).mean(axis=(1, 3))).astype(np.uint8)
    return averaged


def encode_image(image: np.ndarray, media_type: str = PNG, *, quality: int = 90) -> bytes:
    """An 8-bit grey or RGB image as PNG or JPEG bytes."""
    if media_type == PNG:
        return bytes(imagecodecs.png_encode(np.ascontiguousarray(image)))
    if media_type == JPEG:
        return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(image), level=quality))
    raise NotAcceptableError(f"rendered images are offered as {' or '.join(MEDIA_TYPES)}, not {media_type!r}")
