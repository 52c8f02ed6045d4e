"""CAM files: CAMS/<image_id>.npz (CONTRACT.md "Files"), written atomically, loaded without pickle.

Arrays of one file:
    keys:     int64 [n], the image's foreground class indices, ascending (class id = key + 1).
    high_res: float16/float32 [n, H, W] at image resolution, each map in [0, 1] with max ~1.
    cam:      optional, the same at stride 4.
    high_res_spotlight, high_res_compensation: optional per-branch maps, shaped and normalised as
              high_res, so that the branch weight xi can be swept after inference (see `fuse`).
    active:   optional bool [n]: False for a class that the classifier activates nowhere, whose
              maps make-cam sets to 1 at the peak of its raw score (so that every map peaks at 1)
              and that the stages after the CAMs treat as having no evidence (`evidence`).
"""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..fileio import atomic_write
from ..errors import AmrsegError

BRANCHES = ("spotlight", "compensation")
CAMS_META = "cams.json"  # CAMS/cams.json: {"method", "run", "scales", "xi"} (+ advcam's settings)
BRANCH_ARRAYS = tuple(f"high_res_{b}" for b in BRANCHES)
_MAP_ARRAYS = ("high_res", "cam") + BRANCH_ARRAYS
_EPS = 1e-5  # AMR.md section 5: each class map divided by its own spatial max + 1e-5

ArrayLike = Union[np.ndarray, torch.Tensor]


def normalise_max(maps: ArrayLike) -> ArrayLike:
    """Divides each map by its own spatial max + 1e-5, so that values are in [0, 1] with max ~1.

    Args:
        maps: Non-negative maps [..., H, W], numpy array or torch tensor (any device).

    Returns:
        Same type and shape; integer numpy input becomes float32.
    """
    if isinstance(maps, torch.Tensor):
        if not maps.is_floating_point():
            maps = maps.float()
        return maps / (maps.amax(dim=(-2, -1), keepdim=True) + _EPS)
    maps = np.asarray(maps)
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float32)
    if maps.size == 0:
        return maps.copy()
    return maps / (maps.max(axis=(-2, -1), keepdims=True) + maps.dtype.type(_EPS))


def fuse(maps_s: ArrayLike, maps_c: ArrayLike, xi: float) -> ArrayLike:
    """Weighted CAM of the two branches: normalise_max(xi * S + (1 - xi) * C) (AMR.md section 5).

    Args:
        maps_s: Spotlight maps [n, H, W] (numpy or torch), each normalised by `normalise_max`.
        maps_c: Compensation maps, same shape and type.
        xi: Spotlight weight in [0, 1].

    Returns:
        The fused maps, same type and shape, each in [0, 1] with max ~1 (0 where both are 0).
    """
    if tuple(maps_s.shape) != tuple(maps_c.shape):
        raise ValueError(f"branch shapes differ: {tuple(maps_s.shape)} vs {tuple(maps_c.shape)}")
    if not 0.0 <= xi <= 1.0:
        raise ValueError(f"xi must be in [0, 1], got {xi}")
    return normalise_max(xi * maps_s + (1.0 - xi) * maps_c)


def save_cam(
    path: Union[str, Path],
    keys: np.ndarray,
    high_res: np.ndarray,
    cam: Optional[np.ndarray] = None,
    branches: Optional[dict[str, np.ndarray]] = None,
    active: Optional[np.ndarray] = None,
    dtype: type = np.float16,
) -> Path:
    """Writes one CAM file atomically (compressed npz, no pickled objects).

    Args:
        path: Destination, CAMS/<image_id>.npz.
        keys: int64 [n], ascending foreground indices of the maps.
        high_res: [n, H, W] maps in [0, 1] at image resolution.
        cam: Optional [n, h, w] maps at stride 4.
        branches: Optional {"spotlight": [n, H, W], "compensation": [n, H, W]} per-branch maps,
            normalised like high_res; stored as high_res_spotlight / high_res_compensation.
        active: Optional bool [n], False for the classes the classifier activates nowhere.
        dtype: Storage dtype of the maps, np.float16 (default, half the disk) or np.float32.

    Returns:
        The path written.

    Raises:
        AmrsegError: If the arrays break the file's invariants (message names the path).
    """
    if np.dtype(dtype) not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise ValueError(f"dtype must be float16 or float32, got {dtype}")
    arrays = {"keys": np.asarray(keys, dtype=np.int64), "high_res": np.asarray(high_res, dtype=dtype)}
    if cam is not None:
        arrays["cam"] = np.asarray(cam, dtype=dtype)
    for name, maps in (branches or {}).items():
        if name not in BRANCHES:
            raise ValueError(f"unknown branch {name!r}; expected one of {BRANCHES}")
        arrays[f"high_res_{name}"] = np.asarray(maps, dtype=dtype)
    if active is not None:
        arrays["active"] = np.asarray(active)
    # Same checks as the reader: a bad file is caught where it is made, not stages later.
    _validate(path, arrays)

    def write(tmp: str) -> None:
        # Onto an open file: given a name without .npz, numpy would append the suffix.
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(Path(path), write)
    return Path(path)


def load_cam(path: Union[str, Path]) -> dict[str, np.ndarray]:
    """Reads and validates one CAM file.

    Args:
        path: CAMS/<image_id>.npz.

    Returns:
        {array name: array} with at least "keys" and "high_res".

    Raises:
        AmrsegError: "<path>: ..." (one line) for a missing, unreadable or invalid file.
    """
    path = Path(path)
    if not path.is_file():
        raise AmrsegError(f"{path}: CAM file not found")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        # Checked here: np.load would try other formats and blame pickling for plain garbage.
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise ValueError("not an npz (zip) archive")
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("not an npz archive")
        with loaded as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise AmrsegError(f"{path}: not a readable CAM npz file ({detail}); delete it and re-run make-cam") from None
    _validate(path, arrays)
    return arrays


def evidence(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a CAM file with the maps of inactive classes set to 0 (a copy where any is).

    For the stages that spread the maps (IR labels, the random walk): there a peak with no evidence
    behind it grows into a blob. Files without 'active' are returned as they are.
    """
    if "active" not in arrays or arrays["active"].all():
        return arrays
    out = dict(arrays)
    for name in _MAP_ARRAYS:
        if name in out:
            out[name] = np.where(arrays["active"][:, None, None], out[name], np.zeros_like(out[name]))
    return out


def _validate(path: Union[str, Path], arrays: dict[str, np.ndarray]) -> None:
    """Raises AmrsegError naming `path` unless `arrays` satisfy the CAM file invariants."""

    def fail(msg: str) -> None:
        raise AmrsegError(f"{path}: {msg}")

    for required in ("keys", "high_res"):
        if required not in arrays:
            fail(f"missing array '{required}'")
    keys = arrays["keys"]
    if keys.dtype != np.int64 or keys.ndim != 1:
        fail(f"'keys' must be int64 [n], got {keys.dtype} {list(keys.shape)}")
    if keys.size and (keys[0] < 0 or np.any(np.diff(keys) <= 0)):
        fail(f"'keys' must be non-negative, ascending and unique, got {keys.tolist()}")
    if "active" in arrays and (arrays["active"].dtype != np.bool_ or arrays["active"].shape != keys.shape):
        fail(f"'active' must be bool [{keys.size}], got {arrays['active'].dtype} {list(arrays['active'].shape)}")
    high_res = arrays["high_res"]
    for name in _MAP_ARRAYS:
        if name not in arrays:
            continue
        maps = arrays[name]
        if maps.dtype not in (np.float16, np.float32):
            fail(f"'{name}' must be float16 or float32, got {maps.dtype}")
        if maps.ndim != 3 or maps.shape[0] != keys.size:
            fail(f"'{name}' must be [n, H, W] with n = {keys.size} keys, got {list(maps.shape)}")
        if name in BRANCH_ARRAYS and maps.shape != high_res.shape:
            fail(f"'{name}' shape {list(maps.shape)} differs from 'high_res' {list(high_res.shape)}")
        if not np.all(np.isfinite(maps)):
            fail(f"'{name}' has non-finite values")
        if maps.size and (maps.min() < 0 or maps.max() > 1):
            fail(f"'{name}' values must be in [0, 1], got {float(maps.min()):.4g}..{float(maps.max()):.4g}")
