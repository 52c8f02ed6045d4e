"""`make-cam`: multi-scale + flip CAMs of a trained run, fused over the two branches (AMR.md section 5).

Geometry, as the release and IRN: each scale's input is the uint8 image resized with PIL bicubic
(antialiased when shrinking), then normalised; the image and its flip go through together. Each
scale's map (image + flipped-back flip) is upsampled bilinearly to the padded size
(ceil(H/os)*os, ceil(W/os)*os), os the network's output stride (16 for the standard nets), and
cropped to H x W; the stride-4 map (`cam` in the npz) is each scale's map resized to
(ceil(H/4), ceil(W/4)). Both are summed over scales and max-normalised per class and branch.

Batching: images of equal size are stacked (up to `batch_size`); an image needs one pass per scale
and several images share it. The pairs are interleaved (image, flip, image, flip, ...), so that
an AMM with eval_stats 'pair' (amr-official) takes its statistics over each image and its flip,
as the release's batch of two, and batched inference equals one image at a time.

The methods (cam/methods.py: CAM_METHODS; cam, gradcam, advcam) share everything here; each says
only how a branch's maps are read off the network at one scale (CamMethod.maps), and this module
names none of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..data.voc import SegData, image_size
from ..models.amr import AMRNet
from .io import fuse, normalise_max
from .methods import ScaleBatch, cam_method, pair_sum

_MEAN64, _STD64 = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)


@dataclass
class InferConfig:
    method: str = "cam"  # a name of cam.methods.CAM_METHODS: cam | gradcam | advcam
    scales: list = field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0])
    xi: float = 0.5  # weight of the spotlight CAM in the fused map
    batch_size: int = 8  # images per forward pass where their sizes are equal
    device: str = "auto"
    save_branches: bool = False  # also store each branch's normalised maps (for eval-cam --xi-sweep)
    score_threshold: float = 0.5  # unlabelled images: classes whose sigmoid score exceeds this
    adv_steps: int = 27  # advcam: T maps per scale (the release's halving at scale 0.5: adv_steps_at)
    adv_step_size: float = 0.08
    adv_mask_weight: float = 7.0
    adv_mask_threshold: float = 0.5
    adv_climb: str = "branch"  # branch: one climb per branch on its own objective (the release) | joint
    overwrite: bool = False  # remove the CAM files already in OUT first, even those of other settings


# --------------------------------------------------------------------------- per-branch maps


def scale_pyramid(image: np.ndarray, scales: Sequence[float]) -> list[torch.Tensor]:
    """The normalised input [3, h_s, w_s] of each scale, h_s = round(H * s) (half to even, as numpy).

    The uint8 image is resized with PIL bicubic (antialiased when shrinking) before normalisation;
    a scale that keeps the size keeps the image. The normalisation is computed in float64 and
    rounded once to float32, as the release's: the climb of advcam turns a last-bit difference of
    the input into visible differences of its maps (NOTES.md, make-cam geometry).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    H, W = image.shape[:2]
    out = []
    for s in scales:
        size = (max(1, int(np.round(H * s))), max(1, int(np.round(W * s))))
        img = image if size == (H, W) else np.asarray(Image.fromarray(image).resize(size[::-1], Image.BICUBIC))
        x = ((img / 255.0 - _MEAN64) / _STD64).astype(np.float32)
        out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))
    return out


def pair_forward(model: AMRNet, pairs: torch.Tensor
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The one forward of image + flip pairs [B, 2, 3, h, w] that serves every CAM method.

    The network sees the pairs interleaved (image, flip, image, flip, ...): an AMM with eval_stats
    'pair' takes its statistics over each image and its flip. Returns, per branch, the final feature
    maps F [B, 2, C, h', w'], the raw class scores W . F [B, 2, K, h', w'] (before any ReLU: the
    fallback of a class no method activates, see cams_for_batch) and the logits W . GAP(F) [B, 2, K].
    """
    feats = model.branch_features(pairs.flatten(0, 1))
    features, scores, logits = {}, {}, {}
    for name, branch in model.branches():
        f = feats[name]
        w = branch.classifier.weight.flatten(1)
        features[name] = f.unflatten(0, (-1, 2))
        scores[name] = torch.einsum("kc,nchw->nkhw", w, f).unflatten(0, (-1, 2))
        logits[name] = torch.einsum("kc,nc->nk", w, f.mean(dim=(2, 3))).unflatten(0, (-1, 2))
    return features, scores, logits


def scale_batch(model: AMRNet, x: torch.Tensor, keys: list[Optional[torch.Tensor]], scale: float,
                icfg: InferConfig) -> ScaleBatch:
    """What a CAM method gets at one scale: images x [B, 3, h, w] with their flips, the gradient-free
    forward of the pairs, and the keys, where they are None filled in place with the predicted classes."""
    pairs = torch.stack([x, x.flip(-1)], dim=1)
    with torch.inference_mode():
        features, scores, logits = pair_forward(model, pairs)
    fill_keys(logits, keys, icfg)
    return ScaleBatch(pairs=pairs, features=features, scores=scores, keys=list(keys), scale=scale, options=icfg)


# --------------------------------------------------------------------------- batching


class ImageSet(torch.utils.data.Dataset):
    """(scale pyramid, (H, W), index) of each image: the resizing runs in the loader's workers."""

    def __init__(self, data: SegData, index: list[int], scales: Sequence[float]):
        self.data, self.index, self.scales = data, index, list(scales)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, j):
        i = self.index[j]
        image = self.data.load_image(i)
        return scale_pyramid(image, self.scales), torch.tensor(image.shape[:2]), i


def size_batches(data: SegData, index: list[int], batch_size: int) -> list[list[int]]:
    """Positions into `index` grouped by image size (from the headers), at most batch_size each."""
    groups: dict[tuple, list[int]] = {}
    for j, i in enumerate(index):
        groups.setdefault(image_size(data.image_path(i)), []).append(j)
    return [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


def cams_for_images(model: AMRNet, images: Sequence[np.ndarray], keys: list[Optional[torch.Tensor]],
                    icfg: InferConfig) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """cams_for_batch of same-size HxWx3 uint8 images (builds their scale pyramids)."""
    pyramids = [scale_pyramid(np.asarray(img), icfg.scales) for img in images]
    param = next(model.parameters())
    pyramid = [torch.stack([p[i] for p in pyramids]).to(param.device, param.dtype) for i in range(len(icfg.scales))]
    return cams_for_batch(model, pyramid, tuple(images[0].shape[:2]), keys, icfg)


def cams_for_batch(model: AMRNet, pyramid: list[torch.Tensor], size: tuple[int, int],
                   keys: list[Optional[torch.Tensor]], icfg: InferConfig
                   ) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Fused and per-branch maps of a batch of same-size images, at image size and at stride 4.

    Each branch's maps are summed over scales and flips (geometry: the module docstring) and
    divided by their own max (+1e-5), as the release; the fused map xi * S + (1 - xi) * C is then
    divided by its own max, so that it peaks at exactly 1. A class that no branch activates
    anywhere (every map 0: the classifier sees no positive evidence for it at any scale) would stay
    0; it gets instead, in each branch, 1 at the peak of its raw class scores W . F (summed the same
    way) and 0 elsewhere, so every stored map peaks at 1 (CONTRACT.md), and 'active' False, so that
    the stages after the CAMs treat it as having no evidence.

    Args:
        pyramid: per scale of icfg.scales, the normalised images [B, 3, h_s, w_s] (scale_pyramid).
        size: (H, W) of the images.
        keys: per image, its foreground class indices, or None to use the classes the classifier
            predicts (sigmoid score of the branch mean > score_threshold; the top class if none is).
    Returns:
        per image (keys [n], maps): maps 'fused' and each branch's name [n, H, W]; 'cam' (fused) and
        'cam_<branch>' [n, ceil(H/4), ceil(W/4)]; 'active' bool [n].
    """
    H, W = size
    stride = model.output_stride
    up = (math.ceil(H / stride) * stride, math.ceil(W / stride) * stride)
    low = (math.ceil(H / 4), math.ceil(W / 4))
    B = pyramid[0].shape[0]
    names = [name for name, _ in model.branches()]
    sums: list[dict[tuple[str, str], torch.Tensor]] = [dict() for _ in range(B)]

    def add(total: dict, name: str, m: torch.Tensor) -> None:  # m [n, h, w] of one scale, both resolutions
        m = m.float()[None]
        hi = F.interpolate(m, size=up, mode="bilinear", align_corners=False)[0, :, :H, :W]
        lo = F.interpolate(m, size=low, mode="bilinear", align_corners=False)[0]
        for res, v in (("hi", hi), ("lo", lo)):
            total[res, name] = total.get((res, name), 0) + v

    method = cam_method(icfg.method)
    order = sorted(range(len(icfg.scales)), key=lambda i: icfg.scales[i] != 1.0)  # 1.0 decides unlabelled keys
    for i in order:
        batch = scale_batch(model, pyramid[i], keys, icfg.scales[i], icfg)
        with torch.inference_mode(not method.needs_grad):
            maps = method.maps(model, batch)
        for name in names:
            raw = pair_sum(batch.scores[name])
            for b in range(B):
                if len(keys[b]):
                    add(sums[b], "raw:" + name, raw[b, keys[b]])
                    add(sums[b], name, maps[name][b])
    results = []
    for b in range(B):
        n = len(keys[b])
        if n:
            maps, active = _normalise(sums[b], names)
        else:
            maps = {(res, name): pyramid[0].new_zeros(0, *shape) for res, shape in (("hi", size), ("lo", low))
                    for name in names}
            active = torch.ones(0, dtype=torch.bool, device=pyramid[0].device)
        result = {"active": active}
        for res, prefix in (("hi", ""), ("lo", "cam_")):
            for name in names:
                result[prefix + name] = maps[res, name]
            fused = fuse(maps[res, "spotlight"], maps[res, "compensation"], icfg.xi) if "compensation" in names \
                else maps[res, "spotlight"]
            result["fused" if res == "hi" else "cam"] = unit_peak(fused)
        results.append((keys[b], result))
    return results


def unit_peak(maps: torch.Tensor) -> torch.Tensor:
    """Each map [..., H, W] divided by its own max where that is positive: peaks at exactly 1."""
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, maps / torch.where(peak > 0, peak, torch.ones_like(peak)), maps)


def _normalise(sums: dict[tuple[str, str], torch.Tensor], names: list[str]
               ) -> tuple[dict[tuple[str, str], torch.Tensor], torch.Tensor]:
    """Per-class max normalisation of each branch at both resolutions; the peaks of the raw scores
    for the classes no branch activates. Returns the maps and `active` [n] (False for those classes)."""
    dead = torch.stack([sums["hi", name].flatten(1).amax(1) <= 0 for name in names]).all(0)  # [n]
    out = {}
    for res in ("hi", "lo"):
        for name in names:
            m = normalise_max(sums[res, name])
            if bool(dead.any()):
                m = torch.where(dead[:, None, None], peak_map(sums[res, "raw:" + name]), m)
            out[res, name] = m
    return out, ~dead


def peak_map(maps: torch.Tensor) -> torch.Tensor:
    """1 where each map [..., H, W] reaches its own max, 0 elsewhere; all 0 for a constant map.

    The map of a class that no branch activates: it marks where the classifier finds the class
    least unlikely, and nothing more. Spreading it (min-max of the raw scores, exp(raw - max))
    costs mIoU (NOTES.md, "A class that no branch activates"): those classes then take pixels of
    classes the classifier does see. The random walk would spread even the peak, which is why
    pseudo-labels reads these maps as 0 (cam.io.evidence).
    """
    peak = maps == maps.amax(dim=(-2, -1), keepdim=True)
    flat = peak.flatten(-2).all(-1)[..., None, None]
    return (peak & ~flat).to(maps.dtype)


def fill_keys(logits: dict[str, torch.Tensor], keys: list, icfg: InferConfig) -> None:
    """Predicted classes for the images whose keys are None.

    `logits` are pair_forward's, per branch [B, 2, K]; the score is the sigmoid of the logits
    averaged over branches and over each image and its flip.
    """
    if all(k is not None for k in keys):
        return
    mean = torch.stack(list(logits.values())).mean(0)
    scores = torch.sigmoid((mean[:, 0] + mean[:, 1]) / 2)
    for b, k in enumerate(keys):
        if k is None:
            picked = torch.nonzero(scores[b] > icfg.score_threshold).flatten()
            keys[b] = picked if len(picked) else scores[b].argmax().reshape(1)
