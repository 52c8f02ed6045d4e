"""DeepLab-v2, train-seg, eval-seg and predict: loss, shapes, a real tiny run, scoring, outputs, bad input."""
import json
import math
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from amrseg.cli import main
from amrseg.config import SegModelConfig
from amrseg.data.voc import read_mask, write_palette_png
from amrseg.models.deeplab import DeepLabV2, segmentation_loss

SMALL = ["--backbone", "resnet18", "--base-width", "8", "--pretrained", "none", "--crop", "32",
         "--batch-size", "4", "--device", "cpu", "--lr", "0.01", "--set", "train.num_workers=0",
         "--set", "train.log_every=1"]


def test_loss_ignores_255_and_matches_a_hand_computed_value():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 5.0]]]], requires_grad=True)  # [1, 2 classes, 1, 2]
    labels = torch.tensor([[[0, 255]]])
    loss = segmentation_loss(logits, labels)
    # Only pixel 0 counts: -log(e^2 / (e^2 + e^0)) = log(1 + e^-2).
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[..., 1] == 0)  # no gradient at the ignored pixel
    all_ignored = segmentation_loss(logits, torch.full((1, 1, 2), 255))
    assert all_ignored.item() == 0.0 and torch.isfinite(all_ignored)


def test_loss_upsamples_scores_to_the_labels():
    logits = torch.zeros(2, 3, 4, 4)
    logits[:, 1] = 10.0  # class 1 everywhere
    labels = torch.ones(2, 16, 16, dtype=torch.long)
    labels[0, :8] = 255
    assert segmentation_loss(logits, labels).item() == pytest.approx(math.log(1 + 2 * math.exp(-10)), rel=2e-3)


@pytest.mark.parametrize("os_, size", [(8, 8), (16, 4)])
def test_deeplab_output_stride_and_groups(os_, size):
    cfg = SegModelConfig(backbone="resnet18", base_width=8, pretrained="none", output_stride=os_)
    model = DeepLabV2(cfg, 5).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5, size, size)
    groups = model.param_groups(0.1, 10, 1e-4)
    assert [g["lr"] for g in groups] == [0.1, 1.0]
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def _labels_dir(root, tmp_path, split="train"):
    """Pseudo masks = the ground truth, with a 255 band: a learnable, checkable stand-in."""
    out = tmp_path / "labels"
    out.mkdir(exist_ok=True)
    for iid in (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split():
        mask = read_mask(root / "SegmentationClass" / f"{iid}.png").copy()
        mask[:2] = 255
        write_palette_png(out / f"{iid}.png", mask)
    return out


def _train_seg(root, labels, out, epochs=3, extra=()):
    return main(["train-seg", "--data", str(root), "--labels", str(labels), "--split", "train", "--out", str(out),
                 "--epochs", str(epochs), *SMALL, *extra])


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    from conftest import make_voc_root

    tmp = tmp_path_factory.mktemp("seg")
    root = make_voc_root(tmp / "voc")
    labels = _labels_dir(root, tmp)
    assert _train_seg(root, labels, tmp / "run") == 0
    return root, labels, tmp / "run"


def test_train_seg_writes_a_seg_run_and_resumes_exactly(seg_run, tmp_path):
    from amrseg.config import resolve_run
    from amrseg.engine.train_seg import train_seg

    root, labels, run = seg_run
    state = torch.load(run / "model.pt", weights_only=True)
    assert state["class_names"] == ["background", "square", "disc"] and state["config"]["kind"] == "seg"
    flags = {"data_root": str(root.resolve()), "split": "train", "labels": str(labels.resolve()),
             "model": {"backbone": "resnet18", "base_width": 8, "pretrained": "none"},
             "train": {"epochs": 3, "batch_size": 4, "device": "cpu", "lr": 0.01}, "data": {"crop": 32}}
    cfg = resolve_run("seg", flags, ["train.num_workers=0", "train.log_every=1"])
    part = tmp_path / "part"
    assert train_seg(cfg, part, stop_after_steps=3)["finished"] is False
    assert train_seg(cfg, part, resume=True)["finished"] is True
    b = torch.load(part / "model.pt", weights_only=True)["state_dict"]
    for k, v in state["state_dict"].items():
        assert torch.equal(v, b[k]), k


def test_eval_seg_scores_a_folder_by_hand(tiny_voc, tmp_path, capsys):
    pred = tmp_path / "pred"
    shutil.copytree(tiny_voc / "SegmentationClass", pred)
    assert main(["eval-seg", "--pred", str(pred), "--data", str(tiny_voc), "--split", "val"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["miou"] == 1.0 and result["num_images"] == 4
    # Predict background everywhere on val_000: background IoU drops, its classes lose their pixels.
    gt = read_mask(tiny_voc / "SegmentationClass/val_000.png")
    write_palette_png(pred / "val_000.png", np.zeros_like(gt))
    assert main(["eval-seg", "--pred", str(pred), "--data", str(tiny_voc), "--split", "val",
                 "--out", str(tmp_path / "m.json")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    masks = [read_mask(tiny_voc / f"SegmentationClass/val_{i:03d}.png") for i in range(4)]
    lost = {c: int((masks[0] == c).sum()) for c in (1, 2)}
    total = {c: sum(int((m == c).sum()) for m in masks) for c in (0, 1, 2)}
    expect = {"background": total[0] / (total[0] + lost[1] + lost[2]),
              "square": (total[1] - lost[1]) / total[1], "disc": (total[2] - lost[2]) / total[2]}
    for name, v in expect.items():
        assert result["iou"][name] == pytest.approx(v, abs=1e-9)
    assert result["miou"] == pytest.approx(sum(expect.values()) / 3, abs=1e-9)


def test_eval_seg_run_equals_predict_then_eval(seg_run, tmp_path, capsys):
    root, _, run = seg_run
    assert main(["eval-seg", "--run", str(run), "--data", str(root), "--split", "val", "--scales", "1.0,0.5",
                 "--save", str(tmp_path / "saved"), "--device", "cpu"]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert main(["eval-seg", "--pred", str(tmp_path / "saved"), "--data", str(root), "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(direct["miou"], abs=1e-12)
    assert 0.0 <= direct["miou"] <= 1.0


def test_predict_on_mixed_sizes_writes_masks_and_overlays(seg_run, tmp_path, capsys):
    _, _, run = seg_run
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a": (40, 24, ".jpg"), "b": (17, 33, ".png"), "c": (64, 64, ".jpeg")}
    for name, (h, w, ext) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(inputs / f"{name}{ext}")
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run), "--input", str(inputs), "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 3
    for name, (h, w, _) in sizes.items():
        mask = Image.open(out / f"{name}.png")
        assert mask.mode == "P" and mask.size == (w, h) and np.array(mask).max() <= 2
        assert Image.open(out / "overlay" / f"{name}.jpg").size == (w, h)
    # One file works too, and a re-run skips what exists.
    assert main(["predict", "--run", str(run), "--input", str(inputs / "b.png"), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 1


def test_predict_voc_test_layout(seg_run, tmp_path, capsys):
    root, _, run = seg_run
    out = tmp_path / "sub"
    assert main(["predict", "--run", str(run), "--input", str(root / "JPEGImages"), "--out", str(out),
                 "--format", "voc-test"]) == 0
    capsys.readouterr()
    pngs = sorted(p.name for p in (out / "results/VOC2012/Segmentation/comp6_test_cls").glob("*.png"))
    assert len(pngs) == 12
    with tarfile.open(out / "results.tar.gz") as tar:
        assert sorted(tar.getnames()) == [f"results/VOC2012/Segmentation/comp6_test_cls/{p}" for p in pngs]


def test_bad_input_is_one_line(seg_run, tiny_voc, tmp_path, capsys):
    root, labels, run = seg_run
    # A pseudo-label folder missing a file.
    partial = tmp_path / "partial"
    shutil.copytree(labels, partial)
    (partial / "train_003.png").unlink()
    assert _train_seg(root, partial, tmp_path / "r", epochs=1) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train_003.png" in err and "--labels" in err
    # A run directory of the wrong kind.
    cam_run = tmp_path / "camrun"
    assert main(["train-cam", "--data", str(tiny_voc), "--split", "train", "--preset", "cam", "--out", str(cam_run),
                 "--epochs", "1", *SMALL]) == 0
    capsys.readouterr()
    assert main(["predict", "--run", str(cam_run), "--input", str(root / "JPEGImages"), "--out",
                 str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train-cam run" in err and "train-seg" in err
    # An unreadable image.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["predict", "--run", str(run), "--input", str(bad), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.jpg" in err
    # Neither --pred nor --run.
    assert main(["eval-seg", "--data", str(root), "--split", "val"]) == 2
    assert "--pred" in capsys.readouterr().err
