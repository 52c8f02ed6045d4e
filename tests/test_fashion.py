"""Fashion-MNIST scenes and items, on tiny fake IDX files (never the real data set)."""
import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from amrseg.data import fashion
from amrseg.data.fashion import (
    FMNIST_CLASSES, ItemDataset, border_band, build_scenes, find_fmnist, load_fmnist, paint_item, read_idx,
    render_background, render_scene,
)
from amrseg.data.voc import dataset_info, open_dataset, read_mask
from amrseg.errors import AmrsegError

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}


def write_idx(path, arr: np.ndarray) -> None:
    """IDX writer independent of read_idx: magic 0x00 0x00 <type> <ndim>, big-endian dims, data."""
    arr = np.asarray(arr)
    header = bytes([0, 0, _CODES[arr.dtype], arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def fake_items(n: int, classes: list, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 items: filled rectangles or discs of random size, bright enough to be labelled."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        r = rng.integers(6, 13)
        if i % 2:
            shape = (np.abs(yy - 14) <= r) & (np.abs(xx - 14) <= r - 3)
        else:
            shape = (yy - 14) ** 2 + (xx - 14) ** 2 <= r * r
        images[i][shape] = rng.integers(150, 256)
    labels = np.array([classes[i % len(classes)] for i in range(n)], dtype=np.uint8)
    return images, labels


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
    """Fake Fashion-MNIST: train items only of classes 0..4, t10k items only of classes 5..9."""
    folder = tmp_path_factory.mktemp("fmnist")
    for part, classes, n in (("train", [0, 1, 2, 3, 4], 50), ("t10k", [5, 6, 7, 8, 9], 20)):
        images, labels = fake_items(n, classes, seed=len(part))
        write_idx(folder / f"{part}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{part}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, fmnist_dir):
    out = tmp_path_factory.mktemp("scenes") / "root"
    calls = []
    info = build_scenes(out, fmnist=fmnist_dir, n_train=12, n_val=6, size=64, seed=0, progress=calls.append)
    return out, info, calls


# --------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_read_idx_round_trip(tmp_path, name):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, arr)
    out = read_idx(tmp_path / name)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    ints = np.array([1, -2, 70000, 3], dtype=np.int32)
    write_idx(tmp_path / ("i" + name), ints)
    np.testing.assert_array_equal(read_idx(tmp_path / ("i" + name)), ints)  # big-endian on disk


def test_read_idx_errors(tmp_path):
    (tmp_path / "magic.idx").write_bytes(b"\x00\x01\x08\x01" + struct.pack(">I", 2) + b"\x01\x02")
    with pytest.raises(AmrsegError, match=r"magic\.idx: not an IDX file \(bad magic number"):
        read_idx(tmp_path / "magic.idx")
    (tmp_path / "short.idx").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x01\x02")
    with pytest.raises(AmrsegError, match=r"short\.idx: corrupt IDX file"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "junk.gz").write_bytes(b"this is not gzip data")
    with pytest.raises(AmrsegError, match=r"junk\.gz: cannot read IDX file"):
        read_idx(tmp_path / "junk.gz")


def test_find_and_load_fmnist(tmp_path, fmnist_dir, monkeypatch):
    assert find_fmnist(fmnist_dir) == fmnist_dir
    monkeypatch.setenv("AMRSEG_FMNIST", str(fmnist_dir))
    assert find_fmnist() == fmnist_dir
    monkeypatch.setenv("AMRSEG_FMNIST", str(tmp_path))
    with pytest.raises(AmrsegError) as e:
        find_fmnist()
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: ") and "apt-get install dataset-fashion-mnist" in msg
    assert "github.com/zalandoresearch/fashion-mnist" in msg and "--fmnist DIR" in msg and "\n" not in msg
    images, labels = load_fmnist(fmnist_dir, "t10k")
    assert images.shape == (20, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and set(labels.tolist()) == {5, 6, 7, 8, 9}


# --------------------------------------------------------------------------- rendering


def _slow_band(raw: np.ndarray) -> np.ndarray:
    h, w = raw.shape
    out = raw.copy()
    for y in range(h):
        for x in range(w):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and raw[yy, xx] != raw[y, x]:
                        out[y, x] = 255
    return out


def test_border_band_matches_slow_reference():
    raw = np.zeros((12, 15), dtype=np.uint8)
    raw[2:7, 3:9] = 4
    raw[5:11, 7:14] = 2
    raw[0, 0] = 1
    np.testing.assert_array_equal(border_band(raw), _slow_band(raw))
    assert (border_band(np.full((5, 5), 3, np.uint8)) == 3).all()  # the image edge is not a border


def test_render_scene_ground_truth(fmnist_dir):
    images, labels = load_fmnist(fmnist_dir, "train")
    for i in range(6):
        image, raw = render_scene(np.random.default_rng([1, i]), 48, images, labels)
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8 and raw.shape == (48, 48)
        mask = border_band(raw)
        np.testing.assert_array_equal(mask, _slow_band(raw))
        counts = np.bincount(mask.ravel(), minlength=256)
        present = [c for c in range(1, 11) if counts[c]]
        assert 1 <= len(present) <= 3 and set(present) <= {1, 2, 3, 4, 5}
        assert all(counts[c] >= fashion.MIN_VISIBLE for c in present)


def test_render_scene_refuses_invisible_items():
    images = np.zeros((4, 28, 28), dtype=np.uint8)  # blank items: nothing above the alpha threshold
    with pytest.raises(AmrsegError, match="cannot place visible items"):
        render_scene(np.random.default_rng(0), 64, images, np.arange(4))


def test_later_items_occlude_earlier_ones():
    background = render_background(np.random.default_rng(3), 64)
    assert background.shape == (64, 64, 3) and background.dtype == np.float32
    assert 0.0 <= background.min() and background.max() <= 1.0 and background.std() > 0.01  # not uniform
    full = np.full((28, 28), 255, dtype=np.uint8)  # alpha 1 everywhere: a square item
    for seed in range(50):
        # The same seed paints the same first item, alone and then under a second one.
        c1, r1 = background.copy(), np.zeros((64, 64), np.uint8)
        paint_item(c1, r1, full, 2, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        c2, r2 = background.copy(), np.zeros((64, 64), np.uint8)
        paint_item(c2, r2, full, 2, rng)
        paint_item(c2, r2, full, 7, rng)
        first, second = r1 == 3, r2 == 8
        overlap = first & second
        if not overlap.any() or overlap.sum() == first.sum():
            continue
        rows, cols = np.nonzero(second)
        box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        assert second[box].all()  # the last item is whole
        assert np.allclose(c2[box], c2[box][0, 0], atol=1e-6)  # in one opaque colour over the first
        np.testing.assert_array_equal(r2 == 3, first & ~second)  # the first keeps what stays visible
        np.testing.assert_array_equal(c2[first & ~second], c1[first & ~second])
        np.testing.assert_array_equal(c2[~first & ~second], background[~first & ~second])
        return
    pytest.fail("no partly overlapping pair drawn")


def test_item_intensity_sets_opacity_and_modulates_the_colour():
    background = render_background(np.random.default_rng(0), 64)
    painted = {}
    for value in (255, 100):
        c, r = background.copy(), np.zeros((64, 64), np.uint8)
        paint_item(c, r, np.full((28, 28), value, np.uint8), 0, np.random.default_rng(9))
        painted[value] = (c, r)
    inside = painted[255][1] == 1
    assert inside.any() and (painted[100][1] == 1).sum() == inside.sum()  # 100/255 is above the threshold
    a = np.float32(100 / 255)
    colour = painted[255][0][inside]  # intensity 1: opaque, the colour itself
    opacity = 2 * a  # min(1, 2a)
    expected = (1 - opacity) * background[inside] + opacity * colour * (0.3 + 0.7 * a)
    np.testing.assert_allclose(painted[100][0][inside], expected, atol=1e-5)


# --------------------------------------------------------------------------- scenes dataset


def _labels_csv(root) -> dict:
    lines = (root / "cls_labels.csv").read_text().split()
    assert lines[0] == "image_id," + ",".join(FMNIST_CLASSES)
    return {ln.split(",")[0]: [int(v) for v in ln.split(",")[1:]] for ln in lines[1:]}


def test_build_scenes_files(scenes):
    root, info, calls = scenes
    train_ids = [f"train_{i:06d}" for i in range(12)]
    val_ids = [f"val_{i:06d}" for i in range(6)]
    assert (root / "ImageSets/Segmentation/train.txt").read_text().split() == train_ids
    assert (root / "ImageSets/Segmentation/val.txt").read_text().split() == val_ids
    assert (root / "classes.txt").read_text().split() == ["background", *FMNIST_CLASSES]
    assert calls == [1] * 18
    assert not list(root.rglob(".*tmp"))
    table = _labels_csv(root)
    assert sorted(table) == sorted(train_ids + val_ids)
    for image_id, row in table.items():
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as img:
            assert img.format == "JPEG" and img.size == (64, 64) and img.mode == "RGB"
        with Image.open(root / "SegmentationClass" / f"{image_id}.png") as m:
            assert m.mode == "P"
        mask = read_mask(root / "SegmentationClass" / f"{image_id}.png")
        values = set(np.unique(mask).tolist())
        assert values <= set(range(11)) | {255}
        present = [c for c in range(1, 11) if c in values]
        assert row == [int(c in present) for c in range(1, 11)]  # labels = classes visible in the mask
        assert 1 <= len(present) <= 3
        # train items come from the train part (classes 0..4), val items from t10k (5..9).
        assert set(present) <= ({1, 2, 3, 4, 5} if image_id.startswith("train") else {6, 7, 8, 9, 10})
        counts = np.bincount(mask.ravel(), minlength=256)
        assert all(counts[c] >= fashion.MIN_VISIBLE for c in present)
        # The 255 band separates regions: no two different labels touch in the 8-neighbourhood.
        p = np.pad(mask, 1, mode="edge")
        for dy in range(3):
            for dx in range(3):
                nb = p[dy:dy + 64, dx:dx + 64]
                assert not ((nb != mask) & (nb != 255) & (mask != 255)).any()
        assert (mask == 255).any()
    assert info["num_images"] == {"train": 12, "val": 6}
    assert info["class_names"] == ["background", *FMNIST_CLASSES]


def test_build_scenes_deterministic(scenes, fmnist_dir, tmp_path):
    root, _, _ = scenes
    again, other = tmp_path / "again", tmp_path / "other"
    build_scenes(again, fmnist=fmnist_dir, n_train=12, n_val=6, size=64, seed=0)
    build_scenes(other, fmnist=fmnist_dir, n_train=12, n_val=6, size=64, seed=1)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert len(files) == 2 * 18 + 4
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    jpegs = [rel for rel in files if rel.suffix == ".jpg"]
    assert all((root / rel).read_bytes() != (other / rel).read_bytes() for rel in jpegs) and len(jpegs) == 18


def test_build_scenes_opens_as_dataset(scenes):
    root, info, _ = scenes
    data = open_dataset(root, "train")
    assert len(data) == 12 and data.class_names == ["background", *FMNIST_CLASSES]
    table = _labels_csv(root)
    by_hand = np.array([table[i] for i in data.ids]).sum(axis=0)
    out = dataset_info(data)
    assert out["num_images"] == 12 and out["num_classes"] == 11
    assert out["images_per_class"] == {n: int(c) for n, c in zip(FMNIST_CLASSES, by_hand)}
    val = open_dataset(root, "val")
    assert len(val) == 6 and val.load_image(0).shape == (64, 64, 3) and val.load_mask(0).shape == (64, 64)
    train_and_val = by_hand + np.array([table[i] for i in val.ids]).sum(axis=0)
    assert info["images_per_class"] == {n: int(c) for n, c in zip(FMNIST_CLASSES, train_and_val)}


def test_build_scenes_bad_arguments(tmp_path, fmnist_dir):
    with pytest.raises(AmrsegError, match=r"--size 16"):
        build_scenes(tmp_path / "o", fmnist=fmnist_dir, n_train=2, n_val=1, size=16)
    with pytest.raises(AmrsegError, match=r"--val 0"):
        build_scenes(tmp_path / "o", fmnist=fmnist_dir, n_train=2, n_val=0, size=64)
    with pytest.raises(AmrsegError, match=r"Fashion-MNIST not found"):
        build_scenes(tmp_path / "o", fmnist=tmp_path, n_train=2, n_val=1, size=64)


# --------------------------------------------------------------------------- pretraining items


def test_item_dataset(fmnist_dir):
    images, labels = load_fmnist(fmnist_dir, "train")
    ds = ItemDataset(images, labels, size=48, seed=2)
    assert len(ds) == 50
    x, y = ds[3]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and y == int(labels[3]) and isinstance(y, int)
    assert torch.equal(ItemDataset(images, labels, size=48, seed=2)[3][0], x)
    assert not torch.equal(ds[4][0], x)
    ds.set_epoch(1)
    x1 = ds[3][0]
    assert not torch.equal(x1, x)
    assert torch.equal(ItemDataset(images, labels, size=48, seed=2, epoch=1)[3][0], x1)


def test_build_fashion_scenes_is_build_scenes_source_fashion(fmnist_dir, tmp_path):
    from amrseg.cli import main

    args = ["--fmnist", str(fmnist_dir), "--train", "3", "--val", "2", "--size", "64", "--seed", "4"]
    assert main(["build-fashion-scenes", str(tmp_path / "a"), *args]) == 0
    assert main(["build-scenes", str(tmp_path / "b"), "--source", "fashion", *args]) == 0
    build_scenes(tmp_path / "c", fmnist=fmnist_dir, n_train=3, n_val=2, size=64, seed=4)
    files = sorted(p.relative_to(tmp_path / "c") for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert len(files) == 2 * 5 + 4  # an image and a mask per scene; 2 split lists, classes, labels
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "c" / rel).read_bytes() == \
            (tmp_path / "b" / rel).read_bytes()


def test_pretrain_backbone_fashion_keeps_its_recipe(fmnist_dir, tmp_path):
    from amrseg.engine.pretrain import PretrainConfig, pretrain_backbone

    cfg = PretrainConfig.for_source("fashion")
    assert (cfg.epochs, cfg.size, cfg.items, cfg.batch_size, cfg.label_smoothing) == (2, 96, 12000, 64, 0.0)
    assert PretrainConfig.for_source("fashion", epochs=None, size=48).size == 48
    cfg = PretrainConfig.for_source("fashion", base_width=8, epochs=1, size=32, items=32, batch_size=16,
                                    num_workers=0)
    summary = pretrain_backbone(tmp_path / "w.pt", cfg, fmnist=str(fmnist_dir), show_progress=False)
    assert summary["num_classes"] == 10 and summary["test_items"] == 20  # the fake t10k holds 20 items
    assert 0.0 <= summary["test_accuracy"] <= summary["test_top5"] <= 1.0
    assert torch.load(tmp_path / "w.pt", weights_only=True)["fc.weight"].shape == (10, 64)


def _small_recipe(**overrides):
    from amrseg.engine.pretrain import PretrainConfig

    # 32 items in batches of 8: 4 steps per epoch, 8 in all.
    values = dict(base_width=8, epochs=2, size=32, items=32, batch_size=8, num_workers=0, device="cpu")
    return PretrainConfig.for_source("fashion", **{**values, **overrides})


def test_pretrain_backbone_resumes_exactly(fmnist_dir, tmp_path):
    from amrseg.engine.pretrain import pretrain_backbone

    whole = pretrain_backbone(tmp_path / "a.pt", _small_recipe(), fmnist=str(fmnist_dir), show_progress=False)
    run = tmp_path / "a.pt.run"  # the run folder beside the weights file
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.yaml", "log.csv", "model.pt"]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 8
    # Stopped in the middle of the first epoch: a checkpoint, no weights file yet.
    out = tmp_path / "b.pt"
    stopped = pretrain_backbone(out, _small_recipe(), fmnist=str(fmnist_dir), show_progress=False,
                                stop_after_steps=3)
    assert stopped["finished"] is False and stopped["step"] == 3 and not out.exists()
    with pytest.raises(AmrsegError, match="already holds a run.*--resume"):
        pretrain_backbone(out, _small_recipe(), fmnist=str(fmnist_dir), show_progress=False)
    with pytest.raises(AmrsegError, match=r"differs from this command \(lr: 0.1 -> 0.2\)"):
        pretrain_backbone(out, _small_recipe(lr=0.2), fmnist=str(fmnist_dir), show_progress=False, resume=True)
    resumed = pretrain_backbone(out, _small_recipe(device="auto"), fmnist=str(fmnist_dir), show_progress=False,
                                resume=True)
    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(out, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_accuracy"] == whole["test_accuracy"] and resumed["test_top5"] == whole["test_top5"]
    steps = [int(line.split(",")[0]) for line in (tmp_path / "b.pt.run" / "log.csv").read_text().splitlines()[1:]]
    assert steps == [4, 8]  # each epoch's end (log_every 10), once: the resumed run repeats no row


def test_pretrain_backbone_stops_at_the_first_non_finite_step(fmnist_dir, tmp_path):
    from amrseg.engine.pretrain import pretrain_backbone

    # An infinite lr: the first update leaves no weight finite.
    with pytest.raises(AmrsegError) as err:
        pretrain_backbone(tmp_path / "w.pt", _small_recipe(lr=float("inf")), fmnist=str(fmnist_dir),
                          show_progress=False)
    msg = str(err.value)
    assert msg.startswith("step 1: ") and "not finite" in msg and "no checkpoint was written" in msg, msg
    assert not (tmp_path / "w.pt").exists() and not (tmp_path / "w.pt.run" / "checkpoint.pt").exists()


def test_pretrain_sample_order_is_the_shuffling_loaders():
    """loader_order replays a shuffling DataLoader made anew each epoch around one generator (the
    recipe before the shared loop), also when the items do not fill the last batch."""
    import torch

    from amrseg.engine.pretrain import loader_order

    class Items(torch.utils.data.Dataset):
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return i

    for n, batch in ((37, 4), (36, 4)):
        g = torch.Generator().manual_seed(3)
        order = loader_order(3, n)
        for epoch in range(3):
            loader = torch.utils.data.DataLoader(Items(n), batch_size=batch, shuffle=True, generator=g,
                                                 drop_last=True)
            assert [int(i) for b in loader for i in b] == order(epoch)[: n // batch * batch].tolist()
