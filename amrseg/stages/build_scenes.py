"""`build-scenes`: a VOC-style dataset of synthetic scenes, emoji-VOC or Fashion-MNIST (data/)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import check_choice, check_range
from ..errors import AmrsegError
from ..fileio import check_writable_dir
from ..runtime import progress

SOURCES = ("emoji", "fashion")
# Defaults per source (None in the config: the source's own).
DEFAULTS = {"emoji": {"train": 10000, "val": 1000, "size": 192},
            "fashion": {"train": 8000, "val": 1000, "size": 128}}
_ONLY = {"emoji": {"art": "--art", "context_prob": "--context-prob", "object_scale": "--object-scale",
                   "count_weights": "--count-weights"},
         "fashion": {"fmnist": "--fmnist"}}


@dataclass
class BuildScenesConfig:
    out: str = ""
    source: str = "emoji"  # emoji | fashion
    art: Optional[str] = None  # emoji: the art folder (default $AMRSEG_ART, else ~/.cache/amrseg/emoji-art)
    fmnist: Optional[str] = None  # fashion: the Fashion-MNIST IDX files' folder
    train: Optional[int] = None  # train scenes (default by source)
    val: Optional[int] = None  # val scenes (default by source)
    size: Optional[int] = None  # image side in pixels (default by source)
    seed: int = 0
    context_prob: Optional[float] = None  # emoji: mean chance that an object gets its context (0.5)
    object_scale: Optional[float] = None  # emoji: factor on the objects' size ranges (1.0)
    count_weights: Optional[list] = None  # emoji: probabilities of 1, 2, 3 objects ([0.5, 0.3, 0.2])

    def validate(self) -> None:
        check_choice("source", self.source, SOURCES)
        check_range("out", self.out, nonempty=True)
        for other, flags in _ONLY.items():
            if other == self.source:
                continue
            for key, flag in flags.items():
                if getattr(self, key) is not None:
                    raise AmrsegError(f"{flag}: only for --source {other} (got --source {self.source})")


def run(cfg: BuildScenesConfig, show_progress: Optional[bool] = None) -> dict:
    cfg.validate()
    check_writable_dir(cfg.out, "OUT")
    n = {k: v if getattr(cfg, k) is None else getattr(cfg, k) for k, v in DEFAULTS[cfg.source].items()}
    with progress(total=n["train"] + n["val"], enabled=show_progress, desc=f"build-scenes {cfg.source}",
                  unit="img") as bar:
        if cfg.source == "emoji":
            from ..data.emoji_scenes import build_emoji_scenes

            # the composition knobs given; the others keep build_emoji_scenes' defaults
            knobs = {k: getattr(cfg, k) for k in ("context_prob", "object_scale", "count_weights")
                     if getattr(cfg, k) is not None}
            return build_emoji_scenes(cfg.out, art=cfg.art, n_train=n["train"], n_val=n["val"], size=n["size"],
                                      seed=cfg.seed, progress=bar.update, **knobs)
        from ..data.fashion import build_scenes

        return build_scenes(cfg.out, fmnist=cfg.fmnist, n_train=n["train"], n_val=n["val"], size=n["size"],
                            seed=cfg.seed, progress=bar.update)
