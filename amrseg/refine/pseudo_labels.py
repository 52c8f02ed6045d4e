"""`pseudo-labels`: the step after the CAMs (AMR.md section 7), in two methods.

- crf: IRN's inter-pixel relation (IR) labels: the CAMs thresholded high and low, each refined by a
  dense CRF (refine.crf.ir_label); confident foreground, confident background, 255 between. They
  train the IRN (train-irn). Runs over a pool of processes.
- irn: pseudo masks: each image's stride-4 CAMs (the CAM file's `cam` array), random-walked over the
  affinities of a trained IRN's boundary map (refine.random_walk.walk), upsampled x4 to the image,
  normalised there and argmax'd against a background plane (random_walk.walk_scores), as IRN's
  make_sem_seg_labels. They train the segmentation network (train-seg). Runs on the device.

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
from ..runtime import pick_device, progress
from ..errors import AmrsegError
from ..outputs import CONFIG as CAMS_CONFIG, claim_folder, file_identity
from ..eval.metrics import confusion_matrix, iou_from_confusion
from .crf import DEFAULT_THRESHOLDS, ir_label
from .random_walk import rw_label, walk, walk_scores

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
    crf: bool = True  # False: thresholded CAMs without the dense CRF
    # both: the CAMs' method picks the default thresholds (crf) and the default cam power (irn)
    cam_method: Optional[str] = None  # cam | gradcam | advcam; None = CAMS/cams.json
    # irn only
    irn: Optional[str] = None  # the train-irn run directory
    cam_power: Optional[float] = None  # default_cam_power(cam method): 1.5 with 0.60/0.33, 1 with 0.30/0.05
    radius: Optional[int] = None  # 5
    beta: Optional[float] = None  # 10
    exp_times: Optional[int] = None  # 8: 2^8 walk steps
    device: Optional[str] = None  # auto
    overwrite: bool = False  # remove OUT's labels first, even when they were made with other settings


_CRF_ONLY = {"fg_threshold": "--fg-threshold"}
_IRN_ONLY = {"irn": "--irn", "cam_power": "--cam-power", "radius": "--radius", "beta": "--beta",
             "exp_times": "--exp-times", "device": "--device"}
_IRN_DEFAULTS = {"radius": 5, "beta": 10.0, "exp_times": 8, "device": "auto", "bg_threshold": 0.25}
# The power of the CAMs before the walk goes with the IR-label thresholds they were read at: AMR's
# release raises its AdvCAMs to 1.5 and thresholds them at 0.60/0.33, IRN walks its CAMs as they are
# (power 1) after thresholds 0.30/0.05.
_CAM_POWER_OF_THRESHOLDS = {(0.30, 0.05): 1.0, (0.60, 0.33): 1.5}


def default_cam_power(cam_method: str) -> float:
    """The random walk's default CAM power: the one that goes with the method's default IR thresholds."""
    return _CAM_POWER_OF_THRESHOLDS[DEFAULT_THRESHOLDS[cam_method]]


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


def strided_size(size: tuple[int, int]) -> tuple[int, int]:
    """The stride-4 grid of an HxW image: ceil(H / 4) x ceil(W / 4) (CONTRACT: the `cam` array)."""
    return -(-size[0] // STRIDE), -(-size[1] // STRIDE)


def _checked_cam(path: Path, size: tuple[int, int], num_classes: int) -> dict[str, np.ndarray]:
    """The arrays of a CAM file, checked against the image, with inactive classes' maps at 0."""
    cam = evidence(load_cam(path))
    keys = cam["keys"]
    if keys.size and keys[-1] >= num_classes:
        raise AmrsegError(f"{path}: class key {int(keys[-1])} is outside the dataset's {num_classes} classes")
    if tuple(cam["high_res"].shape[1:]) != tuple(size):
        raise AmrsegError(f"{path}: CAMs are {cam['high_res'].shape[2]}x{cam['high_res'].shape[1]} (WxH), "
                          f"the image {size[1]}x{size[0]}")
    grid = strided_size(size)
    if "cam" in cam and tuple(cam["cam"].shape[1:]) != grid:
        raise AmrsegError(f"{path}: the stride-4 'cam' array is {cam['cam'].shape[2]}x{cam['cam'].shape[1]} (WxH), "
                          f"expected {grid[1]}x{grid[0]} for a {size[1]}x{size[0]} image")
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


def strided_cams(high_res: torch.Tensor) -> torch.Tensor:
    """Stride-4 CAMs for a CAM file without the `cam` array (an older make-cam): [n, H, W] -> [n, h, w].

    Resized as IRN resizes its maps to the grid (bilinear, half-pixel centres) to
    ceil(H / 4) x ceil(W / 4), then each divided by its own max (+1e-5), so that each peaks at
    about 1 like the `cam` make-cam writes. make-cam's `cam` is made from each scale's map, so this
    is only close to it.
    """
    n = high_res.shape[0]
    h, w = strided_size(tuple(high_res.shape[1:]))
    if n == 0:
        return high_res.new_zeros(0, h, w, dtype=torch.float32)
    x = F.interpolate(high_res[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    return x / (x.amax(dim=(1, 2), keepdim=True) + 1e-5)


class _IRNInputs(torch.utils.data.Dataset):
    """(index, normalised image, keys, stride-4 CAMs, whether they came from high_res) of the images to label."""

    def __init__(self, data: SegData, cams: list[Path], index: list[int]):
        self.data, self.cams, self.index = data, cams, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> dict:
        i = self.index[j]
        img = self.data.load_image(i)
        cam = _checked_cam(self.cams[i], img.shape[:2], self.data.num_classes)
        if "cam" in cam:
            strided, resized = torch.from_numpy(cam["cam"].astype(np.float32)), False
        else:
            strided, resized = strided_cams(torch.from_numpy(cam["high_res"].astype(np.float32))), True
        return {"i": i, "image": normalize(img), "keys": cam["keys"], "cam": strided, "resized": resized}


def irn_mask(model, image: torch.Tensor, keys: np.ndarray, cam: torch.Tensor, crop: int, radius: int, beta: float,
             exp_times: int, bg_threshold: float, cam_power: float) -> np.ndarray:
    """One pseudo mask (HxW uint8 class ids) from an image's stride-4 CAMs and the IRN's boundary map.

    IRN's make_sem_seg_labels: the boundary of the image and its flip at the IRN's inference canvas
    (models.irn.infer_boundary), the CAMs walked over its affinities (random_walk.walk), the walked
    maps upsampled x4, cut to the image and normalised there, a background plane in front, argmax.

    Args:
        model: The IRN, in eval mode.
        image: [3, H, W] normalised image.
        keys: [n] class keys of the CAMs.
        cam: [n, ceil(H / 4), ceil(W / 4)] CAMs (the file's `cam`, or `strided_cams`).
        crop: The IRN's training crop (its inference canvas).
    """
    from ..models.irn import infer_boundary  # the model pulls in the backbone code: only for this method

    device = next(model.parameters()).device
    height, width = image.shape[-2:]
    boundary = infer_boundary(model, image.to(device), crop)
    if tuple(cam.shape[1:]) != tuple(boundary.shape):
        raise AmrsegError(f"stride-4 CAMs {tuple(cam.shape)} do not match the boundary map {tuple(boundary.shape)}")
    walked = walk(cam.to(device).float(), boundary, radius=radius, beta=beta, exp_times=exp_times, cam_power=cam_power)
    return rw_label(walk_scores(walked, (height, width), STRIDE, bg_threshold), keys)


def irn_masks(data: SegData, cams: list[Path], out: Path, run: Path, cfg: PseudoLabelConfig, workers: int,
              show_progress: Optional[bool] = None) -> dict:
    """Pseudo masks of every image into `out`; counts and their mIoU against the masks."""
    from ..models.irn import (
        load_irn,  # the model pulls in the backbone code: only for this method
    )

    run_kind(run, "irn", "--irn")
    device = pick_device(cfg.device)
    model, irn_cfg, _ = load_irn(run, device)
    pending = [i for i, iid in enumerate(data.ids) if not (out / f"{iid}.png").exists()]
    done = set(pending)
    loader = torch.utils.data.DataLoader(_IRNInputs(data, cams, pending), batch_size=None, num_workers=workers)
    c = data.num_classes + 1
    conf = torch.zeros(c, c, dtype=torch.int64)
    scored = resized = 0

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
            resized += bool(item["resized"])
            pred = irn_mask(model, item["image"], item["keys"].numpy(), item["cam"], irn_cfg.data.crop,
                            cfg.radius, cfg.beta, cfg.exp_times, cfg.bg_threshold, cfg.cam_power)
            write_palette_png(out / f"{data.ids[i]}.png", pred)
            score(i, pred)
            bar.update(1)
    _, miou = iou_from_confusion(conf)
    return {"written": len(pending), "skipped": len(data) - len(pending), "scored_images": scored,
            "miou": float(miou) if scored and not torch.isnan(miou) else None, "cams_resized": resized}


# --------------------------------------------------------------------------- the stage


def _claim(out: Path, cams: Path, data: SegData, settings: dict, overwrite: bool) -> None:
    """Records what makes OUT's labels in OUT/config.yaml; refuses labels of other settings there."""
    made_by = {k: v for k, v in settings.items() if k not in ("out", "num_images", "device")}
    made_by.update(data=str(Path(data.root).resolve()), cams=str(Path(cams).resolve()),
                   cams_config=file_identity(Path(cams) / CAMS_CONFIG))
    claim_folder(out, made_by, "--out", "*.png", overwrite=overwrite)


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
    if cfg.cam_method is not None:
        if cfg.cam_method not in DEFAULT_THRESHOLDS:
            raise AmrsegError(f"--cam-method {cfg.cam_method!r}: not one of {', '.join(DEFAULT_THRESHOLDS)}")
        cam_method = cfg.cam_method
    elif cfg.method == "crf" or cfg.cam_power is None:
        cam_method, warning = read_cam_method(cams)
        warnings += [warning] if warning else []
    else:
        cam_method = None  # irn with --cam-power: the method decides nothing
    if cfg.method == "crf":
        fg_default, bg_default = DEFAULT_THRESHOLDS[cam_method]
        fg = fg_default if cfg.fg_threshold is None else cfg.fg_threshold
        bg = bg_default if cfg.bg_threshold is None else cfg.bg_threshold
        if not 0 <= bg <= fg:
            raise AmrsegError(f"--bg-threshold {bg} / --fg-threshold {fg}: need 0 <= bg <= fg")
        if cfg.crf:
            _check_crf_extra()
        summary.update(cam_method=cam_method, fg_threshold=fg, bg_threshold=bg, crf=cfg.crf)
        _claim(out, cams, data, summary, cfg.overwrite)
        summary.update(ir_labels(data, paths, out, fg, bg, cfg.crf, workers, show_progress))
    else:
        filled = dataclasses.replace(cfg, **{k: v for k, v in _IRN_DEFAULTS.items() if getattr(cfg, k) is None})
        if filled.cam_power is None:
            filled.cam_power = default_cam_power(cam_method)
        if filled.radius < 2 or filled.exp_times < 0 or filled.beta <= 0 or filled.cam_power <= 0:
            raise AmrsegError(f"--radius {filled.radius} / --exp-times {filled.exp_times} / --beta {filled.beta} / "
                              f"--cam-power {filled.cam_power}: need radius >= 2, exp-times >= 0, beta > 0, "
                              f"cam-power > 0")
        summary.update(irn=str(Path(cfg.irn).resolve()), cam_method=cam_method, cam_power=filled.cam_power,
                       **{k: getattr(filled, k) for k in _IRN_DEFAULTS})
        _claim(out, cams, data, {**summary, "irn_model": file_identity(Path(cfg.irn) / "model.pt")}, cfg.overwrite)
        summary.update(irn_masks(data, paths, out, Path(cfg.irn), filled, workers, show_progress))
        if summary["cams_resized"]:
            warnings.append(f"--cams {cams}: {summary['cams_resized']} CAM files have no stride-4 'cam' array "
                            f"(an older make-cam): their high_res maps were resized to the grid instead")
    return summary, warnings
