"""The stages: one module per command, in pipeline order (IRN's `step/` layout, with typed configs).

A stage parses nothing and does no maths: it takes its config (a dataclass with `validate()`)
and returns a summary dict; the library below does the work. `STAGES` maps each command to its
module and config class; the CLI and `amrseg run` take them from here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Stage:
    command: str
    module: str  # amrseg.stages.<module>, imported when used
    config: str  # its config class ("" for the training commands: runs.RUN_KINDS gives theirs)
    trains: bool = False  # writes a run directory (config, checkpoint, model) rather than per-image files

    def load(self):
        return importlib.import_module(f"{__name__}.{self.module}")

    def default_config(self, preset: Any = None) -> Any:
        mod = self.load()
        return mod.base_config(self.command, preset) if self.trains else getattr(mod, self.config)()

    def resolve(self, flags: dict, overrides: Sequence[str] = (), preset: Any = None) -> Any:
        """The stage's config: its defaults (train-cam: the preset) < `flags` < `--set` items,
        validated; a training config's registry names (its backbone) checked too."""
        from ..config import resolve
        from ..runs import check_registered

        return resolve(self.default_config(preset), flags, list(overrides),
                       checks=(check_registered,) if self.trains else ())


STAGES: dict[str, Stage] = {s.command: s for s in (
    Stage("fetch-art", "fetch_art", "FetchArtConfig"),
    Stage("build-scenes", "build_scenes", "BuildScenesConfig"),
    Stage("dataset-info", "dataset_info", "DatasetInfoConfig"),
    Stage("pretrain-backbone", "pretrain_backbone", "PretrainBackboneConfig"),
    Stage("train-cam", "train", "", trains=True),
    Stage("make-cam", "make_cam", "MakeCamConfig"),
    Stage("eval-cam", "eval_cam", "EvalCamConfig"),
    Stage("visualize", "visualize", "VisualizeConfig"),
    Stage("pseudo-labels", "pseudo_labels", "PseudoLabelConfig"),
    Stage("train-irn", "train", "", trains=True),
    Stage("train-seg", "train", "", trains=True),
    Stage("eval-seg", "eval_seg", "EvalSegConfig"),
    Stage("predict", "predict", "PredictConfig"),
)}
