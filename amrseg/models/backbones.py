"""The backbone contract, written once (Backbone), and the registry of backbones (BACKBONES).

A backbone is what every network of amrseg is built on: the CAM branches (models/amr.py), IRN and
DeepLab. They use it only through the attributes and methods that Backbone lists; ResNet
(models/resnet.py) is the reference implementation. A new backbone is a module that keeps this
contract (its own file) and one line in BACKBONES; `model.backbone` takes its choices from the dict,
and tests/test_backbones.py runs the contract over every entry.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from ..errors import AmrsegError
from .resnet import ResNet, norm_layer_of

BlockHook = Callable[[int, int], Optional[nn.Module]]


class Backbone(Protocol):
    """What a backbone provides.

    Built by its BACKBONES entry: builder(base_width=, strides=, norm_layer=, block_amm=, dilations=,
    first_dilations=) -> an nn.Module with:

    Layout:
        stem(x): [B, 3, H, W] -> [B, stem_channels, H / 4, W / 4] (the stride-4 features IRN reads).
        stages(): its 4 stage modules, run one after the other on the stem's output (AMRNet puts an
            AMM after each for amm.placement 'stage'); forward(x) is the stem and then the stages.
        stem_channels, stage_channels (4, what each stage produces), out_channels (the last's).
    Geometry:
        strides, dilations: per stage, as built (model.strides; DeepLab's dilated layouts);
            first_dilations, where given, is the dilation of each stage's first block.
        output_stride: input size / output size: 4 * the product of the strides.
    Norm:
        norm_layer: the constructor of every norm layer, from a channel count: nn.BatchNorm2d, or
            FixedBatchNorm2d for fixed BN (running statistics only; only on pretrained weights).
    Block hook:
        block_amm(channels, stage) -> module or None is called once per residual block with the
            block's output channels and its stage (0..3); the module it returns modulates the
            block's residual branch before the addition and is registered as `<block>.amm` (AMR's
            amm.placement 'block'); None leaves the block plain, with no extra keys.
    Weights:
        Its state_dict names, less those of the hook's modules (`amm.`), are the names of its
        pretrained weights: load_pretrained (resnet.py) loads a file, URL or `imagenet` into it
        strictly, and any other key set is a one-line AmrsegError naming the file.
        base_width: the width it was built at (64: the standard net, the one of its ImageNet weights).
        imagenet_url: the URL of its ImageNet weights at base width 64, or None.
        stem_names: the names of its child modules that make up the stem: model.freeze_stem freezes
            them (no gradient, their BN keeps its statistics) on pretrained weights.
    """

    stem_channels: int
    stage_channels: list[int]
    out_channels: int
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    output_stride: int
    norm_layer: Callable[[int], nn.Module]
    base_width: int
    imagenet_url: Optional[str]
    stem_names: tuple[str, ...]

    def stem(self, x: torch.Tensor) -> torch.Tensor: ...

    def stages(self) -> list[nn.Module]: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


# name -> builder (keyword arguments as in Backbone's docstring)
BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet18": partial(ResNet, 18),
    "resnet34": partial(ResNet, 34),
    "resnet50": partial(ResNet, 50),
    "resnet101": partial(ResNet, 101),
}


def build_backbone(name: str, base_width: int = 64, strides: Sequence[int] = (1, 2, 2, 1), fixed_bn: bool = False,
                   block_amm: Optional[BlockHook] = None, dilations: Sequence[int] = (1, 1, 1, 1),
                   first_dilations: Optional[Sequence[int]] = None) -> Backbone:
    """The backbone `name` of BACKBONES; fixed_bn selects FixedBatchNorm2d for every norm layer.

    Raises:
        AmrsegError: an unknown name (one line listing the known ones), or settings it cannot build.
    """
    try:
        builder = BACKBONES[name]
    except (KeyError, TypeError):
        raise AmrsegError(f"backbone {name!r}: unknown (valid: {', '.join(BACKBONES)})") from None
    return builder(base_width=base_width, strides=strides, norm_layer=norm_layer_of(fixed_bn), block_amm=block_amm,
                   dilations=dilations, first_dilations=first_dilations)
