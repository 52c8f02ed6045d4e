"""`train-cam`: trains the AMR network (or the plain CAM) on image-level labels."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import Config
from ..data.transforms import CamTrainDataset, normalize, resize_long
from ..data.voc import SegData, open_dataset
from ..errors import AmrsegError
from ..eval.classification import mean_average_precision
from ..models.amr import build_model
from ..models.losses import amr_loss
from ..runtime import init_distributed, pick_device, seed_everything
from .trainer import Job, fit, prepare_run

LOSS_KEYS = ["cls", "cls_s", "cls_c", "cps", "area"]


class _ValImages(torch.utils.data.Dataset):
    """Val images resized so the long side is the training crop, normalised; no augmentation."""

    def __init__(self, data: SegData, long_side: int):
        self.data, self.long_side = data, long_side

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return normalize(resize_long(self.data.load_image(i), self.long_side))


def classification_validator(cfg: Config, device: torch.device) -> Callable[[torch.nn.Module], dict]:
    """(model) -> {"val_map": mAP} on cfg.train.val_split: the per-epoch figure of train-cam.

    Each image's score per class is the mean of the branches' sigmoid scores over the image and its
    flip (one forward of the pair at the training crop's scale: amr-official's AMMs take their
    eval statistics over that pair, as make-cam); mAP over the classes present in the split
    (eval.classification).
    Only logged: the run never picks a model by it.
    """
    try:
        data = open_dataset(cfg.data_root, cfg.train.val_split)
    except AmrsegError as e:
        raise AmrsegError(f"train.val_split {cfg.train.val_split!r}: {e}") from None
    labels = torch.from_numpy(data.labels.astype("float32"))
    # Its own generator: the val pass never draws from the global RNG the training run uses.
    loader = torch.utils.data.DataLoader(_ValImages(data, cfg.data.crop), batch_size=1,
                                         num_workers=min(cfg.train.num_workers, 2), generator=torch.Generator())

    def evaluate(model: torch.nn.Module) -> dict:
        scores = []
        for image in loader:
            x = image.to(device)
            out = model(torch.cat([x, x.flip(-1)]))  # batch size 1: the image, then its flip
            probs = [torch.sigmoid(v.float()) for k, v in out.items() if k.startswith("logits_")]
            scores.append(torch.stack(probs).mean(dim=(0, 1))[None].cpu())
        return {"val_map": mean_average_precision(torch.cat(scores), labels)}

    return evaluate


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

    evaluate = classification_validator(cfg, device) if cfg.train.val_split else None
    job = Job(name=f"train-cam {cfg.preset}", model=model,
              param_groups=model.param_groups(cfg.train.lr, cfg.train.new_lr_mult, cfg.train.weight_decay),
              dataset=dataset, losses=losses, log_keys=LOSS_KEYS, final={"class_names": list(data.class_names)},
              evaluate=evaluate, eval_keys=["val_map"] if evaluate else [])
    return fit(job, cfg, out, resume, show_progress, stop_after_steps, device)
