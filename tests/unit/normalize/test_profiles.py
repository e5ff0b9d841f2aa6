"""Normalization profiles: the shipped set, TOML tables, first match wins, the switch."""

from __future__ import annotations

from pathlib import Path

import pytest

from archive.config import Settings
from archive.errors import ConfigError
from archive.normalize.grid import Fit, Interpolation
from archive.normalize.profiles import DEFAULT_PROFILES, SeriesFacts, choose_profile, parse_profiles


def _settings(tmp_path: Path, toml: str = "", **environ: str) -> Settings:
    (tmp_path / "medarchive.toml").write_text(toml)
    return Settings.load(environ={"MEDARCHIVE_HOME": str(tmp_path), **environ})


def test_shipped_profiles_ct_on_mr_and_projection_off_mammography_kept() -> None:
    by_name = {p.name: p for p in DEFAULT_PROFILES}
    ct = by_name["ct"]
    assert ct.enabled and (ct.rows, ct.columns) == (512, 512) and ct.spacing_mm == 0.9765625
    assert ct.fit is Fit.PAD_CROP and not ct.allow_upsample
    assert not by_name["mr"].enabled and (by_name["mr"].rows, by_name["mr"].spacing_mm) == (256, 1.0)
    assert not by_name["projection"].enabled and by_name["projection"].fit is Fit.SCALE
    assert choose_profile(DEFAULT_PROFILES, SeriesFacts(modality="CT")) is ct
    assert choose_profile(DEFAULT_PROFILES, SeriesFacts(modality="MR")) is None  # off until enabled
    assert choose_profile(DEFAULT_PROFILES, SeriesFacts(modality="MG")) is None  # kept as acquired
    assert not any(p.allow_upsample for p in DEFAULT_PROFILES)


def test_file_profiles_come_first_and_change_shipped_ones_by_name(tmp_path: Path) -> None:
    settings = _settings(tmp_path, """
[normalize.mr]
enabled = true
[normalize.research]
modalities = ["MR"]
body_parts = ["BRAIN"]
manufacturers = ["SIEMENS"]
sources = ["/incoming/research/*", "ae:RESEARCH"]
rows = 192
columns = 192
spacing_mm = 1.2
slice_spacing_mm = 1.2
enlarge = "lanczos"
allow_upsample = true
codec = "jpegxl"
""")
    names = [p.name for p in settings.normalize_profiles]
    assert names == ["mr", "research", "mammography", "ct", "projection"]
    research = settings.normalize_profiles[1]
    assert research.codec == {"id": "jpegxl"} and research.enlarge is Interpolation.LANCZOS
    brain = SeriesFacts(modality="MR", body_part="brain", manufacturer="Siemens Healthineers",
                        sources=("ae:RESEARCH",))
    # first match wins: the shipped mr profile, now on, is listed first in the file
    assert choose_profile(settings.normalize_profiles, brain).name == "mr"  # type: ignore[union-attr]
    assert research.matches(brain)
    assert not research.matches(SeriesFacts(modality="MR", body_part="BRAIN", manufacturer="GE",
                                            sources=("ae:RESEARCH",)))
    assert research.matches(SeriesFacts(modality="MR", body_part="BRAIN", manufacturer="SIEMENS",
                                        sources=("/incoming/research/2026/x",)))
    assert not research.matches(SeriesFacts(modality="MR", body_part="BRAIN", manufacturer="SIEMENS",
                                            sources=("/incoming/clinical",)))
    assert research.interpolation_for(shrinking=False, label_map=False) is Interpolation.LANCZOS
    assert research.interpolation_for(shrinking=True, label_map=False) is Interpolation.AREA
    assert research.interpolation_for(shrinking=True, label_map=True) is Interpolation.NEAREST


def test_the_switch_and_bad_tables(tmp_path: Path) -> None:
    assert _settings(tmp_path).normalize
    assert not _settings(tmp_path, MEDARCHIVE_NORMALIZE="off").normalize
    assert not _settings(tmp_path, "[normalize]\nenabled = false\n").normalize
    assert _settings(tmp_path, "[normalize]\nenabled = false\n", MEDARCHIVE_NORMALIZE="on").normalize
    with pytest.raises(ConfigError, match="MEDARCHIVE_NORMALIZE must be on or off"):
        _settings(tmp_path, MEDARCHIVE_NORMALIZE="maybe")
    with pytest.raises(ConfigError, match="unknown key 'spacing'; did you mean spacing_mm"):
        _settings(tmp_path, "[normalize.ct]\nspacing = 1.0\n")
    with pytest.raises(ConfigError, match="fit = \"pad-crop\" needs spacing_mm"):
        parse_profiles({"x": {"modalities": ["CT"]}})
    with pytest.raises(ConfigError, match="rows must be an integer"):
        parse_profiles({"x": {"rows": 0, "spacing_mm": 1}})
    with pytest.raises(ConfigError, match="'lanczoz' is not a valid Interpolation"):
        parse_profiles({"x": {"spacing_mm": 1, "interpolation": "lanczoz"}})


def test_params_decide_the_output_and_leave_selectors_out() -> None:
    ct = next(p for p in DEFAULT_PROFILES if p.name == "ct")
    params = ct.params()
    assert params["rows"] == 512 and params["fit"] == "pad-crop" and "modalities" not in params
    assert "enabled" not in params and "name" not in params
