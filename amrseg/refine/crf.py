"""Dense-CRF refinement and IRN's inter-pixel relation (IR) labels (AMR.md section 7).

The IR labels are the training targets of the IRN boundary branch: confident foreground,
confident background, and 255 (unknown) between them.
"""
from __future__ import annotations

import numpy as np

from ..data.voc import IGNORE
from ..errors import AmrsegError


def crf_inference_label(
    img: np.ndarray, labels: np.ndarray, n_labels: int, t: int = 10, gt_prob: float = 0.7
) -> np.ndarray:
    """Refines a hard label map with a fully connected CRF (IRN's settings).

    Unary from the labels (each pixel's label has probability ``gt_prob``, the rest share the
    remainder), a Gaussian smoothness kernel (sxy 3, compat 3) and a bilateral appearance kernel
    (sxy 50, srgb 5, compat 10), ``t`` mean-field iterations, then the argmax.

    Args:
        img: HxWx3 uint8 RGB image.
        labels: HxW integer label map with values in [0, n_labels).
        n_labels: Number of labels.
        t: Mean-field iterations.
        gt_prob: Confidence given to the input labels, in (0, 1).

    Returns:
        HxW int64 label map with values in [0, n_labels).

    Raises:
        AmrsegError: If pydensecrf is not installed or the inputs do not fit together.
    """
    img = _check_image(img)
    labels = np.asarray(labels)
    h, w = img.shape[:2]
    if labels.shape != (h, w):
        raise AmrsegError(f"CRF labels shape {labels.shape} does not match image {(h, w)}")
    if not 0.0 < gt_prob < 1.0:
        raise AmrsegError(f"CRF gt_prob must be in (0, 1), got {gt_prob}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise AmrsegError(
            f"CRF labels must lie in [0, {n_labels}), got {labels.min()}..{labels.max()}"
        )
    if n_labels < 2:
        # One label: nothing to decide (and unary_from_labels would divide by n_labels - 1 = 0).
        return np.zeros((h, w), dtype=np.int64)
    from pydensecrf.utils import unary_from_labels

    unary = unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False)
    return np.argmax(_mean_field(img, unary, n_labels, t), axis=0).astype(np.int64)


def crf_inference_prob(img: np.ndarray, probs: np.ndarray, t: int = 10) -> np.ndarray:
    """Dense CRF on class probabilities (segmentation post-processing), IRN's pairwise terms.

    Args:
        img: HxWx3 uint8 RGB image.
        probs: [C, H, W] class probabilities (softmax), each pixel's summing to 1.
        t: Mean-field iterations.

    Returns:
        [C, H, W] float32 refined marginals.
    """
    img = _check_image(img)
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[1:] != img.shape[:2]:
        raise AmrsegError(f"CRF probabilities {probs.shape} do not match image {img.shape[:2]}")
    unary = -np.log(np.clip(probs, 1e-8, 1.0)).reshape(probs.shape[0], -1)
    return _mean_field(img, unary, probs.shape[0], t)


def _check_image(img: np.ndarray) -> np.ndarray:
    _densecrf()  # fail early with the install hint
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise AmrsegError(f"CRF image must be HxWx3 uint8, got {img.dtype} {img.shape}")
    return img


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        raise AmrsegError(
            "dense CRF needs the 'crf' extra: pip install 'amrseg[crf]' (pydensecrf2)"
        ) from None
    return dcrf


def _mean_field(img: np.ndarray, unary: np.ndarray, n_labels: int, t: int) -> np.ndarray:
    """[n_labels, H, W] marginals after t mean-field steps: Gaussian (sxy 3, compat 3) + bilateral (50, 5, 10)."""
    h, w = img.shape[:2]
    crf = _densecrf().DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    # The C++ side reads the raw buffer: it must be C-contiguous uint8.
    crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(img), compat=10)
    return np.asarray(crf.inference(t), dtype=np.float32).reshape(n_labels, h, w)


def ir_label(
    img: np.ndarray,
    high_res: np.ndarray,
    keys: np.ndarray,
    fg_threshold: float,
    bg_threshold: float,
    crf: bool = True,
) -> np.ndarray:
    """IRN/AMR inter-pixel relation labels from an image's CAMs.

    For each threshold (fg, then bg) a constant plane at that threshold is put in front of the
    CAMs and the argmax taken (ties go to background), giving labels 0..n (0 background, i + 1 for
    ``keys[i]``); with ``crf`` each map is refined by :func:`crf_inference_label`. Then, in
    class ids (0 background, ``keys[i] + 1``)::

        out = 255 everywhere; out[lo == 0] = 0; out[hi != 0] = hi[hi != 0]

    where ``hi``/``lo`` are the fg/bg-threshold maps: confident foreground from the high
    threshold (it wins over ``lo``), confident background where both say background.

    Args:
        img: HxWx3 uint8 RGB image (used only by the CRF).
        high_res: [n, H, W] CAMs in [0, 1] of the image's classes.
        keys: [n] 0-based foreground class indices of the planes.
        fg_threshold: High threshold: foreground above it is trusted.
        bg_threshold: Low threshold: background below it is trusted.
        crf: Refine both maps with the dense CRF (needs the 'crf' extra).

    Returns:
        HxW uint8 label map: 0 background, class id (key + 1), 255 unknown.

    Raises:
        AmrsegError: If the shapes do not fit together or the class ids exceed 254.
    """
    high_res = np.asarray(high_res, dtype=np.float32)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if high_res.ndim != 3 or high_res.shape[0] != keys.shape[0]:
        raise AmrsegError(f"CAMs of shape {high_res.shape} do not match {keys.shape[0]} keys")
    size = np.asarray(img).shape[:2]
    if size != high_res.shape[1:]:
        raise AmrsegError(f"image size {size} does not match CAMs {high_res.shape[1:]}")
    if keys.size and (keys.min() < 0 or keys.max() + 1 >= IGNORE):
        raise AmrsegError(f"class keys must lie in [0, {IGNORE - 1}), got {keys.tolist()}")
    class_ids = np.concatenate([[0], keys + 1])
    n_labels = class_ids.shape[0]

    def thresholded(t: float) -> np.ndarray:
        bg = np.full((1,) + high_res.shape[1:], t, dtype=np.float32)
        # np.argmax returns the first maximum, so ties go to the background plane.
        label = np.argmax(np.concatenate([bg, high_res], axis=0), axis=0)
        if crf:
            label = crf_inference_label(img, label, n_labels)
        return class_ids[label]

    hi = thresholded(fg_threshold)
    lo = thresholded(bg_threshold)
    out = np.full(hi.shape, IGNORE, dtype=np.uint8)
    out[lo == 0] = 0
    out[hi != 0] = hi[hi != 0]
    return out
