"""AMR's training losses (AMR.md section 3): pure functions of the network outputs and labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import LossConfig


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multilabel soft margin: sigmoid BCE averaged over the K classes, then over the batch.

    Args:
        logits: [B, K]. labels: [B, K] multi-hot (0/1).
    """
    return F.multilabel_soft_margin_loss(logits, labels.to(logits.dtype))


def cps_loss(cam_s: torch.Tensor, cam_c: torch.Tensor) -> torch.Tensor:
    """Cross pseudo supervision: mean |M_s - M_c| over all elements of the same images.

    Neither side is detached: each branch is pulled towards the other.
    """
    return (cam_s - cam_c).abs().mean()


def area_loss(cam: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area regulariser (source document eq. 10): mean normalised activation of present classes.

    Each map is divided by its own spatial max (+1e-5), so the term measures the share of the
    image a class covers relative to its peak, not the CAM's scale. The max is not detached: the
    term is a function of the normalised map.

    Args:
        cam: [B, K, h, w] ReLU CAMs. labels: [B, K] multi-hot.

    Returns:
        Mean over each image's present classes and positions, then over the images with at least
        one present class (0 when there are none).
    """
    norm = cam / (cam.amax(dim=(2, 3), keepdim=True) + 1e-5)
    present = labels.to(cam.dtype)
    count = present.sum(dim=1)  # present classes per image
    per_image = (norm.mean(dim=(2, 3)) * present).sum(dim=1) / count.clamp(min=1)
    has = count > 0
    if not bool(has.any()):
        return cam.sum() * 0  # keeps the graph (and the device) for the caller's backward
    return per_image[has].mean()


def amr_loss(out: dict[str, torch.Tensor], labels: torch.Tensor, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Total AMR loss and its terms.

    The area term applies to the compensation CAM: the AMM pushes that branch to spread from
    the discriminative parts to the secondary regions, and its failure mode is spreading past the
    object onto background; the spotlight CAM is compact by construction and needs no brake.

    Args:
        out: AMRNet.forward's dict ('logits_s', 'cam_s' and optionally 'logits_c', 'cam_c').
        labels: [B, K] multi-hot.
        cfg: the loss weights.

    Returns:
        'total', 'cls', 'cls_s' and, with the compensation branch, 'cls_c', 'cps', 'area'. Terms
        whose weight is 0 are reported but not added to 'total'.
    """
    terms = {"cls_s": classification_loss(out["logits_s"], labels)}
    if "logits_c" not in out:
        terms["cls"] = terms["cls_s"]
        return {"total": terms["cls"], **terms}
    terms["cls_c"] = classification_loss(out["logits_c"], labels)
    terms["cls"] = 0.5 * (terms["cls_s"] + terms["cls_c"])
    terms["cps"] = cps_loss(out["cam_s"], out["cam_c"])
    terms["area"] = area_loss(out["cam_c"], labels)
    total = terms["cls"]
    if cfg.cps_weight:
        total = total + cfg.cps_weight * terms["cps"]
    if cfg.area_weight:
        total = total + cfg.area_weight * terms["area"]
    return {"total": total, **terms}
