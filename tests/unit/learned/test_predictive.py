"""Exactness of the learned codec's integer inference and its shipped bundle.

The integer MLP is run as float64 products of integers; here it is compared with an int64 reference
(pure integer arithmetic), and whole encodes/decodes are compared between processes limited to 1
and to 2 BLAS/OpenMP threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from archive.codecs.learned import int_model
from archive.learned import predictive as P
from archive.learned.bundle import MANIFEST, WEIGHTS, bundle_dir, load_bundle
from archive.learned.train_learned import SHIPPED
from tests.conftest import shared_data

REPO = Path(__file__).resolve().parents[3]


def _int_reference(model: P.IntModel, phase: int, feats: np.ndarray[Any, Any], level: int) -> tuple[Any, Any]:
    """The same MLP in int64 with the level one-hot as an input (exact by construction): the float64
    path, which folds the one-hot into a bias, must equal it bit for bit."""
    w1, w1_level, b1, w2, b2, w3, b3 = (a.astype(np.int64) for a in model.layers[phase])
    x = feats.astype(np.int64)
    x[-P.MAX_LEVELS:] = 0
    x[-P.MAX_LEVELS + level] = P.IN_SCALE
    h1 = np.clip(np.concatenate([w1, w1_level], axis=1) @ x + b1, 0, 1 << 31)
    h2 = np.clip((w2 @ h1 + b2) >> (P.BIAS_UNITS[1] - 8), 0, 1 << 24)
    out = np.clip((w3 @ h2 + b3) >> (P.BIAS_UNITS[2] - 12), -P.OUT_CLIP, P.OUT_CLIP)
    return out[0], out[1]


def test_float64_inference_equals_integer_reference() -> None:
    model = int_model(SHIPPED)
    rng = np.random.default_rng(0)
    for phase in range(len(P.PHASES)):
        n_in = P.n_inputs(phase)
        feats = rng.integers(-P.FEATURE_CLIP, P.FEATURE_CLIP, size=(n_in, 5000), endpoint=True).astype(np.float64)
        feats[:, :10] = P.FEATURE_CLIP  # the bound itself
        feats[:, 10:20] = -P.FEATURE_CLIP
        for level in range(P.MAX_LEVELS):
            mu, lsig = P.mlp(model, phase, feats, level)
            ref_mu, ref_lsig = _int_reference(model, phase, feats, level)
            assert np.array_equal(mu, ref_mu) and np.array_equal(lsig, ref_lsig)
        # the documented bound: every partial sum of the second layer stays below 2^53
        w2 = model.layers[phase][3]
        assert np.abs(w2).sum(axis=1).max() * 2.0**31 + 2.0**36 < 2.0**53


def test_log2x8_is_exact() -> None:
    s = np.arange(1, 70000, dtype=np.int64)
    expected = np.array([max(k for k in range(200) if 2**k <= int(v) ** 8) for v in s[:300]])
    assert np.array_equal(P.log2x8(s[:300]), expected)
    got = P.log2x8(s)
    assert np.all((2.0 ** (got / 8) <= s * (1 + 1e-12)) & (2.0 ** ((got + 1) / 8) > s * (1 - 1e-12)))


def test_quantizer_bound_with_clipping_at_the_dtype_extremes() -> None:
    rng = np.random.default_rng(1)
    for lo, hi in ((0, 255), (-128, 127), (0, 65535), (-32768, 32767)):
        x = rng.integers(lo, hi, size=20000, endpoint=True)
        x[:4] = (lo, hi, lo, hi)
        pred = rng.integers(lo, hi, size=x.size, endpoint=True)
        pred[:4] = (hi, lo, lo, hi)
        for n in (0, 1, 2, 4, 255):
            q = P.quantize(x - pred, n)
            rec = P.reconstruct(pred, q, lo, hi, n)
            assert int(np.abs(rec - x).max()) <= n
            assert rec.min() >= lo and rec.max() <= hi


_CHILD = r"""
import hashlib, sys
import numpy as np, pydicom
from archive.codecs import decode_frame, get_codec
arr = np.asarray(pydicom.dcmread(sys.argv[1]).pixel_array)[:256, :256].copy()
out = []
for n in (0, 2):
    frame = get_codec({"id": "learned", "max_error": n}).encode(arr)
    out.append(hashlib.sha256(frame).hexdigest())
    out.append(hashlib.sha256(decode_frame(frame).tobytes()).hexdigest())
print(" ".join(out))
"""


def test_same_bits_with_one_and_two_threads() -> None:
    path = str(min((shared_data() / "ct-chest-tcia").rglob("*.dcm")))
    digests = []
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        done = subprocess.run([sys.executable, "-c", _CHILD, path], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=120, check=True)
        digests.append(done.stdout.split())
    assert len(digests[0]) == 4 and digests[0] == digests[1]


def test_shipped_bundle_loads_with_its_manifest() -> None:
    folder = bundle_dir(SHIPPED)
    assert not (folder / "checkpoint.pt").exists(), "a training checkpoint must not ship"
    assert (folder / WEIGHTS).stat().st_size < 4_000_000
    manifest = json.loads((folder / MANIFEST).read_text())
    for key in ("files", "commit", "command", "data_split", "metrics", "hyperparameters", "tolerance"):
        assert key in manifest, key
    assert manifest["model"] == "learned"
    assert manifest["files"][WEIGHTS] == hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    for key in ("CT_bpp_n0", "CT_bpp_n2", "MR_bpp_n0", "MR_bpp_n2"):
        assert 0 < manifest["metrics"][key] < 16
    assert manifest["data_split"]["validation"]["CT"] > 0 and manifest["data_split"]["train"]["MR"] > 0
    bundle = load_bundle(SHIPPED)
    model = P.model_from_tensors(bundle.tensors, bytes.fromhex(bundle.weights_sha256)[:8])
    assert model.tables.shape == (P.TABLE_SETS, P.N_BINS, P.ALPHABET)
