"""VOC-style segmentation datasets: split lists, class names, image-level labels, masks.

Layout (CONTRACT.md "Dataset layout"):

    ROOT/JPEGImages/<id>.jpg                   (.png accepted when there is no .jpg)
    ROOT/SegmentationClass/<id>.png            0 background, 1..K classes, 255 ignore
    ROOT/SegmentationClassAug/<id>.png         used when SegmentationClass has no mask for <id>
    ROOT/ImageSets/Segmentation/<split>.txt    one image id per line
    ROOT/classes.txt                           optional: "background" then one class per line
    ROOT/cls_labels.csv                        optional: image_id,<class 1>,...,<class K>

Opening a dataset only checks that files exist (no image decoding), so the 10,582 ids of VOC
train_aug open in a fraction of a second; images and masks are decoded on access.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import AmrsegError
from ..fileio import save_image, write_text

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
IGNORE = 255  # the label of unknown pixels (VOC's object borders): not trained on, not scored
SHIPPED_DIR = Path(__file__).parent / "voc12"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# PIL raises these for missing, unidentifiable, truncated or otherwise corrupt files.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _voc_palette() -> np.ndarray:
    """The standard VOC colour map: the bits of the index interleaved into R, G, B."""
    idx = np.arange(256)
    cmap = np.zeros((256, 3), dtype=np.int64)
    for j in range(8):
        for ch in range(3):
            cmap[:, ch] |= ((idx >> (3 * j + ch)) & 1) << (7 - j)
    out = cmap.astype(np.uint8)
    out.flags.writeable = False
    return out


VOC_PALETTE = _voc_palette()  # [256, 3] uint8, read-only


# --------------------------------------------------------------------------- file helpers


def classes_present(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """bool [K]: which of the foreground classes 1..K occur in the mask (255 and 0 ignored)."""
    return np.bincount(mask.ravel(), minlength=256)[1:num_classes + 1] > 0


def write_label_index(out: Union[str, Path], class_names: Sequence[str], present: dict[str, np.ndarray]
                      ) -> dict[str, int]:
    """classes.txt and cls_labels.csv of a generated dataset; returns the images per class.

    class_names: the K foreground classes; present: {image id: `classes_present` of its mask}, in
    list order.
    """
    rows = [f"{iid}," + ",".join("1" if p else "0" for p in row) for iid, row in present.items()]
    write_text(Path(out) / "classes.txt", "\n".join(["background", *class_names]) + "\n")
    write_text(Path(out) / "cls_labels.csv", "\n".join([",".join(["image_id", *class_names]), *rows]) + "\n")
    counts = np.sum(list(present.values()), axis=0) if present else np.zeros(len(class_names), int)
    return {name: int(c) for name, c in zip(class_names, counts)}


def write_palette_png(path: Union[str, Path], mask: np.ndarray) -> None:
    """Writes a uint8 HxW label map as a VOC-palette PNG, atomically."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be a 2-D uint8 array, got {mask.dtype} {mask.shape}")
    img = Image.fromarray(mask, mode="P")
    img.putpalette(VOC_PALETTE.tobytes())
    save_image(img, path, format="PNG")


def read_mask(path: Union[str, Path]) -> np.ndarray:
    """Reads a palette (mode P) or grey (mode L) PNG as a uint8 HxW array of class indices.

    Raises:
        AmrsegError: the file cannot be read, or is not a palette/grey image (an RGB mask
            would need a colour lookup that silently guesses).
    """
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise AmrsegError(f"{path}: mask must be a palette (P) or grey (L) PNG, got mode {img.mode}")
            return np.array(img, dtype=np.uint8)
    except _PIL_ERRORS as e:
        raise AmrsegError(f"{path}: cannot read mask ({_first_line(e)})") from None


def read_image(path: Union[str, Path]) -> np.ndarray:
    """Reads any PIL-readable image as HxWx3 uint8 RGB."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except _PIL_ERRORS as e:
        raise AmrsegError(f"{path}: cannot read image ({_first_line(e)})") from None


def image_size(path: Union[str, Path]) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except _PIL_ERRORS as e:
        raise AmrsegError(f"{path}: cannot read image ({_first_line(e)})") from None
    return h, w


def read_classes(path: Union[str, Path]) -> list[str]:
    """Reads classes.txt: "background" first, then one unique class name per line."""
    path = Path(path)
    try:
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise AmrsegError(f"{path}: cannot read class names ({_first_line(e)})") from None
    if not names or names[0] != "background":
        raise AmrsegError(f"{path}: the first class must be 'background'")
    if len(names) < 2:
        raise AmrsegError(f"{path}: needs at least one class after 'background'")
    seen = set()
    for name in names:
        if name in seen:
            raise AmrsegError(f"{path}: class '{name}' is listed twice")
        if "," in name:
            raise AmrsegError(f"{path}: class '{name}' contains a comma")
        seen.add(name)
    return names


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# --------------------------------------------------------------------------- the dataset


@dataclass
class SegData:
    """A split of a segmentation dataset, opened but not decoded.

    Attributes:
        root: dataset root (or the image folder for `list_images`).
        split: split name.
        ids: image ids, in list order.
        class_names: background first, then the K foreground classes.
        labels: [N, K] uint8 multi-hot image-level labels over the foreground classes.
        mask_paths: per image, its mask file or None.
        image_paths: per image, its image file; defaults to ROOT/JPEGImages/<id>.jpg.
    """

    root: Path
    split: str
    ids: list[str]
    class_names: list[str]
    labels: Optional[np.ndarray]
    mask_paths: list[Optional[Path]]
    image_paths: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.image_paths:
            self.image_paths = [self.root / "JPEGImages" / f"{i}.jpg" for i in self.ids]
        n = len(self.ids)
        if len(self.image_paths) != n or len(self.mask_paths) != n:
            raise ValueError("ids, image_paths and mask_paths must have the same length")
        if self.labels is not None and self.labels.shape != (n, self.num_classes):
            raise ValueError(f"labels must be [{n}, {self.num_classes}], got {list(self.labels.shape)}")

    @property
    def num_classes(self) -> int:
        """K, the number of foreground classes."""
        return len(self.class_names) - 1

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        return self.image_paths[i]

    def load_image(self, i: int) -> np.ndarray:
        """HxWx3 uint8 RGB image i."""
        return read_image(self.image_paths[i])

    def load_mask(self, i: int) -> Optional[np.ndarray]:
        """HxW uint8 mask of image i (0..K or 255), or None when the image has none."""
        path = self.mask_paths[i]
        if path is None:
            return None
        return _read_checked_mask(path, image_size(self.image_paths[i]), self.num_classes)


def _read_checked_mask(path: Path, hw: tuple[int, int], num_classes: int) -> np.ndarray:
    """Reads a mask and checks its size against the image (hw) and its values against 0..K, 255."""
    mask = read_mask(path)
    if mask.shape != tuple(hw):
        raise AmrsegError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
                          f"{hw[1]}x{hw[0]}")
    bad = mask[(mask > num_classes) & (mask != IGNORE)]
    if bad.size:
        values = ", ".join(str(v) for v in np.unique(bad)[:10])
        raise AmrsegError(f"{path}: mask values {values} are outside 0..{num_classes} and {IGNORE}")
    return mask


def _mask_labels(mask_path: Path, image_path: Path, num_classes: int) -> np.ndarray:
    """Multi-hot [K] labels from the classes present in a mask (other than 0 and 255)."""
    mask = _read_checked_mask(mask_path, image_size(image_path), num_classes)
    counts = np.bincount(mask.ravel(), minlength=256)
    return (counts[1:num_classes + 1] > 0).astype(np.uint8)


def _listdir(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def _read_split(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AmrsegError(f"{path}: cannot read split list ({_first_line(e)})") from None
    ids = [ln.strip() for ln in lines if ln.strip()]
    if not ids:
        raise AmrsegError(f"{path}: split list is empty")
    seen = set()
    for i in ids:
        if i in seen:
            raise AmrsegError(f"{path}: image id '{i}' is listed twice")
        seen.add(i)
    return ids


def read_cls_labels(path: Path, class_names: Sequence[str], wanted: set[str]) -> dict[str, np.ndarray]:
    """Reads the rows of cls_labels.csv whose image_id is in `wanted`.

    Args:
        path: the csv; header image_id followed by the K foreground class names, in order.
        class_names: background first.
        wanted: the ids to return; other rows are skipped unparsed (the shipped VOC file has 12k).

    Returns:
        {image_id: [K] uint8 multi-hot}.
    """
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AmrsegError(f"{path}: cannot read class labels ({_first_line(e)})") from None
    expected = ["image_id", *class_names[1:]]
    header = [h.strip() for h in lines[0].split(",")] if lines else []
    if header != expected:
        raise AmrsegError(f"{path}: header must be '{','.join(expected)}'")
    k = len(class_names) - 1
    found_ids, rows, line_nos = [], [], []
    seen = set()
    for n, line in enumerate(lines[1:], start=2):
        image_id, _, rest = line.partition(",")
        image_id = image_id.strip()
        if not image_id:
            continue
        if image_id in seen:
            raise AmrsegError(f"{path}: line {n}: image_id '{image_id}' appears twice")
        seen.add(image_id)
        if image_id in wanted:
            found_ids.append(image_id)
            rows.append(rest)
            line_nos.append(n)
    if not rows:
        return {}
    fields = [r.split(",") for r in rows]
    for n, f in zip(line_nos, fields):
        if len(f) != k:
            raise AmrsegError(f"{path}: line {n}: expected {k} label values, got {len(f)}")
    try:
        values = np.array([v.strip() for f in fields for v in f], dtype=np.int64).reshape(len(rows), k)
    except ValueError:
        raise AmrsegError(f"{path}: label values must be 0 or 1") from None
    if ((values != 0) & (values != 1)).any():
        bad = int(np.flatnonzero(((values != 0) & (values != 1)).any(axis=1))[0])
        raise AmrsegError(f"{path}: line {line_nos[bad]}: label values must be 0 or 1")
    values = values.astype(np.uint8)
    return {image_id: values[j] for j, image_id in enumerate(found_ids)}


def open_dataset(root: Union[str, Path], split: str, require_labels: bool = True) -> SegData:
    """Opens a split of a VOC-style dataset (existence checks only; nothing is decoded).

    Args:
        root: the dataset root.
        split: the split name; its list is ROOT/ImageSets/Segmentation/<split>.txt, or the shipped
            VOC 2012 list when ROOT has none and uses the VOC classes.
        require_labels: True (training, evaluation): every image needs a label row or a mask.
            False (inference): images without either get an all-zero label row.

    Returns:
        The opened split.

    Raises:
        AmrsegError: a missing or malformed file, named in the one-line message.
    """
    root = Path(root)
    if not root.is_dir():
        raise AmrsegError(f"{root}: dataset root not found")
    classes_file = root / "classes.txt"
    has_classes = classes_file.is_file()
    class_names = read_classes(classes_file) if has_classes else list(VOC_CLASSES)
    k = len(class_names) - 1

    list_path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_path.is_file():
        shipped = SHIPPED_DIR / f"{split}.txt"
        if has_classes or not shipped.is_file():
            raise AmrsegError(f"{list_path}: split list not found")
        list_path = shipped
    ids = _read_split(list_path)

    # One directory listing instead of one stat per image keeps 10k ids fast.
    image_dir = root / "JPEGImages"
    image_names = _listdir(image_dir)
    image_paths, missing = [], []
    for i in ids:
        for suffix in (".jpg", ".png"):
            name = f"{i}{suffix}"
            if name in image_names or (image_dir / name).is_file():
                image_paths.append(image_dir / name)
                break
        else:
            missing.append(image_dir / f"{i}.jpg")
    if missing:
        more = f" ({len(missing) - 1} more of the {len(ids)} images in {list_path} are missing)" \
            if len(missing) > 1 else f" (listed in {list_path})"
        raise AmrsegError(f"{missing[0]}: image not found{more}")

    mask_dirs = [(root / d, _listdir(root / d)) for d in ("SegmentationClass", "SegmentationClassAug")]
    mask_paths: list[Optional[Path]] = []
    for i in ids:
        name = f"{i}.png"
        mask_paths.append(next((d / name for d, names in mask_dirs if name in names), None))

    wanted = set(ids)
    csv_path = root / "cls_labels.csv"
    if csv_path.is_file():
        table = read_cls_labels(csv_path, class_names, wanted)
    elif not has_classes:
        table = read_cls_labels(SHIPPED_DIR / "cls_labels.csv", class_names, wanted)
    else:
        table = {}

    labels = np.zeros((len(ids), k), dtype=np.uint8)
    for j, i in enumerate(ids):
        if i in table:
            labels[j] = table[i]
        elif mask_paths[j] is not None:
            labels[j] = _mask_labels(mask_paths[j], image_paths[j], k)
        elif require_labels:
            raise AmrsegError(f"{image_paths[j]}: no image-level label (not in cls_labels.csv) and no mask")
    if require_labels and not labels.any():
        raise AmrsegError(f"{list_path}: no image in split '{split}' has a positive label")
    return SegData(root=root, split=split, ids=ids, class_names=class_names, labels=labels,
                   mask_paths=mask_paths, image_paths=image_paths)


def list_images(folder: Union[str, Path],
                class_names: Union[Sequence[str], str, Path, None] = None) -> SegData:
    """A plain folder of .jpg/.jpeg/.png images as an unlabelled dataset (for inference).

    Args:
        folder: the folder; images are sorted by file name and the id is the file stem.
        class_names: background-first names, or a classes.txt path; default the VOC classes.

    Returns:
        SegData with all-zero labels, no masks and split "images".
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AmrsegError(f"{folder}: image folder not found")
    if class_names is None:
        names = list(VOC_CLASSES)
    elif isinstance(class_names, (str, Path)):
        names = read_classes(class_names)
    else:
        names = list(class_names)
        if len(names) < 2 or names[0] != "background" or len(set(names)) != len(names):
            raise ValueError("class_names must be 'background' then unique foreground names")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise AmrsegError(f"{folder}: no .jpg, .jpeg or .png images")
    ids = [p.stem for p in paths]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise AmrsegError(f"{folder}: two images share the name '{dup}' (ids are file stems)")
    labels = np.zeros((len(ids), len(names) - 1), dtype=np.uint8)
    return SegData(root=folder, split="images", ids=ids, class_names=names, labels=labels,
                   mask_paths=[None] * len(ids), image_paths=paths)


def dataset_info(data: SegData) -> dict:
    """Summary for `amrseg dataset-info` (CONTRACT.md)."""
    labels = data.labels if data.labels is not None else np.zeros((len(data), data.num_classes), np.uint8)
    counts = labels.astype(np.int64).sum(axis=0)
    return {
        "num_images": len(data),
        "num_classes": len(data.class_names),
        "class_names": list(data.class_names),
        "images_per_class": {name: int(c) for name, c in zip(data.class_names[1:], counts)},
    }
