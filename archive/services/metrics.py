"""Reconstruction error, accumulated frame by frame over an instance."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class ErrorStats:
    """MSE, PSNR (peak 2**BitsStored - 1, and peak = value range) and max absolute error.

    Both PSNRs are kept: CT often declares 16 stored bits but spans ~13, so
    the nominal-peak PSNR reads ~20 dB higher than the range-based one.
    """

    peak: float
    squared_error: float = 0.0
    count: int = 0
    max_abs: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def add(self, original: np.ndarray, decoded: np.ndarray, *, exact: bool | None = None) -> None:
        """Accumulate one frame; ``exact`` spares a second comparison when the caller already made it."""
        self.count += original.size
        if original.size:
            self.low = min(self.low, float(original.min()))
            self.high = max(self.high, float(original.max()))
        if exact if exact is not None else np.array_equal(original, decoded):
            return
        diff = decoded.astype(np.float64) - original.astype(np.float64)
        self.squared_error += float(np.square(diff).sum())
        self.max_abs = max(self.max_abs, float(np.abs(diff).max()))

    @property
    def mse(self) -> float:
        return self.squared_error / self.count if self.count else 0.0

    @property
    def max_abs_error(self) -> float:
        return self.max_abs

    @property
    def psnr(self) -> float | None:
        """None when the reconstruction is exact (PSNR is infinite)."""
        return 10 * math.log10(self.peak**2 / self.mse) if self.mse > 0 else None

    @property
    def psnr_range(self) -> float | None:
        span = self.high - self.low
        return 10 * math.log10(span**2 / self.mse) if self.mse > 0 and span > 0 else None
