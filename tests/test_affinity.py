"""IRN affinity pairs, loss and boundary -> affinity, each against a slow reference."""
import math

import pytest
import torch

from amrseg.errors import AmrsegError
from amrseg.models.losses import affinity_loss
from amrseg.models.affinity import (
    boundary_to_affinity,
    extract_pairs,
    path_points,
    path_runs,
    search_offsets,
)


@pytest.mark.parametrize("radius", [5, 10])
def test_search_offsets_against_enumeration(radius):
    every = {
        (dy, dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if 0 < dy * dy + dx * dx < radius * radius
    }
    offsets = search_offsets(radius)
    assert len(offsets) == len(every) // 2
    assert len(set(offsets)) == len(offsets)
    assert set(offsets) | {(-dy, -dx) for dy, dx in offsets} == every
    assert offsets == sorted(offsets)  # the documented order: by (dy, dx)
    assert offsets[0] == (0, 1)


def test_search_offsets_known_count_and_bad_radius():
    assert len(search_offsets(5)) == 34  # (69 points with d^2 < 25, minus the origin) / 2
    assert search_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    with pytest.raises(AmrsegError):
        search_offsets(1)


def _crop(radius):
    # For an integer radius every margin is radius - 1 (IRN's radius_floor).
    return radius - 1, radius - 1, radius - 1


def test_extract_pairs_against_brute_force():
    gen = torch.Generator().manual_seed(1)
    radius = 3
    label = torch.randint(0, 3, (2, 9, 11), generator=gen)
    label[torch.rand(label.shape, generator=gen) < 0.2] = 255
    pairs = extract_pairs(label, radius)
    offsets = search_offsets(radius)
    max_dy, neg, pos = _crop(radius)
    h, w = 9 - max_dy, 11 - neg - pos
    for name in ("pos_bg", "pos_fg", "neg"):
        assert pairs[name].shape == (2, len(offsets), h, w)
        assert pairs[name].dtype == torch.bool
    for b in range(2):
        for k, (dy, dx) in enumerate(offsets):
            for y in range(h):
                for x in range(w):
                    a = int(label[b, y, x + neg])
                    c = int(label[b, y + dy, x + neg + dx])
                    valid = a != 255 and c != 255
                    assert bool(pairs["pos_bg"][b, k, y, x]) == (valid and a == c == 0)
                    assert bool(pairs["pos_fg"][b, k, y, x]) == (valid and a == c and a > 0)
                    assert bool(pairs["neg"][b, k, y, x]) == (valid and a != c)
    assert pairs["neg"].any() and pairs["pos_fg"].any() and pairs["pos_bg"].any()


def test_affinity_loss_hand_values():
    aff = torch.tensor([[[[0.5, 0.9]], [[0.2, 0.7]]]])  # [1, 2, 1, 2]
    f, t = False, True
    pairs = {
        "pos_bg": torch.tensor([[[[t, f]], [[f, f]]]]),
        "pos_fg": torch.tensor([[[[f, t]], [[t, f]]]]),
        "neg": torch.tensor([[[[f, f]], [[f, t]]]]),
    }
    out = affinity_loss(aff, pairs)
    pos_bg = -math.log(0.5 + 1e-5)
    pos_fg = (-math.log(0.9 + 1e-5) - math.log(0.2 + 1e-5)) / 2
    neg = -math.log(1 + 1e-5 - 0.7)
    assert out["pos_bg"].item() == pytest.approx(pos_bg, rel=1e-5)
    assert out["pos_fg"].item() == pytest.approx(pos_fg, rel=1e-5)
    assert out["neg"].item() == pytest.approx(neg, rel=1e-5)
    assert out["total"].item() == pytest.approx(pos_bg / 4 + pos_fg / 4 + neg / 2, rel=1e-5)


def test_affinity_loss_empty_pairs_are_zero_not_nan():
    aff = torch.full((1, 3, 2, 2), 0.4, requires_grad=True)
    none = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    out = affinity_loss(aff, {"pos_bg": none, "pos_fg": none, "neg": none})
    for value in out.values():
        assert value.item() == 0.0
    out["total"].backward()  # still a valid graph
    only_neg = {"pos_bg": none, "pos_fg": none, "neg": ~none}
    out = affinity_loss(aff, only_neg)
    assert out["pos_bg"].item() == 0.0 and out["pos_fg"].item() == 0.0
    assert out["total"].item() == pytest.approx(-math.log(1 + 1e-5 - 0.4) / 2, rel=1e-5)


def test_path_points_by_hand():
    # Points c of the box with distance to the line through 0 and d below 1: |dy cx - dx cy| < |d|.
    assert path_points(0, 3) == [(0, 0), (0, 1), (0, 2), (0, 3)]  # distance 0 only; row 1 is outside the box
    assert path_points(1, 1) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # (0,1), (1,0) at 0.707
    # d = (2, 4), |d| = 4.47: |2 cx - 4 cy| < 4.47 keeps |cx - 2 cy| <= 2 in the 3 x 5 box.
    assert path_points(2, 4) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4),
                                 (2, 2), (2, 3), (2, 4)]
    # d = (1, -3), |d| = 3.16: |cx + 3 cy| < 3.16 in the box y 0..1, x -3..0: every point but none.
    assert path_points(1, -3) == [(0, -3), (0, -2), (0, -1), (0, 0), (1, -3), (1, -2), (1, -1), (1, 0)]
    # The path of -d mirrors that of d.
    for dy, dx in search_offsets(6):
        assert sorted(path_points(-dy, -dx)) == sorted((-y, -x) for y, x in path_points(dy, dx))


def _irn_path(dy, dx):
    """A slow reading of IRN's path definition: every lattice point of the bounding box of the
    segment [0, d] whose Euclidean distance to the line through 0 and d is below 1 (float maths)."""
    length = math.hypot(dy, dx)
    points = set()
    for y in range(min(0, dy), max(0, dy) + 1):
        for x in range(min(0, dx), max(0, dx) + 1):
            # distance from (y, x) to the line: |cross(d, c)| / |d|
            if abs(dy * x - dx * y) / length < 1 - 1e-12:
                points.add((y, x))
    return points


def test_path_points_against_the_definition_and_irn_count():
    offsets = search_offsets(10)
    for dy, dx in offsets:
        assert set(path_points(dy, dx)) == _irn_path(dy, dx), (dy, dx)
    # IRN's figure: 14.0 points per offset at radius 10 (the thin line amrseg drew before: 6.9).
    mean = sum(len(path_points(dy, dx)) for dy, dx in offsets) / len(offsets)
    assert mean == pytest.approx(14.04, abs=0.01)


def test_path_runs_cover_the_path_once():
    for dy, dx in search_offsets(10):
        covered = []
        for y, x, k, horizontal in path_runs(dy, dx):
            covered += [(y, x + i) if horizontal else (y + i, x) for i in range(k)]
        assert sorted(covered) == sorted(path_points(dy, dx)), (dy, dx)
    assert path_runs(0, 4) == [(0, 0, 5, True)]
    assert path_runs(3, 0) == [(0, 0, 4, False)]
    assert path_runs(2, 4) == [(0, 0, 3, True), (1, 0, 5, True), (2, 2, 3, True)]


@pytest.mark.parametrize("radius, size", [(4, (8, 9)), (10, (12, 22))])
def test_boundary_to_affinity_against_brute_force(radius, size):
    gen = torch.Generator().manual_seed(2)
    boundary = torch.rand(2, *size, generator=gen)
    aff = boundary_to_affinity(boundary, radius)
    offsets = search_offsets(radius)
    max_dy, neg, pos = _crop(radius)
    h, w = size[0] - max_dy, size[1] - neg - pos
    assert aff.shape == (2, len(offsets), h, w)
    for b in range(2):
        for k, (dy, dx) in enumerate(offsets):
            for y in range(h):
                for x in range(w):
                    y0, x0 = y, x + neg
                    peak = max(float(boundary[b, y0 + py, x0 + px]) for py, px in _irn_path(dy, dx))
                    assert aff[b, k, y, x].item() == pytest.approx(1 - peak, abs=1e-6)


def test_a_one_pixel_diagonal_boundary_cuts_every_crossing_pair():
    # A boundary one pixel wide along the anti-diagonal y + x = 11 of a 12 x 12 map: pixels on
    # either side touch it only at corners. IRN's path is two pixels wide, so every pair with one
    # end on each side reads the boundary; a thin line slips between its diagonal steps.
    n, radius = 12, 5
    boundary = torch.zeros(1, n, n)
    for i in range(n):
        boundary[0, i, n - 1 - i] = 1.0
    aff = boundary_to_affinity(boundary, radius)
    offsets = search_offsets(radius)
    max_dy, neg, _ = _crop(radius)
    crossing = 0
    for k, (dy, dx) in enumerate(offsets):
        for y in range(aff.shape[2]):
            for x in range(aff.shape[3]):
                a, b = y + x + neg, (y + dy) + (x + neg + dx)
                if (a - (n - 1)) * (b - (n - 1)) < 0:  # strictly on opposite sides
                    crossing += 1
                    assert aff[0, k, y, x].item() == 0.0, (dy, dx, y, x)
    assert crossing > 100


def test_boundary_to_affinity_wall_and_gradient():
    boundary = torch.zeros(1, 6, 10)
    boundary[0, :, 5] = 1.0  # a vertical wall
    boundary.requires_grad_(True)
    aff = boundary_to_affinity(boundary, 3)
    offsets = search_offsets(3)
    k = offsets.index((0, 2))
    # from-pixels start at x = 2; the pair (x, x + 2) crosses column 5 for x in 3..5
    row = aff[0, k, 0].detach()
    assert row.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    aff.sum().backward()
    assert boundary.grad is not None and boundary.grad.abs().sum() > 0


def test_extract_pairs_rejects_too_small_map():
    with pytest.raises(AmrsegError):
        extract_pairs(torch.zeros(1, 3, 3, dtype=torch.long), 5)
