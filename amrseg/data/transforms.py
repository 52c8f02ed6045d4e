"""Training-time image transforms (AMR.md section 4) and the CAM training dataset.

Per image: resize so the long side is uniform in [lo * crop, hi * crop] (bicubic), horizontal
flip with p 0.5, ImageNet normalisation, then a random crop of crop x crop that pads with 0
*after* normalisation (IRN's `random_crop`: a small image sits at a random offset in a zero
canvas, a large one is cut at a random offset).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig
from .voc import SegData

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xHxW float32, (x / 255 - mean) / std per channel."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {img.dtype} {img.shape}")
    # A fresh float copy: the input (often a read-only view of a PIL image) is never touched.
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)).div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def resize_long(img: np.ndarray, long_side: int) -> np.ndarray:
    """Bicubic resize (PIL) so that max(H, W) == long_side, keeping the aspect ratio."""
    h, w = img.shape[:2]
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL takes (W, H)
    return np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))


def random_crop(x: torch.Tensor, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """crop x crop window of a CxHxW tensor; zero-padded where the image is smaller.

    Along each axis independently: if the image is longer than the crop, a random window of the
    image is taken; otherwise the whole image is placed at a random offset in the zero canvas.
    """
    c, h, w = x.shape
    out = x.new_zeros((c, crop, crop))
    ch, cw = min(crop, h), min(crop, w)
    # Offsets: (into the image, into the canvas); one of each pair is 0.
    img_top, box_top = (int(rng.integers(h - crop + 1)), 0) if h > crop else (0, int(rng.integers(crop - h + 1)))
    img_left, box_left = (int(rng.integers(w - crop + 1)), 0) if w > crop else (0, int(rng.integers(crop - w + 1)))
    out[:, box_top:box_top + ch, box_left:box_left + cw] = x[:, img_top:img_top + ch, img_left:img_left + cw]
    return out


def train_transform(img: np.ndarray, rng: np.random.Generator, cfg: DataConfig) -> torch.Tensor:
    """The training augmentation of AMR.md section 4.

    Args:
        img: HxWx3 uint8 RGB.
        rng: the only source of randomness (draws: long side, flip, crop offsets).
        cfg: scale_range (long side / crop), crop, hflip.

    Returns:
        [3, crop, crop] float32, normalised, zero outside the placed image.
    """
    lo, hi = (round(s * cfg.crop) for s in cfg.scale_range)
    long_side = int(rng.integers(max(1, lo), max(1, hi) + 1))
    img = resize_long(img, long_side)
    if cfg.hflip and rng.random() < 0.5:
        img = img[:, ::-1]
    return random_crop(normalize(img), cfg.crop, rng)


class CamTrainDataset(torch.utils.data.Dataset):
    """(augmented image, multi-hot label, index) for CAM training.

    Randomness comes from np.random.default_rng([seed, epoch, i]), so sample i of an epoch is the
    same whatever the worker count or resume point. Call `set_epoch` before iterating each epoch
    (with persistent DataLoader workers the workers keep their own copy: do not combine them).
    """

    def __init__(self, data: SegData, cfg: DataConfig, seed: int) -> None:
        if data.labels is None:
            raise ValueError("CamTrainDataset needs a dataset with image-level labels")
        self.data = data
        self.cfg = cfg
        self.seed = int(seed)
        self.epoch = 0
        self.labels = torch.from_numpy(data.labels.astype(np.float32))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        image = train_transform(self.data.load_image(i), rng, self.cfg)
        return image, self.labels[i], int(i)
