"""The contract every lossy configuration keeps (real CT and MR slices): self-contained bytes, a checked
reconstruction, a bound where one is promised, the same bits on every decode, corruption caught."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pydicom
import pytest

from archive.codecs import decode_frame, get_codec, read_frame_header
from archive.errors import CodecError
from tests.conftest import shared_data

LOSSY_CONFIGS: list[dict[str, Any]] = [
    {"id": "jpegls", "near": 2},
    {"id": "pca", "variance": 0.98},
    {"id": "pca", "variance": 0.95, "block": 0},
    {"id": "kmeans", "k": 64},
    {"id": "bounded", "inner": {"id": "pca", "variance": 0.98}, "max_error": 2},
    {"id": "bounded", "inner": {"id": "kmeans", "k": 64}, "max_error": 1},
    {"id": "learned", "max_error": 2},
    {"id": "gan", "bpp": 0.25, "modality": "CT"},
]
IDS = [json.dumps(c, sort_keys=True) for c in LOSSY_CONFIGS]


def _slice(relative: str) -> np.ndarray:
    path = next(iter(sorted((shared_data() / relative).rglob("*.dcm"))))
    return np.asarray(pydicom.dcmread(path).pixel_array)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return [_slice("ct-chest-tcia"), _slice("mr-philips-achieva")]


@pytest.mark.parametrize("config", LOSSY_CONFIGS, ids=IDS)
def test_lossy_roundtrip_keeps_its_promise(config: dict[str, Any], frames: list[np.ndarray]) -> None:
    codec = get_codec(config)
    assert not codec.lossless
    assert get_codec(json.loads(json.dumps(codec.get_config()))) == codec  # config round-trips through JSON
    for frame in frames:
        data = codec.encode(frame)
        header = read_frame_header(data)
        assert header.version == 2 and header.lossy and header.context_sha256 is None  # alone: decodes alone
        decoded = decode_frame(data)
        assert decoded.dtype == frame.dtype and decoded.shape == frame.shape
        assert np.array_equal(decoded, codec.decode(data))  # the same bits every time
        error = int(np.abs(decoded.astype(np.int64) - frame.astype(np.int64)).max())
        if codec.max_error is not None:
            assert error <= codec.max_error
        assert len(data) < frame.nbytes  # it compresses


@pytest.mark.parametrize("config", LOSSY_CONFIGS, ids=IDS)
def test_lossy_corruption_is_caught(config: dict[str, Any], frames: list[np.ndarray]) -> None:
    data = bytearray(get_codec(config).encode(frames[1]))
    header = read_frame_header(bytes(data))
    for position in (header.header_length, header.header_length + len(data) // 3, len(data) - 1):
        broken = bytearray(data)
        broken[min(position, len(data) - 1)] ^= 0x5A
        with pytest.raises(CodecError):
            decode_frame(bytes(broken))


def test_bounded_zero_is_lossless(frames: list[np.ndarray]) -> None:
    codec = get_codec({"id": "bounded", "inner": {"id": "pca", "variance": 0.95}, "max_error": 0})
    assert codec.lossless
    for frame in frames:
        data = codec.encode(frame)
        assert not read_frame_header(data).lossy
        assert np.array_equal(decode_frame(data), frame)
