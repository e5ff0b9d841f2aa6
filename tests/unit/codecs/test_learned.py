"""The ``learned`` predictive codec: bit-exact lossless and |error| <= N round trips on real CT and MR,
every dtype at its extremes, odd and tiny shapes, and refusals (other weights, truncated payloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from archive.codecs import decode_frame, get_codec, read_frame_header
from archive.codecs.frame import payload_of
from archive.codecs.learned import LearnedCodec, LearnedConfig
from archive.errors import CodecError
from archive.learned import predictive
from tests.conftest import shared_data


def _pixels(path: Path) -> np.ndarray[Any, Any]:
    return np.asarray(pydicom.dcmread(path).pixel_array)


@pytest.fixture(scope="module")
def ct() -> np.ndarray[Any, Any]:
    """A real CT slice (int16, 512 x 512) cropped to 128 x 128 around the body."""
    arr = _pixels(min((shared_data() / "ct-chest-tcia").rglob("*.dcm")))
    return np.ascontiguousarray(arr[200:328, 180:308])


@pytest.fixture(scope="module")
def mr() -> np.ndarray[Any, Any]:
    """A real Philips MR image (uint16, 12 bits stored)."""
    return _pixels(min((shared_data() / "mr-philips-achieva").rglob("*.dcm")))


def _round_trip(arr: np.ndarray[Any, Any], n: int) -> tuple[bytes, np.ndarray[Any, Any]]:
    codec = get_codec({"id": "learned", "max_error": n})
    frame = codec.encode(arr)
    header = read_frame_header(frame)
    assert header.codec_id == "learned", "the learned codec must run, not the zstd fallback"
    out = decode_frame(frame)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    return frame, out


@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_real_ct_and_mr_round_trip(ct: np.ndarray[Any, Any], mr: np.ndarray[Any, Any], n: int) -> None:
    for arr in (ct, mr):
        frame, out = _round_trip(arr, n)
        err = np.abs(out.astype(np.int64) - arr.astype(np.int64))
        assert int(err.max()) <= n
        if n == 0:
            assert np.array_equal(out, arr)
            raw_bits = 8 * arr.nbytes
            assert 8 * len(frame) < 0.6 * raw_bits, "lossless learned coding should compress real images"


DTYPES = [np.uint8, np.int8, np.uint16, np.int16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 53), (1, 7), (16, 16), (9, 200), (70, 33)])
def test_every_dtype_extremes_and_odd_shapes(dtype: type[np.integer[Any]], shape: tuple[int, int]) -> None:
    info = np.iinfo(dtype)
    rng = np.random.default_rng(sum(shape))
    noise = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    noise.flat[0] = info.min
    noise.flat[-1] = info.max
    smooth = np.clip(np.add.outer(np.arange(shape[0]) * 3, np.arange(shape[1]) * 5) + info.min, info.min,
                     info.max).astype(dtype)
    smooth[shape[0] // 2:, : shape[1] // 2] = info.max  # a step to the top of the range
    for arr in (noise, smooth):
        for n in (0, 1, 4, 255):
            _frame, out = _round_trip(arr, n)
            err = np.abs(out.astype(np.int64) - arr.astype(np.int64))
            assert int(err.max()) <= n, (dtype, shape, n)
            if n == 0:
                assert np.array_equal(out, arr)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_images(dtype: type[np.integer[Any]]) -> None:
    info = np.iinfo(dtype)
    for value in (info.min, 0, info.max):
        arr = np.full((40, 24), value, dtype)
        frame, out = _round_trip(arr, 2)
        assert np.array_equal(out, arr)
        assert len(frame) < 150


def test_colour_falls_back_to_zstd() -> None:
    arr = np.zeros((8, 8, 3), np.uint8)
    frame = LearnedCodec().encode(arr)
    assert read_frame_header(frame).codec_id == "zstd"
    assert np.array_equal(decode_frame(frame), arr)


def test_config_and_versions() -> None:
    codec = get_codec({"id": "learned", "max_error": 2})
    assert isinstance(codec, LearnedCodec) and codec.max_error == 2 and not codec.lossless
    assert codec.get_config() == {"id": "learned", "max_error": 2, "model": "learned-v1"}
    versions = codec.library_versions()
    assert versions["model"].startswith("learned-v1@") and len(versions["model"]) == len("learned-v1@") + 12
    assert "constriction" in versions
    for bad in ({"max_error": -1}, {"max_error": 256}, {"max_error": True}, {"model": "no-such-model"},
                {"model": "../models"}):
        with pytest.raises(CodecError):
            LearnedConfig(**bad)  # type: ignore[arg-type]


def test_stats(ct: np.ndarray[Any, Any]) -> None:
    frame, stats = LearnedCodec(LearnedConfig(max_error=0)).encode_with_stats(ct)
    assert stats["model"] == "learned-v1" and stats["levels"] == predictive.levels_for(*ct.shape)
    assert 0 < stats["base_bytes"] < stats["bytes"] < len(frame)


def test_other_weights_and_truncation_are_refused(ct: np.ndarray[Any, Any]) -> None:
    frame = LearnedCodec(LearnedConfig(max_error=0)).encode(ct)
    header = read_frame_header(frame)
    payload = payload_of(frame, header)
    name_end = 1 + payload[0]
    digest_at = name_end + 1  # format version, then the weights digest
    other = bytearray(payload)
    other[digest_at] ^= 0xFF
    with pytest.raises(CodecError, match="weights"):
        LearnedCodec.decode_payload(bytes(other), header, None)
    unknown = bytearray(payload)
    unknown[1:name_end] = b"x" * (name_end - 1)
    with pytest.raises(CodecError):
        LearnedCodec.decode_payload(bytes(unknown), header, None)
    for cut in (0, 5, name_end + 10, len(payload) // 2, len(payload) - 3):
        with pytest.raises(CodecError):
            LearnedCodec.decode_payload(payload[:cut], header, None)
    with pytest.raises(CodecError):
        decode_frame(frame[:-7])
