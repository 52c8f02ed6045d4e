"""Shared test set-up: offline, CPU, small."""
import pytest
import torch


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


# Emoji art for tests: every short name of the package's classes.json plus a few clutter,
# excluded and non-clutter emoji, as emoji-datasource lays them out (emoji.json with its fields
# short_name(s), category, subcategory, image, has_img_<vendor>, skin_variations; 16 px RGBA PNGs).
FAKE_CLUTTER = {  # short name -> (category, subcategory)
    "apple": ("Food & Drink", "food-fruit"), "hammer": ("Objects", "tool"), "kite": ("Activities", "game"),
    "bison": ("Animals & Nature", "animal-mammal"), "ambulance": ("Travel & Places", "transport-ground"),
    "grinning": ("Smileys & Emotion", "face-smiling"), "carousel_horse": ("Travel & Places", "place-other"),
}


def make_emoji_art(root, size=16, skins=2):
    """Writes a fake art folder; returns its emoji.json list. Class and context art sits in a clutter
    category that is not excluded ("Objects"/"household"), so only its role keeps it out of clutter."""
    import json

    import numpy as np
    from PIL import Image

    from amrseg.data.emoji_scenes import read_spec

    spec = read_spec()
    names = [n for group in list(spec["classes"].values()) + list(spec["context"].values()) for n in group]
    names = list(dict.fromkeys(names)) + list(FAKE_CLUTTER)
    yy, xx = np.mgrid[:size, :size] + 0.5
    entries = []
    for k, name in enumerate(names):
        cat, sub = FAKE_CLUTTER.get(name, ("Objects", "household"))
        code = f"{0x1f000 + k:x}"
        entry = {"name": name.upper(), "unified": code.upper(), "image": f"{code}.png", "short_name": name,
                 "short_names": [name], "category": cat, "subcategory": sub, "sort_order": k,
                 "has_img_apple": True, "has_img_twitter": True, "has_img_google": True}
        images = [entry["image"]]
        if name == "runner":  # a person with skin variations
            entry["skin_variations"] = {f"1F3F{b + 11:X}": {"image": f"{code}-1f3f{b + 11:x}.png", "has_img_twitter": True,
                                                             "has_img_google": True} for b in range(skins)}
            images += [v["image"] for v in entry["skin_variations"].values()]
        entries.append(entry)
        rng = np.random.default_rng(k)
        for vendor in ("twitter", "google"):
            folder = root / "img" / vendor / "64"
            folder.mkdir(parents=True, exist_ok=True)
            for image in images:
                # A disc (twitter) or a square (google) with a one-pixel alpha ramp, in the emoji's colours.
                r = rng.uniform(0.3, 0.48) * size
                d = np.hypot(yy - size / 2, xx - size / 2) if vendor == "twitter" else \
                    np.maximum(abs(yy - size / 2), abs(xx - size / 2))
                alpha = np.clip(r - d + 0.5, 0.0, 1.0)
                rgba = np.zeros((size, size, 4), np.uint8)
                rgba[..., :3] = rng.integers(0, 256, 3)
                rgba[size // 3:size // 2, :, :3] = rng.integers(0, 256, 3)  # a stripe: some texture
                rgba[..., 3] = np.rint(alpha * 255)
                Image.fromarray(rgba, "RGBA").save(folder / image)
    (root / "emoji.json").write_text(json.dumps(entries))
    return entries


@pytest.fixture(scope="session")
def emoji_art(tmp_path_factory):
    root = tmp_path_factory.mktemp("emoji-art")
    make_emoji_art(root)
    return root
