"""The one training loop behind train-cam, train-irn and train-seg.

What every training command shares: the run directory (config.yaml, checkpoint.pt, model.pt,
log.csv), exact resume, SGD with poly decay, mixed precision and channels_last on CUDA, DDP under
torchrun, a progress bar, the NaN guard and the Ctrl-C checkpoint. A command supplies a `Job`: its
model, parameter groups, dataset and the function that turns a batch into losses.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import yaml

from ..config import TrainConfig, load_run_config, merge, to_dict
from ..errors import AmrsegError
from ..fileio import atomic_write, write_text
from .common import (DistInfo, atomic_torch_save, autocast, autocast_dtype, init_distributed, load_torch,
                     pick_device, poly_lr, progress)

# Keys that may differ between a run and its resumption: they do not change the result.
_RESUME_FREE = {"train.num_workers", "train.device", "train.log_every"}


@dataclass
class Job:
    """One training command's pieces.

    Attributes:
        name: the command, for messages and the progress bar ("train-cam").
        model: the module whose state is saved (trainable parts and frozen ones alike).
        param_groups: SGD groups, each with "params" and "initial_lr" (and optionally "weight_decay").
        dataset: map-style dataset with `set_epoch(epoch)`; items are tuples of tensors whose first
            element is the image batch.
        losses: (net, batch on the device) -> {"total": scalar, other named scalars}; runs under
            autocast, so it should cast outputs to float before the loss.
        log_keys: loss names logged to log.csv (besides "loss" = total), in column order.
        final: extra entries of model.pt (class names, ...).
    """

    name: str
    model: torch.nn.Module
    param_groups: list
    dataset: Any
    losses: Callable[[torch.nn.Module, list], dict]
    log_keys: list = field(default_factory=list)
    final: dict = field(default_factory=dict)


def log_fields(job: Job) -> list[str]:
    return ["step", "epoch", "loss", *job.log_keys, "lr", "images_per_s"]


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


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_resume(cfg: Any, run: Path) -> Any:
    """The saved config is authoritative on resume; a conflicting flag is an error, not a silent change."""
    saved = load_run_config(run, cfg.kind)
    flat_new, flat_old = _flatten(to_dict(cfg)), _flatten(to_dict(saved))
    diff = [k for k in flat_new if flat_new[k] != flat_old.get(k) and k not in _RESUME_FREE]
    if diff:
        shown = ", ".join(f"{k}: {flat_old.get(k)!r} -> {flat_new[k]!r}" for k in diff[:4])
        raise AmrsegError(f"--resume: {run}/config.yaml differs from this command ({shown})")
    return merge(saved, {"train": {k.split(".", 1)[1]: flat_new[k] for k in _RESUME_FREE}})


def prepare_run(cfg: Any, out: Path, resume: bool) -> Any:
    """Checks the run directory before any work: returns the config to train with."""
    out = Path(out)
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise AmrsegError(f"--resume: {out / 'checkpoint.pt'} not found (nothing to resume)")
        return check_resume(cfg, out)
    if (out / "checkpoint.pt").exists() or (out / "model.pt").exists():
        raise AmrsegError(f"--out {out}: already holds a run; pass --resume to continue it or choose another --out")
    return cfg


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


def _write_rows(path: str, fields: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _trim_log(path: Path, fields: list[str], last_step: int) -> None:
    """On resume, rows written after the checkpoint would be repeated: drop them."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= last_step]
    atomic_write(path, lambda tmp: _write_rows(tmp, fields, rows))


def _to_device(batch, device: torch.device, channels_last: bool) -> list:
    out = []
    for i, t in enumerate(batch):
        if isinstance(t, torch.Tensor):
            t = t.to(device, non_blocking=True)
            if i == 0 and channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return out


def fit(job: Job, cfg: Any, out: Path, resume: bool = False, show_progress: Optional[bool] = None,
        stop_after_steps: Optional[int] = None, device: Optional[torch.device] = None) -> dict:
    """Trains `job` per `cfg.train` into the run directory `out`; returns a summary dict.

    Args:
        job: model, parameter groups, dataset and loss function.
        cfg: the resolved config dataclass (saved as config.yaml; needs `.kind` and `.train`), already
            checked by `prepare_run`.
        out: the run directory.
        resume: continue from out/checkpoint.pt.
        show_progress: progress bar on/off; None = only on a terminal.
        stop_after_steps: stop (with a checkpoint) after this many steps of this invocation, as an
            interruption would. For time-boxed jobs and tests.
        device: where job.model already is (default: from cfg.train.device).
    """
    out = Path(out)
    ckpt_path, log_path = out / "checkpoint.pt", out / "log.csv"
    tc: TrainConfig = cfg.train
    dist_info = init_distributed()
    device = device or pick_device(tc.device, dist_info.local_rank)
    if tc.batch_size % dist_info.world_size:
        raise AmrsegError(f"--batch-size {tc.batch_size}: must be divisible by the {dist_info.world_size} processes")
    sampler = EpochSampler(len(job.dataset), tc.batch_size, tc.seed, dist_info)
    steps_per_epoch = sampler.batches_per_epoch()
    if steps_per_epoch == 0:
        raise AmrsegError(f"--batch-size {tc.batch_size}: larger than the {len(job.dataset)} images of "
                          f"split '{cfg.split}'")
    total_steps = tc.epochs * steps_per_epoch
    fields = log_fields(job)

    model = job.model
    channels_last = device.type == "cuda" and tc.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Keyword arguments: IRN's release passed weight_decay into SGD's momentum slot by position.
    optimizer = torch.optim.SGD(job.param_groups, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
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
            _trim_log(log_path, fields, step)
    elif dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        atomic_write(log_path, lambda tmp: _write_rows(tmp, fields, []))

    net = model
    if dist_info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile and device.type == "cuda":
        net = torch.compile(net)

    loader = torch.utils.data.DataLoader(
        job.dataset, batch_size=tc.batch_size // dist_info.world_size, sampler=sampler,
        num_workers=min(tc.num_workers, os.cpu_count() or 1), pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=False)

    def save_checkpoint():
        if dist_info.is_main:
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict(), "step": step, "epoch": step // steps_per_epoch,
                               "config": to_dict(cfg)}, ckpt_path)

    start_step, stopped = step, False
    bar = progress(total=total_steps, initial=step, enabled=show_progress if dist_info.is_main else False,
                   desc=job.name, unit="step")
    window: dict = {}
    t0, seen = time.perf_counter(), 0
    model.train()
    with _StopFlag() as stop:
        while step < total_steps and not stopped:
            epoch, skip = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, skip)
            job.dataset.set_epoch(epoch)
            for batch in loader:
                batch = _to_device(batch, device, channels_last)
                lr_scale = poly_lr(1.0, step, total_steps, tc.poly_power)
                for g in optimizer.param_groups:
                    g["lr"] = g["initial_lr"] * lr_scale
                with autocast(device, amp_dtype):
                    losses = job.losses(net, batch)
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
                seen += batch[0].shape[0] * dist_info.world_size
                for k, v in losses.items():
                    window[k] = window.get(k, 0.0) + float(v.detach())
                window["_n"] = window.get("_n", 0) + 1
                bar.update(1)
                if step % tc.log_every == 0 or step == total_steps or step % steps_per_epoch == 0:
                    ips = seen / max(time.perf_counter() - t0, 1e-9)
                    row = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                           "lr": f"{tc.lr * lr_scale:.6g}", "images_per_s": f"{ips:.2f}",
                           "loss": f"{window['total'] / window['_n']:.5f}"}
                    for k in job.log_keys:
                        row[k] = f"{window[k] / window['_n']:.5f}" if k in window else ""
                    bar.set_postfix(loss=row["loss"], img_s=f"{ips:.1f}")
                    if dist_info.is_main:
                        with open(log_path, "a", newline="") as f:
                            csv.DictWriter(f, fieldnames=fields).writerow(row)
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
        atomic_torch_save({"state_dict": model.state_dict(), "config": to_dict(cfg), **job.final},
                          out / "model.pt")
    return {"finished": True, "step": step, "total_steps": total_steps, "model": str(out / "model.pt")}

