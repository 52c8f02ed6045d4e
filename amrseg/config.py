"""Typed configuration: dataclasses, YAML presets, dotted `--set` overrides.

Resolution order for `train-cam`: field defaults < preset YAML < command-line flags < `--set`.
Unknown keys are an error at every level, and the resolved config is saved next to every run.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import AmrsegError

PRESET_DIR = Path(__file__).parent / "presets"
PRESETS = ("cam", "amr", "amr-block", "amr-official", "amr-gtm")


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101
    base_width: int = 64  # channels of the stem; 64 = the standard nets, smaller for CPU
    strides: list = field(default_factory=lambda: [1, 2, 2, 1])  # layer1..4; stem is /4 -> OS 16
    pretrained: str = "imagenet"  # imagenet (torchvision URL for the depth) | PATH | URL | none
    fixed_bn: bool = True  # backbone BN keeps running stats; only with pretrained weights
    freeze_stem: bool = True  # conv1 + bn1 frozen; only with pretrained weights
    compensation: bool = True  # false: spotlight branch alone = the plain CAM baseline
    freeze_spotlight_backbone: bool = False  # release: spotlight is a trained CAM net, frozen
    freeze_compensation: list = field(default_factory=list)  # module names, e.g. [conv1, bn1, layer1]
    init_spotlight: Optional[str] = None  # RUN dir or weights file of a trained `cam` run


@dataclass
class AMMConfig:
    placement: str = "stage"  # stage: after each stage (paper) | block: every bottleneck (release)
    stages: list = field(default_factory=lambda: [1, 2, 3, 4])  # which of layer1..4 carry AMMs
    gaussian: str = "unit"  # unit: exp(-(z-mu)^2 / 2 sigma^2), peak 1 | pdf: divided by sqrt(2 pi) sigma
    stats: str = "sample"  # sample: mu, sigma per image | batch: over the batch tensor (release)
    threshold: Optional[float] = None  # Gaussian threshold modulation tau; None = off
    reduction: int = 16  # channel-gate MLP bottleneck
    eps: float = 1.0e-6  # sigma + eps, so that a constant input gives no NaN


@dataclass
class LossConfig:
    cps_weight: float = 0.05  # cross pseudo supervision; source document eq. 7 writes 1
    area_weight: float = 0.0  # area regulariser (source document eq. 10); 0 = off


@dataclass
class DataConfig:
    scale_range: list = field(default_factory=lambda: [0.625, 1.25])  # long side / crop: [320, 640] at 512
    crop: int = 512
    hflip: bool = True


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 16
    lr: float = 0.01  # pretrained backbone parameters; new layers get lr * new_lr_mult
    new_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    poly_power: float = 0.9
    amp: str = "auto"  # auto (bf16 where supported, else fp16; CUDA only) | bf16 | fp16 | off
    channels_last: bool = True  # CUDA only
    compile: bool = False  # torch.compile the model (CUDA)
    num_workers: int = 4
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10  # steps between log.csv rows


@dataclass
class Config:
    """A train-cam run."""

    kind: str = "cam"
    preset: str = "amr"
    data_root: str = ""
    split: str = "train_aug"
    model: ModelConfig = field(default_factory=ModelConfig)
    amm: AMMConfig = field(default_factory=AMMConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class BackboneConfig:
    """The backbone of an IRN or DeepLab run."""

    backbone: str = "resnet50"
    base_width: int = 64
    pretrained: str = "imagenet"  # imagenet | PATH | URL | none | a train-cam RUN (its spotlight backbone)
    fixed_bn: bool = True  # only with pretrained weights (from scratch every BN learns)


@dataclass
class IRNModelConfig(BackboneConfig):
    strides: list = field(default_factory=lambda: [1, 2, 2, 1])  # IRN: stem /4, layer2, layer3 /2: OS 16
    radius: int = 10  # affinity pairs within this radius at stride 4 (AMR.md section 7)


@dataclass
class IRNConfig:
    """A train-irn run: boundary + displacement branches on frozen backbone features (IRN)."""

    kind: str = "irn"
    data_root: str = ""
    split: str = "train_aug"
    ir_labels: str = ""  # folder of IR label PNGs (pseudo-labels --method crf)
    cams: str = ""  # the CAM folder the IR labels came from (recorded; training reads the IR labels only)
    model: IRNModelConfig = field(default_factory=IRNModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=0.1, new_lr_mult=10.0))


@dataclass
class SegModelConfig(BackboneConfig):
    backbone: str = "resnet101"
    output_stride: int = 8  # 8: layer3, layer4 dilated 2, 4 (DeepLab-v2) | 16: layer4 dilated 2
    aspp_rates: list = field(default_factory=lambda: [6, 12, 18, 24])


@dataclass
class SegConfig:
    """A train-seg run: DeepLab-v2 on pseudo masks (AMR.md section 7)."""

    kind: str = "seg"
    data_root: str = ""
    split: str = "train_aug"
    labels: str = ""  # folder of pseudo-mask PNGs, 255 ignored
    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(scale_range=[0.5, 1.5], crop=321))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, batch_size=10, lr=2.5e-4,
                                                                   weight_decay=5e-4))


RUN_KINDS = {"cam": Config, "irn": IRNConfig, "seg": SegConfig}
_MAKERS = {"cam": "train-cam", "irn": "train-irn", "seg": "train-seg"}


# --------------------------------------------------------------------------- merging


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Checks `value` against the annotation `typ`; ints are accepted where floats are."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(typ) if a is not type(None)]
        return _coerce(value, inner, name)
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is list and isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(typ, type) and isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    tname = getattr(typ, "__name__", str(typ))
    raise AmrsegError(f"config key '{name}': expected {tname}, got {value!r}")


def merge(obj: Any, updates: dict, prefix: str = "") -> Any:
    """Returns a copy of dataclass `obj` with the nested dict `updates` applied."""
    if not isinstance(updates, dict):
        raise AmrsegError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    types = _field_types(type(obj))
    changes = {}
    for key, value in updates.items():
        name = prefix + str(key)
        if key not in types:
            raise AmrsegError(f"unknown config key '{name}' (valid: {', '.join(prefix + k for k in types)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, name + ".")
        else:
            changes[key] = _coerce(value, types[key], name)
    return dataclasses.replace(obj, **changes)


def parse_set(items: list[str]) -> dict:
    """['train.lr=0.1', 'amm.threshold=null'] -> nested dict; values are parsed as YAML."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise AmrsegError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise AmrsegError(f"--set {item!r}: value is not valid YAML") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise AmrsegError(f"--set {item!r}: '{p}' is set twice")
        node[parts[-1]] = value
    return out


def read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise AmrsegError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise AmrsegError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise AmrsegError(f"{path}: expected a mapping at the top level")
    return data


def load_preset(name: str) -> Config:
    if name not in PRESETS:
        raise AmrsegError(f"--preset {name!r}: unknown preset (valid: {', '.join(PRESETS)})")
    cfg = merge(Config(), read_yaml(PRESET_DIR / f"{name}.yaml"))
    return dataclasses.replace(cfg, preset=name)


def resolve(preset: str, flags: dict, overrides: list[str]) -> Config:
    """Preset, then flags (a nested dict of the values given on the command line), then --set."""
    cfg = load_preset(preset)
    cfg = merge(cfg, flags)
    cfg = merge(cfg, parse_set(overrides))
    validate(cfg)
    return cfg


BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


def resolve_run(kind: str, flags: dict, overrides: list[str]):
    """Config of an irn or seg run: defaults, then flags (nested dict), then --set; validated."""
    cfg = merge(merge(RUN_KINDS[kind](), flags), parse_set(overrides))
    if cfg.kind != kind:
        raise AmrsegError(f"config key 'kind': cannot be changed (this is a {_MAKERS[kind]} run)")
    check_choices(**{"model.backbone": (cfg.model.backbone, BACKBONES),
                     "train.amp": (cfg.train.amp, ("auto", "bf16", "fp16", "off")),
                     "train.device": (cfg.train.device, ("auto", "cpu", "cuda"))})
    if kind == "seg":
        check_choices(**{"model.output_stride": (cfg.model.output_stride, (8, 16))})
    positive = {"train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
                "train.lr": cfg.train.lr, "data.crop": cfg.data.crop, "model.base_width": cfg.model.base_width}
    for name, value in positive.items():
        if value <= 0:
            raise AmrsegError(f"config key '{name}': must be positive, got {value}")
    return cfg


def resolve_irn(flags: dict, overrides: list[str]) -> IRNConfig:
    """A train-irn config: defaults, then flags (nested dict), then --set; validated.

    Besides resolve_run's checks: strides, a radius >= 2, and a crop that is a multiple of 4 (the
    IR labels are read at stride 4 and must land on the model's grid) with room for the radius.
    """
    cfg = resolve_run("irn", flags, overrides)
    if len(cfg.model.strides) != 4 or any(s not in (1, 2) for s in cfg.model.strides):
        raise AmrsegError(f"config key 'model.strides': expected 4 strides of 1 or 2, got {cfg.model.strides}")
    if cfg.model.radius < 2:
        raise AmrsegError(f"config key 'model.radius': must be at least 2, got {cfg.model.radius}")
    if cfg.data.crop % 4 or cfg.data.crop // 4 < 2 * cfg.model.radius:
        raise AmrsegError(f"config key 'data.crop': {cfg.data.crop} must be a multiple of 4 and at least "
                          f"{8 * cfg.model.radius} (8 x model.radius {cfg.model.radius})")
    if len(cfg.data.scale_range) != 2 or not 0 < cfg.data.scale_range[0] <= cfg.data.scale_range[1]:
        raise AmrsegError("config key 'data.scale_range': expected [lo, hi] with 0 < lo <= hi")
    return cfg


def validate(cfg: Config) -> None:
    choices = {
        "model.backbone": (cfg.model.backbone, ("resnet18", "resnet34", "resnet50", "resnet101")),
        "amm.placement": (cfg.amm.placement, ("stage", "block")),
        "amm.gaussian": (cfg.amm.gaussian, ("unit", "pdf")),
        "amm.stats": (cfg.amm.stats, ("sample", "batch")),
        "train.amp": (cfg.train.amp, ("auto", "bf16", "fp16", "off")),
        "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
    }
    for name, (value, valid) in choices.items():
        if value not in valid:
            raise AmrsegError(f"config key '{name}': {value!r} is not one of {', '.join(valid)}")
    if len(cfg.model.strides) != 4 or any(s not in (1, 2) for s in cfg.model.strides):
        raise AmrsegError(f"config key 'model.strides': expected 4 strides of 1 or 2, got {cfg.model.strides}")
    if not cfg.amm.stages or any(s not in (1, 2, 3, 4) for s in cfg.amm.stages) \
            or len(set(cfg.amm.stages)) != len(cfg.amm.stages):
        raise AmrsegError(f"config key 'amm.stages': expected distinct stage numbers from 1..4, got {cfg.amm.stages}")
    if len(cfg.data.scale_range) != 2 or not 0 < cfg.data.scale_range[0] <= cfg.data.scale_range[1]:
        raise AmrsegError("config key 'data.scale_range': expected [lo, hi] with 0 < lo <= hi")
    positive = {
        "train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
        "train.lr": cfg.train.lr, "data.crop": cfg.data.crop, "model.base_width": cfg.model.base_width,
    }
    for name, value in positive.items():
        if value <= 0:
            raise AmrsegError(f"config key '{name}': must be positive, got {value}")
    if cfg.preset == "amr-official" and not cfg.model.init_spotlight:
        raise AmrsegError("--init-spotlight: preset amr-official needs a trained `cam` run "
                          "(train one with --preset cam, then pass --init-spotlight RUN)")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def run_kind(run_dir: Path, expected: str, flag: str = "--run") -> str:
    """Checks that run_dir holds a run of the expected kind (cam, irn or seg); one-line error if not."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise AmrsegError(f"{flag} {run_dir}: not a {_MAKERS[expected]} run directory (no config.yaml)")
    kind = read_yaml(path).get("kind", "cam")
    if kind != expected:
        raise AmrsegError(f"{flag} {run_dir}: a {_MAKERS.get(kind, kind)} run, expected a {_MAKERS[expected]} run")
    return kind


def load_run_config(run_dir: Path, kind: str = "cam"):
    """The saved config of a run directory, as its dataclass; the run must be of `kind`."""
    run_kind(run_dir, kind)
    return merge(RUN_KINDS[kind](), read_yaml(Path(run_dir) / "config.yaml"))


def check_choices(**values) -> None:
    """check_choices(**{"model.backbone": (value, valid)}): one-line error for a value not in valid."""
    for name, (value, valid) in values.items():
        if value not in valid:
            raise AmrsegError(f"config key '{name}': {value!r} is not one of {', '.join(map(str, valid))}")
