"""Frozen golden fixtures: every stored frame still decodes to its stored pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from archive.codecs import decode_frame, get_codec, read_frame_header
from archive.codecs.registry import LOSSLESS_STANDARD

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "codecs"
CASES = sorted(FIXTURES.glob("*/*.bin"))


def test_every_builtin_codec_has_fixtures() -> None:
    for codec_id in LOSSLESS_STANDARD:
        cases = sorted((FIXTURES / codec_id).glob("*.bin"))
        assert len(cases) >= 5, f"no golden fixtures for {codec_id}"
        for case in cases:
            assert case.with_suffix(".json").is_file() and case.with_suffix(".npy").is_file()


@pytest.mark.parametrize("bin_path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_fixture_decodes_exactly(bin_path: Path) -> None:
    data = bin_path.read_bytes()
    expected = np.load(bin_path.with_suffix(".npy"), allow_pickle=False)
    config = json.loads(bin_path.with_suffix(".json").read_text())
    assert config["id"] == bin_path.parent.name

    for decoded in (decode_frame(data), get_codec(config).decode(data)):
        assert decoded.dtype == expected.dtype
        assert decoded.shape == expected.shape
        assert np.array_equal(decoded, expected)

    header = read_frame_header(data)
    if bin_path.stem.startswith("fallback"):
        assert header.codec_id == "zstd"
    else:
        assert header.codec_id == config["id"]
    # today's encoder still round-trips the same pixels (bytes may differ across library versions)
    assert np.array_equal(get_codec(config).decode(get_codec(config).encode(expected)), expected)
