"""ResNet backbone with torchvision's module and parameter names, and its weight loader.

Our own implementation (torchvision is not a dependency), laid out so that torchvision's ImageNet
checkpoints load strictly: same module tree, same parameter and buffer names, no `fc` layer.
Knobs torchvision lacks: per-stage strides *without* dilation (AMR.md section 1: layer4 stride 1
gives output stride 16), per-stage dilations (DeepLab-v2: layer3 and layer4 at stride 1 with
dilation 2 and 4, output stride 8), and an optional AMM hook inside every residual block (the
authors' release placement).
"""
from __future__ import annotations

import inspect
import pickle
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AmrsegError, brief

IMAGENET_URLS = {
    # The V1 weights that WSSS repositories (IRN, AMR) were trained from.
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-19c8e357.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}


class FixedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics and never updates them.

    The affine weight and bias still train. With batches of a few images per GPU, batch
    statistics are noisy; pretrained ImageNet statistics are the better estimate (IRN, AMR).
    Parameter and buffer names are BatchNorm2d's, so checkpoints load strictly either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); `amm` modulates the residual branch before the addition."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, amm: Optional[nn.Module] = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        if amm is not None:  # only registered when given: a plain block has no extra keys
            self.amm = amm
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if hasattr(self, "amm"):
            out = self.amm(out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, torchvision v1.5) -> 1x1 x4; `amm` after bn3, before the addition."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, amm: Optional[nn.Module] = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        if amm is not None:
            self.amm = amm
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if hasattr(self, "amm"):
            out = self.amm(out)
        return self.relu(out + identity)


_DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
           50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}


class ResNet(nn.Module):
    """ResNet-18/34/50/101 feature extractor (no fc), torchvision names.

    Args:
        depth: 18, 34, 50 or 101.
        base_width: stem width; stage widths are base_width * (1, 2, 4, 8) (x4 for bottlenecks).
        strides: strides of layer1..4; stride 1 alone never means dilation.
        norm_layer: builds the norm layer from a channel count (FixedBatchNorm2d for fixed BN).
        block_amm: when given, builds the AMM of each residual block from its output channels and
            stage index (0..3); it may return None to leave a stage's blocks plain.
        dilations: dilation of the 3x3 convs of layer1..4 (DeepLab: 1, 1, 2, 4 with strides 1, 2, 1, 1).
        first_dilations: dilation of the first block of each of layer1..4; None = `dilations` (every
            block of a layer alike: DeepLab-v2's Caffe model and the kazuto1011 port). torchvision's
            replace_stride_with_dilation gives the first block the previous layer's dilation
            (1, 1, 1, 2 for the DeepLab layout above).

    Attributes (the backbone contract, models/backbones.py):
        stem_channels: those of the stem (base_width). stage_channels: output channels of layer1..4.
        out_channels: those of layer4. strides, dilations: of layer1..4, as built.
        output_stride: input size / feature size. norm_layer: as given.
        imagenet_url: torchvision's V1 weights of this depth (they need base width 64).
        stem_names: conv1, bn1: what model.freeze_stem freezes.
    """

    stem_names = ("conv1", "bn1")

    def __init__(self, depth: int, base_width: int = 64, strides: Sequence[int] = (1, 2, 2, 1),
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 block_amm: Optional[Callable[[int, int], Optional[nn.Module]]] = None,
                 dilations: Sequence[int] = (1, 1, 1, 1), first_dilations: Optional[Sequence[int]] = None):
        super().__init__()
        if depth not in _DEPTHS:
            raise AmrsegError(f"ResNet depth {depth}: not one of {', '.join(map(str, _DEPTHS))}")
        if len(strides) != 4:
            raise AmrsegError(f"ResNet strides {list(strides)}: expected 4 (layer1..4)")
        if len(dilations) != 4 or any(int(d) < 1 for d in dilations):
            raise AmrsegError(f"ResNet dilations {list(dilations)}: expected 4 positive values (layer1..4)")
        first_dilations = dilations if first_dilations is None else first_dilations
        if len(first_dilations) != 4 or any(int(d) < 1 for d in first_dilations):
            raise AmrsegError(f"ResNet first-block dilations {list(first_dilations)}: expected 4 positive values")
        block, counts = _DEPTHS[depth]
        self.depth, self.base_width = depth, base_width
        self.strides, self.dilations = tuple(int(s) for s in strides), tuple(int(d) for d in dilations)
        self.norm_layer, self.stem_channels = norm_layer, base_width
        self.imagenet_url = IMAGENET_URLS.get(f"resnet{depth}")
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = base_width
        self.stage_channels = []
        for i, (n, stride, dilation, first) in enumerate(zip(counts, strides, dilations, first_dilations)):
            planes = base_width * 2 ** i
            amm = None if block_amm is None else (lambda c, i=i: block_amm(c, i))
            layer = self._make_layer(block, inplanes, planes, n, int(stride), norm_layer, amm, int(dilation),
                                     int(first))
            setattr(self, f"layer{i + 1}", layer)
            inplanes = planes * block.expansion
            self.stage_channels.append(inplanes)
        self.out_channels = self.stage_channels[-1]
        self.output_stride = 4 * int(torch.tensor([int(s) for s in strides]).prod())
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_layer(block, inplanes: int, planes: int, n: int, stride: int, norm_layer,
                    block_amm, dilation: int = 1, first_dilation: Optional[int] = None) -> nn.Sequential:
        out = planes * block.expansion
        downsample = None
        if stride != 1 or inplanes != out:
            downsample = nn.Sequential(_conv1x1(inplanes, out, stride), norm_layer(out))
        layers = []
        for j in range(n):
            amm = block_amm(out) if block_amm is not None else None
            if j == 0:
                first = dilation if first_dilation is None else first_dilation
                layers.append(block(inplanes, planes, stride, downsample, norm_layer, amm, first))
            else:
                layers.append(block(out, planes, 1, None, norm_layer, amm, dilation))
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> bn1 -> relu -> maxpool (stride 4)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stages(self) -> list[nn.Module]:
        """layer1..4, for callers that run (and modulate) stage by stage."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.stages():
            x = layer(x)
        return x


def build_resnet(name: str, base_width: int = 64, strides: Sequence[int] = (1, 2, 2, 1),
                 fixed_bn: bool = False, block_amm: Optional[Callable[[int, int], Optional[nn.Module]]] = None,
                 dilations: Sequence[int] = (1, 1, 1, 1), first_dilations: Optional[Sequence[int]] = None) -> ResNet:
    """Builds `name` (resnet18/34/50/101); fixed_bn selects FixedBatchNorm2d for every backbone BN."""
    names = {f"resnet{d}": d for d in _DEPTHS}
    if name not in names:
        raise AmrsegError(f"backbone {name!r}: unknown (valid: {', '.join(names)})")
    return ResNet(names[name], base_width, strides, norm_layer_of(fixed_bn), block_amm, dilations, first_dilations)


def norm_layer_of(fixed_bn: bool) -> Callable[[int], nn.Module]:
    """FixedBatchNorm2d for fixed BN, else nn.BatchNorm2d."""
    return FixedBatchNorm2d if fixed_bn else nn.BatchNorm2d


# --------------------------------------------------------------------------- weights


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _not_weights(path: Path) -> Optional[str]:
    """Why a file torch.load refused is not a weights file, when its first bytes say so; else None.

    torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (0x80 ..).
    """
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x80")):
        return None
    if not head:
        return "an empty file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "not a PyTorch file"


def _pickled_object(err: BaseException) -> Optional[str]:
    """The class a weights-only load refused (e.g. a whole model saved with torch.save(model)), if named."""
    if not isinstance(err, pickle.UnpicklingError):
        return None
    found = re.search(r"GLOBAL ([\w.]+)", _ANSI.sub("", str(err)))
    return found.group(1) if found else "a Python object"


def _download(url: str, flag: str) -> dict:
    kwargs = {"map_location": "cpu"}
    if "weights_only" in inspect.signature(torch.hub.load_state_dict_from_url).parameters:
        kwargs["weights_only"] = True
    try:
        return torch.hub.load_state_dict_from_url(url, **kwargs)
    except Exception as e:  # network, HTTP, hash or unpickling errors: all mean "get it yourself"
        raise AmrsegError(f"--pretrained {flag}: cannot download {url} ({brief(e)}); "
                          f"download it yourself and pass --pretrained PATH") from None


def _read_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise AmrsegError(f"--pretrained {path}: no such file (expected imagenet, none, a URL or a weights file)")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        what = _not_weights(p)
        if what:
            raise AmrsegError(f"--pretrained {path}: not a weights file ({what}); expected a state dict saved "
                              f"with torch.save(model.state_dict(), PATH)") from None
        obj = _pickled_object(e)
        if obj:
            raise AmrsegError(f"--pretrained {path}: holds a pickled {obj} (a whole model saved with "
                              f"torch.save(model)?), not a plain state dict; save model.state_dict() instead") from None
        raise AmrsegError(f"--pretrained {path}: cannot read weights ({brief(e)})") from None


def _clean_state_dict(obj, where: str) -> dict[str, torch.Tensor]:
    """Unwraps {'state_dict'|'model': ...}, strips 'module.' (DataParallel), drops fc.*."""
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AmrsegError(f"--pretrained {where}: not a state dict of tensors")
    out = {}
    for key, value in obj.items():
        key = str(key)
        key = key[len("module."):] if key.startswith("module.") else key
        if not key.startswith("fc."):
            out[key] = value
    return out


def key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:8])
    return shown + (f" ... and {len(keys) - 8} more" if len(keys) > 8 else "")


def load_pretrained(model: ResNet, source: str, depth_name: str) -> None:
    """Loads torchvision-named weights into `model` (AMM parameters are left as initialised).

    Args:
        model: the backbone.
        source: 'imagenet' (torchvision's V1 weights of `depth_name`), an http(s) URL, or a
            local file; 'none' does nothing.
        depth_name: the backbone's name (resnet18/34/50/101), for the errors; 'imagenet' is the
            backbone's own imagenet_url.

    Raises:
        AmrsegError: one line naming the file (or URL) when it cannot be had or does not fit.
    """
    if source == "none":
        return
    if source == "imagenet":
        if model.base_width != 64:
            raise AmrsegError(f"--pretrained imagenet: needs base width 64 (got {model.base_width}); "
                              f"pass --pretrained PATH or none")
        if not getattr(model, "imagenet_url", None):
            raise AmrsegError(f"--pretrained imagenet: no ImageNet weights for {depth_name!r}")
        raw = _download(model.imagenet_url, source)
    elif source.startswith(("http://", "https://")):
        raw = _download(source, source)
    else:
        raw = _read_file(source)
    where = source
    state = _clean_state_dict(raw, where)

    own = model.state_dict()
    expected = [k for k in own if "amm." not in k]
    # Checkpoints saved before PyTorch 0.4.1 (resnet50-19c8e357) have no num_batches_tracked;
    # BatchNorm fills those in itself, so they are optional here.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own or "amm." in k]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {key_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {key_list(unexpected)}")
        raise AmrsegError(f"--pretrained {where}: weights do not fit {depth_name} with base width "
                          f"{model.base_width} ({'; '.join(parts)})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise AmrsegError(f"--pretrained {where}: {key} has shape {tuple(value.shape)} in the file, "
                              f"the model expects {tuple(own[key].shape)}")
    # Non-strict only for what the checks above allow: AMM parameters and num_batches_tracked.
    model.load_state_dict(state, strict=False)
