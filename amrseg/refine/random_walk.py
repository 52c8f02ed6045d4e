"""IRN's random walk: CAMs propagated over boundary-derived affinities into pseudo masks.

The walk works at the CAMs' strided resolution (stride 4 in IRN); the caller upsamples the
propagated maps to the image before :func:`rw_label` if it wants full-resolution masks.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from amrseg.errors import AmrsegError
from amrseg.refine.affinity import boundary_to_affinity, crop_of, search_offsets

_NORMS = ("global", "per_class")


def sparse_affinity(aff: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Dense symmetric affinity matrix over an h x w grid from per-offset affinities.

    Args:
        aff: [D, h, w]; ``aff[k, y, x]`` is the affinity between pixel (y, x) and
            (y + dy_k, x + dx_k). Entries whose target lies outside the grid are ignored.
        offsets: The D offsets (dy_k, dx_k), one of each +/- pair (no pair may appear twice).

    Returns:
        [N, N] matrix, N = h * w (row-major pixel index), with A[p, q] = A[q, p] = the pair's
        affinity, 1 on the diagonal (IRN adds the identity: every pixel keeps part of its own
        mass) and 0 for pixels out of reach.
    """
    if aff.dim() != 3 or aff.shape[0] != len(offsets):
        raise AmrsegError(
            f"per-offset affinities {tuple(aff.shape)} do not match {len(offsets)} offsets"
        )
    _, h, w = aff.shape
    n = h * w
    dense = aff.new_zeros(n, n)
    index = torch.arange(n, device=aff.device).view(h, w)
    for k, (dy, dx) in enumerate(offsets):
        rows = slice(max(0, -dy), h - max(0, dy))
        cols = slice(max(0, -dx), w - max(0, dx))
        src = index[rows, cols].reshape(-1)
        dst = src + dy * w + dx
        val = aff[k, rows, cols].reshape(-1)
        dense[src, dst] = val
        dense[dst, src] = val
    dense.fill_diagonal_(1.0)
    return dense


def transition_matrix(aff_dense: torch.Tensor, beta: float) -> torch.Tensor:
    """Row-stochastic transition matrix ``T = D^-1 A`` with ``A = aff ** beta``, D its row sums.

    Args:
        aff_dense: [N, N] symmetric non-negative affinities with a positive diagonal.
        beta: Sharpening exponent (IRN: 10): weak affinities fade out.

    Returns:
        [N, N] matrix whose rows sum to 1.
    """
    scaled = aff_dense.clamp(min=0) ** beta
    return scaled / scaled.sum(dim=1, keepdim=True)


def random_walk(
    cams: torch.Tensor,
    aff_dense: torch.Tensor,
    beta: float = 10.0,
    exp_times: int = 8,
    squaring: bool | None = None,
) -> torch.Tensor:
    """Propagates each map by ``2 ** exp_times`` steps of the random walk.

    IRN computes ``cam_rw = cam_vec @ trans_mat ** (2 ** exp_times)`` with the column-normalised
    ``trans_mat = A D^-1``, which is ``T^T`` for the row-stochastic ``T`` of
    :func:`transition_matrix`. So each pixel's new value is an affinity-weighted average of the
    values around it: ``x_new = T^(2^k) x`` per map (x a column), and a constant map stays
    constant.

    Args:
        cams: [C, h, w] maps (any planes: the walk treats each alike).
        aff_dense: [N, N] affinities over the h * w pixels (:func:`sparse_affinity`).
        beta: Affinity exponent.
        exp_times: The walk takes ``2 ** exp_times`` steps.
        squaring: True: ``T^(2^k)`` by squaring ``exp_times`` times (IRN); False: ``2^k``
            products of the thin [C, N] maps with the matrix. Same result; None picks the
            cheaper one (squaring costs ``exp_times * N^3``, the products ``2^k * C * N^2``).

    Returns:
        [C, h, w] propagated maps, on ``cams``' device.
    """
    if cams.dim() != 3:
        raise AmrsegError(f"random walk maps must be [C, h, w], got {tuple(cams.shape)}")
    c, h, w = cams.shape
    n = h * w
    if tuple(aff_dense.shape) != (n, n):
        raise AmrsegError(f"affinity matrix {tuple(aff_dense.shape)} does not match {h}x{w} maps")
    trans = transition_matrix(aff_dense.to(device=cams.device, dtype=torch.float32), beta)
    # IRN's column-normalised matrix; maps as rows ([C, N] @ [N, N]), which is also the fast layout.
    step = trans.T
    x = cams.reshape(c, n).to(torch.float32)
    steps = 2**exp_times
    if squaring is None:
        squaring = exp_times * n < steps * c
    if squaring:
        for _ in range(exp_times):
            step = step @ step
        x = x @ step
    else:
        for _ in range(steps):
            x = x @ step
    return x.reshape(c, h, w)


def propagate(
    cams: torch.Tensor,
    boundary: torch.Tensor,
    radius: int = 5,
    beta: float = 10.0,
    exp_times: int = 8,
    bg_threshold: float = 0.25,
    cam_power: float = 1.0,
    norm: str = "global",
) -> torch.Tensor:
    """IRN's pseudo-mask step: class CAMs random-walked over the boundary's affinities.

    Exactly, in IRN's order (its ``propagate_to_edge`` + ``make_sem_seg_labels``):

    1. ``x = relu(cams) ** cam_power`` (the AMR release uses 1.5), then ``x *= 1 - boundary``:
       no activation starts on a boundary.
    2. Affinities from :func:`boundary_to_affinity` over every pixel of the grid (the boundary is
       padded with 1 so border pixels get their in-grid pairs), as a dense matrix
       (:func:`sparse_affinity`), then :func:`random_walk` of the class planes.
    3. Normalisation: ``norm="global"`` divides all planes by their common max (IRN and the
       AMR release); ``"per_class"`` divides each plane by its own max, so every class reaches
       1 somewhere. A plane that is all 0 stays 0. (IRN normalises after upsampling the walk
       x4 to the image; here it happens on the grid, so a max can differ by the interpolation.)
    4. A constant background plane at ``bg_threshold`` is put in front. It is added *after* the
       walk and the normalisation: the walk averages, so a constant plane would come out
       unchanged, and normalising it would lift it to 1.

    Args:
        cams: [n, h, w] CAMs of the image's classes (background not included), >= 0.
        boundary: [h, w] class-boundary probabilities in [0, 1] at the same resolution.
        radius: Affinity radius (IRN: 5).
        beta: Affinity exponent (IRN: 10).
        exp_times: The walk takes ``2 ** exp_times`` steps (IRN: 8).
        bg_threshold: Value of the background plane (IRN: 0.25).
        cam_power: Exponent applied to the CAMs before the walk.
        norm: "global" or "per_class" (step 3).

    Returns:
        [n + 1, h, w] maps, background plane first; their argmax is the pseudo mask
        (:func:`rw_label`).
    """
    if norm not in _NORMS:
        raise AmrsegError(f"unknown random-walk normalisation {norm!r}; choose from {list(_NORMS)}")
    if cams.dim() != 3 or boundary.shape != cams.shape[1:]:
        raise AmrsegError(
            f"CAMs {tuple(cams.shape)} and boundary {tuple(boundary.shape)} do not match"
        )
    n, h, w = cams.shape
    boundary = boundary.to(device=cams.device, dtype=torch.float32)
    background = torch.full((1, h, w), float(bg_threshold), device=cams.device)
    if n == 0:
        return background

    x = cams.to(torch.float32).clamp(min=0) ** cam_power
    x = x * (1.0 - boundary)

    offsets = search_offsets(radius)
    crop = crop_of(offsets)
    # Pad so that the cropped "from" pixels of boundary_to_affinity are exactly the h x w grid;
    # pairs reaching into the padding are dropped by sparse_affinity.
    pad = (crop.max_dx_neg, crop.max_dx_pos, 0, crop.max_dy)
    padded = F.pad(boundary[None, None], pad, value=1.0)
    aff = boundary_to_affinity(padded[:, 0], radius)[0]
    rw = random_walk(x, sparse_affinity(aff, offsets), beta=beta, exp_times=exp_times)

    if norm == "global":
        peak = rw.max()
    else:
        peak = rw.flatten(1).max(dim=1).values.view(n, 1, 1)
    rw = rw / torch.as_tensor(peak).clamp(min=1e-5)
    return torch.cat([background, rw], dim=0)


def rw_label(maps: torch.Tensor | np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Pseudo mask from propagated maps: argmax mapped to class ids.

    Args:
        maps: [n + 1, H, W] maps, background plane first (:func:`propagate`, possibly upsampled).
        keys: [n] 0-based foreground class indices of the planes after the first.

    Returns:
        HxW uint8 mask: 0 background, ``keys[i] + 1`` where plane i + 1 wins (ties go to the
        earlier plane, so to background first).
    """
    maps = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if maps.ndim != 3 or maps.shape[0] != keys.shape[0] + 1:
        raise AmrsegError(
            f"maps of shape {maps.shape} do not match {keys.shape[0]} keys plus background"
        )
    class_ids = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return class_ids[np.argmax(maps, axis=0)]
