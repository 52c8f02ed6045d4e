"""ResNet backbone: torchvision names and shapes, strides, fixed BN, weight loading."""
import urllib.error

import pytest
import torch
from torch import nn

from amrseg.config import AMMConfig
from amrseg.errors import AmrsegError
from amrseg.models import resnet as resnet_mod
from amrseg.models.amm import AMM
from amrseg.models.resnet import FixedBatchNorm2d, build_resnet, load_pretrained

COUNTS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def torchvision_layout(depth: int, width: int = 64) -> list[tuple[str, tuple]]:
    """(name, shape) of torchvision's resnet state dict without fc, from the architecture rules."""
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    out = []

    def conv(name, cout, cin, k):
        out.append((f"{name}.weight", (cout, cin, k, k)))

    def bn(name, c):
        for buf in ("weight", "bias", "running_mean", "running_var"):
            out.append((f"{name}.{buf}", (c,)))
        out.append((f"{name}.num_batches_tracked", ()))

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    inplanes = width
    for stage, blocks in enumerate(COUNTS[depth]):
        planes = width * 2 ** stage
        for b in range(blocks):
            p = f"layer{stage + 1}.{b}"
            if bottleneck:
                conv(f"{p}.conv1", planes, inplanes, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1)
                bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
            # torchvision: a projection shortcut where the first block changes stride or width.
            if b == 0 and (stage > 0 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    return out


def layout_of(model: nn.Module) -> list[tuple[str, tuple]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("depth", [18, 50])
def test_state_dict_matches_torchvision(depth):
    model = build_resnet(f"resnet{depth}")
    assert layout_of(model) == torchvision_layout(depth)
    # torchvision's published parameter counts minus the 1000-way fc (512/2048 * 1000 + 1000).
    n = sum(p.numel() for p in model.parameters())
    assert n == {18: 11_689_512 - 513_000, 50: 25_557_032 - 2_049_000}[depth]
    assert model.stage_channels == ([64, 128, 256, 512] if depth == 18 else [256, 512, 1024, 2048])
    assert model.out_channels == model.stage_channels[-1]


def test_base_width_halves_every_width():
    model = build_resnet("resnet50", base_width=32)
    assert layout_of(model) == torchvision_layout(50, width=32)
    assert model.stage_channels == [128, 256, 512, 1024]


def test_output_stride_without_dilation():
    x = torch.randn(1, 3, 64, 64)
    model = build_resnet("resnet18", base_width=8).eval()
    assert model.output_stride == 16
    assert model(x).shape == (1, 64, 4, 4)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.dilation == (1, 1)
    assert model.layer4[0].conv1.stride == (1, 1) and model.layer4[0].downsample[0].stride == (1, 1)

    model32 = build_resnet("resnet50", base_width=8, strides=(1, 2, 2, 2)).eval()
    assert model32.output_stride == 32
    assert model32(x).shape == (1, 256, 2, 2)
    assert model32.layer4[0].conv2.stride == (2, 2) and model32.layer4[0].conv1.stride == (1, 1)
    # Stage-by-stage equals forward.
    y = model32.stem(x)
    for layer in (model32.layer1, model32.layer2, model32.layer3, model32.layer4):
        y = layer(y)
    torch.testing.assert_close(y, model32(x))


def test_init_and_unknown_name():
    model = build_resnet("resnet18", base_width=8)
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)
    w = build_resnet("resnet50").layer3[0].conv2.weight  # fan_out = 256 * 9: std sqrt(2 / 2304)
    assert abs(w.std().item() - (2 / 2304) ** 0.5) < 0.002
    with pytest.raises(AmrsegError, match="resnet18, resnet34, resnet50, resnet101"):
        build_resnet("resnet152")


def test_fixed_batchnorm():
    bn = FixedBatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, 3.0]))
    x = torch.randn(4, 3, 5, 5)
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    y_train = bn.train()(x)
    assert torch.equal(bn.running_mean, mean0) and torch.equal(bn.running_var, var0)
    assert bn.num_batches_tracked.item() == 0
    y_eval = bn.eval()(x)
    torch.testing.assert_close(y_train, y_eval)
    c = lambda t: t[None, :, None, None]
    by_hand = (x - c(mean0)) / torch.sqrt(c(var0) + bn.eps) * c(bn.weight.detach()) + c(bn.bias.detach())
    torch.testing.assert_close(y_train, by_hand)
    bn.train()(x).sum().backward()
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    assert set(dict(bn.state_dict())) == set(dict(nn.BatchNorm2d(3).state_dict()))
    fixed = build_resnet("resnet18", base_width=8, fixed_bn=True)
    assert isinstance(fixed.layer2[0].downsample[1], FixedBatchNorm2d)
    assert layout_of(fixed) == layout_of(build_resnet("resnet18", base_width=8))


def test_block_amm_hook():
    cfg = AMMConfig()
    model = build_resnet("resnet18", base_width=8, block_amm=lambda c, i: AMM(c, cfg))
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    assert [b.amm.channel.mlp[0].in_features for b in blocks] == [8, 8, 16, 16, 32, 32, 64, 64]
    assert not hasattr(build_resnet("resnet18", base_width=8).layer1[0], "amm")
    big = build_resnet("resnet50", base_width=8, block_amm=lambda c, i: AMM(c, cfg))
    assert big.layer3[2].amm.channel.mlp[2].out_features == 128
    # The AMM sees the residual branch after bn3, before the shortcut addition.
    block = big.layer1[1].eval()
    seen = {}
    block.amm.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    x = torch.randn(2, 32, 8, 8)
    y = block(x)
    bn3 = block.bn3(block.conv3(block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))))))
    torch.testing.assert_close(seen["inp"], bn3)
    torch.testing.assert_close(y, torch.relu(seen["out"] + x))


# --------------------------------------------------------------------------- load_pretrained


def synthetic_checkpoint(depth=18, width=64):
    """A torchvision-named state dict with random values, plus the fc layer torchvision has."""
    gen = torch.Generator().manual_seed(1)
    sd = {}
    for name, shape in torchvision_layout(depth, width):
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(7)
        else:
            sd[name] = torch.rand(shape, generator=gen) + 0.1
    feat = 512 * width // 64 if depth < 50 else 2048 * width // 64
    sd["fc.weight"] = torch.randn(1000, feat, generator=gen)
    sd["fc.bias"] = torch.randn(1000, generator=gen)
    return sd


@pytest.fixture(scope="module")
def ckpt():
    return synthetic_checkpoint()


def test_load_pretrained_copies_values(tmp_path, ckpt):
    path = tmp_path / "r18.pth"
    torch.save(ckpt, path)
    model = build_resnet("resnet18")
    load_pretrained(model, str(path), "resnet18")
    own = model.state_dict()
    assert set(own) == set(ckpt) - {"fc.weight", "fc.bias"}
    for k, v in own.items():
        assert torch.equal(v, ckpt[k]), k


def test_load_pretrained_wrapped_and_prefixed(tmp_path, ckpt):
    path = tmp_path / "wrapped.pth"
    # DataParallel names, inside {'state_dict': ...}, and no num_batches_tracked (pre-0.4.1 files).
    torch.save({"state_dict": {"module." + k: v for k, v in ckpt.items() if "num_batches" not in k}}, path)
    model = build_resnet("resnet18", fixed_bn=True)
    load_pretrained(model, str(path), "resnet18")
    assert torch.equal(model.layer3[1].bn2.running_var, ckpt["layer3.1.bn2.running_var"])


def test_load_pretrained_renamed_key(tmp_path, ckpt):
    bad = dict(ckpt)
    bad["layer2.0.convX.weight"] = bad.pop("layer2.0.conv1.weight")
    path = tmp_path / "renamed.pth"
    torch.save(bad, path)
    with pytest.raises(AmrsegError) as err:
        load_pretrained(build_resnet("resnet18"), str(path), "resnet18")
    msg = str(err.value)
    assert str(path) in msg and "layer2.0.conv1.weight" in msg and "layer2.0.convX.weight" in msg
    assert "\n" not in msg


def test_load_pretrained_many_missing_keys_is_one_line(tmp_path, ckpt):
    path = tmp_path / "half.pth"
    torch.save({k: v for k, v in ckpt.items() if not k.startswith("layer4")}, path)
    with pytest.raises(AmrsegError, match=r"\.\.\. and \d+ more") as err:
        load_pretrained(build_resnet("resnet18"), str(path), "resnet18")
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_load_pretrained_wrong_shape(tmp_path, ckpt):
    bad = dict(ckpt, **{"layer1.0.conv2.weight": torch.zeros(64, 64, 1, 1)})
    path = tmp_path / "shape.pth"
    torch.save(bad, path)
    with pytest.raises(AmrsegError) as err:
        load_pretrained(build_resnet("resnet18"), str(path), "resnet18")
    msg = str(err.value)
    assert "layer1.0.conv2.weight" in msg and "(64, 64, 1, 1)" in msg and "(64, 64, 3, 3)" in msg
    assert str(path) in msg


def test_load_pretrained_into_block_amm_model(tmp_path, ckpt):
    path = tmp_path / "r18.pth"
    torch.save(ckpt, path)
    model = build_resnet("resnet18", block_amm=lambda c, i: AMM(c, AMMConfig()))
    amm_before = model.layer2[1].amm.channel.mlp[0].weight.clone()
    load_pretrained(model, str(path), "resnet18")
    assert torch.equal(model.layer2[1].conv2.weight, ckpt["layer2.1.conv2.weight"])
    assert torch.equal(model.layer2[1].amm.channel.mlp[0].weight, amm_before)


def test_load_pretrained_bad_files(tmp_path):
    model = build_resnet("resnet18", base_width=8)
    missing = tmp_path / "nope.pth"
    with pytest.raises(AmrsegError, match="nope.pth"):
        load_pretrained(model, str(missing), "resnet18")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(AmrsegError, match="garbage.pth"):
        load_pretrained(model, str(garbage), "resnet18")
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(AmrsegError, match="tensor.pth.*not a state dict"):
        load_pretrained(model, str(tensor), "resnet18")
    with pytest.raises(AmrsegError, match="--pretrained imagenet.*base width 64"):
        load_pretrained(model, "imagenet", "resnet18")


def test_load_pretrained_url(monkeypatch, ckpt):
    calls = []

    def fake(url, model_dir=None, map_location=None, progress=True, weights_only=False):
        calls.append((url, dict(map_location=map_location, weights_only=weights_only)))
        return ckpt

    def old_torch(url, model_dir=None, map_location=None, progress=True):  # no weights_only yet
        calls.append((url, dict(map_location=map_location)))
        return ckpt

    monkeypatch.setattr(resnet_mod.torch.hub, "load_state_dict_from_url", fake)
    model = build_resnet("resnet18")
    load_pretrained(model, "imagenet", "resnet18")
    assert calls[0][0] == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert calls[0][1]["map_location"] == "cpu" and calls[0][1]["weights_only"] is True
    assert torch.equal(model.conv1.weight, ckpt["conv1.weight"])
    monkeypatch.setattr(resnet_mod.torch.hub, "load_state_dict_from_url", old_torch)
    load_pretrained(model, "https://example.invalid/r18.pth", "resnet18")
    assert calls[1] == ("https://example.invalid/r18.pth", {"map_location": "cpu"})

    def offline(url, map_location=None, weights_only=False):
        raise urllib.error.URLError("no route\nto host")

    monkeypatch.setattr(resnet_mod.torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(AmrsegError, match="download it yourself and pass --pretrained PATH") as err:
        load_pretrained(model, "https://example.invalid/w.pth", "resnet18")
    assert "https://example.invalid/w.pth" in str(err.value) and "\n" not in str(err.value)


def test_dilation_keeps_keys_and_sets_output_stride():
    plain = build_resnet("resnet50", base_width=8).eval()
    deeplab = build_resnet("resnet50", base_width=8, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)).eval()
    deeplab.load_state_dict(plain.state_dict(), strict=True)  # same names: ImageNet weights load
    assert deeplab.output_stride == 8
    x = torch.randn(1, 3, 64, 64)
    assert deeplab(x).shape[-2:] == (8, 8)
    conv = deeplab.layer4[1].conv2
    assert conv.dilation == (4, 4) and conv.padding == (4, 4)
    # A dilated 3x3 conv sees taps 4 pixels apart: a single impulse spreads to them only.
    probe = torch.zeros(1, conv.in_channels, 17, 17)
    probe[0, :, 8, 8] = 1
    with torch.no_grad():
        hit = conv(probe).abs().sum(dim=(0, 1)) > 0
    assert {(int(r), int(c)) for r, c in torch.nonzero(hit)} == {(r, c) for r in (4, 8, 12) for c in (4, 8, 12)}
    with pytest.raises(AmrsegError, match="dilations"):
        build_resnet("resnet18", dilations=(1, 1, 0, 1))


def test_block_amm_hook_per_stage():
    cfg = AMMConfig()
    model = build_resnet("resnet18", base_width=8, block_amm=lambda c, i: AMM(c, cfg) if i >= 2 else None)
    assert not hasattr(model.layer2[1], "amm") and hasattr(model.layer3[0], "amm") and hasattr(model.layer4[1], "amm")
