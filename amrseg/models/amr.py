"""The AMR network (AMR.md section 1): a spotlight and a compensation CAM branch over one image.

Each branch is a ResNet plus a bias-free 1x1 conv classifier. The compensation branch carries
AMMs: after each stage (the paper) or inside every residual block (the release).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AMMConfig, Config, ModelConfig
from ..errors import AmrsegError, brief
from .amm import AMM
from .optim import sgd_groups
from .backbones import build_backbone
from .resnet import ResNet, key_list, load_pretrained

_SUFFIX = {"spotlight": "s", "compensation": "c"}


class CAMBranch(nn.Module):
    """Backbone (+ optional AMM after each stage) + classifier.

    Args:
        backbone: the ResNet.
        num_classes: K foreground classes.
        amms: 4 modules applied after layer1..4 (nn.Identity where a stage has none), or None.
    """

    def __init__(self, backbone: ResNet, num_classes: int, amms: Optional[nn.ModuleList] = None):
        super().__init__()
        self.backbone = backbone
        self.amms = amms
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map F (B x C_feat x h x w)."""
        x = self.backbone.stem(x)
        for i, layer in enumerate(self.backbone.stages()):
            x = layer(x)
            if self.amms is not None:
                x = self.amms[i](x)
        return x

    def head(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, K] = W applied to GAP(F), CAM [B, K, h, w] = ReLU(W F))."""
        logits = self.classifier(f.mean(dim=(2, 3), keepdim=True)).flatten(1)
        return logits, F.relu(self.classifier(f))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.features(x))


class AMRNet(nn.Module):
    """Spotlight branch + (optionally) compensation branch with AMMs.

    Args:
        model_cfg: backbone, BN, freezing and branch settings.
        amm_cfg: AMM placement and Gaussian settings.
        num_classes: K foreground classes (no background class in the classifiers).
    """

    def __init__(self, model_cfg: ModelConfig, amm_cfg: AMMConfig, num_classes: int):
        super().__init__()
        self._frozen: list[str] = []  # qualified module names kept frozen (see freeze)
        # The release detaches the logits of its frozen spotlight: its classification loss is dead and
        # W_s moves only through CPS (AMR.md section 4).
        self._detach_spotlight_logits = bool(model_cfg.freeze_spotlight_backbone)
        self._lr_groups = model_cfg.lr_groups
        # Fixed BN only makes sense on pretrained statistics; from scratch every BN must learn.
        fixed = model_cfg.fixed_bn and model_cfg.pretrained != "none"

        def backbone(block_amm=None) -> ResNet:
            return build_backbone(model_cfg.backbone, model_cfg.base_width, model_cfg.strides, fixed, block_amm)

        self.spotlight = CAMBranch(backbone(), num_classes)
        self.compensation: Optional[CAMBranch] = None
        if model_cfg.compensation:
            stages = set(amm_cfg.stages)
            if amm_cfg.placement == "stage":
                net = backbone()
                amms = nn.ModuleList(AMM(c, amm_cfg) if i + 1 in stages else nn.Identity()
                                     for i, c in enumerate(net.stage_channels))
                self.compensation = CAMBranch(net, num_classes, amms)
            elif amm_cfg.placement == "block":
                block_amm = lambda c, i: AMM(c, amm_cfg) if i + 1 in stages else None  # noqa: E731
                self.compensation = CAMBranch(backbone(block_amm), num_classes)
            else:
                raise AmrsegError(f"config key 'amm.placement': {amm_cfg.placement!r} is not one of stage, block")
        self.freeze(model_cfg)

    def branches(self) -> list[tuple[str, CAMBranch]]:
        """[(name, branch)] of the branches present, spotlight first."""
        out = [("spotlight", self.spotlight)]
        if self.compensation is not None:
            out.append(("compensation", self.compensation))
        return out

    @property
    def output_stride(self) -> int:
        """Input size / final feature map size (both branches share the strides)."""
        return self.spotlight.backbone.output_stride

    def branch_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'spotlight': F_s, 'compensation': F_c} (the latter only when present)."""
        return {name: branch.features(x) for name, branch in self.branches()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'logits_s', 'cam_s'} and, with the compensation branch, {'logits_c', 'cam_c'}.

        With a frozen spotlight backbone, 'logits_s' is detached (the release).
        """
        out = {}
        for name, branch in self.branches():
            logits, cam = branch(x)
            if name == "spotlight" and self._detach_spotlight_logits:
                logits = logits.detach()
            out[f"logits_{_SUFFIX[name]}"] = logits
            out[f"cam_{_SUFFIX[name]}"] = cam
        return out

    # ----------------------------------------------------------------------- freezing

    def freeze(self, model_cfg: ModelConfig) -> None:
        """Freezes what model_cfg asks for: no gradient; the backbone's own BN keeps its statistics.

        Idempotent, so it can be applied again after loading weights. A frozen layer1 freezes the
        parameters of the AMMs inside its blocks too, as the release's detach after layer1 does,
        but those AMMs follow the network's mode: in training their spatial-gate BN normalises with
        the batch, as in the release, whose frozen layer1 is only detached.
        """
        names = []
        if model_cfg.freeze_stem and model_cfg.pretrained != "none":
            for branch, module in self.branches():
                names += [f"{branch}.backbone.{n}" for n in module.backbone.stem_names]
        if model_cfg.freeze_spotlight_backbone:
            names.append("spotlight.backbone")
        if model_cfg.freeze_compensation:
            if self.compensation is None:
                raise AmrsegError("config key 'model.freeze_compensation': there is no compensation branch "
                                  "(model.compensation is false)")
            valid = [n for n, _ in self.compensation.backbone.named_children()]
            for n in model_cfg.freeze_compensation:
                if n not in valid:
                    raise AmrsegError(f"config key 'model.freeze_compensation': unknown module {n!r} "
                                      f"(valid: {', '.join(valid)})")
                names.append(f"compensation.backbone.{n}")
        for name in names:
            self.get_submodule(name).requires_grad_(False)
        self._frozen = sorted(set(self._frozen) | set(names))
        self._set_frozen_modes(self.training)

    def _set_frozen_modes(self, mode: bool) -> None:
        for name in self._frozen:  # the frozen backbone parts stay in eval mode, their AMMs follow `mode`
            module = self.get_submodule(name)
            module.eval()
            for m in module.modules():
                if isinstance(m, AMM):
                    m.train(mode)

    def train(self, mode: bool = True) -> "AMRNet":
        super().train(mode)
        self._set_frozen_modes(mode)
        return self

    def param_groups(self, lr: float, new_lr_mult: float, weight_decay: float) -> list[dict]:
        """SGD groups of the trainable parameters, per model.lr_groups.

        new: backbones at lr, new layers (AMMs, classifiers) at lr * new_lr_mult (AMR.md section 4).
        release: the compensation backbone with its AMMs at lr * new_lr_mult; the spotlight backbone
        and both classifiers at lr (the release's train_amr groups).
        """
        groups: dict[str, list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if self._lr_groups == "release":
                comp = name.startswith("compensation.") and not name.startswith("compensation.classifier.")
                key = "compensation" if comp else "base"
            else:
                key = "backbone" if ".backbone." in name and ".amm." not in name else "new"
            groups.setdefault(key, []).append(p)
        rates = {"backbone": lr, "new": lr * new_lr_mult, "base": lr, "compensation": lr * new_lr_mult}
        return sgd_groups([(k, groups[k], rates[k]) for k in ("backbone", "new", "base", "compensation") if k in groups],
                          weight_decay)


def read_run_weights(source: str, flag: str) -> dict:
    """The state dict of a trained run: RUN/model.pt, or a model.pt / checkpoint.pt file."""
    path = Path(source)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise AmrsegError(f"{flag}: no such file {path} (expected a `cam` run directory or its model.pt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AmrsegError(f"{flag}: cannot read {path} ({brief(e)})") from None
    # model.pt holds {'state_dict': ...}; a checkpoint.pt of the same run holds {'model': ...}.
    wrapped = [obj[k] for k in ("state_dict", "model") if isinstance(obj, dict) and isinstance(obj.get(k), dict)]
    if not wrapped:
        raise AmrsegError(f"{flag}: {path} holds no 'state_dict' of a trained run")
    return wrapped[0]


def load_prefixed(module: nn.Module, state: dict, prefix: str, flag: str) -> None:
    """Loads the entries `prefix`* of a run's state dict into `module`, strictly, with one-line errors."""
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = [k for k in own if k not in sub]
    unexpected = [k for k in sub if k not in own]
    what = prefix.split(".")[0]
    if missing or unexpected:
        parts = [f"missing {what} keys: {key_list(missing)}"] if missing else []
        parts += [f"unexpected {what} keys: {key_list(unexpected)}"] if unexpected else []
        raise AmrsegError(f"{flag}: the run does not fit this model's {prefix.rstrip('.')} ({'; '.join(parts)})")
    for key, value in sub.items():
        if not isinstance(value, torch.Tensor) or value.shape != own[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise AmrsegError(f"{flag}: {prefix}{key} has shape {shape}, the model expects {tuple(own[key].shape)}")
    module.load_state_dict(sub)


def load_backbone_weights(backbone: ResNet, pretrained: str, name: str) -> None:
    """Backbone weights: imagenet | PATH | URL | none, or a train-cam RUN directory (its spotlight backbone)."""
    if pretrained != "none" and "://" not in pretrained and Path(pretrained).is_dir():
        flag = f"--pretrained {pretrained}"
        load_prefixed(backbone, read_run_weights(pretrained, flag), "spotlight.backbone.", flag)
    else:
        load_pretrained(backbone, pretrained, name)


def build_model(cfg: Config, num_classes: int) -> AMRNet:
    """AMRNet of cfg, with pretrained backbones and the spotlight of --init-spotlight loaded."""
    model = AMRNet(cfg.model, cfg.amm, num_classes)
    if cfg.model.pretrained != "none":
        for _, branch in model.branches():
            load_pretrained(branch.backbone, cfg.model.pretrained, cfg.model.backbone)
    if cfg.model.init_spotlight:
        flag = f"--init-spotlight {cfg.model.init_spotlight}"
        load_prefixed(model.spotlight, read_run_weights(cfg.model.init_spotlight, flag), "spotlight.", flag)
    model.freeze(cfg.model)
    return model
