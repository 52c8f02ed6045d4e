"""Every training loss of amrseg: pure functions of the network outputs and labels.

- AMR (AMR.md section 3): `classification_loss`, `cps_loss`, `area_loss`, their sum `amr_loss`;
- IRN (AMR.md section 7): `affinity_loss` (class boundaries), `displacement_loss`, their sum `irn_loss`;
- DeepLab: `segmentation_loss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import LossConfig
from ..data.voc import IGNORE
from .affinity import boundary_to_affinity, extract_pairs, pair_values, search_offsets

_EPS = 1e-5  # IRN's guard inside the logs


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


# --------------------------------------------------------------------------- IRN


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; 0 (with a gradient path) when the mask is empty."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def affinity_loss(aff: torch.Tensor, pairs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """IRN's class-boundary loss on predicted affinities.

    Args:
        aff: [B, D, h, w] affinities in [0, 1] (e.g. from :func:`boundary_to_affinity`).
        pairs: The masks of :func:`extract_pairs`, same shape.

    Returns:
        ``pos_bg`` and ``pos_fg``: mean of ``-log(aff + 1e-5)`` over those pairs; ``neg``: mean
        of ``-log(1 + 1e-5 - aff)`` over negative pairs (each 0 when it has no pairs); ``total``
        = pos_bg / 4 + pos_fg / 4 + neg / 2 (IRN balances background against foreground
        positives, then positives against negatives).
    """
    pos = -torch.log(aff + _EPS)
    neg = -torch.log(1.0 + _EPS - aff)
    out = {
        "pos_bg": _masked_mean(pos, pairs["pos_bg"]),
        "pos_fg": _masked_mean(pos, pairs["pos_fg"]),
        "neg": _masked_mean(neg, pairs["neg"]),
    }
    out["total"] = out["pos_bg"] / 4 + out["pos_fg"] / 4 + out["neg"] / 2
    return out


def displacement_loss(disp: torch.Tensor, pairs: dict[str, torch.Tensor], radius: int) -> dict[str, torch.Tensor]:
    """IRN's displacement-field loss.

    Sign convention: ``disp[:, :, y, x] = (dy, dx)`` is the vector from pixel p = (y, x) to the
    centroid of its instance, in pixels of the map. Two pixels p and q = p + d of one instance
    share the centroid, ``p + D(p) = q + D(q)``, so ``D(p) - D(q) = d``. IRN approximates
    "same instance" by "same class within the radius" (``pos_fg``); background pairs should
    have no relative displacement, ``D(p) - D(q) = 0`` (IRN's ``dp_bg`` term, on the pair
    difference as in its release).

    Args:
        disp: [B, 2, H, W] predicted displacements (dy, dx).
        pairs: The masks of :func:`extract_pairs` for the same map and radius.
        radius: Affinity radius.

    Returns:
        ``dp_fg``: mean over ``pos_fg`` pairs and the two coordinates of ``|D(p) - D(q) - d|``
        (IRN's sum of the L1 norms divided by 2 * count); ``dp_bg``: the same of ``|D(p) - D(q)|``
        over ``pos_bg`` pairs (each 0 without pairs); ``total`` = their mean.
    """
    if disp.dim() != 4 or disp.shape[1] != 2:
        raise ValueError(f"displacement field must be [B, 2, H, W], got {tuple(disp.shape)}")
    src, dst = pair_values(disp, radius)
    diff = src - dst  # [B, 2, D, h, w]: D(p) - D(p + d)
    target = torch.tensor(search_offsets(radius), dtype=diff.dtype, device=diff.device)  # [D, 2]
    target = target.T.reshape(1, 2, -1, 1, 1)
    out = {
        "dp_fg": _masked_mean((diff - target).abs().mean(dim=1), pairs["pos_fg"]),
        "dp_bg": _masked_mean(diff.abs().mean(dim=1), pairs["pos_bg"]),
    }
    out["total"] = out["dp_fg"] / 2 + out["dp_bg"] / 2
    return out


def irn_loss(outputs: dict[str, torch.Tensor], label: torch.Tensor, radius: int) -> dict[str, torch.Tensor]:
    """IRN's training loss on the stride-4 IR labels.

    Args:
        outputs: IRN.forward's dict.
        label: [B, h, w] IR labels (0 background, class ids, IGNORE unknown) on the outputs' grid.
        radius: affinity radius (AMR.md section 7: 10).

    Returns:
        pos_bg, pos_fg, neg (affinity_loss of the boundary-derived affinities), dp_fg, dp_bg
        (displacement_loss), and total = boundary total + displacement total.
    """
    logits = outputs["boundary_logits"].float()
    if tuple(label.shape) != tuple(logits.shape):
        raise ValueError(f"IR labels {tuple(label.shape)} do not match the boundary map {tuple(logits.shape)}")
    pairs = extract_pairs(label, radius)
    aff = affinity_loss(boundary_to_affinity(torch.sigmoid(logits), radius), pairs)
    dp = displacement_loss(outputs["displacement"].float(), pairs, radius)
    out = {k: aff[k] for k in ("pos_bg", "pos_fg", "neg")}
    out.update(dp_fg=dp["dp_fg"], dp_bg=dp["dp_bg"], total=aff["total"] + dp["total"])
    return out


# --------------------------------------------------------------------------- DeepLab


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Cross-entropy of the scores, upsampled bilinearly to the label size, over pixels not ignored.

    Mean over the counted pixels of the whole batch; 0 (with a gradient path) when every pixel is
    ignored, where plain cross-entropy gives NaN.
    """
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction="none")
    counted = (labels != ignore_index).sum()
    return per_pixel.sum() / counted.clamp(min=1)
