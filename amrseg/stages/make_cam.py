"""`make-cam`: the CAMs of a train-cam run for every image of a split, CAMS/<id>.npz (cam.infer's maths)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..cam.infer import InferConfig, ImageSet, cams_for_batch, size_batches
from ..cam.io import CAMS_META, save_cam
from ..cam.methods import CAM_METHODS
from ..config import check_choice, check_range, check_scales
from ..data.voc import SegData, list_images, open_dataset
from ..errors import AmrsegError
from ..fileio import check_writable_dir, write_text
from ..outputs import claim_folder, file_identity
from ..runs import load_run
from ..runtime import init_distributed, pick_device
from .loop import ImageLoop, on_first


@dataclass
class MakeCamConfig(InferConfig):
    run: str = ""  # the train-cam run directory
    data: str = ""  # dataset root, or a plain folder of images
    split: str = "train"
    out: str = ""  # the CAMS folder

    def validate(self) -> None:
        check_choice("method", self.method, tuple(CAM_METHODS))
        check_scales(self.scales)
        if not 0.0 <= self.xi <= 1.0:
            raise AmrsegError(f"--xi {self.xi}: must be in [0, 1]")
        check_range("batch_size", self.batch_size, lo=1)
        CAM_METHODS[self.method].check(self)
        for key in ("run", "data", "out"):
            check_range(key, getattr(self, key), nonempty=True)


def open_inference_data(data: str, split: str, class_names: list[str]) -> SegData:
    """A VOC-style root (labels where it has them) or a plain folder of images (the run's classes)."""
    root = Path(data)
    if root.is_dir() and not (root / "JPEGImages").is_dir():
        return list_images(root, class_names)
    return open_dataset(root, split, require_labels=False)


def made_by(cfg: MakeCamConfig, data: SegData) -> dict:
    """What makes the CAM files (CAMS/config.yaml): the config without the keys that do not change
    the maps (device, batch size), the run's model.pt by size and time, the dataset's root."""
    # Each method's own settings (InferConfig fields) are recorded only with that method.
    others = {o for m in CAM_METHODS.values() for o in m.options} - set(CAM_METHODS[cfg.method].options)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("batch_size", "device", "overwrite", "out", "data", "split") and k not in others}
    settings.update(run=str(Path(cfg.run).resolve()), model=file_identity(Path(cfg.run) / "model.pt"),
                    data=str(Path(data.root).resolve()))
    return settings


def run(cfg: MakeCamConfig, show_progress: Optional[bool] = None) -> dict:
    """Writes CAMS/<id>.npz for every image of the split; finished files are skipped."""
    cfg.validate()
    check_writable_dir(cfg.out, "--out")
    dist_info = init_distributed()
    device = pick_device(cfg.device, dist_info.local_rank)
    loaded = load_run(Path(cfg.run), "cam", device)
    model, class_names = loaded.model, loaded.class_names
    dataset = open_inference_data(cfg.data, cfg.split, class_names)
    if dataset.num_classes != len(class_names) - 1:
        raise AmrsegError(f"--data {cfg.data}: {dataset.num_classes} classes, but the run was trained on "
                          f"{len(class_names) - 1}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = made_by(cfg, dataset)

    def claim() -> None:
        claim_folder(out, settings, "--out", "*.npz", overwrite=cfg.overwrite)
        # What later stages need to know about these maps (pseudo-labels picks its thresholds by method).
        meta = {"method": cfg.method, "run": str(Path(cfg.run).resolve()), "scales": list(cfg.scales), "xi": cfg.xi,
                **{k: getattr(cfg, k) for k in CAM_METHODS[cfg.method].options}}
        write_text(out / CAMS_META, json.dumps(meta) + "\n")

    on_first(claim, dist_info)
    labels = dataset.labels

    def work(shard: list):
        loader = torch.utils.data.DataLoader(ImageSet(dataset, shard, cfg.scales),
                                             batch_sampler=size_batches(dataset, shard, cfg.batch_size), num_workers=2)
        for pyramid, sizes, index in loader:
            pyramid = [x.to(device) for x in pyramid]
            keys = []
            for i in index.tolist():
                row = labels[i] if labels is not None else None
                keys.append(torch.from_numpy(np.flatnonzero(row)).to(device) if row is not None and row.any()
                            else None)
            size = tuple(int(v) for v in sizes[0])
            for i, (k, maps) in zip(index.tolist(), cams_for_batch(model, pyramid, size, keys, cfg)):
                branches = None
                if cfg.save_branches and "compensation" in maps:
                    branches = {name: maps[name].float().cpu().numpy() for name in ("spotlight", "compensation")}
                save_cam(out / f"{dataset.ids[i]}.npz", keys=k.cpu().numpy().astype(np.int64),
                         high_res=maps["fused"].float().cpu().numpy(), cam=maps["cam"].float().cpu().numpy(),
                         branches=branches, active=maps["active"].cpu().numpy())
                yield i, None

    loop = ImageLoop(dataset, output=lambda i: out / f"{dataset.ids[i]}.npz", desc=f"make-cam {cfg.method}",
                     dist=dist_info, what="CAM files")
    summary = loop.run(work, show_progress)
    return {"out": str(out), **summary, "method": cfg.method, "scales": list(cfg.scales), "xi": cfg.xi,
            "preset": loaded.config.preset}
