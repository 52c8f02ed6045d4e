"""IRN's random walk: CAMs propagated over boundary-derived affinities into pseudo masks.

The walk works at the CAMs' strided resolution (stride 4 in IRN, :func:`walk`); :func:`walk_scores`
upsamples the walked maps to the image, normalises them there and puts the background plane in front;
:func:`rw_label` takes the argmax.

Two forms of the affinity matrix: dense (:func:`dense_affinity`, :func:`random_walk`), the
reference the tests check against, and sparse (:func:`affinity_coo`, :func:`random_walk_sparse`),
which :func:`walk` uses. A VOC image has N ~ 12k pixels at stride 4: the dense matrix is
N^2 floats (0.5 GB), the sparse one N (2D + 1) entries (D = 34 offsets at radius 5).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models.affinity import boundary_to_affinity, crop_of, search_offsets

IRN_EXP_TIMES = 8  # IRN's 2^8 walk steps, set for VOC's ~500 px images
IRN_IMAGE_SIDE = 512

_NORMS = ("global", "per_class")


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Torch on one intra-op thread for the block when ``device`` is the CPU; the count is restored.

    The walk's products are small and many (2^8 per image): on a loaded CPU, threads that wait on
    each other cost far more than they share (NOTES.md, "Random walk"). Other work (DataLoader
    workers, a CRF pool) keeps the other cores busy anyway.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def walk_step(trans: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One step of the sparse walk for the [N, C] block of maps: ``T x``."""
    return trans @ x


def _pairs(aff: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p, q, affinity)`` of every pair of the grid, as flat pixel indices (row-major) and values.

    Args:
        aff: [D, h, w]; ``aff[k, y, x]`` is the affinity between pixel (y, x) and
            (y + dy_k, x + dx_k). Entries whose target lies outside the grid are left out.
        offsets: The D offsets (dy_k, dx_k), one of each +/- pair (no pair may appear twice).
    """
    if aff.dim() != 3 or aff.shape[0] != len(offsets):
        raise ValueError(f"per-offset affinities {tuple(aff.shape)} do not match {len(offsets)} offsets")
    _, h, w = aff.shape
    index = torch.arange(h * w, device=aff.device).view(h, w)
    src, dst, val = [index.new_zeros(0)], [index.new_zeros(0)], [aff.new_zeros(0)]
    for k, (dy, dx) in enumerate(offsets):
        ys = slice(max(0, -dy), h - max(0, dy))
        xs = slice(max(0, -dx), w - max(0, dx))
        src.append(index[ys, xs].reshape(-1))
        dst.append(src[-1] + dy * w + dx)
        val.append(aff[k, ys, xs].reshape(-1))
    return torch.cat(src), torch.cat(dst), torch.cat(val)


def dense_affinity(aff: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Dense symmetric affinity matrix over an h x w grid from per-offset affinities.

    Args:
        aff: [D, h, w] per-offset affinities, offsets: their D offsets (as for :func:`_pairs`).

    Returns:
        [N, N] matrix, N = h * w (row-major pixel index), with A[p, q] = A[q, p] = the pair's
        affinity, 1 on the diagonal (IRN adds the identity: every pixel keeps part of its own
        mass) and 0 for pixels out of reach.
    """
    src, dst, val = _pairs(aff, offsets)
    n = aff.shape[1] * aff.shape[2]
    dense = aff.new_zeros(n, n)
    dense[src, dst] = val
    dense[dst, src] = val
    dense.fill_diagonal_(1.0)
    return dense


def affinity_coo(aff: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The matrix of :func:`dense_affinity` as a sparse COO tensor (same entries, same layout).

    Args:
        aff: [D, h, w] per-offset affinities (as for :func:`dense_affinity`).
        offsets: The D offsets, one of each +/- pair.

    Returns:
        Coalesced sparse [N, N] tensor on ``aff``'s device: both (p, q) and (q, p) for each pair
        in the grid, and the unit diagonal.
    """
    src, dst, val = _pairs(aff, offsets)
    n = aff.shape[1] * aff.shape[2]
    diag = torch.arange(n, device=aff.device)
    indices = torch.stack([torch.cat([diag, src, dst]), torch.cat([diag, dst, src])])
    values = torch.cat([aff.new_ones(n), val, val])
    # Indices are in range by construction: skip the invariant checks (and their warning).
    return torch.sparse_coo_tensor(indices, values, (n, n), check_invariants=False).coalesce()


def random_walk_sparse(
    cams: torch.Tensor, aff: torch.Tensor, beta: float = 10.0, exp_times: int = IRN_EXP_TIMES
) -> torch.Tensor:
    """:func:`random_walk` on a sparse affinity matrix: ``2 ** exp_times`` sparse products.

    Same result as ``random_walk(cams, aff.to_dense(), beta, exp_times)``: with the row-stochastic
    ``T = D^-1 A^beta`` each step is ``x <- T x`` for every map x (a column of the [N, C] block).
    Squaring T would fill it in, so the walk multiplies the thin block instead. On the CPU the
    products run on one torch thread (:func:`one_cpu_thread`).

    Args:
        cams: [C, h, w] maps.
        aff: Sparse [N, N] affinities over the h * w pixels (:func:`affinity_coo`).
        beta: Affinity exponent.
        exp_times: The walk takes ``2 ** exp_times`` steps.

    Returns:
        [C, h, w] propagated maps (float32), on ``cams``' device.
    """
    if cams.dim() != 3:
        raise ValueError(f"random walk maps must be [C, h, w], got {tuple(cams.shape)}")
    c, h, w = cams.shape
    n = h * w
    if not aff.is_sparse or tuple(aff.shape) != (n, n):
        raise ValueError(f"sparse affinity matrix {tuple(aff.shape)} does not match {h}x{w} maps")
    aff = aff.to(device=cams.device, dtype=torch.float32).coalesce()
    rows = aff.indices()[0]
    scaled = aff.values().clamp(min=0) ** beta
    row_sum = torch.zeros(n, device=cams.device).index_add_(0, rows, scaled)
    trans = torch.sparse_coo_tensor(aff.indices(), scaled / row_sum[rows], (n, n), check_invariants=False)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR products are the faster (NOTES.md)
        warnings.simplefilter("ignore", UserWarning)
        trans = trans.to_sparse_csr()
    x = cams.reshape(c, n).to(torch.float32).T.contiguous()  # [N, C]
    with one_cpu_thread(x.device):
        for _ in range(2**exp_times):
            x = walk_step(trans, x)
    return x.T.reshape(c, h, w)


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
    exp_times: int = IRN_EXP_TIMES,
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
        aff_dense: [N, N] affinities over the h * w pixels (:func:`dense_affinity`).
        beta: Affinity exponent.
        exp_times: The walk takes ``2 ** exp_times`` steps.
        squaring: True: ``T^(2^k)`` by squaring ``exp_times`` times (IRN); False: ``2^k``
            products of the thin [C, N] maps with the matrix. Same result; None picks the
            cheaper one (squaring costs ``exp_times * N^3``, the products ``2^k * C * N^2``).

    Returns:
        [C, h, w] propagated maps, on ``cams``' device.
    """
    if cams.dim() != 3:
        raise ValueError(f"random walk maps must be [C, h, w], got {tuple(cams.shape)}")
    c, h, w = cams.shape
    n = h * w
    if tuple(aff_dense.shape) != (n, n):
        raise ValueError(f"affinity matrix {tuple(aff_dense.shape)} does not match {h}x{w} maps")
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


def suggested_exp_times(side: float) -> int:
    """The walk's `exp_times` that gives images of `side` px the reach IRN's 2^8 steps give 512 px.

    A walk of k steps spreads about sqrt(k) radii, while the grid's side grows with the image: so
    k scales with side^2, `exp_times` = 8 + 2 log2(side / 512), rounded (at least 1). 512 -> 8,
    160 -> 5, 128 -> 4. On 160 px emoji-VOC scenes 2^5 steps beat IRN's 2^8 (NOTES.md, "The walk's
    reach").
    """
    if side <= 0:
        raise ValueError(f"image side must be positive, got {side}")
    return max(1, int(round(IRN_EXP_TIMES + 2 * np.log2(side / IRN_IMAGE_SIDE))))


def walk(
    cams: torch.Tensor,
    boundary: torch.Tensor,
    radius: int = 5,
    beta: float = 10.0,
    exp_times: int = IRN_EXP_TIMES,
    cam_power: float = 1.0,
    sparse: bool = True,
) -> torch.Tensor:
    """IRN's random walk of class CAMs over a boundary map's affinities (its ``propagate_to_edge``).

    1. ``x = relu(cams) ** cam_power`` (AMR's release: 1.5, IRN's: 1), then ``x *= 1 - boundary``:
       no activation starts on a boundary.
    2. Affinities from :func:`boundary_to_affinity` over every pixel of the grid (the boundary is
       padded with 1 so border pixels get their in-grid pairs), as a sparse matrix
       (:func:`affinity_coo`), then :func:`random_walk_sparse` of the class planes (``sparse``
       False: the dense :func:`dense_affinity` and :func:`random_walk`, the reference). On the
       CPU all of it runs on one torch thread (:func:`one_cpu_thread`).

    The walked maps are returned as they are: IRN normalises them only after upsampling them to the
    image (:func:`walk_scores`).

    Args:
        cams: [n, h, w] CAMs of the image's classes (background not included), >= 0.
        boundary: [h, w] class-boundary probabilities in [0, 1] at the same resolution.
        radius: Affinity radius (IRN: 5).
        beta: Affinity exponent (IRN: 10).
        exp_times: The walk takes ``2 ** exp_times`` steps (IRN: 8).
        cam_power: Exponent applied to the CAMs before the walk.
        sparse: Walk on the sparse matrix (default); False builds the dense N x N one.

    Returns:
        [n, h, w] walked maps (float32), on ``cams``' device.
    """
    if cams.dim() != 3 or boundary.shape != cams.shape[1:]:
        raise ValueError(
            f"CAMs {tuple(cams.shape)} and boundary {tuple(boundary.shape)} do not match"
        )
    n, h, w = cams.shape
    if n == 0:
        return cams.new_zeros((0, h, w), dtype=torch.float32)
    boundary = boundary.to(device=cams.device, dtype=torch.float32)
    x = cams.to(torch.float32).clamp(min=0) ** cam_power
    x = x * (1.0 - boundary)

    offsets = search_offsets(radius)
    crop = crop_of(offsets)
    # Pad so that the cropped "from" pixels of boundary_to_affinity are exactly the h x w grid;
    # pairs reaching into the padding are dropped by _pairs.
    pad = (crop.max_dx_neg, crop.max_dx_pos, 0, crop.max_dy)
    padded = F.pad(boundary[None, None], pad, value=1.0)
    with one_cpu_thread(x.device):
        aff = boundary_to_affinity(padded[:, 0], radius)[0]
        if sparse:
            return random_walk_sparse(x, affinity_coo(aff, offsets), beta=beta, exp_times=exp_times)
        return random_walk(x, dense_affinity(aff, offsets), beta=beta, exp_times=exp_times)


def walk_scores(
    walked: torch.Tensor,
    size: tuple[int, int],
    stride: int = 4,
    bg_threshold: float = 0.25,
    norm: str = "global",
) -> torch.Tensor:
    """The walked maps as class scores on the image, in IRN's order (its ``make_sem_seg_labels``).

    1. Upsampled ``stride`` times bilinearly (half-pixel centres), then cut to the image's
       ``size``: grid cell i covers pixels ``stride * i .. stride * i + stride - 1``.
    2. Normalised *there*, on the image's pixels: ``norm="global"`` divides all planes by their
       common max (IRN and the AMR release); ``"per_class"`` divides each plane by its own max. A
       plane that is all 0 stays 0.
    3. A constant background plane at ``bg_threshold`` put in front (after the normalisation,
       which would otherwise lift it).

    Args:
        walked: [n, h, w] walked maps (:func:`walk`).
        size: (H, W) of the image, at most (stride * h, stride * w).
        stride: The grid's stride (IRN: 4).
        bg_threshold: Value of the background plane (IRN: 0.25).
        norm: "global" or "per_class" (step 2).

    Returns:
        [n + 1, H, W] scores, background plane first; their argmax is the pseudo mask
        (:func:`rw_label`).
    """
    if norm not in _NORMS:
        raise ValueError(f"unknown random-walk normalisation {norm!r}; choose from {list(_NORMS)}")
    if walked.dim() != 3:
        raise ValueError(f"walked maps must be [n, h, w], got {tuple(walked.shape)}")
    n, h, w = walked.shape
    height, width = size
    if not (0 < height <= stride * h and 0 < width <= stride * w):
        raise ValueError(f"image size {height}x{width} does not fit a {h}x{w} grid at stride {stride}")
    background = torch.full((1, height, width), float(bg_threshold), device=walked.device)
    if n == 0:
        return background
    up = walked.to(torch.float32)[None]
    if stride != 1:
        up = F.interpolate(up, size=(stride * h, stride * w), mode="bilinear", align_corners=False)
    up = up[0, :, :height, :width]
    if norm == "global":
        peak = up.max()
    else:
        peak = up.flatten(1).max(dim=1).values.view(n, 1, 1)
    up = up / torch.as_tensor(peak).clamp(min=1e-5)
    return torch.cat([background, up], dim=0)


def rw_label(maps: torch.Tensor | np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Pseudo mask from propagated maps: argmax mapped to class ids.

    Args:
        maps: [n + 1, H, W] maps, background plane first (:func:`walk_scores`).
        keys: [n] 0-based foreground class indices of the planes after the first.

    Returns:
        HxW uint8 mask: 0 background, ``keys[i] + 1`` where plane i + 1 wins (ties go to the
        earlier plane, so to background first).
    """
    maps = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if maps.ndim != 3 or maps.shape[0] != keys.shape[0] + 1:
        raise ValueError(
            f"maps of shape {maps.shape} do not match {keys.shape[0]} keys plus background"
        )
    class_ids = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return class_ids[np.argmax(maps, axis=0)]
