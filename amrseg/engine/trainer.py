"""The one training loop behind train-cam, train-irn and train-seg.

What every training command shares: the run directory (config.yaml, checkpoint.pt, model.pt,
log.csv, tb/), exact resume, SGD with poly decay, mixed precision and channels_last on CUDA, DDP
under torchrun, a progress bar, the non-finite guard and the Ctrl-C checkpoint. A command supplies
a `Job`: its model, parameter groups, dataset and the function that turns a batch into losses.

Checkpoints are exact: the sample order of an epoch is a function of (seed, epoch) and each sample's
augmentation a function of (seed, epoch, index), so a run resumed from any saved step repeats the
uninterrupted run bit for bit on CPU. A checkpoint is written atomically at the end of every epoch,
every `train.checkpoint_every` steps, whenever `train.checkpoint_minutes` of wall time passed since
the last one, and when the run is interrupted (Ctrl-C / SIGTERM) between two steps. A kill -9
therefore costs at most those minutes.

Nothing non-finite is ever saved: after every step the loss and the trainable parameters are
checked, before every save the whole state (buffers and optimizer too), and the run stops at the
first NaN or inf with a message naming the last checkpoint, which is finite because of that check.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import yaml

from ..config import TrainConfig, flatten, load_run_config, merge, to_dict
from ..errors import AmrsegError
from ..fileio import atomic_torch_save, atomic_write, check_writable_dir, load_torch, tensor_bytes, write_text
from ..runtime import DistInfo, autocast, autocast_dtype, init_distributed, pick_device, progress

# Keys that may differ between a run and its resumption: they do not change the weights.
_RESUME_FREE = {"train.num_workers", "train.device", "train.log_every", "train.checkpoint_every",
                "train.checkpoint_minutes", "train.tensorboard"}
# The files that make a folder a run: a new run there would overwrite them.
RUN_FILES = ("config.yaml", "log.csv", "checkpoint.pt", "model.pt", "tb")
# Wall clock for the time-based checkpoints (a module attribute, so tests can move time).
_clock = time.monotonic


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
        evaluate: optional (model) -> {name: figure}, run on the main process after every epoch
            with the model in eval mode; the figures are logged (log.csv columns `eval_keys`,
            TensorBoard), never used to pick a model.
        eval_keys: the names `evaluate` returns, in column order.
    """

    name: str
    model: torch.nn.Module
    param_groups: list
    dataset: Any
    losses: Callable[[torch.nn.Module, list], dict]
    log_keys: list = field(default_factory=list)
    final: dict = field(default_factory=dict)
    evaluate: Optional[Callable[[torch.nn.Module], dict]] = None
    eval_keys: list = field(default_factory=list)


def log_fields(job: Job) -> list[str]:
    return ["step", "epoch", "loss", *job.log_keys, *job.eval_keys, "lr", "images_per_s"]


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


def check_resume(cfg: Any, run: Path) -> Any:
    """The saved config is authoritative on resume; a conflicting flag is an error, not a silent change."""
    saved = load_run_config(run, cfg.kind)
    flat_new, flat_old = flatten(to_dict(cfg)), flatten(to_dict(saved))
    diff = [k for k in flat_new if flat_new[k] != flat_old.get(k) and k not in _RESUME_FREE]
    if diff:
        shown = ", ".join(f"{k}: {flat_old.get(k)!r} -> {flat_new[k]!r}" for k in diff[:4])
        raise AmrsegError(f"--resume: {run}/config.yaml differs from this command ({shown})")
    return merge(saved, {"train": {k.split(".", 1)[1]: flat_new[k] for k in _RESUME_FREE}})


def require_tensorboard() -> type:
    """torch.utils.tensorboard.SummaryWriter, or one line naming the extra that provides it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:  # ImportError, or a tensorboard/protobuf mismatch
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise AmrsegError(f"--set train.tensorboard=true: needs the 'tensorboard' extra "
                          f"(pip install 'amrseg[tensorboard]'); {reason}") from None
    return SummaryWriter


def prepare_run(cfg: Any, out: Path, resume: bool) -> Any:
    """Checks the run directory before any work: returns the config to train with.

    Without --resume a folder that already holds a run's files is refused (they would be
    overwritten); the folder must be writable (`fit` creates it); stale temporary files of a
    killed run are removed; TensorBoard, when asked for, must be installed.
    """
    out = Path(out)
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise AmrsegError(f"--resume: {out / 'checkpoint.pt'} not found (nothing to resume)")
        cfg = check_resume(cfg, out)
    else:
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found:
            hint = ("pass --resume to continue it or choose another --out" if "checkpoint.pt" in found else
                    "it has no checkpoint to resume from: choose another --out or delete those files")
            raise AmrsegError(f"--out {out}: already holds a run ({', '.join(found)}); {hint}")
    check_writable_dir(out, "--out")
    if cfg.train.tensorboard:
        require_tensorboard()
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


class _Log:
    """The main process's log: rows of log.csv and, with train.tensorboard, the same scalars in RUN/tb/."""

    def __init__(self, path: Path, fields: list[str], tb_dir: Optional[Path], purge_step: Optional[int]):
        self.path, self.fields = path, fields
        self.writer = require_tensorboard()(log_dir=str(tb_dir), purge_step=purge_step) if tb_dir else None

    def write(self, row: dict) -> None:
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        except OSError as e:
            raise AmrsegError(f"{self.path}: cannot write ({e.strerror or e})") from None
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and v != "":
                    tag = f"loss/{k}" if k not in ("lr", "images_per_s") and not k.startswith("val_") else \
                        (f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}")
                    self.writer.add_scalar(tag, float(v), int(row["step"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def first_nonfinite(named_tensors) -> Optional[str]:
    """The name of the first floating-point tensor holding a NaN or an inf, or None."""
    named = [(n, t) for n, t in named_tensors if isinstance(t, torch.Tensor) and torch.is_floating_point(t)]
    if not named:
        return None
    ok = torch.stack([torch.isfinite(t).all() for _, t in named])
    if bool(ok.all()):
        return None
    return named[int((~ok).nonzero()[0])][0]


def _optimizer_tensors(optimizer: torch.optim.Optimizer):
    for i, (param, state) in enumerate(optimizer.state.items()):
        for k, v in state.items():
            yield f"optimizer state {k} of parameter {i}", v


def _to_device(batch, device: torch.device, channels_last: bool) -> list:
    out = []
    for i, t in enumerate(batch):
        if isinstance(t, torch.Tensor):
            t = t.to(device, non_blocking=True)
            if i == 0 and channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return out


def _check_space(out: Path, model: torch.nn.Module, resume: bool) -> None:
    """A disk too small for the checkpoints is found before training, not at the end of epoch 1."""
    ckpt = 2 * tensor_bytes(model.state_dict())  # weights + SGD momentum, an upper bound
    need = ckpt * (1 if resume else 2)  # the old checkpoint stays until its replacement is complete
    free = shutil.disk_usage(out).free
    if free < need:
        raise AmrsegError(f"--out {out}: {free / 2**20:.1f} MiB free on its disk, the checkpoints need about "
                          f"{need / 2**20:.1f} MiB (free some space or choose another --out)")


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

    Raises:
        AmrsegError: bad settings, a disk too small, or a loss / parameter that is not finite (the
            run stops at that step; checkpoint.pt keeps the last finite state).
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
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _check_space(out, model, resume)

    step, last_saved = 0, None
    if resume:
        state = load_torch(ckpt_path, "checkpoint")
        bad = first_nonfinite(list(state["model"].items()))
        if bad:
            raise AmrsegError(f"--resume: {ckpt_path} holds a non-finite {bad} (written by an older amrseg); "
                              f"start a new run")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = last_saved = int(state["step"])
        if dist_info.is_main:
            _trim_log(log_path, fields, step)
    elif dist_info.is_main:
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

    def nonfinite_stop(what: str) -> AmrsegError:
        kept = (f"last good checkpoint kept: {ckpt_path} (step {last_saved})" if last_saved is not None
                else "no checkpoint was written")
        return AmrsegError(f"step {step}: {what}; stopped, {kept} (lower --lr or check the data)")

    def save_checkpoint() -> None:
        nonlocal last_saved, last_save_time
        if dist_info.is_main:
            bad = first_nonfinite([*model.state_dict().items(), *_optimizer_tensors(optimizer)])
            if bad:  # never save a state that cannot be trained on
                raise nonfinite_stop(f"{bad} is not finite")
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict(), "step": step, "epoch": step // steps_per_epoch,
                               "config": to_dict(cfg)}, ckpt_path)
        last_saved, last_save_time = step, _clock()

    log = _Log(log_path, fields, out / "tb" if tc.tensorboard else None, step if resume else None) \
        if dist_info.is_main else None
    trainable = [(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad]
    start_step, stopped = step, False
    bar = progress(total=total_steps, initial=step, enabled=show_progress if dist_info.is_main else False,
                   desc=job.name, unit="step")
    window: dict = {}
    t0, seen, last_save_time = time.perf_counter(), 0, _clock()
    model.train()
    try:
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
                    finite = torch.isfinite(losses["total"].detach()).to(torch.int32)
                    if dist_info.enabled:  # every process stops at the same step
                        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                    if not finite.item():
                        step += 1
                        raise nonfinite_stop(f"loss is {losses['total'].item()} (not finite)")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(losses["total"]).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    step += 1
                    # The trainable parameters every step (what SGD just changed); buffers and the
                    # optimizer state at every save.
                    bad = first_nonfinite(trainable)
                    if bad:
                        raise nonfinite_stop(f"{bad} is not finite after the update")
                    seen += batch[0].shape[0] * dist_info.world_size
                    for k, v in losses.items():
                        window[k] = window.get(k, 0.0) + float(v.detach())
                    window["_n"] = window.get("_n", 0) + 1
                    bar.update(1)
                    epoch_end = step % steps_per_epoch == 0
                    if step % tc.log_every == 0 or step == total_steps or epoch_end:
                        ips = seen / max(time.perf_counter() - t0, 1e-9)
                        row = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                               "lr": f"{tc.lr * lr_scale:.6g}", "images_per_s": f"{ips:.2f}",
                               "loss": f"{window['total'] / window['_n']:.5f}"}
                        for k in job.log_keys:
                            row[k] = f"{window[k] / window['_n']:.5f}" if k in window else ""
                        if epoch_end and job.evaluate is not None and dist_info.is_main:
                            model.eval()
                            with torch.no_grad(), autocast(device, amp_dtype):
                                figures = job.evaluate(model)
                            model.train()
                            row.update({k: f"{figures[k]:.5f}" for k in job.eval_keys})
                        bar.set_postfix(loss=row["loss"], img_s=f"{ips:.1f}")
                        if log is not None:
                            log.write(row)
                        window, t0, seen = {}, time.perf_counter(), 0
                    if (epoch_end or (tc.checkpoint_every and step % tc.checkpoint_every == 0)
                            or (tc.checkpoint_minutes and _clock() - last_save_time >= 60 * tc.checkpoint_minutes)):
                        save_checkpoint()
                    if stop.set or (stop_after_steps is not None and step - start_step >= stop_after_steps):
                        stopped = True
                        break
        bar.close()
        if stopped and step < total_steps:
            if last_saved != step:
                save_checkpoint()
            return {"finished": False, "step": step, "total_steps": total_steps, "checkpoint": str(ckpt_path)}
        if dist_info.is_main:
            bad = first_nonfinite(model.state_dict().items())
            if bad:
                raise nonfinite_stop(f"{bad} is not finite")
            atomic_torch_save({"state_dict": model.state_dict(), "config": to_dict(cfg), **job.final},
                              out / "model.pt")
        return {"finished": True, "step": step, "total_steps": total_steps, "model": str(out / "model.pt")}
    finally:
        bar.close()
        if log is not None:
            log.close()


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    """Poly decay over all steps: base * (1 - step / total) ** power."""
    return base_lr * (1.0 - min(step, total_steps) / max(total_steps, 1)) ** power
