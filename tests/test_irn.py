"""IRN: shapes, the frozen backbone, the displacement loss by hand, train-irn through the CLI."""
import csv
import json

import numpy as np
import pytest
import torch
import yaml

from amrseg.cli import main
from amrseg.config import Config, IRNConfig, IRNModelConfig, merge, resolve, to_dict
from amrseg.data.voc import open_dataset, write_palette_png
from amrseg.errors import AmrsegError
from amrseg.models.irn import IRN, build_irn
from amrseg.models.losses import displacement_loss, irn_loss
from amrseg.models.affinity import (
    extract_pairs,
    pair_values,
    search_offsets,
)

TINY = IRNModelConfig(backbone="resnet18", base_width=8, pretrained="none", radius=3)


def write_ir_labels(root, split, out):
    """IR labels from the ground truth: the masks with a 255 band along the class borders."""
    data = open_dataset(root, split, require_labels=False)
    out.mkdir(parents=True, exist_ok=True)
    for i, iid in enumerate(data.ids):
        mask = data.load_mask(i).copy()
        border = np.zeros_like(mask, dtype=bool)
        border[:, 1:] |= mask[:, 1:] != mask[:, :-1]
        border[1:] |= mask[1:] != mask[:-1]
        mask[border] = 255
        write_palette_png(out / f"{iid}.png", mask)
    return out


def fake_cam_run(path, base_width=8):
    """A train-cam run directory (config.yaml + model.pt) with an untrained spotlight-only net."""
    from amrseg.models.amr import AMRNet

    cfg = merge(Config(), {"preset": "cam", "model": {"backbone": "resnet18", "base_width": base_width,
                                                      "pretrained": "none", "compensation": False}})
    torch.manual_seed(1)
    model = AMRNet(cfg.model, cfg.amm, num_classes=2)
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.save({"state_dict": model.state_dict(), "config": to_dict(cfg),
                "class_names": ["background", "square", "disc"]}, path / "model.pt")
    return path, model


def test_forward_shapes_on_the_stride4_grid():
    model = IRN(TINY)
    assert model.edge_width == 8
    out = model(torch.randn(2, 3, 37, 50))
    assert out["boundary_logits"].shape == (2, 10, 13)  # ceil(37 / 4), ceil(50 / 4)
    assert out["displacement"].shape == (2, 2, 10, 13)
    assert IRN(IRNModelConfig(backbone="resnet50", pretrained="none")).edge_width == 32


def test_backbone_is_frozen_and_every_head_parameter_learns():
    cfg = IRNModelConfig(backbone="resnet18", base_width=8, pretrained="none", radius=3, fixed_bn=False)
    model = IRN(cfg).train()
    assert not model.backbone.training and model.edge_out.training
    assert all(not p.requires_grad for p in model.backbone.parameters())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    groups = model.param_groups(0.1, 10.0, 1e-4)
    assert [g["name"] for g in groups] == ["edge", "displacement"]
    assert [g["initial_lr"] for g in groups] == [0.1, pytest.approx(1.0)]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups for p in g["params"]}
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    label = torch.randint(0, 3, (2, 8, 8))
    losses = irn_loss(model(torch.randn(2, 3, 32, 32)), label, 3)
    assert set(losses) == {"pos_bg", "pos_fg", "neg", "dp_fg", "dp_bg", "total"}
    losses["total"].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, name
    opt.step()
    after = model.backbone.state_dict()
    for k, v in before.items():  # weights and BN running statistics alike
        assert torch.equal(v, after[k]), k


def test_pair_values_reads_both_ends():
    x = torch.arange(2 * 4 * 5, dtype=torch.float32).view(1, 2, 4, 5)
    src, dst = pair_values(x, 2)  # margins 1: from pixels y in [0, 3), x in [1, 4)
    assert src.shape == (1, 2, 1, 3, 3) and dst.shape == (1, 2, 4, 3, 3)
    assert torch.equal(src[0, :, 0], x[0, :, 0:3, 1:4])
    for k, (dy, dx) in enumerate(search_offsets(2)):
        assert torch.equal(dst[0, :, k], x[0, :, dy:dy + 3, 1 + dx:4 + dx])


def test_displacement_loss_by_hand():
    # 2x3 map, radius 2: one "from" pixel (0, 1) and its 4 pairs to (0,2), (1,0), (1,1), (1,2).
    label = torch.ones(1, 2, 3, dtype=torch.long)
    pairs = extract_pairs(label, 2)
    assert pairs["pos_fg"].sum() == 4 and pairs["pos_bg"].sum() == 0
    yy, xx = torch.meshgrid(torch.arange(2.0), torch.arange(3.0), indexing="ij")
    # D(p) = centroid - p: every pixel points at (0.5, 1); a constant shift changes nothing.
    perfect = torch.stack([0.5 - yy, 1.0 - xx])[None]
    for field in (perfect, perfect + 3.0):
        out = displacement_loss(field, pairs, 2)
        assert out["dp_fg"].item() == pytest.approx(0.0) and out["total"].item() == pytest.approx(0.0)
    # D = 0: |0 - d|_1 over the offsets (0,1), (1,-1), (1,0), (1,1) = 1 + 2 + 1 + 2, divided by
    # 2 * count = 8 as IRN's release does (the mean over pairs *and* coordinates).
    out = displacement_loss(torch.zeros(1, 2, 2, 3), pairs, 2)
    assert out["dp_fg"].item() == pytest.approx(6 / 8) and out["total"].item() == pytest.approx(6 / 16)
    # The opposite sign is wrong: D(p) = p - centroid costs twice |d|.
    assert displacement_loss(-perfect, pairs, 2)["dp_fg"].item() == pytest.approx(12 / 8)
    # Background pairs: |D(p) - D(q)|_1. Only the dy channel varies: 0 - 2 on the three row-1 pairs.
    bg = extract_pairs(torch.zeros(1, 2, 3, dtype=torch.long), 2)
    field = torch.zeros(1, 2, 2, 3)
    field[0, 0, 1] = 2.0
    out = displacement_loss(field, bg, 2)
    assert out["dp_bg"].item() == pytest.approx(6 / 8) and out["dp_fg"].item() == 0.0


def test_backbone_from_a_train_cam_run(tmp_path):
    run, cam_model = fake_cam_run(tmp_path / "cam")
    model = build_irn(IRNModelConfig(backbone="resnet18", base_width=8, pretrained=str(run)))
    want = cam_model.spotlight.backbone.state_dict()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, want[k]), k
    with pytest.raises(AmrsegError, match="has shape .8, 3, 7, 7., the model expects .16, 3, 7, 7.") as e:
        build_irn(IRNModelConfig(backbone="resnet18", base_width=16, pretrained=str(run)))
    assert len(str(e.value).splitlines()) == 1


SMALL = ["--backbone", "resnet18", "--base-width", "8", "--pretrained", "none", "--crop", "32", "--batch-size", "4",
         "--device", "cpu", "--set", "model.radius=3", "--set", "train.num_workers=0", "--set", "train.log_every=1"]


def _train_irn(root, labels, out, extra=()):
    cams = root / "cams"
    cams.mkdir(exist_ok=True)
    return main(["train-irn", "--cams", str(cams), "--ir-labels", str(labels), "--data", str(root),
                 "--split", "train", "--out", str(out), "--epochs", "1", *SMALL, *extra])


def test_train_irn_runs_and_resumes_exactly(tiny_voc, tmp_path, capsys):
    from amrseg.engine.train import train as train_irn

    labels = write_ir_labels(tiny_voc, "train", tmp_path / "ir")
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train_irn(tiny_voc, labels, full) == 0  # 8 images / batch 4 = 2 steps
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"finished": True, "step": 2, "total_steps": 2, "model": str(full / "model.pt")}
    cfg = yaml.safe_load((full / "config.yaml").read_text())
    assert cfg["kind"] == "irn" and cfg["cams"] == str((tiny_voc / "cams").resolve())
    assert cfg["model"]["radius"] == 3 and cfg["ir_labels"] == str(labels.resolve())
    saved = torch.load(full / "model.pt", weights_only=True)
    assert saved["class_names"] == ["background", "square", "disc"]
    with open(full / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    for r in rows:
        for k in ("loss", "pos_bg", "pos_fg", "neg", "dp_fg", "dp_bg"):
            assert float(r[k]) >= 0

    flags = {"data_root": str(tiny_voc.resolve()), "split": "train", "ir_labels": str(labels.resolve()),
             "cams": str((tiny_voc / "cams").resolve()),
             "model": {"backbone": "resnet18", "base_width": 8, "pretrained": "none"},
             "train": {"epochs": 1, "batch_size": 4, "device": "cpu"}, "data": {"crop": 32}}
    cfg = resolve(IRNConfig(), flags, ["model.radius=3", "train.num_workers=0", "train.log_every=1"])
    assert train_irn(cfg, part, stop_after_steps=1)["finished"] is False
    capsys.readouterr()
    assert _train_irn(tiny_voc, labels, part) == 2  # an existing run needs --resume
    assert "--resume" in capsys.readouterr().err
    assert _train_irn(tiny_voc, labels, part, ["--resume"]) == 0
    a = torch.load(full / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(part / "model.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_irn_bad_input_is_one_line(tiny_voc, tmp_path, capsys):
    labels = write_ir_labels(tiny_voc, "train", tmp_path / "ir")
    (labels / "train_003.png").unlink()
    assert _train_irn(tiny_voc, labels, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--ir-labels" in err and "train_003.png" in err
    labels = write_ir_labels(tiny_voc, "train", tmp_path / "ir")
    for extra, needle in ((["--set", "model.radius=5"], "data.crop"), (["--set", "model.bogus=1"], "model.bogus"),
                          (["--set", "kind=seg"], "kind")):
        assert _train_irn(tiny_voc, labels, tmp_path / "run", extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "run").exists()


def test_irn_config_defaults_follow_the_release():
    cfg = IRNConfig()
    assert (cfg.train.lr, cfg.train.lr * cfg.train.new_lr_mult, cfg.train.epochs) == (0.1, 1.0, 3)
    assert cfg.model.radius == 10 and cfg.model.strides == [1, 2, 2, 1]


def _head_reference(head, x, factor, size):
    """IRN's head from its parts: 1x1 conv, GroupNorm, bilinear x factor, ReLU, the top-left `size`."""
    conv, norm = head[0], head[1]
    y = torch.nn.functional.conv2d(x, conv.weight)
    y = torch.nn.functional.group_norm(y, norm.num_groups, norm.weight, norm.bias, norm.eps)
    if factor > 1:
        y = torch.nn.functional.interpolate(y, scale_factor=factor, mode="bilinear", align_corners=False)
    return torch.relu(y)[..., : size[0], : size[1]]


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 37, 50)])
def test_heads_normalise_then_upsample_then_relu(shape):
    # IRN's heads upsample *between* the GroupNorm and the ReLU, by the exact factors x2 (layer2),
    # x4 (layer3, layer4) and x2 (the fused displacement map), then cut to the grid.
    torch.manual_seed(3)
    model = IRN(TINY).eval()
    for m in model.modules():  # non-trivial affine GroupNorm parameters
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.5)
            torch.nn.init.normal_(m.bias, 0.0, 0.5)
    x = torch.randn(*shape)
    feats = model.features(x)
    grid, mid = tuple(feats[0].shape[-2:]), tuple(feats[2].shape[-2:])
    edges = [_head_reference(h, f, k, grid) for h, f, k in zip(model.edge_heads, feats, (1, 1, 2, 4, 4))]
    logits = torch.nn.functional.conv2d(torch.cat(edges, 1), model.edge_out.weight, model.edge_out.bias)[:, 0]
    deep = [_head_reference(h, f, k, mid) for h, f, k in zip(model.dp_deep, feats[2:], (1, 2, 2))]
    fused = _head_reference(model.dp_deep_fuse, torch.cat(deep, 1), 2, grid)
    shallow = [_head_reference(h, f, 1, grid) for h, f in zip(model.dp_shallow, feats[:2])]
    last = _head_reference(model.dp_fuse[0], torch.cat([*shallow, fused], 1), 1, grid)
    disp = torch.nn.functional.conv2d(last, model.dp_fuse[1].weight, model.dp_fuse[1].bias)
    out = model(x)
    torch.testing.assert_close(out["boundary_logits"], logits)
    torch.testing.assert_close(out["displacement"], disp)
    # The old order (ReLU, then resize to the grid) is another function: the test can tell them apart.
    relu_first = torch.nn.functional.interpolate(torch.relu(torch.nn.functional.group_norm(
        torch.nn.functional.conv2d(feats[4], model.edge_heads[4][0].weight), model.edge_heads[4][1].num_groups,
        model.edge_heads[4][1].weight, model.edge_heads[4][1].bias)), size=grid, mode="bilinear", align_corners=False)
    assert not torch.allclose(relu_first, edges[4])


def test_old_state_dicts_still_load():
    # The upsampling layers have no parameters: a head's keys are still 0 (conv) and 1 (GroupNorm).
    keys = set(IRN(TINY).state_dict())
    assert {"edge_heads.4.0.weight", "edge_heads.4.1.weight", "dp_deep_fuse.1.bias"} <= keys
    assert not any(".2.weight" in k or ".3.weight" in k for k in keys if k.startswith(("edge_heads", "dp_")))


def test_infer_boundary_pads_to_the_crop_and_averages_logits():
    from amrseg.models.irn import inference_canvas, infer_boundary

    assert [inference_canvas(s, 512, 16) for s in (375, 500, 512, 513, 700)] == [512, 512, 512, 528, 704]
    assert inference_canvas(30, 24, 16) == 32
    torch.manual_seed(4)
    model = IRN(TINY).eval()
    image = torch.randn(3, 27, 30)
    got = infer_boundary(model, image, crop=48)
    assert got.shape == (7, 8)
    # By hand: zero canvas 48 x 48, image top-left; the flip the same; logits cut, flip undone.
    canvas = torch.zeros(2, 3, 48, 48)
    canvas[0, :, :27, :30] = image
    canvas[1, :, :27, :30] = image.flip(-1)
    with torch.no_grad():
        logits = model(canvas)["boundary_logits"][:, :7, :8]
    want = torch.sigmoid((logits[0] + logits[1].flip(-1)) / 2)
    torch.testing.assert_close(got, want)
    # Not the mean of the two probabilities, and not the unpadded image.
    assert not torch.allclose(got, (torch.sigmoid(logits[0]) + torch.sigmoid(logits[1].flip(-1))) / 2, atol=1e-6)
    with torch.no_grad():
        unpadded = model(torch.stack([image, image.flip(-1)]))["boundary_logits"]
    assert not torch.allclose(got, torch.sigmoid((unpadded[0] + unpadded[1].flip(-1)) / 2), atol=1e-4)
