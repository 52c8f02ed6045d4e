"""Segmentation metrics: the project's one confusion-matrix implementation (AMR.md section 6).

All functions are pure and batched, take torch tensors on any device and return tensors on the
same device. Class ids run over background (0) plus the K foreground classes, so a confusion
matrix is C x C with C = K + 1; rows are ground truth, columns are prediction.
"""
from __future__ import annotations

import torch

from ..data.voc import IGNORE


def _check_labels(gt: torch.Tensor, pred: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises ValueError unless every counted label lies in [0, num_classes).

    A silent drop of out-of-range labels would skew every IoU, so they are an error.
    """
    if gt.numel() == 0:
        return
    lo = torch.minimum(gt.min(), pred.min()).item()
    hi = torch.maximum(gt.max(), pred.max()).item()
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) or be {ignore_index}; got {lo}..{hi}")


def confusion_matrix(
    pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_index: int = IGNORE
) -> torch.Tensor:
    """Counts (ground truth, prediction) pairs over all pixels whose label is not ignored.

    Args:
        pred: Predicted class ids, any shape, values in [0, num_classes).
        gt: Ground-truth class ids, same shape as `pred`, values in [0, num_classes) or ignore_index.
        num_classes: C, the number of classes including background.
        ignore_index: Label of pixels left out of the count.

    Returns:
        int64 tensor [C, C]: entry [g, p] = number of pixels with ground truth g predicted as p.

    Raises:
        ValueError: If shapes differ or a counted label falls outside [0, num_classes).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != gt shape {tuple(gt.shape)}")
    gt = gt.reshape(-1).long()
    pred = pred.reshape(-1).long().to(gt.device)
    keep = gt != ignore_index
    gt, pred = gt[keep], pred[keep]
    _check_labels(gt, pred, num_classes, ignore_index)
    counts = torch.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU = TP / (TP + FP + FN) and their mean over the classes that occur.

    Args:
        conf: Confusion matrices [..., C, C] (rows ground truth, columns prediction).

    Returns:
        (iou, miou): float64 [..., C] with NaN for classes absent from both ground truth and
        prediction, and float64 [...] the nanmean over classes (NaN if no class occurs).
    """
    conf = conf.double()
    tp = torch.diagonal(conf, dim1=-2, dim2=-1)
    union = conf.sum(-1) + conf.sum(-2) - tp  # TP + FN + FP
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    return iou, torch.nanmean(iou, dim=-1)


def sweep_confusion(
    scores: torch.Tensor,
    keys: torch.Tensor,
    gt: torch.Tensor,
    thresholds: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE,
) -> torch.Tensor:
    """Confusion matrices of one image at every background threshold, in one pass.

    The prediction at threshold t is the argmax over [t-plane, scores] with ties going to the
    background plane, mapped to [0, keys + 1]: a pixel is foreground iff its max score > t, and
    then takes the class of its (first) maximal map. Rather than re-predicting per threshold,
    each pixel's max score is bucketed among the thresholds; a histogram over (gt, fg class,
    bucket) and a cumulative sum over buckets then give the fg/bg split at every threshold.

    Args:
        scores: Class maps [n, H, W] (float).
        keys: int64 [n], the foreground index of each map (class id = key + 1).
        gt: Ground truth [H, W] in [0, num_classes) or ignore_index.
        thresholds: Sorted 1-D tensor [T] of background thresholds.
        num_classes: C, the number of classes including background.
        ignore_index: Label of pixels left out of the count.

    Returns:
        int64 tensor [T, C, C], the confusion matrix at each threshold.
    """
    if scores.dim() != 3 or keys.shape != scores.shape[:1] or gt.shape != scores.shape[1:]:
        raise ValueError(
            f"expected scores [n,H,W], keys [n], gt [H,W]; got {tuple(scores.shape)}, "
            f"{tuple(keys.shape)}, {tuple(gt.shape)}"
        )
    if thresholds.dim() != 1 or not bool((thresholds[1:] >= thresholds[:-1]).all()):
        raise ValueError("thresholds must be a sorted 1-D tensor")
    num_t = thresholds.numel()
    device = gt.device
    if scores.shape[0] == 0:
        conf = confusion_matrix(torch.zeros_like(gt), gt, num_classes, ignore_index)
        return conf.unsqueeze(0).expand(num_t, -1, -1).clone()

    # Compare in one dtype (at least float32) so that ties at a threshold are exact.
    dtype = torch.promote_types(torch.promote_types(scores.dtype, thresholds.dtype), torch.float32)
    scores = scores.to(device=device, dtype=dtype)
    thresholds = thresholds.to(device=device, dtype=dtype)
    top, arg = scores.amax(dim=0), scores.argmax(dim=0)
    fg_class = keys.to(device).long()[arg] + 1  # argmax returns the first maximum
    # Bucket b = number of thresholds strictly below the max: foreground for thresholds j < b.
    bucket = torch.searchsorted(thresholds, top.contiguous(), right=False)

    gt_flat, fg_flat, b_flat = gt.reshape(-1).long(), fg_class.reshape(-1), bucket.reshape(-1)
    keep = gt_flat != ignore_index
    gt_flat, fg_flat, b_flat = gt_flat[keep], fg_flat[keep], b_flat[keep]
    _check_labels(gt_flat, fg_flat, num_classes, ignore_index)
    nb = num_t + 1
    index = (gt_flat * num_classes + fg_flat) * nb + b_flat
    hist = torch.bincount(index, minlength=num_classes * num_classes * nb)
    hist = hist.reshape(num_classes, num_classes, nb)  # [gt, fg class, bucket]

    # fg[g, c, j] = pixels of gt g, class c with bucket > j, i.e. foreground at threshold j.
    suffix = hist.flip(-1).cumsum(-1).flip(-1)
    fg = suffix[..., 1:]  # [C, C, T]; column 0 is empty since fg classes are >= 1
    total = hist.sum(dim=(1, 2))  # [C] pixels per gt class
    conf = fg.permute(2, 0, 1).clone()  # [T, gt, pred]
    conf[:, :, 0] += total.unsqueeze(0) - fg.sum(dim=1).transpose(0, 1)
    return conf
