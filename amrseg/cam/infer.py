"""`make-cam`: multi-scale + flip CAMs of a trained run, fused over the two branches (AMR.md section 5).

Batching: images of equal size are stacked (up to `batch_size`), and each scale's image and flip go
through in one forward pass, so an image needs one pass per scale and several images share it.
The per-image, per-scale loop in bench/speed.py gives the same maps (checked to 1e-4).

Three methods share everything but how a branch's map is read off its final feature map F:
- cam: ReLU(W_c . F)                                (the CAM of AMR.md section 1)
- gradcam: ReLU(sum_k a_k F_k), a_k = spatial sum of dS/dF_k over the count of its positive entries,
  S = sum of the ReLU CAM of class c. With a linear head the gradient is known in closed form:
  dS/dF_k(h, w) = W_ck [W_c . F(h, w) > 0], so no backward pass is needed (checked against autograd
  in the tests).
- advcam: Grad-CAM maps summed over the steps of anti-adversarial climbing on the input; the climb
  for all of an image's classes runs as one batch (one row per class), not class by class.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config, merge
from ..data.transforms import normalize
from ..data.voc import SegData, image_size, list_images, open_dataset
from ..engine.common import init_distributed, load_torch, pick_device, progress
from ..errors import AmrsegError
from ..fileio import write_text
from ..models.amr import AMRNet
from .io import fuse, normalise_max, save_cam

METHODS = ("cam", "gradcam", "advcam")
CAMS_META = "cams.json"  # CAMS/cams.json: {"method", "run", "scales", "xi"} of the make-cam call


@dataclass
class InferConfig:
    method: str = "cam"  # cam | gradcam | advcam
    scales: list = field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0])
    xi: float = 0.5  # weight of the spotlight CAM in the fused map
    batch_size: int = 8  # images per forward pass where their sizes are equal
    device: str = "auto"
    save_branches: bool = False  # also store each branch's normalised maps (for eval-cam --xi-sweep)
    score_threshold: float = 0.5  # unlabelled images: classes whose sigmoid score exceeds this
    adv_steps: int = 27  # advcam: climbing steps (half at scale 0.5, as the release)
    adv_step_size: float = 0.08
    adv_mask_weight: float = 7.0
    adv_mask_threshold: float = 0.5


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


def gradcam_maps(feat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of every class from the final feature map, in closed form.

    Args:
        feat: F [N, C, h, w].
        weight: classifier weight W [K, C] (1x1 conv, no bias).
    Returns:
        [N, K, h, w] = ReLU(sum_k a_ck F_k) with a_ck = sum_hw g / max(1, #{g > 0}), g = W_ck * [W_c . F > 0].
    """
    pos = (torch.einsum("kc,nchw->nkhw", weight, feat) > 0).flatten(2).sum(-1).to(feat.dtype)  # [N, K] |mask|
    grad_sum = weight[None] * pos[:, :, None]  # [N, K, C]: W_ck * |mask_c|
    n_pos = torch.where(weight[None] > 0, pos[:, :, None], torch.zeros_like(grad_sum)).clamp(min=1)
    return F.relu(torch.einsum("nkc,nchw->nkhw", grad_sum / n_pos, feat))


def _branch_maps(model: AMRNet, x: torch.Tensor, method: str
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{branch: (maps [N, K, h, w], logits [N, K], raw class scores W . F [N, K, h, w])}.

    maps are the method's (cam: ReLU(W . F); gradcam: Grad-CAM); the raw scores, before the ReLU,
    are the fallback of a class whose maps are 0 everywhere (see cams_for_batch).
    """
    feats = model.branch_features(x)
    out = {}
    for name, branch in model.branches():
        f = feats[name]
        w = branch.classifier.weight.flatten(1)
        raw = torch.einsum("kc,nchw->nkhw", w, f)
        maps = F.relu(raw) if method == "cam" else gradcam_maps(f, w)
        out[name] = (maps, torch.einsum("kc,nc->nk", w, f.mean(dim=(2, 3))), raw)
    return out


def _advcam_maps(model: AMRNet, x: torch.Tensor, cls: torch.Tensor, steps: int, icfg: InferConfig
                 ) -> dict[str, torch.Tensor]:
    """Anti-adversarial climbing, one batch row per (image copy, class).

    Args:
        x: [R, 3, h, w] rows to climb (an image and its flip, repeated once per class).
        cls: [R] the class each row climbs.
    Returns:
        {branch: [R, h', w'] Grad-CAM of the row's class summed over steps 0..steps}.
    """
    lo = x.flatten(1).min(1).values[:, None, None, None]
    hi = x.flatten(1).max(1).values[:, None, None, None]
    rows = torch.arange(len(cls), device=x.device)
    others = torch.ones(len(cls), model_num_classes(model), device=x.device)
    others[rows, cls] = 0
    acc: dict[str, torch.Tensor] = {}
    r0: dict[str, torch.Tensor] = {}
    x = x.clone()
    for step in range(steps + 1):
        x.requires_grad_(True)
        with torch.enable_grad():
            feats = model.branch_features(x)
            objective = x.new_zeros(())
            for name, branch in model.branches():
                f = feats[name]
                w = branch.classifier.weight.flatten(1)
                cam = F.relu(torch.einsum("kc,nchw->nkhw", w, f))[rows, cls]  # R_t [R, h, w]
                logits = torch.einsum("kc,nc->nk", w, f.mean(dim=(2, 3)))
                with torch.no_grad():
                    gc = gradcam_maps(f, w)[rows, cls]
                    acc[name] = acc.get(name, 0) + gc
                if step == 0:
                    r0[name] = cam.detach()
                mask = (cam / (cam.flatten(1).max(1).values[:, None, None] + 1e-5) > icfg.adv_mask_threshold).detach()
                j = logits[rows, cls] - (logits * others).sum(1) \
                    - icfg.adv_mask_weight * ((cam - r0[name]).abs() * mask).flatten(1).sum(1)
                objective = objective + j.sum()
        if step == steps:
            break
        (grad,) = torch.autograd.grad(objective, x)
        with torch.no_grad():
            step_dir = grad / (grad.flatten(1).abs().max(1).values[:, None, None, None] + 1e-12)
            x = torch.max(torch.min(x.detach() + icfg.adv_step_size * step_dir, hi), lo)
    return acc


def model_num_classes(model: AMRNet) -> int:
    return model.spotlight.classifier.weight.shape[0]


# --------------------------------------------------------------------------- batching


class _ImageSet(torch.utils.data.Dataset):
    def __init__(self, data: SegData, index: list[int]):
        self.data, self.index = data, index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, j):
        i = self.index[j]
        return normalize(self.data.load_image(i)), i


def _size_batches(data: SegData, index: list[int], batch_size: int) -> list[list[int]]:
    """Positions into `index` grouped by image size (from the headers), at most batch_size each."""
    groups: dict[tuple, list[int]] = {}
    for j, i in enumerate(index):
        groups.setdefault(image_size(data.image_path(i)), []).append(j)
    return [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


def cams_for_batch(model: AMRNet, images: torch.Tensor, keys: list[Optional[torch.Tensor]], icfg: InferConfig
                   ) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Fused and per-branch maps of a batch of same-size images.

    Each branch's maps are summed over scales and flips and divided by their own max (+1e-5). A
    class that no branch activates anywhere (every map 0: the classifier sees no positive evidence
    for it at any scale) would stay 0; it gets instead, in each branch, 1 at the peak of its raw class
    scores W . F (summed the same way) and 0 elsewhere, so every stored map peaks at 1 (CONTRACT.md),
    and 'active' False, so that the stages after the CAMs treat it as having no evidence.

    Args:
        images: [B, 3, H, W] normalised.
        keys: per image, its foreground class indices, or None to use the classes the classifier
            predicts (sigmoid score of the branch mean > score_threshold; the top class if none is).
    Returns:
        per image (keys [n], {'fused': [n, H, W], branch name: [n, H, W], 'active': bool [n]}), each
        map peaking at 1.
    """
    B, _, H, W = images.shape
    scales = sorted(icfg.scales, key=lambda s: s != 1.0)  # scale 1.0 first: it decides unlabelled keys
    sums: list[dict[str, torch.Tensor]] = [dict() for _ in range(B)]
    raws: list[dict[str, torch.Tensor]] = [dict() for _ in range(B)]

    def add(total: dict, name: str, m: torch.Tensor) -> None:  # total[name] += m [n, h, w] resized to H x W
        total[name] = total.get(name, 0) + F.interpolate(m[None], size=(H, W), mode="bilinear",
                                                         align_corners=False)[0]

    for s in scales:
        h, w = max(1, round(H * s)), max(1, round(W * s))
        x = images if (h, w) == (H, W) else F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
        x = torch.cat([x, x.flip(-1)])
        with torch.inference_mode():
            out = _branch_maps(model, x, "cam" if icfg.method == "advcam" else icfg.method)
        _fill_keys(out, keys, icfg)
        for name, (maps, _, raw) in out.items():
            maps, raw = maps[:B] + maps[B:].flip(-1), raw[:B] + raw[B:].flip(-1)
            for b in range(B):
                add(raws[b], name, raw[b, keys[b]])
                if icfg.method != "advcam":
                    add(sums[b], name, maps[b, keys[b]])
        if icfg.method == "advcam":
            steps = icfg.adv_steps // 2 if s == 0.5 else icfg.adv_steps
            for b in range(B):
                k = keys[b]
                if len(k) == 0:
                    continue
                rows = torch.cat([x[b:b + 1].expand(len(k), -1, -1, -1), x[B + b:B + b + 1].expand(len(k), -1, -1, -1)])
                for name, m in _advcam_maps(model, rows, torch.cat([k, k]), steps, icfg).items():
                    add(sums[b], name, m[:len(k)] + m[len(k):].flip(-1))
    results = []
    for b in range(B):
        if len(keys[b]):
            branch, active = _normalise(sums[b], raws[b])
        else:
            branch = {name: images.new_zeros(0, H, W) for name, _ in model.branches()}
            active = torch.ones(0, dtype=torch.bool, device=images.device)
        branch["fused"] = fuse(branch["spotlight"], branch["compensation"], icfg.xi) if "compensation" in branch \
            else branch["spotlight"]
        branch["active"] = active
        results.append((keys[b], branch))
    return results


def _normalise(sums: dict[str, torch.Tensor], raws: dict[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-class max normalisation of each branch; the peaks of the raw scores for the classes no
    branch activates. Returns the maps and `active` [n] (False for those classes)."""
    dead = torch.stack([m.flatten(1).amax(1) <= 0 for m in sums.values()]).all(0)  # [n]
    out = {}
    for name, m in sums.items():
        m = normalise_max(m)
        if bool(dead.any()):
            m = torch.where(dead[:, None, None], peak_map(raws[name]), m)
        out[name] = m
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
    dist_info = init_distributed()
    device = pick_device(icfg.device, dist_info.local_rank)
    model, cfg, class_names = load_run(run, device)
    dataset = open_inference_data(data, split, class_names)
    if dataset.num_classes != len(class_names) - 1:
        raise AmrsegError(f"--data {data}: {dataset.num_classes} classes, but the run was trained on "
                          f"{len(class_names) - 1}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dist_info.is_main:
        # What later stages need to know about these maps (pseudo-labels picks its thresholds by method).
        write_text(out / CAMS_META, json.dumps({"method": icfg.method, "run": str(Path(run).resolve()),
                                                "scales": list(icfg.scales), "xi": icfg.xi}) + "\n")
    pending = [i for i in range(len(dataset)) if not (out / f"{dataset.ids[i]}.npz").exists()]
    skipped = len(dataset) - len(pending)
    pending = pending[dist_info.rank::dist_info.world_size]
    batches = _size_batches(dataset, pending, icfg.batch_size)
    loader = torch.utils.data.DataLoader(_ImageSet(dataset, pending), batch_sampler=batches, num_workers=2)
    labels = dataset.labels
    with progress(total=len(pending), enabled=show_progress if dist_info.is_main else False,
                  desc=f"make-cam {icfg.method}", unit="img") as bar:
        for images, index in loader:
            images = images.to(device)
            keys = []
            for i in index.tolist():
                row = labels[i] if labels is not None else None
                keys.append(torch.from_numpy(np.flatnonzero(row)).to(device) if row is not None and row.any()
                            else None)
            for i, (k, maps) in zip(index.tolist(), cams_for_batch(model, images, keys, icfg)):
                branches = None
                if icfg.save_branches and "compensation" in maps:
                    branches = {name: maps[name].float().cpu().numpy() for name in ("spotlight", "compensation")}
                save_cam(out / f"{dataset.ids[i]}.npz", keys=k.cpu().numpy().astype(np.int64),
                         high_res=maps["fused"].float().cpu().numpy(), branches=branches,
                         active=maps["active"].cpu().numpy())
            bar.update(len(index))
    return {"out": str(out), "written": len(pending), "skipped": skipped, "method": icfg.method,
            "scales": list(icfg.scales), "xi": icfg.xi, "preset": cfg.preset}
