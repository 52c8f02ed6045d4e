"""`pretrain-backbone`: the CPU stand-in for ImageNet pretraining (engine.pretrain)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import check_range
from ..engine.pretrain import SOURCE_DEFAULTS, PretrainConfig, pretrain_backbone
from ..errors import AmrsegError
from ..fileio import check_writable_file


@dataclass
class PretrainBackboneConfig:
    """The stage's settings; the recipe fields left None take the source's defaults (SOURCE_DEFAULTS)."""

    out: str = ""  # the weights file (torchvision names)
    source: str = "fashion"  # emoji | fashion
    art: Optional[str] = None
    fmnist: Optional[str] = None
    backbone: str = "resnet18"
    base_width: int = 32
    epochs: Optional[int] = None
    size: Optional[int] = None
    items: Optional[int] = None
    batch_size: Optional[int] = None
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        check_range("out", self.out, nonempty=True)
        if self.source not in SOURCE_DEFAULTS:
            raise AmrsegError(f"--source {self.source}: expected one of {', '.join(SOURCE_DEFAULTS)}")
        other = {"emoji": ("fmnist", "--fmnist", "fashion"), "fashion": ("art", "--art", "emoji")}[self.source]
        if getattr(self, other[0]) is not None:
            raise AmrsegError(f"{other[1]}: only for --source {other[2]} (got --source {self.source})")

    def recipe(self) -> PretrainConfig:
        return PretrainConfig.for_source(self.source, backbone=self.backbone, base_width=self.base_width,
                                         epochs=self.epochs, size=self.size, items=self.items,
                                         batch_size=self.batch_size, seed=self.seed, device=self.device)


def run_dir(cfg: PretrainBackboneConfig) -> Path:
    """Where the run's checkpoint and log live: OUT.run/ beside the weights file."""
    return Path(str(cfg.out) + ".run")


def run(cfg: PretrainBackboneConfig, show_progress: Optional[bool] = None, resume: bool = False) -> dict:
    """Trains and writes the weights file; `resume` continues OUT.run/'s checkpoint."""
    cfg.validate()
    check_writable_file(cfg.out, "--out")
    return pretrain_backbone(cfg.out, cfg.recipe(), fmnist=cfg.fmnist, art=cfg.art, show_progress=show_progress,
                             resume=resume)
