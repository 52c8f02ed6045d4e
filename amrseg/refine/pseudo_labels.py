"""`pseudo-labels`: the step after the CAMs (AMR.md section 7), in two methods.

- crf: IRN's inter-pixel relation (IR) labels: the CAMs thresholded high and low, each refined by a
  dense CRF (refine.crf.ir_label); confident foreground, confident background, 255 between. They
  train the IRN (train-irn). Runs over a pool of processes.
- irn: pseudo masks: each image's CAMs, at stride 4, random-walked over the affinities of a trained
  IRN's boundary map (refine.random_walk.propagate), upsampled to the image and argmax'd against a
  background plane. They train the segmentation network (train-seg). Runs on the device.

Output: DIR/<id>.png palette PNGs, each written atomically. An image whose PNG exists is skipped,
so an interrupted run is finished by running it again; the summary still scores every image.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..cam.infer import CAMS_META
from ..cam.io import evidence, load_cam
from ..config import run_kind
from ..data.transforms import normalize
from ..data.voc import IGNORE, SegData, read_image, read_mask, write_palette_png
from ..engine.common import pick_device, progress
from ..errors import AmrsegError
from ..eval.metrics import confusion_matrix, iou_from_confusion
from .crf import DEFAULT_THRESHOLDS, ir_label
from .random_walk import propagate, rw_label

METHODS = ("crf", "irn")
STRIDE = 4  # IRN's grid


@dataclass
class PseudoLabelConfig:
    """Options of one pseudo-labels call; None = the method's default (or: not given)."""

    method: str = "crf"  # crf: IR labels | irn: pseudo masks
    workers: Optional[int] = None  # crf: processes; irn: image-loading workers; None = min(4, CPUs)
    bg_threshold: Optional[float] = None  # crf: DEFAULT_THRESHOLDS[cam method][1]; irn: 0.25
    # crf only
    fg_threshold: Optional[float] = None  # DEFAULT_THRESHOLDS[cam method][0]
    cam_method: Optional[str] = None  # cam | gradcam | advcam; None = CAMS/cams.json
    crf: bool = True  # False: thresholded CAMs without the dense CRF
    # irn only
    irn: Optional[str] = None  # the train-irn run directory
    cam_power: Optional[float] = None  # 1.5 (the AMR release)
    radius: Optional[int] = None  # 5
    beta: Optional[float] = None  # 10
    exp_times: Optional[int] = None  # 8: 2^8 walk steps
    device: Optional[str] = None  # auto


_CRF_ONLY = {"fg_threshold": "--fg-threshold", "cam_method": "--cam-method"}
_IRN_ONLY = {"irn": "--irn", "cam_power": "--cam-power", "radius": "--radius", "beta": "--beta",
             "exp_times": "--exp-times", "device": "--device"}
_IRN_DEFAULTS = {"cam_power": 1.5, "radius": 5, "beta": 10.0, "exp_times": 8, "device": "auto", "bg_threshold": 0.25}


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def read_cam_method(cams: Path) -> tuple[str, Optional[str]]:
    """The CAM method make-cam recorded in CAMS/cams.json, and a warning when there is no record."""
    path = Path(cams) / CAMS_META
    if not path.is_file():
        return "cam", f"{path} not found (CAMs of an older make-cam?): thresholds of --cam-method cam"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AmrsegError(f"{path}: cannot read ({' '.join(str(e).split())})") from None
    method = meta.get("method") if isinstance(meta, dict) else None
    if method not in DEFAULT_THRESHOLDS:
        raise AmrsegError(f"{path}: unknown CAM method {method!r} (valid: {', '.join(DEFAULT_THRESHOLDS)})")
    return method, None


def cam_paths(cams: Path, data: SegData) -> list[Path]:
    """CAMS/<id>.npz of every image of the split; one-line error naming the first one missing."""
    cams = Path(cams)
    if not cams.is_dir():
        raise AmrsegError(f"--cams {cams}: not a directory")
    present = set(os.listdir(cams))
    missing = [i for i in data.ids if f"{i}.npz" not in present]
    if missing:
        raise AmrsegError(f"--cams {cams}: no CAM file {missing[0]}.npz ({len(missing)} of the {len(data)} images "
                          f"of split '{data.split}' missing); run make-cam for this split first")
    return [cams / f"{i}.npz" for i in data.ids]


def _checked_cam(path: Path, size: tuple[int, int], num_classes: int) -> dict[str, np.ndarray]:
    """The arrays of a CAM file, checked against the image, with inactive classes' maps at 0."""
    cam = evidence(load_cam(path))
    keys = cam["keys"]
    if keys.size and keys[-1] >= num_classes:
        raise AmrsegError(f"{path}: class key {int(keys[-1])} is outside the dataset's {num_classes} classes")
    if tuple(cam["high_res"].shape[1:]) != tuple(size):
        raise AmrsegError(f"{path}: CAMs are {cam['high_res'].shape[2]}x{cam['high_res'].shape[1]} (WxH), "
                          f"the image {size[1]}x{size[0]}")
    return cam


def _agreement(label: np.ndarray, gt: np.ndarray, where: str) -> np.ndarray:
    """[correct, confident with known GT, confident, pixels] of one IR label against its mask."""
    if gt.shape != label.shape:
        raise AmrsegError(f"{where}: mask size {gt.shape} differs from the label's {label.shape}")
    confident = label != IGNORE
    known = confident & (gt != IGNORE)
    return np.array([(known & (label == gt)).sum(), known.sum(), confident.sum(), label.size], dtype=np.int64)


# --------------------------------------------------------------------------- crf: IR labels


def _check_crf_extra() -> None:
    """Fails before any work (rather than in a pool worker) when pydensecrf is missing."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        raise AmrsegError("dense CRF needs the 'crf' extra: pip install 'amrseg[crf]' (pydensecrf2); "
                          "or pass --no-crf") from None


def _crf_one(task: tuple) -> tuple[bool, Optional[np.ndarray]]:
    """One image of the crf method (in a pool worker): (written?, agreement counts or None)."""
    image_path, mask_path, cam_path, out_path, fg, bg, crf, num_classes = task
    out_path = Path(out_path)
    written = not out_path.exists()
    if written:
        img = read_image(image_path)
        cam = _checked_cam(Path(cam_path), img.shape[:2], num_classes)
        label = ir_label(img, cam["high_res"], cam["keys"], fg, bg, crf=crf)
        write_palette_png(out_path, label)
    else:
        label = read_mask(out_path)
    stats = _agreement(label, read_mask(mask_path), str(mask_path)) if mask_path else None
    return written, stats


def ir_labels(data: SegData, cams: list[Path], out: Path, fg: float, bg: float, crf: bool, workers: int,
              show_progress: Optional[bool] = None) -> dict:
    """IR labels of every image into `out` over `workers` processes; counts and agreement with the masks."""
    tasks = [(str(data.image_path(i)), str(data.mask_paths[i]) if data.mask_paths[i] else None, str(cams[i]),
              str(out / f"{iid}.png"), fg, bg, crf, data.num_classes) for i, iid in enumerate(data.ids)]
    written, totals, scored = 0, np.zeros(4, np.int64), 0
    with progress(total=len(tasks), enabled=show_progress, desc="pseudo-labels crf", unit="img") as bar:
        if workers <= 1:
            results = map(_crf_one, tasks)
            pool = None
        else:
            pool = multiprocessing.Pool(workers)
            chunk = max(1, min(16, len(tasks) // (4 * workers)))
            results = pool.imap_unordered(_crf_one, tasks, chunksize=chunk)
        try:
            for was_written, stats in results:
                written += was_written
                if stats is not None:
                    totals += stats
                    scored += 1
                bar.update(1)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    return {"written": written, "skipped": len(tasks) - written, "scored_images": scored,
            "confident_precision": float(totals[0] / totals[1]) if totals[1] else None,
            "confident_fraction": float(totals[2] / totals[3]) if totals[3] else None}


# --------------------------------------------------------------------------- irn: pseudo masks


def strided_cams(high_res: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[n, H, W] maps -> [n, h, w] on the stride-4 grid (h = ceil(H / 4)): mean of each 4x4 cell.

    The maps are edge-padded to 4h x 4w first, so cell (y, x) covers image pixels 4y..4y+3 exactly.
    """
    n, height, width = high_res.shape
    h, w = size
    if n == 0:
        return high_res.new_zeros(0, h, w)
    x = F.pad(high_res[None].float(), (0, STRIDE * w - width, 0, STRIDE * h - height), mode="replicate")
    return F.avg_pool2d(x, STRIDE)[0]


class _IRNInputs(torch.utils.data.Dataset):
    """(index, normalised image, keys, high_res, strided cam or None) of the images to label."""

    def __init__(self, data: SegData, cams: list[Path], index: list[int]):
        self.data, self.cams, self.index = data, cams, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> dict:
        i = self.index[j]
        img = self.data.load_image(i)
        cam = _checked_cam(self.cams[i], img.shape[:2], self.data.num_classes)
        return {"i": i, "image": normalize(img), "keys": cam["keys"],
                "high_res": cam["high_res"].astype(np.float32),
                "cam": cam["cam"].astype(np.float32) if "cam" in cam else None}


def irn_mask(model, image: torch.Tensor, keys: np.ndarray, high_res: torch.Tensor, cam: Optional[torch.Tensor],
             radius: int, beta: float, exp_times: int, bg_threshold: float, cam_power: float) -> np.ndarray:
    """One pseudo mask (HxW uint8 class ids) from an image's CAMs and the IRN's boundary map.

    The boundary is the mean over the image and its flip (flipped back); the CAMs are taken on the
    same stride-4 grid (the file's `cam` when it has that size, else `high_res` averaged per cell).
    The walked maps are upsampled x4 bilinearly and cut to the image, as IRN does, then argmax'd.
    """
    device = next(model.parameters()).device
    height, width = image.shape[-2:]
    x = image[None].to(device)
    both = model.boundary(torch.cat([x, x.flip(-1)]))
    boundary = (both[0] + both[1].flip(-1)) / 2
    h, w = boundary.shape
    if cam is not None and tuple(cam.shape[1:]) == (h, w):
        maps = cam.to(device).float()
    else:
        maps = strided_cams(high_res.to(device), (h, w))
    walked = propagate(maps, boundary, radius=radius, beta=beta, exp_times=exp_times, bg_threshold=bg_threshold,
                       cam_power=cam_power)
    up = F.interpolate(walked[None], size=(STRIDE * h, STRIDE * w), mode="bilinear", align_corners=False)
    return rw_label(up[0, :, :height, :width], keys)


def irn_masks(data: SegData, cams: list[Path], out: Path, run: Path, cfg: PseudoLabelConfig, workers: int,
              show_progress: Optional[bool] = None) -> dict:
    """Pseudo masks of every image into `out`; counts and their mIoU against the masks."""
    from ..models.irn import (
        load_irn,  # the model pulls in the backbone code: only for this method
    )

    run_kind(run, "irn", "--irn")
    device = pick_device(cfg.device)
    model, _, _ = load_irn(run, device)
    pending = [i for i, iid in enumerate(data.ids) if not (out / f"{iid}.png").exists()]
    done = set(pending)
    loader = torch.utils.data.DataLoader(_IRNInputs(data, cams, pending), batch_size=None, num_workers=workers)
    c = data.num_classes + 1
    conf = torch.zeros(c, c, dtype=torch.int64)
    scored = 0

    def score(i: int, pred: np.ndarray) -> None:
        nonlocal conf, scored
        gt = data.load_mask(i)
        if gt is not None:
            if gt.shape != pred.shape:
                raise AmrsegError(f"{out / (data.ids[i] + '.png')}: size {pred.shape} differs from the mask's "
                                  f"{gt.shape}")
            conf += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), c)
            scored += 1

    with progress(total=len(data), enabled=show_progress, desc="pseudo-labels irn", unit="img") as bar, \
            torch.inference_mode():
        for i in (i for i in range(len(data)) if i not in done):
            score(i, read_mask(out / f"{data.ids[i]}.png"))
            bar.update(1)
        for item in loader:
            i = item["i"]
            pred = irn_mask(model, item["image"], item["keys"].numpy(), item["high_res"], item["cam"],
                            cfg.radius, cfg.beta, cfg.exp_times, cfg.bg_threshold, cfg.cam_power)
            write_palette_png(out / f"{data.ids[i]}.png", pred)
            score(i, pred)
            bar.update(1)
    _, miou = iou_from_confusion(conf)
    return {"written": len(pending), "skipped": len(data) - len(pending), "scored_images": scored,
            "miou": float(miou) if scored and not torch.isnan(miou) else None}


# --------------------------------------------------------------------------- the stage


def make_pseudo_labels(cams: Path, data: SegData, out: Path, cfg: PseudoLabelConfig,
                       show_progress: Optional[bool] = None) -> tuple[dict, list[str]]:
    """Writes OUT/<id>.png for every image of `data`; returns (JSON summary, warnings).

    Raises:
        AmrsegError: a flag of the other method, a missing CAM file, an unreadable image or CAM, a
            wrong run kind (one line naming the flag or file).
    """
    if cfg.method not in METHODS:
        raise AmrsegError(f"--method {cfg.method!r}: not one of {', '.join(METHODS)}")
    other = _IRN_ONLY if cfg.method == "crf" else _CRF_ONLY
    for name, flag in other.items():
        if getattr(cfg, name) is not None:
            raise AmrsegError(f"{flag}: not used by --method {cfg.method}")
    if cfg.method == "irn" and not cfg.crf:
        raise AmrsegError("--no-crf: not used by --method irn")
    if cfg.method == "irn" and not cfg.irn:
        raise AmrsegError("--irn RUN: --method irn needs a train-irn run")
    workers = default_workers() if cfg.workers is None else cfg.workers
    if workers < 0:
        raise AmrsegError(f"--workers {workers}: must be 0 or more")
    paths = cam_paths(cams, data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"method": cfg.method, "out": str(out), "num_images": len(data)}
    warnings: list[str] = []
    if cfg.method == "crf":
        if cfg.cam_method is not None:
            if cfg.cam_method not in DEFAULT_THRESHOLDS:
                raise AmrsegError(f"--cam-method {cfg.cam_method!r}: not one of {', '.join(DEFAULT_THRESHOLDS)}")
            cam_method = cfg.cam_method
        else:
            cam_method, warning = read_cam_method(cams)
            warnings += [warning] if warning else []
        fg_default, bg_default = DEFAULT_THRESHOLDS[cam_method]
        fg = fg_default if cfg.fg_threshold is None else cfg.fg_threshold
        bg = bg_default if cfg.bg_threshold is None else cfg.bg_threshold
        if not 0 <= bg <= fg:
            raise AmrsegError(f"--bg-threshold {bg} / --fg-threshold {fg}: need 0 <= bg <= fg")
        if cfg.crf:
            _check_crf_extra()
        summary.update(cam_method=cam_method, fg_threshold=fg, bg_threshold=bg, crf=cfg.crf)
        summary.update(ir_labels(data, paths, out, fg, bg, cfg.crf, workers, show_progress))
    else:
        filled = dataclasses.replace(cfg, **{k: v for k, v in _IRN_DEFAULTS.items() if getattr(cfg, k) is None})
        if filled.radius < 2 or filled.exp_times < 0 or filled.beta <= 0:
            raise AmrsegError(f"--radius {filled.radius} / --exp-times {filled.exp_times} / --beta {filled.beta}: "
                              f"need radius >= 2, exp-times >= 0, beta > 0")
        summary.update(irn=str(Path(cfg.irn).resolve()), **{k: getattr(filled, k) for k in _IRN_DEFAULTS})
        summary.update(irn_masks(data, paths, out, Path(cfg.irn), filled, workers, show_progress))
    return summary, warnings
