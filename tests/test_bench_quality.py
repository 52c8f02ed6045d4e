"""bench/quality.py's map figures: precision, recall and context share at a threshold and at a matched recall."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amrseg.cam.io import save_cam
from amrseg.data.emoji_scenes import PART_CONTEXT
from amrseg.data.voc import open_dataset, write_palette_png

QUALITY = Path(__file__).resolve().parents[1] / "bench" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", QUALITY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_at_recall_interpolates_between_the_bracketing_thresholds(quality):
    recalls, values = [0.9, 0.7, 0.5], [0.4, 0.3, 0.1]
    assert quality.at_recall(recalls, values, 0.6) == pytest.approx(0.2)  # half-way from 0.3 to 0.1
    assert quality.at_recall(recalls, values, 0.7) == pytest.approx(0.3)
    assert quality.at_recall(recalls, values, 0.95) is None  # no threshold reaches it
    assert quality.at_recall(recalls, values, 0.3) is None  # none falls below it
    assert quality.at_recall([0.6, 0.6, 0.4], [0.5, 0.2, 0.0], 0.6) == 0.5  # a plateau: its first value


def test_map_metrics_on_a_hand_counted_image(tmp_path, quality):
    """One 4 x 4 image: columns 0-1 the object, column 2 background with one ignored pixel, column 3
    context; CAM 0.9 / 0.5 on the object's columns, 0.3 on column 2, 0.6 / 0.1 on the context's
    upper / lower half."""
    root = tmp_path / "scenes"
    for d in ("JPEGImages", "SegmentationClass", "SegmentationContext", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    (root / "classes.txt").write_text("background\nthing\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("a\n")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "JPEGImages/a.jpg")
    gt = np.zeros((4, 4), np.uint8)
    gt[:, :2] = 1
    gt[0, 2] = 255
    write_palette_png(root / "SegmentationClass/a.png", gt)
    ctx = np.zeros((4, 4), np.uint8)
    ctx[:, 3] = PART_CONTEXT
    Image.fromarray(ctx).save(root / "SegmentationContext/a.png")
    cam = np.zeros((1, 4, 4), np.float32)
    cam[0, :, 0], cam[0, :, 1], cam[0, :, 2] = 0.9, 0.5, 0.3
    cam[0, :2, 3], cam[0, 2:, 3] = 0.6, 0.1
    save_cam(tmp_path / "cams" / "a.npz", np.array([0]), cam, dtype=np.float32)

    m = quality.map_metrics(tmp_path / "cams", open_dataset(root, "val"), 0.4, [0.2, 0.4, 0.7])
    # At 0.4: the 8 object pixels and the 2 upper context pixels are foreground.
    assert m["precision"] == pytest.approx(8 / 10)
    assert m["recall"] == pytest.approx(1.0)
    assert m["context_fg"] == pytest.approx(2 / 4)
    # Recall 1.0 at 0.4 (context 0.5), 0.5 at 0.7 (column 0 only, context 0): at 0.6, 0.5 - 0.5 * 0.4 / 0.5.
    assert m["context_fg_matched"] == pytest.approx(0.1)
