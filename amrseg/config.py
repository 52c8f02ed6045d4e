"""Typed configuration: dataclasses, YAML presets, dotted `--set` overrides.

Resolution order for `train-cam`: field defaults < preset YAML < command-line flags < `--set`.
Unknown keys are an error at every level, and the resolved config is saved next to every run.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import AmrsegError, ConfigError

PRESET_DIR = Path(__file__).parent / "presets"
PRESETS = ("cam", "amr", "amr-block", "amr-official", "amr-gtm")


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # a name of models.backbones.BACKBONES: resnet18 | resnet34 | resnet50 | resnet101
    base_width: int = 64  # channels of the stem; 64 = the standard nets, smaller for CPU
    strides: list = field(default_factory=lambda: [1, 2, 2, 1])  # layer1..4; stem is /4 -> OS 16
    pretrained: str = "imagenet"  # imagenet (torchvision URL for the depth) | PATH | URL | none
    fixed_bn: bool = True  # backbone BN keeps running stats; only with pretrained weights
    freeze_stem: bool = True  # conv1 + bn1 frozen; only with pretrained weights
    compensation: bool = True  # false: spotlight branch alone = the plain CAM baseline
    freeze_spotlight_backbone: bool = False  # release: spotlight is a trained CAM net, frozen
    freeze_compensation: list = field(default_factory=list)  # module names, e.g. [conv1, bn1, layer1]
    init_spotlight: Optional[str] = None  # RUN dir or weights file of a trained `cam` run
    # new: AMMs + classifiers at new_lr_mult (AMR.md section 4) | release: the compensation backbone and
    # its AMMs at new_lr_mult, both classifiers and the spotlight backbone at 1x (the release's train_amr)
    lr_groups: str = "new"

    def validate(self, prefix: str = "model.") -> None:
        check_choice(prefix + "lr_groups", self.lr_groups, ("new", "release"))
        check_range(prefix + "base_width", self.base_width, lo=1)
        check_strides(prefix + "strides", self.strides)
        check_range(prefix + "pretrained", self.pretrained, nonempty=True)


@dataclass
class AMMConfig:
    placement: str = "stage"  # stage: after each stage (paper) | block: every bottleneck (release)
    stages: list = field(default_factory=lambda: [1, 2, 3, 4])  # which of layer1..4 carry AMMs
    gaussian: str = "unit"  # unit: exp(-(z-mu)^2 / 2 sigma^2), peak 1 | pdf: divided by sqrt(2 pi) sigma
    stats: str = "sample"  # sample: mu, sigma per image | batch: over the batch tensor (release)
    # in eval mode (make-cam): sample: per image | pair: Gaussian and spatial-gate BN statistics over
    # each image + flip pair, as the release's make-cam batch of two
    eval_stats: str = "sample"
    threshold: Optional[float] = None  # Gaussian threshold modulation tau; None = off
    reduction: int = 16  # channel-gate MLP bottleneck
    eps: float = 1.0e-6  # sigma + eps, so that a constant input gives no NaN

    def validate(self, prefix: str = "amm.") -> None:
        check_choice(prefix + "placement", self.placement, ("stage", "block"))
        check_choice(prefix + "gaussian", self.gaussian, ("unit", "pdf"))
        check_choice(prefix + "stats", self.stats, ("sample", "batch"))
        check_choice(prefix + "eval_stats", self.eval_stats, ("sample", "pair"))
        if not self.stages or any(s not in (1, 2, 3, 4) for s in self.stages) \
                or len(set(self.stages)) != len(self.stages):
            raise ConfigError(prefix + "stages", self.stages, "expected distinct stage numbers from 1..4")
        if self.threshold is not None:
            check_range(prefix + "threshold", self.threshold, lo=0.0)
        check_range(prefix + "reduction", self.reduction, lo=1)
        check_range(prefix + "eps", self.eps, lo=0.0, lo_open=True)


@dataclass
class LossConfig:
    cps_weight: float = 0.05  # cross pseudo supervision; source document eq. 7 writes 1
    area_weight: float = 0.0  # area regulariser (source document eq. 10); 0 = off

    def validate(self, prefix: str = "loss.") -> None:
        check_range(prefix + "cps_weight", self.cps_weight, lo=0.0)
        check_range(prefix + "area_weight", self.area_weight, lo=0.0)


@dataclass
class DataConfig:
    # random rescale: a factor drawn uniformly from scale_range, applied as scale_of says:
    #   crop:  the long side becomes factor * crop pixels (train-cam, AMR.md section 4: [320, 640] at 512)
    #   image: the image becomes factor times its own size (train-irn, train-seg: IRN's and DeepLab's 0.5-1.5)
    scale_range: list = field(default_factory=lambda: [0.625, 1.25])
    scale_of: str = "crop"
    crop: int = 512
    hflip: bool = True
    # train-cam: three squares of side up to round(128 * crop / 512) zeroed after normalisation (the
    # release's cutout, in its `cam` run only)
    cutout: bool = False

    def validate(self, prefix: str = "data.") -> None:
        r = self.scale_range
        if len(r) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                  for x in r) or not 0 < r[0] <= r[1]:
            raise ConfigError(prefix + "scale_range", r, "expected [lo, hi] with 0 < lo <= hi")
        check_choice(prefix + "scale_of", self.scale_of, ("crop", "image"))
        check_range(prefix + "crop", self.crop, lo=1)


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
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end of every epoch
    checkpoint_minutes: float = 10.0  # also a checkpoint when this much wall time passed; 0 = off
    tensorboard: bool = False  # also write the logged scalars to RUN/tb/ (the `tensorboard` extra)
    val_split: Optional[str] = None  # train-cam: classification mAP on this split after each epoch

    def validate(self, prefix: str = "train.") -> None:
        check_range(prefix + "epochs", self.epochs, lo=1)
        check_range(prefix + "batch_size", self.batch_size, lo=1)
        check_range(prefix + "lr", self.lr, lo=0.0, lo_open=True)
        check_range(prefix + "new_lr_mult", self.new_lr_mult, lo=0.0, lo_open=True)
        check_range(prefix + "momentum", self.momentum, lo=0.0, hi=1.0, hi_open=True)
        check_range(prefix + "weight_decay", self.weight_decay, lo=0.0)
        check_range(prefix + "poly_power", self.poly_power, lo=0.0)
        check_choice(prefix + "amp", self.amp, ("auto", "bf16", "fp16", "off"))
        check_range(prefix + "num_workers", self.num_workers, lo=0)
        check_range(prefix + "seed", self.seed, lo=0, hi=2**32 - 1)
        check_choice(prefix + "device", self.device, ("auto", "cpu", "cuda"))
        check_range(prefix + "log_every", self.log_every, lo=1)
        check_range(prefix + "checkpoint_every", self.checkpoint_every, lo=0)
        check_range(prefix + "checkpoint_minutes", self.checkpoint_minutes, lo=0.0)
        if self.val_split is not None:
            check_range(prefix + "val_split", self.val_split, nonempty=True)


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

    def validate(self) -> None:
        validate_sections(self)
        if self.preset == "amr-official" and not self.model.init_spotlight:
            raise AmrsegError("--init-spotlight: preset amr-official needs a trained `cam` run "
                              "(train one with --preset cam, then pass --init-spotlight RUN)")


@dataclass
class BackboneConfig:
    """The backbone of an IRN or DeepLab run."""

    backbone: str = "resnet50"
    base_width: int = 64
    pretrained: str = "imagenet"  # imagenet | PATH | URL | none | a train-cam RUN (its spotlight backbone)
    fixed_bn: bool = True  # only with pretrained weights (from scratch every BN learns)

    def validate(self, prefix: str = "model.") -> None:
        check_range(prefix + "base_width", self.base_width, lo=1)
        check_range(prefix + "pretrained", self.pretrained, nonempty=True)


@dataclass
class IRNModelConfig(BackboneConfig):
    strides: list = field(default_factory=lambda: [1, 2, 2, 1])  # IRN: stem /4, layer2, layer3 /2: OS 16
    radius: int = 10  # affinity pairs within this radius at stride 4 (AMR.md section 7)

    def validate(self, prefix: str = "model.") -> None:
        super().validate(prefix)
        check_strides(prefix + "strides", self.strides)
        check_range(prefix + "radius", self.radius, lo=2)


@dataclass
class IRNConfig:
    """A train-irn run: boundary + displacement branches on frozen backbone features (IRN)."""

    kind: str = "irn"
    data_root: str = ""
    split: str = "train_aug"
    ir_labels: str = ""  # folder of IR label PNGs (pseudo-labels --method crf)
    cams: str = ""  # the CAM folder the IR labels came from (recorded; training reads the IR labels only)
    model: IRNModelConfig = field(default_factory=IRNModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(scale_range=[0.5, 1.5], scale_of="image"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=0.1, new_lr_mult=10.0))

    def validate(self) -> None:
        """Besides each section's ranges: a crop that is a multiple of 4 (the IR labels are read at
        stride 4 and must land on the model's grid) with room for the radius."""
        validate_sections(self)
        check_no_val_split(self)
        if self.data.crop % 4 or self.data.crop // 4 < 2 * self.model.radius:
            raise ConfigError("data.crop", self.data.crop, f"must be a multiple of 4 and at least "
                              f"{8 * self.model.radius} (8 x model.radius {self.model.radius})")


@dataclass
class SegModelConfig(BackboneConfig):
    backbone: str = "resnet101"
    output_stride: int = 8  # 8: layer3, layer4 dilated 2, 4 (DeepLab-v2) | 16: layer4 dilated 2
    # deeplab: every block of a dilated layer is dilated, the first too (DeepLab-v2's Caffe model, the
    # kazuto1011 port) | torchvision: the first block keeps the previous layer's dilation (as torchvision's
    # replace_stride_with_dilation)
    dilation_style: str = "deeplab"
    aspp_rates: list = field(default_factory=lambda: [6, 12, 18, 24])

    def validate(self, prefix: str = "model.") -> None:
        super().validate(prefix)
        check_choice(prefix + "output_stride", self.output_stride, (8, 16))
        check_choice(prefix + "dilation_style", self.dilation_style, ("deeplab", "torchvision"))
        if not self.aspp_rates or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                                          for r in self.aspp_rates):
            raise ConfigError(prefix + "aspp_rates", self.aspp_rates, "expected a list of positive integers")


@dataclass
class SegConfig:
    """A train-seg run: DeepLab-v2 on pseudo masks (AMR.md section 7)."""

    kind: str = "seg"
    data_root: str = ""
    split: str = "train_aug"
    labels: str = ""  # folder of pseudo-mask PNGs, 255 ignored
    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(scale_range=[0.5, 1.5], scale_of="image", crop=321))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, batch_size=10, lr=2.5e-4,
                                                                   weight_decay=5e-4))

    def validate(self) -> None:
        validate_sections(self)
        check_no_val_split(self)


# --------------------------------------------------------------------------- checking values


def check_range(key: str, value: Any, lo: Any = None, hi: Any = None, lo_open: bool = False,
                hi_open: bool = False, nonempty: bool = False) -> None:
    """ConfigError unless `value` is finite and within [lo, hi] (open ends as asked); strings non-empty."""
    if nonempty:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(key, value, "must not be empty")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, value, "must be a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        bound = (f"greater than {lo}" if lo_open else
                 "positive" if lo == 1 and isinstance(lo, int) else f"at least {lo}")
        raise ConfigError(key, value, f"must be {bound}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ConfigError(key, value, f"must be {'below' if hi_open else 'at most'} {hi}")


def check_choice(key: str, value: Any, valid: Any) -> None:
    if value not in valid:
        raise ConfigError(key, value, f"not one of {', '.join(map(str, valid))}")


def check_scales(scales: Any) -> None:
    """One line unless `scales` (make-cam, eval-seg, predict) is a non-empty list of positive factors."""
    if not scales or any(s <= 0 for s in scales):
        raise AmrsegError(f"--scales {list(scales)}: expected positive scales")


def check_strides(key: str, strides: Any) -> None:
    if len(strides) != 4 or any(s not in (1, 2) or isinstance(s, bool) for s in strides):
        raise ConfigError(key, strides, "expected 4 strides of 1 or 2")


def check_no_val_split(cfg: Any) -> None:
    if cfg.train.val_split is not None:
        raise ConfigError("train.val_split", cfg.train.val_split, "only train-cam has a per-epoch validation figure")


def validate_sections(cfg: Any) -> None:
    """Calls validate(prefix) of every section (model, amm, loss, data, train) of a run config."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section) and hasattr(section, "validate"):
            section.validate(f"{f.name}.")


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
        if not math.isfinite(value):  # nan, inf: never a usable lr, weight or threshold
            raise ConfigError(name, value, "must be a finite number")
        return float(value)
    if typ is list and isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(typ, type) and isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    tname = getattr(typ, "__name__", str(typ))
    raise ConfigError(name, value, f"expected {tname}")


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


def flatten(d: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


# Config keys whose command-line flag is not `--` + the last part of the key with '-' for '_'.
_FLAG_NAMES = {"data_root": "--data"}


def blame(e: ConfigError, flags: dict, overrides: list[str]) -> AmrsegError:
    """The error told as the fault of what the user typed: the `--set` item, else the flag."""
    for item in reversed(overrides or []):
        key = item.split("=", 1)[0].strip()
        if e.key == key or e.key.startswith(key + "."):
            return e.blamed_on(f"--set {item}")
    given = flatten(flags or {})
    if e.key in given:
        flag = _FLAG_NAMES.get(e.key, "--" + e.key.rsplit(".", 1)[-1].replace("_", "-"))
        return e.blamed_on(f"{flag} {given[e.key]} ({e.key})")
    return e


def resolve(base: Any, flags: Optional[dict] = None, overrides: Optional[list[str]] = None,
            checks: tuple = ()) -> Any:
    """The one resolver of every stage's config: `base`, then flags, then `--set`; validated.

    Args:
        base: the config to start from: a dataclass instance (a stage's defaults, an experiment
            file's section) or the name of a train-cam preset.
        flags: nested dict of the values given on the command line (None = not given).
        overrides: `--set KEY=VALUE` items.
        checks: more (cfg) -> None checks after the config's own `validate()`, e.g. that the names
            it gives to a registry are registered (runs.check_registered): the registries live
            above this module.
    A value out of range names what the user typed (`--batch-size 0`, `--set train.log_every=0`).
    """
    flags, overrides = flags or {}, overrides or []
    try:
        cfg = load_preset(base) if isinstance(base, str) else base
        kind = getattr(cfg, "kind", None)
        cfg = merge(merge(cfg, flags), parse_set(overrides))
        if getattr(cfg, "kind", None) != kind:
            raise AmrsegError(f"config key 'kind': cannot be changed (this is a config of kind {kind!r})")
        cfg.validate()
        for check in checks:
            check(cfg)
    except ConfigError as e:
        raise blame(e, flags, overrides) from None
    return cfg


def validate(cfg: Any) -> None:
    """Checks every value of a run config (each section's ranges, then the cross-section rules)."""
    cfg.validate()


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def check_choices(**values) -> None:
    """check_choices(**{"model.backbone": (value, valid)}): one-line error for a value not in valid."""
    for name, (value, valid) in values.items():
        check_choice(name, value, valid)
