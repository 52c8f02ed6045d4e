"""`eval-seg`: scores masks against the ground truth, from a folder (--pred) or a train-seg run (--run)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import check_scales
from ..data.voc import open_dataset, read_mask, write_palette_png
from ..errors import AmrsegError
from ..fileio import check_writable_dir, check_writable_file, write_text
from ..runs import load_run
from ..runtime import pick_device
from ..segment import predict_mask
from .loop import score_masks


@dataclass
class EvalSegConfig:
    data: str = ""
    split: str = ""
    pred: Optional[str] = None  # folder of predicted PNG masks (<id>.png)
    run: Optional[str] = None  # a train-seg run: predict and score in one go
    scales: list = field(default_factory=lambda: [1.0])  # with run: image scales, each with its flip
    crf: bool = False  # with run: dense CRF on the probabilities
    save: Optional[str] = None  # with run: also write the masks here
    device: str = "auto"
    out: Optional[str] = None  # also write the JSON here

    def validate(self) -> None:
        if (self.pred is None) == (self.run is None):
            raise AmrsegError("--pred and --run: give exactly one of them")
        check_scales(self.scales)


def run(cfg: EvalSegConfig, show_progress: Optional[bool] = None) -> dict:
    """The eval JSON: {"miou", "iou": {class: IoU}, "num_images"} (IoU as AMR.md section 6)."""
    cfg.validate()
    if cfg.out:
        check_writable_file(cfg.out, "--out")
    if cfg.save:
        check_writable_dir(cfg.save, "--save")
    data = open_dataset(cfg.data, cfg.split, require_labels=False)
    if cfg.pred:
        pred = Path(cfg.pred)
        if not pred.is_dir():
            raise AmrsegError(f"--pred {pred}: not a directory")
        missing = [data.ids[i] for i in range(len(data)) if data.mask_paths[i] is not None
                   and not (pred / f"{data.ids[i]}.png").is_file()]
        if missing:
            raise AmrsegError(f"--pred {pred}: no mask for {len(missing)} images of the split (first: {missing[0]}.png)")
        result = score_masks(data, lambda i: read_mask(pred / f"{data.ids[i]}.png"), show_progress)
    else:
        device = pick_device(cfg.device)
        loaded = load_run(Path(cfg.run), "seg", device)
        if len(loaded.class_names) != data.num_classes + 1:
            raise AmrsegError(f"--run {cfg.run}: trained on {len(loaded.class_names)} classes, the dataset has "
                              f"{data.num_classes + 1}")
        if cfg.save:
            Path(cfg.save).mkdir(parents=True, exist_ok=True)

        def pred_of(i: int):
            mask = predict_mask(loaded.model, data.load_image(i), cfg.scales, device, cfg.crf)
            if cfg.save:
                write_palette_png(Path(cfg.save) / f"{data.ids[i]}.png", mask)
            return mask

        result = score_masks(data, pred_of, show_progress)
    if cfg.run:
        result.update({"scales": list(cfg.scales), "crf": cfg.crf})
    if cfg.out:
        import json

        write_text(cfg.out, json.dumps(result, indent=2) + "\n")
    return result
