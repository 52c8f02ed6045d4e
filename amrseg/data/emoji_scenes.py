"""Emoji-VOC: the 20 PASCAL VOC classes drawn from open emoji art, with VOC's failure modes.

A scene is a smooth textured colour field with 1 to 3 class emoji (both vendors' drawings), each
randomly scaled (a lone object large, up to most of the canvas), flipped, slightly rotated and
colour-jittered, truncated at the borders and occluding one another. With a set probability per
object the object brings one of its class's *context* emoji (rails under a train, water under a
boat, clouds near an aeroplane, a picture or window on the wall behind a sofa), and the scene
holds unrelated *clutter* emoji; context and clutter are labelled background, so a classifier
can lean on them as a VOC classifier leans on rails and water. Ground truth is the objects'
alpha >= 0.5 that stays visible, with VOC's 255 band on object borders; an object that is mostly
hidden is ignored (255) and leaves the image's labels.

Every image draws its own composition (object count and scales, context rate, clutter amount,
background style, vendor mix, jitter strength), so that a model learns the items, not one
rendering. Which emoji draw which class, the context and the clutter categories come from the
package's copy of shared/data/emoji-voc/classes.json (amrseg/data/emoji_voc/classes.json).

`EmojiItemDataset` renders single emoji of *all* emoji (about 1,900 classes, one per short name)
on the same backgrounds with clutter: the stand-in for ImageNet pretraining.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..errors import AmrsegError
from ..fileio import save_image, write_text
from .emoji_art import VENDORS, Emoji, check_art
from .fashion import border_band
from .transforms import normalize
from .voc import IGNORE, VOC_CLASSES, classes_present, read_mask, write_label_index, write_palette_png

SPEC_PATH = Path(__file__).parent / "emoji_voc" / "classes.json"

# Clutter drawings that would be a label question (they show a VOC class), on top of the
# subcategories classes.json excludes: a carousel horse or a pinata donkey (horse), a roller
# coaster (train), lotion and sake bottles (bottle), dolls and statues (person), a kadomatsu
# (bamboo in a pot: pottedplant).
CLUTTER_LOOKALIKES = frozenset({"carousel_horse", "pinata", "roller_coaster", "lotion_bottle", "sake", "dolls",
                                "nesting_dolls", "statue_of_liberty", "moyai", "bamboo"})

# Where a context emoji goes relative to its object (see `_place_context`):
#   support: under the object, which stands on it (rails, road, water); behind it;
#   ground:  small, at the object's feet, often in front of them (grass at a cow's hooves);
#   sky:     beside or above the object, at a distance (clouds near an aeroplane);
#   perch:   larger than the object, which sits in its upper part (a bird in a tree); behind;
#   wall:    above and behind the object (a picture or window behind a sofa);
#   beside:  next to the object on the same ground line (a glass by a bottle, a bone by a dog).
CONTEXT_PLACEMENT = {
    "railway_track": "support", "motorway": "support", "ocean": "support",
    "ear_of_rice": "ground", "herb": "ground",
    "cloud": "sky",
    "deciduous_tree": "perch", "evergreen_tree": "perch",
    "frame_with_picture": "wall", "window": "wall",
    "wine_glass": "beside", "bone": "beside", "yarn": "beside",
}
_CONTEXT_BY_SUBCATEGORY = {"sky & weather": "sky", "plant-other": "ground", "transport-ground": "support",
                           "household": "wall"}

DEFAULT_CONTEXT_PROB = 0.5
OBJECT_SCALE = {1: (0.45, 1.0), 2: (0.35, 0.8), 3: (0.28, 0.65)}  # long side / canvas side, by object count
COUNT_WEIGHTS = (0.5, 0.3, 0.2)  # 1, 2, 3 objects
MIN_VISIBLE_FRACTION = 0.5  # an object with less of its alpha >= 0.5 visible is "mostly hidden"
MIN_PIXELS = 40  # ... or with fewer labelled pixels (outside the band) at 128 px; scales with the area
ALPHA_THRESHOLD = 0.5
ALPHA_LEVEL = 128  # alpha >= 0.5 in 8 bits
MAX_ATTEMPTS = 50
JPEG_QUALITY = 95

# SegmentationContext/<id>.png: what each pixel shows (not part of the VOC layout; for analyses
# such as "how much of the context does a CAM mark as foreground").
PART_FIELD, PART_CONTEXT, PART_CLUTTER, PART_OBJECT = 0, 1, 2, 3


# --------------------------------------------------------------------------- the class spec


@dataclass
class EmojiVocSpec:
    """classes.json, resolved against an art folder's index.

    Attributes:
        class_names: the 20 VOC classes in VOC order (index k = class id k + 1).
        class_art: per class, the emoji that draw it (empty for diningtable).
        context: per class, its context emoji (may be empty).
        clutter: the clutter emoji.
        index: every emoji of the art folder (pretraining classes).
        vendors: the vendors drawn from.
        root: the art folder.
    """
    class_names: list
    class_art: list
    context: list
    clutter: list
    index: list
    vendors: tuple
    root: Path


def read_spec(path: Union[str, Path] = SPEC_PATH) -> dict:
    """The raw classes.json (the package's copy by default)."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        missing = [key for key in ("classes", "context", "clutter_categories", "clutter_exclude_subcategories",
                                   "vendors") if key not in spec]
    except (OSError, ValueError, TypeError) as e:
        raise AmrsegError(f"{path}: not an emoji-VOC class file ({type(e).__name__}: {e})") from None
    if missing:
        raise AmrsegError(f"{path}: not an emoji-VOC class file (no '{missing[0]}')")
    classes, context = spec["classes"], spec["context"]
    if list(classes) != list(VOC_CLASSES[1:]):
        raise AmrsegError(f"{path}: 'classes' must list the 20 VOC classes in VOC order")
    unknown = [c for c in context if c not in classes]
    if unknown:
        raise AmrsegError(f"{path}: context for unknown class '{unknown[0]}'")
    return spec


def resolve_spec(art: Union[str, Path, None] = None, spec_path: Union[str, Path] = SPEC_PATH) -> EmojiVocSpec:
    """Checks the art folder and resolves classes.json's short names to its emoji.

    Raises:
        AmrsegError: missing or incomplete art (says to run `amrseg fetch-art`), or a short name of
            classes.json that the art does not have.
    """
    raw = read_spec(spec_path)
    vendors = tuple(raw["vendors"])
    if not vendors or any(v not in VENDORS for v in vendors):
        raise AmrsegError(f"{spec_path}: vendors must be some of {', '.join(VENDORS)}")
    root, index = check_art(art, vendors)
    by_name = {}
    for e in index:
        for n in e.short_names:
            by_name.setdefault(n, e)

    def lookup(name: str, what: str) -> Emoji:
        if name not in by_name:
            raise AmrsegError(f"{root}/emoji.json: no emoji '{name}' ({what} in {spec_path}); "
                              f"run 'amrseg fetch-art' into a new folder")
        return by_name[name]

    class_art = [[lookup(n, f"class {c}") for n in raw["classes"][c]] for c in VOC_CLASSES[1:]]
    context = [[lookup(n, f"context of {c}") for n in raw["context"].get(c, [])] for c in VOC_CLASSES[1:]]
    used = {id(e) for group in class_art + context for e in group}
    categories = set(raw["clutter_categories"])
    excluded = set(raw["clutter_exclude_subcategories"])
    clutter = [e for e in index if e.category in categories and e.subcategory not in excluded
               and id(e) not in used and not (set(e.short_names) & CLUTTER_LOOKALIKES)]
    if not clutter:
        raise AmrsegError(f"{spec_path}: no clutter emoji left in the art of {root}")
    return EmojiVocSpec(list(VOC_CLASSES[1:]), class_art, context, clutter, index, vendors, root)


def context_placement(e: Emoji) -> str:
    """The placement rule of a context emoji (CONTEXT_PLACEMENT, else by subcategory, else beside)."""
    for n in e.short_names:
        if n in CONTEXT_PLACEMENT:
            return CONTEXT_PLACEMENT[n]
    return _CONTEXT_BY_SUBCATEGORY.get(e.subcategory, "beside")


# --------------------------------------------------------------------------- art and sprites


class SpriteCache:
    """Decoded art: (vendor, image) -> premultiplied RGBa PIL image cropped to its alpha box.

    Decoding is lazy and cached; `preload` decodes a set up front (before DataLoader workers fork,
    so they share it).
    """

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        self._cache: dict = {}

    def get(self, vendor: str, image: str) -> Image.Image:
        key = (vendor, image)
        sprite = self._cache.get(key)
        if sprite is None:
            path = self.root / "img" / vendor / "64" / image
            try:
                with Image.open(path) as img:
                    rgba = img.convert("RGBA")
            except (OSError, ValueError, SyntaxError) as e:
                raise AmrsegError(f"{path}: cannot read emoji image ({e}); "
                                  f"run 'amrseg fetch-art {self.root}'") from None
            box = rgba.getchannel("A").getbbox() or (0, 0, rgba.width, rgba.height)
            sprite = rgba.crop(box).convert("RGBa")
            sprite.load()
            self._cache[key] = sprite
        return sprite

    def preload(self, emojis: Sequence[Emoji]) -> None:
        for e in emojis:
            for vendor, images in e.images.items():
                for image in images:
                    self.get(vendor, image)

    def __len__(self) -> int:
        return len(self._cache)


class Sprite:
    """A transformed emoji ready to paint: an RGBA (straight alpha) PIL image."""

    def __init__(self, image: Image.Image):
        self.image = image
        self._solid: Optional[np.ndarray] = None

    @property
    def shape(self) -> tuple:
        return self.image.height, self.image.width

    @property
    def solid(self) -> np.ndarray:
        """[h, w] bool: alpha >= 0.5 (the ground truth of an object)."""
        if self._solid is None:
            self._solid = np.asarray(self.image.getchannel("A")) >= ALPHA_LEVEL
        return self._solid


def pick_image(e: Emoji, rng: np.random.Generator, vendor: Optional[str] = None) -> tuple:
    """(vendor, image): the given vendor when it draws e, else a random one; a random skin variation."""
    vendors = list(e.images)
    if vendor not in e.images:
        vendor = vendors[int(rng.integers(len(vendors)))]
    images = e.images[vendor]
    return vendor, images[int(rng.integers(len(images)))]


def make_sprite(src: Image.Image, long_side: float, rng: np.random.Generator, max_angle: float,
                jitter: float) -> Sprite:
    """Scales `src` (premultiplied RGBa) so its long side is `long_side` px, flips it (p 0.5),
    rotates it by up to +-max_angle degrees and jitters its colours (per-channel gain, brightness
    and saturation, each within +-jitter). Resampling happens on premultiplied colour, so edges
    do not darken."""
    w, h = src.size
    s = max(long_side, 2.0) / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    img = src.resize(size, Image.BICUBIC if s > 1 else Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-max_angle, max_angle))
    if abs(angle) > 0.5:
        img = img.rotate(angle, resample=Image.BILINEAR, expand=True)
    arr = np.array(img.convert("RGBA"))
    gain = ((1.0 + rng.uniform(-jitter, jitter, 3)) * (1.0 + rng.uniform(-jitter, jitter))).astype(np.float32)
    saturation = np.float32(1.0 + rng.uniform(-jitter, jitter))
    rgb = arr[..., :3] * gain
    grey = rgb.mean(axis=2, keepdims=True)
    rgb = grey + saturation * (rgb - grey)
    arr[..., :3] = np.clip(rgb + 0.5, 0, 255)  # round half up, as a cast of [0, 255.5) floats
    return Sprite(Image.fromarray(arr, "RGBA"))


def paint(canvas: Image.Image, sprite: Sprite, y: int, x: int, label_maps: Sequence[tuple] = ()) -> None:
    """Composites `sprite` over `canvas` (RGB) with its top-left corner at (y, x), in place; it may
    lie partly outside (truncation).

    Args:
        label_maps: (map, value) pairs: where the sprite's alpha >= 0.5, map = value.
    """
    canvas.paste(sprite.image, (x, y), sprite.image)  # out = a * sprite + (1 - a) * canvas
    if not label_maps:
        return
    H, W = canvas.height, canvas.width
    h, w = sprite.shape
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
    if y0 < y1 and x0 < x1:
        solid = sprite.solid[y0 - y:y1 - y, x0 - x:x1 - x]
        for label_map, value in label_maps:
            label_map[y0:y1, x0:x1][solid] = value


# --------------------------------------------------------------------------- backgrounds


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)  # x, y in (0, 1)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv_to_rgb(float(rng.random()), float(rng.uniform(0.0, 0.75)), float(rng.uniform(0.25, 1.0)))


def _noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Smooth noise: a random cells x cells grid upsampled bicubically to size x size, [size, size, c]."""
    grid = rng.normal(0.0, 1.0, (channels, cells, cells)).astype(np.float32)
    out = [np.asarray(Image.fromarray(g, mode="F").resize((size, size), Image.BICUBIC)) for g in grid]
    return np.stack(out, axis=-1)


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour field with texture and no object-like shapes: [size, size, 3] float32 in [0, 1].

    Base (one of): a linear gradient, a radial gradient, a soft horizon between two colours, a
    low-frequency colour field, a flat colour. Texture (each with its own probability and
    strength): mid-frequency value noise, gentle stripes, fine grain.
    """
    x, y = _grid(size)
    c0, c1 = _colour(rng), _colour(rng)
    style = int(rng.integers(5))
    if style == 0:  # linear gradient
        theta = rng.uniform(0, 2 * np.pi)
        t = x * np.float32(np.cos(theta)) + y * np.float32(np.sin(theta))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif style == 1:  # radial gradient
        cy, cx = rng.uniform(0.0, 1.0, 2)
        t = np.clip(np.hypot(x - cx, y - cy) / np.float32(rng.uniform(0.5, 1.2)), 0.0, 1.0)
    elif style == 2:  # soft horizon (sky over ground), slightly tilted
        y0, width, tilt = rng.uniform(0.25, 0.8), rng.uniform(0.03, 0.3), rng.uniform(-0.2, 0.2)
        t = np.clip((y - np.float32(y0) - np.float32(tilt) * (x - 0.5)) / np.float32(width) + 0.5, 0.0, 1.0)
        t = t * t * (3 - 2 * t)
    elif style == 3:  # low-frequency colour field
        t = None
    else:  # flat
        t = np.zeros_like(x)
    if t is None:
        canvas = c0 + np.float32(rng.uniform(0.08, 0.25)) * _noise(rng, size, int(rng.integers(2, 5)), 3)
    else:
        canvas = c0 + (c1 - c0) * t[..., None]
    if rng.random() < 0.7:  # mid-frequency value noise, grey or coloured
        cells = int(rng.integers(6, 25))
        amp = np.float32(rng.uniform(0.01, 0.08))
        canvas += amp * _noise(rng, size, cells, 1 if rng.random() < 0.6 else 3)
    if rng.random() < 0.3:  # gentle stripes (fabric, wallpaper, water)
        phi, freq = rng.uniform(0, np.pi), rng.uniform(4, 24)
        wave = np.sin(np.float32(2 * np.pi * freq) * (x * np.float32(np.cos(phi)) + y * np.float32(np.sin(phi)))
                      + np.float32(rng.uniform(0, 2 * np.pi)))
        canvas += np.float32(rng.uniform(0.01, 0.06)) * wave[..., None]
    grain = rng.uniform(0.0, 0.03)
    if grain > 0.005:
        canvas += rng.normal(0.0, grain, (size, size, 1)).astype(np.float32)
    return np.clip(canvas, 0.0, 1.0, out=canvas)


# --------------------------------------------------------------------------- scenes


@dataclass
class Composition:
    """One image's own composition parameters (drawn per image: the scenes vary widely)."""
    n_objects: int
    context_rate: float
    n_clutter: int
    clutter_scale: tuple
    front_clutter: float  # share of clutter drawn over the objects
    vendor: Optional[str]  # one vendor for the whole image, or None: each emoji picks its own
    jitter: float
    max_truncation: float


def draw_composition(rng: np.random.Generator, context_prob: float,
                     count_weights: Sequence[float] = COUNT_WEIGHTS) -> Composition:
    """Per-image composition. The context rate has mean `context_prob` (a Beta(2p, 2 - 2p) draw);
    1, 2 or 3 objects with probabilities `count_weights`."""
    if context_prob <= 0.0 or context_prob >= 1.0:
        rate = float(context_prob >= 1.0)
    else:
        rate = float(rng.beta(2 * context_prob, 2 - 2 * context_prob))
    cmax = int(rng.choice([0, 3, 6, 12]))
    lo = float(rng.uniform(0.06, 0.12))
    return Composition(
        n_objects=int(rng.choice([1, 2, 3], p=list(count_weights))), context_rate=rate,
        n_clutter=int(rng.integers(0, cmax + 1)), clutter_scale=(lo, lo + float(rng.uniform(0.05, 0.18))),
        front_clutter=float(rng.choice([0.0, 0.15, 0.3])),
        vendor=None if rng.random() < 0.5 else VENDORS[int(rng.integers(len(VENDORS)))],
        jitter=float(rng.uniform(0.0, 0.15)), max_truncation=float(rng.choice([0.0, 0.2, 0.35])))


def _position(rng: np.random.Generator, length: int, canvas: int, max_truncation: float) -> int:
    """Top-left coordinate along one axis: inside the canvas when it fits, else up to `max_truncation` out."""
    out = int(round(length * max_truncation))
    lo, hi = -out, canvas - length + out
    if hi < lo:  # larger than the canvas: a random cut
        lo, hi = canvas - length, 0
    return int(rng.integers(lo, hi + 1))


def _place_context(rng: np.random.Generator, rule: str, box: tuple, obj_long: float) -> tuple:
    """(long side, y-anchor, x-anchor, in_front) of a context sprite for an object at box (y, x, h, w).

    Anchors: (y, x) of the context sprite's centre, except 'support'/'ground'/'beside' which give
    its top (support) or bottom (ground, beside) edge; see `_anchor`.
    """
    y, x, h, w = box
    cx, bottom = x + w / 2, y + h
    if rule == "support":  # a wide strip under the object, which stands in its upper part
        return obj_long * rng.uniform(1.0, 1.5), ("top", bottom - h * rng.uniform(0.1, 0.3)), \
            cx + w * rng.uniform(-0.2, 0.2), False
    if rule == "ground":  # small, at the feet
        return obj_long * rng.uniform(0.35, 0.6), ("bottom", bottom + h * rng.uniform(0.0, 0.15)), \
            x + w * rng.uniform(0.1, 0.9), rng.random() < 0.6
    if rule == "sky":  # beside or above, at a distance
        angle = rng.uniform(-np.pi, 0.25 * np.pi) if rng.random() < 0.8 else rng.uniform(0, np.pi)
        dist = obj_long * rng.uniform(0.55, 0.95)
        return obj_long * rng.uniform(0.5, 1.0), ("centre", y + h / 2 + dist * np.sin(angle)), \
            cx + dist * np.cos(angle), rng.random() < 0.25
    if rule == "perch":  # a tree larger than the bird, the bird in its crown
        return obj_long * rng.uniform(1.5, 2.5), ("top", y - h * rng.uniform(0.2, 0.6)), \
            cx + w * rng.uniform(-0.5, 0.5), False
    if rule == "wall":  # above and behind
        return obj_long * rng.uniform(0.45, 0.85), ("bottom", y + h * rng.uniform(0.1, 0.4)), \
            cx + w * rng.uniform(-0.5, 0.5), False
    # beside: same ground line, left or right
    side = 1 if rng.random() < 0.5 else -1
    return obj_long * rng.uniform(0.4, 0.8), ("bottom", bottom - h * rng.uniform(0.0, 0.1)), \
        cx + side * w * rng.uniform(0.45, 0.8), rng.random() < 0.3


def _anchor(sprite: Sprite, anchor: tuple, cx: float) -> tuple:
    h, w = sprite.shape
    kind, ay = anchor
    top = ay if kind == "top" else ay - h if kind == "bottom" else ay - h / 2
    return int(round(top)), int(round(cx - w / 2))


def object_mask(inst: np.ndarray, objects: Sequence[tuple], min_pixels: int) -> np.ndarray:
    """The ground truth of a scene from its object map.

    Args:
        inst: [H, W] uint8: 0 background (field, context, clutter), k = object k (1-based) where
            its alpha >= 0.5 stays visible.
        objects: (class index 0..19, alpha >= 0.5 pixel count of the whole sprite) per object k.
        min_pixels: fewest labelled pixels (outside the band) an object keeps its label with.

    Returns:
        [H, W] uint8: 0 background, class index + 1 for each object that stays labelled, 255 on
        the band around every object (between objects too, as VOC's borders) and on every object
        that is mostly hidden (less than MIN_VISIBLE_FRACTION of it visible) or too small.
    """
    banded = border_band(inst)
    lut = np.full(256, IGNORE, np.uint8)
    lut[0] = 0
    visible = np.bincount(inst.ravel(), minlength=256)
    inner = np.bincount(banded.ravel(), minlength=256)
    for k, (c, full) in enumerate(objects, start=1):
        if visible[k] >= MIN_VISIBLE_FRACTION * full and inner[k] >= min_pixels:
            lut[k] = c + 1
    return lut[banded]


def render_scene(rng: np.random.Generator, size: int, spec: EmojiVocSpec, sprites: SpriteCache,
                 context_prob: float = DEFAULT_CONTEXT_PROB, object_scale: float = 1.0,
                 count_weights: Sequence[float] = COUNT_WEIGHTS) -> tuple:
    """One emoji-VOC scene; `object_scale` multiplies the objects' size ranges (OBJECT_SCALE).

    Returns:
        (image [S, S, 3] uint8, mask [S, S] uint8 with 0 background, 1..20 classes and the 255
        band / hidden objects, parts [S, S] uint8 (PART_* values), composition).
    """
    classes = [k for k, art in enumerate(spec.class_art) if art]
    scale_px = size / 128.0
    min_pixels = int(round(MIN_PIXELS * scale_px * scale_px))
    for _ in range(MAX_ATTEMPTS):
        comp = draw_composition(rng, context_prob, count_weights)
        canvas = Image.fromarray(to_uint8(render_background(rng, size)))
        inst = np.zeros((size, size), np.uint8)  # 0 background, k = object k
        parts = np.zeros((size, size), np.uint8)
        n_front = int(rng.binomial(comp.n_clutter, comp.front_clutter))

        def clutter(n: int) -> None:
            for _ in range(n):
                e = spec.clutter[int(rng.integers(len(spec.clutter)))]
                src = sprites.get(*pick_image(e, rng, comp.vendor))
                s = make_sprite(src, size * rng.uniform(*comp.clutter_scale), rng, 30.0, comp.jitter)
                h, w = s.shape
                paint(canvas, s, int(rng.integers(-h // 3, size - 2 * h // 3 + 1)),
                      int(rng.integers(-w // 3, size - 2 * w // 3 + 1)), ((inst, 0), (parts, PART_CLUTTER)))

        clutter(comp.n_clutter - n_front)
        lo, hi = (object_scale * v for v in OBJECT_SCALE[comp.n_objects])
        objects = []  # (class index, full solid pixel count)
        for k in range(1, comp.n_objects + 1):
            c = classes[int(rng.integers(len(classes)))]
            art = spec.class_art[c]
            src = sprites.get(*pick_image(art[int(rng.integers(len(art)))], rng, comp.vendor))
            long_side = size * math.exp(rng.uniform(math.log(lo), math.log(hi)))
            obj = make_sprite(src, long_side, rng, 12.0, comp.jitter)
            h, w = obj.shape
            y, x = _position(rng, h, size, comp.max_truncation), _position(rng, w, size, comp.max_truncation)
            ctx, front = None, False
            if spec.context[c] and rng.random() < comp.context_rate:
                e = spec.context[c][int(rng.integers(len(spec.context[c])))]
                ctx_long, anchor, cx, front = _place_context(rng, context_placement(e), (y, x, h, w), long_side)
                ctx = make_sprite(sprites.get(*pick_image(e, rng, comp.vendor)), ctx_long, rng, 8.0, comp.jitter)
                ctx_pos = _anchor(ctx, anchor, cx)
            if ctx is not None and not front:
                paint(canvas, ctx, *ctx_pos, ((inst, 0), (parts, PART_CONTEXT)))
            paint(canvas, obj, y, x, ((inst, k), (parts, PART_OBJECT)))
            objects.append((c, int(obj.solid.sum())))
            if ctx is not None and front:
                paint(canvas, ctx, *ctx_pos, ((inst, 0), (parts, PART_CONTEXT)))
        clutter(n_front)

        mask = object_mask(inst, objects, min_pixels)
        if ((mask > 0) & (mask != IGNORE)).any():
            return np.asarray(canvas).copy(), mask, parts, comp
    raise AmrsegError(f"cannot place a visible object in a {size} px scene after {MAX_ATTEMPTS} attempts "
                      "(use a larger --size)")


# --------------------------------------------------------------------------- the dataset


def _settings_match(path: Path, settings: dict) -> bool:
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if old != settings:
        raise AmrsegError(f"{path.parent}: holds scenes built with other settings ({path.name}: {old}); "
                          "use a new folder")
    return True


def build_emoji_scenes(out: Union[str, Path], art: Union[str, Path, None] = None, n_train: int = 10000,
                       n_val: int = 1000, size: int = 192, seed: int = 0,
                       context_prob: float = DEFAULT_CONTEXT_PROB, object_scale: float = 1.0,
                       count_weights: Sequence[float] = COUNT_WEIGHTS,
                       progress: Optional[Callable[[int], object]] = None) -> dict:
    """Writes a VOC-style emoji-VOC dataset (splits train and val) under `out`.

    `context_prob`, `object_scale` (a factor on the objects' size ranges) and `count_weights` (the
    probabilities of 1, 2, 3 objects) change the composition, e.g. for held-out scenes composed
    unlike the training ones.

    Scene i of a split depends only on (seed, split, i), so a second build writes the same bytes.
    An interrupted build continues where it stopped when run again with the same settings
    (`out/scenes.json`); other settings into the same folder are refused.

    Writes JPEGImages/, SegmentationClass/ (VOC palette), SegmentationContext/ (grey PNGs of the
    PART_* values: what each pixel shows), ImageSets/Segmentation/{train,val}.txt, classes.txt and
    cls_labels.csv.

    Returns:
        {"root", "num_images", "class_names", "images_per_class", "images_per_s", "seconds"}.
    """
    if size < 64:
        raise AmrsegError(f"--size {size}: emoji scenes need at least 64 px")
    for flag, n in (("--train", n_train), ("--val", n_val)):
        if n < 1:
            raise AmrsegError(f"{flag} {n}: need at least one image")
    if not 0.0 <= context_prob <= 1.0:
        raise AmrsegError(f"--context-prob {context_prob}: must lie in [0, 1]")
    if not 0.25 <= object_scale <= 2.0:
        raise AmrsegError(f"--object-scale {object_scale}: must lie in [0.25, 2]")
    count_weights = [float(w) for w in count_weights]
    if len(count_weights) != 3 or min(count_weights) < 0 or abs(sum(count_weights) - 1.0) > 1e-6:
        raise AmrsegError(f"--count-weights {','.join(map(str, count_weights))}: need three probabilities "
                          "(1, 2, 3 objects) that sum to 1")
    spec = resolve_spec(art)
    sprites = SpriteCache(spec.root)
    out = Path(out)
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationContext", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    settings = {"source": "emoji", "train": n_train, "val": n_val, "size": size, "seed": seed,
                "context_prob": context_prob}
    # recorded only when changed: folders of the default composition keep their scenes.json
    if object_scale != 1.0:
        settings["object_scale"] = object_scale
    if count_weights != list(COUNT_WEIGHTS):
        settings["count_weights"] = count_weights
    if not _settings_match(out / "scenes.json", settings):
        write_text(out / "scenes.json", json.dumps(settings) + "\n")
    present, rendered, t0 = {}, 0, time.perf_counter()
    for split_code, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        ids = []
        for i in range(n):
            image_id = f"{split}_{i:06d}"
            paths = [out / "JPEGImages" / f"{image_id}.jpg", out / "SegmentationClass" / f"{image_id}.png",
                     out / "SegmentationContext" / f"{image_id}.png"]
            if all(p.is_file() for p in paths):  # finished by an earlier run (every file is written atomically)
                mask = read_mask(paths[1])
            else:
                image, mask, parts, _ = render_scene(np.random.default_rng([seed, split_code, i]), size, spec,
                                                     sprites, context_prob, object_scale, count_weights)
                save_image(Image.fromarray(image), paths[0], quality=JPEG_QUALITY)
                save_image(Image.fromarray(parts, mode="L"), paths[2], format="PNG")
                write_palette_png(paths[1], mask)  # last: its presence marks the image finished
                rendered += 1
            present[image_id] = classes_present(mask, len(spec.class_names))
            ids.append(image_id)
            if progress is not None:
                progress(1)
        write_text(out / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(ids) + "\n")
    seconds = time.perf_counter() - t0
    per_class = write_label_index(out, spec.class_names, present)
    return {
        "root": str(out),
        "num_images": {"train": n_train, "val": n_val},
        "class_names": ["background", *spec.class_names],
        "images_per_class": per_class,
        "rendered": rendered,
        "seconds": round(seconds, 1),
        "images_per_s": round(rendered / max(seconds, 1e-9), 1),
    }


# --------------------------------------------------------------------------- pretraining items


class EmojiItemDataset(torch.utils.data.Dataset):
    """Single emoji over all emoji of the art, on scene backgrounds with clutter: (image, class).

    Item i shows emoji `i % num_classes` (every class equally often), in a random vendor's drawing
    and skin variation, scaled to 40-90% of the canvas, flipped, rotated, colour-jittered, over 0-4
    smaller clutter emoji (some in front of it), with randomness from
    np.random.default_rng([seed, epoch, i]). Backgrounds come from a bank of BACKGROUNDS scene
    backgrounds (made on first use, each a function of (seed, j) only) in one of their 8
    flips and quarter turns: rendering then costs a fraction of a training step.
    """

    BACKGROUNDS = 1024

    def __init__(self, emojis: Sequence[Emoji], clutter: Sequence[Emoji], sprites: SpriteCache, size: int,
                 length: int, seed: int, epoch: int = 0) -> None:
        if not emojis:
            raise ValueError("no emoji to classify")
        self.emojis = list(emojis)
        self.clutter = list(clutter)
        self.sprites = sprites
        self.size = int(size)
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self._bank: dict = {}

    def _background(self, rng: np.random.Generator) -> Image.Image:
        j = int(rng.integers(self.BACKGROUNDS))
        bg = self._bank.get(j)
        if bg is None:
            bg = Image.fromarray(to_uint8(render_background(np.random.default_rng([self.seed, 1 << 20, j]), self.size)))
            self._bank[j] = bg
        turn = int(rng.integers(8))
        return bg.transpose(Image.Transpose(turn - 1)) if turn else bg.copy()

    @property
    def num_classes(self) -> int:
        return len(self.emojis)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def render(self, i: int) -> tuple:
        """(image [size, size, 3] uint8, class)."""
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        label = int(i) % len(self.emojis)
        size = self.size
        canvas = self._background(rng)
        jitter = float(rng.uniform(0.0, 0.15))
        n_clutter = int(rng.integers(0, 5)) if self.clutter else 0
        n_front = int(rng.binomial(n_clutter, 0.25))
        target = self.emojis[label]

        def clutter(n: int) -> None:
            for _ in range(n):
                e = self.clutter[int(rng.integers(len(self.clutter)))]
                if e is target:
                    continue
                s = make_sprite(self.sprites.get(*pick_image(e, rng)), size * rng.uniform(0.12, 0.3), rng, 30.0,
                                jitter)
                h, w = s.shape
                paint(canvas, s, int(rng.integers(-h // 3, size - 2 * h // 3 + 1)),
                      int(rng.integers(-w // 3, size - 2 * w // 3 + 1)))

        clutter(n_clutter - n_front)
        obj = make_sprite(self.sprites.get(*pick_image(target, rng)), size * rng.uniform(0.4, 0.9), rng, 12.0, jitter)
        h, w = obj.shape
        paint(canvas, obj, _position(rng, h, size, 0.1), _position(rng, w, size, 0.1))
        clutter(n_front)
        return np.asarray(canvas), label

    def __getitem__(self, i: int) -> tuple:
        image, label = self.render(i)
        return normalize(image), label
