"""`train-cam`: trains the AMR network (or the plain CAM) on image-level labels.

Checkpoints are exact: the sample order of an epoch is a function of (seed, epoch) and each sample's
augmentation a function of (seed, epoch, index), so a run resumed from any saved step repeats the
uninterrupted run bit for bit on CPU. A checkpoint is written atomically at the end of every epoch and
when the run is interrupted (Ctrl-C / SIGTERM) between two steps.
"""
from __future__ import annotations

import csv
import os
import signal
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import yaml

from ..config import Config, merge, to_dict
from ..data.transforms import CamTrainDataset
from ..data.voc import open_dataset
from ..errors import AmrsegError
from ..fileio import atomic_write, write_text
from ..models.amr import build_model
from ..models.losses import amr_loss
from .common import (DistInfo, atomic_torch_save, autocast, autocast_dtype, init_distributed,
                     load_torch, pick_device, poly_lr, progress, seed_everything)

# Keys that may differ between a run and its resumption: they do not change the result.
_RESUME_FREE = {"train.num_workers", "train.device", "train.log_every"}
LOG_FIELDS = ["step", "epoch", "loss", "cls", "cls_s", "cls_c", "cps", "area", "lr", "images_per_s"]


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled indices of one epoch, a function of (seed, epoch) only; sharded over ranks.

    The tail that does not fill a global batch is dropped. `skip` global batches at the start are
    left out, which is how a run resumes mid-epoch without touching the data.
    """

    def __init__(self, n: int, global_batch: int, seed: int, dist_info: DistInfo):
        self.n, self.global_batch, self.seed, self.dist = n, global_batch, seed, dist_info
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[: self.batches_per_epoch() * self.global_batch]
        order = order[self.skip * self.global_batch:]
        return iter(order[self.dist.rank:: self.dist.world_size].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.skip) * (self.global_batch // self.dist.world_size)


def _check_resume(cfg: Config, run: Path) -> Config:
    """The saved config is authoritative on resume; a conflicting flag is an error, not a silent change."""
    from ..config import load_run_config

    saved = load_run_config(run)
    flat_new, flat_old = _flatten(to_dict(cfg)), _flatten(to_dict(saved))
    diff = [k for k in flat_new if flat_new[k] != flat_old.get(k) and k not in _RESUME_FREE]
    if diff:
        shown = ", ".join(f"{k}: {flat_old.get(k)!r} -> {flat_new[k]!r}" for k in diff[:4])
        raise AmrsegError(f"--resume: {run}/config.yaml differs from this command ({shown})")
    return merge(saved, {"train": {k.split(".", 1)[1]: flat_new[k] for k in _RESUME_FREE}})


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


class _StopFlag:
    """First Ctrl-C / SIGTERM asks the loop to stop after the current step; a second one aborts."""

    def __init__(self):
        self.set = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _trim_log(path: Path, last_step: int) -> None:
    """On resume, rows written after the checkpoint would be repeated: drop them."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= last_step]
    atomic_write(path, lambda tmp: _write_rows(tmp, rows))


def _write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows(rows)


def train_cam(cfg: Config, out: Path, resume: bool = False, show_progress: Optional[bool] = None,
              stop_after_steps: Optional[int] = None) -> dict:
    """Trains per `cfg` into the run directory `out`; returns a summary dict.

    Args:
        cfg: the resolved config (cfg.data_root and cfg.split name the training data).
        out: the run directory (config.yaml, checkpoint.pt, model.pt, log.csv).
        resume: continue from out/checkpoint.pt.
        show_progress: progress bar on/off; None = only on a terminal.
        stop_after_steps: stop (with a checkpoint) after this many steps of this invocation, as an
            interruption would. For time-boxed jobs and tests.
    """
    out = Path(out)
    ckpt_path, cfg_path, log_path = out / "checkpoint.pt", out / "config.yaml", out / "log.csv"
    if resume:
        if not ckpt_path.is_file():
            raise AmrsegError(f"--resume: {ckpt_path} not found (nothing to resume)")
        cfg = _check_resume(cfg, out)
    elif ckpt_path.exists() or (out / "model.pt").exists():
        raise AmrsegError(f"--out {out}: already holds a run; pass --resume to continue it or choose another --out")

    dist_info = init_distributed()
    device = pick_device(cfg.train.device, dist_info.local_rank)
    tc = cfg.train
    if tc.batch_size % dist_info.world_size:
        raise AmrsegError(f"--batch-size {tc.batch_size}: must be divisible by the {dist_info.world_size} processes")

    data = open_dataset(cfg.data_root, cfg.split)
    dataset = CamTrainDataset(data, cfg.data, seed=tc.seed)
    sampler = EpochSampler(len(dataset), tc.batch_size, tc.seed, dist_info)
    steps_per_epoch = sampler.batches_per_epoch()
    if steps_per_epoch == 0:
        raise AmrsegError(f"--batch-size {tc.batch_size}: larger than the {len(dataset)} images of split '{cfg.split}'")
    total_steps = tc.epochs * steps_per_epoch

    seed_everything(tc.seed)
    model = build_model(cfg, data.num_classes).to(device)
    if device.type == "cuda" and tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = model.param_groups(tc.lr, tc.new_lr_mult, tc.weight_decay)
    # Keyword arguments: IRN's release passed weight_decay into SGD's momentum slot by position.
    optimizer = torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    amp_dtype = autocast_dtype(tc.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    step = 0
    if resume:
        state = load_torch(ckpt_path, "checkpoint")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        if dist_info.is_main:
            _trim_log(log_path, step)
    elif dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(cfg_path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        atomic_write(log_path, lambda tmp: _write_rows(tmp, []))

    net = model
    if dist_info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile and device.type == "cuda":
        net = torch.compile(net)

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=tc.batch_size // dist_info.world_size, sampler=sampler,
        num_workers=min(tc.num_workers, os.cpu_count() or 1), pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=False)

    def save_checkpoint():
        if dist_info.is_main:
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict(), "step": step, "epoch": step // steps_per_epoch,
                               "config": to_dict(cfg)}, ckpt_path)

    start_step, stopped = step, False
    bar = progress(total=total_steps, initial=step, enabled=show_progress if dist_info.is_main else False,
                   desc=f"train-cam {cfg.preset}", unit="step")
    window: dict = {}
    t0, seen = time.perf_counter(), 0
    model.train()
    with _StopFlag() as stop:
        while step < total_steps and not stopped:
            epoch, skip = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, skip)
            dataset.set_epoch(epoch)
            for images, labels, _ in loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if device.type == "cuda" and tc.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                lr_scale = poly_lr(1.0, step, total_steps, tc.poly_power)
                for g in optimizer.param_groups:
                    g["lr"] = g["initial_lr"] * lr_scale
                with autocast(device, amp_dtype):
                    outputs = net(images)
                losses = amr_loss({k: v.float() for k, v in outputs.items()}, labels, cfg.loss)
                if not torch.isfinite(losses["total"]):
                    bar.close()
                    kept = f"{ckpt_path} (step {start_step})" if ckpt_path.exists() else "no checkpoint yet"
                    raise AmrsegError(f"step {step + 1}: loss is {losses['total'].item()}; stopped, last good "
                                      f"checkpoint kept: {kept} (lower --lr or check the data)")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses["total"]).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                seen += images.shape[0] * dist_info.world_size
                for k, v in losses.items():
                    window[k] = window.get(k, 0.0) + float(v.detach())
                window["_n"] = window.get("_n", 0) + 1
                bar.update(1)
                if step % tc.log_every == 0 or step == total_steps or step % steps_per_epoch == 0:
                    ips = seen / max(time.perf_counter() - t0, 1e-9)
                    row = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                           "lr": f"{tc.lr * lr_scale:.6g}", "images_per_s": f"{ips:.2f}"}
                    for k in ("cls", "cls_s", "cls_c", "cps", "area"):
                        row[k] = f"{window[k] / window['_n']:.5f}" if k in window else ""
                    row["loss"] = f"{window['total'] / window['_n']:.5f}"
                    bar.set_postfix(loss=row["loss"], img_s=f"{ips:.1f}")
                    if dist_info.is_main:
                        with open(log_path, "a", newline="") as f:
                            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)
                    window, t0, seen = {}, time.perf_counter(), 0
                if step % steps_per_epoch == 0:
                    save_checkpoint()
                if stop.set or (stop_after_steps is not None and step - start_step >= stop_after_steps):
                    stopped = True
                    break
    bar.close()
    if stopped and step < total_steps:
        save_checkpoint()
        return {"finished": False, "step": step, "total_steps": total_steps, "checkpoint": str(ckpt_path)}
    if dist_info.is_main:
        atomic_torch_save({"state_dict": model.state_dict(), "config": to_dict(cfg),
                           "class_names": list(data.class_names)}, out / "model.pt")
    return {"finished": True, "step": step, "total_steps": total_steps, "model": str(out / "model.pt")}
