"""A slow reading of IRN's pseudo-mask step, for the tests (and bench/irn_fidelity.py).

Written from the formulas of jiwoon-ahn/irn (misc/indexing.py, step/make_sem_seg_labels.py,
net/resnet50_irn.py; the AMR release adds the CAM power), not from amrseg's code: float64 numpy,
dense matrices, loops over pixels. Only the network's forward pass is shared with amrseg.

- Boundary: the image and its flip, each zero-padded to the right and below to the crop, one
  batch; logits cut to the first (H - 1) // 4 + 1 rows and (W - 1) // 4 + 1 columns; the flip's
  flipped back; sigmoid of logit_0 / 2 + logit_1 / 2.
- Path of an offset d: the lattice points of the box spanned by 0 and d whose distance to the line
  through 0 and d is below 1.
- Affinity of pixels p and p + d (both in the grid): 1 - the largest boundary on p + the path of d.
  The matrix has 1 on its diagonal and is symmetric.
- Walk: T = A ** beta divided by its column sums, squared exp_times times; the CAMs ** power, times
  1 - boundary, as rows, times T.
- Mask: the walked maps upsampled x4 bilinearly (half-pixel centres), cut to the image, divided by
  their common max; a background plane at bg in front; argmax; 0 or key + 1.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def irn_offsets(radius: int) -> list[tuple[int, int]]:
    """IRN's search directions: (0, 1) .. (0, r - 1), then rows y = 1 .. r - 1 with x^2 + y^2 < r^2."""
    out = [(0, x) for x in range(1, radius)]
    out += [(y, x) for y in range(1, radius) for x in range(-radius + 1, radius) if x * x + y * y < radius**2]
    return out


def irn_path(dy: int, dx: int) -> list[tuple[int, int]]:
    """Points of the box of 0 and d within (Euclidean) distance < 1 of the line through them."""
    length = math.hypot(dy, dx)
    return [(y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
            if abs(dy * x - dx * y) / length < 1 - 1e-12]


def irn_boundary(model, image: torch.Tensor, crop: int) -> np.ndarray:
    """[ceil(H/4), ceil(W/4)] float64 boundary of a [3, H, W] normalised image (H, W <= crop)."""
    height, width = image.shape[-2:]
    canvas = torch.zeros(2, 3, crop, crop)
    canvas[0, :, :height, :width] = image
    canvas[1, :, :height, :width] = image.flip(-1)
    with torch.no_grad():
        logits = model(canvas)["boundary_logits"].double()
    fh, fw = (height - 1) // 4 + 1, (width - 1) // 4 + 1
    logits = logits[:, :fh, :fw]
    return torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2).numpy()


def affinity_matrix(edge: np.ndarray, radius: int) -> np.ndarray:
    """Dense [N, N] affinities of the grid's pixels (row-major), 1 on the diagonal."""
    h, w = edge.shape
    a = np.eye(h * w)
    for dy, dx in irn_offsets(radius):
        path = irn_path(dy, dx)
        for y in range(h):
            for x in range(w):
                ty, tx = y + dy, x + dx
                if not (0 <= ty < h and 0 <= tx < w):
                    continue
                value = 1.0 - max(edge[y + py, x + px] for py, px in path)
                a[y * w + x, ty * w + tx] = a[ty * w + tx, y * w + x] = value
    return a


def walk(cams: np.ndarray, edge: np.ndarray, radius: int = 5, beta: float = 10, exp_times: int = 8) -> np.ndarray:
    """IRN's propagate_to_edge: [n, h, w] walked maps."""
    n, h, w = cams.shape
    t = affinity_matrix(edge, radius) ** beta
    t = t / t.sum(axis=0, keepdims=True)
    for _ in range(exp_times):
        t = t @ t
    x = (cams * (1 - edge)).reshape(n, h * w)
    return (x @ t).reshape(n, h, w)


def upsample4(maps: np.ndarray) -> np.ndarray:
    """Bilinear x4 with half-pixel centres (source coordinate (i + 0.5) / 4 - 0.5, clamped at 0)."""
    n, h, w = maps.shape

    def taps(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(4 * size) + 0.5) / 4 - 0.5, 0.0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, size - 1)
        return lo, hi, src - lo

    y0, y1, fy = taps(h)
    x0, x1, fx = taps(w)
    rows = maps[:, y0] * (1 - fy)[None, :, None] + maps[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def sem_seg_label(cams: np.ndarray, edge: np.ndarray, keys: np.ndarray, size: tuple[int, int],
                  cam_power: float = 1.0, bg_threshold: float = 0.25, radius: int = 5, beta: float = 10,
                  exp_times: int = 8) -> np.ndarray:
    """IRN's (and, with cam_power 1.5, AMR's) make_sem_seg_labels for one image: HxW uint8 mask."""
    height, width = size
    rw = walk(np.power(cams.astype(np.float64), cam_power), edge, radius, beta, exp_times)
    up = upsample4(rw)[:, :height, :width]
    up = up / up.max()
    scores = np.concatenate([np.full((1, height, width), bg_threshold), up])
    ids = np.concatenate([[0], np.asarray(keys) + 1])
    return ids[np.argmax(scores, axis=0)].astype(np.uint8)
