"""eval-cam on a tiny dataset whose answers are worked out by hand."""
import json

import numpy as np
import pytest
from PIL import Image

from amrseg.cam.io import save_cam
from amrseg.data.voc import SegData, write_palette_png
from amrseg.errors import AmrsegError
from amrseg.eval.eval_cam import evaluate_cams, parse_range

CLASSES = ["background", "cat", "dog", "bird"]  # bird never occurs

# 4x4 masks. A: 8 background, 4 cat, 4 dog. B: 12 background, 4 cat (top-left), 1 ignore pixel.
MASK_A = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 2, 2]], dtype=np.uint8)
MASK_B = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 255]], dtype=np.uint8)
# CAM of B: 0.9 on the cat, 0.4 on four background pixels, 0.1 elsewhere (and 0.4 on the ignored one).
CAM_B = np.array([[0.9, 0.9, 0.4, 0.4], [0.9, 0.9, 0.4, 0.4], [0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.4]])


def make_data(root, masks: dict, no_mask=()):
    """A SegData over 4x4 images; `masks` maps id -> mask, ids in `no_mask` have none."""
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    ids = list(masks) + list(no_mask)
    image_paths, mask_paths = [], []
    for i in ids:
        image_paths.append(root / "img" / f"{i}.png")
        Image.fromarray(np.full((4, 4, 3), 100, np.uint8)).save(image_paths[-1])
        if i in masks:
            mask_paths.append(root / "mask" / f"{i}.png")
            write_palette_png(mask_paths[-1], masks[i])
        else:
            mask_paths.append(None)
    return SegData(root, "train", ids, list(CLASSES), None, mask_paths, image_paths)


def perfect_cam(mask):
    keys = np.array(sorted(set(np.unique(mask).tolist()) - {0, 255}), dtype=np.int64) - 1
    return keys, np.stack([(mask == k + 1).astype(np.float32) for k in keys])


def test_cam_equal_to_gt_scores_one_below_threshold_one(tmp_path):
    data = make_data(tmp_path / "d", {"a": MASK_A})
    cams = tmp_path / "cams"
    cams.mkdir()
    save_cam(cams / "a.npz", *perfect_cam(MASK_A))
    res = evaluate_cams(cams, data, [1.0, 0.5, 0.0])
    # At t = 1 everything is background: bg IoU 8/16, cat 0, dog 0; bird absent.
    assert res["sweep"] == [[0.0, 1.0], [0.5, 1.0], [1.0, pytest.approx(0.5 / 3)]]
    assert res["miou"] == 1.0 and res["threshold"] == 0.0  # first best row on ties
    assert res["iou"] == {"background": 1.0, "cat": 1.0, "dog": 1.0, "bird": None}
    assert res["num_images"] == 1
    json.dumps(res)  # plain JSON types only


def test_best_row_is_picked_from_the_sweep(tmp_path):
    data = make_data(tmp_path / "d", {"b": MASK_B})
    cams = tmp_path / "cams"
    cams.mkdir()
    save_cam(cams / "b.npz", np.array([0]), CAM_B[None])
    res = evaluate_cams(cams, data, [0.05, 0.3, 0.5, 0.95])
    # 0.05: all cat -> bg 0/15, cat 4/15; 0.3: bg 7/11, cat 4/8 (the ignored pixel not counted);
    # 0.5: exact; 0.95: all bg -> bg 11/15, cat 0.
    expected = [(0 + 4 / 15) / 2, (7 / 11 + 4 / 8) / 2, 1.0, (11 / 15) / 2]
    assert [t for t, _ in res["sweep"]] == [0.05, 0.3, 0.5, 0.95]
    assert [m for _, m in res["sweep"]] == pytest.approx(expected)
    assert res["threshold"] == 0.5 and res["miou"] == pytest.approx(1.0)
    assert res["iou"]["dog"] is None and res["iou"]["bird"] is None


def test_one_confusion_matrix_over_the_split(tmp_path):
    """Pixels of all images are pooled (not a mean of per-image mIoUs); unmasked images skipped."""
    data = make_data(tmp_path / "d", {"a": MASK_A, "b": MASK_B}, no_mask=["c"])
    cams = tmp_path / "cams"
    cams.mkdir()
    save_cam(cams / "a.npz", *perfect_cam(MASK_A))
    save_cam(cams / "b.npz", np.array([0]), CAM_B[None])  # no c.npz: c has no mask, so not needed
    res = evaluate_cams(cams, data, [0.3], progress=True)
    # Pooled at 0.3: bg row [15 bg, 4 cat], cat 8 -> 8, dog 4 -> 4.
    iou = {"background": 15 / 19, "cat": 8 / 12, "dog": 1.0}
    assert res["num_images"] == 2
    assert res["iou"]["bird"] is None
    for name, v in iou.items():
        assert res["iou"][name] == pytest.approx(v)
    assert res["miou"] == pytest.approx(sum(iou.values()) / 3)


def test_xi_sweep_picks_the_constructed_best(tmp_path):
    # Cat on the left half. Spotlight fires on the top-left quarter, compensation on the bottom-left:
    # only an even mix covers the whole cat at thresholds 0.5 / 0.6.
    mask = np.array([[1, 1, 0, 0]] * 4, dtype=np.uint8)
    s = np.zeros((1, 4, 4), np.float32)
    s[0, :2, :2] = 1
    c = np.zeros((1, 4, 4), np.float32)
    c[0, 2:, :2] = 1
    data = make_data(tmp_path / "d", {"x": mask})
    cams = tmp_path / "cams"
    cams.mkdir()
    save_cam(cams / "x.npz", np.array([0]), (s + c) / 2, branches={"spotlight": s, "compensation": c})
    res = evaluate_cams(cams, data, [0.5, 0.6], xi_values=[1.0, 0.75, 0.5, 0.25, 0.0])
    half = (8 / 12 + 4 / 8) / 2  # one quarter found: bg 8/12, cat 4/8
    assert res["xi"] == 0.5 and res["threshold"] == 0.5 and res["miou"] == pytest.approx(1.0)
    assert [row[0] for row in res["xi_sweep"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [row[2] for row in res["xi_sweep"]] == pytest.approx([half, half, 1.0, half, half])
    assert res["sweep"] == [[0.5, pytest.approx(1.0)], [0.6, pytest.approx(1.0)]]
    assert res["iou"]["cat"] == pytest.approx(1.0)


def test_xi_sweep_needs_branch_maps(tmp_path):
    data = make_data(tmp_path / "d", {"a": MASK_A})
    cams = tmp_path / "cams"
    cams.mkdir()
    save_cam(cams / "a.npz", *perfect_cam(MASK_A))
    with pytest.raises(AmrsegError, match=r"a\.npz: .*--save-branches"):
        evaluate_cams(cams, data, [0.5], xi_values=[0.5])


def test_missing_cams_are_named_and_counted(tmp_path):
    data = make_data(tmp_path / "d", {"a": MASK_A, "b": MASK_B, "e": MASK_A}, no_mask=["c"])
    cams = tmp_path / "cams"
    cams.mkdir()
    save_cam(cams / "b.npz", np.array([0]), CAM_B[None])
    with pytest.raises(AmrsegError) as info:
        evaluate_cams(cams, data, [0.5])
    msg = str(info.value)
    assert msg.startswith(str(cams / "a.npz")) and "2 of the 4 images" in msg and "\n" not in msg


def test_size_mismatch_and_split_without_masks(tmp_path):
    data = make_data(tmp_path / "d", {"a": MASK_A})
    cams = tmp_path / "cams"
    cams.mkdir()
    save_cam(cams / "a.npz", np.array([0]), np.zeros((1, 4, 5)))
    with pytest.raises(AmrsegError, match=r"a\.npz: CAM size 4x5 differs"):
        evaluate_cams(cams, data, [0.5])
    empty = make_data(tmp_path / "e", {}, no_mask=["z"])
    with pytest.raises(AmrsegError, match="no ground-truth masks"):
        evaluate_cams(cams, empty, [0.5])


def test_parse_range():
    assert parse_range("0.05:0.6:0.05", "--sweep") == pytest.approx([0.05 * i for i in range(1, 13)])
    assert parse_range("0:1:0.1", "--sweep")[3] == 0.3  # rounded: no 0.30000000000000004
    assert parse_range("0.2:0.2:0.1", "--sweep") == [0.2]
    assert parse_range("0.1:0.35:0.1", "--sweep") == [0.1, 0.2, 0.3]
    for bad in ["0.1:0.5", "a:b:c", "0.5:0.1:0.1", "0:1:0", "0:1:-0.1", "0:nan:0.1", "0:1:1e-9"]:
        with pytest.raises(AmrsegError, match="^--sweep: "):
            parse_range(bad, "--sweep")


class StandIn:
    """Duck-typed dataset without SegData's own mask checks."""

    def __init__(self, masks):
        self.root, self.split, self.ids = "standin", "train", list(masks)
        self.class_names, self.num_classes, self._masks = ["background", "cat"], 1, list(masks.values())

    def __len__(self):
        return len(self.ids)

    def load_mask(self, i):
        return self._masks[i]


def test_bad_mask_labels_and_keys_are_user_errors(tmp_path):
    save_cam(tmp_path / "m.npz", np.array([0]), np.zeros((1, 2, 2)))
    with pytest.raises(AmrsegError, match=r"^standin: mask of image 'm' has labels \[7\]"):
        evaluate_cams(tmp_path, StandIn({"m": np.array([[0, 7], [1, 255]], np.uint8)}), [0.5])
    save_cam(tmp_path / "k.npz", np.array([1]), np.zeros((1, 2, 2)))
    with pytest.raises(AmrsegError, match=r"k\.npz: class key 1 beyond the 1 classes"):
        evaluate_cams(tmp_path, StandIn({"k": np.zeros((2, 2), np.uint8)}), [0.5])


def test_bad_threshold_and_xi_lists(tmp_path):
    data = make_data(tmp_path / "d", {"a": MASK_A})
    with pytest.raises(AmrsegError, match="--threshold"):
        evaluate_cams(tmp_path, data, [])
    with pytest.raises(AmrsegError, match="--xi-sweep"):
        evaluate_cams(tmp_path, data, [0.5], xi_values=[0.5, 1.5])
