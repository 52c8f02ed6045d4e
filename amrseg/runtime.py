"""What every long job shares, from the library to the stages: the device, torchrun's process group,
mixed precision, seeding and progress bars."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from .errors import AmrsegError

# No tqdm monitor thread: the first bar started it just before the stages fork their DataLoader
# workers, and a fork while a thread is being created can leave the child waiting for ever on
# CPython's thread-state lock (seen once in ~12 runs of the torchrun test: a make-cam worker hung in
# PyOS_AfterFork_Child). The monitor only retunes `miniters` of stalled bars.
tqdm.monitor_interval = 0


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Starts the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str, local_rank: int = 0, flag: str = "--device") -> torch.device:
    """The torch device for `--device auto|cpu|cuda` (auto: CUDA when there is one); every command's check.

    Raises:
        AmrsegError: an unknown name, `cuda` without a CUDA device, or a process rank without its GPU.
    """
    if name not in DEVICES:
        raise AmrsegError(f"{flag} {name}: not one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise AmrsegError(f"{flag} cuda: no CUDA device is available (this torch {torch.__version__} "
                          f"{'has no CUDA support' if torch.version.cuda is None else 'sees no GPU'}); "
                          f"use {flag} cpu or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise AmrsegError(f"{flag} {name}: process LOCAL_RANK {local_rank} has no GPU "
                          f"({torch.cuda.device_count()} visible)")
    return torch.device("cuda", local_rank)


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for `train.amp`; None means full precision. Mixed precision is CUDA-only."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def progress(iterable: Optional[Iterable] = None, enabled: Optional[bool] = None, **kw) -> tqdm:
    """A tqdm bar on stderr, shown only on a terminal unless `enabled` says otherwise."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, file=sys.stderr, **kw)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
