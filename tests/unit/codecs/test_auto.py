"""The "auto" codec: sampling, the trial on real CT and MR, config checks, one frame alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from archive.codecs import decode_frame, get_codec, read_frame_header, register_codec
from archive.codecs._pixels import Pixels
from archive.codecs.auto import (
    AutoCodec,
    Trial,
    default_candidates,
    run_trial,
    sample_indices,
)
from archive.codecs.frame import FrameHeader
from archive.codecs.registry import LOSSLESS_STANDARD
from archive.codecs.zstd import ZstdCodec
from archive.dicom.reader import iter_frames, read_instance
from archive.errors import CodecError
from tests.conftest import shared_data


@register_codec
class _CorruptingZstd(ZstdCodec):
    """Claims lossless but decodes one sample wrong: the container's CRC catches it, the trial must disqualify it."""

    codec_id: ClassVar[str] = "test-auto-corrupting"
    __slots__ = ()

    @classmethod
    def decode_payload(cls, payload: bytes, header: FrameHeader, context: bytes | None) -> Pixels:
        out = np.array(super().decode_payload(payload, header, context))
        out.flat[0] ^= 1
        return out


@register_codec
class _LossyZstd(ZstdCodec):
    """A configuration that promises nothing: not an auto candidate."""

    codec_id: ClassVar[str] = "test-auto-lossy"
    __slots__ = ()

    @property
    def max_error(self) -> int | None:
        return None


def _auto(config: dict[str, Any] | None = None) -> AutoCodec:
    codec = get_codec({"id": "auto", **(config or {})})
    assert isinstance(codec, AutoCodec)
    return codec


def _series(folder: Path, pattern: str = "*.dcm") -> list[list[Pixels]]:
    """Frames per instance, in Instance Number order."""
    parsed = [read_instance(p) for p in sorted(folder.rglob(pattern))]
    parsed.sort(key=lambda p: (p.integer("InstanceNumber") or 0, str(p.source_path)))
    return [list(iter_frames(p)) for p in parsed]


def _whole_series_bytes(frames_by_instance: list[list[Pixels]]) -> dict[str, int]:
    out = {}
    for config in default_candidates():
        codec = get_codec(config)
        out[json.dumps(config, sort_keys=True)] = sum(len(codec.encode(f)) for fs in frames_by_instance for f in fs)
    return out


def _assert_within_one_percent(trial: Trial, frames_by_instance: list[list[Pixels]]) -> None:
    sizes = _whole_series_bytes(frames_by_instance)
    chosen = sizes[json.dumps(trial.winner, sort_keys=True)]
    assert chosen <= 1.01 * min(sizes.values()), (trial.winner, sizes)


@pytest.fixture(scope="module")
def ct_axial() -> list[list[Pixels]]:
    """Four real axial CT slices (512², int16) standing in for a series (the CT set has one slice per series)."""
    return _series(shared_data() / "ct-chest-tcia", "axial/*.dcm")[:4]


@pytest.fixture(scope="module")
def mr_philips() -> list[list[Pixels]]:
    """The first 30 instances of the real Philips dual-echo series (96², uint16)."""
    return _series(shared_data() / "mr-philips-achieva")[:30]


# -- sampling ---------------------------------------------------------------------------------


def test_sample_indices_bounds() -> None:
    for n in range(1, 400):
        for share in (0.1, 0.05, 0.01):
            got = sample_indices(n, share)
            assert 1 <= len(got) <= max(1, n // 10), (n, share, got)
            assert got == sorted(set(got)) and 0 <= got[0] and got[-1] < n
            assert got == sample_indices(n, share)  # deterministic
    assert sample_indices(1) == [0]
    assert sample_indices(9) == [4]  # one, from the middle
    assert sample_indices(21) == [5, 15]  # spread: one per half
    assert sample_indices(120) == list(range(5, 120, 10))
    assert len(sample_indices(100, 0.05)) == 5


@pytest.mark.parametrize(("n", "share"), [(0, 0.1), (-3, 0.1), (10, 0.0), (10, 0.2), (10, True), (10, float("nan"))])
def test_sample_indices_rejects_bad_input(n: int, share: float) -> None:
    with pytest.raises(CodecError):
        sample_indices(n, share)


# -- configuration ----------------------------------------------------------------------------


def test_defaults_are_the_lossless_standard_codecs() -> None:
    auto = get_codec({"id": "auto"})
    assert isinstance(auto, AutoCodec)
    assert [c.codec_id for c in auto.candidate_codecs()] == list(LOSSLESS_STANDARD)
    assert auto.max_error == 0 and auto.lossless
    budgeted = _auto({"max_encode_ms": 50}).candidate_codecs()  # JPEG-XL effort 3 stands in when effort 7 is too slow
    assert [c.get_config() for c in budgeted if c.codec_id == "jpegxl"] == [{"id": "jpegxl", "effort": 7},
                                                                            {"id": "jpegxl", "effort": 3}]


def test_config_json_roundtrip_and_canonical_candidates() -> None:
    auto = get_codec({"id": "auto", "candidates": [{"id": "jpegxl"}, {"id": "jpegls"}], "sample": 0.05,
                      "max_encode_ms": 40})
    config = auto.get_config()
    assert config["candidates"] == ({"id": "jpegxl", "effort": 7}, {"id": "jpegls"})  # defaults filled in
    again = get_codec(json.loads(json.dumps(config)))
    assert again == auto and hash(again) == hash(auto)


@pytest.mark.parametrize(
    "config",
    [
        {"id": "auto", "candidates": [{"id": "jpegxl", "effort": 99}]},
        {"id": "auto", "candidates": [{"id": "no-such-codec"}]},
        {"id": "auto", "candidates": [{"id": "jpegls", "quality": 3}]},
        {"id": "auto", "candidates": [{"id": "auto"}]},
        {"id": "auto", "candidates": [{"id": "test-auto-lossy"}]},
        {"id": "auto", "candidates": ["jpegls"]},
        {"id": "auto", "candidates": "jpegls"},
        {"id": "auto", "candidates": []},
        {"id": "auto", "sample": 0.5},
        {"id": "auto", "sample": 0},
        {"id": "auto", "sample": "0.1"},
        {"id": "auto", "max_encode_ms": -1},
        {"id": "auto", "max_encode_ms": True},
        {"id": "auto", "effort": 7},
    ],
)
def test_invalid_config_raises_at_config_time(config: dict[str, Any]) -> None:
    with pytest.raises(CodecError):
        get_codec(config)


# -- the trial on real series -----------------------------------------------------------------


def test_trial_on_ct_picks_within_one_percent(ct_axial: list[list[Pixels]]) -> None:
    codec, trial = _auto().choose(ct_axial)
    assert (trial.sampled, trial.total, trial.indices) == (1, 4, (2,))
    assert codec.get_config() == trial.winner
    assert all(c.ok and c.bytes > 0 and c.encode_ms > 0 for c in trial.candidates)
    _assert_within_one_percent(trial, ct_axial)
    record = json.loads(json.dumps(trial.as_dict()))  # what the catalog stores
    assert record["winner"] == trial.winner and len(record["candidates"]) == len(LOSSLESS_STANDARD)
    assert set(record["candidates"][0]) >= {"config", "bytes", "encode_ms", "decode_ms", "ok", "reason"}


def test_auto_may_choose_the_learned_codec(ct_axial: list[list[Pixels]]) -> None:
    """On CT the learned predictive codec is smaller than JPEG-LS (bench rd: 2.8 % on the validation CT)."""
    codec, trial = _auto({"candidates": [{"id": "jpegls"}, {"id": "learned"}]}).choose(ct_axial)
    assert codec.codec_id == "learned" and codec.lossless
    sizes = {c.config["id"]: c.bytes for c in trial.candidates}
    assert sizes["learned"] < sizes["jpegls"]
    frame = ct_axial[trial.indices[0]][0]
    assert np.array_equal(decode_frame(codec.encode(frame)), frame)


def test_trial_on_mr_picks_within_one_percent(mr_philips: list[list[Pixels]]) -> None:
    trial = run_trial(_auto(), mr_philips)
    assert (trial.sampled, trial.total, trial.frames) == (3, 30, 3)
    _assert_within_one_percent(trial, mr_philips)


def test_trial_reads_only_the_sample(mr_philips: list[list[Pixels]]) -> None:
    class Lazy(list[list[Pixels]]):
        def __getitem__(self, index: Any) -> Any:
            read.append(index)
            return super().__getitem__(index)

    read: list[int] = []
    run_trial(_auto({"candidates": [{"id": "htj2k"}]}), Lazy(mr_philips))
    assert read == sample_indices(30)


def test_a_candidate_that_does_not_round_trip_is_disqualified(mr_philips: list[list[Pixels]]) -> None:
    auto = _auto({"candidates": [{"id": "test-auto-corrupting", "level": 1}, {"id": "htj2k"}]})
    trial = run_trial(auto, mr_philips)
    broken, fine = trial.candidates
    assert not broken.ok and "CodecError" in broken.reason and fine.ok
    assert trial.winner == {"id": "htj2k"}  # the broken one can never win, however small
    alone = _auto({"candidates": [{"id": "test-auto-corrupting"}]})
    with pytest.raises(CodecError, match="no auto candidate"):
        run_trial(alone, mr_philips)


def test_speed_budget_excludes_slow_candidates(mr_philips: list[list[Pixels]]) -> None:
    auto = _auto({"candidates": [{"id": "jpegxl"}, {"id": "jpegls"}], "max_encode_ms": 1e-6})
    trial = run_trial(auto, mr_philips)
    assert not any(c.ok for c in trial.candidates)
    assert all(c.reason.startswith("over the speed budget") for c in trial.candidates)
    assert "fastest" in trial.note
    fastest = min(trial.candidates, key=lambda c: c.encode_ms_per_slice)
    assert trial.winner == fastest.config


# -- one frame alone --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ct", "mr"])
def test_encode_alone_round_trips_and_beats_jpegls(which: str, ct_axial: list[list[Pixels]],
                                                   mr_philips: list[list[Pixels]]) -> None:
    frame = (ct_axial if which == "ct" else mr_philips)[0][0]
    auto = get_codec({"id": "auto"})
    data, stats = auto.encode_with_stats(frame)
    header = read_frame_header(data)
    assert header.codec_id in LOSSLESS_STANDARD  # the codec that produced it, never "auto"
    assert stats["auto"]["winner"]["id"] == header.codec_id
    decoded = decode_frame(data)
    assert decoded.dtype == frame.dtype and np.array_equal(decoded, frame)
    assert len(data) <= len(get_codec({"id": "jpegls"}).encode(frame))
    assert auto.encode(frame) == data  # deterministic choice, same bytes


def test_auto_takes_no_context_and_decodes_nothing(mr_philips: list[list[Pixels]]) -> None:
    auto = get_codec({"id": "auto"})
    with pytest.raises(CodecError):
        auto.encode(mr_philips[0][0], context=b"basis")
    header = read_frame_header(get_codec({"id": "zstd"}).encode(mr_philips[0][0]))
    with pytest.raises(CodecError):
        AutoCodec.decode_payload(b"", header, None)
