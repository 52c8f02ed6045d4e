"""What every long stage shares: device choice, distributed set-up, atomic files, progress bars."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..errors import AmrsegError
from ..fileio import atomic_write


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


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise AmrsegError("--device cuda: no CUDA device is available (use --device cpu)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
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


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: Path, what: str) -> dict:
    """torch.load with weights_only=True; any failure is a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise AmrsegError(f"{path}: {what} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, wrong format...
        raise AmrsegError(f"{path}: cannot load {what} ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict):
        raise AmrsegError(f"{path}: {what} is not a dict")
    return obj


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


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    """Poly decay over all steps: base * (1 - step / total) ** power."""
    return base_lr * (1.0 - min(step, total_steps) / max(total_steps, 1)) ** power
