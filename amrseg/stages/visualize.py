"""`visualize`: one PNG panel per image and an index.html gallery of CAMs (viz.py's pictures)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..cam.io import load_cam
from ..config import check_range
from ..data.voc import SegData, open_dataset
from ..errors import AmrsegError
from ..fileio import check_writable_dir, save_image, write_text
from ..outputs import claim_folder
from ..viz import cam_panel, check_metrics, gallery_html, iou_chart
from .loop import ImageLoop


@dataclass
class VisualizeConfig:
    cams: str = ""  # the CAMS folder of make-cam
    data: str = ""
    split: str = ""
    out: str = ""  # folder for panels/<id>.png and index.html
    limit: Optional[int] = None  # only the first N images of the split
    threshold: Optional[float] = None  # background threshold; None: the metrics' best, else 0.2
    metrics: Optional[str] = None  # an eval-cam JSON: adds the mIoU and a per-class IoU chart
    overwrite: bool = False  # remove the panels already in OUT first, even those of other settings

    def validate(self) -> None:
        if self.limit is not None and self.limit < 0:
            raise AmrsegError(f"--limit: must be 0 or more, got {self.limit}")
        for key in ("cams", "data", "split", "out"):
            check_range(key, getattr(self, key), nonempty=True)


def read_metrics(path: Optional[str]) -> Optional[dict]:
    if not path:
        return None
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise AmrsegError(f"--metrics {path}: cannot read JSON ({e})") from None
    check_metrics(metrics)
    return metrics


def run(cfg: VisualizeConfig, show_progress: Optional[bool] = False) -> tuple[dict, list[str]]:
    """Writes the panels and index.html; returns ({"index", "threshold", "images"}, warnings)."""
    cfg.validate()
    check_writable_dir(cfg.out, "--out")
    metrics = read_metrics(cfg.metrics)
    threshold = cfg.threshold if cfg.threshold is not None else (metrics or {}).get("threshold", 0.2)
    data = open_dataset(cfg.data, cfg.split, require_labels=False)
    index, warnings = draw_gallery(Path(cfg.cams), data, Path(cfg.out), threshold, cfg.limit, metrics,
                                   cfg.overwrite, show_progress)
    return {"index": str(index), "threshold": threshold, "images": gallery_size(data, cfg.limit)}, warnings


def gallery_size(data: SegData, limit: Optional[int]) -> int:
    """How many images the gallery shows: the first `limit` of the split, or all of it."""
    return len(data) if limit is None else min(limit, len(data))


def draw_gallery(cams_dir: Path, data: SegData, out_dir: Path, threshold: float, limit: Optional[int] = None,
                 metrics: Optional[dict] = None, overwrite: bool = False, show_progress: Optional[bool] = False
                 ) -> tuple[Path, list[str]]:
    """One panel per image (viz.cam_panel) into OUT/panels/<id>.png, and OUT/index.html.

    Returns:
        (path of index.html, warnings for the CLI to print, e.g. a skipped chart).
    Raises:
        AmrsegError: missing or invalid CAM files, a CAM whose size differs from its image, a
            malformed metrics dict, a negative limit.
    """
    if metrics is not None:
        check_metrics(metrics)
    if limit is not None and limit < 0:
        raise AmrsegError(f"--limit: must be 0 or more, got {limit}")
    cams_dir, out_dir = Path(cams_dir), Path(out_dir)
    count = gallery_size(data, limit)
    missing = [data.ids[i] for i in range(count) if not (cams_dir / f"{data.ids[i]}.npz").is_file()]
    if missing:
        raise AmrsegError(f"{cams_dir / (missing[0] + '.npz')}: CAM file not found ({len(missing)} of {count} "
                          f"missing; run or finish make-cam)")
    panels_dir = out_dir / "panels"
    panels_dir.mkdir(parents=True, exist_ok=True)
    claim_folder(out_dir, {"cams": str(cams_dir.resolve()), "threshold": threshold, "limit": limit},
                 "--out", "panels/*.png", overwrite=overwrite)
    num_classes = len(data.class_names)
    scores: dict[int, Optional[float]] = {}

    def panel_path(i: int) -> Path:
        return panels_dir / f"{data.ids[i]}.png"

    def work(shard: list):
        for i in shard:
            path = cams_dir / f"{data.ids[i]}.npz"
            arrays = load_cam(path)
            keys, high_res = arrays["keys"], arrays["high_res"]
            img = data.load_image(i)
            if high_res.shape[1:] != img.shape[:2]:
                raise AmrsegError(f"{path}: CAM size {high_res.shape[1]}x{high_res.shape[2]} differs from the "
                                  f"image size {img.shape[0]}x{img.shape[1]}")
            if keys.size and keys[-1] >= num_classes - 1:
                raise AmrsegError(f"{path}: class key {int(keys[-1])} beyond the {num_classes - 1} classes")
            panel, scores[i] = cam_panel(img, data.load_mask(i), keys, high_res, data.class_names, threshold,
                                         data.ids[i])
            save_image(panel, panel_path(i), format="PNG")
            yield i, None

    # Every panel is drawn again (its per-image mIoU goes on the page): no output is skipped.
    ImageLoop(data, desc="visualize", indices=list(range(count))).run(work, show_progress)
    rows = [(data.ids[i], scores[i], panel_path(i).relative_to(out_dir)) for i in range(count)]
    warnings, chart = [], False
    if metrics is not None:
        note = iou_chart(out_dir / "iou.png", metrics)
        chart = note is None
        warnings += [note] if note else []
    index = out_dir / "index.html"
    write_text(index, gallery_html(cams_dir, rows, metrics, chart))
    return index, warnings
