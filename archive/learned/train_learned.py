"""Training of the ``learned`` predictive codec's MLPs (torch, CPU-sized), then the real codec's validation figures.

Features come from the SAME numpy gather code the codec runs (lossless context, train split only);
the loss is the discretised logistic NLL of each pixel given the predicted mean and scale. The
float weights are then quantized to the codec's fixed point, the frequency tables are fitted
(a discretised logistic per scale bin, blended with the symbol counts the integer model gives on
the train split), and the validation split is coded by the real codec at N = 0 and N = 2: those
bits per pixel are the manifest's metrics, not the training loss.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from archive.learned import predictive as P
from archive.learned.bundle import save_bundle
from archive.learned.data import Split
from archive.learned.training import Budget, Checkpointer, Log, seed_everything

SHIPPED: Final[str] = "learned-v1"
DEFAULTS: Final[dict[str, Any]] = {
    # share of the pixels of every level and phase sampled per image: proportional to the pixels the
    # bits per pixel count (the full-resolution level dominates), CT and MR about equally represented
    "ct_fraction": 0.1,
    "mr_fraction": 0.5,
    "batch": 4096,
    "lr": 3e-3,
    "table_prior": 64.0,  # weight (in counts per bin) of the logistic shape against observed symbols
    "eval_every": 0,
}
TOLERANCE: Final[dict[str, float]] = {"bpp": 0.05}


def collect(images: list[tuple[npt.NDArray[Any], float]], rng: np.random.Generator
            ) -> list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
    """(inputs, target x - anchor, local scale s) per phase, from lossless pyramids of (image, share sampled)."""
    parts: dict[int, list[tuple[Any, Any, Any]]] = defaultdict(list)
    for image, fraction in images:
        x = image.astype(np.int64)
        rows, cols = x.shape
        levels = P.levels_for(rows, cols)
        if levels == 0:
            continue
        lo, hi = int(x.min()), int(x.max())
        if hi == lo:
            continue
        unit = 1 << levels
        prows, pcols = -(-rows // unit) * unit, -(-cols // unit) * unit
        padded = np.pad(x, ((0, prows - rows), (0, pcols - cols)), mode="edge")
        err = P.base_error(padded[::unit, ::unit], lo, hi)
        for level in range(levels - 1, -1, -1):
            grid = padded[:: 1 << level, :: 1 << level]
            egrid = np.zeros(grid.shape, np.int64)
            egrid[0::2, 0::2] = err
            for phase, (py, px) in enumerate(P.PHASES):
                feats, anchor, s = P.gather(grid, egrid, phase, level, lo, hi)
                values = grid[py::2, px::2].ravel()
                egrid[py::2, px::2] = P.interpolation_error(values, anchor).reshape(egrid[py::2, px::2].shape)
                target = values - anchor
                pick = rng.permutation(target.size)[: max(1, round(fraction * target.size))]
                parts[phase].append((feats.T[pick].astype(np.float32), target[pick].astype(np.float32),
                                     s[pick].astype(np.float32)))
            err = egrid
    out = []
    for phase in range(len(P.PHASES)):
        inputs = np.concatenate([part[0] for part in parts[phase]]).astype(np.float32)
        targets = np.concatenate([part[1] for part in parts[phase]]).astype(np.float32)
        scales = np.concatenate([part[2] for part in parts[phase]]).astype(np.float32)
        out.append((inputs, targets, scales))
    return out


class PhaseNet(nn.Module):
    """The float twin of one phase's integer MLP (inputs in units of 1/16, as the codec's)."""

    def __init__(self, n_in: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(n_in, P.HIDDEN)
        self.l2 = nn.Linear(P.HIDDEN, P.HIDDEN)
        self.l3 = nn.Linear(P.HIDDEN, 2)
        with torch.no_grad():
            self.l3.weight.mul_(0.1)
            self.l3.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(x / P.IN_SCALE))
        h = torch.relu(self.l2(h))
        out: torch.Tensor = self.l3(h)
        return out


LN2: Final[float] = math.log(2.0)
OUTLIER_SHARE: Final[float] = 2.0**-10
OUTLIER_FLOOR: Final[float] = math.log(OUTLIER_SHARE) - 16 * LN2  # spread over 2^16 values: ~26 bits


def nll_bits(out: torch.Tensor, target: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Mean discretised logistic NLL (bits) of integer targets, mean = out0 * s, scale = s * 2^out1, mixed
    with a uniform floor of share 2^-10."""
    mu = out[:, 0] * s
    log2_sigma = torch.clamp(torch.log2(s) + out[:, 1], P.L8_MIN / 8, 17.0)
    inv = torch.exp2(-log2_sigma)
    c = -torch.abs(target - mu)  # the logistic is symmetric: work in the left tail (stable)
    a = inv * (c + 0.5)
    b = inv * (c - 0.5)
    la = nn.functional.logsigmoid(a)
    lb = nn.functional.logsigmoid(b)
    logp = la + torch.log1p(-torch.exp(torch.clamp(lb - la, max=-1e-6)))
    # a floor as the coder has (its tables give every symbol a probability, escapes cost bounded bits):
    # without it a few outliers in otherwise exactly predictable contexts (the flat air outside a CT's
    # field of view) keep the scale of the whole context class large
    logp = torch.logaddexp(logp + math.log1p(-OUTLIER_SHARE), torch.full_like(logp, OUTLIER_FLOOR))
    return -(logp.mean()) / LN2


def quantize_nets(nets: list[PhaseNet]) -> dict[str, npt.NDArray[Any]]:
    """Float weights -> the codec's fixed point (weights x 2^12, biases in their layer's units), clipped to
    the exact-inference bound."""
    tensors: dict[str, npt.NDArray[Any]] = {}
    for p, net in enumerate(nets):
        for j, layer in enumerate((net.l1, net.l2, net.l3)):
            w = layer.weight.detach().cpu().double().numpy()
            b = layer.bias.detach().cpu().double().numpy()
            tensors[f"phase{p}.w{j + 1}"] = np.clip(np.round(w * (1 << P.W_SHIFT)), -P.WEIGHT_CLIP,
                                                    P.WEIGHT_CLIP).astype(np.int32)
            tensors[f"phase{p}.b{j + 1}"] = np.clip(np.round(b * 2.0 ** P.BIAS_UNITS[j]), -P.BIAS_CLIP,
                                                    P.BIAS_CLIP).astype(np.int64)
    return tensors


def _digest(tensors: dict[str, npt.NDArray[Any]]) -> bytes:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(np.ascontiguousarray(tensors[k]).tobytes())
    return h.digest()[:8]


def fit_tables(tensors: dict[str, npt.NDArray[Any]], images: list[npt.NDArray[Any]], prior: float
               ) -> npt.NDArray[np.int32]:
    """Integer tables: observed symbol counts per bin on the train split (set 0 at N = 0, set 1 at
    N = 1, 2 and 4) plus a discretised logistic prior of ``prior`` counts per bin."""
    base = P.make_tables().astype(np.float64)
    start = np.stack([base] * P.TABLE_SETS).astype(np.int32)
    model = P.model_from_tensors({**tensors, "tables": start}, _digest(tensors))
    counts = np.zeros((P.TABLE_SETS, P.N_BINS, P.ALPHABET), np.float64)
    for image in images:
        for n in (0, 1, 2, 4):
            sink: list[tuple[Any, Any]] = []
            P.encode_image(model, "fit", image.astype(np.int64), n, sink=sink)
            for sym, bins in sink:
                np.add.at(counts[P.table_set(n)], (bins, sym), 1.0)
    prior_p = base / base.sum(axis=1, keepdims=True)
    mixed = counts + prior * prior_p[None]
    probs = mixed / mixed.sum(axis=2, keepdims=True)
    tables: npt.NDArray[np.int32] = np.maximum(1, np.round(probs * P.TABLE_TOTAL)).astype(np.int32)
    return tables


def evaluate(model: P.IntModel, split: Split, log: Log, name: str = SHIPPED) -> dict[str, Any]:
    """The real codec on the validation split: bits per pixel (payload + frame container) per modality."""
    from archive.codecs.frame import pack_frame

    metrics: dict[str, Any] = {}
    for modality in sorted(split.validation):
        for n in (0, 2):
            bits = 0
            pixels = 0
            for image in split.validation[modality]:
                arr = np.ascontiguousarray(image.pixels)
                payload, _ = P.encode_image(model, name, arr.astype(np.int64), n)
                frame = pack_frame(codec_id="learned", pixels=arr, offset=0, payload_dtype=arr.dtype,
                                   payload=payload, lossy=n > 0, reconstruction_crc32=0)
                bits += 8 * len(frame)
                pixels += arr.size
            metrics[f"{modality}_bpp_n{n}"] = round(bits / max(pixels, 1), 4)
            log(f"validation {modality} N={n}: {bits / max(pixels, 1):.4f} bpp")
    return metrics


def train(split: Split, out_dir: Path, *, minutes: float, resume: bool, seed: int, device: torch.device,
          log: Log, **options: Any) -> dict[str, Any]:
    """Train the three phase MLPs within ``minutes`` (resumes included), write the bundle, return metrics."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown learned trainer options: {unknown}")
    opts = {**DEFAULTS, **options}
    torch.set_num_threads(1)
    seed_everything(seed)
    out_dir = Path(out_dir)
    checkpoints = Checkpointer(out_dir)
    state = checkpoints.load() if resume else None
    budget = Budget(minutes, spent_before=float(state["spent"]) if state else 0.0)
    rng = np.random.default_rng(seed)
    train_images = [np.ascontiguousarray(i.pixels) for i in split.train_images()]
    t0 = time.monotonic()
    shares = {"CT": float(opts["ct_fraction"]), "MR": float(opts["mr_fraction"])}
    data = collect([(np.ascontiguousarray(i.pixels), shares.get(m, 0.5)) for m in sorted(split.train)
                    for i in split.train[m]], rng)
    log(f"features: {[d[0].shape for d in data]} in {time.monotonic() - t0:.1f} s")
    tensors_data = [tuple(torch.from_numpy(a).to(device) for a in d) for d in data]
    nets = [PhaseNet(P.n_inputs(p)).to(device) for p in range(len(P.PHASES))]
    params = [q for net in nets for q in net.parameters()]
    opt = torch.optim.Adam(params, lr=float(opts["lr"]))
    step = 0
    if state:
        for p, net in enumerate(nets):
            net.load_state_dict(state["nets"][p])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        log(f"resumed at step {step}, {budget.spent_before:.0f} s spent")
    batch = int(opts["batch"])
    gen = torch.Generator(device="cpu").manual_seed(seed + step)
    last_save = time.monotonic()
    train_budget = minutes * 60.0 * 0.8  # the rest: tables and the validation run
    running = float(state["running"]) if state and "running" in state else 0.0
    while budget.spent < train_budget:
        frac = min(1.0, budget.spent / train_budget)
        lr = float(opts["lr"]) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = torch.zeros((), device=device)
        for p, net in enumerate(nets):
            feats, target, s = tensors_data[p]
            idx = torch.randint(0, feats.shape[0], (batch,), generator=gen).to(device)
            loss = loss + nll_bits(net(feats[idx]), target[idx], s[idx])
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
        opt.step()
        step += 1
        value = float(loss.detach()) / 3
        running = 0.98 * running + 0.02 * value if running else value
        if step % 500 == 0:
            log(f"step {step} lr {lr:.2e} loss {running:.4f} bits/px ({budget.spent:.0f} s)")
        if time.monotonic() - last_save > 60:
            checkpoints.save({"nets": [n.state_dict() for n in nets], "opt": opt.state_dict(), "step": step,
                              "spent": budget.spent, "running": running})
            last_save = time.monotonic()
    checkpoints.save({"nets": [n.state_dict() for n in nets], "opt": opt.state_dict(), "step": step,
                      "spent": budget.spent, "running": running})
    tensors = quantize_nets(nets)
    t0 = time.monotonic()
    fit_images = train_images[::2]
    tensors["tables"] = fit_tables(tensors, fit_images, float(opts["table_prior"]))
    log(f"tables fitted in {time.monotonic() - t0:.1f} s")
    model = P.model_from_tensors(tensors, _digest(tensors))
    metrics = evaluate(model, split, log, out_dir.name)
    metrics["train_loss_bits"] = round(running, 4) if running else None  # None: resumed from an older checkpoint
    metrics["steps"] = step
    manifest = {
        "model": "learned",
        "name": out_dir.name,
        "data_split": split.describe(),
        "metrics": metrics,
        "hyperparameters": {**opts, "hidden": P.HIDDEN, "levels": P.MAX_LEVELS, "phases": list(P.PHASE_NAMES),
                            "inputs": [P.n_inputs(p) for p in range(len(P.PHASES))], "seed": seed,
                            "minutes": minutes, "device": str(device)},
        "tolerance": TOLERANCE,
        "format_version": P.FORMAT_VERSION,
    }
    save_bundle(out_dir, tensors, manifest)
    log(f"bundle written to {out_dir} (checkpoint kept at {checkpoints.path}; delete it before shipping)")
    return metrics
