"""IRN inter-pixel affinities (Ahn et al., CVPR 2019): pairs and boundary -> affinity (losses: models.losses).

Geometry shared by every function here. The offsets ``d = (dy, dx)`` are the displacements with
``0 < dy^2 + dx^2 < radius^2``, one of each +/- pair (``dy > 0`` or ``dy == 0 and dx > 0``),
in the order of :func:`search_offsets`. A map of size HxW is cropped to the "from" pixels
``p = (y, x)`` with ``y in [0, H - max_dy)`` and ``x in [max_dx_neg, W - max_dx_pos)`` (``max_dy``
the largest dy, ``max_dx_neg`` / ``max_dx_pos`` the largest -dx / dx), so that ``p + d`` lies
inside the map for every offset. For an integer radius r >= 2 all three margins are r - 1: the
crop of IRN's ``PathIndex``. Per-pair tensors are laid out [B, D, h, w] with
``h = H - max_dy`` and ``w = W - max_dx_neg - max_dx_pos``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.voc import IGNORE
from ..errors import AmrsegError


def search_offsets(radius: int) -> list[tuple[int, int]]:
    """IRN's affinity displacements within ``radius``, one of each +/- pair.

    Order (IRN's): first ``(0, 1) .. (0, radius - 1)``, then rows ``dy = 1, 2, ...`` with ``dx``
    ascending; i.e. the offsets sorted by ``(dy, dx)``.

    Args:
        radius: Open radius of the neighbourhood, >= 2.

    Returns:
        The offsets ``(dy, dx)``.

    Raises:
        AmrsegError: If ``radius < 2`` (no neighbour would be in reach).
    """
    if int(radius) != radius or radius < 2:
        raise AmrsegError(f"affinity radius must be an integer >= 2, got {radius}")
    r = int(radius)
    return [
        (dy, dx)
        for dy in range(0, r)
        for dx in range(-r + 1, r)
        if 0 < dy * dy + dx * dx < r * r and (dy > 0 or dx > 0)
    ]


@dataclass(frozen=True)
class Crop:
    """Margins of the "from" pixel crop (see the module docstring)."""

    max_dy: int
    max_dx_neg: int
    max_dx_pos: int

    def size(self, height: int, width: int) -> tuple[int, int]:
        """Cropped (h, w) of an HxW map."""
        return height - self.max_dy, width - self.max_dx_neg - self.max_dx_pos


def crop_of(offsets: list[tuple[int, int]]) -> Crop:
    """The crop margins that keep ``p + d`` inside the map for every offset."""
    return Crop(
        max_dy=max(dy for dy, _ in offsets),
        max_dx_neg=max(0, max(-dx for _, dx in offsets)),
        max_dx_pos=max(0, max(dx for _, dx in offsets)),
    )


def _shifted(x: torch.Tensor, crop: Crop, dy: int, dx: int) -> torch.Tensor:
    """The values of ``x`` [..., H, W] at ``p + (dy, dx)`` for every cropped "from" pixel p."""
    h, w = crop.size(x.shape[-2], x.shape[-1])
    if h <= 0 or w <= 0:
        raise AmrsegError(f"map of size {tuple(x.shape[-2:])} is too small for the affinity radius")
    x0 = crop.max_dx_neg + dx
    return x[..., dy : dy + h, x0 : x0 + w]


def extract_pairs(label: torch.Tensor, radius: int) -> dict[str, torch.Tensor]:
    """IRN's affinity training labels: which pixel pairs are same-class or different.

    Args:
        label: [B, H, W] integer map: 0 background, 1..K classes, 255 ignore (an IR label).
        radius: Affinity radius (see :func:`search_offsets`).

    Returns:
        Boolean masks [B, D, h, w] over (cropped "from" pixel, offset) pairs: ``pos_bg`` (both
        background), ``pos_fg`` (both the same class > 0), ``neg`` (both known, different).
        Pairs touching 255 are in none of them.
    """
    if label.dim() != 3:
        raise ValueError(f"affinity labels must be [B, H, W], got {tuple(label.shape)}")
    offsets = search_offsets(radius)
    crop = crop_of(offsets)
    src = _shifted(label, crop, 0, 0).unsqueeze(1)  # [B, 1, h, w]
    dst = torch.stack([_shifted(label, crop, dy, dx) for dy, dx in offsets], dim=1)
    valid = (src != IGNORE) & (dst != IGNORE)
    same = src == dst
    return {
        "pos_bg": valid & same & (src == 0),
        "pos_fg": valid & same & (src != 0),
        "neg": valid & ~same,
    }


def pair_values(x: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-pixel map read at both ends of every affinity pair.

    Args:
        x: [B, C, H, W] map (e.g. a displacement field).
        radius: Affinity radius (see :func:`search_offsets`).

    Returns:
        ``(src, dst)``: ``src`` [B, C, 1, h, w] the values at the cropped "from" pixels p,
        ``dst`` [B, C, D, h, w] those at ``p + d`` for each offset d; the layout of
        :func:`extract_pairs` with a channel axis in front of the offset axis.
    """
    if x.dim() != 4:
        raise ValueError(f"pair values need a [B, C, H, W] map, got {tuple(x.shape)}")
    offsets = search_offsets(radius)
    crop = crop_of(offsets)
    src = _shifted(x, crop, 0, 0).unsqueeze(2)
    dst = torch.stack([_shifted(x, crop, dy, dx) for dy, dx in offsets], dim=2)
    return src, dst


def path_points(dy: int, dx: int) -> list[tuple[int, int]]:
    """IRN's path between pixel p and p + d: the lattice points the boundary is read on.

    Every point c of the bounding box of the segment from (0, 0) to d = (dy, dx) whose distance to
    the line through them is below 1: ``(dy * c_x - dx * c_y)^2 < dy^2 + dx^2`` (IRN's
    misc/indexing.py). A band about two pixels wide, so a boundary one pixel wide, in any direction,
    always meets it (NOTES.md, "Affinity path": against the thin line amrseg drew before).
    Endpoints included; the path of ``-d`` is the mirror of that of ``d``. Points in row-major order.

    Args:
        dy, dx: The offset, not both 0.

    Returns:
        The points (y, x) relative to p.
    """
    norm2 = dy * dy + dx * dx
    if norm2 == 0:
        return [(0, 0)]
    return [
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 < norm2
    ]


def path_runs(dy: int, dx: int) -> list[tuple[int, int, int, bool]]:
    """:func:`path_points` as runs of adjacent points: ``(y, x, length, horizontal)``.

    A run starts at (y, x) and covers ``length`` points to the right (horizontal) or downwards.
    Each row of the band, and each column, is one run (the band is convex); the direction with
    fewer runs is chosen.
    """
    points = path_points(dy, dx)
    rows: dict[int, list[int]] = {}
    cols: dict[int, list[int]] = {}
    for y, x in points:
        rows.setdefault(y, []).append(x)
        cols.setdefault(x, []).append(y)
    if len(rows) <= len(cols):
        return [(y, min(xs), len(xs), True) for y, xs in sorted(rows.items())]
    return [(min(ys), x, len(ys), False) for x, ys in sorted(cols.items())]


def boundary_to_affinity(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """IRN's affinity from a class-boundary map.

    ``aff(p, p + d) = 1 - max(boundary)`` over IRN's path from p to p + d (:func:`path_points`,
    endpoints included): two pixels are related unless a boundary lies between them. The same
    path serves training (the affinity loss) and the random walk. Differentiable in ``boundary``
    (the boundary branch trains through it).

    Args:
        boundary: [B, H, W] boundary probabilities in [0, 1].
        radius: Affinity radius (see :func:`search_offsets`).

    Returns:
        [B, D, h, w] affinities over the cropped "from" pixels (module docstring).
    """
    if boundary.dim() != 3:
        raise ValueError(f"boundary map must be [B, H, W], got {tuple(boundary.shape)}")
    offsets = search_offsets(radius)
    crop = crop_of(offsets)
    height, width = boundary.shape[-2:]
    h, w = crop.size(height, width)
    if h <= 0 or w <= 0:
        raise AmrsegError(f"map of size {(height, width)} is too small for the affinity radius")
    # Each row (and each column) of a path is one run of adjacent points. The max over a run of k
    # points is read from a running max over k pixels, computed once per k and direction, so an
    # offset costs one read per run, not one per point (a path holds a few runs of several points:
    # NOTES.md, "Affinity path").
    runs: dict[tuple[int, bool], torch.Tensor] = {(1, True): boundary, (1, False): boundary}

    def running_max(k: int, horizontal: bool) -> torch.Tensor:
        if (k, horizontal) not in runs:
            prev = running_max(k - 1, horizontal)
            if horizontal:
                runs[k, True] = torch.maximum(prev[..., :, :-1], boundary[..., :, k - 1:])
            else:
                runs[k, False] = torch.maximum(prev[..., :-1, :], boundary[..., k - 1:, :])
        return runs[k, horizontal]

    affs = []
    for dy, dx in offsets:
        peak = None
        for y, x, k, horizontal in path_runs(dy, dx):
            y0, x0 = y, crop.max_dx_neg + x
            part = running_max(k, horizontal)[..., y0 : y0 + h, x0 : x0 + w]
            peak = part if peak is None else torch.maximum(peak, part)
        affs.append(1.0 - peak)
    return torch.stack(affs, dim=1)
