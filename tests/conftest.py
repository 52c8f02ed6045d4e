"""Shared test set-up: offline, CPU, small. Slow tests run with --runslow."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _small_torch():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield


def make_voc_root(root, n_train=8, n_val=4, size=32, classes=("square", "disc"), seed=0):
    """A tiny VOC-style root: flat-colour squares (class 1) and discs (class 2) on noise.

    Masks are palette PNGs; labels are derived from the masks (no cls_labels.csv).
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\n" + "\n".join(classes) + "\n")
    yy, xx = np.mgrid[:size, :size]
    for split, n in (("train", n_train), ("val", n_val)):
        ids = []
        for i in range(n):
            img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            present = [1 + i % 2] if i % 3 else [1, 2]
            for c in present:
                r = size // 5
                cy, cx = rng.integers(r, size - r, 2)
                shape = (abs(yy - cy) <= r) & (abs(xx - cx) <= r) if c == 1 else (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                mask[shape] = c
                img[shape] = (220, 40, 40) if c == 1 else (40, 200, 60)
            iid = f"{split}_{i:03d}"
            ids.append(iid)
            Image.fromarray(img).save(root / "JPEGImages" / f"{iid}.jpg", quality=95)
            pal = Image.fromarray(mask, mode="P")
            pal.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9))
            pal.save(root / "SegmentationClass" / f"{iid}.png")
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture
def tiny_voc(tmp_path):
    return make_voc_root(tmp_path / "voc")
