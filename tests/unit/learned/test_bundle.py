"""Shipped model bundles: checked by digest, manifests complete; a retrain is compared with the shipped figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from archive.errors import CodecError
from archive.learned.bundle import MANIFEST, MODELS_DIR, WEIGHTS, compare_metrics, load_bundle
from archive.learned.data import RULE

SHIPPED = ("learned-v1", "gan-b0-v1", "gan-b1-v1")


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_bundle_is_small_complete_and_checked(name: str) -> None:
    bundle = load_bundle(name)
    manifest = bundle.manifest
    assert {"files", "commit", "command", "data_split", "metrics", "tolerance", "versions"} <= set(manifest)
    assert manifest["command"].startswith("medarchive train ") and manifest["data_split"]["rule"] == RULE
    assert manifest["data_split"]["validation"] == {"CT": 12, "MR": 76}
    assert (MODELS_DIR / name / WEIGHTS).stat().st_size < 3_000_000  # "a few MB" at most
    assert sorted(p.name for p in (MODELS_DIR / name).iterdir()) == [MANIFEST, WEIGHTS]  # no checkpoint shipped


def test_a_bundle_whose_weights_changed_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "learned-copy"
    shutil.copytree(MODELS_DIR / "learned-v1", copy)
    assert load_bundle(str(copy)).weights_sha256 == load_bundle("learned-v1").weights_sha256
    weights = bytearray((copy / WEIGHTS).read_bytes())
    weights[-1] ^= 0x01
    (copy / WEIGHTS).write_bytes(bytes(weights))
    load_bundle.cache_clear()
    with pytest.raises(CodecError, match="does not match its manifest"):
        load_bundle(str(copy))


def test_a_retrain_is_compared_figure_by_figure_within_the_tolerance() -> None:
    shipped = json.loads((MODELS_DIR / "learned-v1" / MANIFEST).read_text())["metrics"]
    retrained = {**shipped, "CT_bpp_n0": shipped["CT_bpp_n0"] * 1.04, "MR_bpp_n2": shipped["MR_bpp_n2"] * 1.08}
    checks = {c.name: c.within for c in compare_metrics(retrained, shipped, 0.05)}
    assert checks["CT_bpp_n0"] and not checks["MR_bpp_n2"] and checks["CT_bpp_n2"]


def test_a_tolerance_table_says_relative_or_in_db_per_figure() -> None:
    shipped = {"per_target": {"CT": {"0.1": {"bpp": 0.0927, "psnr": 58.80}}}}
    retrained = {"per_target": {"CT": {"0.1": {"bpp": 0.1000, "psnr": 58.10}}}}
    checks = {c.name: c for c in compare_metrics(retrained, shipped, {"bpp_relative": 0.15, "psnr_db": 1.0})}
    bpp, psnr = checks["per_target.CT.0.1.bpp"], checks["per_target.CT.0.1.psnr"]
    assert (bpp.tolerance, bpp.absolute, bpp.within) == (0.15, False, True)  # 7.9 % off, 15 % allowed
    assert (psnr.tolerance, psnr.absolute, psnr.within) == (1.0, True, True)  # 0.7 dB off, 1 dB allowed
    worse = {"per_target": {"CT": {"0.1": {"bpp": 0.0927, "psnr": 57.5}}}}
    assert not {c.name: c for c in compare_metrics(worse, shipped, {"psnr_db": 1.0})}["per_target.CT.0.1.psnr"].within
