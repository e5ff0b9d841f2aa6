"""The pca codec on real CT and MR slices: targets met, decoding self-contained and bit-exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from threadpoolctl import threadpool_limits

from archive.codecs import decode_frame, get_codec, read_frame_header
from archive.codecs.frame import payload_of
from archive.codecs.pca import PcaCodec, PcaConfig
from archive.errors import CodecError
from tests.conftest import shared_data


def _pixels(path: Path) -> np.ndarray[Any, Any]:
    return np.asarray(pydicom.dcmread(path).pixel_array)


@pytest.fixture(scope="module")
def ct() -> np.ndarray[Any, Any]:
    return _pixels(min((shared_data() / "ct-chest-tcia").glob("*/axial/*.dcm")))


@pytest.fixture(scope="module")
def ct_series() -> list[np.ndarray[Any, Any]]:
    return [_pixels(p) for p in sorted((shared_data() / "ct-chest-tcia").glob("A0*/axial/*.dcm"))[:3]]


@pytest.fixture(scope="module")
def mr() -> np.ndarray[Any, Any]:
    files = sorted(p for p in (shared_data() / "mr-philips-achieva").rglob("*") if p.is_file())
    return _pixels(files[len(files) // 2])


def _psnr(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    peak = float((1 << (int(a.max()) - int(a.min())).bit_length()) - 1)
    return 10 * np.log10(peak * peak / mse) if mse else float("inf")


@pytest.mark.parametrize("block", [8, 0])
@pytest.mark.parametrize("frame", ["ct", "mr"])
def test_round_trip_meets_variance_and_psnr_rises(frame: str, block: int, request: pytest.FixtureRequest) -> None:
    arr = request.getfixturevalue(frame)
    if block == 0 and arr.shape[1] > 192:  # per-image PCA of a 512-wide CT: ~0.7 s an encode; a crop keeps it lean
        arr = arr[160:352, 160:352]
    psnrs = []
    for variance in (0.95, 0.98, 0.999):
        data, stats = get_codec({"id": "pca", "variance": variance, "block": block}).encode_with_stats(arr)
        header = read_frame_header(data)
        assert header.codec_id == "pca" and header.lossy
        out = decode_frame(data)  # the bytes alone decode
        assert out.dtype == arr.dtype and out.shape == arr.shape
        assert stats["variance_explained"] >= variance
        assert 1 <= stats["components"] <= (64 if block else arr.shape[1])
        assert stats["basis_bytes"] > 0 and stats["coefficient_bytes"] > 0
        # the variance target is a distortion target: 1 - MSE / variance reaches it
        centred = arr.astype(np.float64)
        if block == 0:
            centred = centred - centred.mean(axis=0)
        mse = float(np.mean((out.astype(np.float64) - arr) ** 2))
        assert mse <= 1.25 * (1 - variance) * float(np.var(centred)) + 1.0
        psnrs.append(_psnr(arr, out))
    assert psnrs[0] < psnrs[1] < psnrs[2]


def test_decode_bit_exact_with_one_and_two_threads(ct: np.ndarray[Any, Any]) -> None:
    for config in ({"id": "pca", "variance": 0.999}, {"id": "pca", "components": 20, "block": 0}):
        data = get_codec(config).encode(ct if config.get("block") != 0 else ct[:256, :256])
        with threadpool_limits(1):
            one = decode_frame(data)
        with threadpool_limits(2):
            two = decode_frame(data)
        assert one.tobytes() == two.tobytes()


def test_other_targets(ct: np.ndarray[Any, Any]) -> None:
    _, stats = get_codec({"id": "pca", "components": 5}).encode_with_stats(ct)
    assert stats["components"] == 5
    data = get_codec({"id": "pca", "psnr": 70.0}).encode(ct)
    assert _psnr(ct, decode_frame(data)) >= 69.0
    data = get_codec({"id": "pca", "bpp": 0.5}).encode(ct)
    assert read_frame_header(data).payload_length * 8 / ct.size <= 0.5


def test_small_dtypes_and_colour_fallback() -> None:
    rng = np.random.default_rng(1)
    smooth = np.add.outer(np.arange(37), np.arange(29)).astype(np.int64)
    for dtype in (np.uint8, np.int8, np.uint16, np.int16):
        info = np.iinfo(dtype)
        arr = np.clip(smooth * 2 + rng.integers(-3, 4, smooth.shape) + info.min // 2, info.min, info.max).astype(dtype)
        out = decode_frame(get_codec({"id": "pca", "variance": 0.999}).encode(arr))
        assert out.dtype == arr.dtype and out.shape == arr.shape
    colour = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    assert read_frame_header(get_codec({"id": "pca"}).encode(colour)).codec_id == "zstd"


def test_series_context(ct_series: list[np.ndarray[Any, Any]]) -> None:
    codec = get_codec({"id": "pca", "variance": 0.999})
    context = codec.fit(ct_series)
    assert context is not None
    data, stats = codec.encode_with_stats(ct_series[1], context)
    assert stats["uses_context"] and stats["basis_bytes"] == 0
    assert read_frame_header(data).context_sha256 is not None
    out = decode_frame(data, context)
    assert _psnr(ct_series[1], out) > 45  # range peak (13 bits): ~65 dB at peak 2^16 - 1
    with pytest.raises(CodecError):
        decode_frame(data)
    with pytest.raises(CodecError):
        decode_frame(data, context[:-4] + b"\0\0\0\0")
    with pytest.raises(CodecError):  # the payload alone, without its context
        PcaCodec.decode_payload(payload_of(data, read_frame_header(data)), read_frame_header(data), None)


@pytest.mark.parametrize(
    "config",
    [
        {"id": "pca", "variance": 0.98, "components": 4},
        {"id": "pca", "variance": 1.0},
        {"id": "pca", "variance": "0.9"},
        {"id": "pca", "components": 0},
        {"id": "pca", "psnr": -3},
        {"id": "pca", "bpp": 0},
        {"id": "pca", "block": 1},
        {"id": "pca", "block": 64},
        {"id": "pca", "block": True},
        {"id": "pca", "colour": 1},
    ],
)
def test_bad_configs(config: dict[str, Any]) -> None:
    with pytest.raises(CodecError):
        get_codec(config)


def test_config_round_trip() -> None:
    codec = get_codec({"id": "pca", "variance": 0.95, "block": 0})
    assert get_codec(codec.get_config()) == codec
    assert codec.max_error is None and not codec.lossless
    assert PcaConfig().target() == ("variance", 0.98)


def test_corrupt_payloads_raise(mr: np.ndarray[Any, Any]) -> None:
    data = get_codec({"id": "pca", "variance": 0.999}).encode(mr)
    header = read_frame_header(data)
    payload = payload_of(data, header)
    rng = np.random.default_rng(7)
    for cut in (0, 3, 8, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CodecError):
            PcaCodec.decode_payload(payload[:cut], header, None)
    for _ in range(20):  # flipped bytes: the parser raises CodecError or the reconstruction CRC does
        bad = bytearray(data)
        pos = int(rng.integers(header.header_length, len(data)))
        bad[pos] ^= 0xFF
        with pytest.raises(CodecError):
            decode_frame(bytes(bad))
