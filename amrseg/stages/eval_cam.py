"""`eval-cam`: scores CAMs against the masks at one threshold or a sweep (eval.eval_cam's counting)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import check_choice
from ..data.voc import open_dataset
from ..errors import AmrsegError
from ..eval.eval_cam import evaluate_cams, parse_range
from ..fileio import check_writable_file, write_text
from ..runtime import DEVICES, pick_device


@dataclass
class EvalCamConfig:
    cams: str = ""  # the CAMS folder of make-cam
    data: str = ""
    split: str = ""
    threshold: Optional[float] = None  # background threshold (0.2 without a sweep)
    sweep: Optional[str] = None  # LO:HI:STEP thresholds, all scored in one pass
    xi_sweep: Optional[str] = None  # LO:HI:STEP spotlight weights (make-cam --save-branches)
    device: str = "cpu"
    out: Optional[str] = None  # also write the JSON here

    def validate(self) -> None:
        if self.sweep and self.threshold is not None:
            raise AmrsegError("--sweep and --threshold: give one of them")
        check_choice("device", self.device, DEVICES)


def run(cfg: EvalCamConfig, show_progress: Optional[bool] = None) -> dict:
    """The eval-cam JSON (CONTRACT.md): miou, threshold, iou, num_images, sweep."""
    cfg.validate()
    thresholds = parse_range(cfg.sweep, "--sweep") if cfg.sweep else [0.2 if cfg.threshold is None else cfg.threshold]
    xis = parse_range(cfg.xi_sweep, "--xi-sweep") if cfg.xi_sweep else None
    device = pick_device(cfg.device)
    if cfg.out:
        check_writable_file(cfg.out, "--out")
    data = open_dataset(cfg.data, cfg.split, require_labels=False)
    result = evaluate_cams(Path(cfg.cams), data, thresholds, xi_values=xis, device=device, progress=show_progress)
    if cfg.out:
        write_text(cfg.out, json.dumps(result, indent=2) + "\n")
    return result
