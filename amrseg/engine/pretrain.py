"""`pretrain-backbone`: the CPU stand-in for ImageNet pretraining.

Trains a ResNet from scratch as a classifier of single items on cluttered backgrounds and saves a
torchvision-named state dict (backbone + `fc.*`), so that demos and benchmarks on a CPU go through
the same path as a real ImageNet checkpoint: strict loading, fixed BN, frozen stem, 10x lr for the
new layers. Two sources:
- `emoji`: every emoji of the art folder (about 1,900 classes, one per short name; both vendors'
  drawings and skin variations are a class's samples), rendered as emoji-VOC renders its objects,
  over its backgrounds and clutter. VOC's classes are among them, as dogs and cars are in ImageNet.
- `fashion`: the 10 Fashion-MNIST classes.

Training runs on the loop of train-cam/irn/seg (engine.trainer.fit), in the run folder `OUT.run/`
beside the weights file OUT (config.yaml, log.csv, checkpoint.pt, and model.pt: the whole
classifier, auxiliary heads included), so it resumes exactly and stops at the first NaN.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TrainConfig
from ..data.emoji_scenes import EmojiItemDataset, SpriteCache, resolve_spec
from ..data.fashion import ItemDataset, find_fmnist, load_fmnist
from ..errors import AmrsegError
from ..fileio import atomic_torch_save
from ..models.backbones import build_backbone
from ..models.optim import sgd_groups
from ..models.resnet import BasicBlock, Bottleneck
from ..runtime import pick_device, seed_everything
from .trainer import Job, fit, prepare_run


@dataclass
class PretrainConfig:
    source: str = "fashion"  # emoji | fashion
    backbone: str = "resnet18"
    base_width: int = 32
    epochs: int = 2
    size: int = 96  # image side in pixels
    items: int = 12000  # training items per epoch (fashion: Fashion-MNIST train items used)
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 1.0e-4
    label_smoothing: float = 0.0
    head_lr_mult: float = 1.0  # lr multiplier of the fc (and auxiliary) heads
    aux_weight: float = 0.0  # emoji: weight of the subcategory and category heads' losses (0: no heads)
    zero_init_residual: bool = False  # the last BN of each residual branch starts at 0
    threads: int = 0  # torch threads: n, or 0 = torch's default, -1 = the cores the workers leave
    test_items: int = 1000  # held-out items scored at the end (emoji: 0 = two renders per class)
    seed: int = 0
    device: str = "auto"
    num_workers: int = 2
    kind: str = "pretrain"  # the run kind in OUT.run/config.yaml

    # Settings a resumed run may change: they do not change the weights.
    resume_free: ClassVar[tuple] = ("device", "num_workers", "threads")

    @property
    def train(self) -> TrainConfig:
        """The recipe as the training loop's settings: SGD (Nesterov, momentum 0.9), poly decay 0.9, float32."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, new_lr_mult=self.head_lr_mult,
                           momentum=0.9, weight_decay=self.weight_decay, poly_power=0.9, amp="off",
                           channels_last=False, num_workers=self.num_workers, seed=self.seed, device=self.device)

    @classmethod
    def for_source(cls, source: str, **overrides) -> "PretrainConfig":
        """The source's default recipe (SOURCE_DEFAULTS), with the overrides that are not None."""
        if source not in SOURCE_DEFAULTS:
            raise AmrsegError(f"--source {source}: expected one of {', '.join(SOURCE_DEFAULTS)}")
        values = dict(SOURCE_DEFAULTS[source])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(source=source, **values)


# Default recipes. fashion: as it always was. emoji: sized to a CPU budget for resnet18 at base
# width 32, with one training thread and one rendering worker (NOTES.md, "Emoji-VOC": its timing
# and the measured choices of lr, batch, heads and zero-init).
SOURCE_DEFAULTS = {
    "fashion": {"epochs": 2, "size": 96, "items": 12000, "batch_size": 64, "test_items": 1000},
    "emoji": {"epochs": 5, "size": 96, "items": 24000, "batch_size": 32, "lr": 0.07,
              "head_lr_mult": 5.0, "aux_weight": 0.5, "zero_init_residual": True, "test_items": 0,
              "num_workers": 1, "threads": -1},
}


class Classifier(nn.Module):
    """Backbone + global average pooling + fc: torchvision's classification layout.

    `aux_classes` adds linear heads on the same pooled features (emoji: subcategory and category),
    trained alongside and not saved: a dense signal that gets the features going while each of the
    ~1,900 fine classes has been seen only a few times.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, aux_classes: Sequence[int] = ()):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.out_channels, num_classes)
        self.aux = nn.ModuleList(nn.Linear(backbone.out_channels, n) for n in aux_classes)

    def forward(self, x) -> list:
        """[the fc's logits, then each auxiliary head's]."""
        feat = self.backbone(x).mean(dim=(2, 3))
        return [self.fc(feat), *(head(feat) for head in self.aux)]


def zero_init_residual(model: nn.Module) -> None:
    """The last BN of every residual branch starts at 0 (each block starts as the identity)."""
    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)


def _datasets(cfg: PretrainConfig, fmnist: Optional[str], art: Optional[str]) -> tuple:
    """(train set, held-out set, number of classes, aux targets [class -> group] per aux head)."""
    if cfg.source == "emoji":
        spec = resolve_spec(art)
        sprites = SpriteCache(spec.root)
        sprites.preload(spec.index)  # decoded once, before the DataLoader workers fork and share it
        train_set = EmojiItemDataset(spec.index, spec.clutter, sprites, cfg.size, length=cfg.items, seed=cfg.seed)
        # Held-out renders: every class equally often, from randomness the training never draws.
        test_set = EmojiItemDataset(spec.index, spec.clutter, sprites, cfg.size,
                                    length=cfg.test_items or 2 * len(spec.index), seed=cfg.seed + 1)
        aux = []
        for key in ("subcategory", "category"):
            names = sorted({getattr(e, key) for e in spec.index})
            aux.append(torch.tensor([names.index(getattr(e, key)) for e in spec.index]))
        return train_set, test_set, train_set.num_classes, aux
    if cfg.source != "fashion":
        raise AmrsegError(f"--source {cfg.source}: expected emoji or fashion")
    folder = find_fmnist(fmnist)
    train_x, train_y = load_fmnist(folder, "train")
    test_x, test_y = load_fmnist(folder, "t10k")
    n = min(cfg.items, len(train_x))
    train_set = ItemDataset(train_x[:n], train_y[:n], size=cfg.size, seed=cfg.seed)
    test_set = ItemDataset(test_x[:cfg.test_items], test_y[:cfg.test_items], size=cfg.size, seed=cfg.seed + 1)
    return train_set, test_set, 10, []


def run_dir(out: Path) -> Path:
    """The run folder of the weights file `out`: `OUT.run/` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".run")


def pretrain_backbone(out: Path, cfg: PretrainConfig, fmnist: Optional[str] = None, art: Optional[str] = None,
                      show_progress: Optional[bool] = None, resume: bool = False,
                      stop_after_steps: Optional[int] = None) -> dict:
    """Trains in the run folder `OUT.run/` and writes `out` (a torchvision-named state dict).

    Args:
        out: the weights file.
        cfg: the recipe (`PretrainConfig.for_source`).
        fmnist, art: the Fashion-MNIST and emoji art folders (None: their default places).
        show_progress: progress bar on/off; None = only on a terminal.
        resume: continue the run in OUT.run/ from its checkpoint; without it a folder that holds a
            run is refused. The settings must be the saved ones (but for `resume_free`).
        stop_after_steps: stop with a checkpoint after this many steps, as Ctrl-C does.

    Returns:
        out, source, num_classes, test_accuracy, test_top5, test_items, train_seconds,
        images_per_s (over this invocation's steps), total_seconds, threads. A run stopped before
        its end writes no weights file and returns fit's summary (finished False, step, ...).
    """
    t_start = time.perf_counter()
    _check_sizes(cfg)
    run = run_dir(out)
    cfg = prepare_run(cfg, run, resume)
    train_set, test_set, num_classes, aux_targets = _datasets(cfg, fmnist, art)
    if len(train_set) < cfg.batch_size:
        raise AmrsegError(f"--items {len(train_set)}: fewer than one batch of {cfg.batch_size}")
    aux_targets = aux_targets if cfg.aux_weight > 0 else []
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    with _torch_threads(cfg):
        model = _classifier(cfg, num_classes, aux_targets).to(device)
        seen = [0]  # images trained on by this invocation
        job = _job(cfg, model, train_set, [t.to(device) for t in aux_targets], seen)
        t0 = time.perf_counter()
        summary = fit(job, cfg, run, resume, show_progress, stop_after_steps, device)
        train_seconds = time.perf_counter() - t0
        if not summary["finished"]:
            return summary
        top1, top5 = _test_accuracy(model, test_set, num_classes, device, cfg.num_workers)
        threads = torch.get_num_threads()
    _save_backbone(model, Path(out))
    return {"out": str(out), "source": cfg.source, "num_classes": num_classes,
            "test_accuracy": top1 / len(test_set), "test_top5": top5 / len(test_set), "test_items": len(test_set),
            "train_seconds": round(train_seconds, 1), "images_per_s": round(seen[0] / max(train_seconds, 1e-9), 1),
            "total_seconds": round(time.perf_counter() - t_start, 1), "threads": threads}


def _check_sizes(cfg: PretrainConfig) -> None:
    for flag, value in (("--epochs", cfg.epochs), ("--items", cfg.items), ("--batch-size", cfg.batch_size)):
        if value < 1:
            raise AmrsegError(f"{flag} {value}: must be at least 1")
    if cfg.size < 32:
        raise AmrsegError(f"--size {cfg.size}: need at least 32 px")


@contextlib.contextmanager
def _torch_threads(cfg: PretrainConfig) -> Iterator[None]:
    """torch's threads per cfg.threads (n; 0 = torch's default; -1 = the cores the workers leave), then restored."""
    threads = cfg.threads if cfg.threads >= 0 else max(1, (os.cpu_count() or 1) - cfg.num_workers)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)


def _classifier(cfg: PretrainConfig, num_classes: int, aux_targets: list) -> Classifier:
    # Classification strides (output stride 32, as ImageNet ResNets); strides hold no parameters,
    # so the weights serve any output stride later.
    model = Classifier(build_backbone(cfg.backbone, cfg.base_width, strides=(1, 2, 2, 2)), num_classes,
                       [int(t.max()) + 1 for t in aux_targets])
    if cfg.zero_init_residual:
        zero_init_residual(model.backbone)
    return model


def _job(cfg: PretrainConfig, model: Classifier, train_set, aux_targets: list, seen: list) -> Job:
    """The training loop's job: the backbone at lr, the heads at lr * head_lr_mult; cross-entropy of
    the fine classes plus aux_weight times that of each auxiliary head (targets: class -> group)."""
    heads = [*model.fc.parameters(), *model.aux.parameters()]
    ids = {id(p) for p in heads}
    groups = sgd_groups([("backbone", [p for p in model.parameters() if id(p) not in ids], cfg.lr),
                         ("heads", heads, cfg.lr * cfg.head_lr_mult)], cfg.weight_decay)

    def losses(net, batch):
        images, labels = batch
        seen[0] += images.shape[0]
        logits = net(images)
        cls = F.cross_entropy(logits[0], labels, label_smoothing=cfg.label_smoothing)
        total = cls
        for head_logits, targets in zip(logits[1:], aux_targets):
            total = total + cfg.aux_weight * F.cross_entropy(head_logits, targets[labels])
        return {"total": total, "cls": cls}

    return Job(name="pretrain-backbone", model=model, param_groups=groups, dataset=train_set, losses=losses,
               log_keys=["cls"], nesterov=True, order=loader_order(cfg.seed, len(train_set)))


def loader_order(seed: int, n: int) -> Callable[[int], torch.Tensor]:
    """(epoch) -> the order of the recipe before the shared loop: a shuffling DataLoader made anew
    every epoch around one generator seeded once. Each epoch it drew the loader's base seed, the
    permutation, and (the sampler run to its end) a second permutation for the empty remainder.
    Kept so that the pretrained weights, and the figures that depend on them (the demo's), stay
    those of before; the draws were checked against torch's DataLoader (tests)."""

    def order(epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        for _ in range(epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=g)  # the loader's base seed
            perm = torch.randperm(n, generator=g)
            torch.randperm(n, generator=g)  # the sampler's remainder, num_samples % n == 0 items
        return perm

    return order


def _test_accuracy(model: Classifier, test_set, num_classes: int, device: torch.device, workers: int) -> tuple:
    """(top-1 hits, top-5 hits) of the fine classes over the held-out items."""
    model.eval()
    top1 = top5 = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(test_set, batch_size=200, num_workers=workers):
            best = model(images.to(device))[0].topk(min(5, num_classes), dim=1).indices.cpu()
            top1 += (best[:, 0] == labels).sum().item()
            top5 += (best == labels[:, None]).any(dim=1).sum().item()
    return top1, top5


def _save_backbone(model: Classifier, out: Path) -> None:
    """The backbone and fc under torchvision's names (the auxiliary heads are left out)."""
    state = {k: v.cpu() for k, v in model.backbone.state_dict().items()}
    state.update({f"fc.{k}": v.cpu() for k, v in model.fc.state_dict().items()})
    atomic_torch_save(state, out)
