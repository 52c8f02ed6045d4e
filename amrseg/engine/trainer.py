"""The one training loop behind train-cam, train-irn, train-seg and pretrain-backbone.

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

from ..config import TrainConfig, flatten, merge, read_yaml, to_dict
from ..errors import AmrsegError, brief
from ..fileio import atomic_torch_save, atomic_write, check_writable_dir, load_torch, tensor_bytes, write_text
from ..runs import RUN_KINDS, load_run_config
from ..runtime import DistInfo, autocast, autocast_dtype, init_distributed, pick_device, progress

# Keys that may differ between a run and its resumption: they do not change the weights. A config
# class may name its own (a `resume_free` class attribute).
RESUME_FREE = ("train.num_workers", "train.device", "train.log_every", "train.checkpoint_every",
               "train.checkpoint_minutes", "train.tensorboard")
# The files that make a folder a run: a new run there would overwrite them.
RUN_FILES = ("config.yaml", "log.csv", "checkpoint.pt", "model.pt", "tb")
# Wall clock for the time-based checkpoints (a module attribute, so tests can move time).
clock = time.monotonic


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
        nesterov: SGD with Nesterov momentum (pretrain-backbone's recipe).
        order: (epoch) -> the permutation of the dataset that epoch visits (its tail that does not
            fill a batch dropped); a function of the epoch only, so that resume stays exact.
            Default: a shuffle seeded by (train.seed, epoch).
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
    nesterov: bool = False
    order: Optional[Callable[[int], torch.Tensor]] = None


def log_fields(job: Job) -> list[str]:
    return ["step", "epoch", "loss", *job.log_keys, *job.eval_keys, "lr", "images_per_s"]


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled indices of one epoch, a function of (seed, epoch) only; sharded over ranks.

    The tail that does not fill a global batch is dropped. `skip` global batches at the start are
    left out, which is how a run resumes mid-epoch without touching the data.
    """

    def __init__(self, n: int, global_batch: int, seed: int, dist_info: DistInfo,
                 order: Optional[Callable[[int], torch.Tensor]] = None):
        self.n, self.global_batch, self.seed, self.dist, self.order = n, global_batch, seed, dist_info, order
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __iter__(self) -> Iterator[int]:
        if self.order is not None:
            order = self.order(self.epoch)[: self.batches_per_epoch() * self.global_batch]
        else:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)[: self.batches_per_epoch() * self.global_batch]
        order = order[self.skip * self.global_batch:]
        return iter(order[self.dist.rank:: self.dist.world_size].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.skip) * (self.global_batch // self.dist.world_size)


def _saved_config(cfg: Any, run: Path) -> Any:
    """The config saved in a run directory, as the dataclass of `cfg` (whose `kind` it must have)."""
    if cfg.kind in RUN_KINDS:
        return load_run_config(run, cfg.kind)
    saved = read_yaml(Path(run) / "config.yaml")
    if saved.get("kind") != cfg.kind:
        raise AmrsegError(f"--resume: {run} holds a {saved.get('kind')!r} run, not a {cfg.kind!r} one")
    return merge(type(cfg)(), saved)


def check_resume(cfg: Any, run: Path) -> Any:
    """The saved config is authoritative on resume; a conflicting flag is an error, not a silent change."""
    saved = _saved_config(cfg, run)
    flat_new, flat_old = flatten(to_dict(cfg)), flatten(to_dict(saved))
    free = set(getattr(type(cfg), "resume_free", RESUME_FREE))
    diff = [k for k in flat_new if flat_new[k] != flat_old.get(k) and k not in free]
    if diff:
        shown = ", ".join(f"{k}: {flat_old.get(k)!r} -> {flat_new[k]!r}" for k in diff[:4])
        raise AmrsegError(f"--resume: {run}/config.yaml differs from this command ({shown})")
    kept: dict = {}
    for key in free & flat_new.keys():
        *sections, name = key.split(".")
        node = kept
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = flat_new[key]
    return merge(saved, kept)


def require_tensorboard() -> type:
    """torch.utils.tensorboard.SummaryWriter, or one line naming the extra that provides it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:  # ImportError, or a tensorboard/protobuf mismatch
        raise AmrsegError(f"--set train.tensorboard=true: needs the 'tensorboard' extra "
                          f"(pip install 'amrseg[tensorboard]'); {brief(e, 120)}") from None
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


@dataclass
class _Loop:
    """What the helpers of one `fit` call share: the pieces it built and where the run stands."""

    job: Job
    cfg: Any
    out: Path
    dist: DistInfo
    device: torch.device
    sampler: EpochSampler
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    trainable: list  # (name, tensor) of the parameters SGD changes, checked after every step
    step: int = 0
    last_saved: Optional[int] = None  # step of the last checkpoint written
    last_save_time: float = 0.0

    @property
    def tc(self) -> TrainConfig:
        return self.cfg.train

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch()

    @property
    def total_steps(self) -> int:
        return self.tc.epochs * self.steps_per_epoch

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint.pt"


class _Window:
    """Sums of the losses and the images seen since the last log row."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums, self.steps, self.images, self.t0 = {}, 0, 0, time.perf_counter()

    def add(self, losses: dict, images: int) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self.steps += 1
        self.images += images

    def mean(self, key: str) -> str:
        return f"{self.sums[key] / self.steps:.5f}" if key in self.sums else ""

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.t0, 1e-9)


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
    loop = _setup(job, cfg, Path(out), resume, device)
    if resume:
        _restore(loop)
    elif loop.dist.is_main:
        write_text(loop.out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        atomic_write(loop.out / "log.csv", lambda tmp: _write_rows(tmp, log_fields(job), []))
    net = _wrap(loop)
    log = _Log(loop.out / "log.csv", log_fields(job), loop.out / "tb" if loop.tc.tensorboard else None,
               loop.step if resume else None) if loop.dist.is_main else None
    bar = progress(total=loop.total_steps, initial=loop.step, enabled=show_progress if loop.dist.is_main else False,
                   desc=job.name, unit="step")
    start = loop.step
    try:
        with _StopFlag() as stop:
            stopped = _train_epochs(loop, net, log, bar, lambda: stop.set or (
                stop_after_steps is not None and loop.step - start >= stop_after_steps))
        bar.close()
        return _finish(loop, stopped)
    finally:
        bar.close()
        if log is not None:
            log.close()


def _setup(job: Job, cfg: Any, out: Path, resume: bool, device: Optional[torch.device]) -> _Loop:
    """The sampler, optimizer and gradient scaler of a run; its folder created and its disk checked."""
    tc: TrainConfig = cfg.train
    dist_info = init_distributed()
    device = device or pick_device(tc.device, dist_info.local_rank)
    if tc.batch_size % dist_info.world_size:
        raise AmrsegError(f"--batch-size {tc.batch_size}: must be divisible by the {dist_info.world_size} processes")
    sampler = EpochSampler(len(job.dataset), tc.batch_size, tc.seed, dist_info, job.order)
    if sampler.batches_per_epoch() == 0:
        raise AmrsegError(f"--batch-size {tc.batch_size}: larger than the {len(job.dataset)} images of "
                          f"split '{getattr(cfg, 'split', 'train')}'")
    model = job.model
    channels_last = device.type == "cuda" and tc.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # Keyword arguments: IRN's release passed weight_decay into SGD's momentum slot by position.
    optimizer = torch.optim.SGD(job.param_groups, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay,
                                nesterov=job.nesterov)
    amp_dtype = autocast_dtype(tc.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _check_space(out, model, resume)
    trainable = [(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad]
    return _Loop(job, cfg, out, dist_info, device, sampler, optimizer, scaler, amp_dtype, channels_last, trainable)


def _restore(loop: _Loop) -> None:
    """Model, optimizer, scaler and step from the checkpoint; log rows after it dropped."""
    state = load_torch(loop.checkpoint, "checkpoint")
    bad = first_nonfinite(list(state["model"].items()))
    if bad:
        raise AmrsegError(f"--resume: {loop.checkpoint} holds a non-finite {bad} (written by an older amrseg); "
                          f"start a new run")
    loop.job.model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scaler.load_state_dict(state["scaler"])
    loop.step = loop.last_saved = int(state["step"])
    if loop.dist.is_main:
        _trim_log(loop.out / "log.csv", log_fields(loop.job), loop.step)


def _wrap(loop: _Loop) -> torch.nn.Module:
    """The module the losses call: the model, under DDP with torchrun, compiled on request (CUDA)."""
    net = loop.job.model
    if loop.dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[loop.device.index] if loop.device.type == "cuda" else None)
    if loop.tc.compile and loop.device.type == "cuda":
        net = torch.compile(net)
    return net


def _train_epochs(loop: _Loop, net: torch.nn.Module, log: Optional[_Log], bar, should_stop: Callable) -> bool:
    """Steps from loop.step to the end, with the log rows and checkpoints; True when stopped early."""
    loader = torch.utils.data.DataLoader(
        loop.job.dataset, batch_size=loop.tc.batch_size // loop.dist.world_size, sampler=loop.sampler,
        num_workers=min(loop.tc.num_workers, os.cpu_count() or 1), pin_memory=loop.device.type == "cuda",
        drop_last=True, persistent_workers=False)
    window = _Window()
    loop.last_save_time = clock()
    loop.job.model.train()
    while loop.step < loop.total_steps:
        epoch, skip = divmod(loop.step, loop.steps_per_epoch)
        loop.sampler.set_epoch(epoch, skip)
        loop.job.dataset.set_epoch(epoch)
        for batch in loader:
            lr_scale = _train_step(loop, net, batch, window)
            bar.update(1)
            epoch_end = loop.step % loop.steps_per_epoch == 0
            if loop.step % loop.tc.log_every == 0 or loop.step == loop.total_steps or epoch_end:
                _log_row(loop, window, lr_scale, log, bar)
            if _checkpoint_due(loop, epoch_end):
                _save_checkpoint(loop)
            if should_stop():
                return True
    return False


def _train_step(loop: _Loop, net: torch.nn.Module, batch, window: _Window) -> float:
    """One SGD step on a batch (its losses added to `window`); returns the step's lr scale."""
    batch = _to_device(batch, loop.device, loop.channels_last)
    lr_scale = poly_lr(1.0, loop.step, loop.total_steps, loop.tc.poly_power)
    for g in loop.optimizer.param_groups:
        g["lr"] = g["initial_lr"] * lr_scale
    with autocast(loop.device, loop.amp_dtype):
        losses = loop.job.losses(net, batch)
    _check_loss(loop, losses["total"])
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scaler.scale(losses["total"]).backward()
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.step += 1
    # The trainable parameters every step (what SGD just changed); buffers and the optimizer state
    # at every save.
    bad = first_nonfinite(loop.trainable)
    if bad:
        raise _nonfinite_stop(loop, f"{bad} is not finite after the update")
    window.add(losses, batch[0].shape[0] * loop.dist.world_size)
    return lr_scale


def _check_loss(loop: _Loop, total: torch.Tensor) -> None:
    """Stops the run at a non-finite loss, on every process at the same step."""
    finite = torch.isfinite(total.detach()).to(torch.int32)
    if loop.dist.enabled:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if not finite.item():
        loop.step += 1
        raise _nonfinite_stop(loop, f"loss is {total.item()} (not finite)")


def _log_row(loop: _Loop, window: _Window, lr_scale: float, log: Optional[_Log], bar) -> None:
    """A row of log.csv (and TensorBoard): the window's mean losses, lr, throughput, eval figures."""
    ips = window.images_per_s()
    row = {"step": loop.step, "epoch": round(loop.step / loop.steps_per_epoch, 4),
           "lr": f"{loop.tc.lr * lr_scale:.6g}", "images_per_s": f"{ips:.2f}", "loss": window.mean("total")}
    row.update({k: window.mean(k) for k in loop.job.log_keys})
    if loop.step % loop.steps_per_epoch == 0 and loop.job.evaluate is not None and loop.dist.is_main:
        model = loop.job.model
        model.eval()
        with torch.no_grad(), autocast(loop.device, loop.amp_dtype):
            figures = loop.job.evaluate(model)
        model.train()
        row.update({k: f"{figures[k]:.5f}" for k in loop.job.eval_keys})
    bar.set_postfix(loss=row["loss"], img_s=f"{ips:.1f}")
    if log is not None:
        log.write(row)
    window.reset()


def _checkpoint_due(loop: _Loop, epoch_end: bool) -> bool:
    """At the end of every epoch, every train.checkpoint_every steps, after train.checkpoint_minutes."""
    tc = loop.tc
    return (epoch_end or (tc.checkpoint_every and loop.step % tc.checkpoint_every == 0)
            or (tc.checkpoint_minutes and clock() - loop.last_save_time >= 60 * tc.checkpoint_minutes))


def _save_checkpoint(loop: _Loop) -> None:
    model, optimizer = loop.job.model, loop.optimizer
    if loop.dist.is_main:
        bad = first_nonfinite([*model.state_dict().items(), *_optimizer_tensors(optimizer)])
        if bad:  # never save a state that cannot be trained on
            raise _nonfinite_stop(loop, f"{bad} is not finite")
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scaler": loop.scaler.state_dict(), "step": loop.step,
                           "epoch": loop.step // loop.steps_per_epoch, "config": to_dict(loop.cfg)}, loop.checkpoint)
    loop.last_saved, loop.last_save_time = loop.step, clock()


def _nonfinite_stop(loop: _Loop, what: str) -> AmrsegError:
    kept = (f"last good checkpoint kept: {loop.checkpoint} (step {loop.last_saved})" if loop.last_saved is not None
            else "no checkpoint was written")
    return AmrsegError(f"step {loop.step}: {what}; stopped, {kept} (lower --lr or check the data)")


def _finish(loop: _Loop, stopped: bool) -> dict:
    """A stopped run leaves its checkpoint; a finished one writes model.pt. Returns fit's summary."""
    summary = {"step": loop.step, "total_steps": loop.total_steps}
    if stopped and loop.step < loop.total_steps:
        if loop.last_saved != loop.step:
            _save_checkpoint(loop)
        return {"finished": False, **summary, "checkpoint": str(loop.checkpoint)}
    if loop.dist.is_main:
        state = loop.job.model.state_dict()
        bad = first_nonfinite(state.items())
        if bad:
            raise _nonfinite_stop(loop, f"{bad} is not finite")
        atomic_torch_save({"state_dict": state, "config": to_dict(loop.cfg), **loop.job.final}, loop.out / "model.pt")
    return {"finished": True, **summary, "model": str(loop.out / "model.pt")}


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    """Poly decay over all steps: base * (1 - step / total) ** power."""
    return base_lr * (1.0 - min(step, total_steps) / max(total_steps, 1)) ** power
