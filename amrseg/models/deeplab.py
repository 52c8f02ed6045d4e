"""DeepLab-v2 (Chen et al., TPAMI 2018): a dilated ResNet and ASPP, the segmentation net of AMR.md section 7.

ASPP as in v2: four parallel 3x3 convolutions with dilations 6, 12, 18, 24 straight to the class
scores, summed (no image pooling branch, no batch norm: that is v3). The backbone keeps
torchvision's names, so ImageNet checkpoints load strictly.

Dilated layers (`model.dilation_style`): "deeplab" (default) dilates every block of layer3 (2) and
layer4 (4), the first one too, as DeepLab-v2's Caffe model (res4a/res5a) and the kazuto1011
PyTorch port do; "torchvision" gives each layer's first block the previous layer's dilation (layer3
block 0: 1, layer4 block 0: 2), as torchvision's replace_stride_with_dilation. Same weights, other
receptive fields; a checkpoint trained under one is not the other's model.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import SegModelConfig
from ..errors import AmrsegError
from .amr import load_backbone_weights
from .optim import sgd_groups
from .backbones import build_backbone

# output stride -> (strides, dilations) of layer1..4; the stem is /4.
_LAYOUTS = {8: ((1, 2, 1, 1), (1, 1, 2, 4)), 16: ((1, 2, 2, 1), (1, 1, 1, 2))}
DILATION_STYLES = ("deeplab", "torchvision")


def first_block_dilations(dilations: Sequence[int], style: str) -> tuple[int, ...]:
    """Dilation of the first block of layer1..4 under a dilation style (see the module docstring)."""
    if style not in DILATION_STYLES:
        raise AmrsegError(f"config key 'model.dilation_style': {style!r} is not one of {', '.join(DILATION_STYLES)}")
    if style == "deeplab":
        return tuple(dilations)
    return (1, *dilations[:-1])


class ASPP(nn.Module):
    """Sum of parallel dilated 3x3 convs, each from the features straight to the class scores."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int]):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True)
                                   for r in rates)
        for conv in self.convs:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.convs)


class DeepLabV2(nn.Module):
    """Dilated ResNet + ASPP; forward gives class scores [B, C, h, w] at the output stride.

    Args:
        cfg: backbone, base width, fixed BN, output stride (8 or 16), ASPP rates.
        num_classes: C, background included.
    """

    def __init__(self, cfg: SegModelConfig, num_classes: int):
        super().__init__()
        if cfg.output_stride not in _LAYOUTS:
            raise AmrsegError(f"config key 'model.output_stride': {cfg.output_stride} is not one of 8, 16")
        strides, dilations = _LAYOUTS[cfg.output_stride]
        fixed = cfg.fixed_bn and cfg.pretrained != "none"
        self.backbone = build_backbone(cfg.backbone, cfg.base_width, strides, fixed, dilations=dilations,
                                       first_dilations=first_block_dilations(dilations, cfg.dilation_style))
        self.aspp = ASPP(self.backbone.out_channels, num_classes, cfg.aspp_rates)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aspp(self.backbone(x))

    def param_groups(self, lr: float, new_lr_mult: float, weight_decay: float) -> list[dict]:
        """Backbone at lr, the new ASPP layers at lr * new_lr_mult (DeepLab: 10x)."""
        return sgd_groups([("backbone", self.backbone.parameters(), lr),
                           ("aspp", self.aspp.parameters(), lr * new_lr_mult)], weight_decay)


def build_deeplab(cfg: SegModelConfig, num_classes: int, load_weights: bool = True) -> DeepLabV2:
    """DeepLabV2 of cfg; with load_weights, the backbone gets cfg.pretrained (imagenet, file, URL, cam RUN)."""
    model = DeepLabV2(cfg, num_classes)
    if load_weights:
        load_backbone_weights(model.backbone, cfg.pretrained, cfg.backbone)
    return model
