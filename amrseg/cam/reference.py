"""Slow, plain reference loops for make-cam: one image, one scale, one flip, one class at a time.

They follow AMR.md section 5 literally, with autograd for Grad-CAM, and share no code path with the
batched implementation in infer.py beyond the network itself. The tests and bench/speed.py use them
as the independent expectation (maps equal within 1e-4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.amr import AMRNet


def _branch_map(model: AMRNet, x: torch.Tensor, name: str, c: int, method: str) -> torch.Tensor:
    """One image [1, 3, h, w], one branch, one class -> [h', w']."""
    branch = dict(model.branches())[name]
    w = branch.classifier.weight[:, :, 0, 0]
    feat = model.branch_features(x)[name].detach().requires_grad_(True)
    cam = F.relu((w[c][None, :, None, None] * feat).sum(1))[0]
    if method == "cam":
        return cam.detach()
    (grad,) = torch.autograd.grad(cam.sum(), feat)
    a = grad[0].sum(dim=(1, 2)) / (grad[0] > 0).flatten(1).sum(1).clamp(min=1)
    return F.relu((a[:, None, None] * feat[0]).sum(0)).detach()


def reference_cams(model: AMRNet, image: torch.Tensor, keys: list[int], scales: list[float], xi: float,
                   method: str = "cam") -> dict[str, torch.Tensor]:
    """Maps of one normalised image [3, H, W] for its classes: {'fused', branch names} -> [n, H, W]."""
    H, W = image.shape[1:]
    out = {}
    for name, _ in model.branches():
        per_class = []
        for c in keys:
            total = torch.zeros(H, W)
            for s in scales:
                size = (max(1, round(H * s)), max(1, round(W * s)))
                x = image[None] if size == (H, W) else F.interpolate(image[None], size=size, mode="bilinear",
                                                                     align_corners=False)
                m = _branch_map(model, x, name, c, method) + _branch_map(model, x.flip(-1), name, c, method).flip(-1)
                total += F.interpolate(m[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
            per_class.append(total / (total.max() + 1e-5))
        out[name] = torch.stack(per_class) if per_class else torch.zeros(0, H, W)
    if "compensation" in out:
        fused = xi * out["spotlight"] + (1 - xi) * out["compensation"]
        out["fused"] = fused / (fused.flatten(1).max(1).values[:, None, None] + 1e-5)
    else:
        out["fused"] = out["spotlight"]
    return out
