"""AMRNet: every preset trains every trainable parameter, frozen parts stay put, CAM invariants."""
import dataclasses

import pytest
import torch
from torch import nn

from amrseg.config import load_preset, merge, resolve
from amrseg.errors import AmrsegError
from amrseg.models.amm import AMM
from amrseg.models.amr import AMRNet, build_model
from amrseg.models.losses import amr_loss
from amrseg.models.resnet import FixedBatchNorm2d, build_resnet

K = 4
LABELS = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny torchvision-named backbone checkpoint and a trained-`cam`-run model.pt."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(3)
    net = build_resnet("resnet18", base_width=8)
    with torch.no_grad():  # pretrained-looking statistics, so fixed BN is not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    sd = dict(net.state_dict(), **{"fc.weight": torch.randn(10, 64), "fc.bias": torch.zeros(10)})
    torch.save(sd, d / "backbone.pt")
    cam_run = d / "camrun"
    cam_run.mkdir()
    cam_model = AMRNet(config("cam").model, config("cam").amm, K)
    torch.save({"state_dict": cam_model.state_dict(), "epoch": 1}, cam_run / "model.pt")
    return {"backbone": str(d / "backbone.pt"), "cam_run": str(cam_run), "cam_sd": cam_model.state_dict(),
            "backbone_sd": sd}


def config(preset, **model):
    # reduction 1: at init the GAP of post-ReLU features is almost the same positive vector for
    # every image, so each hidden unit of a channel-gate MLP is dead for the whole batch with
    # probability ~1/2; with 8-channel stages and reduction 16 there is one unit, and the gradient
    # check would test luck rather than wiring.
    return merge(load_preset(preset), {
        "model": {"backbone": "resnet18", "base_width": 8, "pretrained": "none", **model},
        "amm": {"reduction": 1}})


def preset_config(preset, pretrained, files, **model):
    model = dict(model)
    if pretrained:
        model["pretrained"] = files["backbone"]
    if preset == "amr-official":
        model["init_spotlight"] = files["cam_run"]
    return config(preset, **model)


def expected_frozen(cfg) -> list[str]:
    """Parameter-name prefixes that the config freezes, written from the AMR.md rules."""
    m = cfg.model
    out = []
    if m.pretrained != "none" and m.freeze_stem:
        branches = ["spotlight"] + (["compensation"] if m.compensation else [])
        out += [f"{b}.backbone.{s}." for b in branches for s in ("conv1", "bn1")]
    if m.freeze_spotlight_backbone:
        out.append("spotlight.backbone.")
    out += [f"compensation.backbone.{n}." for n in m.freeze_compensation]
    return out


def bn_stats(model):
    return {n: b.clone() for n, b in model.named_buffers() if "running_" in n}


CASES = [(p, pre) for p in ("cam", "amr", "amr-block", "amr-official", "amr-gtm") for pre in (False, True)]


@pytest.mark.parametrize("preset,pretrained", CASES)
def test_every_trainable_parameter_gets_a_gradient(preset, pretrained, files):
    cfg = preset_config(preset, pretrained, files, fixed_bn=not (preset == "amr-official"))
    model = build_model(cfg, K).train()
    frozen = expected_frozen(cfg)
    for name, p in model.named_parameters():
        assert p.requires_grad == (not any(name.startswith(f) for f in frozen)), name
    before = bn_stats(model)
    out = model(torch.randn(2, 3, 64, 64))
    loss = amr_loss(out, LABELS, cfg.loss)
    assert set(loss) >= {"total", "cls"} and ("cps" in loss) == (preset != "cam")
    loss["total"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    after = bn_stats(model)
    fixed = cfg.model.fixed_bn and pretrained
    for name in before:  # frozen and fixed BNs keep their statistics, every other BN updates them
        in_backbone = ".backbone." in name and ".amm." not in name
        # the AMMs inside a frozen layer1 keep training statistics, as the release's (only detached) layer1
        if (any(name.startswith(f) for f in frozen) and ".amm." not in name) or (fixed and in_backbone):
            assert torch.equal(before[name], after[name]), name
        else:
            assert not torch.equal(before[name], after[name]), name


def test_bn_types_and_placement(files):
    model = build_model(preset_config("amr", True, files), K)
    for branch in (model.spotlight, model.compensation):
        assert isinstance(branch.backbone.layer3[1].bn2, FixedBatchNorm2d)
    assert len(model.compensation.amms) == 4 and model.spotlight.amms is None
    for m in model.compensation.amms.modules():
        assert type(m) is not FixedBatchNorm2d
    assert type(model.compensation.amms[2].spatial.bn) is nn.BatchNorm2d
    # Both backbones carry the checkpoint.
    for branch in (model.spotlight, model.compensation):
        assert torch.equal(branch.backbone.layer2[0].conv1.weight, files["backbone_sd"]["layer2.0.conv1.weight"])
    scratch = AMRNet(config("amr").model, config("amr").amm, K)
    assert not any(isinstance(m, FixedBatchNorm2d) for m in scratch.modules())
    block = AMRNet(config("amr-official").model, config("amr-official").amm, K)
    assert block.compensation.amms is None
    blocks = [b for layer in block.compensation.backbone.stages() for b in layer]
    assert len(blocks) == 8 and all(isinstance(b.amm, AMM) for b in blocks)
    assert not any(isinstance(m, AMM) for m in block.spotlight.modules())
    assert build_model(config("cam"), K).compensation is None


def test_init_spotlight(files, tmp_path):
    model = build_model(preset_config("amr-official", True, files), K)
    for k, v in model.spotlight.state_dict().items():
        assert torch.equal(v, files["cam_sd"]["spotlight." + k]), k
    ckpt = tmp_path / "checkpoint.pt"  # a run's checkpoint.pt ({'model': ...}) works too
    torch.save({"model": files["cam_sd"], "step": 3}, ckpt)
    assert torch.equal(build_model(config("amr-official", init_spotlight=str(ckpt)), K).spotlight.classifier.weight,
                       files["cam_sd"]["spotlight.classifier.weight"])
    with pytest.raises(AmrsegError, match="--init-spotlight .*model.pt"):
        build_model(config("amr-official", init_spotlight=str(tmp_path)), K)
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": files["cam_sd"]}, wrong)
    with pytest.raises(AmrsegError, match="--init-spotlight .*wrong.pt.*classifier"):
        build_model(config("amr-official", init_spotlight=str(wrong)), K + 1)
    torch.save({"state_dict": {k: v for k, v in files["cam_sd"].items() if "layer4" not in k}}, wrong)
    with pytest.raises(AmrsegError, match="--init-spotlight .*wrong.pt.*missing spotlight keys"):
        build_model(config("amr-official", init_spotlight=str(wrong)), K)


def test_frozen_modules_stay_in_eval_mode_but_their_amms_follow_the_network(files):
    model = build_model(preset_config("amr-official", True, files, fixed_bn=False), K)
    model.train()
    assert not model.spotlight.backbone.training and not model.spotlight.backbone.layer2[0].bn1.training
    assert not model.compensation.backbone.layer1[0].bn1.training
    # the release freezes layer1 by detaching its output: its AMMs keep their training-mode statistics
    assert model.compensation.backbone.layer1[0].amm.spatial.bn.training
    assert not any(p.requires_grad for p in model.compensation.backbone.layer1.parameters())
    assert model.compensation.backbone.layer2.training and model.spotlight.classifier.training
    model.eval()
    assert not model.compensation.backbone.layer2.training
    assert not model.compensation.backbone.layer1[0].amm.spatial.bn.training


def test_cam_of_an_image_does_not_depend_on_its_batch():
    model = build_model(config("amr"), K)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        model.train()(x * 1.5 + 0.3)  # move the BN statistics off their defaults
        model.eval()
        batch = model(x)
        for i in range(3):
            alone = model(x[i:i + 1])
            for key in ("cam_s", "cam_c", "logits_c"):
                torch.testing.assert_close(alone[key], batch[key][i:i + 1], atol=1e-5, rtol=1e-4)
        # The release's batch statistics apply in training only: at inference they are per image too.
        release = config("amr")
        release = dataclasses.replace(release, amm=dataclasses.replace(release.amm, stats="batch"))
        coupled = build_model(release, K)
        coupled.load_state_dict(model.state_dict())
        coupled.eval()
        torch.testing.assert_close(coupled(x[:1])["cam_c"], coupled(x)["cam_c"][:1], atol=1e-5, rtol=1e-4)


def test_logits_are_the_mean_of_the_pre_relu_cam():
    model = build_model(config("amr"), K).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        feats = model.branch_features(x)
        assert [n for n, _ in model.branches()] == ["spotlight", "compensation"] == list(feats)
        for (name, branch), s in zip(model.branches(), "sc"):
            pre = branch.classifier(feats[name])
            assert pre.shape == (2, K, 4, 4)
            torch.testing.assert_close(out[f"logits_{s}"], pre.mean(dim=(2, 3)))
            torch.testing.assert_close(out[f"cam_{s}"], pre.clamp(min=0))
            assert out[f"logits_{s}"].min() < 0  # logits come from before the ReLU


def test_release_param_groups(files):
    """amr-official: the compensation backbone with its AMMs at 10x, both classifiers at 1x (train_amr)."""
    model = build_model(preset_config("amr-official", True, files), K)
    groups = model.param_groups(lr=0.01, new_lr_mult=10.0, weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["base", "compensation"]
    assert groups[0]["lr"] == groups[0]["initial_lr"] == 0.01
    assert groups[1]["lr"] == groups[1]["initial_lr"] == pytest.approx(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    base = {names[id(p)] for p in groups[0]["params"]}
    comp = {names[id(p)] for p in groups[1]["params"]}
    assert base == {"spotlight.classifier.weight", "compensation.classifier.weight"}
    assert comp == {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("compensation.backbone.")}
    assert any(".layer2.0.amm." in n for n in comp) and any(".layer4.1.conv2." in n for n in comp)
    assert not any(".layer1." in n or n.split(".")[2] in ("conv1", "bn1") for n in comp)


def test_spotlight_logits_are_detached_when_its_backbone_is_frozen(files):
    """The release: W_s moves only through CPS; its classification loss is dead."""
    for preset, detached in (("amr-official", True), ("amr", False)):
        model = build_model(preset_config(preset, True, files), K).train()
        out = model(torch.randn(2, 3, 64, 64))
        assert out["logits_s"].requires_grad != detached
        loss_cfg = preset_config(preset, True, files).loss
        loss = amr_loss(out, LABELS, loss_cfg)
        w = model.spotlight.classifier.weight
        (g_total,) = torch.autograd.grad(loss["total"], w, retain_graph=True)
        (g_cps,) = torch.autograd.grad(loss_cfg.cps_weight * loss["cps"], w)
        if detached:
            torch.testing.assert_close(g_total, g_cps)
        else:
            assert (g_total - g_cps).abs().max() > 1e-6


def test_param_groups(files):
    cfg = preset_config("amr-block", True, files, freeze_spotlight_backbone=True,
                        freeze_compensation=["conv1", "bn1", "layer1"])
    model = build_model(cfg, K)
    groups = model.param_groups(lr=0.01, new_lr_mult=10.0, weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["backbone", "new"]
    assert groups[0]["lr"] == groups[0]["initial_lr"] == 0.01
    assert groups[1]["lr"] == groups[1]["initial_lr"] == pytest.approx(0.1)
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    names = {id(p): n for n, p in model.named_parameters()}
    backbone = {names[id(p)] for p in groups[0]["params"]}
    new = {names[id(p)] for p in groups[1]["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert backbone | new == trainable and not backbone & new
    assert all(n.startswith("compensation.backbone.layer") and ".amm." not in n for n in backbone)
    assert "spotlight.classifier.weight" in new and "compensation.classifier.weight" in new
    assert any(".layer3.0.amm." in n for n in new) and not any(".layer1." in n for n in new)
    # Only classifiers train when both backbones are frozen: the empty group is left out.
    frozen = config("amr", freeze_spotlight_backbone=True,
                    freeze_compensation=["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"])
    groups = build_model(frozen, K).param_groups(0.01, 10.0, 0.0)
    assert [g["name"] for g in groups] == ["new"]


def test_unknown_freeze_name():
    with pytest.raises(AmrsegError, match="model.freeze_compensation.*layer5"):
        build_model(config("amr", freeze_compensation=["layer5"]), K)
    with pytest.raises(AmrsegError, match="model.freeze_compensation"):
        build_model(config("cam", freeze_compensation=["layer1"]), K)


def test_amm_stages_select_where_amms_go():
    cfg = resolve("amr", {"model": {"base_width": 8, "backbone": "resnet18", "pretrained": "none"}}, ["amm.stages=[1, 2, 3]"])
    model = AMRNet(cfg.model, cfg.amm, K)
    kinds = [type(m) for m in model.compensation.amms]
    assert kinds == [AMM, AMM, AMM, nn.Identity]
    cfg = resolve("amr", {"model": {"base_width": 8, "backbone": "resnet18", "pretrained": "none"}}, ["amm.placement=block", "amm.stages=[3, 4]"])
    model = AMRNet(cfg.model, cfg.amm, K)
    has = [[hasattr(b, "amm") for b in layer] for layer in model.compensation.backbone.stages()]
    assert has == [[False, False], [False, False], [True, True], [True, True]]
    for bad in ("[]", "[0, 1]", "[2, 2]"):
        with pytest.raises(AmrsegError, match="amm.stages"):
            resolve("amr", {}, [f"amm.stages={bad}"])


def test_cutout_zeroes_three_squares_scaled_with_the_crop(tiny_voc):
    """data.cutout: the release's cam-run cutout, three squares of up to round(128 * crop / 512) px, after
    normalisation; the other draws (resize, flip, crop) are unchanged."""
    import numpy as np

    from amrseg.config import DataConfig
    from amrseg.data.transforms import CamTrainDataset, cutout
    from amrseg.data.voc import open_dataset

    x = torch.ones(3, 10, 12)
    rng = np.random.default_rng(0)
    draws = np.random.default_rng(0)
    out = cutout(x, rng, 4)
    expected = torch.ones(10, 12)
    for _ in range(3):
        cy, cx = int(draws.integers(10)), int(draws.integers(12))
        expected[max(cy - 2, 0):cy + 2, max(cx - 2, 0):cx + 2] = 0
    assert torch.equal(out, expected.expand(3, -1, -1)) and torch.equal(x, torch.ones(3, 10, 12))
    data = open_dataset(tiny_voc, "train")
    plain = CamTrainDataset(data, DataConfig(crop=64, scale_range=[1.0, 1.0]), seed=3)
    cut = CamTrainDataset(data, DataConfig(crop=64, scale_range=[1.0, 1.0], cutout=True), seed=3)
    a, b = plain[1][0], cut[1][0]
    zeroed = (b == 0).all(0) & (a != 0).any(0)
    assert torch.equal(torch.where(zeroed, torch.zeros_like(a), a), b)  # only zeroing
    assert 0 < zeroed.sum() <= 3 * 16 * 16  # squares of up to 16 px at crop 64
