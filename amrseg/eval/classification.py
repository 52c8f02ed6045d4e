"""Multi-label classification metrics: average precision per class and its mean (mAP).

Pure functions of torch tensors. AP follows the usual definition (scikit-learn's
`average_precision_score`, PASCAL VOC's classification AP without interpolation):
AP = sum over the distinct score thresholds t, high to low, of (R(t) - R(t_prev)) * P(t), where
P and R are the precision and recall of "score >= t". Tied scores form one threshold.
"""
from __future__ import annotations

import torch


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AP of each class.

    Args:
        scores: [N, K] real scores (any monotone scale: logits or probabilities).
        labels: [N, K] 0/1 targets.

    Returns:
        float64 [K]: AP per class; NaN for a class without a positive example.
    """
    if scores.shape != labels.shape or scores.dim() != 2:
        raise ValueError(f"scores and labels must both be [N, K], got {list(scores.shape)} and {list(labels.shape)}")
    scores = scores.detach().double().cpu()
    labels = (labels.detach().cpu() > 0).double()
    out = torch.full((scores.shape[1],), float("nan"), dtype=torch.float64)
    for k in range(scores.shape[1]):
        s, y = scores[:, k], labels[:, k]
        positives = y.sum()
        if positives == 0:
            continue
        order = torch.argsort(s, descending=True, stable=True)
        s, y = s[order], y[order]
        tp = torch.cumsum(y, 0)
        # The last index of each run of tied scores: one threshold per distinct score.
        last = torch.ones_like(s, dtype=torch.bool)
        last[:-1] = s[1:] != s[:-1]
        tp = tp[last]
        seen = torch.arange(1, len(s) + 1, dtype=torch.float64)[last]
        precision = tp / seen
        recall = tp / positives
        recall_step = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
        out[k] = (recall_step * precision).sum()
    return out


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean of `average_precision` over the classes with at least one positive (NaN if none has)."""
    ap = average_precision(scores, labels)
    ap = ap[~torch.isnan(ap)]
    return float(ap.mean()) if len(ap) else float("nan")


class _ValImages(torch.utils.data.Dataset):
    """Val images resized so the long side is `long_side`, normalised; no augmentation."""

    def __init__(self, data, long_side: int):
        self.data, self.long_side = data, long_side

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        from ..data.transforms import normalize, resize_long

        return normalize(resize_long(self.data.load_image(i), self.long_side))


def map_validator(data, long_side: int, num_workers: int, device: torch.device):
    """(model) -> {"val_map": mAP} of a CAM network on the split `data`: train-cam's per-epoch figure.

    Each image's score per class is the mean of the branches' sigmoid scores over the image and its
    flip (one forward of the pair, the image's long side at `long_side`: amr-official's AMMs take
    their eval statistics over that pair, as make-cam); mAP over the classes present in the split.
    """
    labels = torch.from_numpy(data.labels.astype("float32"))
    # Its own generator: the val pass never draws from the global RNG the training run uses.
    loader = torch.utils.data.DataLoader(_ValImages(data, long_side), batch_size=1,
                                         num_workers=min(num_workers, 2), generator=torch.Generator())

    def evaluate(model: torch.nn.Module) -> dict:
        scores = []
        for image in loader:
            x = image.to(device)
            out = model(torch.cat([x, x.flip(-1)]))  # batch size 1: the image, then its flip
            probs = [torch.sigmoid(v.float()) for k, v in out.items() if k.startswith("logits_")]
            scores.append(torch.stack(probs).mean(dim=(0, 1))[None].cpu())
        return {"val_map": mean_average_precision(torch.cat(scores), labels)}

    return evaluate
