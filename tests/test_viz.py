"""Colour maps, the CAM -> label rule (and its agreement with the evaluation), the visualize stage."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from amrseg.cam.io import save_cam
from amrseg.data.voc import SegData, write_palette_png
from amrseg.errors import AmrsegError
from amrseg.eval.metrics import confusion_matrix, sweep_confusion
from amrseg.stages.visualize import draw_gallery as visualize
from amrseg.viz import TITLE_H, colorize, heatmap, overlay, predict_labels


def test_colorize_voc_palette():
    out = colorize(np.array([[0, 1, 2], [15, 255, 3]], dtype=np.uint8))
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert out[0].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert out[1].tolist() == [[192, 128, 128], [224, 224, 192], [128, 128, 0]]


def test_heatmap_range_and_end_points():
    cam = np.array([[0.0, 0.5, 1.0], [-3.0, 7.0, np.nan]])
    out = heatmap(cam)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    # jet: dark blue at 0, light green in the middle, dark red at 1; clipped outside; NaN as 0.
    assert out[0].tolist() == [[0, 0, 128], [128, 255, 128], [128, 0, 0]]
    assert out[1].tolist() == [[0, 0, 128], [128, 0, 0], [0, 0, 128]]
    ramp = heatmap(np.linspace(0, 1, 101)[None])[0].astype(int)
    assert ramp[:, 2].argmax() < ramp[:, 1].argmax() < ramp[:, 0].argmax()  # blue, green, red peaks


def test_overlay_by_hand():
    img = np.full((1, 2, 3), 100, np.uint8)
    rgb = np.array([[[200, 0, 50], [100, 100, 100]]], np.uint8)
    assert overlay(img, rgb, alpha=0.5).tolist() == [[[150, 50, 75], [100, 100, 100]]]
    assert overlay(img, rgb, alpha=0.0).tolist() == img.tolist()
    with pytest.raises(ValueError):
        overlay(img, rgb[:, :1])


def test_predict_labels_ties():
    # Values exact in float16, so that equal means equal.
    maps = np.array([[[0.25, 0.75, 0.5, 0.125]], [[0.125, 0.75, 0.25, 0.375]]], dtype=np.float16)
    keys = np.array([2, 5])
    # pixel 0: 0.25 ties the threshold -> background; pixel 1: the maps tie -> first key;
    # pixel 2: key 2; pixel 3: max 0.375 > 0.25 -> key 5.
    assert predict_labels(maps, keys, 0.25).tolist() == [[0, 3, 3, 6]]
    assert predict_labels(maps, keys, 0.75).tolist() == [[0, 0, 0, 0]]
    assert predict_labels(maps, keys, 0.7).tolist() == [[0, 3, 0, 0]]
    out = predict_labels(np.zeros((0, 2, 3)), np.zeros(0, np.int64), 0.1)
    assert out.dtype == np.uint8 and out.shape == (2, 3) and not out.any()


@pytest.mark.parametrize("seed", range(4))
def test_predict_labels_agrees_with_the_evaluation_sweep(seed):
    rng = np.random.default_rng(seed)
    n, k = 3, 5
    keys = np.sort(rng.choice(k, size=n, replace=False)).astype(np.int64)
    maps = rng.choice(np.array([0, 0.2, 0.35, 0.5, 1.0], np.float16), size=(n, 6, 7))
    gt = rng.integers(0, k + 1, size=(6, 7))
    thresholds = [0.0, 0.2, 0.35, 0.4, 0.5]
    sweep = sweep_confusion(torch.from_numpy(maps.astype(np.float32)), torch.from_numpy(keys),
                            torch.from_numpy(gt), torch.tensor(thresholds, dtype=torch.float32), k + 1)
    for j, t in enumerate(thresholds):
        pred = predict_labels(maps, keys, t)
        assert torch.equal(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), k + 1), sweep[j])


def _make(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    rng = np.random.default_rng(0)
    ids = ["img_1", "img 2"]  # a space, to check the link is URL-quoted
    image_paths, mask_paths = [], []
    for j, i in enumerate(ids):
        image_paths.append(root / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)).save(image_paths[-1])
        if j == 0:
            mask = np.zeros((8, 10), np.uint8)
            mask[2:6, 3:8] = 2
            mask_paths.append(root / f"{i}_mask.png")
            write_palette_png(mask_paths[-1], mask)
        else:
            mask_paths.append(None)
    data = SegData(root, "train", ids, ["background", "cat", "dog"], None, mask_paths, image_paths)
    cams = tmp_path / "cams"
    cams.mkdir()
    dog = np.zeros((1, 8, 10), np.float32)
    dog[0, 2:6, 3:8] = 1
    save_cam(cams / "img_1.npz", np.array([1]), dog)
    save_cam(cams / "img 2.npz", np.array([0, 1]), rng.random((2, 8, 10)))
    return data, cams


def test_visualize_writes_panels_and_index(tmp_path, monkeypatch):
    data, cams = _make(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the viz extra were missing
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    metrics = {"miou": 0.5, "threshold": 0.25, "iou": {"background": 0.9, "cat": None, "dog": 0.1},
               "num_images": 1, "sweep": [[0.25, 0.5]]}
    index, warnings = visualize(cams, data, tmp_path / "viz", threshold=0.25, metrics=metrics)
    assert index == tmp_path / "viz" / "index.html"
    assert len(warnings) == 1 and "matplotlib" in warnings[0]
    assert not (tmp_path / "viz" / "iou.png").exists()
    text = index.read_text()
    assert 'src="panels/img_1.png"' in text and 'src="panels/img%202.png"' in text
    assert "mIoU 50.0% at threshold 0.25" in text and "<td>dog</td><td>10.0</td>" in text
    assert "<td>img_1</td><td>100.0</td>" in text  # the CAM of image 1 is exact
    # Tiles: input | gt | one per key | prediction; each 10 px wide, 4 px gaps.
    p1 = Image.open(tmp_path / "viz" / "panels" / "img_1.png")
    p2 = Image.open(tmp_path / "viz" / "panels" / "img 2.png")
    assert p1.size == (4 * 10 + 3 * 4, 8 + TITLE_H)
    assert p2.size == (5 * 10 + 4 * 4, 8 + TITLE_H)
    # The prediction tile of image 1 shows the dog colour (0, 128, 0) where the CAM is on.
    pred_tile = np.asarray(p1.convert("RGB"))[TITLE_H:, 3 * 14:]
    assert pred_tile[3, 4].tolist() == [0, 128, 0] and pred_tile[0, 0].tolist() == [0, 0, 0]
    assert sorted(p.name for p in (tmp_path / "viz" / "panels").iterdir()) == ["img 2.png", "img_1.png"]


def test_visualize_limit_and_missing_cam(tmp_path):
    data, cams = _make(tmp_path)
    with pytest.raises(AmrsegError, match="^--limit"):
        visualize(cams, data, tmp_path / "viz", threshold=0.5, limit=-1)
    index, warnings = visualize(cams, data, tmp_path / "viz", threshold=0.5, limit=1)
    assert warnings == [] and "img%202" not in index.read_text()
    assert [p.name for p in (tmp_path / "viz" / "panels").iterdir()] == ["img_1.png"]
    (cams / "img 2.npz").unlink()
    with pytest.raises(AmrsegError, match=r"img 2\.npz: CAM file not found \(1 of 2"):
        visualize(cams, data, tmp_path / "viz2", threshold=0.5)


def test_visualize_iou_chart_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    data, cams = _make(tmp_path)
    metrics = {"miou": 0.5, "threshold": 0.25, "iou": {"background": 0.9, "cat": None, "dog": 0.1},
               "num_images": 1, "sweep": [[0.25, 0.5]]}
    index, warnings = visualize(cams, data, tmp_path / "viz", threshold=0.25, metrics=metrics)
    assert warnings == [] and 'src="iou.png"' in index.read_text()
    assert Image.open(tmp_path / "viz" / "iou.png").size[0] > 100


@pytest.mark.parametrize("metrics", [[], {"miou": 0.5}, {"miou": 0.5, "threshold": "x", "iou": {}},
                                     {"miou": 0.5, "threshold": 0.2, "iou": {"a": "b"}}])
def test_visualize_rejects_malformed_metrics(tmp_path, metrics):
    data, cams = _make(tmp_path)
    with pytest.raises(AmrsegError, match="^--metrics: not an eval-cam JSON"):
        visualize(cams, data, tmp_path / "viz", threshold=0.5, metrics=metrics)
    assert not (tmp_path / "viz").exists()


def test_readme_figures_stacks_the_demo_pictures(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "readme_figures.py"
    demo = tmp_path / "demo"
    (demo / "gallery" / "panels").mkdir(parents=True)
    (demo / "report_files").mkdir()
    for i, width in enumerate((50, 70, 60)):  # panels of 2-3 classes differ in width
        Image.fromarray(np.full((20, width, 3), 40 * i, np.uint8)).save(demo / "gallery" / "panels" / f"val_{i}.png")
    for stage in ("ir-labels", "pseudo-masks", "eval-seg"):
        for i in range(3):
            Image.fromarray(np.full((10, 30, 3), 200, np.uint8)).save(demo / "report_files" / f"masks-08-{stage}-x_{i}.png")
    out = tmp_path / "img"
    done = subprocess.run([sys.executable, str(script), str(demo), str(out), "--panels", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    gallery, chain = Image.open(out / "cam-gallery.png"), Image.open(out / "chain.png")
    assert gallery.size == (70, 20 + 4 + 20)  # the first two panels, the widest sets the width, 4 px apart
    assert chain.size == (30, 6 * (14 + 10) + 5 * 4)  # 2 images x 3 stages, each under a 14-px label
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = subprocess.run([sys.executable, str(script), str(empty), str(out)], capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and str(empty) in failed.stderr
