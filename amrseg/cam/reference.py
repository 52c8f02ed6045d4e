"""Slow reference: a plain reading of the authors' release make-cam, one branch, class and scale at a time.

Written from the facts of AMR.md section 5 as the release computes them (step/make_cam.py,
step/gradCAM.py, misc/imutils.py and voc12/dataloader.py of jieqin-ai/AMR; step/make_cam.py of
IRN), with autograd for Grad-CAM, and sharing no code path with the batched implementation in
infer.py beyond the network's layers. The tests and bench/speed.py use it as the independent
expectation of make-cam's per-branch maps.

What it reads:
- Input of a scale: the uint8 image resized with PIL bicubic to (round(H s), round(W s)) (numpy
  rounding; scale 1 keeps the image), each channel (x / 255 - mean) / std, stacked with its flip.
- AMM statistics: the release's network never leaves training mode, so its AMMs take the Gaussian's
  statistics over the whole batch tensor and their BN normalises with the batch: in make-cam, the
  image and its flip. A network whose AMMs have eval_stats 'pair' is read that way (a copy with
  every AMM in training mode and batch statistics); any other is read in eval mode as it is.
- Grad-CAM: the hooked feature map F [2, C, h, w] of the pair, S = sum over the pair of the global
  sum of the class's ReLU CAM; weights = (sum over positions of dS/dF) / (#positive entries of the
  whole gradient tensor + 1e-12) (the release's gap2d_pos); map = ReLU(sum_k w_k F_k); the region
  of the pair = map[0] + map[1] flipped back.
- AdvCAM, per branch and class, from the original pair at each scale: T iterations (at scale 0.5,
  T // 2 when T > 10, 5 when 6 <= T <= 10); each adds the current region (times the release's
  mul_for_scale, set at scale 0.5 to 2 when T > 10, else 1, and kept for every scale) and then steps: loss = 2 * sum of the class's GAP
  ReLU logits - sum of all GAP ReLU logits - 7 * sum(|region - region_0| where region / max > 0.5),
  the region's Grad-CAM weights held constant; x += 0.08 * grad / (max |grad| + 1e-12), clamped to
  the current pair's min and max.
- Geometry (IRN): each scale's region upsampled bilinearly to (ceil(H/os) os, ceil(W/os) os) and
  cropped to H x W, or resized to (ceil(H/4), ceil(W/4)); summed over scales; each class divided by
  its max + 1e-5; fused = xi * spotlight + (1 - xi) * compensation, not renormalised.
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models.amm import AMM
from ..models.amr import AMRNet

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def release_input(image: np.ndarray, scale: float) -> torch.Tensor:
    """[2, 3, h, w]: the image at `scale` and its flip, normalised as the release's MSF dataset."""
    H, W = image.shape[:2]
    img = image
    if scale != 1:
        target = (max(1, int(np.round(H * scale))), max(1, int(np.round(W * scale))))
        if target != (H, W):
            img = np.asarray(Image.fromarray(image).resize((target[1], target[0]), Image.BICUBIC))
    arr = np.asarray(img)
    out = np.empty(arr.shape, np.float32)
    for ch in range(3):
        out[..., ch] = (arr[..., ch] / 255.0 - MEAN[ch]) / STD[ch]
    chw = out.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(np.stack([chw, chw[:, :, ::-1]])))


def release_network(model: AMRNet) -> AMRNet:
    """The network as the release's make-cam runs it (see the module docstring), as a copy."""
    net = copy.deepcopy(model).eval()
    for m in net.modules():
        if isinstance(m, AMM) and m.channel.eval_stats == "pair":
            m.train()
            for gate in (m.channel, m.spatial):
                gate.gauss = {**gate.gauss, "stats": "batch"}
    return net


def _grad_cam(branch, x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Grad-CAM region of the pair [h, w], with the weights held constant; CAM W . F [2, K, h, w])."""
    fmap = branch.features(x)
    cam = F.conv2d(fmap, branch.classifier.weight)
    score = F.relu(cam)[:, c].sum()
    (grads,) = torch.autograd.grad(score, fmap, retain_graph=True)
    weights = (grads.sum(dim=(2, 3), keepdim=True) / (torch.sum(grads > 0) + 1e-12)).detach()
    maps = F.relu((fmap * weights).sum(dim=1))
    return maps[0] + maps[1].flip(-1), cam


def _region(branch, x: torch.Tensor, c: int, method: str) -> torch.Tensor:
    """The cam or gradcam region [h, w] of one pair for class c."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        region, cam = _grad_cam(branch, x, c)
    if method == "cam":
        m = F.relu(cam[:, c])
        return (m[0] + m[1].flip(-1)).detach()
    return region.detach()


def _advcam_region(branch, x: torch.Tensor, c: int, iters: int, step_size: float, mask_weight: float,
                   mask_threshold: float, mul_for_scale: float) -> torch.Tensor:
    total = 0
    init = None
    img = x.detach().clone()
    for it in range(iters):
        with torch.enable_grad():
            img.requires_grad_(True)
            region, cam = _grad_cam(branch, img, c)
            if it == 0:
                init = region.detach()
            total = total + region.detach() * mul_for_scale
            if it == iters - 1:  # the release steps once more; that input is never read
                break
            logit = F.relu(cam).mean(dim=(2, 3))
            logit_loss = -2 * logit[:, c].sum() + logit.sum()
            peak = region.detach().max()
            mask = torch.zeros_like(region)
            if peak > 0:
                mask[region.detach() / peak > mask_threshold] = 1
            loss = -logit_loss - mask_weight * (torch.abs(region - init) * mask).sum()
            (grad,) = torch.autograd.grad(loss, img)
        img = img.detach()
        img = torch.clamp(img + step_size * grad / (grad.abs().max() + 1e-12), img.min(), img.max())
    return total


def release_iterations(scale: float, steps: int) -> tuple[int, float]:
    """(iterations at `scale`, mul_for_scale): the release sets both at scale 0.5 (its first scale) and
    keeps mul_for_scale for all the others."""
    if steps > 10:
        return (steps // 2 if scale == 0.5 else steps), 2.0
    if steps < 6:
        return steps, 1.0
    return (5 if scale == 0.5 else steps), 5 / 5


def release_cams(model: AMRNet, image: np.ndarray, keys: Sequence[int], scales: Sequence[float], xi: float = 0.5,
                 method: str = "cam", steps: int = 27, step_size: float = 0.08, mask_weight: float = 7.0,
                 mask_threshold: float = 0.5) -> dict[str, dict[str, torch.Tensor]]:
    """The release's maps of one HxWx3 uint8 image for its classes `keys`.

    Returns:
        {'hi': {branch: [n, H, W], 'fused': ...}, 'lo': {branch: [n, ceil(H/4), ceil(W/4)], 'fused': ...}};
        branches normalised per class (max + 1e-5), fused = xi * S + (1 - xi) * C (the release's, not
        renormalised; the spotlight alone without a compensation branch).
    """
    net = release_network(model)
    H, W = image.shape[:2]
    stride = net.output_stride
    up = (((H - 1) // stride + 1) * stride, ((W - 1) // stride + 1) * stride)
    low = ((H - 1) // 4 + 1, (W - 1) // 4 + 1)
    out: dict[str, dict[str, torch.Tensor]] = {"hi": {}, "lo": {}}
    for name, branch in net.branches():
        hi, lo = torch.zeros(len(keys), H, W, dtype=torch.float64), torch.zeros(len(keys), *low, dtype=torch.float64)
        for s in scales:
            param = next(net.parameters())
            x = release_input(image, s).to(param.device, param.dtype)
            for j, c in enumerate(keys):
                if method == "advcam":
                    iters, _ = release_iterations(s, steps)
                    _, mul = release_iterations(0.5, steps)
                    r = _advcam_region(branch, x, c, iters, step_size, mask_weight, mask_threshold, mul)
                else:
                    r = _region(branch, x, c, method)
                r = r.double().cpu()[None, None]
                hi[j] += F.interpolate(r, size=up, mode="bilinear", align_corners=False)[0, 0, :H, :W]
                lo[j] += F.interpolate(r, size=low, mode="bilinear", align_corners=False)[0, 0]
        for res, m in (("hi", hi), ("lo", lo)):
            out[res][name] = m / (m.flatten(1).max(1).values[:, None, None] + 1e-5) if len(keys) else m
    for res in ("hi", "lo"):
        maps = out[res]
        maps["fused"] = xi * maps["spotlight"] + (1 - xi) * maps["compensation"] if "compensation" in maps \
            else maps["spotlight"]
    return out
