"""The kinds of training run, and the one loader of a run directory.

A run directory (RUN/) is what train-cam, train-irn or train-seg writes: config.yaml (the resolved
config, with its `kind`), checkpoint.pt, model.pt and log.csv. `RUN_KINDS` maps each kind to
its pieces, so that the training stage and `load_run` name no network themselves.

The contract of a run kind (`RunKind`), written once here:
- `config`: the run's config dataclass (config.py); its `kind` field is the registry key.
- `dataset(cfg, data)`: the training dataset over an opened split (items: image batch first).
- `build(cfg, num_classes, load_weights)`: the network, with its pretrained weights when
  `load_weights` (a resumed or a loaded run gets its weights from the run's files).
- `losses(cfg)`: (net, batch) -> {"total": scalar, other named scalars}.
- `log_keys`: the loss names logged besides the total, in column order.
- `needs_image_labels`: whether training reads the image-level labels (cam) or a folder of masks.
- `param_groups`: the network's own `param_groups(lr, new_lr_mult, weight_decay)`.
Adding a kind is one entry here and its config class.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .config import Config, IRNConfig, SegConfig, check_choice, merge, read_yaml
from .data.transforms import CamTrainDataset, LabelTrainDataset
from .data.voc import SegData
from .errors import AmrsegError
from .fileio import load_torch

LABEL_STRIDE = 4  # IRN reads its IR labels on the model's stride-4 grid


@dataclass(frozen=True)
class RunKind:
    name: str
    command: str
    config: type
    dataset: Callable[[Any, SegData], Any]
    build: Callable[[Any, int, bool], torch.nn.Module]
    losses: Callable[[Any], Callable]
    log_keys: tuple = ()
    needs_image_labels: bool = False


# ------------------------------------------------------------------------------------------ cam


def _cam_build(cfg, num_classes: int, load_weights: bool) -> torch.nn.Module:
    from .models.amr import AMRNet, build_model

    if load_weights:
        return build_model(cfg, num_classes)
    model = AMRNet(cfg.model, cfg.amm, num_classes)
    model.freeze(cfg.model)
    return model


def _cam_losses(cfg) -> Callable:
    from .models.losses import amr_loss

    def losses(net, batch):
        images, labels, _ = batch
        outputs = net(images)
        return amr_loss({k: v.float() for k, v in outputs.items()}, labels, cfg.loss)

    return losses


# ------------------------------------------------------------------------------------------ irn


def _irn_build(cfg, num_classes: int, load_weights: bool) -> torch.nn.Module:
    from .models.irn import IRN, build_irn

    return build_irn(cfg.model) if load_weights else IRN(cfg.model)


def _irn_losses(cfg) -> Callable:
    from .models.losses import irn_loss

    radius = cfg.model.radius

    def losses(net, batch):
        images, labels, _ = batch
        return irn_loss(net(images), labels, radius)

    return losses


# ------------------------------------------------------------------------------------------ seg


def _seg_build(cfg, num_classes: int, load_weights: bool) -> torch.nn.Module:
    from .models.deeplab import build_deeplab

    return build_deeplab(cfg.model, num_classes + 1, load_weights=load_weights)


def _seg_losses(cfg) -> Callable:
    from .models.losses import segmentation_loss

    def losses(net, batch):
        images, labels, _ = batch
        return {"total": segmentation_loss(net(images), labels)}

    return losses


RUN_KINDS: dict[str, RunKind] = {
    "cam": RunKind("cam", "train-cam", Config,
                   dataset=lambda cfg, data: CamTrainDataset(data, cfg.data, seed=cfg.train.seed),
                   build=_cam_build, losses=_cam_losses, log_keys=("cls", "cls_s", "cls_c", "cps", "area"),
                   needs_image_labels=True),
    "irn": RunKind("irn", "train-irn", IRNConfig,
                   dataset=lambda cfg, data: LabelTrainDataset(data, Path(cfg.ir_labels), cfg.data,
                                                               seed=cfg.train.seed, label_stride=LABEL_STRIDE,
                                                               flag="--ir-labels"),
                   build=_irn_build, losses=_irn_losses, log_keys=("pos_bg", "pos_fg", "neg", "dp_fg", "dp_bg")),
    "seg": RunKind("seg", "train-seg", SegConfig,
                   dataset=lambda cfg, data: LabelTrainDataset(data, Path(cfg.labels), cfg.data, seed=cfg.train.seed),
                   build=_seg_build, losses=_seg_losses),
}


def check_registered(cfg: Any) -> None:
    """ConfigError unless the names a run config gives to a registry are registered (its backbone)."""
    from .models.backbones import BACKBONES

    check_choice("model.backbone", cfg.model.backbone, tuple(BACKBONES))


def command_of(kind: str) -> str:
    return RUN_KINDS[kind].command if kind in RUN_KINDS else str(kind)


def run_kind(run_dir: Path, expected: str, flag: str = "--run") -> str:
    """Checks that run_dir holds a run of the expected kind; the same one-line error for every command."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AmrsegError(f"{flag} {run_dir}: not a directory (expected a {command_of(expected)} run)")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise AmrsegError(f"{flag} {run_dir}: not a {command_of(expected)} run directory (no config.yaml"
                          f"{'' if (run_dir / 'model.pt').is_file() else ', no model.pt'})")
    kind = read_yaml(path).get("kind", "cam")
    if kind != expected:
        raise AmrsegError(f"{flag} {run_dir}: a {command_of(kind)} run, expected a {command_of(expected)} run")
    return kind


@dataclass
class LoadedRun:
    model: torch.nn.Module  # in eval mode, on the device asked for
    config: Any  # the run's config dataclass
    class_names: list  # background first


def load_run(run_dir: Path, kind: str, device: torch.device = torch.device("cpu"), flag: str = "--run") -> LoadedRun:
    """The trained network of a run directory of `kind` (cam, irn or seg), from RUN/model.pt.

    Raises:
        AmrsegError: not a run directory, a run of another kind, an unfinished run, or weights that
            do not fit the saved config; one line naming the flag and the folder.
    """
    if kind not in RUN_KINDS:
        raise ValueError(f"unknown run kind {kind!r} (known: {', '.join(RUN_KINDS)})")
    run_dir = Path(run_dir)
    run_kind(run_dir, kind, flag)
    entry = RUN_KINDS[kind]
    state = load_torch(run_dir / "model.pt", f"trained model (is the run finished? resume it with "
                                             f"{entry.command} --resume)")
    if not isinstance(state.get("state_dict"), dict) or not isinstance(state.get("config"), dict):
        raise AmrsegError(f"{run_dir / 'model.pt'}: not a {entry.command} model file (no state_dict/config)")
    cfg = merge(entry.config(), state["config"])
    class_names = list(state.get("class_names") or [])
    # The weights come from model.pt: no pretrained loading, no spotlight initialisation.
    model = entry.build(_without_weights(cfg), len(class_names) - 1, False)
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        raise AmrsegError(f"{run_dir / 'model.pt'}: weights do not fit the saved config "
                          f"({str(e).splitlines()[0]})") from None
    return LoadedRun(model.to(device).eval(), cfg, class_names)


def load_run_config(run_dir: Path, kind: str, flag: str = "--run"):
    """The saved config (RUN/config.yaml) of a run directory of `kind`, as its dataclass."""
    run_kind(run_dir, kind, flag)
    return merge(RUN_KINDS[kind].config(), read_yaml(Path(run_dir) / "config.yaml"))


def _without_weights(cfg):
    changes = {"pretrained": "none"}
    if hasattr(cfg.model, "init_spotlight"):
        changes["init_spotlight"] = None
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))
