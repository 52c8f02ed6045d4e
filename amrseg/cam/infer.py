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

Three methods share everything but how a branch's map is read off its final feature map F:
- cam: ReLU(W_c . F)                                (the CAM of AMR.md section 1)
- gradcam: the release's Grad-CAM: ReLU(sum_k a_k F_k), a_k = (sum over positions of dS/dF_k) / P,
  S = the sum of the class's ReLU CAM over the image and its flip, P = ONE count, the positive
  entries of the pair's whole gradient tensor. With a linear head dS/dF_k(h, w) = W_ck [W_c . F > 0],
  so the map is the ReLU CAM times |mask| / P: computed in closed form, without a backward pass
  (checked against autograd and against cam/reference.py in the tests).
- advcam: the release's AdvCAM: per branch, the Grad-CAM maps of the T inputs of T - 1 steps of
  anti-adversarial climbing (all of an image's classes climb as one batch, one pair of rows each).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import Config, merge
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..data.voc import SegData, image_size, list_images, open_dataset
from ..fileio import load_torch
from ..runtime import init_distributed, pick_device, progress
from ..errors import AmrsegError
from ..fileio import write_text
from ..models.amr import AMRNet
from ..outputs import claim_folder, file_identity
from .io import fuse, normalise_max, save_cam

_MEAN64, _STD64 = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
METHODS = ("cam", "gradcam", "advcam")
CLIMBS = ("branch", "joint")
CAMS_META = "cams.json"  # CAMS/cams.json: {"method", "run", "scales", "xi"} (+ advcam's settings)


@dataclass
class InferConfig:
    method: str = "cam"  # cam | gradcam | advcam
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


def load_run(run: Path, device: torch.device) -> tuple[AMRNet, Config, list[str]]:
    """The trained network of a train-cam run directory (RUN/model.pt), in eval mode."""
    run = Path(run)
    if not run.is_dir():
        raise AmrsegError(f"--run {run}: not a directory")
    state = load_torch(run / "model.pt", "trained model (is the run finished? resume it with train-cam --resume)")
    if "state_dict" not in state or "config" not in state:
        raise AmrsegError(f"{run / 'model.pt'}: not a train-cam model file (no state_dict/config)")
    cfg = merge(Config(), state["config"])
    # The weights come from model.pt: build without pretrained loading or spotlight initialisation.
    build_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained="none", init_spotlight=None))
    class_names = list(state.get("class_names") or [])
    model = AMRNet(build_cfg.model, build_cfg.amm, num_classes=len(class_names) - 1)
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        raise AmrsegError(f"{run / 'model.pt'}: weights do not fit the saved config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), cfg, class_names


# --------------------------------------------------------------------------- per-branch maps


def scale_pyramid(image: np.ndarray, scales: Sequence[float]) -> list[torch.Tensor]:
    """The normalised input [3, h_s, w_s] of each scale, h_s = round(H * s) (half to even, as numpy).

    The uint8 image is resized with PIL bicubic (antialiased when shrinking) before normalisation;
    a scale that keeps the size keeps the image. The normalisation is computed in float64 and
    rounded once to float32, as the release's: the climb of advcam turns a last-bit difference of
    the input into visible differences of its maps (up to 0.1 on random weights, 27 steps).
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


def gradcam_from_scores(raw: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The release's Grad-CAM of every class, from the raw class scores of image + flip pairs.

    Args:
        raw: W . F [B, 2, K, h, w]: axis 1 is the pair (an image and its flip).
        weight: classifier weight W [K, C] (1x1 conv, no bias).
    Returns:
        [B, 2, K, h, w] = ReLU(W_c . F) * |mask_n| / (P + 1e-12), mask_n = {W_c . F_n > 0} and
        P = (|mask_0| + |mask_1|) * #{k: W_ck > 0}: the positive entries of the gradient of
        S = sum over the pair of the ReLU CAM, dS/dF_nk(h, w) = W_ck mask_n(h, w).
    """
    count = (raw > 0).sum(dim=(-2, -1)).to(raw.dtype)  # |mask_n| [B, 2, K]
    p = count.sum(dim=1, keepdim=True) * (weight > 0).sum(dim=1).to(raw.dtype)  # P [B, 1, K]
    return F.relu(raw) * (count / (p + 1e-12))[..., None, None]


def gradcam_maps(feat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of every class from the final feature maps F [B, 2, C, h, w] of image + flip pairs."""
    return gradcam_from_scores(torch.einsum("kc,bnchw->bnkhw", weight, feat), weight)


def _pairs_first(t: torch.Tensor) -> torch.Tensor:
    """[images; flips] (2B rows) -> [image 0, flip 0, image 1, flip 1, ...]."""
    return t.unflatten(0, (2, -1)).transpose(0, 1).flatten(0, 1)


def _halves_first(t: torch.Tensor) -> torch.Tensor:
    """The inverse of _pairs_first."""
    return t.unflatten(0, (-1, 2)).transpose(0, 1).flatten(0, 1)


def _branch_maps(model: AMRNet, x: torch.Tensor, method: str
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{branch: (maps [2B, K, h, w], logits [2B, K], raw class scores W . F [2B, K, h, w])}.

    x is [images; their flips] (2B rows), and so are the outputs. The network sees the pairs
    interleaved (the AMMs' 'pair' statistics groups). maps are the method's (cam: ReLU(W . F);
    gradcam: the release's Grad-CAM of each image with its flip); the raw scores, before the ReLU,
    are the fallback of a class whose maps are 0 everywhere (see cams_for_batch).
    """
    feats = model.branch_features(_pairs_first(x))
    out = {}
    for name, branch in model.branches():
        f = feats[name]
        w = branch.classifier.weight.flatten(1)
        raw = torch.einsum("kc,nchw->nkhw", w, f)
        maps = F.relu(raw) if method == "cam" else gradcam_from_scores(raw.unflatten(0, (-1, 2)), w).flatten(0, 1)
        logits = torch.einsum("kc,nc->nk", w, f.mean(dim=(2, 3)))
        out[name] = (_halves_first(maps), _halves_first(logits), _halves_first(raw))
    return out


def adv_steps_at(scale: float, steps: int) -> int:
    """AdvCAM's T at a scale: the release halves it at scale 0.5 (T > 10: T // 2; 6..10: 5; below 6: T)."""
    if scale != 0.5 or steps < 6:
        return steps
    return steps // 2 if steps > 10 else 5


def _advcam_maps(model: AMRNet, pairs: torch.Tensor, cls: torch.Tensor, steps: int, icfg: InferConfig
                 ) -> dict[str, torch.Tensor]:
    """AdvCAM maps of one image for several classes: anti-adversarial climbing on image + flip pairs.

    Args:
        pairs: [R, 2, 3, h, w]: row r is an image and its flip, climbing for class cls[r].
        cls: [R] the class of each row.
        steps: T, the number of maps per row (T - 1 climbing steps).
    Returns:
        {branch: [R, h', w']}: the sum of the T Grad-CAM maps R_t (image + flipped-back flip).
        icfg.adv_climb 'branch' (the release) climbs once per branch, each on its own objective;
        'joint' climbs once on the sum of the branches' objectives.
    """
    names = [name for name, _ in model.branches()]
    groups = [[name] for name in names] if icfg.adv_climb == "branch" else [names]
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        out.update(_climb(model, pairs, cls, steps, icfg, group))
    return out


def _climb(model: AMRNet, pairs: torch.Tensor, cls: torch.Tensor, steps: int, icfg: InferConfig,
           names: list[str]) -> dict[str, torch.Tensor]:
    """One climb of the rows `pairs`, ascending the sum of the objectives of the branches `names`.

    Per branch and row: J = sum over the pair of (logit_c - sum of the other logits) - mask_weight *
    sum(|R_t - R_0| where R_t / max R_t > mask_threshold), with logits = GAP of the ReLU CAM and R_t the
    release's Grad-CAM (its weights held constant, as the release's hooked gradients). A step adds
    step_size * grad / max|grad| over the pair and clamps to the pair's current min and max.
    """
    branches = dict(model.branches())
    R = len(cls)
    rows = torch.arange(R, device=pairs.device)
    others = torch.ones(R, 1, model_num_classes(model), device=pairs.device, dtype=pairs.dtype)
    others[rows, 0, cls] = 0
    x = pairs.flatten(0, 1).detach().clone()  # [2R, 3, h, w]: image, flip, image, flip, ...
    acc: dict[str, torch.Tensor] = {}
    r0: dict[str, torch.Tensor] = {}
    for t in range(steps):
        climb = t < steps - 1  # the last map needs no step after it
        x.requires_grad_(climb)
        with torch.set_grad_enabled(climb):
            objective = x.new_zeros(())
            for name in names:
                branch = branches[name]
                w = branch.classifier.weight.flatten(1)
                raw = torch.einsum("kc,nchw->nkhw", w, branch.features(x)).unflatten(0, (R, 2))  # [R, 2, K, h, w]
                raw_c = raw[rows, :, cls]  # [R, 2, h, w]
                with torch.no_grad():
                    count = (raw_c > 0).sum(dim=(-2, -1)).to(raw.dtype)  # |mask_n| [R, 2]
                    p = count.sum(1, keepdim=True) * (w[cls] > 0).sum(1, keepdim=True).to(raw.dtype)
                    scale = count / (p + 1e-12)
                gc = F.relu(raw_c) * scale[..., None, None]
                region = gc[:, 0] + gc[:, 1].flip(-1)  # R_t [R, h, w]
                acc[name] = acc.get(name, 0) + region.detach()
                if t == 0:
                    r0[name] = region.detach()
                if not climb:
                    continue
                logits = F.relu(raw).mean(dim=(-2, -1))  # [R, 2, K]
                j = logits[rows, :, cls].sum(1) - (logits * others).sum(dim=(1, 2))
                with torch.no_grad():
                    peak = region.amax(dim=(-2, -1), keepdim=True)
                    mask = (region / torch.where(peak > 0, peak, torch.ones_like(peak)) > icfg.adv_mask_threshold) \
                        & (peak > 0)
                j = j - icfg.adv_mask_weight * ((region - r0[name]).abs() * mask).sum(dim=(-2, -1))
                objective = objective + j.sum()
        if not climb:
            break
        (grad,) = torch.autograd.grad(objective, x)
        with torch.no_grad():
            g, xp = grad.unflatten(0, (R, 2)), x.detach().unflatten(0, (R, 2))
            span = (1, 2, 3, 4)  # over the pair: image and flip together
            g_max = g.abs().amax(dim=span, keepdim=True)
            lo, hi = xp.amin(dim=span, keepdim=True), xp.amax(dim=span, keepdim=True)
            x = torch.max(torch.min(xp + icfg.adv_step_size * g / (g_max + 1e-12), hi), lo).flatten(0, 1)
    return acc


def model_num_classes(model: AMRNet) -> int:
    return model.spotlight.classifier.weight.shape[0]


# --------------------------------------------------------------------------- batching


class _ImageSet(torch.utils.data.Dataset):
    """(scale pyramid, (H, W), index) of each image: the resizing runs in the loader's workers."""

    def __init__(self, data: SegData, index: list[int], scales: Sequence[float]):
        self.data, self.index, self.scales = data, index, list(scales)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, j):
        i = self.index[j]
        image = self.data.load_image(i)
        return scale_pyramid(image, self.scales), torch.tensor(image.shape[:2]), i


def _size_batches(data: SegData, index: list[int], batch_size: int) -> list[list[int]]:
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

    order = sorted(range(len(icfg.scales)), key=lambda i: icfg.scales[i] != 1.0)  # 1.0 decides unlabelled keys
    for i in order:
        x = pyramid[i]
        with torch.inference_mode():
            out = _branch_maps(model, torch.cat([x, x.flip(-1)]), "cam" if icfg.method == "advcam" else icfg.method)
        _fill_keys(out, keys, icfg)
        for name, (maps, _, raw) in out.items():
            maps, raw = maps[:B] + maps[B:].flip(-1), raw[:B] + raw[B:].flip(-1)
            for b in range(B):
                if len(keys[b]):
                    add(sums[b], "raw:" + name, raw[b, keys[b]])
                    if icfg.method != "advcam":
                        add(sums[b], name, maps[b, keys[b]])
        if icfg.method == "advcam":
            steps = adv_steps_at(icfg.scales[i], icfg.adv_steps)
            for b in range(B):
                k = keys[b]
                if len(k) == 0:
                    continue
                pairs = torch.stack([x[b], x[b].flip(-1)])[None].expand(len(k), -1, -1, -1, -1)
                for name, m in _advcam_maps(model, pairs, k, steps, icfg).items():
                    # the release's mul_for_scale: meant for scale 0.5 (2 when it halves T > 10, else 1),
                    # it keeps that value for every scale; it only matters against the + 1e-5 of the
                    # normalisation
                    add(sums[b], name, (2.0 if icfg.adv_steps > 10 else 1.0) * m)
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
    lost 1 to 9 mIoU points on the demo's val CAMs (NOTES.md): those classes then take pixels of
    classes the classifier does see. The random walk would spread even the peak, which is why
    pseudo-labels reads these maps as 0 (cam.io.evidence).
    """
    peak = maps == maps.amax(dim=(-2, -1), keepdim=True)
    flat = peak.flatten(-2).all(-1)[..., None, None]
    return (peak & ~flat).to(maps.dtype)


def _fill_keys(out: dict[str, tuple[torch.Tensor, ...]], keys: list, icfg: InferConfig) -> None:
    """Predicted classes for the images whose keys are None.

    `out` is _branch_maps of [images, flipped images]; the score is the sigmoid of the logits
    averaged over branches and over each image and its flip.
    """
    if all(k is not None for k in keys):
        return
    B = len(keys)
    logits = torch.stack([lg for _, lg, _ in out.values()]).mean(0)
    scores = torch.sigmoid((logits[:B] + logits[B:]) / 2)
    for b, k in enumerate(keys):
        if k is None:
            picked = torch.nonzero(scores[b] > icfg.score_threshold).flatten()
            keys[b] = picked if len(picked) else scores[b].argmax().reshape(1)


# --------------------------------------------------------------------------- the stage


def open_inference_data(data: str, split: str, class_names: list[str]) -> SegData:
    """A VOC-style root (labels where it has them) or a plain folder of images (the run's classes)."""
    root = Path(data)
    if root.is_dir() and not (root / "JPEGImages").is_dir():
        return list_images(root, class_names)
    return open_dataset(root, split, require_labels=False)


def _settings(run: Path, data: SegData, icfg: InferConfig) -> dict:
    """What makes the CAM files of a make-cam call (recorded in CAMS/config.yaml; batch size and
    device are left out: they do not change the maps)."""
    settings = {k: v for k, v in dataclasses.asdict(icfg).items() if k not in ("batch_size", "device", "overwrite")}
    if icfg.method != "advcam":
        settings = {k: v for k, v in settings.items() if not k.startswith("adv_")}
    settings.update(run=str(Path(run).resolve()), model=file_identity(Path(run) / "model.pt"),
                    data=str(Path(data.root).resolve()))
    return settings


def _agreed(work: Optional[list], dist_info) -> list:
    """`work` of the first process, the same list in every process (a no-op without torchrun)."""
    if not dist_info.enabled:
        return work
    box = [work]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def make_cams(run: Path, data: str, split: str, out: Path, icfg: InferConfig, show_progress: Optional[bool] = None
              ) -> dict:
    """Writes CAMS/<id>.npz for every image of the split; finished files are skipped."""
    if icfg.method not in METHODS:
        raise AmrsegError(f"--method {icfg.method!r}: not one of {', '.join(METHODS)}")
    if not icfg.scales or any(s <= 0 for s in icfg.scales):
        raise AmrsegError(f"--scales {icfg.scales}: expected positive scales")
    if not 0.0 <= icfg.xi <= 1.0:
        raise AmrsegError(f"--xi {icfg.xi}: must be in [0, 1]")
    if icfg.batch_size < 1:
        raise AmrsegError(f"--batch-size {icfg.batch_size}: must be positive")
    if icfg.method == "advcam" and icfg.adv_steps < 1:
        raise AmrsegError(f"--adv-steps {icfg.adv_steps}: must be positive (the number of maps per scale)")
    if icfg.adv_climb not in CLIMBS:
        raise AmrsegError(f"--adv-climb {icfg.adv_climb!r}: not one of {', '.join(CLIMBS)}")
    dist_info = init_distributed()
    device = pick_device(icfg.device, dist_info.local_rank)
    model, cfg, class_names = load_run(run, device)
    dataset = open_inference_data(data, split, class_names)
    if dataset.num_classes != len(class_names) - 1:
        raise AmrsegError(f"--data {data}: {dataset.num_classes} classes, but the run was trained on "
                          f"{len(class_names) - 1}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    claim_folder(out, _settings(run, dataset, icfg), "--out", "*.npz", overwrite=icfg.overwrite,
                 write=dist_info.is_main)
    if dist_info.is_main:
        # What later stages need to know about these maps (pseudo-labels picks its thresholds by method).
        meta = {"method": icfg.method, "run": str(Path(run).resolve()), "scales": list(icfg.scales), "xi": icfg.xi}
        if icfg.method == "advcam":
            meta.update(adv_steps=icfg.adv_steps, adv_climb=icfg.adv_climb)
        write_text(out / CAMS_META, json.dumps(meta) + "\n")
    # One work list for all processes: the first one's, taken after it has claimed the folder, so a
    # process that starts late cannot skip the files the others are writing.
    pending = _agreed([i for i in range(len(dataset)) if not (out / f"{dataset.ids[i]}.npz").exists()]
                      if dist_info.is_main else None, dist_info)
    skipped = len(dataset) - len(pending)
    shard = pending[dist_info.rank::dist_info.world_size]
    batches = _size_batches(dataset, shard, icfg.batch_size)
    loader = torch.utils.data.DataLoader(_ImageSet(dataset, shard, icfg.scales), batch_sampler=batches,
                                         num_workers=2)
    labels = dataset.labels
    with progress(total=len(shard), enabled=show_progress if dist_info.is_main else False,
                  desc=f"make-cam {icfg.method}", unit="img") as bar:
        for pyramid, sizes, index in loader:
            pyramid = [x.to(device) for x in pyramid]
            size = tuple(int(v) for v in sizes[0])
            keys = []
            for i in index.tolist():
                row = labels[i] if labels is not None else None
                keys.append(torch.from_numpy(np.flatnonzero(row)).to(device) if row is not None and row.any()
                            else None)
            for i, (k, maps) in zip(index.tolist(), cams_for_batch(model, pyramid, size, keys, icfg)):
                branches = None
                if icfg.save_branches and "compensation" in maps:
                    branches = {name: maps[name].float().cpu().numpy() for name in ("spotlight", "compensation")}
                save_cam(out / f"{dataset.ids[i]}.npz", keys=k.cpu().numpy().astype(np.int64),
                         high_res=maps["fused"].float().cpu().numpy(), cam=maps["cam"].float().cpu().numpy(),
                         branches=branches,
                         active=maps["active"].cpu().numpy())
            bar.update(len(index))
    if dist_info.enabled:
        torch.distributed.barrier()  # every process has written its shard
    missing = [i for i in pending if not (out / f"{dataset.ids[i]}.npz").exists()]
    if missing:
        raise AmrsegError(f"--out {out}: {len(missing)} of the {len(pending)} CAM files were not written (first: "
                          f"{dataset.ids[missing[0]]}.npz); run make-cam again to finish them")
    return {"out": str(out), "written": len(pending), "skipped": skipped, "method": icfg.method,
            "scales": list(icfg.scales), "xi": icfg.xi, "preset": cfg.preset}
