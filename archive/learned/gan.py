"""The ``gan`` codec's networks: encoder E, generator G(w, s), discriminator D(x^, w, s), factorized prior.

After Agustsson et al. 2019 / Mentzer et al. 2020 (HiFiC), sized for a 2-core CPU (about 0.3 M
parameters): E maps a normalised image to a latent at 1/16 resolution; the latent is scaled by a
per-rate, per-channel *gain* (Cui et al. 2021) and rounded to integer symbols w; G decodes w / gain
with side information s = (soft one-hot of the rate, one-hot of the modality) broadcast as constant
channels. Rate is continuous: a level l in 0..N_LEVELS-1 sits between two trained rates and
interpolates their gains (geometrically), prior parameters and rate one-hot, so the codec has
finer steps than the trained lambdas.

The prior is factorized: per (rate, channel) a discretised logistic. At export it is evaluated once
per level into integer frequency tables (sum 2^TABLE_BITS, each >= 1) stored in the bundle; the
codec builds its range-coder models from those integers only, so entropy decoding is bit-exact on
any machine and thread count. D is used in training only and is never shipped.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: channels of the latent w
LATENT: Final[int] = 16
#: image side per latent position (four stride-2 stages)
FACTOR: Final[int] = 16
#: trained rate points (about 0.03 to 0.5 bpp on the shared CT): lambda_r = LAMBDA0 * LAMBDA_RATIO ** r (loss = bpp + lambda * MSE on [0, 1] intensities)
N_RATES: Final[int] = 6
LAMBDA0: Final[float] = 8.0
LAMBDA_RATIO: Final[float] = 4.5
#: interpolated levels between two trained rates (level = rate * SUBSTEPS + step)
SUBSTEPS: Final[int] = 4
N_LEVELS: Final[int] = (N_RATES - 1) * SUBSTEPS + 1
#: symbols are clamped to [-HALF, HALF]; the tables have 2 * HALF + 1 entries
HALF: Final[int] = 63
TABLE_BITS: Final[int] = 16
MODALITIES: Final[tuple[str, ...]] = ("CT", "MR", "OT")
SIDE: Final[int] = N_RATES + len(MODALITIES)
ENC_CHANNELS: Final[tuple[int, int, int, int]] = (32, 48, 64, 64)


def lambda_of(rate: Tensor) -> Tensor:
    """Lagrange multiplier of a (continuous) rate position."""
    return LAMBDA0 * LAMBDA_RATIO ** rate


def level_position(level: int) -> float:
    """A level's position on the continuous rate axis (0..N_RATES-1)."""
    return level / SUBSTEPS


def rate_weights(rate: Tensor) -> Tensor:
    """(B,) continuous rate positions -> (B, N_RATES) interpolation weights (two neighbours)."""
    r0 = torch.clamp(torch.floor(rate), 0, N_RATES - 2)
    t = (rate - r0).unsqueeze(1)
    idx = r0.long().unsqueeze(1)
    w = torch.zeros(rate.shape[0], N_RATES, dtype=rate.dtype, device=rate.device)
    w.scatter_(1, idx, 1.0 - t)
    w.scatter_add_(1, idx + 1, t)
    return w


class GDN(nn.Module):
    """Generalized divisive normalization (Balle et al.): y = x / sqrt(beta + gamma * x^2), or its inverse."""

    def __init__(self, channels: int, inverse: bool = False) -> None:
        super().__init__()
        self.inverse = inverse
        self.beta = nn.Parameter(torch.ones(channels))
        self.gamma = nn.Parameter(0.1 * torch.eye(channels))

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        gamma = (self.gamma ** 2).view(c, c, 1, 1)
        norm = torch.sqrt(F.conv2d(x * x, gamma, self.beta ** 2 + 1e-6))
        return x * norm if self.inverse else x / norm


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.b(F.leaky_relu(self.a(x), 0.2))
        return out


class Encoder(nn.Module):
    """E: (B, 1, H, W) in [-0.5, 0.5] -> (B, LATENT, H/16, W/16)."""

    def __init__(self) -> None:
        super().__init__()
        c1, c2, c3, c4 = ENC_CHANNELS
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 5, 2, 2), GDN(c1),
            nn.Conv2d(c1, c2, 4, 2, 1), GDN(c2),
            nn.Conv2d(c2, c3, 4, 2, 1), GDN(c3), ResBlock(c3),
            nn.Conv2d(c3, c4, 4, 2, 1), ResBlock(c4),
            nn.Conv2d(c4, LATENT, 3, 1, 1),
        )
        # a linear lapped analysis beside the deep path: learns a transform code within a few hundred steps,
        # which the nonlinear path then improves on
        self.linear = nn.Conv2d(1, LATENT, 2 * FACTOR, FACTOR, FACTOR // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x) + self.linear(x)
        return out


class Generator(nn.Module):
    """G(w, s): dequantized latent and side information -> (B, 1, H, W) image in [-0.5, 0.5] (not clamped)."""

    def __init__(self) -> None:
        super().__init__()
        c1, c2, c3, c4 = ENC_CHANNELS
        self.head = nn.Conv2d(LATENT + SIDE, c4, 3, 1, 1)
        self.body = nn.Sequential(ResBlock(c4), ResBlock(c4))
        self.up = nn.Sequential(
            nn.ConvTranspose2d(c4, c3, 4, 2, 1), GDN(c3, inverse=True), ResBlock(c3),
            nn.ConvTranspose2d(c3, c2, 4, 2, 1), GDN(c2, inverse=True),
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), GDN(c1, inverse=True),
            nn.ConvTranspose2d(c1, 1, 4, 2, 1),
        )
        # the linear lapped synthesis matching Encoder.linear (overlapping 32^2 basis functions)
        self.linear = nn.ConvTranspose2d(LATENT, 1, 2 * FACTOR, FACTOR, FACTOR // 2)

    def forward(self, w: Tensor, side: Tensor) -> Tensor:
        s = side[:, :, None, None].expand(-1, -1, w.shape[2], w.shape[3])
        h = self.head(torch.cat([w, s], 1))
        out: Tensor = self.up(self.body(h)) + self.linear(w)
        return out


class Discriminator(nn.Module):
    """D(x^, w, s): patch logits, conditioned on the latent (upsampled) and the side information."""

    def __init__(self) -> None:
        super().__init__()
        self.latent = nn.Conv2d(LATENT + SIDE, 16, 1)
        self.net = nn.Sequential(
            nn.Conv2d(2 + 16, 32, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(32, 64, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 64, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 1, 3, 1, 1),
        )

    def forward(self, x: Tensor, w: Tensor, side: Tensor) -> Tensor:
        s = side[:, :, None, None].expand(-1, -1, w.shape[2], w.shape[3])
        cond = F.interpolate(self.latent(torch.cat([w, s], 1)), size=x.shape[2:], mode="nearest")
        # the image and its high-pass, amplified: what a codec loses at low rates is small-amplitude texture,
        # which D could not see within a short fine-tune at the [-0.5, 0.5] scale
        high = x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
        out: Tensor = self.net(torch.cat([4.0 * x, 32.0 * high, cond], 1))
        return out


class RateModel(nn.Module):
    """Per-rate channel gains and the factorized logistic prior of the scaled latent."""

    def __init__(self) -> None:
        super().__init__()
        # gains grow with the rate, a factor 2 per step (sqrt of the lambda ratio) from 2: E's output starts
        # with a spread near 0.2, so the lowest rate's symbols are not all zero and the highest not clamped
        start = torch.tensor([math.log(2.0) + math.log(2.0) * r for r in range(N_RATES)])
        self.log_gain = nn.Parameter(start[:, None].repeat(1, LATENT))
        self.mean = nn.Parameter(torch.zeros(N_RATES, LATENT))
        self.log_scale = nn.Parameter(torch.zeros(N_RATES, LATENT))

    def params(self, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N_RATES) interpolation weights -> gain, mean, scale, each (B, LATENT)."""
        gain = torch.exp(weights @ self.log_gain)
        mean = weights @ self.mean
        scale = torch.exp(weights @ self.log_scale)
        return gain, mean, scale

    @staticmethod
    def likelihood(y: Tensor, mean: Tensor, scale: Tensor) -> Tensor:
        """P(round(y)) under the discretised logistic (tails at +-HALF absorbed), floored."""
        m = mean[:, :, None, None]
        s = scale[:, :, None, None]
        upper = torch.sigmoid((y + 0.5 - m) / s)
        lower = torch.sigmoid((y - 0.5 - m) / s)
        upper = torch.where(y >= HALF - 0.5, torch.ones_like(upper), upper)
        lower = torch.where(y <= -HALF + 0.5, torch.zeros_like(lower), lower)
        return torch.clamp(upper - lower, min=1e-9)


class GanModel(nn.Module):
    """E, G and the rate model together (what the codec ships); D lives beside it in training."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.generator = Generator()
        self.rate = RateModel()

    def side(self, weights: Tensor, modality: Tensor) -> Tensor:
        """Side information: rate weights and modality one-hot, (B, SIDE)."""
        return torch.cat([weights, F.one_hot(modality, len(MODALITIES)).to(weights.dtype)], 1)


def integer_tables(model: GanModel) -> npt.NDArray[np.int32]:
    """Fixed integer frequency tables (N_LEVELS, LATENT, 2 * HALF + 1), each summing to 2^TABLE_BITS.

    Evaluated once at export in float64; the codec never evaluates the logistic again."""
    total = 1 << TABLE_BITS
    n = 2 * HALF + 1
    out = np.zeros((N_LEVELS, LATENT, n), np.int32)
    with torch.no_grad():
        weights = rate_weights(torch.tensor([level_position(i) for i in range(N_LEVELS)], dtype=torch.float64))
        rate = model.rate.double()
        _gain, mean, scale = rate.params(weights)
        model.rate.float()
        k = torch.arange(-HALF, HALF + 1, dtype=torch.float64)
        cdf_hi = torch.sigmoid((k[None, None, :] + 0.5 - mean[:, :, None]) / scale[:, :, None])
        cdf_lo = torch.sigmoid((k[None, None, :] - 0.5 - mean[:, :, None]) / scale[:, :, None])
        cdf_hi[..., -1] = 1.0
        cdf_lo[..., 0] = 0.0
        prob = (cdf_hi - cdf_lo).numpy()
    for level in range(N_LEVELS):
        for c in range(LATENT):
            out[level, c] = _quantize(prob[level, c], total)
    return out


def _quantize(prob: npt.NDArray[np.float64], total: int) -> npt.NDArray[np.int32]:
    """Probabilities -> positive integers summing to ``total`` (largest entry absorbs the rounding)."""
    freq = np.floor(prob / prob.sum() * (total - prob.size)).astype(np.int64) + 1
    freq[int(np.argmax(freq))] += total - int(freq.sum())
    if freq.min() < 1:
        raise ValueError("probability table cannot be quantized")
    out: npt.NDArray[np.int32] = freq.astype(np.int32)
    return out


def level_gains(model: GanModel) -> npt.NDArray[np.float32]:
    """Gains per level (N_LEVELS, LATENT): what the codec multiplies E's output by before rounding."""
    with torch.no_grad():
        weights = rate_weights(torch.tensor([level_position(i) for i in range(N_LEVELS)]))
        gain, _m, _s = model.rate.params(weights)
    return gain.numpy().astype(np.float32)


def level_side(level: int, modality: int) -> Tensor:
    """(1, SIDE) side information of a level and modality index."""
    weights = rate_weights(torch.tensor([level_position(level)]))
    return torch.cat([weights, F.one_hot(torch.tensor([modality]), len(MODALITIES)).float()], 1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
