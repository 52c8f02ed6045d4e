"""`train-cam`: trains the AMR network (or the plain CAM) on image-level labels."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import Config
from ..data.transforms import CamTrainDataset
from ..data.voc import open_dataset
from ..models.amr import build_model
from ..models.losses import amr_loss
from .common import init_distributed, pick_device, seed_everything
from .trainer import Job, fit, prepare_run

LOSS_KEYS = ["cls", "cls_s", "cls_c", "cps", "area"]


def train_cam(cfg: Config, out: Path, resume: bool = False, show_progress: Optional[bool] = None,
              stop_after_steps: Optional[int] = None) -> dict:
    """Trains per `cfg` into the run directory `out` (see engine.trainer.fit); returns a summary dict."""
    cfg = prepare_run(cfg, out, resume)
    device = pick_device(cfg.train.device, init_distributed().local_rank)
    data = open_dataset(cfg.data_root, cfg.split)
    dataset = CamTrainDataset(data, cfg.data, seed=cfg.train.seed)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, data.num_classes).to(device)

    def losses(net, batch):
        images, labels, _ = batch
        outputs = net(images)
        return amr_loss({k: v.float() for k, v in outputs.items()}, labels, cfg.loss)

    job = Job(name=f"train-cam {cfg.preset}", model=model,
              param_groups=model.param_groups(cfg.train.lr, cfg.train.new_lr_mult, cfg.train.weight_decay),
              dataset=dataset, losses=losses, log_keys=LOSS_KEYS, final={"class_names": list(data.class_names)})
    return fit(job, cfg, out, resume, show_progress, stop_after_steps, device)
