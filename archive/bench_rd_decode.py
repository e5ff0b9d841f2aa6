"""The decoding side of ``medarchive bench rd``, run in a fresh process (``python -m archive.bench_rd_decode``).

It reads the stored bytes and the originals the benchmark wrote, decodes each
item single-threaded (timed), and measures it: PSNR with both peaks, max
error, SSIM and the CRC of what it decoded. Nothing cached at encode time can
help, and this module imports only what decoding needs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import imagecodecs
import numpy as np
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped, unused-ignore]

from archive.codecs import decode_frame
from archive.codecs._pixels import Pixels
from archive.codecs.frame import pixel_crc32

SSIM_MIN_SIDE: Final[int] = 7  # skimage's default window
#: codecs that load a model on first use: a worker keeps it loaded, so the first decode of their rows is untimed
WARM_UP_CODECS: Final[frozenset[str]] = frozenset({"learned", "gan"})


def _decode_item(item: Mapping[str, Any], data: bytes, context: bytes | None, dtype: np.dtype[Any]) -> Pixels:
    decoder = item["decoder"]
    if decoder == "frame":
        return decode_frame(data, context)
    if decoder == "j2k":
        arr: Pixels = imagecodecs.jpeg2k_decode(data, numthreads=1)
    elif decoder == "jpegls":
        arr = np.add(imagecodecs.jpegls_decode(data), int(item["offset"]), dtype=np.int64)
    elif decoder == "jxl":
        arr = np.add(imagecodecs.jpegxl_decode(data, numthreads=1), int(item["offset"]), dtype=np.int64)
    else:
        raise ValueError(f"unknown decoder {decoder!r}")
    return arr.astype(dtype)


def image_metrics(original: Pixels, decoded: Pixels, peak: int) -> dict[str, Any]:
    """PSNR (peak 2^BitsStored - 1 and max - min of the original), max |error|, SSIM; None PSNR when exact."""
    diff = decoded.astype(np.int64) - original.astype(np.int64)
    max_error = int(np.abs(diff).max())
    span = max(1, int(original.max()) - int(original.min()))
    if max_error == 0:
        return {"max_error": 0, "mse": 0.0, "psnr": None, "range_psnr": None, "ssim": 1.0}
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    ssim: float | None = None
    if min(original.shape) >= SSIM_MIN_SIDE:
        from skimage import metrics
        structural_similarity: Any = metrics.structural_similarity  # untyped
        ssim = float(structural_similarity(original.astype(np.float64), decoded.astype(np.float64),
                                           data_range=float(span)))
    return {"max_error": max_error, "mse": mse, "psnr": 10.0 * math.log10(peak * peak / mse),
            "range_psnr": 10.0 * math.log10(span * span / mse), "ssim": ssim}


def decode_manifest(manifest_path: Path) -> dict[str, Any]:
    """Decode every item the manifest lists from its files, timing each decode, and measure it against the
    originals. Meant to run in a fresh process (``python -m archive.bench_rd_decode --decode``)."""
    folder = manifest_path.parent
    manifest = json.loads(manifest_path.read_text())
    with np.load(folder / manifest["originals"]) as store:
        originals = [store[f"i{i}"] for i in range(len(manifest["images"]))]
    contexts = {name: (folder / name).read_bytes() for name in manifest["contexts"]}
    codec_ids = {item["actual"] for row in manifest["rows"] for item in row["items"] if item["decoder"] == "frame"}
    from archive.codecs.registry import codec_class
    for codec_id in codec_ids:  # imports only, before any clock: a server has its codecs loaded
        codec_class(codec_id)
    rows_out: list[dict[str, Any]] = []
    with threadpool_limits(1):
        for row in manifest["rows"]:
            blob = (folder / row["blob"]).read_bytes()
            items_out: list[dict[str, Any]] = []
            first = row["items"][0] if row["items"] else None
            if first is not None and first["decoder"] == "frame" and first["actual"] in WARM_UP_CODECS:
                with contextlib.suppress(Exception):  # loads the model; a failure shows in the timed decode
                    _decode_item(first, blob[first["start"]:first["start"] + first["length"]],
                                 contexts[first["context"]] if first["context"] else None,
                                 originals[first["image"]].dtype)
            for item in row["items"]:
                data = blob[item["start"]:item["start"] + item["length"]]
                original = originals[item["image"]]
                context = contexts[item["context"]] if item["context"] else None
                started = time.perf_counter()
                try:
                    decoded = _decode_item(item, data, context, original.dtype)
                    ms = (time.perf_counter() - started) * 1000.0
                except Exception as exc:  # noqa: BLE001 -- a decode failure is a result, reported per item
                    items_out.append({"error": f"{type(exc).__name__}: {exc}"})
                    continue
                if decoded.shape != original.shape:
                    items_out.append({"error": f"decoded shape {decoded.shape}, expected {original.shape}"})
                    continue
                metrics = image_metrics(original, decoded, int(manifest["images"][item["image"]]["peak"]))
                items_out.append({"decode_ms": ms, "crc32": pixel_crc32(decoded), **metrics})
            rows_out.append({"index": row["index"], "items": items_out})
    return {"pid": os.getpid(), "rows": rows_out}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


# ------------------------------------------------------------------------------------------------- entry


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m archive.bench_rd_decode --decode MANIFEST --result OUT``: the fresh decoding process."""
    parser = argparse.ArgumentParser(prog="python -m archive.bench_rd_decode")
    parser.add_argument("--decode", type=Path, required=True, help="manifest.json written by the benchmark")
    parser.add_argument("--result", type=Path, required=True, help="where to write the decode report (JSON)")
    args = parser.parse_args(argv)
    args.result.write_text(json.dumps(_json_safe(decode_manifest(args.decode))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
