"""Unit tests of the DIMSE services; :func:`identifier` builds the query/retrieve identifiers they take."""

from __future__ import annotations

from pydicom.dataset import Dataset


def identifier(level: str | None, **keys: object) -> Dataset:
    """A C-FIND/C-GET/C-MOVE identifier: the Query/Retrieve Level (``None``: left out) and the given keys."""
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds
