"""Slow, plain reference loops for make-cam: one image, one scale, one flip, one class at a time.

They follow AMR.md section 5 literally, with autograd for Grad-CAM, and share no code path with the
batched implementation in infer.py beyond the network itself. The tests and bench/speed.py use them
as the independent expectation (maps equal within 1e-4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.amr import AMRNet


def _branch_map(model: AMRNet, x: torch.Tensor, name: str, c: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One image [1, 3, h, w], one branch, one class -> (map [h', w'], raw score W_c . F [h', w'])."""
    branch = dict(model.branches())[name]
    w = branch.classifier.weight[:, :, 0, 0]
    feat = model.branch_features(x)[name].detach().requires_grad_(True)
    raw = (w[c][None, :, None, None] * feat).sum(1)[0]
    cam = F.relu(raw)
    if method == "cam":
        return cam.detach(), raw.detach()
    (grad,) = torch.autograd.grad(cam.sum(), feat)
    a = grad[0].sum(dim=(1, 2)) / (grad[0] > 0).flatten(1).sum(1).clamp(min=1)
    return F.relu((a[:, None, None] * feat[0]).sum(0)).detach(), raw.detach()


def reference_cams(model: AMRNet, image: torch.Tensor, keys: list[int], scales: list[float], xi: float,
                   method: str = "cam") -> dict[str, torch.Tensor]:
    """Maps of one normalised image [3, H, W] for its classes: {'fused', branch names} -> [n, H, W].

    A class whose summed map is 0 everywhere in every branch gets, in each branch, 1 where its summed
    raw score W_c . F is largest and 0 elsewhere (0 everywhere if that score is constant).
    """
    H, W = image.shape[1:]
    names = [name for name, _ in model.branches()]
    totals = {name: [] for name in names}
    raws = {name: [] for name in names}
    for name in names:
        for c in keys:
            total, raw_total = torch.zeros(H, W), torch.zeros(H, W)
            for s in scales:
                size = (max(1, round(H * s)), max(1, round(W * s)))
                x = image[None] if size == (H, W) else F.interpolate(image[None], size=size, mode="bilinear",
                                                                     align_corners=False)
                m, raw = _branch_map(model, x, name, c, method)
                m_f, raw_f = _branch_map(model, x.flip(-1), name, c, method)
                for acc, v in ((total, m + m_f.flip(-1)), (raw_total, raw + raw_f.flip(-1))):
                    acc += F.interpolate(v[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
            totals[name].append(total)
            raws[name].append(raw_total)
    out = {name: [] for name in names}
    for i in range(len(keys)):
        dead = all(totals[name][i].max() <= 0 for name in names)
        for name in names:
            if dead:
                r = raws[name][i]
                out[name].append((r == r.max()).float() if r.min() < r.max() else torch.zeros(H, W))
            else:
                out[name].append(totals[name][i] / (totals[name][i].max() + 1e-5))
    out = {name: torch.stack(maps) if maps else torch.zeros(0, H, W) for name, maps in out.items()}
    if "compensation" in out:
        fused = xi * out["spotlight"] + (1 - xi) * out["compensation"]
        out["fused"] = fused / (fused.flatten(1).max(1).values[:, None, None] + 1e-5)
    else:
        out["fused"] = out["spotlight"]
    return out
