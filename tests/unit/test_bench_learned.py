"""``medarchive bench rd``'s learned part on real validation images: learned with JPEG-LS and JPEG-XL e7 in the same
run, gan with JPEG 2000 at its bpp, goals from the figures."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pytest
from rich.console import Console

from archive.bench_learned import LearnedGrid, encode_jxl, learned_specs, print_learned
from archive.bench_rd import load_images, run_rd_benchmark
from archive.codecs import get_codec
from archive.learned.data import split_images
from tests.conftest import shared_data

GRID = LearnedGrid(bounds=(0, 2), gan_rates=(0.1,), gan_betas=(0, 1))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: paths kept as in the shared data, so the split rule sees patients and series: one training CT patient and two
#: validation ones (the last two of the three, as of the six), the last three Siemens MR of one series (validation
#: in the full data; here the last of them)
PICKS = ("ct-chest-tcia/A048383/axial/19001231-30.dcm",
         "ct-chest-tcia/A056642/axial/19001229-053.dcm",
         "ct-chest-tcia/A058062/coronal/19001231-052.dcm",
         "mr-siemens-prisma/8_gre_fm_siemens_baseline/038_e2_ph.dcm",
         "mr-siemens-prisma/8_gre_fm_siemens_baseline/039_e2_ph.dcm",
         "mr-siemens-prisma/8_gre_fm_siemens_baseline/040_e2_ph.dcm")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = shared_data()
    target = tmp_path_factory.mktemp("learned-data")
    for relative in PICKS:
        copy = target / relative
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / relative, copy)
        copy.chmod(0o644)
    return target


@pytest.fixture(scope="module")
def result(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("learned-out")
    return run_rd_benchmark(folder, out_dir=out, learned=GRID, lossy=False) | {"_out": str(out)}


def _row(part: dict[str, Any], modality: str, method: str, parameter: str) -> dict[str, Any]:
    (row,) = [r for r in part["rows"] if (r["modality"], r["method"], r["parameter"]) == (modality, method, parameter)]
    return row


def test_only_validation_images_are_measured(result: dict[str, Any], folder: Path) -> None:
    part = result["learned"]
    assert result["rows"] == [] and part["images"]["CT"]["count"] == 2 and part["images"]["MR"]["count"] == 1
    assert not part["models_changed_during_run"]
    labels = [label for ls in part["split"]["labels"].values() for label in ls]
    assert not any("A048383" in label for label in labels)  # the training patient
    assert labels == sorted(i.label for v in split_images(load_images(folder)[0]).validation.values() for i in v)
    for model, check in part["trained_on"].items():  # the shipped manifests list these images as validation
        assert isinstance(check, dict) and check["count"] == 0, (model, check)


def test_learned_rows_hold_the_bound_next_to_their_anchors(result: dict[str, Any], folder: Path) -> None:
    part = result["learned"]
    validation = split_images(load_images(folder)[0]).validation
    for modality in ("CT", "MR"):
        got = [(r["method"], r["parameter"]) for r in part["rows"] if r["modality"] == modality]
        assert got == [(s.spec.method, s.spec.parameter) for s in learned_specs(GRID, modality)]
        for n in GRID.bounds:
            ours = _row(part, modality, "learned", f"N {n}")
            anchor = _row(part, modality, "JPEG-LS lossless" if n == 0 else "JPEG-LS near-lossless", f"N {n}")
            for row in (ours, anchor):
                assert row["status"] == "ok" and row["decode_error_count"] == 0, row
                assert row["bound_held"] and row["max_error"] <= n and row["images"] == len(validation[modality])
            codec = get_codec({"id": "learned", "max_error": n})  # deterministic: the rate is the stored bytes
            rates = [8 * len(codec.encode(im.pixels)) / im.n_pixels for im in validation[modality]]
            assert ours["bpp"] == pytest.approx(np.mean(rates)) and ours["models"]
            assert 0 < ours["decode_ms_per_slice"] and 0 < ours["encode_ms_per_slice"]
        jxl = _row(part, modality, "JPEG-XL e7 lossless", "N 0")
        assert jxl["status"] == "ok" and jxl["max_error"] == 0 and jxl["exact_images"] == jxl["images"]
        assert jxl["bpp"] == pytest.approx(np.mean([8 * len(encode_jxl(im).data) / im.n_pixels
                                                    for im in validation[modality]]))


def test_gan_rows_have_jpeg2000_at_their_rate(result: dict[str, Any]) -> None:
    part = result["learned"]
    for modality in ("CT", "MR"):
        for beta in GRID.gan_betas:
            gan = _row(part, modality, f"gan beta {beta}", "0.1 bpp")
            j2k = _row(part, modality, f"JPEG 2000 = gan beta {beta}", "0.1 bpp")
            assert gan["status"] == "ok" and j2k["status"] == "ok", (gan, j2k)
            assert gan["max_error"] > 0 and gan["psnr"] is not None and gan["decode_error_count"] == 0
            assert j2k["target_bpp"] == pytest.approx(gan["bpp"])  # its budget: the gan's real bytes, per image
            if j2k["over_budget"] == 0:
                assert 0.9 * gan["bpp"] < j2k["bpp"] <= gan["bpp"]
            assert gan["psnr_gap_db"] == pytest.approx(gan["psnr"] - j2k["psnr"])
            assert 0 <= gan["fit_images"] <= gan["images"] and j2k["fit_images"] + j2k["over_budget"] == j2k["images"]
        if modality == "CT":  # 512² slices: a J2K codestream fits a 0.1 bpp budget
            assert _row(part, modality, "JPEG 2000 = gan beta 0", "0.1 bpp")["over_budget"] == 0


def test_goals_come_from_the_rows(result: dict[str, Any]) -> None:
    part = result["learned"]
    for modality in ("CT", "MR"):
        def goal(start: str) -> dict[str, Any]:
            (found,) = [g for g in part["goals"] if g["modality"] == modality and g["goal"].startswith(start)]
            return found

        lossless = goal("learned N=0 bpp / JPEG-XL e7 lossless")
        ratio = (_row(part, modality, "learned", "N 0")["bpp"]
                 / _row(part, modality, "JPEG-XL e7 lossless", "N 0")["bpp"])
        assert lossless["value"] == pytest.approx(ratio) and lossless["passed"] == (ratio < 1)
        assert lossless["aim_met"] == (ratio <= 0.95)
        near = goal("learned N=2 bpp / JPEG-LS near-lossless")
        assert near["value"] == pytest.approx(_row(part, modality, "learned", "N 2")["bpp"]
                                              / _row(part, modality, "JPEG-LS near-lossless", "N 2")["bpp"])
        speed = goal("learned decode < 250 ms/512²")
        assert speed["value"] == max(_row(part, modality, "learned", f"N {n}")["decode_ms_per_slice"]
                                     for n in GRID.bounds)
        gap = goal("gan beta 0 at 0.1 bpp: PSNR gap")
        assert gap["value"] == pytest.approx(_row(part, modality, "gan beta 0", "0.1 bpp")["psnr_gap_db"])
        assert gap["gan_bpp"] == _row(part, modality, "gan beta 0", "0.1 bpp")["bpp"]
        assert gap["aim_met"] == (gap["value"] > 0 and gap["gan_bpp"] <= 0.1)


def test_output_prints_and_plots(result: dict[str, Any]) -> None:
    console = Console(record=True, width=200)
    print_learned(result["learned"], console)
    text = console.export_text()
    assert "JPEG-XL e7 lossless" in text and "Learned goals" in text and "validation" in text
    assert result["plots"] == ["rd_learned.png"]
    assert (Path(result["_out"]) / "rd_learned.png").read_bytes()[:8] == PNG_MAGIC
    assert not (Path(result["_out"]) / "tmp").exists()


def test_jxl_anchor_round_trips_signed_ct() -> None:
    ct = shared_data() / PICKS[1]
    (image,) = load_images(ct.parent)[0]["CT"][:1]
    encoded = encode_jxl(image)
    assert image.pixels.min() < 0 and encoded.offset == int(image.pixels.min())
    decoded = np.add(imagecodecs.jpegxl_decode(encoded.data), encoded.offset, dtype=np.int64)
    assert np.array_equal(decoded, image.pixels)
