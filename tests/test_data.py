"""VOC-style dataset opening, labels, masks and the training transforms, on tiny generated roots."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from amrseg.config import DataConfig
from amrseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, CamTrainDataset, normalize, train_transform
from amrseg.data.voc import (
    SHIPPED_DIR, VOC_CLASSES, VOC_PALETTE, dataset_info, list_images, open_dataset, read_mask,
    write_palette_png,
)
from amrseg.errors import AmrsegError

W, H = 32, 24


def _image(seed: int, w: int = W, h: int = H) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(values: dict, w: int = W, h: int = H) -> np.ndarray:
    """A mask whose rows are split into bands, one band per (class: rows) entry."""
    m = np.zeros((h, w), dtype=np.uint8)
    for cls, (r0, r1) in values.items():
        m[r0:r1] = cls
    return m


def make_root(tmp_path, masks: dict, split: str = "train", extra_ids=(), classes=None, csv=None,
              aug: dict = None):
    """Writes ROOT with JPEGs for masks' ids and extra_ids, masks, a split list, and optional files."""
    root = tmp_path / "root"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    ids = list(masks) + list(extra_ids)
    for n, i in enumerate(ids):
        Image.fromarray(_image(n)).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
    for i, m in masks.items():
        write_palette_png(root / "SegmentationClass" / f"{i}.png", m)
    if aug:
        (root / "SegmentationClassAug").mkdir()
        for i, m in aug.items():
            write_palette_png(root / "SegmentationClassAug" / f"{i}.png", m)
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    if csv is not None:
        (root / "cls_labels.csv").write_text(csv)
    return root


def _touch_images(root, ids) -> None:
    """Empty JPEGImages/<id>.jpg files: opening a dataset only checks that they exist."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for i in ids:  # os.open is ~20x faster than Path.touch for thousands of files
        os.close(os.open(root / "JPEGImages" / f"{i}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


def _hot(k: int, *classes: int) -> list:
    row = [0] * k
    for c in classes:
        row[c - 1] = 1
    return row


# --------------------------------------------------------------------------- palette and masks


def test_voc_classes_and_palette_standard_values():
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background"
    assert VOC_CLASSES[1] == "aeroplane" and VOC_CLASSES[15] == "person" and VOC_CLASSES[20] == "tvmonitor"
    # Colours of the official VOC devkit colour map.
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    assert VOC_PALETTE[0].tolist() == [0, 0, 0]
    assert VOC_PALETTE[1].tolist() == [128, 0, 0]
    assert VOC_PALETTE[2].tolist() == [0, 128, 0]
    assert VOC_PALETTE[4].tolist() == [0, 0, 128]
    assert VOC_PALETTE[15].tolist() == [192, 128, 128]
    assert VOC_PALETTE[20].tolist() == [0, 64, 128]
    assert VOC_PALETTE[255].tolist() == [224, 224, 192]


def test_palette_png_round_trip(tmp_path):
    m = _mask({1: (0, 5), 15: (5, 10), 255: (10, 12)})
    path = tmp_path / "m.png"
    write_palette_png(path, m)
    with Image.open(path) as img:
        assert img.mode == "P"
        assert np.array(img.convert("RGB"))[0, 0].tolist() == [128, 0, 0]
    np.testing.assert_array_equal(read_mask(path), m)
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind
    Image.fromarray(m, mode="L").save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "grey.png"), m)


def test_read_mask_rejects_rgb_and_garbage(tmp_path):
    Image.fromarray(_image(0)).save(tmp_path / "rgb.png")
    with pytest.raises(AmrsegError, match=r"rgb\.png.*mode RGB"):
        read_mask(tmp_path / "rgb.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(AmrsegError, match=r"junk\.png: cannot read mask"):
        read_mask(tmp_path / "junk.png")


# --------------------------------------------------------------------------- labels


def test_labels_derived_from_masks(tmp_path):
    masks = {
        "a": _mask({1: (0, 5), 15: (5, 10), 255: (10, 11)}),
        "b": _mask({255: (0, 3)}),  # background and ignore only: no class
        "c": _mask({20: (2, 20)}),
    }
    data = open_dataset(make_root(tmp_path, masks), "train")
    assert data.ids == ["a", "b", "c"] and data.class_names == list(VOC_CLASSES) and data.num_classes == 20
    assert data.labels.dtype == np.uint8
    assert data.labels.tolist() == [_hot(20, 1, 15), _hot(20), _hot(20, 20)]
    np.testing.assert_array_equal(data.load_mask(0), masks["a"])
    img = data.load_image(2)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert len(data) == 3 and data.image_path(1).name == "b.jpg"


def test_classes_txt(tmp_path):
    masks = {"x": _mask({1: (0, 4)}), "y": _mask({2: (0, 4), 1: (4, 8)})}
    root = make_root(tmp_path, masks, classes=["background", "cat", "dog"])
    data = open_dataset(root, "train")
    assert data.class_names == ["background", "cat", "dog"] and data.num_classes == 2
    assert data.labels.tolist() == [[1, 0], [1, 1]]
    # A value beyond K = 2 is now out of range.
    write_palette_png(root / "SegmentationClass" / "x.png", _mask({3: (0, 4)}))
    with pytest.raises(AmrsegError, match=r"x\.png: mask values 3 are outside 0\.\.2"):
        open_dataset(root, "train")


@pytest.mark.parametrize("lines, why", [
    (["cat", "dog"], "first class must be 'background'"),
    (["background", "cat", "cat"], "'cat' is listed twice"),
    (["background"], "at least one class"),
])
def test_bad_classes_txt(tmp_path, lines, why):
    root = make_root(tmp_path, {"x": _mask({1: (0, 4)})}, classes=lines)
    with pytest.raises(AmrsegError, match=r"classes\.txt: .*" + why):
        open_dataset(root, "train")


def test_cls_labels_csv(tmp_path):
    classes = ["background", "cat", "dog"]
    masks = {"x": _mask({1: (0, 4)}), "y": _mask({2: (0, 4)})}
    # The csv is authoritative where it has a row; "y" has none and falls back to its mask.
    csv = "image_id,cat,dog\nx,1,1\nunused,0,1\n"
    data = open_dataset(make_root(tmp_path, masks, classes=classes, csv=csv), "train")
    assert data.labels.tolist() == [[1, 1], [0, 1]]


def test_cls_labels_csv_errors(tmp_path):
    classes = ["background", "cat", "dog"]
    root = make_root(tmp_path, {"x": _mask({1: (0, 4)})}, extra_ids=["nomask"], classes=classes,
                     csv="image_id,cat,dog\nx,1,0\n")
    with pytest.raises(AmrsegError, match=r"nomask\.jpg: no image-level label"):
        open_dataset(root, "train")
    data = open_dataset(root, "train", require_labels=False)
    assert data.labels.tolist() == [[1, 0], [0, 0]] and data.mask_paths[1] is None
    (root / "cls_labels.csv").write_text("image_id,dog,cat\nx,1,0\n")
    with pytest.raises(AmrsegError, match=r"cls_labels\.csv: header must be 'image_id,cat,dog'"):
        open_dataset(root, "train")
    (root / "cls_labels.csv").write_text("image_id,cat,dog\nx,1\nnomask,0,1\n")
    with pytest.raises(AmrsegError, match=r"cls_labels\.csv: line 2: expected 2 label values"):
        open_dataset(root, "train")
    (root / "cls_labels.csv").write_text("image_id,cat,dog\nx,1,2\nnomask,0,1\n")
    with pytest.raises(AmrsegError, match=r"cls_labels\.csv: line 2: label values must be 0 or 1"):
        open_dataset(root, "train")


def test_mask_dirs_priority_and_png_images(tmp_path):
    root = make_root(tmp_path, {"a": _mask({1: (0, 4)})}, extra_ids=["b", "c"],
                     aug={"a": _mask({2: (0, 4)}), "b": _mask({3: (0, 4)})})
    # An image stored as .png when there is no .jpg.
    (root / "JPEGImages" / "c.jpg").unlink()
    Image.fromarray(_image(9)).save(root / "JPEGImages" / "c.png")
    data = open_dataset(root, "train", require_labels=False)
    assert data.mask_paths[0] == root / "SegmentationClass" / "a.png"
    assert data.mask_paths[1] == root / "SegmentationClassAug" / "b.png"
    assert data.mask_paths[2] is None and data.image_path(2).name == "c.png"
    assert data.labels.tolist() == [_hot(20, 1), _hot(20, 3), _hot(20)]
    np.testing.assert_array_equal(data.load_image(2), _image(9))  # PNG is lossless
    assert data.load_mask(2) is None


# --------------------------------------------------------------------------- shipped lists


def test_shipped_val_list_reports_missing_images(tmp_path):
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    first = (SHIPPED_DIR / "val.txt").read_text().split()[0]
    with pytest.raises(AmrsegError, match=rf"JPEGImages/{first}\.jpg: image not found \(1448 more of the 1449"):
        open_dataset(root, "val")


def test_shipped_val_list_opens(tmp_path):
    root = tmp_path / "voc"
    ids = (SHIPPED_DIR / "val.txt").read_text().split()
    _touch_images(root, ids)
    data = open_dataset(root, "val")
    assert len(data) == 1449 and data.ids == ids
    shipped = {ln.split(",")[0]: ln.split(",")[1:] for ln in (SHIPPED_DIR / "cls_labels.csv").read_text().split()}
    for j in (0, 700, 1448):
        assert data.labels[j].tolist() == [int(v) for v in shipped[ids[j]]]
    assert all(p is None for p in data.mask_paths)


def test_shipped_train_aug_opens_without_a_call_per_image(tmp_path, monkeypatch):
    # Fast by construction, not by a clock (a timed test fails on a loaded machine): the images are
    # checked against one listing of JPEGImages/, never stat-ed one by one.
    root = tmp_path / "voc"
    ids = (SHIPPED_DIR / "train_aug.txt").read_text().split()
    _touch_images(root, ids)
    stats = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):  # Path.stat, Path.exists and os.path.* all come here
        stats.append(path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    data = open_dataset(root, "train_aug")
    monkeypatch.undo()
    assert len(data) == 10582 and data.labels.shape == (10582, 20)
    assert data.labels.sum(axis=1).min() >= 1  # every VOC image has an object
    assert len(stats) < 50, f"{len(stats)} stat calls for 10,582 images"


def test_shipped_test_list_needs_require_labels_false(tmp_path):
    root = tmp_path / "voc"
    ids = (SHIPPED_DIR / "test.txt").read_text().split()
    _touch_images(root, ids)
    with pytest.raises(AmrsegError, match=rf"{ids[0]}\.jpg: no image-level label"):
        open_dataset(root, "test")
    data = open_dataset(root, "test", require_labels=False)
    assert len(data) == 1456 and data.labels.shape == (1456, 20) and not data.labels.any()


# --------------------------------------------------------------------------- bad input


def test_missing_root(tmp_path):
    with pytest.raises(AmrsegError, match=r"nowhere: dataset root not found"):
        open_dataset(tmp_path / "nowhere", "train")


def test_missing_split_list(tmp_path):
    root = make_root(tmp_path, {"a": _mask({1: (0, 4)})})
    with pytest.raises(AmrsegError, match=r"ImageSets/Segmentation/mysplit\.txt: split list not found"):
        open_dataset(root, "mysplit")
    # With its own classes, a root never falls back to the shipped VOC lists.
    (root / "classes.txt").write_text("background\ncat\n")
    with pytest.raises(AmrsegError, match=r"ImageSets/Segmentation/val\.txt: split list not found"):
        open_dataset(root, "val")


def test_listed_image_missing(tmp_path):
    root = make_root(tmp_path, {"a": _mask({1: (0, 4)}), "b": _mask({1: (0, 4)})})
    (root / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(AmrsegError, match=r"JPEGImages/b\.jpg: image not found \(listed in .*train\.txt\)"):
        open_dataset(root, "train")


def test_unreadable_image_at_load(tmp_path):
    root = make_root(tmp_path, {"a": _mask({1: (0, 4)})}, extra_ids=["bad", "cut"])
    (root / "JPEGImages" / "bad.jpg").write_bytes(b"\x00garbage bytes, not a JPEG")
    full = (root / "JPEGImages" / "a.jpg").read_bytes()
    (root / "JPEGImages" / "cut.jpg").write_bytes(full[: len(full) // 2])
    data = open_dataset(root, "train", require_labels=False)  # opening decodes nothing
    with pytest.raises(AmrsegError, match=r"bad\.jpg: cannot read image \(") as e:
        data.load_image(1)
    assert "\n" not in str(e.value)
    with pytest.raises(AmrsegError, match=r"cut\.jpg: cannot read image \("):
        data.load_image(2)


def test_mask_size_differs(tmp_path):
    root = make_root(tmp_path, {"a": _mask({1: (0, 4)}, w=30)})
    with pytest.raises(AmrsegError, match=r"a\.png: mask is 30x24 \(WxH\) but its image is 32x24"):
        open_dataset(root, "train")
    # With a label row the mask is not read at open, but load_mask still checks it.
    (root / "cls_labels.csv").write_text("image_id," + ",".join(VOC_CLASSES[1:]) + "\na," +
                                         ",".join(map(str, _hot(20, 1))) + "\n")
    data = open_dataset(root, "train")
    with pytest.raises(AmrsegError, match=r"a\.png: mask is 30x24"):
        data.load_mask(0)


def test_mask_value_out_of_range(tmp_path):
    root = make_root(tmp_path, {"a": _mask({1: (0, 4), 21: (4, 6), 200: (6, 7)})})
    with pytest.raises(AmrsegError, match=r"a\.png: mask values 21, 200 are outside 0\.\.20 and 255"):
        open_dataset(root, "train")


def test_empty_split(tmp_path):
    root = make_root(tmp_path, {"a": _mask({1: (0, 4)})})
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n  \n")
    with pytest.raises(AmrsegError, match=r"train\.txt: split list is empty"):
        open_dataset(root, "train")


def test_split_without_positive_label(tmp_path):
    root = make_root(tmp_path, {"a": _mask({}), "b": _mask({255: (0, 2)})})
    with pytest.raises(AmrsegError, match=r"train\.txt: no image in split 'train' has a positive label"):
        open_dataset(root, "train")
    data = open_dataset(root, "train", require_labels=False)
    assert data.labels.shape == (2, 20) and not data.labels.any()


# --------------------------------------------------------------------------- folders and info


def test_list_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_image(1)).save(folder / "b.png")
    Image.fromarray(_image(2)).convert("RGBA").save(folder / "a.png")
    Image.fromarray(_image(3)).save(folder / "c.JPEG")
    (folder / "notes.txt").write_text("not an image")
    data = list_images(folder)
    assert data.ids == ["a", "b", "c"] and data.class_names == list(VOC_CLASSES)
    assert data.labels.shape == (3, 20) and not data.labels.any()
    assert data.mask_paths == [None] * 3 and data.load_mask(0) is None
    np.testing.assert_array_equal(data.load_image(0), _image(2))  # RGBA -> RGB
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n")
    assert list_images(folder, tmp_path / "classes.txt").labels.shape == (3, 2)
    assert list_images(folder, ["background", "x"]).num_classes == 1
    with pytest.raises(AmrsegError, match=r"empty: no \.jpg, \.jpeg or \.png images"):
        (tmp_path / "empty").mkdir()
        list_images(tmp_path / "empty")
    with pytest.raises(AmrsegError, match=r"missing: image folder not found"):
        list_images(tmp_path / "missing")


def test_dataset_info_counts(tmp_path):
    masks = {
        "a": _mask({1: (0, 4), 2: (4, 8)}),
        "b": _mask({2: (0, 4)}),
        "c": _mask({2: (0, 4), 3: (4, 8)}),
        "d": _mask({}),
    }
    info = dataset_info(open_dataset(make_root(tmp_path, masks, classes=["background", "p", "q", "r", "s"]),
                                     "train"))
    assert info == {
        "num_images": 4,
        "num_classes": 5,
        "class_names": ["background", "p", "q", "r", "s"],
        "images_per_class": {"p": 1, "q": 3, "r": 1, "s": 0},
    }


# --------------------------------------------------------------------------- transforms


class _StubRng:
    """Controls train_transform: the smallest long side, a fixed flip draw, zero crop offsets."""

    def __init__(self, flip_draw: float):
        self.flip_draw = flip_draw

    def integers(self, low, high=None):
        return low if high is not None else 0

    def random(self):
        return self.flip_draw


def test_normalize_by_hand():
    img = np.array([[[255, 0, 128], [0, 0, 0]]], dtype=np.uint8)  # 1x2
    x = normalize(img)
    assert img.tolist() == [[[255, 0, 128], [0, 0, 0]]]  # input untouched
    assert x.shape == (3, 1, 2) and x.dtype == torch.float32
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert x[:, 0, 0].tolist() == pytest.approx(expected, rel=1e-6)
    assert x[:, 0, 1].tolist() == pytest.approx([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], rel=1e-6)


def test_train_transform_pads_small_image_with_zeros():
    img = np.full((20, 10, 3), 200, dtype=np.uint8)  # long side 20 -> 16 with scale 0.5 of crop 32
    cfg = DataConfig(scale_range=[0.5, 0.5], crop=32, hflip=True)
    offsets = set()
    for seed in range(5):
        x = train_transform(img, np.random.default_rng(seed), cfg)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        inside = (x != 0).all(dim=0)
        rows, cols = torch.nonzero(inside, as_tuple=True)
        top, left = int(rows.min()), int(cols.min())
        assert (int(rows.max()) - top + 1, int(cols.max()) - left + 1) == (16, 8)
        assert inside[top:top + 16, left:left + 8].all()
        outside = x.clone()
        outside[:, top:top + 16, left:left + 8] = 0
        assert not outside.any()  # exactly zero everywhere else, in every channel
        expected = normalize(np.full((1, 1, 3), 200, dtype=np.uint8))[:, 0, 0]
        assert torch.allclose(x[:, top + 8, left + 4], expected)
        offsets.add((top, left))
    assert len({t for t, _ in offsets}) > 1 and len({l for _, l in offsets}) > 1  # random offsets


def test_train_transform_crops_a_window_of_large_images():
    img = _image(5, w=64, h=48)  # long side 64 == 2 * crop: no resize
    cfg = DataConfig(scale_range=[2.0, 2.0], crop=32, hflip=False)
    x = train_transform(img, np.random.default_rng(3), cfg)
    full = normalize(img)
    matches = [(t, l) for t in range(48 - 32 + 1) for l in range(64 - 32 + 1)
               if torch.equal(full[:, t:t + 32, l:l + 32], x)]
    assert len(matches) == 1


def test_train_transform_resizes_long_side_in_range():
    img = np.full((30, 60, 3), 90, dtype=np.uint8)
    cfg = DataConfig(scale_range=[0.25, 0.5], crop=64, hflip=False)
    widths = set()
    for seed in range(20):
        x = train_transform(img, np.random.default_rng(seed), cfg)
        widths.add(int((x != 0).all(dim=0).any(dim=0).sum()))
    assert widths and all(16 <= w <= 32 for w in widths) and len(widths) > 3


def test_hflip_flips():
    img = _image(7, w=32, h=32)
    cfg = DataConfig(scale_range=[1.0, 1.0], crop=32, hflip=True)
    flipped = train_transform(img, _StubRng(0.1), cfg)
    kept = train_transform(img, _StubRng(0.9), cfg)
    assert torch.equal(kept, normalize(img))
    assert torch.equal(flipped, normalize(img[:, ::-1].copy()))
    assert not torch.equal(flipped, kept)
    cfg_off = DataConfig(scale_range=[1.0, 1.0], crop=32, hflip=False)
    assert torch.equal(train_transform(img, _StubRng(0.1), cfg_off), normalize(img))


def test_cam_train_dataset_determinism(tmp_path):
    masks = {f"i{n}": _mask({n + 1: (0, 10)}) for n in range(3)}
    data = open_dataset(make_root(tmp_path, masks), "train")
    cfg = DataConfig(scale_range=[0.5, 1.5], crop=24, hflip=True)
    ds = CamTrainDataset(data, cfg, seed=4)
    x0, y0, i0 = ds[1]
    assert x0.shape == (3, 24, 24) and x0.dtype == torch.float32 and i0 == 1
    assert y0.dtype == torch.float32 and y0.tolist() == [float(v) for v in _hot(20, 2)]
    assert torch.equal(ds[1][0], x0)
    assert torch.equal(CamTrainDataset(data, cfg, seed=4)[1][0], x0)  # a fresh copy, as in a worker
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], x0)
    ds.set_epoch(0)
    assert torch.equal(ds[1][0], x0)
    assert not torch.equal(CamTrainDataset(data, cfg, seed=5)[1][0], x0)
    assert len(ds) == 3
