"""Training-time image transforms (AMR.md section 4) and the CAM training dataset.

Per image: a random resize (bicubic; `data.scale_of`: the long side uniform in [lo * crop, hi * crop]
for CAM training, or the image scaled by a factor uniform in [lo, hi] for IRN and DeepLab), horizontal
flip with p 0.5, ImageNet normalisation, then a random crop of crop x crop that pads with 0
*after* normalisation (IRN's `random_crop`: a small image sits at a random offset in a zero
canvas, a large one is cut at a random offset).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig
from ..errors import AmrsegError
from .voc import IGNORE, SegData, read_mask

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


def resize_long(img: np.ndarray, long_side: int, nearest: bool = False) -> np.ndarray:
    """Resize (PIL; bicubic, or nearest for label maps) so that max(H, W) == long_side, keeping the aspect."""
    h, w = img.shape[:2]
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL takes (W, H)
    return np.asarray(Image.fromarray(img).resize(size, Image.NEAREST if nearest else Image.BICUBIC))


def random_size(shape: tuple[int, int], rng: np.random.Generator, cfg: DataConfig) -> tuple[int, int]:
    """The (W, H) an HxW image is resized to before the crop: one draw from `rng`.

    scale_of "crop": the long side is an integer uniform in [round(lo * crop), round(hi * crop)]
    (AMR.md section 4); "image": the image is scaled by a factor uniform in [lo, hi) of its own size
    (IRN's random_scale, DeepLab). Each side at least 1 px.
    """
    h, w = shape
    lo, hi = cfg.scale_range
    if cfg.scale_of == "image":
        scale = lo + rng.random() * (hi - lo)
    else:
        lo_px, hi_px = round(lo * cfg.crop), round(hi * cfg.crop)
        scale = int(rng.integers(max(1, lo_px), max(1, hi_px) + 1)) / max(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def random_crop(x: torch.Tensor, crop: int, rng: np.random.Generator, fill: float = 0) -> torch.Tensor:
    """crop x crop window of a [C x] H x W tensor; padded with `fill` where the image is smaller.

    Along each axis independently: if the image is longer than the crop, a random window of the
    image is taken; otherwise the whole image is placed at a random offset in the canvas.
    """
    h, w = x.shape[-2:]
    out = x.new_full((*x.shape[:-2], crop, crop), fill)
    ch, cw = min(crop, h), min(crop, w)
    # Offsets: (into the image, into the canvas); one of each pair is 0.
    img_top, box_top = (int(rng.integers(h - crop + 1)), 0) if h > crop else (0, int(rng.integers(crop - h + 1)))
    img_left, box_left = (int(rng.integers(w - crop + 1)), 0) if w > crop else (0, int(rng.integers(crop - w + 1)))
    out[..., box_top:box_top + ch, box_left:box_left + cw] = x[..., img_top:img_top + ch, img_left:img_left + cw]
    return out


def train_transform(img: np.ndarray, rng: np.random.Generator, cfg: DataConfig,
                    label: Optional[np.ndarray] = None):
    """The training augmentation of AMR.md section 4, optionally applied alike to a label map.

    Args:
        img: HxWx3 uint8 RGB.
        rng: the only source of randomness (draws: scale, flip, crop offsets).
        cfg: scale_range and scale_of (`random_size`), crop, hflip.
        label: optional HxW uint8 label map (pseudo mask, IR label): resized nearest, flipped and
            cropped with the image, padded with 255 (ignore).

    Returns:
        [3, crop, crop] float32, normalised, zero outside the placed image; with `label`, the pair
        (image, [crop, crop] int64 label).
    """
    if label is not None and label.shape != img.shape[:2]:
        raise ValueError(f"label map {label.shape} does not match the image {img.shape[:2]}")
    size = random_size(img.shape[:2], rng, cfg)
    img = np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))
    flip = cfg.hflip and rng.random() < 0.5
    if flip:
        img = img[:, ::-1]
    if label is None:
        return random_crop(normalize(img), cfg.crop, rng)
    label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    if flip:
        label = label[:, ::-1]
    # One crop draw places image and label alike: stack the label (and a mask of the placed image)
    # as extra channels. The canvas is 0 for the image and 255 (ignore) for the label.
    lab = torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[None]
    both = random_crop(torch.cat([normalize(img), lab, torch.ones_like(lab)]), cfg.crop, rng)
    label_out = torch.where(both[4] > 0, both[3], torch.full_like(both[3], IGNORE)).long()
    return both[:3], label_out


class EpochDataset(torch.utils.data.Dataset):
    """A split whose sample i of epoch e draws its randomness from np.random.default_rng([seed, e, i]),
    so it is the same whatever the worker count or resume point. Call `set_epoch` before iterating
    each epoch (with persistent DataLoader workers the workers keep their own copy: do not combine
    them)."""

    data: SegData
    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data)

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(i)])


class CamTrainDataset(EpochDataset):
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

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        rng = self.rng(i)
        image = train_transform(self.data.load_image(i), rng, self.cfg)
        if self.cfg.cutout:
            image = cutout(image, rng, round(128 * self.cfg.crop / 512))
        return image, self.labels[i], int(i)


def cutout(x: torch.Tensor, rng: np.random.Generator, length: int, squares: int = 3) -> torch.Tensor:
    """x [C, H, W] with `squares` squares set to 0 (after normalisation: the release's cam run).

    Each square is centred at a uniform pixel (y, x) and spans [y - length // 2, y + length // 2),
    clipped to the image, so it is up to `length` px wide (2 * (length // 2)). Returns a copy.
    """
    x = x.clone()
    h, w = x.shape[-2:]
    half = length // 2
    for _ in range(squares):
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        x[..., max(cy - half, 0):min(cy + half, h), max(cx - half, 0):min(cx + half, w)] = 0
    return x


def check_label_dir(folder: Path, data: SegData, flag: str = "--labels") -> list[Path]:
    """The label PNG of every image of `data` in `folder` (<id>.png); one-line error when any is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AmrsegError(f"{flag} {folder}: not a directory")
    present = {p.name for p in folder.iterdir()}
    missing = [i for i in data.ids if f"{i}.png" not in present]
    if missing:
        raise AmrsegError(f"{flag} {folder}: no label for {len(missing)} of the {len(data)} images of the split "
                          f"(first: {missing[0]}.png); run pseudo-labels for this split first")
    return [folder / f"{i}.png" for i in data.ids]


class LabelTrainDataset(EpochDataset):
    """(augmented image, label map, index) for training on pseudo masks or IR labels.

    The label map gets the image's resize (nearest), flip and crop, with 255 outside the placed
    image; `label_stride` > 1 then keeps every label_stride-th pixel (IRN trains at stride 4).
    Randomness as in CamTrainDataset: a function of (seed, epoch, index).
    """

    def __init__(self, data: SegData, label_dir: Path, cfg: DataConfig, seed: int, label_stride: int = 1,
                 flag: str = "--labels") -> None:
        self.data, self.cfg, self.seed, self.epoch = data, cfg, int(seed), 0
        self.label_paths = check_label_dir(label_dir, data, flag)
        self.label_stride = int(label_stride)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        rng = self.rng(i)
        img = self.data.load_image(i)
        label = read_mask(self.label_paths[i])
        if label.shape != img.shape[:2]:
            raise AmrsegError(f"{self.label_paths[i]}: label size {label.shape} differs from the image's "
                              f"{img.shape[:2]}")
        image, label = train_transform(img, rng, self.cfg, label)
        s = self.label_stride
        return image, label[s // 2::s, s // 2::s] if s > 1 else label, int(i)
