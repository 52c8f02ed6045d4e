"""The eval-cam stage: mIoU of CAM files against ground-truth masks, swept over thresholds (and xi).

Each image is read once; the confusion matrices of every threshold (and every xi) are accumulated
in the same pass (AMR.md section 6, CONTRACT.md eval-cam JSON).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..cam.io import BRANCH_ARRAYS, fuse, load_cam
from ..data.voc import IGNORE
from ..runtime import progress as progress_bar
from ..errors import AmrsegError
from .metrics import iou_from_confusion, sweep_confusion

_MAX_RANGE_VALUES = 10_000  # a sweep longer than this is a typo, not a request


def parse_range(text: str, flag: str) -> list[float]:
    """Parses "LO:HI:STEP" into [LO, LO + STEP, ...], HI included when hit within 1e-9.

    Args:
        text: The flag's value, e.g. "0.05:0.60:0.05".
        flag: The flag's name, for the error message (e.g. "--sweep").

    Returns:
        The values, rounded to 10 decimals so that 0.1 + 0.2 prints as 0.3.

    Raises:
        AmrsegError: Naming `flag` for malformed text, a non-positive step or HI < LO.
    """
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        lo, hi, step = (float(p) for p in parts)
    except ValueError:
        raise AmrsegError(f"{flag}: expected LO:HI:STEP (e.g. 0.05:0.60:0.05), got {text!r}") from None
    if not all(math.isfinite(v) for v in (lo, hi, step)) or step <= 0 or hi < lo:
        raise AmrsegError(f"{flag}: need finite LO <= HI and STEP > 0, got {text!r}")
    if (hi - lo) / step >= _MAX_RANGE_VALUES:
        raise AmrsegError(f"{flag}: {text!r} gives more than {_MAX_RANGE_VALUES} values")
    # The division may round either way; settle the count on the values themselves.
    count = math.floor((hi - lo) / step) + 1
    while lo + count * step <= hi + 1e-9:
        count += 1
    while count > 1 and lo + (count - 1) * step > hi + 1e-9:
        count -= 1
    if count > _MAX_RANGE_VALUES:
        raise AmrsegError(f"{flag}: {text!r} gives {count} values (at most {_MAX_RANGE_VALUES})")
    return [round(lo + i * step, 10) for i in range(count)]


def evaluate_cams(
    cams_dir: Union[str, Path],
    data: Any,
    thresholds: list[float],
    xi_values: Optional[list[float]] = None,
    device: Union[str, torch.device] = "cpu",
    progress: Optional[bool] = False,
) -> dict:
    """Scores CAMS/<id>.npz against the masks of `data` for every threshold (and xi).

    Args:
        cams_dir: Directory of CAM files written by make-cam.
        data: A SegData (ids, class_names, num_classes, load_mask(i)); images without a mask are
            skipped.
        thresholds: Background thresholds to sweep (one value = a plain evaluation).
        xi_values: If given, the stored per-branch maps are fused with each spotlight weight xi
            (needs make-cam --save-branches) instead of using the stored high_res.
        device: Torch device for the confusion matrices.
        progress: Show a progress bar; None: only on a terminal.

    Returns:
        The eval-cam JSON dict: {"miou", "threshold", "iou": {class name: IoU or None},
        "num_images", "sweep": [[t, miou], ...]}; with xi_values also "xi" (the best) and
        "xi_sweep": [[xi, best threshold, best miou], ...], the top-level numbers then being those
        of the best (xi, threshold) pair and "sweep" the threshold sweep at the best xi.

    Raises:
        AmrsegError: Missing, unreadable or mismatched CAM files, a split without masks, bad masks.
    """
    cams_dir = Path(cams_dir)
    device = torch.device(device)
    ts = sorted(set(float(t) for t in thresholds))
    if not ts:
        raise AmrsegError("thresholds (--threshold/--sweep): nothing to evaluate (empty list)")
    xis = None if xi_values is None else sorted(set(float(x) for x in xi_values))
    if xis is not None and (not xis or not all(0.0 <= x <= 1.0 for x in xis)):
        raise AmrsegError(f"xi values (--xi-sweep) must be in [0, 1], got {xi_values}")
    num_classes = data.num_classes + 1
    if len(data.class_names) != num_classes:
        raise AmrsegError(f"{data.root}: {len(data.class_names)} class names for {num_classes} classes")

    _check_all_present(cams_dir, data)
    # float32 thresholds, as in viz.predict_labels, so that ties resolve identically.
    t_tensor = torch.tensor(ts, dtype=torch.float32, device=device)
    planes = 1 if xis is None else len(xis)
    conf = torch.zeros(planes, len(ts), num_classes, num_classes, dtype=torch.long, device=device)
    num_images = 0
    for i in progress_bar(range(len(data)), enabled=progress, desc="eval-cam", unit="img"):
        mask = data.load_mask(i)
        if mask is None:
            continue
        path = cams_dir / f"{data.ids[i]}.npz"
        arrays = load_cam(path)
        keys, high_res = arrays["keys"], arrays["high_res"]
        if high_res.shape[1:] != mask.shape:
            raise AmrsegError(
                f"{path}: CAM size {high_res.shape[1]}x{high_res.shape[2]} differs from the mask size "
                f"{mask.shape[0]}x{mask.shape[1]}; was it made from another data set?"
            )
        if keys.size and keys[-1] >= data.num_classes:
            raise AmrsegError(f"{path}: class key {int(keys[-1])} beyond the {data.num_classes} classes")
        counts = np.bincount(mask.ravel(), minlength=256)
        bad = np.flatnonzero(counts[num_classes:IGNORE]) + num_classes
        if bad.size:
            raise AmrsegError(
                f"{data.root}: mask of image '{data.ids[i]}' has labels {bad.tolist()} outside "
                f"0..{num_classes - 1} and {IGNORE}"
            )
        gt = torch.from_numpy(mask).to(device)
        keys_t = torch.from_numpy(keys).to(device)
        if xis is None:
            maps = [torch.from_numpy(high_res).to(device, torch.float32)]
        else:
            missing = [name for name in BRANCH_ARRAYS if name not in arrays]
            if missing:
                raise AmrsegError(
                    f"{path}: no per-branch maps ({', '.join(missing)}) for the xi sweep; "
                    "re-run make-cam with --save-branches"
                )
            s, c = (torch.from_numpy(arrays[name]).to(device, torch.float32) for name in BRANCH_ARRAYS)
            maps = [fuse(s, c, xi) for xi in xis]
        for k, m in enumerate(maps):
            conf[k] += sweep_confusion(m, keys_t, gt, t_tensor, num_classes)
        num_images += 1
    if num_images == 0:
        raise AmrsegError(f"{data.root}: split '{data.split}' has no ground-truth masks to evaluate against")
    return _report(conf.cpu(), ts, xis, data.class_names, num_images)


def _check_all_present(cams_dir: Path, data: Any) -> None:
    """Fails before the long pass if CAM files of images with masks are missing."""
    missing = [i for i, image_id in enumerate(data.ids) if not (cams_dir / f"{image_id}.npz").is_file()]
    if not missing:
        return
    # Only images with a mask need a CAM; masks are read just for the (few) missing ones.
    missing = [i for i in missing if data.load_mask(i) is not None]
    if missing:
        first = cams_dir / f"{data.ids[missing[0]]}.npz"
        raise AmrsegError(
            f"{first}: CAM file not found ({len(missing)} of the {len(data)} images lack CAMs in "
            f"{cams_dir}; run or finish make-cam)"
        )


def nan_to_none(x: float) -> Optional[float]:
    return None if math.isnan(x) else float(x)


def _best(values: torch.Tensor) -> int:
    """Index of the largest value (the first on ties), NaN counting as lowest."""
    v = torch.nan_to_num(values, nan=-math.inf)
    return int(torch.argmax(v).item())


def _report(
    conf: torch.Tensor, ts: list[float], xis: Optional[list[float]], class_names: list[str], num_images: int
) -> dict:
    """Builds the eval-cam JSON from the accumulated [X, T, C, C] confusion matrices."""
    iou, miou = iou_from_confusion(conf)  # [X, T, C], [X, T]
    best_t = [_best(miou[k]) for k in range(conf.shape[0])]
    best_x = _best(torch.stack([miou[k, t] for k, t in enumerate(best_t)]))
    t_star = best_t[best_x]
    result = {
        "miou": nan_to_none(miou[best_x, t_star].item()),
        "threshold": ts[t_star],
        "iou": {name: nan_to_none(v) for name, v in zip(class_names, iou[best_x, t_star].tolist())},
        "num_images": num_images,
        "sweep": [[t, nan_to_none(m)] for t, m in zip(ts, miou[best_x].tolist())],
    }
    if xis is not None:
        result["xi"] = xis[best_x]
        result["xi_sweep"] = [
            [xi, ts[t], nan_to_none(miou[k, t].item())] for k, (xi, t) in enumerate(zip(xis, best_t))
        ]
    return result
