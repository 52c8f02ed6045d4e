"""`train-cam`, `train-irn`, `train-seg`: one run of the kind the config names (runs.RUN_KINDS),
trained on engine.trainer's loop into the run directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..config import load_preset
from ..engine.train import train
from ..runs import RUN_KINDS

KIND_OF_COMMAND = {kind.command: name for name, kind in RUN_KINDS.items()}


def base_config(command: str, preset: Optional[str] = None) -> Any:
    """The config a training command starts from: train-cam's preset, else the kind's defaults."""
    kind = KIND_OF_COMMAND[command]
    return load_preset(preset) if kind == "cam" else RUN_KINDS[kind].config()


def run(cfg: Any, out: Path, resume: bool = False, show_progress: Optional[bool] = None,
        stop_after_steps: Optional[int] = None) -> dict:
    """Trains `cfg` into `out` (resume: continue its checkpoint); returns the loop's summary."""
    return train(cfg, Path(out), resume=resume, show_progress=show_progress, stop_after_steps=stop_after_steps)
