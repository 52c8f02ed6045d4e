"""What every long stage shares: device choice, distributed set-up, atomic files, progress bars."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
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


def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors in a nested dict/list (what torch.save will write, give or take)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through fileio.atomic_write; a full disk is one AmrsegError naming `path`."""

    def write(tmp: str) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            # torch's zip writer reports a failed write as "unexpected pos ..." without the OS error.
            if shutil.disk_usage(os.path.dirname(tmp)).free < tensor_bytes(obj) + (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
            raise OSError(errno.EIO, f"torch.save failed: {str(e).splitlines()[0][:160]}") from None

    atomic_write(path, write)


# torch.save writes a zip archive (PyTorch >= 1.6) or, in the legacy format, a pickle stream.
_WEIGHTS_MAGIC = (b"PK\x03\x04", b"\x80")


def _weights_problem(path: Path) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot read ({e.strerror})"
    if not head.startswith(_WEIGHTS_MAGIC):
        return "not a PyTorch weights file (expected a file written by torch.save)"
    return None


def check_weights_file(path: Path, flag: str) -> None:
    """One line unless `path` starts like a file written by torch.save (a text file, an image...)."""
    problem = _weights_problem(Path(path))
    if problem:
        raise AmrsegError(f"{flag} {path}: {problem}")


def load_torch(path: Path, what: str) -> dict:
    """torch.load with weights_only=True; any failure is a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise AmrsegError(f"{path}: {what} not found")
    problem = _weights_problem(path)
    if problem:
        raise AmrsegError(f"{path}: {what}: {problem}")
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
