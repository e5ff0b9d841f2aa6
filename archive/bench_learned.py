"""The learned part of ``medarchive bench rd``: ``learned`` and ``gan`` next to their anchors, on the validation split.

The learned codecs were trained on part of the shared data, so they are measured only on the
*validation* side of the fixed split (:func:`archive.learned.data.split_images`): figures on
training images would flatter them. One run measures, per modality and on the same images:

* ``learned`` at N = 0, 1, 2, 4 (max |error| <= N checked on every image) with JPEG-LS at the same
  N (N = 0: lossless; per image the smaller of CharLS and pyjpegls at the real bit depth) and
  JPEG-XL effort 7 lossless (bare codestream, signed values offset to unsigned) -- the issue's
  anchors for a predictive codec;
* ``gan`` at beta = 0 and beta = 1 at target rates, each with JPEG 2000 9/7 at *equal* bits per
  pixel: per image, the highest OpenJPEG PSNR target whose codestream fits the bytes the gan
  spent (frame container included), so the PSNR gap is read at the same rate.

Encoding is single-threaded (threadpoolctl, and torch's intra-op pool at one thread); decoding runs
in the fresh process of :mod:`archive.bench_rd_decode` with one thread. The goals are the issue's,
computed from the rows of the same run.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import imagecodecs
from rich import box
from rich.console import Console
from rich.table import Table
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped, unused-ignore]

from archive.bench_rd import (
    MODALITIES,
    SKIPPED_DIRS,
    Encoded,
    RdImage,
    RowSpec,
    Unavailable,
    _codec,
    _decode_fresh,
    _f,
    _mean,
    _spread,
    _timed,
    _write_manifest,
    encode_j2k,
    encode_row,
    load_images,
    summarise,
)
from archive.bench_rd_decode import decode_manifest
from archive.codecs._pixels import offset_to_unsigned
from archive.errors import ArchiveError
from archive.learned.data import RULE, split_images

GOAL_DECODE_MS: Final[float] = 250.0  # learned decode, ms per 512² slice on one core, below
AIM_LOSSLESS: Final[float] = 0.95  # learned N=0 bpp / JPEG-XL e7 bpp: the aim (-5 %)
AIM_NEAR: Final[float] = 0.90  # learned N=2 bpp / JPEG-LS N=2 bpp: the aim (-10 %)
GAN_AIM_BELOW: Final[float] = 0.1  # the gan (beta 0) aims to beat JPEG 2000 at targets up to this rate
JXL_EFFORT: Final[int] = 7
NOTES: Final[tuple[str, ...]] = (
    f"validation split only (archive/learned/data.py): {RULE}",
    ("learned: bpp from the frame container; JPEG-LS at the same N (N 0: lossless) per image the smaller of "
     "CharLS and pyjpegls at the real bit depth; JPEG-XL effort 7 lossless as a bare codestream (offset to "
     "unsigned); anchor rows carry no container"),
    ("gan: bpp from the real frame container (its rate control counts the container's 56 bytes too, so a "
     "64² frame cannot go below 0.11 bpp); fit = images whose real bytes are within the target; JPEG 2000 9/7 at equal bpp = per image the highest OpenJPEG PSNR "
     "target whose bare codestream fits the gan's bytes (fit = images where one does: on tiny MR frames the "
     "J2K headers alone can exceed the budget, and the lowest target is kept)"),
    "gap = mean PSNR(gan) - mean PSNR(JPEG 2000 at equal bpp), dB (peak 2^BitsStored - 1; the peak cancels)",
    ("encoding single-threaded (threadpoolctl + torch.set_num_threads(1)); decoding in a fresh process, one "
     "thread, the first decode of a learned/gan row untimed (a worker keeps its model loaded); ms per 512² = "
     "total ms x 512² / total pixels, so on MR (64²-256² frames) fixed per-frame costs weigh 4-64 times more"),
)


@dataclass(frozen=True)
class LearnedGrid:
    """What the learned part measures; ``slices`` caps validation images per modality (spread evenly)."""

    bounds: tuple[int, ...] = (0, 1, 2, 4)
    gan_rates: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5)
    gan_betas: tuple[int, ...] = (0, 1)
    slices: int | None = None


# ------------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class LearnedRow:
    """A row spec and, for JPEG 2000 at equal bpp, the index of the gan row whose bytes set its budget."""

    spec: RowSpec
    paired: int | None = None


def learned_specs(grid: LearnedGrid, modality: str) -> list[LearnedRow]:
    """learned at each N with its anchors beside it, then gan at each beta and rate with JPEG 2000 beside it."""
    rows: list[LearnedRow] = []
    for n in grid.bounds:
        rows.append(LearnedRow(RowSpec("learned", "learned", f"N {n}", "ours", {"id": "learned", "max_error": n},
                                       bound=n)))
        method = "JPEG-LS lossless" if n == 0 else "JPEG-LS near-lossless"
        rows.append(LearnedRow(RowSpec("JPEG-LS", method, f"N {n}", "jls-near", bound=n, anchor=True)))
        if n == 0:
            rows.append(LearnedRow(RowSpec("JPEG-XL e7", f"JPEG-XL e{JXL_EFFORT} lossless", "N 0", "jxl", bound=0,
                                           anchor=True)))
    for beta in grid.gan_betas:
        for rate in grid.gan_rates:
            rows.append(LearnedRow(RowSpec(f"gan β={beta}", f"gan beta {beta}", f"{rate:g} bpp", "ours",
                                           {"id": "gan", "bpp": rate, "beta": beta, "modality": modality},
                                           target=rate)))
            rows.append(LearnedRow(RowSpec(f"JPEG 2000 = gan β={beta}", f"JPEG 2000 = gan beta {beta}",
                                           f"{rate:g} bpp", "j2k-equal", target=rate, anchor=True),
                                   paired=len(rows) - 1))
    return rows


def encode_jxl(image: RdImage) -> Encoded:
    """JPEG-XL lossless at effort 7, bare codestream: libjxl takes unsigned samples, so the frame minimum is
    subtracted and ``bitspersample`` is the real bit depth of what is left (as :mod:`archive.codecs.jpegxl`)."""
    mapped, offset, bits = offset_to_unsigned(image.pixels)
    data, ms = _timed(lambda: bytes(imagecodecs.jpegxl_encode(mapped, lossless=True, effort=JXL_EFFORT,
                                                              bitspersample=bits, planar=False, numthreads=1)))
    return Encoded(data, "jxl", ms, offset=offset, actual="libjxl")


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One thread for BLAS/OpenMP (threadpoolctl) and for torch's intra-op pool when torch is loaded."""
    torch: Any = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        if torch is not None:
            torch.set_num_threads(1)
        with threadpool_limits(1):
            yield
    finally:
        if torch is not None and before is not None:
            torch.set_num_threads(before)


def encode_learned_row(row: LearnedRow, images: Sequence[RdImage], done: Mapping[int, list[Encoded]],
                       contexts: dict[str, bytes]) -> list[Encoded]:
    """Every image of one row; JPEG 2000 at equal bpp needs its gan row encoded first (``done``)."""
    spec = row.spec
    if spec.kind == "ours" and spec.config is not None:
        _codec(spec.config)  # imports the codec (and torch) first, so the single-thread limits reach them
    with single_thread():
        if spec.kind == "jxl":
            encode_jxl(images[0])  # warm-up
            return [encode_jxl(image) for image in images]
        if spec.kind == "j2k-equal":
            assert row.paired is not None
            if row.paired not in done:
                raise Unavailable("not available: its gan row was not measured")
            out: list[Encoded] = []
            guess: float | None = None
            for image, gan in zip(images, done[row.paired], strict=True):
                target = 8.0 * len(gan.data) / image.n_pixels
                item = encode_j2k(target, image, guess)
                item.stats["target_bpp"] = target
                item.stats["over_budget"] = len(item.data) > len(gan.data)
                out.append(item)
                guess = float(item.stats["level_db"])
            return out
        return encode_row(spec, images, contexts)


# ------------------------------------------------------------------------------------------------- the run


def validation_images(folder: Path, grid: LearnedGrid, loaded: dict[str, list[RdImage]] | None = None,
                      ) -> tuple[dict[str, list[RdImage]], dict[str, int]]:
    """The validation side of the split of every CT and MR frame under ``folder`` (``loaded`` when the caller
    already read them all), ``grid.slices`` per modality spread evenly; and how many each modality had."""
    images = loaded if loaded is not None else load_images(folder, None, SKIPPED_DIRS)[0]
    validation = split_images(images).validation
    found = {m: len(v) for m, v in validation.items()}
    return {m: _spread(list(v), grid.slices) for m, v in validation.items() if v}, found


def run_learned(folder: Path, out_dir: Path, grid: LearnedGrid, *, fresh_process_decode: bool = True,
                loaded: dict[str, list[RdImage]] | None = None,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the learned rows on the validation images of ``folder``; a JSON-able dict (rows, goals, notes)."""
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    models_before = models_digest()
    groups, found = validation_images(folder, grid, loaded)
    rows: list[dict[str, Any]] = []
    pids: list[int] = []
    for modality in MODALITIES:
        images = groups.get(modality)
        if not images:
            continue
        specs = learned_specs(grid, modality)
        encoded: dict[int, list[Encoded]] = {}
        contexts: dict[str, bytes] = {}
        status: dict[int, str] = {}
        for index, row in enumerate(specs):
            say(f"{modality} (validation): encoding {row.spec.method} {row.spec.parameter} ({len(images)} images)")
            try:
                encoded[index] = encode_learned_row(row, images, encoded, contexts)
            except Unavailable as exc:
                status[index] = str(exc)
            except (ArchiveError, ValueError, RuntimeError) as exc:
                status[index] = f"failed: {type(exc).__name__}: {exc}"
        say(f"{modality} (validation): decoding {len(encoded)} rows in a fresh process")
        manifest = _write_manifest(out_dir / "tmp" / f"learned-{modality}", images, encoded, contexts)
        decoded = _decode_fresh(manifest) if fresh_process_decode else decode_manifest(manifest)
        shutil.rmtree(manifest.parent, ignore_errors=True)
        pids.append(int(decoded["pid"]))
        by_index = {r["index"]: r["items"] for r in decoded["rows"]}
        for index, row in enumerate(specs):
            rows.append(_row(row, modality, images, encoded.get(index), by_index.get(index), status.get(index)))
    _pair_gaps(rows, specs_by_modality={m: learned_specs(grid, m) for m in groups})
    return {
        "split": {"rule": RULE, "validation_found": found,
                  "labels": {m: [im.label for im in ims] for m, ims in groups.items()}},
        "images": {m: {"count": len(ims), "pixels": sum(im.n_pixels for im in ims),
                       "shapes": sorted({f"{im.pixels.shape[0]}x{im.pixels.shape[1]}" for im in ims}),
                       "bits_stored": sorted({im.bits_stored for im in ims})} for m, ims in groups.items()},
        "grid": {"bounds": list(grid.bounds), "gan_rates": list(grid.gan_rates), "gan_betas": list(grid.gan_betas),
                 "slices": grid.slices},
        "trained_on": trained_on_check(rows, groups),
        "models_changed_during_run": models_digest() != models_before,
        "decode": {"fresh_process": fresh_process_decode, "pids": pids},
        "rows": rows,
        "goals": evaluate_learned_goals(rows, grid),
        "notes": [*NOTES, "images: every validation image" if grid.slices is None else
                  f"images: at most {grid.slices} validation images per modality, spread evenly"],
        "seconds": time.perf_counter() - started,
    }


def _row(row: LearnedRow, modality: str, images: Sequence[RdImage], encoded: list[Encoded] | None,
         decoded: Sequence[Mapping[str, Any]] | None, status: str | None) -> dict[str, Any]:
    spec = row.spec
    if encoded is None or decoded is None:
        out: dict[str, Any] = {"family": spec.family, "method": spec.method, "parameter": spec.parameter,
                               "anchor": spec.anchor, "config": dict(spec.config) if spec.config else None,
                               "bound": spec.bound, "status": status or "not measured"}
    else:
        out = summarise(spec, images, encoded, decoded)
        models = sorted({str(e.stats.get("model", e.stats.get("bundle"))) for e in encoded
                         if "model" in e.stats or "bundle" in e.stats})
        if models:
            out["models"] = models
        if spec.kind == "ours" and spec.target is not None:  # gan: images whose real bytes fit the target
            out["fit_images"] = sum(1 for e, im in zip(encoded, images, strict=True)
                                    if 8.0 * len(e.data) / im.n_pixels <= spec.target)
        if spec.kind == "j2k-equal":
            out["over_budget"] = sum(1 for e in encoded if e.stats.get("over_budget"))
            out["fit_images"] = len(encoded) - out["over_budget"]
            out["target_bpp"] = _mean(float(e.stats["target_bpp"]) for e in encoded)
    out["modality"] = modality
    out["target"] = spec.target
    return out


def _pair_gaps(rows: list[dict[str, Any]], specs_by_modality: Mapping[str, Sequence[LearnedRow]]) -> None:
    """Write on each gan row the PSNR of JPEG 2000 at its bpp and the gap (dB)."""
    for modality, specs in specs_by_modality.items():
        mine = [r for r in rows if r["modality"] == modality]
        for row, spec in zip(mine, specs, strict=True):
            if spec.paired is None:
                continue
            gan, j2k = mine[spec.paired], row
            ok = gan["status"] == "ok" and j2k["status"] == "ok"
            gan["j2k_bpp"] = j2k.get("bpp") if ok else None
            gan["j2k_psnr"] = j2k.get("psnr") if ok else None
            gan["psnr_gap_db"] = (gan["psnr"] - j2k["psnr"] if ok and gan.get("psnr") is not None
                                  and j2k.get("psnr") is not None else None)


def models_digest() -> str:
    """sha256 over the model code (archive/learned/*.py) and the shipped bundles' files: a model retrained or
    rewritten between encoding and the decoding process shows as decode failures, and is flagged instead of
    misread (``codec_sources_digest`` covers archive/codecs)."""
    import hashlib

    from archive.learned.bundle import MODELS_DIR

    digest = hashlib.sha256()
    paths = [*MODELS_DIR.parent.glob("*.py"), *MODELS_DIR.glob("*/*.json"), *MODELS_DIR.glob("*/*.safetensors")]
    for path in sorted(paths):
        digest.update(str(path.relative_to(MODELS_DIR.parent)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def trained_on_check(rows: Sequence[Mapping[str, Any]], groups: Mapping[str, Sequence[RdImage]]
                     ) -> dict[str, Any]:
    """Which measured images a model's manifest lists as *training* images (should be none): the manifests
    name the validation labels, so an image measured here and not among them is flagged."""
    from archive.learned.bundle import load_bundle

    labels = {im.label for ims in groups.values() for im in ims}
    out: dict[str, Any] = {}
    for model in sorted({m for r in rows for m in r.get("models", [])}):
        try:
            listed = _find_key(load_bundle(model).manifest, "validation_labels")
        except ArchiveError as exc:
            out[model] = f"manifest not readable: {exc}"
            continue
        if listed is None:
            out[model] = "manifest lists no validation labels"
            continue
        outside = sorted(labels - set(listed))
        out[model] = {"measured_not_in_manifest_validation": outside[:10], "count": len(outside)}
    return out


def _find_key(value: Any, key: str) -> list[str] | None:
    if isinstance(value, Mapping):
        if isinstance(value.get(key), list):
            return [str(v) for v in value[key]]
        for item in value.values():
            found = _find_key(item, key)
            if found is not None:
                return found
    return None


def evaluate_learned_goals(rows: Sequence[Mapping[str, Any]], grid: LearnedGrid) -> list[dict[str, Any]]:
    """The issue's goals per modality, from the rows: ratios to the anchors, decode time, the PSNR gaps."""
    goals: list[dict[str, Any]] = []
    # a row with a decode failure has no rate to compare (its failure shows in the max-error goal)
    by_key = {(r["modality"], r["method"], r["parameter"]): r for r in rows
              if r["status"] == "ok" and not r.get("decode_error_count")}

    def ratio(modality: str, ours: tuple[str, str], anchor: tuple[str, str]) -> float | None:
        a, b = by_key.get((modality, *ours)), by_key.get((modality, *anchor))
        if not a or not b or a.get("bpp") is None or not b.get("bpp"):
            return None
        return float(a["bpp"]) / float(b["bpp"])

    for modality in sorted({r["modality"] for r in rows}):
        for n, anchor, aim in ((0, (f"JPEG-XL e{JXL_EFFORT} lossless", "N 0"), AIM_LOSSLESS),
                               (0, ("JPEG-LS lossless", "N 0"), None),
                               (2, ("JPEG-LS near-lossless", "N 2"), AIM_NEAR)):
            if n not in grid.bounds:
                continue
            value = ratio(modality, ("learned", f"N {n}"), anchor)
            goals.append({"modality": modality, "goal": f"learned N={n} bpp / {anchor[0]}"
                          + (f" < 1 (aim <= {aim:.2f})" if aim else " (reported)"),
                          "value": value, "by": "learned",
                          "passed": None if value is None or aim is None else value < 1.0,
                          "aim_met": None if value is None or aim is None else value <= aim})
        learned = [r for r in rows if r["modality"] == modality and r["method"] == "learned" and r["status"] == "ok"]
        slowest = max((r["decode_ms_per_slice"] for r in learned if r.get("decode_ms_per_slice") is not None),
                      default=None)
        goals.append({"modality": modality, "goal": f"learned decode < {GOAL_DECODE_MS:g} ms/512² (slowest N)",
                      "value": slowest, "by": "learned",
                      "passed": None if slowest is None else slowest < GOAL_DECODE_MS, "aim_met": None})
        bounded = [r for r in rows if r["modality"] == modality and r.get("bound") is not None and r["status"] == "ok"]
        goals.append({"modality": modality, "goal": "every image decodes, max error <= N (learned, JPEG-LS, JPEG-XL)",
                      "value": sum(1 for r in bounded if not r.get("bound_held")), "by": "rows failing",
                      "passed": all(r.get("bound_held") for r in bounded) if bounded else None, "aim_met": None})
        if 0 in grid.gan_betas:
            for rate in grid.gan_rates:
                gan = by_key.get((modality, "gan beta 0", f"{rate:g} bpp"))
                gap = gan.get("psnr_gap_db") if gan else None
                achieved = gan.get("bpp") if gan else None
                aimed = rate <= GAN_AIM_BELOW  # the aim counts only where the real rate is below 0.1 bpp too
                goals.append({"modality": modality,
                              "goal": f"gan beta 0 at {rate:g} bpp: PSNR gap to JPEG 2000 at equal bpp (dB)"
                              + (f" > 0 at a real rate <= {GAN_AIM_BELOW:g} bpp (aim)" if aimed else " (reported)"),
                              "value": gap, "by": "gan beta 0", "passed": None, "gan_bpp": achieved,
                              "aim_met": None if gap is None or achieved is None or not aimed
                              else gap > 0.0 and achieved <= GAN_AIM_BELOW})
    return goals


# ------------------------------------------------------------------------------------------------- printing


def print_learned(part: Mapping[str, Any], console: Console) -> None:
    """One table per modality (validation images), then the goals and the notes."""
    console.print(f"[bold]Learned codecs[/bold] on the validation split ({part['seconds']:.0f} s); "
                  f"validation images found {part['split']['validation_found']}", highlight=False)
    for modality, facts in part["images"].items():
        console.print(f"{modality} (validation): {facts['count']} images, {', '.join(facts['shapes'])}, "
                      f"BitsStored {facts['bits_stored']}", markup=False)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title=f"{modality} (validation)")
        table.add_column("method", no_wrap=True)
        table.add_column("param", no_wrap=True)
        for column in ("bpp", "PSNR", "range\nPSNR", "max\nerr", "SSIM", "enc ms\n/512²", "dec ms\n/512²",
                       "bound", "gap\ndB", "fit"):
            table.add_column(column, justify="right", no_wrap=True)
        for row in part["rows"]:
            if row["modality"] != modality:
                continue
            method = row["method"] + (" *" if row["anchor"] else "")
            if row["status"] != "ok":
                table.add_row(method, row["parameter"], row["status"][:80])
                continue
            psnr = _f(row["psnr"], 1) if row["exact_images"] < row["images"] else "exact"
            fit = f"{row['fit_images']}/{row['images']}" if "fit_images" in row else ""
            table.add_row(method, row["parameter"], _f(row["bpp"], 3), psnr, _f(row["range_psnr"], 1),
                          _f(row["max_error"]), _f(row["ssim"], 4), _f(row["encode_ms_per_slice"], 1),
                          _f(row["decode_ms_per_slice"], 1), _f(row.get("bound_held")),
                          _f(row.get("psnr_gap_db"), 1) if "psnr_gap_db" in row else "", fit)
        console.print(table)
        for row in part["rows"]:
            if row["modality"] == modality and row["status"] == "ok" and (row["decode_error_count"]
                                                                           or row["crc_mismatches"]):
                console.print(f"  {row['method']} {row['parameter']}: {row['decode_error_count']} decode errors "
                              f"{row['decode_errors']}, {row['crc_mismatches']} CRC mismatches", markup=False)
    if part.get("models_changed_during_run"):
        console.print("[bold red]The model code or the shipped bundles changed during this run: figures of "
                      "learned and gan are not trustworthy, run again.[/bold red]")
    console.print("[bold]Learned goals[/bold]")
    for goal in part["goals"]:
        verdict = {True: "met", False: "NOT met", None: "reported" if goal["value"] is not None
                   else "not measured"}[goal["passed"]]
        aim = {True: "; aim met", False: "; aim NOT met", None: ""}[goal["aim_met"]]
        rate = f" (real rate {goal['gan_bpp']:.3f} bpp)" if goal.get("gan_bpp") is not None else ""
        console.print(f"  {goal['modality']}: {goal['goal']}: {_f(goal['value'], 3)}{rate} -> {verdict}{aim}",
                      markup=False)
    for model, check in part["trained_on"].items():
        console.print(f"  {model}: measured images outside its manifest's validation labels: {check}", markup=False)
    for note in part["notes"]:
        console.print(f"• {note}", markup=False)
