"""Normalization: geometry-correct resampling of series to a uniform size and resolution.

Pure computation (no catalog, no store): profiles, grids, resampling plans,
resampling and volume export. :mod:`archive.services.normalization` runs it
on archived series and records what it did.
"""
