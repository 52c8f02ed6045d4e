"""The backbone contract (models/backbones.py, Backbone) over every entry of BACKBONES, and a plain
conv net that is not a ResNet registered into a copy of the registry: config, AMRNet and make-cam
take it with no other edit.

Each clause of the contract is a function of the backbone's name, run over the registry as it is at
collection (timm's test_model_backward over list_models()): a new entry is checked without being
named here.
"""
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from amrseg.cam.infer import InferConfig, cams_for_images
from amrseg.config import load_preset, merge, resolve
from amrseg.errors import AmrsegError
from amrseg.models import backbones
from amrseg.models.amr import AMRNet
from amrseg.models.backbones import BACKBONES, build_backbone
from amrseg.models.resnet import FixedBatchNorm2d, load_pretrained
from amrseg.runs import check_registered
from contract import clause_list, contract_test

WIDTH = 8
LAYOUTS = [  # strides, dilations of the 4 stages -> output stride
    ((1, 2, 2, 1), (1, 1, 1, 1), 16),
    ((1, 2, 2, 2), (1, 1, 1, 1), 32),
    ((1, 2, 1, 1), (1, 1, 2, 4), 8),  # DeepLab-v2
]


class Gate(nn.Module):
    """A block hook: a per-channel scale, 1 at first (the block as it was)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None]


def _x(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _params(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


CLAUSES, clause = clause_list()


@clause
def forward_and_backward_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, WIDTH).train()
    y = net(_x())
    assert y.shape == (2, net.out_channels, 4, 4) and torch.isfinite(y).all()
    y.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]


@clause
def output_stride_strides_and_dilations_are_as_configured(name: str) -> None:
    x = _x(1)
    for strides, dilations, stride in LAYOUTS:
        net = build_backbone(name, WIDTH, strides=strides, dilations=dilations).eval()
        assert (net.output_stride, net.strides, net.dilations) == (stride, strides, dilations)
        with torch.no_grad():
            assert net(x).shape[-2:] == (64 // stride, 64 // stride)


@clause
def channels_reported_are_channels_produced(name: str) -> None:
    """stem /4 with stem_channels; 4 stages with stage_channels; forward = stem then the stages."""
    net = build_backbone(name, WIDTH).eval()
    x = _x(1)
    with torch.no_grad():
        y = net.stem(x)
        assert y.shape == (1, net.stem_channels, 16, 16)
        stages = net.stages()
        assert len(stages) == len(net.stage_channels) == 4
        for stage, channels in zip(stages, net.stage_channels):
            y = stage(y)
            assert y.shape[1] == channels
        assert net.out_channels == net.stage_channels[-1]
        torch.testing.assert_close(y, net(x), rtol=0, atol=0)


@clause
def norm_layer_builds_every_norm(name: str) -> None:
    """fixed_bn: every BN is FixedBatchNorm2d and keeps its statistics in training; else none is."""
    fixed, plain = build_backbone(name, WIDTH, fixed_bn=True), build_backbone(name, WIDTH)
    assert fixed.norm_layer is FixedBatchNorm2d and plain.norm_layer is nn.BatchNorm2d
    bns = [m for m in fixed.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, FixedBatchNorm2d) for m in bns)
    assert not any(isinstance(m, FixedBatchNorm2d) for m in plain.modules())
    before = {k: v.clone() for k, v in fixed.state_dict().items()}
    fixed.train()(_x())
    assert all(torch.equal(v, before[k]) for k, v in fixed.state_dict().items())


@clause
def block_hook_modulates_every_block(name: str) -> None:
    """block_amm(channels, stage) for blocks of all 4 stages with their channels; the modules it returns
    are `.amm.` entries of the state dict and on the forward path; None leaves a block without keys."""
    calls = []

    def hook(channels, stage):
        calls.append((channels, stage))
        return Gate(channels)

    torch.manual_seed(0)
    hooked = build_backbone(name, WIDTH, block_amm=hook).eval()
    assert {s for _, s in calls} == {0, 1, 2, 3}
    assert all(c == hooked.stage_channels[s] for c, s in calls)
    amm_keys = [k for k in hooked.state_dict() if ".amm." in k]
    assert len(amm_keys) == len(calls)
    plain = build_backbone(name, WIDTH).eval()
    assert not any(".amm." in k for k in plain.state_dict())
    assert not any(".amm." in k for k in build_backbone(name, WIDTH, block_amm=lambda c, s: None).state_dict())
    plain.load_state_dict({k: v for k, v in hooked.state_dict().items() if ".amm." not in k})
    x = _x(1)
    with torch.no_grad():
        torch.testing.assert_close(hooked(x), plain(x))  # gates at 1
        for m in hooked.modules():
            if isinstance(m, Gate):
                m.weight.zero_()
        assert (hooked(x) - plain(x)).abs().max() > 1e-3


@clause
def stem_names_are_the_stem_and_freeze(name: str) -> None:
    """The parameters of stem_names are exactly those stem() uses; model.freeze_stem freezes them (on
    pretrained weights) and keeps them in eval mode."""
    net = build_backbone(name, WIDTH)
    stem_params = set()
    for n in net.stem_names:
        stem_params |= _params(net.get_submodule(n))
    net.stem(_x()).sum().backward()
    assert stem_params == {id(p) for p in net.parameters() if p.grad is not None}
    cfg = merge(load_preset("cam"), {"model": {"backbone": name, "base_width": WIDTH, "pretrained": "imagenet"}})
    model = AMRNet(cfg.model, cfg.amm, 3).train()  # builds without loading: pretrained only decides the freezing
    bb = model.spotlight.backbone
    frozen = {id(p) for p in bb.parameters() if not p.requires_grad}
    assert frozen == set().union(*(_params(bb.get_submodule(n)) for n in bb.stem_names))
    assert all(not bb.get_submodule(n).training for n in bb.stem_names)


@clause
def pretrained_loading_is_strict(name: str) -> None:
    """Its own state dict round-trips through a file (hook modules left as they are); a key set that
    is not its own is a one-line AmrsegError naming the file."""
    torch.manual_seed(1)
    source = build_backbone(name, WIDTH, fixed_bn=True)
    torch.manual_seed(2)
    target = build_backbone(name, WIDTH, block_amm=lambda c, s: Gate(c))
    for m in target.modules():
        if isinstance(m, Gate):
            nn.init.constant_(m.weight, 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pt"
        torch.save(source.state_dict(), path)
        load_pretrained(target, str(path), name)
        own = target.state_dict()
        assert all(torch.equal(v, own[k]) for k, v in source.state_dict().items())
        assert all((own[k] == 0.5).all() for k in own if ".amm." in k)
        state = source.state_dict()
        first = next(iter(state))
        for bad in ({**{k: v for k, v in state.items() if k != first}, first + "_renamed": state[first]},
                    {k: v for k, v in state.items() if k != first}):
            torch.save(bad, path)
            with pytest.raises(AmrsegError) as err:
                load_pretrained(build_backbone(name, WIDTH), str(path), name)
            assert "\n" not in str(err.value) and str(path) in str(err.value) and first in str(err.value)


@clause
def config_accepts_it(name: str) -> None:
    cfg = resolve("cam", {"model": {"backbone": name}}, checks=(check_registered,))
    assert cfg.model.backbone == name


test_contract = contract_test(CLAUSES, BACKBONES)


def test_an_unknown_backbone_lists_the_known_ones():
    with pytest.raises(AmrsegError) as err:
        build_backbone("vit_s16")
    assert "\n" not in str(err.value) and all(name in str(err.value) for name in BACKBONES)
    with pytest.raises(AmrsegError, match="model.backbone.*resnet18.*resnet101"):
        resolve("cam", {"model": {"backbone": "vit_s16"}}, checks=(check_registered,))


# --------------------------------------------------------------------------- a backbone that is not a ResNet


class PlainBlock(nn.Module):
    """3x3 conv + norm (+ hook) with a 1x1 projection shortcut."""

    def __init__(self, cin, cout, stride, dilation, norm_layer, amm):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.norm = norm_layer(cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False)
        if amm is not None:
            self.amm = amm

    def forward(self, x):
        out = self.norm(self.conv(x))
        if hasattr(self, "amm"):
            out = self.amm(out)
        return torch.relu(out + self.skip(x))


class PlainNet(nn.Module):
    """A patchify stem (4 x 4, stride 4) and one block per stage: the contract, and nothing of ResNet."""

    stem_names = ("patch", "patch_norm")
    imagenet_url = None

    def __init__(self, base_width=64, strides=(1, 2, 2, 1), norm_layer=nn.BatchNorm2d, block_amm=None,
                 dilations=(1, 1, 1, 1), first_dilations=None):
        super().__init__()
        self.base_width = self.stem_channels = base_width
        self.strides, self.dilations = tuple(strides), tuple(dilations)
        self.norm_layer = norm_layer
        self.patch = nn.Conv2d(3, base_width, 4, stride=4, bias=False)
        self.patch_norm = norm_layer(base_width)
        self.stage_channels = [base_width * 2 ** i for i in range(4)]
        self.blocks = nn.ModuleList()
        cin = base_width
        for i, (c, s, d) in enumerate(zip(self.stage_channels, strides, dilations)):
            self.blocks.append(PlainBlock(cin, c, s, d, norm_layer, None if block_amm is None else block_amm(c, i)))
            cin = c
        self.out_channels = cin
        self.output_stride = 4 * int(np.prod(strides))

    def stem(self, x):
        return torch.relu(self.patch_norm(self.patch(x)))

    def stages(self):
        return list(self.blocks)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages():
            x = stage(x)
        return x


@pytest.fixture
def plain(monkeypatch):
    """BACKBONES plus 'plain', as a copy: the registry itself is left as it is."""
    monkeypatch.setattr(backbones, "BACKBONES", {**BACKBONES, "plain": PlainNet})
    return "plain"


def test_a_registered_backbone_keeps_the_contract(plain):
    for check in CLAUSES:
        check(plain)


@pytest.mark.parametrize("preset", ["amr", "amr-block"])
def test_amrnet_and_make_cam_take_a_registered_backbone(plain, preset):
    cfg = merge(load_preset(preset), {"model": {"backbone": plain, "base_width": WIDTH, "pretrained": "none"}})
    cfg.model.validate()
    torch.manual_seed(0)
    model = AMRNet(cfg.model, cfg.amm, 3)
    assert isinstance(model.compensation.backbone, PlainNet) and model.output_stride == 16
    out = model.train()(_x())
    assert out["cam_c"].shape == (2, 3, 4, 4)
    (out["logits_s"].sum() + out["logits_c"].sum()).backward()
    assert all(p.grad is not None for p in model.compensation.parameters())  # the AMMs are on the path
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (36, 28, 3)).astype(np.uint8)
    (_, maps), = cams_for_images(model.eval(), [image], [torch.tensor([0, 2])], InferConfig(scales=[1.0, 0.5]))
    assert maps["fused"].shape == (2, 36, 28) and maps["fused"].flatten(1).amax(1).tolist() == [1.0, 1.0]
