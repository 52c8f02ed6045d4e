"""Confusion matrix, IoU and the one-pass threshold sweep against hand-worked and slow references."""
import math

import numpy as np
import pytest
import torch

from amrseg.eval.metrics import confusion_matrix, iou_from_confusion, sweep_confusion


def slow_confusion(pred, gt, c, ignore=255):
    conf = np.zeros((c, c), dtype=np.int64)
    for p, g in zip(np.ravel(pred), np.ravel(gt)):
        if g != ignore:
            conf[g, p] += 1
    return conf


def slow_predict(scores, keys, t):
    """Per-pixel loop: foreground iff the max score is strictly above t, then the first max."""
    n, h, w = scores.shape
    out = np.zeros((h, w), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            best, arg = t, -1
            for k in range(n):
                if scores[k, y, x] > best:
                    best, arg = scores[k, y, x], k
            out[y, x] = 0 if arg < 0 else keys[arg] + 1
    return out


def test_confusion_and_iou_by_hand():
    gt = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    conf = confusion_matrix(pred, gt, 3)
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    iou, miou = iou_from_confusion(conf)
    assert iou.dtype == torch.float64
    assert iou.tolist() == pytest.approx([1 / 2, 1 / 3, 1 / 2])
    assert miou.item() == pytest.approx(4 / 9)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    gt = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    iou, miou = iou_from_confusion(confusion_matrix(pred, gt, 4))
    assert math.isnan(iou[3].item())
    assert miou.item() == pytest.approx(4 / 9)
    # A class predicted but never in GT is not absent: it counts as 0.
    iou, miou = iou_from_confusion(confusion_matrix(torch.tensor([3, 0]), torch.tensor([0, 0]), 4))
    assert iou[0].item() == pytest.approx(0.5) and iou[3].item() == 0.0
    assert miou.item() == pytest.approx(0.25)


def test_ignore_only_gives_all_nan():
    conf = confusion_matrix(torch.tensor([1, 2]), torch.tensor([255, 255]), 3)
    assert conf.sum().item() == 0
    iou, miou = iou_from_confusion(conf)
    assert torch.isnan(iou).all() and math.isnan(miou.item())


def test_iou_is_batched():
    a = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), 2)
    b = confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 0]), 2)
    iou, miou = iou_from_confusion(torch.stack([a, b]))
    assert iou.shape == (2, 2) and miou.shape == (2,)
    assert iou[0].tolist() == pytest.approx([0.5, 0.5])
    assert iou[1, 0].item() == 1.0 and math.isnan(iou[1, 1].item())
    assert miou.tolist() == pytest.approx([0.5, 1.0])


def test_out_of_range_labels_raise():
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([7, 1]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)


@pytest.mark.parametrize("seed", range(6))
def test_confusion_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(2, 7))
    gt = rng.integers(0, c, size=(9, 11))
    gt[rng.random(gt.shape) < 0.2] = 255
    pred = rng.integers(0, c, size=(9, 11))
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), c)
    np.testing.assert_array_equal(conf.numpy(), slow_confusion(pred, gt, c))


def test_sweep_by_hand():
    # Two maps (classes 1 and 3 of C = 4) on a 1x4 image; pixel 2 ties between the maps (first
    # wins), pixel 1 ties with the threshold 0.5 (background wins there).
    scores = torch.tensor([[[0.1, 0.5, 0.5, 0.9]], [[0.3, 0.5, 0.2, 0.9]]])
    keys = torch.tensor([0, 2])
    gt = torch.tensor([[0, 1, 3, 3]])
    conf = sweep_confusion(scores, keys, gt, torch.tensor([0.2, 0.5]), 4)
    assert conf.shape == (2, 4, 4) and conf.dtype == torch.int64
    # t = 0.2: prediction [3, 1, 1, 1]
    assert conf[0].tolist() == [[0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0], [0, 2, 0, 0]]
    # t = 0.5: prediction [0, 0, 0, 1]
    assert conf[1].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]


def test_sweep_without_classes_predicts_background():
    gt = torch.tensor([[0, 1], [255, 2]])
    conf = sweep_confusion(torch.zeros(0, 2, 2), torch.zeros(0, dtype=torch.long), gt, torch.tensor([0.1, 0.9]), 3)
    expected = [[1, 0, 0], [1, 0, 0], [1, 0, 0]]
    assert conf.shape == (2, 3, 3)
    assert conf[0].tolist() == expected and conf[1].tolist() == expected


def test_sweep_rejects_unsorted_thresholds():
    with pytest.raises(ValueError, match="sorted"):
        sweep_confusion(torch.zeros(1, 2, 2), torch.tensor([0]), torch.zeros(2, 2, dtype=torch.long),
                        torch.tensor([0.5, 0.1]), 2)


@pytest.mark.parametrize("seed", range(8))
def test_sweep_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 6))  # foreground classes
    n = int(rng.integers(1, k + 1))
    keys = np.sort(rng.choice(k, size=n, replace=False)).astype(np.int64)
    h, w = 7, 9
    # Scores on a coarse grid, so that ties between maps and exactly at thresholds are common.
    scores = rng.choice(np.array([0.0, 0.25, 0.5, 0.75, 1.0], dtype=np.float32), size=(n, h, w))
    if seed % 2:
        scores = scores + rng.random((n, h, w), dtype=np.float32) * 0.01 * (rng.random((n, h, w)) < 0.3)
    gt = rng.integers(0, k + 1, size=(h, w))
    gt[rng.random(gt.shape) < 0.15] = 255
    thresholds = np.array([0.0, 0.25, 0.3, 0.5, 0.75, 1.0], dtype=np.float32)
    conf = sweep_confusion(torch.from_numpy(scores), torch.from_numpy(keys), torch.from_numpy(gt),
                           torch.from_numpy(thresholds), k + 1)
    for j, t in enumerate(thresholds):
        ref = slow_confusion(slow_predict(scores, keys, t), gt, k + 1)
        np.testing.assert_array_equal(conf[j].numpy(), ref, err_msg=f"threshold {t}")
