"""AdvCAM (the AMR release's default CAM method): anti-adversarial climbing of each image's classes.

Per branch and class, from the original image + flip at each scale: T maps (the release's halving at
scale 0.5: `adv_steps_at`) of the inputs before each of T - 1 steps, summed. A step ascends
sum over the pair of (logit_c - sum of the other logits) - mask_weight * sum(|R_t - R_0| where
R_t / max R_t > mask_threshold), logits = GAP of the ReLU CAM and R_t the release's Grad-CAM of the
pair (its weights held constant), by step_size * grad / max|grad| over the pair, clamped to the
pair's current min and max. All of an image's classes climb as one batch, one pair of rows each.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import AmrsegError

if TYPE_CHECKING:  # the contract (methods.py) imports this module for its registry
    from ..models.amr import AMRNet
    from .methods import ScaleBatch

CLIMBS = ("branch", "joint")
# The InferConfig fields advcam reads (recorded with its CAMs; other methods leave them out).
OPTIONS = ("adv_steps", "adv_step_size", "adv_mask_weight", "adv_mask_threshold", "adv_climb")


def check_options(options) -> None:
    """One-line AmrsegError for advcam settings that cannot run."""
    if options.adv_steps < 1:
        raise AmrsegError(f"--adv-steps {options.adv_steps}: must be positive (the number of maps per scale)")
    if options.adv_climb not in CLIMBS:
        raise AmrsegError(f"--adv-climb {options.adv_climb!r}: not one of {', '.join(CLIMBS)}")


def advcam_branch_maps(model: AMRNet, batch: ScaleBatch) -> dict[str, list[torch.Tensor]]:
    """The CamMethod `maps` of advcam: per branch and image, the climbed maps of its classes [n, h, w]."""
    opts = batch.options
    steps = adv_steps_at(batch.scale, opts.adv_steps)
    # the release's mul_for_scale: meant for scale 0.5 (2 when it halves T > 10, else 1), it keeps that
    # value for every scale; it only matters against the + 1e-5 of the normalisation
    mul = 2.0 if opts.adv_steps > 10 else 1.0
    out: dict[str, list[torch.Tensor]] = {name: [] for name, _ in model.branches()}
    for pair, k in zip(batch.pairs, batch.keys):
        if len(k) == 0:
            for name in out:
                out[name].append(batch.scores[name].new_zeros(0, *batch.scores[name].shape[-2:]))
            continue
        rows = pair[None].expand(len(k), -1, -1, -1, -1)
        for name, m in advcam_maps(model, rows, k, steps, opts).items():
            out[name].append(mul * m)
    return out


def adv_steps_at(scale: float, steps: int) -> int:
    """AdvCAM's T at a scale: the release halves it at scale 0.5 (T > 10: T // 2; 6..10: 5; below 6: T)."""
    if scale != 0.5 or steps < 6:
        return steps
    return steps // 2 if steps > 10 else 5


def advcam_maps(model: AMRNet, pairs: torch.Tensor, cls: torch.Tensor, steps: int, options
                 ) -> dict[str, torch.Tensor]:
    """AdvCAM maps of one image for several classes: anti-adversarial climbing on image + flip pairs.

    Args:
        pairs: [R, 2, 3, h, w]: row r is an image and its flip, climbing for class cls[r].
        cls: [R] the class of each row.
        steps: T, the number of maps per row (T - 1 climbing steps).
        options: the InferConfig (adv_* settings).
    Returns:
        {branch: [R, h', w']}: the sum of the T Grad-CAM maps R_t (image + flipped-back flip).
        options.adv_climb 'branch' (the release) climbs once per branch, each on its own objective;
        'joint' climbs once on the sum of the branches' objectives.
    """
    names = [name for name, _ in model.branches()]
    groups = [[name] for name in names] if options.adv_climb == "branch" else [names]
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        out.update(_climb(model, pairs, cls, steps, options, group))
    return out


def _climb(model: AMRNet, pairs: torch.Tensor, cls: torch.Tensor, steps: int, options,
           names: list[str]) -> dict[str, torch.Tensor]:
    """One climb of the rows `pairs`, ascending the sum of the objectives of the branches `names`.

    Per branch and row: J = sum over the pair of (logit_c - sum of the other logits) - mask_weight *
    sum(|R_t - R_0| where R_t / max R_t > mask_threshold), with logits = GAP of the ReLU CAM and R_t the
    release's Grad-CAM (its weights held constant, as the release's hooked gradients). A step adds
    step_size * grad / max|grad| over the pair and clamps to the pair's current min and max.
    """
    branches = dict(model.branches())
    R = len(cls)
    rows = torch.arange(R, device=pairs.device)
    others = torch.ones(R, 1, model_num_classes(model), device=pairs.device, dtype=pairs.dtype)
    others[rows, 0, cls] = 0
    x = pairs.flatten(0, 1).detach().clone()  # [2R, 3, h, w]: image, flip, image, flip, ...
    acc: dict[str, torch.Tensor] = {}
    r0: dict[str, torch.Tensor] = {}
    for t in range(steps):
        climb = t < steps - 1  # the last map needs no step after it
        x.requires_grad_(climb)
        with torch.set_grad_enabled(climb):
            objective = x.new_zeros(())
            for name in names:
                branch = branches[name]
                w = branch.classifier.weight.flatten(1)
                raw = torch.einsum("kc,nchw->nkhw", w, branch.features(x)).unflatten(0, (R, 2))  # [R, 2, K, h, w]
                raw_c = raw[rows, :, cls]  # [R, 2, h, w]
                with torch.no_grad():
                    count = (raw_c > 0).sum(dim=(-2, -1)).to(raw.dtype)  # |mask_n| [R, 2]
                    p = count.sum(1, keepdim=True) * (w[cls] > 0).sum(1, keepdim=True).to(raw.dtype)
                    scale = count / (p + 1e-12)
                gc = F.relu(raw_c) * scale[..., None, None]
                region = gc[:, 0] + gc[:, 1].flip(-1)  # R_t [R, h, w]
                acc[name] = acc.get(name, 0) + region.detach()
                if t == 0:
                    r0[name] = region.detach()
                if not climb:
                    continue
                logits = F.relu(raw).mean(dim=(-2, -1))  # [R, 2, K]
                j = logits[rows, :, cls].sum(1) - (logits * others).sum(dim=(1, 2))
                with torch.no_grad():
                    peak = region.amax(dim=(-2, -1), keepdim=True)
                    mask = (region / torch.where(peak > 0, peak, torch.ones_like(peak)) > options.adv_mask_threshold) \
                        & (peak > 0)
                j = j - options.adv_mask_weight * ((region - r0[name]).abs() * mask).sum(dim=(-2, -1))
                objective = objective + j.sum()
        if not climb:
            break
        (grad,) = torch.autograd.grad(objective, x)
        with torch.no_grad():
            g, xp = grad.unflatten(0, (R, 2)), x.detach().unflatten(0, (R, 2))
            span = (1, 2, 3, 4)  # over the pair: image and flip together
            g_max = g.abs().amax(dim=span, keepdim=True)
            lo, hi = xp.amin(dim=span, keepdim=True), xp.amax(dim=span, keepdim=True)
            x = torch.max(torch.min(xp + options.adv_step_size * g / (g_max + 1e-12), hi), lo).flatten(0, 1)
    return acc


def model_num_classes(model: AMRNet) -> int:
    return model.spotlight.classifier.weight.shape[0]
