"""`train-seg`: DeepLab-v2 on pseudo masks, 255 ignored (AMR.md section 7), on the shared training loop."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import SegConfig
from ..data.transforms import LabelTrainDataset
from ..data.voc import open_dataset
from ..models.deeplab import build_deeplab, segmentation_loss
from ..runtime import init_distributed, pick_device, seed_everything
from .trainer import Job, fit, prepare_run


def train_seg(cfg: SegConfig, out: Path, resume: bool = False, show_progress: Optional[bool] = None,
              stop_after_steps: Optional[int] = None) -> dict:
    """Trains DeepLab-v2 per `cfg` on the masks in cfg.labels; returns fit's summary."""
    cfg = prepare_run(cfg, out, resume)
    device = pick_device(cfg.train.device, init_distributed().local_rank)
    data = open_dataset(cfg.data_root, cfg.split, require_labels=False)
    dataset = LabelTrainDataset(data, Path(cfg.labels), cfg.data, seed=cfg.train.seed)
    seed_everything(cfg.train.seed)
    # On resume the weights come from the checkpoint: no download or file needed.
    model = build_deeplab(cfg.model, data.num_classes + 1, load_weights=not resume).to(device)

    def losses(net, batch):
        images, labels, _ = batch
        return {"total": segmentation_loss(net(images), labels)}

    job = Job(name="train-seg", model=model,
              param_groups=model.param_groups(cfg.train.lr, cfg.train.new_lr_mult, cfg.train.weight_decay),
              dataset=dataset, losses=losses, final={"class_names": list(data.class_names)})
    return fit(job, cfg, out, resume, show_progress, stop_after_steps, device)
