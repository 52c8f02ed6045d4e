"""Fashion-MNIST scenes: the built-in demo data, a CPU-sized stand-in for PASCAL VOC.

A scene is a cluttered background (colour gradient, low-frequency noise, and unlabelled strokes,
ellipses and rectangles) with 1 to 3 tinted Fashion-MNIST items pasted at random places; later
items occlude earlier ones and the ground truth is what stays visible, with a 255 band on the
borders as in VOC. `ItemDataset` renders single items on the same kind of background: the
stand-in for ImageNet pretraining. Scenes and items share one renderer.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from PIL import Image

from ..errors import AmrsegError
from .transforms import normalize
from ..fileio import save_image, write_text
from .voc import IGNORE, classes_present, write_label_index, write_palette_png

FMNIST_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle_boot")
DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")

REF_SIZE = 128  # item scales below are defined for a 128 px scene and scale with the scene size
ITEM_SCALE = (1.5, 3.0)  # an item's 28 px side times this, at REF_SIZE
BACKGROUND_GAIN = np.float32(0.5)  # background brightness relative to items
ALPHA_THRESHOLD = 0.25  # item pixels above this alpha are labelled
MIN_VISIBLE = 30  # fewer visible (non-border) pixels of a class and the scene is redrawn
MAX_ITEMS = 3
MAX_ATTEMPTS = 100

# IDX type codes (the third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# --------------------------------------------------------------------------- reading Fashion-MNIST


def _idx_file(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def find_fmnist(path: Union[str, Path, None] = None) -> Path:
    """The Fashion-MNIST folder: `path`, else $AMRSEG_FMNIST, else /usr/share/datasets/fashion-mnist.

    Raises:
        AmrsegError: the folder lacks one of the four IDX files (raw or .gz).
    """
    folder = Path(path or os.environ.get("AMRSEG_FMNIST") or DEFAULT_FMNIST_DIR)
    missing = [name for name in FMNIST_FILES if _idx_file(folder, name) is None]
    if missing:
        raise AmrsegError(
            f"{folder}: Fashion-MNIST not found (no {missing[0]}[.gz]); install with 'apt-get install "
            "dataset-fashion-mnist' or download the four *-ubyte.gz files from "
            "github.com/zalandoresearch/fashion-mnist and pass --fmnist DIR")
    return folder


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Reads an IDX file (gzip-compressed when the name ends in .gz) as a native-endian array.

    Raises:
        AmrsegError: unreadable, bad magic number, or a size that does not match the header.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise AmrsegError(f"{path}: cannot read IDX file ({str(e) or type(e).__name__})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise AmrsegError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'none'})")
    ndim, header = data[3], 4 + 4 * data[3]
    if len(data) < header:
        raise AmrsegError(f"{path}: corrupt IDX file (truncated header)")
    dims = [int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims))
    if len(data) != header + count * dtype.itemsize:
        raise AmrsegError(f"{path}: corrupt IDX file (header says {dims}, expected "
                          f"{header + count * dtype.itemsize} bytes, found {len(data)})")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def load_fmnist(folder: Union[str, Path], part: str) -> tuple[np.ndarray, np.ndarray]:
    """Loads one part of Fashion-MNIST.

    Args:
        folder: a folder holding the IDX files (see `find_fmnist`).
        part: 'train' or 't10k'.

    Returns:
        (images [N, H, W] uint8, labels [N] int64 in 0..9).
    """
    if part not in ("train", "t10k"):
        raise ValueError(f"part must be 'train' or 't10k', got {part!r}")
    folder = Path(folder)
    paths = [_idx_file(folder, f"{part}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if None in paths:
        find_fmnist(folder)  # raises the install hint
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise AmrsegError(f"{paths[0]}: expected uint8 images [N, H, W], got {images.dtype} {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise AmrsegError(f"{paths[1]}: expected {len(images)} labels, got shape {list(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(FMNIST_CLASSES)):
        raise AmrsegError(f"{paths[1]}: labels must lie in 0..{len(FMNIST_CLASSES) - 1}")
    return images, labels.astype(np.int64)


# --------------------------------------------------------------------------- rendering


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] weights of linear interpolation from n_in to n_out samples (corners aligned)."""
    pos = np.linspace(0.0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 2)
    frac = (pos - lo).astype(np.float32)
    w = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    w[rows, lo] = 1.0 - frac
    w[rows, lo + 1] = frac
    return w


def _paint_clutter(canvas: np.ndarray, kind: int, rng: np.random.Generator) -> None:
    """Paints one random stroke (0), ellipse (1) or rectangle (2) in a random colour, in place.

    Only the shape's bounding box is evaluated, which keeps a scene at about a millisecond.
    """
    size = canvas.shape[0]
    cy, cx = rng.uniform(0, size, 2)
    colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
    opacity = np.float32(rng.uniform(0.5, 1.0))
    if kind == 0:
        ey, ex = rng.uniform(0, size, 2)
        half_width = rng.uniform(0.75, 2.5) * size / REF_SIZE
        reach = half_width
        box = (min(cy, ey) - reach, max(cy, ey) + reach, min(cx, ex) - reach, max(cx, ex) + reach)
    else:
        a, b = rng.uniform(0.04, 0.18, 2) * size
        phi = rng.uniform(0, np.pi)
        reach = float(np.hypot(a, b))
        box = (cy - reach, cy + reach, cx - reach, cx + reach)
    y0, y1 = max(0, int(box[0])), min(size, int(np.ceil(box[1])) + 1)
    x0, x1 = max(0, int(box[2])), min(size, int(np.ceil(box[3])) + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    if kind == 0:
        d = np.array([ey - cy, ex - cx])
        t = np.clip((yy * d[0] + xx * d[1]) / max(float(d @ d), 1e-6), 0.0, 1.0)
        m = (yy - t * d[0]) ** 2 + (xx - t * d[1]) ** 2 <= half_width ** 2
    else:
        u = (xx * np.cos(phi) + yy * np.sin(phi)) / a
        v = (-xx * np.sin(phi) + yy * np.cos(phi)) / b
        m = u * u + v * v <= 1.0 if kind == 1 else (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    region = canvas[y0:y1, x0:x1]
    region[m] = region[m] * (1 - opacity) + colour * opacity


def render_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A cluttered background: [size, size, 3] float32 in [0, BACKGROUND_GAIN].

    A colour gradient in a random direction, plus low-frequency noise (a random 3..6 grid
    upsampled bilinearly), plus 2 to 5 unlabelled strokes, ellipses and rectangles.
    """
    coords = np.arange(size, dtype=np.float32)
    c0, c1 = rng.uniform(0.0, 1.0, (2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    t = coords[None, :] * np.float32(np.cos(theta)) + coords[:, None] * np.float32(np.sin(theta))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    canvas = c0 + (c1 - c0) * t[..., None]
    g = int(rng.integers(3, 7))
    grid = rng.normal(0.0, 0.12, (g, g, 3)).astype(np.float32)
    w = _interp_matrix(size, g)
    rows = (w @ grid.reshape(g, g * 3)).reshape(size, g, 3)  # upsample along y
    canvas += (rows.transpose(0, 2, 1) @ w.T).transpose(0, 2, 1)  # then along x
    for _ in range(int(rng.integers(2, 6))):
        _paint_clutter(canvas, int(rng.integers(3)), rng)
    # Half brightness: items stand out from the clutter as objects do in photos. At full
    # brightness a from-scratch ResNet stayed at chance for hundreds of steps (bench notes).
    np.clip(canvas, 0.0, 1.0, out=canvas)
    return np.multiply(canvas, BACKGROUND_GAIN, out=canvas)


def paint_item(canvas: np.ndarray, label_map: np.ndarray, item: np.ndarray, cls: int,
               rng: np.random.Generator) -> None:
    """Pastes one tinted item over `canvas` in place and writes class cls + 1 into `label_map`.

    The item is scaled by ITEM_SCALE (bilinear; relative to a 128 px scene), its intensity sets the
    opacity and modulates a random RGB colour, and it lies fully inside the canvas; pixels with
    alpha above ALPHA_THRESHOLD overwrite the label map, so later items occlude earlier ones.
    """
    size = canvas.shape[0]
    s = rng.uniform(*ITEM_SCALE) * size / REF_SIZE
    ih, iw = item.shape
    s = min(s, size / max(ih, iw))  # fully inside
    nh, nw = max(2, round(ih * s)), max(2, round(iw * s))
    alpha = np.asarray(Image.fromarray(item).resize((nw, nh), Image.BILINEAR), dtype=np.float32) / 255.0
    colour = rng.uniform(0.1, 1.0, 3).astype(np.float32)
    y = int(rng.integers(size - nh + 1))
    x = int(rng.integers(size - nw + 1))
    a = alpha[..., None]
    # An opaque silhouette (opacity min(1, 2a)) that keeps the item's texture (colour scaled by
    # 0.3 + 0.7a): a darker a * a blend left items too faint to learn from scratch (chance accuracy).
    opacity = np.minimum(1.0, 2.0 * a)
    region = canvas[y:y + nh, x:x + nw]
    region *= 1.0 - opacity
    region += opacity * colour * (0.3 + 0.7 * a)
    label_map[y:y + nh, x:x + nw][alpha > ALPHA_THRESHOLD] = cls + 1


def border_band(label_map: np.ndarray) -> np.ndarray:
    """VOC-style ignore band: 255 on every pixel whose 8-neighbourhood holds a different label.

    The image edge is not a label change.
    """
    h, w = label_map.shape
    padded = np.pad(label_map, 1, mode="edge")
    change = np.zeros((h, w), dtype=bool)
    for dy in range(3):
        for dx in range(3):
            if dy != 1 or dx != 1:
                change |= padded[dy:dy + h, dx:dx + w] != label_map
    out = label_map.copy()
    out[change] = IGNORE
    return out


def _to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_scene(rng: np.random.Generator, size: int, images: np.ndarray,
                 labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One scene of 1 to MAX_ITEMS items drawn from (images, labels).

    The items are redrawn until every class placed keeps at least MIN_VISIBLE pixels outside
    the border band, so the image-level labels match what is visible.

    Returns:
        (image [size, size, 3] uint8, label map [size, size] uint8 in 0..10 without the band).
    """
    background = render_background(rng, size)
    for _ in range(MAX_ATTEMPTS):
        canvas = background.copy()
        raw = np.zeros((size, size), dtype=np.uint8)
        picks = rng.integers(len(images), size=int(rng.integers(1, MAX_ITEMS + 1)))
        for j in picks:
            paint_item(canvas, raw, images[j], int(labels[j]), rng)
        counts = np.bincount(border_band(raw).ravel(), minlength=256)
        if all(counts[int(labels[j]) + 1] >= MIN_VISIBLE for j in picks):
            return _to_uint8(canvas), raw
    raise AmrsegError(f"cannot place visible items in a {size} px scene after {MAX_ATTEMPTS} attempts "
                      "(items too small or too faint; use a larger --size)")


# --------------------------------------------------------------------------- the scenes dataset


def build_scenes(out: Union[str, Path], fmnist: Union[str, Path, None] = None, n_train: int = 8000,
                 n_val: int = 1000, size: int = 128, seed: int = 0,
                 progress: Optional[Callable[[int], object]] = None) -> dict:
    """Writes a VOC-style Fashion-MNIST scenes dataset (splits train and val) under `out`.

    train draws its items from Fashion-MNIST train, val from t10k. Scene i of a split depends
    only on (seed, split, i), so a second build writes the same bytes.

    Args:
        out: the dataset root to write (created if needed; existing files are overwritten).
        fmnist: the Fashion-MNIST folder (see `find_fmnist`).
        n_train: number of train scenes.
        n_val: number of val scenes.
        size: scene side in pixels.
        seed: the seed.
        progress: called with 1 after each scene is written.

    Returns:
        {"root", "num_images": {"train", "val"}, "class_names", "images_per_class"}.
    """
    if size < 32:
        raise AmrsegError(f"--size {size}: scenes need at least 32 px")
    for flag, n in (("--train", n_train), ("--val", n_val)):
        if n < 1:
            raise AmrsegError(f"{flag} {n}: need at least one image")
    folder = find_fmnist(fmnist)
    out = Path(out)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    present = {}
    for split_code, (split, part, n) in enumerate((("train", "train", n_train), ("val", "t10k", n_val))):
        images, labels = load_fmnist(folder, part)
        if len(images) == 0:
            raise AmrsegError(f"{folder}: Fashion-MNIST {part} part holds no images")
        ids = []
        for i in range(n):
            rng = np.random.default_rng([seed, split_code, i])
            image, raw = render_scene(rng, size, images, labels)
            mask = border_band(raw)
            image_id = f"{split}_{i:06d}"
            save_image(Image.fromarray(image), out / "JPEGImages" / f"{image_id}.jpg", quality=95)
            write_palette_png(out / "SegmentationClass" / f"{image_id}.png", mask)
            present[image_id] = classes_present(mask, len(FMNIST_CLASSES))
            ids.append(image_id)
            if progress is not None:
                progress(1)
        write_text(out / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(ids) + "\n")
    per_class = write_label_index(out, FMNIST_CLASSES, present)
    return {
        "root": str(out),
        "num_images": {"train": n_train, "val": n_val},
        "class_names": ["background", *FMNIST_CLASSES],
        "images_per_class": per_class,
    }


# --------------------------------------------------------------------------- pretraining items


class ItemDataset(torch.utils.data.Dataset):
    """Single Fashion-MNIST items on cluttered backgrounds: (normalised image [3, size, size], label).

    Item i is rendered like a scene item (same background, scale, tint, placement), with
    randomness from np.random.default_rng([seed, epoch, i]).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int, seed: int, epoch: int = 0) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.size = int(size)
        self.seed = int(seed)
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        canvas = render_background(rng, self.size)
        raw = np.zeros((self.size, self.size), dtype=np.uint8)
        paint_item(canvas, raw, self.images[i], int(self.labels[i]), rng)
        return normalize(_to_uint8(canvas)), int(self.labels[i])
