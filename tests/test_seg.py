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
from amrseg.models.deeplab import DeepLabV2
from amrseg.models.losses import segmentation_loss

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
    from amrseg.config import SegConfig, resolve
    from amrseg.engine.train import train as train_seg

    root, labels, run = seg_run
    state = torch.load(run / "model.pt", weights_only=True)
    assert state["class_names"] == ["background", "square", "disc"] and state["config"]["kind"] == "seg"
    flags = {"data_root": str(root.resolve()), "split": "train", "labels": str(labels.resolve()),
             "model": {"backbone": "resnet18", "base_width": 8, "pretrained": "none"},
             "train": {"epochs": 3, "batch_size": 4, "device": "cpu", "lr": 0.01}, "data": {"crop": 32}}
    cfg = resolve(SegConfig(), flags, ["train.num_workers=0", "train.log_every=1"])
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
    # Other scales into the same folder: refused (the masks there were made at 1.0); --overwrite remakes all.
    assert main(["predict", "--run", str(run), "--input", str(inputs), "--out", str(out), "--scales", "1.0,0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "scales [1.0] -> [1.0, 0.5]" in err
    assert main(["predict", "--run", str(run), "--input", str(inputs), "--out", str(out), "--scales", "1.0,0.5",
                 "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 3


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


def _conv_dilations(layer):
    """(dilation, padding) of the 3x3 convs of each block of a ResNet layer."""
    out = []
    for block in layer:
        convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        out.append({(c.dilation[0], c.padding[0]) for c in convs})
    return out


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_deeplab_dilates_the_first_block_of_a_dilated_layer(backbone):
    # DeepLab-v2's convention (its Caffe model's res4a/res5a, the kazuto1011 port): every block of
    # layer3 at dilation 2 and of layer4 at 4, the first block too. torchvision (and IRN's ResNet)
    # leave the first block at the previous layer's dilation: model.dilation_style=torchvision.
    cfg = SegModelConfig(backbone=backbone, base_width=8, pretrained="none")
    assert cfg.dilation_style == "deeplab"
    model = DeepLabV2(cfg, 3)
    layer3, layer4 = _conv_dilations(model.backbone.layer3), _conv_dilations(model.backbone.layer4)
    assert all(d == {(2, 2)} for d in layer3) and all(d == {(4, 4)} for d in layer4)
    assert all(d == {(1, 1)} for d in _conv_dilations(model.backbone.layer2))
    tv = DeepLabV2(SegModelConfig(backbone=backbone, base_width=8, pretrained="none", dilation_style="torchvision"), 3)
    layer3, layer4 = _conv_dilations(tv.backbone.layer3), _conv_dilations(tv.backbone.layer4)
    assert layer3[0] == {(1, 1)} and all(d == {(2, 2)} for d in layer3[1:])
    assert layer4[0] == {(2, 2)} and all(d == {(4, 4)} for d in layer4[1:])
    # Same parameters, other function.
    tv.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        a, b = model.eval()(x), tv.eval()(x)
    assert a.shape == b.shape == (1, 3, 6, 6) and not torch.allclose(a, b)
    # Output stride 16: only layer4 is dilated; its first block is 2 or 1.
    os16 = DeepLabV2(SegModelConfig(backbone=backbone, base_width=8, pretrained="none", output_stride=16), 3)
    assert _conv_dilations(os16.backbone.layer4)[0] == {(2, 2)}
    os16tv = DeepLabV2(SegModelConfig(backbone=backbone, base_width=8, pretrained="none", output_stride=16,
                                      dilation_style="torchvision"), 3)
    assert _conv_dilations(os16tv.backbone.layer4)[0] == {(1, 1)}


def test_dilation_style_is_checked(tiny_voc, tmp_path, capsys):
    labels = _labels_dir(tiny_voc, tmp_path)
    assert _train_seg(tiny_voc, labels, tmp_path / "r", epochs=1, extra=["--set", "model.dilation_style=caffe"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dilation_style" in err and "torchvision" in err


def test_irn_and_deeplab_scale_the_image_cam_training_the_long_side():
    # AMR.md section 4 (CAM training): the long side uniform in [0.625, 1.25] x crop. IRN and
    # DeepLab (section 7): the image scaled 0.5-1.5 of its *own* size, whatever the crop.
    from amrseg.config import Config, IRNConfig, SegConfig
    from amrseg.data.transforms import random_size

    assert (Config().data.scale_of, Config().data.scale_range) == ("crop", [0.625, 1.25])
    for cfg in (IRNConfig().data, SegConfig().data):
        assert (cfg.scale_of, cfg.scale_range) == ("image", [0.5, 1.5])
    seg = SegConfig().data  # crop 321
    sizes = [random_size((375, 500), np.random.default_rng(s), seg) for s in range(2000)]
    factors = np.array([w / 500 for w, _ in sizes])
    assert all(abs(h - round(375 * w / 500)) <= 1 for w, h in sizes)  # the aspect is kept
    assert 0.5 <= factors.min() < 0.52 and 1.48 < factors.max() <= 1.5
    assert factors.mean() == pytest.approx(1.0, abs=0.02)  # the image's own size on average
    # Read as long side / crop (the old reading) the mean would be 321 / 500 = 0.64 of the image.
    cam = Config().data  # crop 512
    longs = [max(random_size((375, 500), np.random.default_rng(s), cam)) for s in range(2000)]
    assert min(longs) >= 320 and max(longs) <= 640 and np.mean(longs) == pytest.approx(480, abs=8)
    # A fixed factor, by hand: 0.5 of 37 x 50 -> round(18.5) = 18 (half to even), 25.
    from amrseg.config import DataConfig
    half = DataConfig(scale_range=[0.5, 0.5], scale_of="image", crop=16)
    assert random_size((37, 50), np.random.default_rng(0), half) == (25, 18)


def test_label_dataset_scales_image_and_label_alike(tiny_voc, tmp_path):
    from amrseg.config import DataConfig
    from amrseg.data.transforms import LabelTrainDataset
    from amrseg.data.voc import open_dataset

    labels = _labels_dir(tiny_voc, tmp_path)
    data = open_dataset(tiny_voc, "train")
    # Factor 0.5 of a 32 x 32 image: a 16 x 16 image placed in the 24 x 24 crop, the rest 255.
    ds = LabelTrainDataset(data, labels, DataConfig(scale_range=[0.5, 0.5], scale_of="image", crop=24, hflip=False),
                           seed=0)
    image, label, _ = ds[0]
    placed = label != 255
    rows, cols = torch.nonzero((image != 0).any(dim=0), as_tuple=True)
    assert (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1) == (16, 16)
    # The label's known pixels lie inside the placed image (its top two rows are 255 already).
    inside = placed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert placed.sum() <= 16 * 16 and inside.sum() == placed.sum()


def test_a_pickled_whole_model_or_a_text_file_as_pretrained_is_one_clear_line(tiny_voc, tmp_path, capsys):
    from amrseg.models.resnet import build_resnet

    labels = _labels_dir(tiny_voc, tmp_path)
    whole = tmp_path / "whole.pt"
    torch.save(build_resnet("resnet18", 8), whole)  # the model object, not its state_dict
    text = tmp_path / "weights.txt"
    text.write_text("resnet18 weights: see the wiki\n")
    base = [a for a in SMALL if a not in ("--pretrained", "none")]
    for path, needles in ((whole, ("holds a pickled", "ResNet", "state_dict()")),
                          (text, ("not a", "weights file"))):
        assert main(["train-seg", "--data", str(tiny_voc), "--labels", str(labels), "--split", "train",
                     "--out", str(tmp_path / path.stem), "--epochs", "1", *base, "--pretrained", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("amrseg: error: --pretrained"), err
        assert "\x1b" not in err and len(err) < 250, err
        for n in needles:
            assert n in err, err


def test_load_pretrained_names_what_the_file_is(tmp_path):
    # The library's own messages (the CLI checks the first bytes before it gets there).
    from amrseg.errors import AmrsegError
    from amrseg.models.resnet import build_resnet, load_pretrained

    model = build_resnet("resnet18", 8)
    cases = {"whole.pt": None, "legacy.pt": None, "notes.txt": "a text file", "empty.pt": "an empty file",
             "noise.pt": "not a PyTorch file"}
    torch.save(model, tmp_path / "whole.pt")
    torch.save(model, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "notes.txt").write_text("not weights\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "noise.pt").write_bytes(bytes(range(200, 256)) * 4)
    for name, what in cases.items():
        with pytest.raises(AmrsegError) as e:
            load_pretrained(model, str(tmp_path / name), "resnet18")
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and "\x1b" not in msg and len(msg) < 250, msg
        if what is None:
            assert "holds a pickled amrseg.models.resnet.ResNet" in msg and "state_dict()" in msg, msg
        else:
            assert f"not a weights file ({what})" in msg, msg
    torch.save(model.state_dict(), tmp_path / "good.pt")
    load_pretrained(model, str(tmp_path / "good.pt"), "resnet18")  # the state dict loads
