"""IRN (Ahn et al., CVPR 2019): class boundaries and instance displacements on frozen ResNet features.

AMR.md section 7. The backbone (stem /4, layer1 /4, layer2 /8, layer3 /16, layer4 /16 with the
default strides) is frozen: no gradient, always in eval mode, its features computed under
`torch.no_grad`. Two small branches read them:

- boundary: each of the five feature maps -> 1x1 conv to a narrow width, GroupNorm, bilinear
  upsampling by the exact factor to the stride-4 grid (x1, x1, x2, x4, x4), ReLU, cut to the grid;
  concatenated; 1x1 conv with bias to one logit per pixel. IRN's order: GroupNorm, upsample, ReLU.
- displacement: the same kind of heads, wider; the three deep ones fused at stride 8, upsampled x2
  to stride 4 and fused with the two shallow ones into a 2-channel field (dy, dx) in stride-4
  pixels (sign convention: models.losses.displacement_loss).

Both outputs lie on the stride-4 grid of ceil(H / 4) x ceil(W / 4) pixels (the stem's output),
which is also the grid of the IR labels (LabelTrainDataset with label_stride 4). At inference
(`infer_boundary`) the image is padded as IRN pads it: to the training crop (rounded up to the
output stride), so every upsampling factor is exact and the network sees what it was trained on:
an image with zeros to its right and below.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IRNModelConfig
from .amr import load_backbone_weights
from .optim import sgd_groups
from .backbones import build_backbone


def _head(cin: int, cout: int, groups: int, up: int = 1) -> nn.Sequential:
    """1x1 conv (no bias) -> GroupNorm -> bilinear x`up` (when > 1) -> ReLU; groups reduced to a divisor of cout.

    The upsampling sits between the norm and the ReLU, as in IRN; it has no parameters, so the
    state-dict keys are those of a head without it (0: conv, 1: GroupNorm).
    """
    layers = [nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(math.gcd(groups, cout), cout)]
    if up > 1:
        layers.append(nn.Upsample(scale_factor=up, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _dp_groups(ch: int) -> int:
    # IRN's displacement heads: GroupNorm(8, 64), (16, 128), (16, 256): one group per 8 channels, at most 16.
    return min(16, max(1, ch // 8))


def _cut(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The top-left `size` of an upsampled map (a stride-2 layer rounds up, so x2 may overshoot by one)."""
    return x[..., : size[0], : size[1]]


class IRN(nn.Module):
    """Frozen backbone + boundary branch + displacement branch.

    Args:
        cfg: backbone name, base width and strides (the weights are loaded by `build_irn`).

    Attributes:
        edge_width: channels of each boundary head (32 for ResNet-50 at base width 64).
    """

    def __init__(self, cfg: IRNModelConfig):
        super().__init__()
        self.backbone = build_backbone(cfg.backbone, cfg.base_width, cfg.strides, fixed_bn=cfg.fixed_bn)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        w = cfg.base_width
        in_ch = [self.backbone.stem_channels, *self.backbone.stage_channels]  # stem, layer1..4
        # Strides of the five feature maps (stem /4, IRN's layers /4 /8 /16 /16): powers of 2.
        stride = [4]
        for s in cfg.strides:
            stride.append(stride[-1] * int(s))
        self.edge_width = e = max(8, w // 2)
        self.edge_heads = nn.ModuleList(_head(c, e, 4, up=st // 4) for c, st in zip(in_ch, stride))
        self.edge_out = nn.Conv2d(len(in_ch) * e, 1, 1, bias=True)
        d = 4 * w  # 256 at base width 64, as IRN
        self.dp_shallow = nn.ModuleList([_head(in_ch[0], w, _dp_groups(w), up=stride[0] // 4),
                                         _head(in_ch[1], 2 * w, _dp_groups(2 * w), up=stride[1] // 4)])
        # The deep heads meet at layer2's stride (8), the fused map goes up to the grid.
        self.dp_deep = nn.ModuleList(_head(c, d, _dp_groups(d), up=st // stride[2])
                                     for c, st in zip(in_ch[2:], stride[2:]))
        self.dp_deep_fuse = _head(3 * d, d, _dp_groups(d), up=stride[2] // 4)
        self.dp_fuse = nn.Sequential(_head(w + 2 * w + d, d, _dp_groups(d)), nn.Conv2d(d, 2, 1, bias=True))

    def train(self, mode: bool = True) -> "IRN":
        super().train(mode)
        self.backbone.eval()  # frozen: BN statistics never move
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[stem, layer1, layer2, layer3, layer4] outputs of the frozen backbone (no gradient)."""
        with torch.no_grad():
            f = [self.backbone.stem(x)]
            for layer in self.backbone.stages():
                f.append(layer(f[-1]))
        return [t.detach() for t in f]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"boundary_logits": [B, h, w], "displacement": [B, 2, h, w]} on the stride-4 grid."""
        feats = self.features(x)
        size = tuple(feats[0].shape[-2:])
        edges = [_cut(head(f), size) for head, f in zip(self.edge_heads, feats)]
        logits = self.edge_out(torch.cat(edges, dim=1))[:, 0]
        mid = tuple(feats[2].shape[-2:])
        deep = self.dp_deep_fuse(torch.cat([_cut(h(f), mid) for h, f in zip(self.dp_deep, feats[2:])], dim=1))
        shallow = [_cut(h(f), size) for h, f in zip(self.dp_shallow, feats[:2])]
        disp = self.dp_fuse(torch.cat([*shallow, _cut(deep, size)], dim=1))
        return {"boundary_logits": logits, "displacement": disp}

    @torch.no_grad()
    def boundary(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h, w] class-boundary probabilities of a batch as it is (eval mode is the caller's business)."""
        return torch.sigmoid(self.forward(x)["boundary_logits"].float())

    def param_groups(self, lr: float, new_lr_mult: float, weight_decay: float) -> list[dict]:
        """SGD groups: the boundary branch at lr, the displacement branch at lr * new_lr_mult (IRN: 0.1, 1.0)."""
        edge = [*self.edge_heads.parameters(), *self.edge_out.parameters()]
        dp = [*self.dp_shallow.parameters(), *self.dp_deep.parameters(), *self.dp_deep_fuse.parameters(),
              *self.dp_fuse.parameters()]
        return sgd_groups([("edge", edge, lr), ("displacement", dp, lr * new_lr_mult)], weight_decay)


def inference_canvas(size: int, crop: int, multiple: int) -> int:
    """The side IRN pads an image side to at inference: the training crop, or the side if longer,
    rounded up to a multiple of the output stride."""
    return -(-max(int(size), int(crop)) // multiple) * multiple


@torch.no_grad()
def infer_boundary(model: IRN, image: torch.Tensor, crop: int) -> torch.Tensor:
    """IRN's boundary map of one image at inference: [ceil(H / 4), ceil(W / 4)] probabilities.

    The image and its horizontal flip, each padded with 0 to the right and below to
    `inference_canvas` (IRN pads to its crop, 512), go through the network in one batch; the
    logits are cut to the image's grid, the flip's flipped back, and the boundary is the sigmoid
    of their mean logit (IRN's EdgeDisplacement).

    Args:
        model: The IRN, in eval mode (the caller's business).
        image: [3, H, W] normalised image.
        crop: The crop the IRN was trained at (its run's data.crop).
    """
    height, width = image.shape[-2:]
    multiple = model.backbone.output_stride
    ch, cw = inference_canvas(height, crop, multiple), inference_canvas(width, crop, multiple)
    x = torch.stack([image, image.flip(-1)])
    x = F.pad(x, (0, cw - width, 0, ch - height))
    logits = model(x)["boundary_logits"].float()[:, : -(-height // 4), : -(-width // 4)]
    return torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2)


# --------------------------------------------------------------------------- weights


def build_irn(cfg: IRNModelConfig) -> IRN:
    """IRN of cfg with its backbone weights loaded (and frozen)."""
    model = IRN(cfg)
    load_backbone_weights(model.backbone, cfg.pretrained, cfg.backbone)
    return model
