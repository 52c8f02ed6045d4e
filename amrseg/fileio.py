"""Atomic file writes, output checks and the clean-up of temporary files left by a killed run.

Every artefact between stages (CAMs, masks, checkpoints, JSON) goes through `atomic_write`: a file
is either absent or complete, never half-written. Its temporary file is hidden in the destination
folder, named `.<name>.<pid>-<host>-<random>.tmp`; a process killed with SIGKILL leaves it behind,
and the next process that writes into that folder removes it (`clean_stale_temps`).

Commands check their outputs before the work starts (`check_writable_dir`, `check_writable_file`),
and a write that fails (full disk, read-only folder) is one `AmrsegError` naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from PIL import Image

from .errors import AmrsegError

_UMASK = os.umask(0)
os.umask(_UMASK)

# When this process began (as far as files are concerned): temporary files older than this
# cannot be ours.
PROCESS_START = time.time()
# This host as temporary file names carry it.
HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32]
# mkstemp's random part: 8 characters of [a-z0-9_].
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-(?P<host>[A-Za-z0-9_]*)-)?[a-z0-9_]{8}\.tmp$")
# A temporary file of another host cannot be checked for a live writer: it is stale once it is
# this much older than this process.
_OTHER_HOST_AGE_S = 3600.0
_cleaned: set[str] = set()


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def is_stale_temp(path: Path, now_start: Optional[float] = None) -> bool:
    """True for a temporary file of `atomic_write` whose writer is gone.

    Stale: it matches the temporary-name pattern, was last modified before this process started,
    and its writer (pid in the name) is no longer running on this host; a file of another host
    must also be an hour older than this process; a file without pid (older amrseg) only needs
    the age.
    """
    m = _TEMP_NAME.match(path.name)
    if not m:
        return False
    start = PROCESS_START if now_start is None else now_start
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return False
    if mtime >= start:
        return False
    if m.group("pid") is None:
        return True
    if m.group("host") != HOST:
        return mtime < start - _OTHER_HOST_AGE_S
    pid = int(m.group("pid"))
    return pid == os.getpid() or not _pid_alive(pid)


def clean_stale_temps(folder: Union[str, Path]) -> list[Path]:
    """Removes the stale temporary files of `atomic_write` in `folder` (see `is_stale_temp`).

    Returns the files removed. A folder that cannot be listed is left alone.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        path = Path(entry.path)
        if entry.is_file(follow_symlinks=False) and is_stale_temp(path):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def _clean_once(folder: Path) -> None:
    key = os.path.abspath(folder)
    if key not in _cleaned:
        _cleaned.add(key)
        clean_stale_temps(folder)


def _make_temp(folder: Path, name: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.{os.getpid()}-{HOST}-", suffix=".tmp")
    os.close(fd)
    return tmp


def atomic_write(path: Union[str, Path], write: Callable[[str], object]) -> None:
    """Calls write(tmp_path) and renames the result onto `path`.

    The temporary file lives in the destination folder (so the rename is atomic) and gets the
    permissions a plain open() would give, not mkstemp's 0600. The first write into a folder
    removes the stale temporary files of killed runs there.

    Raises:
        AmrsegError: the folder cannot be created or written, or the write failed with an OSError
            (disk full, ...): one line naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_once(path.parent)
        tmp = _make_temp(path.parent, path.name)
    except OSError as e:
        raise AmrsegError(f"{path}: cannot write ({_reason(e)})") from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise AmrsegError(f"{path}: cannot write ({_reason(e)})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: Union[str, Path], text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_image(image: Image.Image, path: Union[str, Path], **save_kwargs) -> None:
    """Saves a PIL image atomically; the format comes from the suffix unless `format=` is given."""
    path = Path(path)
    fmt = save_kwargs.pop("format", None) or Image.registered_extensions().get(path.suffix.lower())
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **save_kwargs))


# --------------------------------------------------------------------------- output checks


def _dir_problem(path: Path, create: bool) -> Optional[str]:
    """Why `path` cannot serve as an output folder (None: it can).

    A folder that does not exist is created only with `create`; otherwise its nearest existing
    parent is probed, the place its creation needs to write. Nothing is created and removed again,
    so processes that check one folder at once (torchrun) cannot undo each other's folder.
    """
    if path.exists() and not path.is_dir():
        return "exists and is not a folder"
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"cannot create the folder ({_reason(e)})"
    probe = path if path.is_dir() else parent
    try:
        os.unlink(_make_temp(probe, "write-check"))
    except OSError as e:
        return f"cannot {'write into' if probe == path else 'create'} the folder ({_reason(e)})"
    if path.is_dir():
        _clean_once(path)
    return None


def check_writable_dir(path: Union[str, Path], flag: str, create: bool = False) -> Path:
    """Makes sure `path` is (or can become) a folder this process can write.

    Checked by writing and removing a temporary file, so a read-only file system, a folder
    without write permission and a path through a file all show here, before the work starts.
    A folder that did not exist is left absent unless `create` (a command refused later for
    another reason leaves nothing behind). Stale temporary files of killed runs in the folder are
    removed.

    Raises:
        AmrsegError: one line naming `flag` and the path.
    """
    path = Path(path)
    problem = _dir_problem(path, create)
    if problem:
        raise AmrsegError(f"{flag} {path}: {problem}")
    return path


def check_writable_file(path: Union[str, Path], flag: str) -> Path:
    """Makes sure the file `path` can be written atomically: not a folder, its folder writable.

    Raises:
        AmrsegError: one line naming `flag` and the path.
    """
    path = Path(path)
    if path.is_dir():
        raise AmrsegError(f"{flag} {path}: is a folder, expected a file name")
    problem = _dir_problem(path.parent, create=False)
    if problem:
        raise AmrsegError(f"{flag} {path}: its folder {path.parent}: {problem}")
    return path


def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors in a nested dict/list (what torch.save will write, give or take)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through atomic_write; a full disk is one AmrsegError naming `path`."""
    import torch


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
    import torch

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
