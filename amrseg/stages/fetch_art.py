"""`fetch-art`: the open emoji art (npm packages) into the art folder (data.emoji_art)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..data.emoji_art import fetch_art
from ..fileio import check_writable_dir


@dataclass
class FetchArtConfig:
    dir: Optional[str] = None  # default $AMRSEG_ART, else ~/.cache/amrseg/emoji-art
    tarballs: list = field(default_factory=list)  # the two .tgz packages downloaded by hand (no npm)

    def validate(self) -> None:
        pass


def run(cfg: FetchArtConfig, show_progress: Optional[bool] = None) -> dict:
    cfg.validate()
    if cfg.dir:
        check_writable_dir(cfg.dir, "DIR")
    return fetch_art(cfg.dir, tarballs=cfg.tarballs or None)
