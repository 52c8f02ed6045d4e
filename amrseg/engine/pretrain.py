"""`pretrain-backbone`: the CPU stand-in for ImageNet pretraining.

Trains a ResNet from scratch as a 10-way classifier of single Fashion-MNIST items on cluttered
backgrounds, and saves a torchvision-named state dict (backbone + `fc.*`), so that demos and
benchmarks on a CPU go through the same path as a real ImageNet checkpoint: strict loading, fixed
BN, frozen stem, 10x lr for the new layers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.fashion import ItemDataset, find_fmnist, load_fmnist
from ..models.resnet import build_resnet
from .common import atomic_torch_save, pick_device, poly_lr, progress, seed_everything


@dataclass
class PretrainConfig:
    backbone: str = "resnet18"
    base_width: int = 32
    epochs: int = 2
    size: int = 96  # image side in pixels
    items: int = 12000  # Fashion-MNIST train items used per epoch
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 1.0e-4
    seed: int = 0
    device: str = "auto"
    num_workers: int = 2


class Classifier(nn.Module):
    """Backbone + global average pooling + fc: torchvision's classification layout."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.out_channels, num_classes)

    def forward(self, x):
        return self.fc(self.backbone(x).mean(dim=(2, 3)))


def pretrain_backbone(out: Path, cfg: PretrainConfig, fmnist: Optional[str] = None,
                      show_progress: Optional[bool] = None) -> dict:
    """Trains and writes `out` (a torchvision-named state dict); returns accuracy and timing."""
    folder = find_fmnist(fmnist)
    train_x, train_y = load_fmnist(folder, "train")
    test_x, test_y = load_fmnist(folder, "t10k")
    seed_everything(cfg.seed)
    n = min(cfg.items, len(train_x))
    train_set = ItemDataset(train_x[:n], train_y[:n], size=cfg.size, seed=cfg.seed)
    test_set = ItemDataset(test_x[:1000], test_y[:1000], size=cfg.size, seed=cfg.seed + 1)
    device = pick_device(cfg.device)

    # Classification strides (output stride 32, as ImageNet ResNets); strides hold no parameters,
    # so the weights serve any output stride later.
    model = Classifier(build_resnet(cfg.backbone, cfg.base_width, strides=(1, 2, 2, 2)), 10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay,
                                nesterov=True)
    g = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = n // cfg.batch_size
    total, step, t0 = cfg.epochs * steps_per_epoch, 0, time.perf_counter()
    bar = progress(total=total, enabled=show_progress, desc="pretrain-backbone", unit="step")
    model.train()
    for epoch in range(cfg.epochs):
        train_set.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=g,
                                             drop_last=True, num_workers=cfg.num_workers)
        for images, labels in loader:
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(cfg.lr, step, total, 0.9)
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    train_seconds = time.perf_counter() - t0

    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(test_set, batch_size=200):
            correct += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
    state = {k: v.cpu() for k, v in model.backbone.state_dict().items()}
    state.update({f"fc.{k}": v.cpu() for k, v in model.fc.state_dict().items()})
    atomic_torch_save(state, Path(out))
    return {"out": str(out), "test_accuracy": correct / len(test_set), "train_seconds": round(train_seconds, 1),
            "images_per_s": round(total * cfg.batch_size / max(train_seconds, 1e-9), 1)}
