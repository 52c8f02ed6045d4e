"""`pseudo-labels`: IR labels (crf) or IRN pseudo masks (irn) from CAMs, OUT/<id>.png (refine's maths).

An image whose PNG exists is skipped, so an interrupted run is finished by running it again; the
summary still scores every image against the masks where the split has them.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..cam.io import CAMS_META
from ..config import check_choice, check_range
from ..data.voc import SegData, image_size, open_dataset, read_mask, write_palette_png
from ..errors import AmrsegError
from ..fileio import check_writable_dir
from ..outputs import CONFIG, claim_folder, file_identity
from ..cam.methods import DEFAULT_THRESHOLDS, default_cam_power
from ..refine.pseudo_labels import IRNInputs, check_crf_extra, ir_label_of, irn_mask
from ..refine.random_walk import IRN_EXP_TIMES, suggested_exp_times
from ..runs import load_run
from ..runtime import pick_device
from .loop import ImageLoop, LabelAgreement, MaskIoU


@dataclass
class PseudoLabelConfig:
    """Options of one pseudo-labels call; None = the method's default (or: not given)."""

    cams: str = ""  # the CAMS folder of make-cam
    data: str = ""  # dataset root
    split: str = ""
    out: str = ""  # folder of the <id>.png labels
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

    def validate(self) -> None:
        check_choice("method", self.method, tuple(REFINERS))
        for key in ("cams", "data", "split", "out"):
            check_range(key, getattr(self, key), nonempty=True)


# The fields of PseudoLabelConfig that are the stage's own, not a refiner's.
_STAGE_FIELDS = ("cams", "data", "split", "out", "method", "workers", "cam_method", "overwrite", "bg_threshold")


@dataclass
class IRLabelOptions:
    """crf: IR labels, the CAMs thresholded high and low, each refined by a dense CRF (refine.crf)."""

    fg_threshold: float  # confident foreground above it
    bg_threshold: float  # confident background where both readings say background
    crf: bool = True  # False: the thresholded CAMs without the dense CRF

    def validate(self) -> None:
        if not 0 <= self.bg_threshold <= self.fg_threshold:
            raise AmrsegError(f"--bg-threshold {self.bg_threshold} / --fg-threshold {self.fg_threshold}: "
                              f"need 0 <= bg <= fg")


@dataclass
class WalkOptions:
    """irn: pseudo masks, the CAMs random-walked over a train-irn run's affinities (refine.random_walk)."""

    irn: str  # the train-irn run
    cam_power: float  # CAMs raised to this power before the walk
    radius: int = 5  # affinity radius at stride 4
    beta: float = 10.0  # affinity exponent
    exp_times: int = IRN_EXP_TIMES  # the walk takes 2^exp_times steps
    bg_threshold: float = 0.25  # the background plane of the walked maps
    device: str = "auto"

    def validate(self) -> None:
        if self.radius < 2 or self.exp_times < 0 or self.beta <= 0 or self.cam_power <= 0:
            raise AmrsegError(f"--radius {self.radius} / --exp-times {self.exp_times} / --beta {self.beta} / "
                              f"--cam-power {self.cam_power}: need radius >= 2, exp-times >= 0, beta > 0, "
                              f"cam-power > 0")


@dataclass(frozen=True)
class Refiner:
    """The contract of a refiner (pseudo-labels --method NAME), written once.

    Attributes:
        options: its config dataclass (with `validate()`); its fields are the flags (and `--set` keys)
            it takes, the others' fields are refused. A field without a default is filled from the
            CAM method (`defaults`) unless given.
        defaults: (cam method) -> the values of its fields that depend on how the CAMs were made.
        run: (data, CAM paths, OUT, options, workers, show_progress) -> summary: writes OUT/<id>.png
            for every image (skipping the finished ones) and scores them against the masks.
    """

    name: str
    options: type
    defaults: Callable[[Optional[str]], dict]
    run: Callable


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


def _crf_one(task: tuple) -> tuple:
    """One image of the crf method (in a pool worker): writes its IR label, returns (index, label)."""
    i, image_path, cam_path, out_path, num_classes, fg, bg, crf = task
    label = ir_label_of(Path(image_path), Path(cam_path), num_classes, fg, bg, crf)
    write_palette_png(Path(out_path), label)
    return i, label


def ir_labels(data: SegData, cams: list[Path], out: Path, opts: IRLabelOptions, workers: int,
              show_progress: Optional[bool] = None) -> dict:
    """IR labels of every image into `out` over `workers` processes; agreement with the masks."""
    if opts.crf:
        check_crf_extra()

    def output(i: int) -> Path:
        return out / f"{data.ids[i]}.png"

    def work(shard: list):
        tasks = [(i, str(data.image_path(i)), str(cams[i]), str(output(i)), data.num_classes, opts.fg_threshold,
                  opts.bg_threshold, opts.crf) for i in shard]
        if workers <= 1 or len(tasks) <= 1:
            yield from map(_crf_one, tasks)
            return
        with multiprocessing.Pool(workers) as pool:
            yield from pool.imap_unordered(_crf_one, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers))))

    loop = ImageLoop(data, output=output, desc="pseudo-labels crf", scorer=LabelAgreement(),
                     reread=lambda i: read_mask(output(i)), what="IR labels")
    return loop.run(work, show_progress)


def irn_masks(data: SegData, cams: list[Path], out: Path, opts: WalkOptions, workers: int,
              show_progress: Optional[bool] = None) -> dict:
    """Pseudo masks of every image into `out`; their mIoU against the masks."""
    device = pick_device(opts.device)
    loaded = load_run(Path(opts.irn), "irn", device, flag="--irn")
    crop = loaded.config.data.crop
    resized = 0

    def output(i: int) -> Path:
        return out / f"{data.ids[i]}.png"

    def work(shard: list):
        nonlocal resized
        loader = torch.utils.data.DataLoader(IRNInputs(data, cams, shard), batch_size=None, num_workers=workers)
        with torch.inference_mode():
            for item in loader:
                i = item["i"]
                resized += bool(item["resized"])
                pred = irn_mask(loaded.model, item["image"], item["keys"].numpy(), item["cam"], crop,
                                opts.radius, opts.beta, opts.exp_times, opts.bg_threshold, opts.cam_power)
                write_palette_png(output(i), pred)
                yield i, pred

    loop = ImageLoop(data, output=output, desc="pseudo-labels irn", scorer=MaskIoU(list(data.class_names)),
                     reread=lambda i: read_mask(output(i)), what="pseudo masks")
    summary = loop.run(work, show_progress)
    summary.pop("iou", None)
    return {**summary, "cams_resized": resized}


def _ir_defaults(cam_method: Optional[str]) -> dict:
    fg, bg = DEFAULT_THRESHOLDS[cam_method]
    return {"fg_threshold": fg, "bg_threshold": bg}


def _walk_defaults(cam_method: Optional[str]) -> dict:
    return {"cam_power": default_cam_power(cam_method)}


# The refiners of pseudo-labels: `--method` takes its choices from here.
REFINERS: dict[str, Refiner] = {
    "crf": Refiner("crf", IRLabelOptions, _ir_defaults, ir_labels),
    "irn": Refiner("irn", WalkOptions, _walk_defaults, irn_masks),
}


def check_refiner_flags(cfg: PseudoLabelConfig) -> None:
    """One line for a flag of another refiner than cfg.method's, or a missing required one."""
    refiner = REFINERS[cfg.method]
    own = {f.name for f in dataclasses.fields(refiner.options)}
    for f in dataclasses.fields(PseudoLabelConfig):
        if f.name not in _STAGE_FIELDS and f.name not in own and getattr(cfg, f.name) != f.default:
            raise AmrsegError(f"--{f.name.replace('_', '-')}: not used by --method {cfg.method}"
                              if f.name != "crf" else f"--no-crf: not used by --method {cfg.method}")
    if "irn" in own and not cfg.irn:
        raise AmrsegError("--irn RUN: --method irn needs a train-irn run")


def refiner_options(cfg: PseudoLabelConfig, cam_method: Optional[str]) -> Any:
    """The chosen refiner's options from the flat config: its fields as given, the others its
    defaults (those that depend on the CAM method from `cam_method`); validated."""
    check_refiner_flags(cfg)
    refiner = REFINERS[cfg.method]
    own = {f.name for f in dataclasses.fields(refiner.options)}
    given = {k: getattr(cfg, k) for k in own if getattr(cfg, k, None) is not None}
    needed = [f.name for f in dataclasses.fields(refiner.options)
              if f.default is dataclasses.MISSING and f.name not in given]
    values = {**(refiner.defaults(cam_method) if needed else {}), **given}
    opts = refiner.options(**{k: v for k, v in values.items() if k in own})
    opts.validate()
    return opts


def _claim(out: Path, cfg: PseudoLabelConfig, data: SegData, settings: dict) -> None:
    """Records what makes OUT's labels in OUT/config.yaml; refuses labels of other settings there."""
    made_by = {k: v for k, v in settings.items() if k not in ("out", "num_images", "device")}
    made_by.update(data=str(Path(data.root).resolve()), cams=str(Path(cfg.cams).resolve()),
                   cams_config=file_identity(Path(cfg.cams) / CONFIG))
    claim_folder(out, made_by, "--out", "*.png", overwrite=cfg.overwrite)


def _walk_reach_warning(data: SegData, exp_times: int) -> list[str]:
    """A warning when the default walk length `exp_times` does not suit the images' size (their
    median long side, from up to 25 images' headers)."""
    if not len(data):
        return []
    step = max(1, len(data) // 25)
    side = float(np.median([max(image_size(data.image_path(i))) for i in range(0, len(data), step)]))
    better = suggested_exp_times(side)
    if abs(better - exp_times) < 2:
        return []
    return [f"--exp-times: the default {exp_times} (2^{exp_times} walk steps) is IRN's for ~500 px images; these are "
            f"about {side:.0f} px, where a walk of 2^{better} steps reaches as far (--exp-times {better})"]


def run(cfg: PseudoLabelConfig, show_progress: Optional[bool] = None) -> tuple[dict, list[str]]:
    """Writes OUT/<id>.png for every image of the split; returns (JSON summary, warnings).

    Raises:
        AmrsegError: a flag of the other refiner, a missing CAM file, an unreadable image or CAM, a
            wrong run kind (one line naming the flag or file).
    """
    cfg.validate()
    check_writable_dir(cfg.out, "--out")
    check_refiner_flags(cfg)  # before any work
    workers = default_workers() if cfg.workers is None else cfg.workers
    if workers < 0:
        raise AmrsegError(f"--workers {workers}: must be 0 or more")
    data = open_dataset(cfg.data, cfg.split, require_labels=False)
    paths = cam_paths(Path(cfg.cams), data)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    if cfg.cam_method is not None:
        if cfg.cam_method not in DEFAULT_THRESHOLDS:
            raise AmrsegError(f"--cam-method {cfg.cam_method!r}: not one of {', '.join(DEFAULT_THRESHOLDS)}")
        cam_method = cfg.cam_method
    elif cfg.method == "crf" or cfg.cam_power is None:
        cam_method, warning = read_cam_method(Path(cfg.cams))
        warnings += [warning] if warning else []
    else:
        cam_method = None  # irn with --cam-power: the method decides nothing
    opts = refiner_options(cfg, cam_method)
    summary: dict = {"method": cfg.method, "out": str(out), "num_images": len(data), "cam_method": cam_method,
                     **dataclasses.asdict(opts)}
    if cfg.method == "irn":
        summary["irn"] = str(Path(opts.irn).resolve())
        _claim(out, cfg, data, {**summary, "irn_model": file_identity(Path(opts.irn) / "model.pt")})
    else:
        _claim(out, cfg, data, summary)
    summary.update(REFINERS[cfg.method].run(data, paths, out, opts, workers, show_progress))
    if cfg.method == "irn" and cfg.exp_times is None:
        warnings += _walk_reach_warning(data, opts.exp_times)
    if summary.get("cams_resized"):
        warnings.append(f"--cams {cfg.cams}: {summary['cams_resized']} CAM files have no stride-4 'cam' array "
                        f"(an older make-cam): their high_res maps were resized to the grid instead")
    return summary, warnings
