"""Atomic file writes: a file is either absent or complete, never half-written.

Every artefact between stages (CAMs, masks, checkpoints, JSON) goes through `atomic_write`.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

from PIL import Image

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Union[str, Path], write: Callable[[str], object]) -> None:
    """Calls write(tmp_path) and renames the result onto `path`.

    The temporary file lives in the destination folder (so the rename is atomic) and gets the
    permissions a plain open() would give, not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
        os.replace(tmp, path)
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
