"""Lossless codec research benchmark: our lossless codecs next to the plain libraries, and the ingest rate.

    .venv/bin/python benchmarks/lossless_bench.py DIR [--repeat N] [--json] [--anchors FILE]
    .venv/bin/python benchmarks/lossless_bench.py --render RESULT.json     # tables from a saved --json result

For a folder of DICOM this measures, per data group (each top-level
subfolder; ``broken`` is left out; files lying directly in the folder form a
group named after it) and over all groups together:

* for every lossless codec config of :mod:`archive.codecs` -- the archive's
  own code path, frame container included -- and for the reference rows of
  ANCHORS.md (the project's shared reference figures; copied into
  ``benchmarks/anchors.toml`` next to this script) computed in the same run by calling the
  libraries directly (imagecodecs, pyjpegls): mean bits per pixel over images
  (every frame of a multi-frame object is one image; an image that does not
  decode bit-exactly is counted as a failure and left out of the mean, as
  ANCHORS does for pyjpegls), single-thread encode
  and decode MB/s of the raw pixel bytes (best of ``repeat`` runs per image,
  capped by a time budget on the slow codecs), and how many encodes failed to
  decode bit-exactly (reported, never hidden);
* the end-to-end ingest rate of the whole folder into a temporary archive
  (SQLite, default codec), through the same service the ``ingest`` command
  uses.

The reference rows follow ANCHORS: JPEG-LS and JPEG-XL get unsigned samples
(signed frames with negative values shifted by their minimum), JPEG 2000 and
JPEG-XL get ``bitspersample = BitsStored``, imagecodecs' JPEG-LS always
writes P = 16 for 16-bit input, pyjpegls uses the bit length of the maximum.

Pixels are the stored values (``iter_frames``: no rescale, no colour
conversion); the run also checks they equal pydicom's ``pixel_array``.
MB = 10^6 bytes.

This is a research tool, not part of the ``archive`` package: it needs the
archive installed (``pip install -e .``) and is run as a script.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import tomllib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

import imagecodecs
import jpeg_ls
import numpy as np
import numpy.typing as npt
from rich import box
from rich.console import Console
from rich.table import Table

from archive.kinds import StorageMode
from archive.codecs import decode_frame, get_codec, read_frame_header
from archive.codecs.base import Codec, dist_version
from archive.config import Settings
from archive.dicom.reader import iter_frames, read_instance
from archive.errors import ArchiveError
from archive.services.ingest import Outcome, discover, ingest_paths
from archive.services.runtime import Archive

Pixels = npt.NDArray[Any]

#: The codec configs benchmarked, in table order.
CODEC_CONFIGS: Final[tuple[dict[str, Any], ...]] = (
    {"id": "jpegls"},
    {"id": "jpeg2000"},
    {"id": "htj2k"},
    {"id": "jpegxl", "effort": 7},
    {"id": "jpegxl", "effort": 3},
    {"id": "zstd", "level": 19},
)
SKIPPED_GROUPS: Final[frozenset[str]] = frozenset({"broken"})
#: Extra timing passes of one method stop once its measured time would pass this (the first pass always runs).
TIMING_BUDGET_S: Final[float] = 8.0
MB: Final[float] = 1e6

#: The reference figures of ANCHORS.md (bpp per group, encode / decode MB/s on CT), kept as data.
ANCHORS_FILE: Final[Path] = Path(__file__).resolve().with_name("anchors.toml")
SHORT_GROUP_NAMES: Final[dict[str, str]] = {
    "ct-chest-tcia": "CT", "mr-philips-achieva": "Philips", "mr-siemens-prisma": "Siemens", "mr-ge-signa": "GE",
    "misc-barre": "misc",
}
ALL: Final[str] = "all"


@dataclass(frozen=True)
class Anchors:
    """ANCHORS.md's lossless figures: bpp per reference row and group, MB/s per reference row on one group."""

    bpp: dict[str, dict[str, float]]
    mb_s: dict[str, tuple[float, float]]
    mb_s_group: str
    source: str


def load_anchors(path: Path = ANCHORS_FILE) -> Anchors:
    """Read the reference figures from a TOML file (see ``benchmarks/anchors.toml``)."""
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    bpp = {row: {group: float(v) for group, v in groups.items()} for row, groups in data.get("bpp", {}).items()}
    mb_s = {row: (float(pair[0]), float(pair[1])) for row, pair in data.get("ct_mb_s", {}).items()}
    return Anchors(bpp, mb_s, str(data.get("mb_s_group", "ct-chest-tcia")), str(path))


# -- images -------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """One frame of stored pixel values, and its unsigned mapping for the reference encoders."""

    group: str
    source: str
    frame: int
    pixels: Pixels
    unsigned: Pixels  # the same values as unsigned samples of the same width (see _to_unsigned)
    offset: int  # pixels = unsigned + offset
    bits_stored: int  # BitsStored of the instance: the reference encoders' bitspersample, as in ANCHORS

    @property
    def n_pixels(self) -> int:
        return int(self.pixels.size // (self.pixels.shape[2] if self.pixels.ndim == 3 else 1))

    @property
    def n_samples(self) -> int:
        return int(self.pixels.size)

    @property
    def raw_bytes(self) -> int:
        return int(self.pixels.nbytes)


@dataclass
class Corpus:
    groups: dict[str, list[Image]] = field(default_factory=dict)
    files: int = 0
    not_benchmarked: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    pixel_array_checked: int = 0
    pixel_array_mismatch: list[str] = field(default_factory=list)

    @property
    def images(self) -> list[Image]:
        return [image for images in self.groups.values() for image in images]


def _to_unsigned(arr: Pixels) -> tuple[Pixels, int]:
    """Unsigned samples for JPEG-LS / JPEG-XL: signed frames with negative values are shifted by their minimum
    (a recorded offset), signed frames without negatives are reinterpreted; unsigned frames are used as they are."""
    if arr.dtype.kind == "u":
        return arr, 0
    unsigned = np.dtype(f"<u{arr.dtype.itemsize}")
    lo = int(arr.min())
    if lo >= 0:
        return arr.astype(unsigned), 0
    return np.subtract(arr, lo, dtype=np.int64).astype(unsigned), lo


def _group_sources(folder: Path) -> list[tuple[str, list[Path]]]:
    groups: list[tuple[str, list[Path]]] = []
    loose: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.name not in SKIPPED_GROUPS:
                groups.append((entry.name, discover([entry])[0]))
        elif entry.is_file():
            loose.append(entry)
    if loose:
        groups.append((folder.resolve().name or str(folder), loose))
    return groups


def load_corpus(folder: Path) -> Corpus:
    """Every stored pixel frame of every codec-encodable instance under ``folder``, by group."""
    corpus = Corpus()
    for group, paths in _group_sources(folder):
        images: list[Image] = []
        for path in paths:
            corpus.files += 1
            name = str(path.relative_to(folder))
            try:
                parsed = read_instance(path)
                if parsed.mode is not StorageMode.PIXELS:
                    corpus.not_benchmarked.append((name, f"{parsed.mode.value}: {parsed.mode_reason}"))
                    continue
                frames = [np.ascontiguousarray(f) for f in iter_frames(parsed)]
            except ArchiveError as exc:  # not DICOM / not archivable: the ingest row reports these
                corpus.not_benchmarked.append((name, str(exc)))
                continue
            _check_pixel_array(corpus, name, parsed.dataset, frames)
            assert parsed.layout is not None
            for index, frame in enumerate(frames):
                unsigned, offset = _to_unsigned(frame)
                images.append(Image(group, name, index, frame, np.ascontiguousarray(unsigned), offset,
                                    parsed.layout.bits_stored))
        if images:
            corpus.groups[group] = images
    return corpus


def _check_pixel_array(corpus: Corpus, name: str, dataset: Any, frames: list[Pixels]) -> None:
    """ANCHORS used pydicom's ``pixel_array``: say whether our frames are the same values."""
    corpus.pixel_array_checked += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = np.asarray(dataset.pixel_array)
    except Exception as exc:  # no decoder for this syntax, odd header: reported, not fatal
        corpus.pixel_array_mismatch.append(f"{name}: pixel_array raised {type(exc).__name__}: {str(exc)[:90]}")
        return
    ours = frames[0] if len(frames) == 1 else np.stack(frames)
    if reference.shape != ours.shape or not np.array_equal(reference.astype(np.int64), ours.astype(np.int64)):
        corpus.pixel_array_mismatch.append(f"{name}: differs from pixel_array")


# -- methods --------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    data: bytes
    payload_bytes: int  # codestream alone (without our frame container)
    actual: str  # codec that produced it (a medarchive codec may fall back to zstd)


@dataclass(frozen=True)
class Method:
    """One table row: how to encode an image, decode the result, and map the decoded samples back."""

    key: str  # ANCHORS key for reference rows; codec label for ours
    label: str
    impl: str  # "ours" (archive.codecs) or the library called directly
    expected: str
    encode: Callable[[Image], Encoded]
    decode: Callable[[Encoded, Image], Pixels]
    restore: Callable[[Pixels, Image], Pixels]


def _ours(config: dict[str, Any]) -> Method:
    codec: Codec = get_codec(config)
    label = config["id"] + "".join(f" {k[0]}{v}" for k, v in config.items() if k != "id")

    def encode(image: Image) -> Encoded:
        data = codec.encode(image.pixels)
        header = read_frame_header(data)
        return Encoded(data, header.payload_length, header.codec_id)

    def decode(encoded: Encoded, image: Image) -> Pixels:
        return decode_frame(encoded.data)

    return Method(label, label, "ours", codec.codec_id, encode, decode, lambda arr, image: arr)


def _lib(key: str, label: str, impl: str, encode: Callable[[Image], bytes | bytearray],
         decode: Callable[[bytes, Image], Pixels], *, unsigned: bool) -> Method:
    def enc(image: Image) -> Encoded:
        data = bytes(encode(image))
        return Encoded(data, len(data), key)

    def dec(encoded: Encoded, image: Image) -> Pixels:
        return decode(encoded.data, image)

    def restore(arr: Pixels, image: Image) -> Pixels:
        if not unsigned:
            return arr
        return np.add(arr, image.offset, dtype=np.int64)

    return Method(key, label, impl, key, enc, dec, restore)


def _zstd_decode(data: bytes, image: Image) -> Pixels:
    return np.frombuffer(imagecodecs.zstd_decode(data), dtype=image.pixels.dtype).reshape(image.pixels.shape)


def reference_methods() -> dict[str, Method]:
    """The ANCHORS reference rows: the libraries called directly, single-threaded."""
    rows = [
        _lib("jpegls-imagecodecs", "jpegls", "ic P=16", lambda im: imagecodecs.jpegls_encode(im.unsigned),
             lambda data, im: imagecodecs.jpegls_decode(data), unsigned=True),
        _lib("jpegls-pyjpegls", "jpegls", "pyjpegls", lambda im: jpeg_ls.encode_array(im.unsigned),
             lambda data, im: jpeg_ls.decode(np.frombuffer(data, dtype=np.uint8)), unsigned=True),
        _lib("jpeg2000", "jpeg2000", "ic", lambda im: imagecodecs.jpeg2k_encode(
            im.pixels, level=0, codecformat="J2K", reversible=True, bitspersample=im.bits_stored, numthreads=1),
             lambda data, im: imagecodecs.jpeg2k_decode(data, numthreads=1), unsigned=False),
        _lib("htj2k", "htj2k", "ic", lambda im: imagecodecs.htj2k_encode(im.pixels, reversible=True),
             lambda data, im: imagecodecs.htj2k_decode(data), unsigned=False),
        _lib("jpegxl-e7", "jpegxl e7", "ic", lambda im: imagecodecs.jpegxl_encode(
            im.unsigned, lossless=True, effort=7, bitspersample=im.bits_stored, numthreads=1),
             lambda data, im: imagecodecs.jpegxl_decode(data, numthreads=1), unsigned=True),
        _lib("jpegxl-e3", "jpegxl e3", "ic", lambda im: imagecodecs.jpegxl_encode(
            im.unsigned, lossless=True, effort=3, bitspersample=im.bits_stored, numthreads=1),
             lambda data, im: imagecodecs.jpegxl_decode(data, numthreads=1), unsigned=True),
        _lib("zstd-19", "zstd l19", "ic", lambda im: imagecodecs.zstd_encode(im.pixels.tobytes(), level=19),
             _zstd_decode, unsigned=False),
    ]
    return {m.key: m for m in rows}


#: (our codec config, reference rows shown under it)
_REFERENCE_FOR: Final[dict[str, tuple[str, ...]]] = {
    "jpegls": ("jpegls-pyjpegls", "jpegls-imagecodecs"),
    "jpeg2000": ("jpeg2000",),
    "htj2k": ("htj2k",),
    "jpegxl e7": ("jpegxl-e7",),
    "jpegxl e3": ("jpegxl-e3",),
    "zstd l19": ("zstd-19",),
}


def all_methods() -> list[Method]:
    """Our codec rows, each followed by its reference rows."""
    refs = reference_methods()
    methods: list[Method] = []
    for config in CODEC_CONFIGS:
        ours = _ours(config)
        methods.append(ours)
        methods.extend(refs[key] for key in _REFERENCE_FOR.get(ours.label, ()))
    return methods


# -- measuring --------------------------------------------------------------------


@dataclass
class Measured:
    """One method on every image: sizes from the first pass, best times over all passes."""

    method: Method
    bits: list[float | None]  # compressed bits per image (None: encode raised)
    payload_bits: list[float | None]
    encode_s: list[float]
    decode_s: list[float]
    failures: list[str] = field(default_factory=list)  # "source#frame: why"
    failed: set[int] = field(default_factory=set)  # image indices that did not round-trip
    fallbacks: int = 0
    passes: int = 0


def measure(method: Method, images: Sequence[Image], repeat: int) -> Measured:
    n = len(images)
    result = Measured(method, [None] * n, [None] * n, [math.inf] * n, [math.inf] * n)
    encoded: list[Encoded | None] = [None] * n
    spent = 0.0
    for attempt in range(max(1, repeat)):
        gc_was_enabled = gc.isenabled()
        gc.disable()
        pass_start = time.perf_counter()
        try:
            for i, image in enumerate(images):
                if attempt and encoded[i] is None:
                    continue
                t0 = time.perf_counter()
                try:
                    enc = method.encode(image)
                except Exception as exc:  # a library refusing an image is a result, not a crash
                    result.failures.append(f"{image.source}#{image.frame}: encode raised {type(exc).__name__}: {exc}")
                    result.failed.add(i)
                    continue
                t1 = time.perf_counter()
                try:
                    decoded: Pixels | None = method.decode(enc, image)
                    error = ""
                except Exception as exc:
                    decoded, error = None, f"decode raised {type(exc).__name__}: {exc}"
                t2 = time.perf_counter()
                result.encode_s[i] = min(result.encode_s[i], t1 - t0)
                if decoded is not None:
                    result.decode_s[i] = min(result.decode_s[i], t2 - t1)
                if attempt == 0:
                    encoded[i] = enc
                    result.bits[i] = 8.0 * len(enc.data) / image.n_pixels
                    result.payload_bits[i] = 8.0 * enc.payload_bytes / image.n_pixels
                    if enc.actual != method.expected:
                        result.fallbacks += 1
                    if decoded is not None:
                        error = _compare(method.restore(decoded, image), image.pixels)
                    if error:
                        result.failures.append(f"{image.source}#{image.frame}: {error}")
                        result.failed.add(i)
        finally:
            if gc_was_enabled:
                gc.enable()
        result.passes += 1
        last = time.perf_counter() - pass_start
        spent += last
        if spent + last > TIMING_BUDGET_S:
            break
    return result


def _compare(decoded: Pixels, original: Pixels) -> str:
    if decoded.shape != original.shape:
        return f"decoded shape {decoded.shape} != {original.shape}"
    if not np.array_equal(decoded.astype(np.int64), original.astype(np.int64)):
        diff = np.abs(decoded.astype(np.int64) - original.astype(np.int64))
        return f"not bit-exact: {int(np.count_nonzero(diff))} samples differ, max error {int(diff.max())}"
    return ""


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _rate(images: Sequence[Image], seconds: Sequence[float]) -> float | None:
    pairs = [(im.raw_bytes, s) for im, s in zip(images, seconds) if math.isfinite(s)]
    total = sum(s for _, s in pairs)
    return sum(b for b, _ in pairs) / total / MB if pairs and total > 0 else None


def summarise(measured: Measured, images: Sequence[Image], indices: Sequence[int], group: str,
              anchors: Anchors) -> dict[str, Any]:
    method = measured.method
    sub = [images[i] for i in indices]
    failures = sorted(i for i in indices if i in measured.failed)
    exact = [i for i in indices if i not in measured.failed]
    row: dict[str, Any] = {
        "codec": method.label,
        "impl": method.impl,
        "images": len(indices),
        "encoded": sum(1 for i in indices if measured.bits[i] is not None),
        "bpp": _mean([measured.bits[i] for i in exact]),  # over images that round-trip bit-exactly
        "payload_bpp": _mean([measured.payload_bits[i] for i in exact]),
        "bpp_incl_failures": _mean([measured.bits[i] for i in indices]),
        "encode_mb_s": _rate(sub, [measured.encode_s[i] for i in indices]),
        "decode_mb_s": _rate(sub, [measured.decode_s[i] for i in indices]),
        "roundtrip_failures": len(failures),
        "fallbacks": measured.fallbacks if group == ALL else None,
        "timing_passes": measured.passes,
    }
    if method.impl != "ours":
        row["anchor_bpp"] = anchors.bpp.get(method.key, {}).get(group)
        if group == anchors.mb_s_group and method.key in anchors.mb_s:
            row["anchor_mb_s"] = list(anchors.mb_s[method.key])
    return row


# -- ingest -------------------------------------------------------------------------


def measure_ingest(folder: Path) -> dict[str, Any]:
    """``medarchive ingest FOLDER`` in-process, into a throw-away SQLite archive with the default codec."""
    with tempfile.TemporaryDirectory(prefix="medarchive-bench-") as home:
        settings = Settings.load(environ={}, home=Path(home))
        with Archive.open(settings) as archive:
            report = ingest_paths(archive, [folder])
    seconds = report.seconds
    return {
        "codec": settings.codec,
        "database": "sqlite",
        "files": len(report.outcomes),
        "instances": report.instances,
        "outcomes": {o.value: report.count(o) for o in Outcome},
        "bytes_in": report.bytes_in,
        "bytes_stored": report.bytes_stored,
        "ratio": report.ratio,
        "seconds": seconds,
        "instances_per_s": report.instances / seconds if seconds else None,
        "mb_per_s": report.bytes_in / seconds / MB if seconds else None,
    }


# -- machine ------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpus": affinity,
        "cpu_model": model or platform.processor(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": {
            "imagecodecs": str(imagecodecs.__version__),
            "charls": str(imagecodecs.jpegls_version()),
            "openjpeg": str(imagecodecs.jpeg2k_version()),
            "openjph": str(imagecodecs.htj2k_version()),
            "libjxl": str(imagecodecs.jpegxl_version()),
            "zstd": str(imagecodecs.zstd_version()),
            "pyjpegls": dist_version("pyjpegls"),
            "numpy": np.__version__,
            "pydicom": dist_version("pydicom"),
        },
    }


# -- entry point --------------------------------------------------------------------


def run_lossless_benchmark(folder: Path, repeat: int = 3, console: Console | None = None,
                           anchors_path: Path = ANCHORS_FILE) -> dict[str, Any]:
    """Measure every lossless codec and the reference libraries on ``folder``; print tables when ``console``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArchiveError(f"not a folder: {folder}")
    anchors = load_anchors(anchors_path)
    started = time.perf_counter()
    status = console.status("reading images…") if console else None
    if status:
        status.start()
    try:
        corpus = load_corpus(folder)
        images = corpus.images
        measured: list[Measured] = []
        for method in all_methods():
            if status:
                status.update(f"timing {method.label} ({method.impl}) on {len(images)} images…")
            measured.append(measure(method, images, repeat))
        if status:
            status.update("ingesting…")
        ingest = measure_ingest(folder)
    finally:
        if status:
            status.stop()

    index_of: dict[str, list[int]] = {}
    for i, image in enumerate(images):
        index_of.setdefault(image.group, []).append(i)
    group_names = [*corpus.groups, ALL]
    index_of[ALL] = list(range(len(images)))
    groups: dict[str, Any] = {}
    for group in group_names:
        idx = index_of[group]
        sub = [images[i] for i in idx]
        groups[group] = {
            "images": len(idx),
            "pixels": sum(im.n_pixels for im in sub),
            "raw_bytes": sum(im.raw_bytes for im in sub),
            "shapes": sorted({f"{'×'.join(map(str, im.pixels.shape))} {im.pixels.dtype}" for im in sub}),
            "rows": [summarise(m, images, idx, group, anchors) for m in measured],
        }
    result: dict[str, Any] = {
        "benchmark": "lossless",
        "folder": str(folder.resolve()),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "repeat": repeat,
        "timing_budget_s": TIMING_BUDGET_S,
        "anchors_file": anchors.source,
        "machine": machine_facts(),
        "files": corpus.files,
        "not_benchmarked": [{"file": f, "why": why} for f, why in corpus.not_benchmarked],
        "pixel_array_check": {"instances": corpus.pixel_array_checked, "mismatches": corpus.pixel_array_mismatch},
        "groups": groups,
        "failures": {f"{m.method.label} ({m.method.impl})": m.failures for m in measured if m.failures},
        "ingest": ingest,
        "seconds": time.perf_counter() - started,
    }
    if console:
        print_report(result, console)
    return result


# -- presentation ---------------------------------------------------------------------


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rate_text(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _short(group: str) -> str:
    return SHORT_GROUP_NAMES.get(group, group[:10])


def print_report(result: dict[str, Any], console: Console) -> None:
    machine = result["machine"]
    libs = machine["libraries"]
    console.print(f"[bold]Lossless benchmark[/bold] of {result['folder']}  ({result['when']})")
    console.print(f"{machine['cpus']} CPU(s), {machine['cpu_model']}; Python {machine['python']}; "
                  f"imagecodecs {libs['imagecodecs']} ({libs['charls']}, {libs['openjpeg']}, {libs['openjph']}, "
                  f"{libs['libjxl']}, {libs['zstd']}), pyjpegls {libs['pyjpegls']}")
    console.print("Single-threaded. bpp = compressed bits / pixels, mean over the images (frames) that round-trip "
                  "bit-exactly (fails = images that did not, left out of bpp); ours = archive.codecs "
                  "with its frame container, payload = codestream alone; MB/s of raw pixel bytes, best of "
                  f"{result['repeat']} runs per image (fewer for slow codecs: see JSON timing_passes); "
                  "ANCHORS = ANCHORS.md figure for the reference row (CT: bpp enc/dec MB/s).")
    for group, data in result["groups"].items():
        title = (f"{'All groups' if group == ALL else group}: {data['images']} images, "
                 f"{data['raw_bytes'] / MB:.1f} MB raw ({', '.join(data['shapes'])})")
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for name, justify in (("codec", "left"), ("by", "left"), ("bpp", "right"), ("payload", "right"),
                              ("ANCHORS", "right"), ("enc MB/s", "right"), ("dec MB/s", "right"), ("fails", "right")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        previous = ""
        for row in data["rows"]:
            anchor = _f(row.get("anchor_bpp")) if row.get("anchor_bpp") is not None else ""
            if row.get("anchor_mb_s"):
                enc, dec = row["anchor_mb_s"]
                anchor += f" {enc:g}/{dec:g}"
            fails = str(row["roundtrip_failures"])
            if row["encoded"] < row["images"]:
                fails += f" ({row['images'] - row['encoded']} raised)"
            if row.get("fallbacks"):
                fails += f" fb{row['fallbacks']}"
            ours = row["impl"] == "ours"
            table.add_row(
                row["codec"] if row["codec"] != previous else "", row["impl"],
                f"[bold]{_f(row['bpp'])}[/bold]" if ours else _f(row["bpp"]),
                _f(row["payload_bpp"]) if ours else "", anchor,
                _rate_text(row["encode_mb_s"]), _rate_text(row["decode_mb_s"]),
                f"[red]{fails}[/red]" if row["roundtrip_failures"] else fails,
                end_section=False,
            )
            previous = row["codec"]
        console.print(table)

    summary = Table(title="bpp by group (mean over images)", title_justify="left", box=box.SIMPLE_HEAD,
                    pad_edge=False)
    summary.add_column("codec")
    summary.add_column("by")
    for group in result["groups"]:
        summary.add_column(_short(group), justify="right")
    first_group = next(iter(result["groups"].values()))
    for r, row in enumerate(first_group["rows"]):
        cells = [_f(result["groups"][g]["rows"][r]["bpp"]) for g in result["groups"]]
        summary.add_row(row["codec"], row["impl"], *cells)
    console.print(summary)

    if result["failures"]:
        console.print("[bold red]Round-trip failures[/bold red] (encoded, decoded, not bit-exact or raised):")
        for name, lines in result["failures"].items():
            console.print(f"  {name}: {len(lines)}")
            for line in lines[:6]:
                console.print(f"    {line}", markup=False)
            if len(lines) > 6:
                console.print(f"    … {len(lines) - 6} more (JSON)")
    check = result["pixel_array_check"]
    console.print(f"Pixels: {check['instances']} instances read, "
                  f"{check['instances'] - len(check['mismatches'])} identical to pydicom pixel_array"
                  + (f"; {'; '.join(check['mismatches'])}" if check["mismatches"] else ""))
    if result["not_benchmarked"]:
        console.print("Not in the codec tables: " + "; ".join(f"{n['file']} ({n['why']})"
                                                              for n in result["not_benchmarked"]), markup=False)

    ingest = result["ingest"]
    table = Table(title=f"End-to-end ingest of {result['folder']} (SQLite, temporary home, codec "
                        f"{ingest['codec']['id']})", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("files", "instances", "seconds", "inst/s", "MB/s", "bytes in", "stored", "ratio"):
        table.add_column(name, justify="right")
    table.add_row(str(ingest["files"]), str(ingest["instances"]), f"{ingest['seconds']:.2f}",
                  _rate_text(ingest["instances_per_s"]), _rate_text(ingest["mb_per_s"]),
                  f"{ingest['bytes_in'] / MB:.2f} MB", f"{ingest['bytes_stored'] / MB:.2f} MB", f"{ingest['ratio']:.2f}")
    console.print(table)
    console.print("outcomes: " + ", ".join(f"{k} {v}" for k, v in ingest["outcomes"].items()))
    console.print(f"benchmark took {result['seconds']:.0f} s")


# -- command line ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("folder", type=Path, nargs="?", help="folder of DICOM (groups = its top-level subfolders)")
    parser.add_argument("--repeat", type=int, default=3, help="timing repetitions per image, best kept (default 3)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    parser.add_argument("--anchors", type=Path, default=ANCHORS_FILE,
                        help=f"reference figures (default {ANCHORS_FILE.name} next to this script)")
    parser.add_argument("--render", type=Path, metavar="RESULT_JSON", help="print the tables of a saved --json result")
    args = parser.parse_args(argv)
    console = Console()
    if args.render:
        with open(args.render, encoding="utf-8") as handle:
            print_report(json.load(handle), console)
        return 0
    if args.folder is None:
        parser.error("a folder is needed (or --render RESULT_JSON)")
    try:
        result = run_lossless_benchmark(args.folder, repeat=args.repeat, console=None if args.json else console,
                                        anchors_path=args.anchors)
    except ArchiveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
