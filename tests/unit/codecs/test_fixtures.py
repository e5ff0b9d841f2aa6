"""Frozen golden fixtures: every stored frame still decodes to its stored pixels (containers v1 and v2, lossy too)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from archive.codecs import decode_frame, get_codec, read_frame_header
from archive.codecs.frame import payload_of
from archive.codecs.registry import LOSSLESS_STANDARD
from archive.errors import CodecError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "codecs"
CASES = sorted(FIXTURES.glob("*/*.bin"))
LOSSY_IDS = ("pca", "kmeans", "bounded", "learned", "gan")


def test_every_builtin_codec_has_fixtures() -> None:
    for codec_id in LOSSLESS_STANDARD:
        cases = sorted((FIXTURES / codec_id).glob("*.bin"))
        assert len(cases) >= 5, f"no golden fixtures for {codec_id}"
        assert any(read_frame_header(c.read_bytes()).version == 1 for c in cases)
        assert any(read_frame_header(c.read_bytes()).version == 2 for c in cases)
        for case in cases:
            assert case.with_suffix(".json").is_file() and case.with_suffix(".npy").is_file()
    for codec_id in LOSSY_IDS:
        assert len(sorted((FIXTURES / codec_id).glob("*.bin"))) >= 3, f"no golden fixtures for {codec_id}"
    contexts = sorted(FIXTURES.glob("*/*.ctx"))
    assert {c.parent.name for c in contexts} >= {"pca", "kmeans"}


@pytest.mark.parametrize("bin_path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_fixture_decodes_exactly(bin_path: Path) -> None:
    data = bin_path.read_bytes()
    expected = np.load(bin_path.with_suffix(".npy"), allow_pickle=False)
    config = json.loads(bin_path.with_suffix(".json").read_text())
    context_path = bin_path.with_suffix(".ctx")
    context = context_path.read_bytes() if context_path.is_file() else None
    assert config["id"] == bin_path.parent.name

    header = read_frame_header(data)
    for decoded in (decode_frame(data, context), get_codec(config).decode(data, context)):
        assert decoded.dtype == expected.dtype
        assert decoded.shape == expected.shape
        if header.checks_pixels:
            assert np.array_equal(decoded, expected)
        else:  # the GAN's float generator: its entropy decoding is exact, its pixels within a unit of these
            assert np.abs(decoded.astype(np.int64) - expected.astype(np.int64)).max() <= 1
    if not header.checks_pixels:
        from archive.codecs.gan import latent_digest

        latents = bin_path.with_suffix(".latents").read_text().strip()
        assert latent_digest(payload_of(data, header)) == latents

    codec = get_codec(config)
    if bin_path.stem.startswith("fallback"):
        assert header.codec_id == "zstd"
    else:
        assert header.codec_id == config["id"]
    if context is not None:
        assert header.context_sha256 is not None
        with pytest.raises(CodecError, match="context"):
            decode_frame(data)
    if codec.lossless:
        # today's encoder still round-trips the same pixels (bytes may differ across library versions)
        assert np.array_equal(codec.decode(codec.encode(expected)), expected)
    else:
        assert header.lossy and header.version == 2
