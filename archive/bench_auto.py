"""``medarchive bench auto``: does the ``"auto"`` trial pick, per series, the codec a full search would pick?

For every series of a folder with at least ``min_instances`` instances that
hold pixels (files grouped by Series Instance UID, instances in Instance
Number order), one run:

* encodes the WHOLE series with every candidate (the frame containers the
  archive would store, plus any context blob), decodes every frame and
  compares bit-exactly: the best single codec for the series is the smallest
  candidate that round-trips;
* runs the auto trial (:func:`archive.codecs.auto.run_trial`) on its sample
  and looks up what the whole series costs with auto's choice;
* reports auto / best (the issue's goal: within 1 % on every series) and the
  trial's time next to the time of encoding the series with auto's choice
  (what the trial adds to ingesting the series).

Times are single-threaded wall clock on a shared machine: compare them within
one run only. "ms / slice" is scaled to a 512² slice (ms × 512² / pixels).
"""

from __future__ import annotations

import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from archive.codecs import Codec, decode_frame, get_codec
from archive.codecs._pixels import Pixels
from archive.codecs.auto import SLICE_PIXELS, AutoCodec
from archive.dicom.reader import iter_frames, peek_uids, read_instance
from archive.errors import ArchiveError
from archive.kinds import StorageMode
from archive.services.discovery import discover

#: The issue's goal: auto's choice within 1 % of the best single codec for the series.
GOAL: Final[float] = 1.01


@dataclass
class _Series:
    uid: str
    description: str
    modality: str
    folder: str
    frames_by_instance: list[list[Pixels]]


def codec_label(config: dict[str, Any]) -> str:
    """'jpegxl effort=7' for {"id": "jpegxl", "effort": 7}."""
    params = " ".join(f"{k}={v}" for k, v in config.items() if k != "id")
    return f"{config['id']} {params}".strip()


def _load_series(folder: Path, min_instances: int, say: Callable[[str], None]) -> tuple[list[_Series], dict[str, int]]:
    """Series with at least ``min_instances`` pixel instances, and counts of what was left out."""
    files, _hidden = discover([folder])
    groups: dict[str, list[Path]] = defaultdict(list)
    skipped = {"files_unreadable": 0, "instances_without_pixels": 0, "series_too_small": 0}
    for path in files:
        uids = peek_uids(path)
        if uids is None:
            skipped["files_unreadable"] += 1
            continue
        groups[uids[1]].append(path)
    series: list[_Series] = []
    for uid, paths in groups.items():
        if len(paths) < min_instances:
            skipped["series_too_small"] += 1
            continue
        say(f"reading series {uid} ({len(paths)} files)")
        instances: list[tuple[int, str, list[Pixels], Any]] = []
        for path in paths:
            try:
                parsed = read_instance(path)
                if parsed.mode is not StorageMode.PIXELS:
                    skipped["instances_without_pixels"] += 1
                    continue
                frames = list(iter_frames(parsed))
            except ArchiveError:
                skipped["files_unreadable"] += 1
                continue
            number = parsed.integer("InstanceNumber")
            instances.append((number if number is not None else sys.maxsize, str(path), frames, parsed))
        if len(instances) < min_instances:
            skipped["series_too_small"] += 1
            continue
        instances.sort(key=lambda item: (item[0], item[1]))
        first = instances[0][3]
        try:
            where = str(Path(instances[0][1]).parent.relative_to(folder))
        except ValueError:
            where = str(Path(instances[0][1]).parent)
        series.append(_Series(uid, first.text("SeriesDescription") or "", first.text("Modality") or "", where,
                              [frames for _n, _p, frames, _parsed in instances]))
    series.sort(key=lambda s: (s.folder, s.description, s.uid))
    return series, skipped


def _encode_series(codec: Codec, frames: Sequence[Pixels]) -> dict[str, Any]:
    """The whole series with one codec: bytes stored (containers + context), times, bit-exact check."""
    started = time.perf_counter()
    context = codec.fit(frames)
    blobs = [codec.encode(frame, context) for frame in frames]
    encode_s = time.perf_counter() - started
    started = time.perf_counter()
    decoded = [decode_frame(blob, context) for blob in blobs]
    decode_s = time.perf_counter() - started
    mismatches = sum(1 for a, b in zip(frames, decoded) if a.dtype != b.dtype or not np.array_equal(a, b))
    pixels = sum(int(f.size) for f in frames)
    size = sum(len(b) for b in blobs) + (len(context) if context else 0)
    return {
        "config": codec.get_config(),
        "label": codec_label(codec.get_config()),
        "bytes": size,
        "context_bytes": len(context) if context else 0,
        "bpp": 8 * size / pixels,
        "encode_ms": encode_s * 1e3,
        "decode_ms": decode_s * 1e3,
        "encode_ms_per_slice": encode_s * 1e3 * SLICE_PIXELS / pixels,
        "mismatches": mismatches,
    }


def _series_row(series: _Series, auto: AutoCodec) -> dict[str, Any]:
    frames = [frame for instance in series.frames_by_instance for frame in instance]
    results: list[dict[str, Any]] = []
    for candidate in auto.candidate_codecs():
        try:
            results.append(_encode_series(candidate, frames))
        except Exception as exc:  # noqa: BLE001 - a candidate that fails is reported, it does not stop the run
            config = candidate.get_config()
            results.append({"config": config, "label": codec_label(config), "error": f"{type(exc).__name__}: {exc}"})
    exact = [r for r in results if "error" not in r and r["mismatches"] == 0]
    if not exact:
        raise ArchiveError(f"series {series.uid}: no candidate encoded it losslessly")
    best = min(exact, key=lambda r: r["bytes"])
    chosen, trial = auto.choose(series.frames_by_instance)
    mine = next(r for r in results if r["config"] == chosen.get_config())
    ratio = mine["bytes"] / best["bytes"] if "bytes" in mine else None
    shapes = sorted({"×".join(str(d) for d in f.shape) for f in frames})
    return {
        "series_uid": series.uid,
        "description": series.description,
        "modality": series.modality,
        "folder": series.folder,
        "instances": len(series.frames_by_instance),
        "frames": len(frames),
        "shapes": shapes,
        "dtypes": sorted({str(f.dtype) for f in frames}),
        "pixels": sum(int(f.size) for f in frames),
        "codecs": results,
        "best": {"config": best["config"], "label": best["label"], "bytes": best["bytes"], "bpp": best["bpp"]},
        "auto": {"config": chosen.get_config(), "label": codec_label(chosen.get_config()),
                 "bytes": mine.get("bytes"), "bpp": mine.get("bpp"), "series_encode_ms": mine.get("encode_ms")},
        "ratio": ratio,
        "within_goal": ratio is not None and mine.get("mismatches") == 0 and ratio <= GOAL,
        "trial": trial.as_dict(),
        "trial_ms": trial.trial_ms,
        "trial_over_encode": trial.trial_ms / mine["encode_ms"] if mine.get("encode_ms") else None,
    }


def run_auto_benchmark(
    folder: Path,
    *,
    min_instances: int = 10,
    candidates: Sequence[dict[str, Any]] | None = None,
    max_encode_ms: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Auto's choice against the best single codec on every series of ``folder``; a JSON-able dict.

    ``candidates`` and ``max_encode_ms`` are the auto config's (None: its defaults). With a budget, "best"
    is still the smallest candidate of all, so the ratio shows what the budget costs in bytes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArchiveError(f"not a folder: {folder}")
    if min_instances < 1:
        raise ArchiveError("min_instances must be at least 1")
    say = progress or (lambda _message: None)
    auto = get_codec({"id": "auto", "candidates": None if candidates is None else list(candidates),
                      "max_encode_ms": max_encode_ms})
    assert isinstance(auto, AutoCodec)
    started = time.perf_counter()
    series, skipped = _load_series(folder, min_instances, say)
    rows = []
    for index, one in enumerate(series, 1):
        say(f"series {index}/{len(series)}: {one.description or one.uid} ({len(one.frames_by_instance)} instances)")
        rows.append(_series_row(one, auto))
    trial_ms = sum(r["trial_ms"] for r in rows)
    auto_encode_ms = sum(r["auto"]["series_encode_ms"] or 0.0 for r in rows)
    all_encode_ms = sum(c.get("encode_ms", 0.0) for r in rows for c in r["codecs"])
    return {
        "benchmark": "auto",
        "folder": str(folder.resolve()),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "auto_config": auto.get_config(),
        "candidates": [c.get_config() for c in auto.candidate_codecs()],
        "min_instances": min_instances,
        "goal_ratio": GOAL,
        "series": rows,
        "skipped": skipped,
        "summary": {
            "series": len(rows),
            "within_goal": sum(1 for r in rows if r["within_goal"]),
            "best_bytes": sum(r["best"]["bytes"] for r in rows),
            "auto_bytes": sum(r["auto"]["bytes"] or 0 for r in rows),
            "trial_ms": trial_ms,
            "auto_series_encode_ms": auto_encode_ms,
            "every_candidate_encode_ms": all_encode_ms,
        },
        "notes": [
            "bytes: the frame containers the archive stores (header + codestream) plus any context blob",
            ("best: the smallest candidate over the whole series that decodes bit-exactly; "
             "auto: the trial's choice on its sample, costed over the whole series"),
            ("trial ms: every candidate on the sample, encode + decode + compare; series ms: encoding the whole "
             "series with auto's choice (single-threaded)"),
        ],
        "seconds": time.perf_counter() - started,
    }


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_auto_benchmark(result: dict[str, Any], console: Console) -> None:
    """Per series: the best codec, auto's choice, their ratio and the trial's cost; then bpp of every candidate."""
    summary = result["summary"]
    console.print(f"[bold]Auto codec benchmark[/bold] of {result['folder']}  {result['when']}  "
                  f"(series with ≥ {result['min_instances']} instances)")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("series", no_wrap=True)
    for column in ("inst", "frame", "best", "best kB", "auto", "auto kB", "auto /\nbest", "≤ 1 %", "sample",
                   "trial\nms", "series\nms", "trial /\nseries"):
        table.add_column(column, justify="right" if column not in ("best", "auto") else "left", no_wrap=True)
    for row in result["series"]:
        auto_kb = row["auto"]["bytes"]
        table.add_row(
            f"{row['modality']} {row['description'] or row['series_uid'][-12:]}", str(row["instances"]),
            ",".join(row["shapes"]), row["best"]["label"], f"{row['best']['bytes'] / 1e3:.1f}", row["auto"]["label"],
            "-" if auto_kb is None else f"{auto_kb / 1e3:.1f}", _num(row["ratio"], 4),
            "yes" if row["within_goal"] else "[red]no[/red]", f"{row['trial']['sampled']}/{row['trial']['total']}",
            _num(row["trial_ms"], 0), _num(row["auto"]["series_encode_ms"], 0), _num(row["trial_over_encode"]),
        )
    console.print(table)
    if result["series"]:
        labels = [codec_label(c) for c in result["candidates"]]
        bpp = Table(title="bits per pixel, whole series (ms per 512² slice)", box=box.SIMPLE_HEAD, pad_edge=False,
                    collapse_padding=True)
        bpp.add_column("series", no_wrap=True)
        for label in labels:
            bpp.add_column(label, justify="right", no_wrap=True)
        for row in result["series"]:
            cells = []
            for codec in row["codecs"]:
                if "error" in codec:
                    cells.append("failed")
                    continue
                text = f"{codec['bpp']:.3f} ({codec['encode_ms_per_slice']:.0f})"
                if codec["mismatches"]:
                    text += " not exact"
                cells.append(f"[bold]{text}[/bold]" if codec["label"] == row["best"]["label"] else text)
            bpp.add_row(f"{row['modality']} {row['description'] or row['series_uid'][-12:]}", *cells)
        console.print(bpp)
    ratio = summary["auto_bytes"] / summary["best_bytes"] if summary["best_bytes"] else None
    console.print(f"{summary['within_goal']} of {summary['series']} series within 1 % of the best single codec; "
                  f"all series: auto {summary['auto_bytes'] / 1e3:.1f} kB vs best {summary['best_bytes'] / 1e3:.1f} kB"
                  f" (× {_num(ratio, 4)})", markup=False)
    console.print(f"trials {summary['trial_ms']:.0f} ms in all; encoding the series with auto's choice "
                  f"{summary['auto_series_encode_ms']:.0f} ms; every candidate on every whole series "
                  f"{summary['every_candidate_encode_ms']:.0f} ms; run {result['seconds']:.1f} s", markup=False)
    skipped = result["skipped"]
    console.print(f"left out: {skipped['series_too_small']} series with fewer instances, "
                  f"{skipped['files_unreadable']} unreadable files, "
                  f"{skipped['instances_without_pixels']} instances without encodable pixels", markup=False)
    for note in result["notes"]:
        console.print(f"• {note}", markup=False)
