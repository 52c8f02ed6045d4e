"""Training of any run kind (runs.RUN_KINDS) on the one loop of engine.trainer."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..data.voc import open_dataset
from ..errors import AmrsegError
from ..eval.classification import map_validator
from ..runs import RUN_KINDS
from ..runtime import init_distributed, pick_device, seed_everything
from .trainer import Job, fit, prepare_run


def train(cfg: Any, out: Path, resume: bool = False, show_progress: Optional[bool] = None,
          stop_after_steps: Optional[int] = None) -> dict:
    """Trains the run `cfg` (its `kind` picks the network, data and losses) into the run directory
    `out`; returns fit's summary."""
    kind = RUN_KINDS[cfg.kind]
    cfg = prepare_run(cfg, out, resume)
    device = pick_device(cfg.train.device, init_distributed().local_rank)
    data = open_dataset(cfg.data_root, cfg.split, require_labels=kind.needs_image_labels)
    dataset = kind.dataset(cfg, data)
    seed_everything(cfg.train.seed)
    # On resume the weights come from the checkpoint: no pretrained file or download needed.
    model = kind.build(cfg, data.num_classes, not resume).to(device)
    evaluate = None
    if cfg.train.val_split:
        try:
            val = open_dataset(cfg.data_root, cfg.train.val_split)
        except AmrsegError as e:
            raise AmrsegError(f"train.val_split {cfg.train.val_split!r}: {e}") from None
        evaluate = map_validator(val, cfg.data.crop, cfg.train.num_workers, device)
    name = f"{kind.command} {cfg.preset}" if kind.name == "cam" else kind.command
    job = Job(name=name, model=model,
              param_groups=model.param_groups(cfg.train.lr, cfg.train.new_lr_mult, cfg.train.weight_decay),
              dataset=dataset, losses=kind.losses(cfg), log_keys=list(kind.log_keys),
              final={"class_names": list(data.class_names)}, evaluate=evaluate,
              eval_keys=["val_map"] if evaluate else [])
    return fit(job, cfg, out, resume, show_progress, stop_after_steps, device)
