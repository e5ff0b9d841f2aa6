"""``medarchive bench rd``: the rate-distortion benchmark on 2 real CT and 2 real MR slices, reduced grid."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from archive.bench_rd import (
    encode_jls_near,
    load_images,
    print_rd_benchmark,
    row_specs,
    run_rd_benchmark,
)
from archive.bench_rd_decode import image_metrics
from archive.codecs import get_codec
from tests.conftest import shared_data

GRID: dict[str, Any] = {"bounds": (2,), "variances": (0.98,), "ks": (64,), "j2k_rates": (1.0,)}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two CT slices (512², signed) and two small MR slices (Philips 96², Siemens 64²)."""
    data = shared_data()
    target = tmp_path_factory.mktemp("rd-data")
    picks = [data / "ct-chest-tcia/A002304/axial/19001231-076.dcm",
             data / "ct-chest-tcia/A002304/coronal/19010112-124.dcm",
             data / "mr-philips-achieva/1301_Dual-echo_iso/033.dcm",
             data / "mr-siemens-prisma/8_gre_fm_siemens_baseline/001_e2_ph.dcm"]
    for index, path in enumerate(picks):
        copy = target / f"{index}-{path.name}"
        shutil.copyfile(path, copy)
        copy.chmod(0o644)
    return target


@pytest.fixture(scope="module")
def result(small_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("rd-out")
    return run_rd_benchmark(small_folder, out_dir=out, **GRID) | {"_out": str(out)}


def _row(result: dict[str, Any], modality: str, method: str, parameter: str) -> dict[str, Any]:
    (row,) = [r for r in result["rows"] if (r["modality"], r["method"], r["parameter"]) == (modality, method, parameter)]
    return row


def test_every_row_of_the_grid_is_there(result: dict[str, Any]) -> None:
    assert result["images"]["CT"]["count"] == 2 and result["images"]["MR"]["count"] == 2
    specs = row_specs(**GRID)
    for modality in ("CT", "MR"):
        got = [(r["method"], r["parameter"]) for r in result["rows"] if r["modality"] == modality]
        assert got == [(s.method, s.parameter) for s in specs]
        for row in result["rows"]:
            if row["modality"] != modality:
                continue
            if row["anchor"]:  # the anchors always run
                assert row["status"] == "ok", row
                assert row["decode_error_count"] == 0 and row["crc_mismatches"] == 0
            else:  # ours: measured, or said not to be available (a codec not registered yet)
                assert row["status"] == "ok" or row["status"].startswith("not available"), row
            if row["status"] == "ok" and row["bound"] is not None:
                assert row["bound_held"] and row["max_error"] <= row["bound"]
            if row["status"] == "ok" and row["family"].startswith("bounded"):  # inner + residual split shown
                assert 0 < row["inner_bpp"] and 0 <= row["residual_bpp"]
                assert row["inner_bpp"] + row["residual_bpp"] <= row["bpp"]
    lossless = [r for r in result["rows"] if r["family"] == "lossless"]
    assert len(lossless) == 10 and all(r["max_error"] == 0 and r["exact_images"] == r["images"] for r in lossless)
    assert {g["goal"].split(" ")[0] for g in result["goals"]} >= {"bounded", "kmeans", "max"}
    assert json.loads((Path(result["_out"]) / "rd.json").read_text())["rows"] == result["rows"]


def test_rates_are_the_stored_bytes(result: dict[str, Any], small_folder: Path) -> None:
    groups, _left_out = load_images(small_folder)
    for modality, images in groups.items():
        jpegls = [8 * len(get_codec({"id": "jpegls"}).encode(im.pixels)) / im.n_pixels for im in images]
        assert _row(result, modality, "jpegls lossless", "-")["bpp"] == pytest.approx(np.mean(jpegls))
        near = [encode_jls_near(2, im) for im in images]
        row = _row(result, modality, "JPEG-LS near-lossless", "N 2")
        assert row["bpp"] == pytest.approx(np.mean([8 * len(e.data) / im.n_pixels for e, im in zip(near, images)]))
        assert 0 < row["max_error"] <= 2
        j2k = _row(result, modality, "JPEG 2000 9/7", "1 bpp")
        assert 0.8 < j2k["bpp"] <= 1.0 and j2k["max_error"] > 0


def test_decoding_ran_in_a_fresh_process(result: dict[str, Any]) -> None:
    pids = result["decode"]["pids"]
    assert result["decode"]["fresh_process"] and len(pids) == 2
    assert os.getpid() not in pids and result["decode"]["parent_pid"] not in pids


def test_plots_are_png_files(result: dict[str, Any]) -> None:
    import matplotlib.image

    out = Path(result["_out"])
    assert set(result["plots"]) == {"rd_psnr.png", "rd_max_error.png", "rd_ssim.png", "wcss_elbow.png"}
    for name in result["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(out / name).shape[0] > 100  # decodes as an image
    assert not (out / "tmp").exists()  # the encoded bytes are removed after the run
    curves = result["wcss_elbow"]
    assert curves and all(np.all(np.diff(c["wcss"]) <= 0) for c in curves)  # WCSS falls as k grows


def test_table_prints(result: dict[str, Any]) -> None:
    console = Console(record=True, width=220)
    print_rd_benchmark(result, console)
    text = console.export_text()
    assert "JPEG-LS near-lossless" in text and "Goals" in text and "rd_psnr.png" in text


def test_metrics_against_known_errors() -> None:
    original = np.arange(64 * 64, dtype=np.int16).reshape(64, 64)
    decoded = original.copy()
    decoded[0, 0] += 3
    metrics = image_metrics(original, decoded, 4095)
    assert metrics["max_error"] == 3 and metrics["mse"] == pytest.approx(9 / 4096)
    assert metrics["psnr"] == pytest.approx(10 * np.log10(4095**2 / (9 / 4096)))
    assert metrics["range_psnr"] == pytest.approx(10 * np.log10(4095**2 / (9 / 4096)))
    assert image_metrics(original, original, 4095) == {"max_error": 0, "mse": 0.0, "psnr": None, "range_psnr": None,
                                                       "ssim": 1.0}
