"""Random walk: against a dense numpy reference, hand-made propagation cases, invariants."""
import numpy as np
import pytest
import torch

from amrseg.refine import random_walk as rw_module
from amrseg.models.affinity import search_offsets
from amrseg.refine.random_walk import (
    affinity_coo,
    random_walk,
    random_walk_sparse,
    dense_affinity,
    rw_label,
    transition_matrix,
    walk,
    walk_scores,
)


def _random_affinity(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.2, 1.0, size=(n, n))
    a = (a + a.T) / 2
    np.fill_diagonal(a, 1.0)
    return a


def test_transition_rows_sum_to_one():
    a = torch.from_numpy(_random_affinity(12, 0)).float()
    t = transition_matrix(a, beta=3.0)
    torch.testing.assert_close(t.sum(dim=1), torch.ones(12))
    scaled = a**3
    torch.testing.assert_close(t[4], scaled[4] / scaled[4].sum())


@pytest.mark.parametrize("squaring", [True, False, None])
@pytest.mark.parametrize("exp_times", [0, 3])
def test_random_walk_against_numpy_reference(squaring, exp_times):
    h, w, c, beta = 6, 6, 3, 3.0
    a = _random_affinity(h * w, 1)
    cams = np.random.default_rng(2).uniform(0, 1, size=(c, h, w))
    # IRN's own formulation: column-normalised matrix, cam_vec @ M ** (2 ** exp_times).
    scaled = a**beta
    m = scaled / scaled.sum(axis=0, keepdims=True)
    expected = cams.reshape(c, -1) @ np.linalg.matrix_power(m, 2**exp_times)
    cams_t, a_t = torch.from_numpy(cams).float(), torch.from_numpy(a).float()
    out = random_walk(cams_t, a_t, beta, exp_times, squaring)
    assert out.shape == (c, h, w)
    np.testing.assert_allclose(out.numpy().reshape(c, -1), expected, rtol=1e-4, atol=1e-6)


def test_random_walk_keeps_constant_maps():
    a = torch.from_numpy(_random_affinity(20, 3)).float()
    out = random_walk(torch.full((1, 4, 5), 0.25), a, beta=10, exp_times=8)
    torch.testing.assert_close(out, torch.full((1, 4, 5), 0.25))


def test_dense_affinity_against_brute_force():
    h, w, radius = 4, 5, 3
    offsets = search_offsets(radius)
    aff = torch.rand(len(offsets), h, w, generator=torch.Generator().manual_seed(4))
    dense = dense_affinity(aff, offsets)
    expected = torch.zeros(h * w, h * w)
    for k, (dy, dx) in enumerate(offsets):
        for y in range(h):
            for x in range(w):
                ty, tx = y + dy, x + dx
                if 0 <= ty < h and 0 <= tx < w:
                    expected[y * w + x, ty * w + tx] = aff[k, y, x]
                    expected[ty * w + tx, y * w + x] = aff[k, y, x]
    expected += torch.eye(h * w)
    torch.testing.assert_close(dense, expected)


def test_walk_and_scores_by_hand():
    # 1 x 3 grid, radius 2: only horizontal neighbours are in reach,
    # so A = [[1,1,0],[1,1,1],[0,1,1]]
    # and one step (exp_times 0) with beta 1 averages: T x = [x0+x1, x0+x1+x2, x1+x2] / [2, 3, 2].
    cams = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 0.5]]])
    walked = walk(cams, torch.zeros(1, 3), radius=2, beta=1.0, exp_times=0)
    torch.testing.assert_close(walked, torch.tensor([[[1 / 2, 1 / 3, 0.0]], [[0.0, 1 / 6, 1 / 4]]]))
    # Stride 1 (no upsampling): the common max is 1/2.
    out = walk_scores(walked, (1, 3), stride=1, bg_threshold=0.3, norm="global")
    expected = torch.tensor([[[0.3, 0.3, 0.3]], [[1.0, 2 / 3, 0.0]], [[0.0, 1 / 3, 0.5]]])
    torch.testing.assert_close(out, expected)
    out = walk_scores(walked, (1, 3), stride=1, bg_threshold=0.3, norm="per_class")
    expected[2] = torch.tensor([[0.0, 2 / 3, 1.0]])
    torch.testing.assert_close(out, expected)


def test_walk_scores_normalise_after_the_upsampling_and_the_cut():
    # Grid 1 x 2 at stride 4, image 1 x 5. Bilinear x4 with half-pixel centres: output pixel j
    # samples grid position (j + 0.5) / 4 - 0.5, clamped to [0, 1]: j = 0..4 -> -0.375 (0), -0.125
    # (0), 0.125, 0.375, 0.625. Class a = [0, 8]: [0, 0, 1, 3, 5] on the image; b = [6, 6]: 6.
    walked = torch.tensor([[[0.0, 8.0]], [[6.0, 6.0]]])
    out = walk_scores(walked, (1, 5), stride=4, bg_threshold=0.25, norm="global")
    # IRN divides by the max *on the image* (6), not on the grid (8).
    expected = torch.tensor([[[0.25] * 5], [[0, 0, 1 / 6, 3 / 6, 5 / 6]], [[1.0] * 5]])
    torch.testing.assert_close(out, expected)
    out = walk_scores(walked, (1, 5), stride=4, bg_threshold=0.25, norm="per_class")
    expected[1] = torch.tensor([[0, 0, 1 / 5, 3 / 5, 1.0]])
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError):
        walk_scores(walked, (1, 9), stride=4)  # larger than the grid covers
    with pytest.raises(ValueError):
        walk_scores(walked, (1, 5), norm="max")


def test_walk_wall_keeps_activation_on_its_side():
    h, w = 6, 9
    cams = torch.zeros(1, h, w)
    cams[0, 2, 1] = 1.0
    boundary = torch.zeros(h, w)
    boundary[:, 4] = 1.0  # a full-height wall at column 4
    before = (cams.clone(), boundary.clone())
    walked = walk(cams, boundary, radius=3, beta=10, exp_times=4)
    assert torch.equal(cams, before[0]) and torch.equal(boundary, before[1])  # inputs untouched
    out = walk_scores(walked, (h, w), stride=1)
    assert out.shape == (2, h, w)
    assert torch.all(out[0] == 0.25)
    assert torch.all(out[1][:, 4:] == 0)  # nothing crosses (or sits on) the wall
    assert torch.all(out[1][:, :4] > 0.25)  # the left side is filled
    assert out[1].max().item() == pytest.approx(1.0)
    mask = rw_label(out, np.array([6]))
    expected = np.zeros((h, w), np.uint8)
    expected[:, :4] = 7
    np.testing.assert_array_equal(mask, expected)
    # Without the wall the activation does reach the right side.
    open_walk = walk(cams, torch.zeros(h, w), radius=3, beta=10, exp_times=4)
    assert torch.all(open_walk[0][:, 5:] > 0)


def _diagonal(n):
    """A one-pixel boundary on the anti-diagonal y + x = n - 1, and the near (y + x < n - 1) and far sides."""
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    boundary = (yy + xx == n - 1).float()
    return boundary, yy + xx < n - 1, yy + xx > n - 1


def test_a_one_pixel_diagonal_boundary_stops_the_walk():
    # The near side holds the class; IRN's path (two pixels wide) blocks every pair across the
    # diagonal, so no mass reaches the far side and the far side stays background. The thin line
    # amrseg drew before let 50% of the walked mass cross.
    n = 16
    boundary, near, far = _diagonal(n)
    cams = near.float()[None]
    walked = walk(cams, boundary, radius=5, beta=10, exp_times=8)
    crossed = walked[0][far].sum() / walked[0].sum()
    assert crossed.item() == 0.0
    mask = rw_label(walk_scores(walked, (n, n), stride=1), np.array([0]))
    assert (mask[near.numpy()] == 1).all() and (mask[far.numpy()] == 0).all()
    # Control: without the boundary the class does cross.
    open_walk = walk(cams, torch.zeros(n, n), radius=5, beta=10, exp_times=8)
    assert (open_walk[0][far].sum() / open_walk[0].sum()).item() > 0.3


def test_walk_applies_cam_power():
    gen = torch.Generator().manual_seed(5)
    cams = torch.rand(2, 4, 5, generator=gen)
    boundary = torch.rand(4, 5, generator=gen) * 0.5
    kw = dict(radius=2, beta=4.0, exp_times=2)
    powered = walk(cams, boundary, cam_power=1.5, **kw)
    torch.testing.assert_close(powered, walk(cams**1.5, boundary, cam_power=1.0, **kw))
    assert not torch.allclose(powered, walk(cams, boundary, cam_power=1.0, **kw))


def test_walk_no_classes():
    walked = walk(torch.zeros(0, 3, 4), torch.zeros(3, 4))
    assert walked.shape == (0, 3, 4)
    out = walk_scores(walked, (10, 13), stride=4, bg_threshold=0.2)
    torch.testing.assert_close(out, torch.full((1, 10, 13), 0.2))
    assert rw_label(out, np.zeros(0, np.int64)).tolist() == [[0] * 13] * 10
    with pytest.raises(ValueError):
        walk(torch.zeros(1, 3, 4), torch.zeros(3, 5))


def test_cpu_walk_runs_on_one_thread_and_restores_the_count(monkeypatch):
    seen = []
    real_step = rw_module.walk_step

    def spy(trans, x):
        seen.append(torch.get_num_threads())
        return real_step(trans, x)

    monkeypatch.setattr(rw_module, "walk_step", spy)
    torch.set_num_threads(2)
    offsets = search_offsets(2)
    aff = torch.rand(len(offsets), 3, 4, generator=torch.Generator().manual_seed(0))
    random_walk_sparse(torch.rand(2, 3, 4), affinity_coo(aff, offsets), beta=2.0, exp_times=2)
    assert seen == [1] * 4
    assert torch.get_num_threads() == 2
    # Restored on an error too.
    with pytest.raises(RuntimeError):
        with rw_module.one_cpu_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_rw_label_maps_argmax_to_class_ids():
    maps = np.array([[[0.3, 0.3, 0.3]], [[0.9, 0.1, 0.3]], [[0.2, 0.8, 0.1]]])
    np.testing.assert_array_equal(rw_label(maps, np.array([2, 14])), [[3, 15, 0]])
    with pytest.raises(ValueError):
        rw_label(maps, np.array([2]))
