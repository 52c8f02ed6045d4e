"""Segmentation inference of a trained DeepLab (the maths of `eval-seg --run` and `predict`).

Per image: the class scores at every scale, of the image and its flip (flipped back), upsampled
bilinearly to the image, softmaxed and averaged; optionally a dense CRF on those probabilities; the
argmax is the mask.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data.transforms import normalize
from .models.deeplab import DeepLabV2


@torch.inference_mode()
def predict_probs(model: DeepLabV2, image: np.ndarray, scales: Sequence[float], device: torch.device) -> torch.Tensor:
    """[C, H, W] class probabilities of an HxWx3 uint8 image, averaged over scales and flips."""
    x = normalize(image)[None].to(device)
    H, W = x.shape[-2:]
    total = torch.zeros(model.num_classes, H, W, device=device)
    for s in scales:
        h, w = max(1, round(H * s)), max(1, round(W * s))
        xs = x if (h, w) == (H, W) else F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        logits = model(torch.cat([xs, xs.flip(-1)])).float()
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)
        total += probs[0] + probs[1].flip(-1)
    return total / (2 * len(scales))


def predict_mask(model: DeepLabV2, image: np.ndarray, scales: Sequence[float], device: torch.device,
                 crf: bool = False) -> np.ndarray:
    """HxW uint8 class mask of an image (optionally CRF-refined)."""
    probs = predict_probs(model, image, scales, device)
    if crf:
        from .refine.crf import crf_inference_prob

        return np.argmax(crf_inference_prob(image, probs.cpu().numpy()), axis=0).astype(np.uint8)
    return probs.argmax(dim=0).to(torch.uint8).cpu().numpy()
