"""What made a stage's output folder: `OUT/config.yaml`, and the refusal to mix outputs of other settings.

make-cam and pseudo-labels skip the files that are already in their output folder, so that an
interrupted run finishes where it stopped. That is only right when those files were made with the
same settings. `claim_folder` records the settings that change a stage's outputs in OUT/config.yaml
and refuses a re-run whose settings differ, naming each difference; `--overwrite` removes the old
outputs instead. Settings that do not change the outputs (device, batch size, workers) are not
recorded, so a re-run may change them freely.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import AmrsegError
from .fileio import write_text

CONFIG = "config.yaml"


def _plain(value: Any) -> Any:
    """`value` as YAML writes and reads it back (tuples become lists, paths strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def file_identity(path: Path) -> Optional[str]:
    """Size and modification time of a file: changes when a run is trained again into its folder."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size} bytes, mtime {st.st_mtime_ns}"


def read_config(out: Path) -> Optional[dict]:
    """OUT/config.yaml as a dict, None when absent."""
    path = Path(out) / CONFIG
    if not path.exists():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise AmrsegError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise AmrsegError(f"{path}: not a stage config (expected a mapping)")
    return data


def differences(old: dict, new: dict) -> list[str]:
    """'key old -> new' for every key whose value differs (a missing key reads as None)."""
    keys = sorted(set(old) | set(new))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def claim_folder(out: Path, settings: dict, flag: str, pattern: str, overwrite: bool = False) -> list[Path]:
    """Makes OUT the folder of outputs (`pattern`, e.g. "*.npz") made with `settings`.

    - OUT without outputs or config: the settings are recorded.
    - OUT made with the same settings: nothing changes (a re-run finishes what is missing).
    - OUT made with other settings, or holding outputs of unknown origin: refused.
    - `overwrite`: the outputs there are removed first, whatever made them, and all are made anew.

    Returns:
        The output files removed by `overwrite`.

    Raises:
        AmrsegError: the folder holds outputs of other settings (one line naming each difference).
    """
    out = Path(out)
    new = _plain(settings)
    old = read_config(out)
    existing = sorted(out.glob(pattern)) if out.is_dir() else []
    if old is None:
        problem = f"holds {len(existing)} {pattern} files of unknown settings (no {CONFIG})" if existing else None
    else:
        diff = differences(old, new)
        problem = "made with other settings: " + "; ".join(diff) if diff else None
    removed: list[Path] = []
    if problem and not overwrite:
        raise AmrsegError(f"{flag} {out}: {problem}; use a new folder or --overwrite")
    if overwrite:
        for path in existing:
            path.unlink(missing_ok=True)
            removed.append(path)
    if overwrite or old is None:
        write_text(out / CONFIG, yaml.safe_dump(new, sort_keys=True))
    return removed
