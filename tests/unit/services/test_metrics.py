"""Reconstruction error statistics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np

from archive.services.metrics import ErrorStats


def test_exact_reconstruction() -> None:
    original = np.arange(100, dtype=np.uint16).reshape(10, 10)
    stats = ErrorStats(peak=4095.0)
    stats.add(original, original.copy())
    assert stats.mse == 0.0 and stats.max_abs_error == 0.0
    assert stats.psnr is None and stats.psnr_range is None
    assert stats.count == 100


def test_errors_accumulate_over_frames() -> None:
    a = np.array([[0, 10], [20, 30]], dtype=np.int16)
    b = np.array([[1, 10], [20, 27]], dtype=np.int16)  # errors 1 and -3
    c = np.array([[-5, 5]], dtype=np.int16)
    stats = ErrorStats(peak=255.0)
    stats.add(a, b)
    stats.add(c, c.copy())
    assert stats.count == 6
    assert stats.mse == (1 + 9) / 6
    assert stats.max_abs_error == 3
    assert math.isclose(stats.psnr or 0, 10 * math.log10(255**2 / (10 / 6)))
    assert math.isclose(stats.psnr_range or 0, 10 * math.log10(35**2 / (10 / 6)))  # range -5..30


def test_unsigned_wraparound_is_not_an_error_source() -> None:
    original = np.array([0, 65535], dtype=np.uint16)
    decoded = np.array([65535, 0], dtype=np.uint16)
    stats = ErrorStats(peak=65535.0)
    stats.add(original, decoded)
    assert stats.max_abs_error == 65535
    assert stats.mse == 65535.0**2
