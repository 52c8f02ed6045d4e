"""`train-irn`: IRN's boundary and displacement branches on IR labels (AMR.md section 7)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import IRNConfig
from ..data.transforms import LabelTrainDataset
from ..data.voc import open_dataset
from ..models.irn import build_irn, irn_loss
from ..runtime import init_distributed, pick_device, seed_everything
from .trainer import Job, fit, prepare_run

LOSS_KEYS = ["pos_bg", "pos_fg", "neg", "dp_fg", "dp_bg"]
LABEL_STRIDE = 4  # the IR labels are read on the model's stride-4 grid


def train_irn(cfg: IRNConfig, out: Path, resume: bool = False, show_progress: Optional[bool] = None,
              stop_after_steps: Optional[int] = None) -> dict:
    """Trains per `cfg` into the run directory `out` (see engine.trainer.fit); returns a summary dict."""
    cfg = prepare_run(cfg, out, resume)
    device = pick_device(cfg.train.device, init_distributed().local_rank)
    # The IR labels are the supervision: image-level labels are not needed.
    data = open_dataset(cfg.data_root, cfg.split, require_labels=False)
    dataset = LabelTrainDataset(data, Path(cfg.ir_labels), cfg.data, seed=cfg.train.seed, label_stride=LABEL_STRIDE,
                                flag="--ir-labels")
    seed_everything(cfg.train.seed)
    model = build_irn(cfg.model).to(device)
    radius = cfg.model.radius

    def losses(net, batch):
        images, labels, _ = batch
        return irn_loss(net(images), labels, radius)

    job = Job(name="train-irn", model=model,
              param_groups=model.param_groups(cfg.train.lr, cfg.train.new_lr_mult, cfg.train.weight_decay),
              dataset=dataset, losses=losses, log_keys=LOSS_KEYS, final={"class_names": list(data.class_names)})
    return fit(job, cfg, out, resume, show_progress, stop_after_steps, device)
