"""The "kmeans" codec on real CT, MR and RGB images: k respected, WCSS exact, decoding alone and bit-exact."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from archive.codecs import decode_frame, get_codec, read_frame_header
from archive.codecs.kmeans import (
    KMeansCodec,
    KMeansConfig,
    colour_palette,
    colour_source,
    elbow_k,
    gray_quantize,
    histogram,
    unpack_context,
)
from archive.errors import CodecError
from tests.conftest import shared_data


def _pixels(path: Path | str) -> np.ndarray:
    return np.asarray(pydicom.dcmread(path).pixel_array)


@pytest.fixture(scope="module")
def ct() -> np.ndarray:
    """A real 512x512 int16 chest CT slice."""
    return _pixels(min((shared_data() / "ct-chest-tcia").rglob("*.dcm")))


@pytest.fixture(scope="module")
def mr_series() -> list[np.ndarray]:
    """Six real 96x96 12-bit Philips MR slices of one series."""
    files = sorted((shared_data() / "mr-philips-achieva").rglob("*.dcm"))[:6]
    return [_pixels(f) for f in files]


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """pydicom's real RGB ultrasound frame (480x640)."""
    path = get_testdata_file("US1_UNCR.dcm")
    assert isinstance(path, str)
    return _pixels(path)


def _sse(decoded: np.ndarray, original: np.ndarray) -> int:
    err = decoded.astype(np.int64) - original.astype(np.int64)
    return int((err * err).sum())


def _check(config: dict[str, Any], pixels: np.ndarray, context: bytes | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Encode, decode from the bytes alone (plus the context), check shape/dtype/WCSS; return (decoded, stats)."""
    data, stats = get_codec(config).encode_with_stats(pixels, context)
    header = read_frame_header(data)
    assert header.codec_id == "kmeans" and header.lossy
    decoded = decode_frame(data, context)
    assert decoded.dtype == pixels.dtype and decoded.shape == pixels.shape
    assert stats["wcss"] == _sse(decoded, pixels)  # it IS the reconstruction's squared error
    assert set(stats) >= {"k", "wcss", "palette_bytes", "index_bytes"}
    assert len(data) > stats["index_bytes"] + stats["palette_bytes"]
    return decoded, stats


@pytest.mark.parametrize("k", [16, 64])
def test_ct_k_respected_and_wcss_exact(ct: np.ndarray, k: int) -> None:
    decoded, stats = _check({"id": "kmeans", "k": k}, ct)
    assert stats["k"] == len(np.unique(decoded)) <= k
    # exact 1-D k-means on ~2000 levels: far better than uniform steps of the range
    step = (int(ct.max()) - int(ct.min())) / k
    assert stats["wcss"] / ct.size < step**2 / 12


def test_mr_all_levels_is_lossless(mr_series: list[np.ndarray]) -> None:
    frame = mr_series[0]
    decoded, stats = _check({"id": "kmeans", "k": 65536}, frame)
    assert stats["wcss"] == 0 and np.array_equal(decoded, frame)
    assert stats["k"] == len(np.unique(frame))


def test_default_is_k64_and_codec_is_lossy() -> None:
    codec = get_codec({"id": "kmeans"})
    assert isinstance(codec, KMeansCodec)
    assert codec.max_error is None and not codec.lossless
    assert codec.get_config() == {"id": "kmeans", **dataclasses.asdict(KMeansConfig())}
    assert get_codec(codec.get_config()) == codec


def test_max_rmse_picks_the_smallest_k(ct: np.ndarray) -> None:
    rmse = 30.0
    _, stats = _check({"id": "kmeans", "max_rmse": rmse}, ct)
    k = stats["k"]
    target = rmse**2 * ct.size
    assert stats["wcss"] <= target
    levels, counts = histogram(ct)
    assert all(gray_quantize(levels, counts, j)[2] > target for j in range(1, k))


def test_max_rmse_capped_by_max_k(mr_series: list[np.ndarray]) -> None:
    _, stats = _check({"id": "kmeans", "max_rmse": 0.0, "max_k": 8}, mr_series[1])
    assert stats["k"] == 8


def test_elbow(mr_series: list[np.ndarray]) -> None:
    _, stats = _check({"id": "kmeans", "elbow": True, "max_k": 64}, mr_series[2])
    assert 2 <= stats["k"] < 64
    assert elbow_k([1, 2, 3, 4, 5], [100.0, 20.0, 10.0, 8.0, 7.0]) == 2


@pytest.mark.parametrize("index_codec", ["jpegxl", "smallest"])
def test_index_codecs(ct: np.ndarray, index_codec: str) -> None:
    _, stats = _check({"id": "kmeans", "k": 32, "index_codec": index_codec}, ct)
    assert stats["index_codec"] in ("jpegls", "jpegxl")


def test_small_integer_types(ct: np.ndarray) -> None:
    as_int8 = np.clip(ct[::4, ::4] // 16, -128, 127).astype(np.int8)
    as_uint8 = (np.clip(ct[::4, ::4], 0, 4095) // 16).astype(np.uint8)
    for frame in (as_int8, as_uint8, np.full((7, 5), -3, np.int16)):
        decoded, _ = _check({"id": "kmeans", "k": 4}, frame)
        assert len(np.unique(decoded)) <= 4


def test_colour_real_rgb(rgb: np.ndarray) -> None:
    decoded, stats = _check({"id": "kmeans", "k": 16}, rgb)
    colours = np.unique(decoded.reshape(-1, 3), axis=0)
    assert len(colours) == stats["k"] <= 16
    assert stats["wcss"] / rgb.size < 8.0**2  # per-sample RMSE of the 16-colour ultrasound


def test_colour_with_few_colours_is_exact() -> None:
    path = get_testdata_file("SC_rgb.dcm")
    assert isinstance(path, str)
    frame = _pixels(path)
    decoded, stats = _check({"id": "kmeans", "k": 64}, frame)
    assert stats["wcss"] == 0 and np.array_equal(decoded, frame)
    decoded, stats = _check({"id": "kmeans", "k": 3}, frame)
    assert len(np.unique(decoded.reshape(-1, 3), axis=0)) <= 3


def test_series_palette_as_context(mr_series: list[np.ndarray]) -> None:
    codec = get_codec({"id": "kmeans", "k": 32})
    context = codec.fit(mr_series)
    assert context is not None
    kind, palette = unpack_context(context)
    assert kind == 0 and len(palette) == 32
    for frame in mr_series[:2]:
        data = codec.encode(frame, context)
        decoded, stats = _check({"id": "kmeans", "k": 32}, frame, context)
        assert stats["palette_bytes"] == 0
        assert set(np.unique(decoded)) <= set(palette.tolist())
        with pytest.raises(CodecError):
            decode_frame(data)
        with pytest.raises(CodecError):
            decode_frame(data, context + b"x")
    with pytest.raises(CodecError):  # a gray palette for a colour frame
        codec.encode(np.zeros((4, 4, 3), np.uint8), context)


@pytest.mark.parametrize(
    "config",
    [
        {"k": 0},
        {"k": True},
        {"k": 70000},
        {"k": "64"},
        {"k": 8, "max_rmse": 3.0},
        {"max_rmse": -1.0},
        {"max_rmse": float("nan")},
        {"elbow": "yes"},
        {"elbow": True, "k": 4},
        {"max_k": 1},
        {"index_codec": "png"},
        {"colours": 4},
    ],
)
def test_bad_configs(config: dict[str, Any]) -> None:
    with pytest.raises(CodecError):
        get_codec({"id": "kmeans", **config})


def test_corrupt_payload_raises(ct: np.ndarray) -> None:
    data = get_codec({"id": "kmeans", "k": 8}).encode(ct[:64, :64])
    header = read_frame_header(data)
    payload = data[header.header_length :]
    for bad in (payload[:5], payload[:-10], payload[:2] + b"\x07" + payload[3:]):
        with pytest.raises(CodecError):
            KMeansCodec.decode_payload(bad, header, None)


def test_decode_bit_exact_with_1_and_2_threads(ct: np.ndarray, rgb: np.ndarray) -> None:
    for frame in (ct, rgb):
        data = get_codec({"id": "kmeans", "k": 16}).encode(frame)
        with threadpool_limits(1):
            one = decode_frame(data)
        with threadpool_limits(2):
            two = decode_frame(data)
        assert one.tobytes() == two.tobytes()
    with threadpool_limits(1):
        a = get_codec({"id": "kmeans", "k": 16}).encode(ct)
    with threadpool_limits(2):
        b = get_codec({"id": "kmeans", "k": 16}).encode(ct)
    assert a == b  # gray encoding is deterministic too (exact 1-D k-means)


def test_colour_sample_path_uses_minibatch(rgb: np.ndarray) -> None:
    """Frames with more distinct colours than the sample size are fitted on a fixed pixel sample."""
    colours, weights = colour_source([rgb], size=100)  # US1 has ~280 colours: forces the sample path
    assert len(colours) == 100 and int(weights.max()) == 1
    first = colour_palette(colours, weights, 8, rgb.dtype)
    assert len(first) <= 8
    assert np.array_equal(first, colour_palette(*colour_source([rgb], size=100), 8, rgb.dtype))  # fixed seed


def test_colour_series_palette(rgb: np.ndarray) -> None:
    codec = get_codec({"id": "kmeans", "k": 8})
    context = codec.fit([rgb, rgb[::-1]])
    assert context is not None and unpack_context(context)[0] == 1
    decoded, stats = _check({"id": "kmeans", "k": 8}, rgb, context)
    assert stats["palette_bytes"] == 0 and len(np.unique(decoded.reshape(-1, 3), axis=0)) <= 8
    with pytest.raises(CodecError):  # frames of both kinds cannot share a palette
        codec.fit([rgb, rgb[:, :, 0]])


def test_large_series_palette_on_a_frame_using_few_entries(mr_series: list[np.ndarray]) -> None:
    """A 300-entry palette where this frame only needs entries < 256: the index map must still code right."""
    codec = get_codec({"id": "kmeans", "k": 300})
    context = codec.fit([mr_series[0], mr_series[0] + 3000])
    assert context is not None and len(unpack_context(context)[1]) > 256
    _check({"id": "kmeans", "k": 300}, mr_series[0], context)
