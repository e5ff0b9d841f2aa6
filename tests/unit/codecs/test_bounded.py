"""The "bounded" wrapper keeps |original - decoded| <= N on every pixel, on real CT and MR.

Inner codecs: a deterministic stand-in defined here (8x8 block means), an
adversarial one (every pixel reconstructed at the far end of the dtype range),
lossless JPEG-LS, and the real kmeans / pca codecs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pydicom
import pytest
from threadpoolctl import threadpool_limits

from archive.codecs import (
    _residual,
    decode_frame,
    get_codec,
    read_frame_header,
    register_codec,
)
from archive.codecs._pixels import Pixels, zstd_decode_raw, zstd_encode_raw
from archive.codecs.base import Codec, CodecConfig, EncodedPayload, check_int
from archive.codecs.bounded import BoundedCodec
from archive.codecs.frame import FrameHeader, payload_of
from archive.errors import CodecError
from tests.conftest import shared_data

# -- stand-in inner codecs --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _BlockMeanConfig(CodecConfig):
    block: int = 8

    def validate(self) -> None:
        check_int("block", self.block, 1, 64)


@register_codec
class BlockMeanCodec(Codec):
    """Lossy stand-in: integer means of BxB blocks, nearest upsampling (deterministic, integer only)."""

    codec_id: ClassVar[str] = "test-blockmean"
    config_class: ClassVar[type[CodecConfig]] = _BlockMeanConfig
    __slots__ = ()

    @property
    def max_error(self) -> int | None:
        return None

    def _encode_payload(
        self, arr: Pixels, context: bytes | None
    ) -> EncodedPayload | None:
        b = self.config.block  # type: ignore[attr-defined]
        rows, cols = arr.shape[:2]
        pr, pc = -rows % b, -cols % b
        pad = ((0, pr), (0, pc)) + ((0, 0),) * (arr.ndim - 2)
        p = np.pad(arr.astype(np.int64), pad, mode="edge")
        blocks = p.reshape(p.shape[0] // b, b, p.shape[1] // b, b, *arr.shape[2:]).sum(
            axis=(1, 3)
        ) // (b * b)
        return EncodedPayload(
            bytes([b]) + zstd_encode_raw(blocks.astype(np.int32), 3), arr.dtype
        )

    @classmethod
    def decode_payload(
        cls, payload: bytes, header: FrameHeader, context: bytes | None
    ) -> Pixels:
        b = payload[0]
        rows, cols = header.shape[:2]
        shape = (-(-rows // b), -(-cols // b), *header.shape[2:])
        means = zstd_decode_raw(payload[1:], np.dtype("<i4"), shape)
        up = np.repeat(np.repeat(means, b, axis=0), b, axis=1)[:rows, :cols]
        return up.astype(header.dtype)


@register_codec
class FarCodec(Codec):
    """Adversarial stand-in: 1 bit per pixel, reconstructs each pixel at the dtype end FARTHEST from it."""

    codec_id: ClassVar[str] = "test-far"
    config_class: ClassVar[type[CodecConfig]] = _BlockMeanConfig
    __slots__ = ()

    @property
    def max_error(self) -> int | None:
        return None

    def _encode_payload(
        self, arr: Pixels, context: bytes | None
    ) -> EncodedPayload | None:
        info = np.iinfo(arr.dtype)
        low = arr.astype(np.int64) < (int(info.min) + int(info.max)) // 2
        return EncodedPayload(zstd_encode_raw(low.astype(np.uint8), 3), arr.dtype)

    @classmethod
    def decode_payload(
        cls, payload: bytes, header: FrameHeader, context: bytes | None
    ) -> Pixels:
        low = zstd_decode_raw(payload, np.dtype("|u1"), header.shape).astype(bool)
        info = np.iinfo(header.dtype)
        return np.where(low, info.max, info.min).astype(header.dtype)


STAND_IN = {"id": "test-blockmean", "block": 8}

# -- data ----------------------------------------------------------------------------


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(pydicom.dcmread(path).pixel_array)


@pytest.fixture(scope="module")
def ct() -> np.ndarray:
    arr = _pixels(min((shared_data() / "ct-chest-tcia").rglob("*.dcm")))
    assert arr.shape == (512, 512)
    return arr


@pytest.fixture(scope="module")
def mr() -> np.ndarray:
    files = sorted(
        p for p in (shared_data() / "mr-philips-achieva").rglob("*") if p.is_file()
    )
    arr = _pixels(files[len(files) // 2])
    assert arr.ndim == 2 and arr.dtype.kind == "u"
    return arr


def _bounded(inner: dict[str, Any], n: int) -> Codec:
    return get_codec({"id": "bounded", "inner": inner, "max_error": n})


def _check(
    codec: Codec, arr: np.ndarray, n: int, context: bytes | None = None
) -> tuple[bytes, dict[str, Any]]:
    data, stats = codec.encode_with_stats(arr, context)
    out = decode_frame(data, context)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    err = np.abs(out.astype(np.int64) - arr.astype(np.int64))
    assert int(err.max()) <= n
    if n == 0:
        assert np.array_equal(out, arr)
    header = read_frame_header(data)
    assert header.codec_id == "bounded"
    assert header.lossy == (n > 0)
    assert stats["inner_bytes"] + stats["residual_bytes"] < len(data)
    assert stats["residual_coder"] in ("jpegls", "context")
    assert stats["measured_max_error"] == int(err.max())
    return data, stats


# -- the bound on real data ----------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_bound_holds_on_real_ct_and_mr(ct: np.ndarray, mr: np.ndarray, n: int) -> None:
    for arr in (np.ascontiguousarray(ct[128:384, 128:384]), mr):
        codec = _bounded(STAND_IN, n)
        assert codec.max_error == n and codec.lossless == (n == 0)
        _, stats = _check(codec, arr, n)
        assert stats["inner_codec"] == "test-blockmean"


@pytest.mark.parametrize("inner", [STAND_IN, {"id": "kmeans", "k": 64}])
def test_decoding_is_the_same_with_one_and_two_threads(
    ct: np.ndarray, inner: dict[str, Any]
) -> None:
    data, _ = _check(_bounded(inner, 2), ct, 2)
    with threadpool_limits(1):
        one = decode_frame(data)
    with threadpool_limits(2):
        two = decode_frame(data)
    assert np.array_equal(one, two)
    assert read_frame_header(
        data
    ).lossy  # decoding is checked against the CRC of the reconstruction


def test_lossless_inner_costs_almost_nothing_more(ct: np.ndarray) -> None:
    data, stats = _check(_bounded({"id": "jpegls"}, 0), ct, 0)
    plain = get_codec({"id": "jpegls"}).encode(ct)
    assert stats["residual_bytes"] < 200
    assert len(data) < len(plain) + 300


def test_both_residual_coders_round_trip(ct: np.ndarray) -> None:
    """Each coder alone decodes to the reconstruction it promised, whichever one the codec picks."""
    arr = np.ascontiguousarray(ct[128:320, 96:352])
    inner = decode_frame(get_codec(STAND_IN).encode(arr))
    for n in (0, 3):
        data, recon = _residual.encode_context(arr, inner, n)
        assert np.array_equal(
            _residual.decode_context(data, inner, n, arr.dtype), recon
        )
        assert int(np.abs(recon.astype(np.int64) - arr).max()) <= n
        q = _residual.quantize(arr, inner, n)
        jls = _residual.encode_jpegls(q)
        assert jls is not None
        assert np.array_equal(_residual.decode_jpegls(jls, q.shape), q)


@pytest.mark.parametrize(
    "inner", [{"id": "kmeans", "k": 64}, {"id": "pca", "variance": 0.98}]
)
def test_real_inner_codecs(
    ct: np.ndarray, mr: np.ndarray, inner: dict[str, Any]
) -> None:
    for arr in (ct, mr):
        _, stats = _check(_bounded(inner, 2), arr, 2)
        assert stats["inner_codec"] == inner["id"]
        assert isinstance(stats["inner_stats"], dict)


def test_series_context_is_handed_to_the_inner_codec(mr: np.ndarray) -> None:
    frames = [mr, np.ascontiguousarray(mr[::-1])]
    codec = _bounded({"id": "kmeans", "k": 16}, 1)
    context = codec.fit(frames)
    assert context is not None
    data, _ = _check(codec, frames[1], 1, context)
    assert read_frame_header(data).context_sha256 is not None
    with pytest.raises(CodecError):
        decode_frame(data)
    with pytest.raises(CodecError):
        decode_frame(data, context + b"x")


# -- extremes ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", ["int16", "uint16", "uint8", "int8"])
@pytest.mark.parametrize("n", [0, 1, 5])
def test_extreme_values_keep_the_bound(dtype_name: str, n: int) -> None:
    """Pixels at the dtype's min and max, against an inner that is as wrong as possible."""
    info = np.iinfo(np.dtype(dtype_name))
    rng = np.random.default_rng(7)
    arr = rng.integers(
        int(info.min), int(info.max), size=(40, 56), endpoint=True
    ).astype(dtype_name)
    arr[::3, ::2] = info.min
    arr[1::3, 1::2] = info.max
    arr[:4] = info.max
    arr[-4:] = info.min
    arr[10:20, 10:20] = info.max - np.arange(10)[:, None] % max(1, n + 1)
    for inner in ({"id": "test-far"}, STAND_IN):
        _, stats = _check(_bounded(inner, n), arr, n)
        if inner["id"] == "test-far" and n == 0 and dtype_name.endswith("16"):
            # residuals span 17 bits: too wide for JPEG-LS, the context coder's escapes carry them
            assert stats["residual_coder"] == "context"


def test_colour_frame(ct: np.ndarray) -> None:
    rgb = np.stack([ct[:64, :80], ct[64:128, :80], ct[128:192, :80]], axis=2)
    for n in (0, 2):
        _check(_bounded(STAND_IN, n), rgb, n)


# -- corruption -----------------------------------------------------------------------------


def _header_and_payload(data: bytes) -> tuple[FrameHeader, bytes]:
    header = read_frame_header(data)
    return header, payload_of(data, header)


def test_corrupt_payload_raises(mr: np.ndarray) -> None:
    data = _bounded(STAND_IN, 2).encode(mr)
    for pos in (len(data) // 2, len(data) - 3):
        broken = bytearray(data)
        broken[pos] ^= 0x5A
        with pytest.raises(CodecError):
            decode_frame(bytes(broken))
    header, payload = _header_and_payload(data)
    bad_payloads = [
        payload[:5],  # truncated head
        payload[:40],  # truncated inner frame
        payload[:-8],  # truncated residual
        bytes([9]) + payload[1:],  # unknown format
        payload[:1] + bytes([7]) + payload[2:],  # unknown residual coder
    ]
    inner_length = int.from_bytes(payload[4:8], "little")
    inner = bytearray(payload)
    inner[8 + inner_length // 2] ^= 0xFF  # inner frame corrupt: its own CRCs catch it
    bad_payloads.append(bytes(inner))
    for bad in bad_payloads:
        with pytest.raises(CodecError):
            BoundedCodec.decode_payload(bad, header, None)


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"id": "bounded"},
        {"id": "bounded", "max_error": 2},
        {"id": "bounded", "inner": None, "max_error": 2},
        {"id": "bounded", "inner": "jpegls", "max_error": 2},
        {"id": "bounded", "inner": {}, "max_error": 2},
        {"id": "bounded", "inner": {"id": "nope"}, "max_error": 2},
        {"id": "bounded", "inner": {"id": "pca", "bogus": 1}, "max_error": 2},
        {
            "id": "bounded",
            "inner": {"id": "bounded", "inner": {"id": "jpegls"}, "max_error": 1},
            "max_error": 2,
        },
        {"id": "bounded", "inner": {"id": "jpegls"}, "max_error": -1},
        {"id": "bounded", "inner": {"id": "jpegls"}, "max_error": True},
        {"id": "bounded", "inner": {"id": "jpegls"}, "max_error": 2.0},
        {"id": "bounded", "inner": {"id": "jpegls"}, "max_error": 40000},
        {"id": "bounded", "inner": {"id": "jpegls"}, "max_error": 2, "extra": 1},
    ],
)
def test_bad_configs_raise(config: dict[str, Any]) -> None:
    with pytest.raises(CodecError):
        get_codec(config)


def test_config_round_trips_through_json() -> None:
    config = {"id": "bounded", "inner": {"id": "pca", "variance": 0.98}, "max_error": 4}
    codec = get_codec(config)
    again = get_codec(json.loads(json.dumps(codec.get_config())))
    assert again == codec and hash(again) == hash(codec)
    assert codec.get_config() == config
    assert codec.max_error == 4 and not codec.lossless
    assert "constriction" in codec.library_versions()


def test_a_non_deterministic_inner_is_refused() -> None:
    """The GAN's reconstruction may differ by a unit on another machine: no residual could keep a bound on it."""
    with pytest.raises(CodecError, match="cannot wrap 'gan'"):
        get_codec({"id": "bounded", "inner": {"id": "gan", "bpp": 0.1}, "max_error": 2})
    assert get_codec({"id": "bounded", "inner": {"id": "learned", "max_error": 1}, "max_error": 2}).max_error == 2
