"""Normalization profiles: which series are normalized, to what grid, how, and stored with which codec.

A profile is a TOML table ``[normalize.NAME]``; the first profile whose
selectors all match a series is the one applied (an empty selector matches
anything). Profiles from the file come first, in file order; a file profile
with a shipped profile's name changes only the keys it sets. Shipped:

- ``mammography`` (on): MG is never resampled: it would smooth away microcalcifications.
- ``ct`` (on): CT to 512 x 512 covering a 500 mm field (0.9765625 mm), centred on the source field's centre.
- ``mr`` (off): MR to 256 x 256 at 1 mm.
- ``projection`` (off): CR / DX scaled to fit 2048 x 2048, aspect kept (Imager Pixel Spacing scaled).

No shipped profile enlarges a series beyond its acquired resolution
(``allow_upsample = false``): such a series is left alone with the reason
recorded. ``MEDARCHIVE_NORMALIZE=off`` (or ``[normalize] enabled = false``)
turns normalization off.

Example::

    [normalize]
    enabled = true
    [normalize.mr]
    enabled = true
    [normalize.research-brain]
    modalities = ["MR"]
    body_parts = ["BRAIN", "HEAD"]
    sources = ["/incoming/research/*", "ae:RESEARCH_SCU"]
    rows = 192
    columns = 192
    spacing_mm = 1.2
    slice_spacing_mm = 1.2
    interpolation = "auto"
    enlarge = "lanczos"
    allow_upsample = true
    codec = { id = "jpegxl" }
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from archive.errors import ConfigError
from archive.normalize.grid import Fit, Interpolation

SEGMENTATION_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
})


@dataclass(frozen=True)
class SeriesFacts:
    """What profiles select on, read once per series."""

    modality: str | None = None
    sop_class_uid: str | None = None
    body_part: str | None = None
    manufacturer: str | None = None
    sources: tuple[str, ...] = ()  # source folders, "ae:CALLING_AE", "token:NAME"


@dataclass(frozen=True)
class NormalizeProfile:
    """One ``[normalize.NAME]`` table; see the module docstring."""

    name: str
    enabled: bool = True
    keep: bool = False  # matching series are never resampled (first match wins, so this protects them)
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    manufacturers: tuple[str, ...] = ()  # case-insensitive prefixes ("SIEMENS" matches "Siemens Healthineers")
    sources: tuple[str, ...] = ()  # glob patterns on the source folder, "ae:NAME", "token:NAME"
    rows: int = 512
    columns: int = 512
    spacing_mm: float | None = None  # in-plane target; None with fit = "scale": the matrix alone decides
    slice_spacing_mm: float | None = None  # resample across slices too (stacks that allow it)
    fit: Fit = Fit.PAD_CROP
    interpolation: Interpolation | None = None  # None ("auto"): area when shrinking, `enlarge` when enlarging,
    #                                             nearest for label maps
    enlarge: Interpolation = Interpolation.CUBIC
    allow_upsample: bool = False
    pad_value: int | None = None  # stored value; None: Pixel Padding Value, else the modality's background
    codec: dict[str, Any] | None = None  # None: the archive's codec (or the ingest's ``--codec``)

    def matches(self, facts: SeriesFacts) -> bool:
        def one_of(value: str | None, wanted: tuple[str, ...]) -> bool:
            return not wanted or (value or "").strip().upper() in {w.upper() for w in wanted}

        if not (one_of(facts.modality, self.modalities) and one_of(facts.body_part, self.body_parts)):
            return False
        if self.sop_classes and facts.sop_class_uid not in self.sop_classes:
            return False
        if self.manufacturers and not any((facts.manufacturer or "").upper().startswith(m.upper())
                                          for m in self.manufacturers):
            return False
        if self.sources and not any(fnmatch.fnmatchcase(source, pattern) or source.startswith(pattern.rstrip("*"))
                                    for source in facts.sources for pattern in self.sources):
            return False
        return True

    def interpolation_for(self, shrinking: bool, label_map: bool) -> Interpolation:
        if self.interpolation is not None:
            return self.interpolation
        if label_map:
            return Interpolation.NEAREST
        return Interpolation.AREA if shrinking else self.enlarge

    def params(self) -> dict[str, Any]:
        """Everything that decides the output (selectors and switches left out): what UIDs are derived from."""
        values = asdict(self)
        for key in ("name", "enabled", "keep", "modalities", "sop_classes", "body_parts", "manufacturers", "sources"):
            values.pop(key)
        values["fit"] = self.fit.value
        values["enlarge"] = self.enlarge.value
        values["interpolation"] = self.interpolation.value if self.interpolation else "auto"
        return values


DEFAULT_PROFILES: tuple[NormalizeProfile, ...] = (
    NormalizeProfile("mammography", modalities=("MG",), keep=True),
    NormalizeProfile("ct", modalities=("CT",), rows=512, columns=512, spacing_mm=500 / 512),
    NormalizeProfile("mr", enabled=False, modalities=("MR",), rows=256, columns=256, spacing_mm=1.0),
    NormalizeProfile("projection", enabled=False, modalities=("CR", "DX"), rows=2048, columns=2048,
                     spacing_mm=None, fit=Fit.SCALE),
)


def choose_profile(profiles: Sequence[NormalizeProfile], facts: SeriesFacts) -> NormalizeProfile | None:
    """The first enabled profile that matches; None when none does or the match says keep."""
    for profile in profiles:
        if profile.enabled and profile.matches(facts):
            return None if profile.keep else profile
    return None


def parse_profiles(table: Mapping[str, Any]) -> tuple[bool | None, tuple[NormalizeProfile, ...]]:
    """The ``[normalize]`` table: (``enabled`` if given, the profiles in order of precedence)."""
    if not isinstance(table, Mapping):
        raise ConfigError("[normalize] must be a table of named profiles")
    enabled = table.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise ConfigError(f"[normalize] enabled must be true or false, not {enabled!r}")
    shipped = {p.name: p for p in DEFAULT_PROFILES}
    known = {f.name for f in fields(NormalizeProfile)} - {"name"}
    chosen: list[NormalizeProfile] = []
    for name, raw in table.items():
        if name == "enabled":
            continue
        if not isinstance(raw, Mapping):
            raise ConfigError(f"normalize profile {name!r} must be a table ([normalize.{name}])")
        for key in raw:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(sorted(known))})"
                raise ConfigError(f"normalize profile {name!r}: unknown key {key!r}{hint}")
        chosen.append(_profile(name, raw, shipped.get(name)))
    given = {p.name for p in chosen}
    return enabled, tuple(chosen) + tuple(p for p in DEFAULT_PROFILES if p.name not in given)


def _profile(name: str, raw: Mapping[str, Any], base: NormalizeProfile | None) -> NormalizeProfile:
    values: dict[str, Any] = dict(raw)
    try:
        for key in ("modalities", "sop_classes", "body_parts", "manufacturers", "sources"):
            if key in values:
                items = values[key]
                values[key] = (str(items),) if isinstance(items, str) else tuple(str(v) for v in items)
        if "fit" in values:
            values["fit"] = Fit(values["fit"])
        if "enlarge" in values:
            values["enlarge"] = Interpolation(values["enlarge"])
        if "interpolation" in values:
            values["interpolation"] = None if values["interpolation"] == "auto" else Interpolation(values["interpolation"])
        if isinstance(values.get("codec"), str):
            values["codec"] = {"id": values["codec"]}
        for key in ("rows", "columns"):
            if key in values and (not isinstance(values[key], int) or not 1 <= values[key] <= 16384):
                raise ValueError(f"{key} must be an integer between 1 and 16384, not {values[key]!r}")
        for key in ("spacing_mm", "slice_spacing_mm"):
            if values.get(key) is not None and not float(values[key]) > 0:
                raise ValueError(f"{key} must be a positive number of millimetres, not {values[key]!r}")
            if values.get(key) is not None:
                values[key] = float(values[key])
    except ValueError as exc:
        raise ConfigError(f"normalize profile {name!r}: {exc}") from exc
    profile = replace(base, **values) if base is not None else NormalizeProfile(name=name, **values)
    if profile.fit is Fit.PAD_CROP and profile.spacing_mm is None:
        raise ConfigError(f"normalize profile {name!r}: fit = \"pad-crop\" needs spacing_mm")
    return profile
