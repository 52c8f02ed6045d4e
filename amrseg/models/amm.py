"""AMM, the attention modulation module (AMR.md section 2): channel gate, then spatial gate.

Both gates replace the usual sigmoid of CBAM by a Gaussian of the response around its own mean:
responses near the mean get the largest weight, the most discriminative (highest) and the
background-like (lowest) ones are suppressed, which pushes the compensation branch towards the
secondary object regions.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AMMConfig

_MODES = ("unit", "pdf")
_STATS = ("sample", "batch", "pair")
_EVAL_STATS = ("sample", "pair")


def _check(mode: str, stats: str, eval_stats: str = "sample") -> None:
    if mode not in _MODES:
        raise ValueError(f"gaussian mode {mode!r}: not one of {', '.join(_MODES)}")
    if stats not in _STATS:
        raise ValueError(f"gaussian stats {stats!r}: not one of {', '.join(_STATS)}")
    if eval_stats not in _EVAL_STATS:
        raise ValueError(f"eval stats {eval_stats!r}: not one of {', '.join(_EVAL_STATS)}")


def _groups(z: torch.Tensor, stats: str) -> int:
    """How many statistics groups the batch of z splits into: one per sample, one, or one per pair."""
    n = z.shape[0]
    if stats == "sample":
        return n
    if stats == "batch":
        return 1
    if n % 2:
        raise ValueError(f"pair statistics need an even batch of (image, flip) pairs, got {n} samples")
    return n // 2


def gaussian_modulation(z: torch.Tensor, dims: Sequence[int], mode: str = "unit", stats: str = "sample",
                        threshold: Optional[float] = None, eps: float = 1e-6) -> torch.Tensor:
    """Gaussian of `z` around its own mean: exp(-(z - mu)^2 / (2 (sigma + eps)^2)).

    Args:
        z: responses, batch first.
        dims: the non-batch dims that one sample's statistics run over (stats='sample').
        mode: 'unit' (peak 1) or 'pdf' (divided by sqrt(2 pi) (sigma + eps): the normal density,
            as in the release).
        stats: 'sample': mu and sigma per sample, so an image does not depend on its batch mates;
            'batch': over the whole tensor (the release); 'pair': over each two consecutive samples
            (an image and its flip: the release's make-cam batch), all their elements.
        threshold: Gaussian threshold modulation (GTM, source document eq. 9): values below it
            become 0, values at or above are kept unchanged. None = off.
        eps: added to sigma so that a constant input gives a finite result (not in the release).

    Returns:
        A tensor shaped and typed like z (computed in float32). mu and sigma (mean, unbiased std) are detached, as in the release:
        the gate's gradient flows through z only.
    """
    _check(mode, stats)
    out_dtype = z.dtype
    z = z.float()  # under fp16/bf16 autocast, (sigma + 1e-6)^2 and long means need float32
    if stats == "sample":
        dims = tuple(dims)
        n = math.prod(z.shape[d] for d in dims)
        x = z
    else:  # one group (batch) or one per pair: all elements of the group's samples
        dims = (1,)
        x = z.reshape(_groups(z, stats), -1)  # consecutive samples share a row
        n = x.shape[1]
    xd = x.detach()
    mu = xd.mean(dim=dims, keepdim=True)
    # Unbiased std written out so a single element gives sigma 0 (torch.std gives NaN and warns).
    sigma = ((xd - mu).square().sum(dim=dims, keepdim=True) / max(n - 1, 1)).sqrt() + eps
    g = torch.exp(-(x - mu).square() / (2 * sigma.square()))
    if mode == "pdf":
        g = g / (math.sqrt(2 * math.pi) * sigma)
    if threshold is not None:
        g = torch.where(g >= threshold, g, torch.zeros_like(g))
    g = g.reshape(z.shape)
    return g.to(out_dtype)


def _gauss_args(gate: nn.Module) -> dict:
    """The gate's Gaussian settings: in training its `stats`; in eval mode its `eval_stats`.

    eval_stats 'sample' (our presets): each image its own statistics, so a CAM never depends on
    the other images of its batch. 'pair' (amr-official): statistics over each (image, flip) pair
    of consecutive samples, as the release's make-cam computes them over its batch of two. The two
    differ: a ResNet is not flip-symmetric, so an image's statistics are not its flip's.
    """
    return gate.gauss if gate.training else {**gate.gauss, "stats": gate.eval_stats}


class ChannelGate(nn.Module):
    """x * G(MLP(GAP(x))) with the Gaussian over the channel axis of each sample."""

    def __init__(self, channels: int, reduction: int = 16, mode: str = "unit", stats: str = "sample",
                 threshold: Optional[float] = None, eps: float = 1e-6, eval_stats: str = "sample"):
        super().__init__()
        _check(mode, stats, eval_stats)
        self.eval_stats = eval_stats
        # At least 8 hidden units (or C): with 1-2 units, as C/16 gives in the half-width CPU nets, the
        # ReLU is often dead for the whole batch from the start. ResNet-50 (C >= 256) is unaffected.
        hidden = max(channels // reduction, min(8, channels))
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.gauss = dict(mode=mode, stats=stats, threshold=threshold, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.mlp(x.mean(dim=(2, 3)))
        s = gaussian_modulation(a, dims=(1,), **_gauss_args(self))
        return x * s[:, :, None, None]


class SpatialGate(nn.Module):
    """x * G(BN(conv7x7([max_c x, mean_c x]))) with the Gaussian over each sample's positions.

    With eval_stats 'pair', in eval mode the BN normalises with the statistics of each (image, flip)
    pair instead of its running ones (the release's BN is always in training mode), without
    updating them.
    """

    def __init__(self, mode: str = "unit", stats: str = "sample", threshold: Optional[float] = None,
                 eps: float = 1e-6, eval_stats: str = "sample"):
        super().__init__()
        _check(mode, stats, eval_stats)
        self.eval_stats = eval_stats
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=0.01)  # the release's (CBAM's) momentum
        self.gauss = dict(mode=mode, stats=stats, threshold=threshold, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        t = self.conv(q)
        if not self.training and self.eval_stats == "pair":
            # each pair's mean and biased variance over its 2 x h x w values, then the affine map
            g = F.batch_norm(t.reshape(1, _groups(t, "pair"), -1), None, None, training=True, eps=self.bn.eps)
            t = g.reshape(t.shape) * self.bn.weight.view(1, -1, 1, 1) + self.bn.bias.view(1, -1, 1, 1)
        else:
            t = self.bn(t)  # no activation: the Gaussian is the gate
        return x * gaussian_modulation(t, dims=(1, 2, 3), **_gauss_args(self))


class AMM(nn.Module):
    """SpatialGate(ChannelGate(x)); shape-preserving, so it plugs in after a stage or in a block.

    Args:
        channels: channels of x.
        cfg: its gaussian, stats, eval_stats, threshold, reduction and eps are used.
    """

    def __init__(self, channels: int, cfg: AMMConfig):
        super().__init__()
        gauss = dict(mode=cfg.gaussian, stats=cfg.stats, threshold=cfg.threshold, eps=cfg.eps,
                     eval_stats=cfg.eval_stats)
        self.channel = ChannelGate(channels, cfg.reduction, **gauss)
        self.spatial = SpatialGate(**gauss)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))
