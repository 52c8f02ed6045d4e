"""`dataset-info`: what a split of a VOC-style dataset holds (data.voc)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import check_range
from ..data import voc


@dataclass
class DatasetInfoConfig:
    data: str = ""
    split: str = ""

    def validate(self) -> None:
        for key in ("data", "split"):
            check_range(key, getattr(self, key), nonempty=True)


def run(cfg: DatasetInfoConfig, show_progress: Optional[bool] = None) -> dict:
    cfg.validate()
    return voc.dataset_info(voc.open_dataset(cfg.data, cfg.split))
