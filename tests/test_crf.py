"""IR labels: the threshold/combination logic by hand, and the dense CRF on a synthetic image."""
import sys

import numpy as np
import pytest

from amrseg.errors import AmrsegError
from amrseg.cam.methods import DEFAULT_THRESHOLDS
from amrseg.refine.crf import crf_inference_label, ir_label


def _two_region_image(size=32):
    """Left half red, right half blue; the true labels are 0 left, 1 right."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[:, : size // 2] = (200, 30, 30)
    img[:, size // 2 :] = (30, 30, 200)
    truth = np.zeros((size, size), dtype=np.int64)
    truth[:, size // 2 :] = 1
    return img, truth


WRONG = [(3, 3), (10, 5), (20, 8), (27, 2), (5, 20), (14, 25), (25, 28), (29, 22)]


def test_ir_label_logic_by_hand():
    keys = np.array([4, 11])  # class ids 5 and 12
    high_res = np.array(
        [
            [[0.9, 0.3, 0.1, 0.0], [0.5, 0.6, 0.2, 0.4]],
            [[0.1, 0.4, 0.15, 0.7], [0.5, 0.55, 0.19, 0.3]],
        ],
        dtype=np.float32,
    )
    img = np.zeros((2, 4, 3), dtype=np.uint8)
    out = ir_label(img, high_res, keys, fg_threshold=0.5, bg_threshold=0.2, crf=False)
    # fg map (t=0.5):  [[5, 0, 0, 12], [0 (tie -> bg), 5, 0, 0]]
    # bg map (t=0.2):  [[5, 12, 0, 12], [5 (tie -> first class), 5, 0 (tie -> bg), 5]]
    expected = np.array([[5, 255, 0, 12], [255, 5, 0, 255]], dtype=np.uint8)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_ir_label_no_classes_is_all_background():
    img = np.zeros((3, 5, 3), dtype=np.uint8)
    for crf in (False, True):
        cams, keys = np.zeros((0, 3, 5), np.float32), np.zeros(0, np.int64)
        out = ir_label(img, cams, keys, 0.3, 0.05, crf=crf)
        np.testing.assert_array_equal(out, np.zeros((3, 5), np.uint8))


def test_ir_label_rejects_mismatched_shapes():
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(AmrsegError):
        ir_label(img, np.zeros((2, 4, 4), np.float32), np.array([1]), 0.3, 0.05, crf=False)
    with pytest.raises(AmrsegError):
        ir_label(img, np.zeros((1, 4, 5), np.float32), np.array([1]), 0.3, 0.05, crf=False)


def test_default_thresholds_are_fg_above_bg():
    from amrseg.cam.methods import CAM_METHODS

    # one entry per registered CAM method (a new method needs no edit here)
    assert set(DEFAULT_THRESHOLDS) == set(CAM_METHODS) >= {"cam", "gradcam", "advcam"}
    assert DEFAULT_THRESHOLDS["advcam"] == (0.60, 0.33)
    assert all(fg > bg for fg, bg in DEFAULT_THRESHOLDS.values())


def test_crf_cleans_wrong_pixels():
    pytest.importorskip("pydensecrf.densecrf")
    img, truth = _two_region_image()
    noisy = truth.copy()
    for y, x in WRONG:
        noisy[y, x] = 1 - noisy[y, x]
    out = crf_inference_label(img, noisy, n_labels=2)
    assert out.shape == truth.shape
    np.testing.assert_array_equal(out, truth)


def test_crf_keeps_shape_and_label_range():
    pytest.importorskip("pydensecrf.densecrf")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(12, 17, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=(12, 17))
    out = crf_inference_label(img, labels, n_labels=4, t=3)
    assert out.shape == (12, 17)
    assert out.min() >= 0 and out.max() < 4


def test_ir_label_with_crf_cleans_cam_noise():
    pytest.importorskip("pydensecrf.densecrf")
    img, truth = _two_region_image()
    cam = np.where(truth == 0, 0.9, 0.0).astype(np.float32)  # class on the left half
    for y, x in WRONG:
        cam[y, x] = 0.9 - cam[y, x]
    keys = np.array([6])
    without = ir_label(img, cam[None], keys, 0.3, 0.05, crf=False)
    with_crf = ir_label(img, cam[None], keys, 0.3, 0.05, crf=True)
    expected = np.where(truth == 0, 7, 0).astype(np.uint8)
    assert (without != expected).sum() == len(WRONG)
    np.testing.assert_array_equal(with_crf, expected)


def test_missing_pydensecrf_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    img, truth = _two_region_image(8)
    with pytest.raises(AmrsegError, match=r"amrseg\[crf\]"):
        crf_inference_label(img, truth, n_labels=2)
