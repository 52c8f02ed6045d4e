"""Pictures of CAMs: colour maps, overlays, panels and the gallery page (numpy/PIL); the visualize
stage is stages/visualize.py.

`predict_labels` is the one place where CAMs become a label map for display; the evaluation's
`metrics.sweep_confusion` implements the same rule (tests check that they agree).
"""
from __future__ import annotations

import html
import urllib.parse
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data.voc import VOC_PALETTE
from .fileio import atomic_write
from .errors import AmrsegError
from .eval.metrics import confusion_matrix, iou_from_confusion

TILE = 256  # longest side of a panel tile in pixels; keeps panels of big images small
TITLE_H = 16  # height of the title band above each tile
_BLANK = 128  # grey of the ground-truth tile when the image has no mask


def colorize(mask: np.ndarray) -> np.ndarray:
    """Label map HxW (uint8, 0..K, 255 ignore) -> HxWx3 uint8 in the VOC colours (255 is (224,224,192))."""
    return VOC_PALETTE[np.asarray(mask, dtype=np.uint8)]


def heatmap(cam: np.ndarray) -> np.ndarray:
    """Map HxW with values in [0, 1] -> HxWx3 uint8, jet-like: blue (0) - cyan - yellow - red (1).

    Values outside [0, 1] are clipped and NaN shows as 0.
    """
    x = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0), 0.0, 1.0)
    # Piecewise-linear jet: each channel is a tent of width 1.5 centred at 3/4, 1/2, 1/4.
    rgb = [np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)]
    return np.round(np.stack(rgb, axis=-1) * 255).astype(np.uint8)


def overlay(img: np.ndarray, rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blends two HxWx3 uint8 pictures: (1 - alpha) * img + alpha * rgb."""
    if img.shape != rgb.shape:
        raise ValueError(f"overlay shapes differ: {img.shape} vs {rgb.shape}")
    out = (1.0 - alpha) * img.astype(np.float32) + alpha * rgb.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def predict_labels(high_res: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """Label map from CAMs: argmax over [threshold plane, maps] -> [0, keys + 1], ties to background.

    Args:
        high_res: [n, H, W] class maps.
        keys: int64 [n] foreground indices of the maps (class id = key + 1).
        threshold: Background score; a pixel is foreground iff its max score is above it.

    Returns:
        HxW uint8 label map.
    """
    maps = np.asarray(high_res, dtype=np.float32)
    # float32 threshold, as in eval-cam, so that a score equal to it is a tie in both places.
    plane = np.full((1,) + maps.shape[1:], np.float32(threshold), dtype=np.float32)
    idx = np.argmax(np.concatenate([plane, maps]), axis=0)  # first maximum: the plane wins ties
    lut = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1]).astype(np.uint8)
    return lut[idx]


def _tile(rgb: np.ndarray, title: str, nearest: bool = False) -> Image.Image:
    """One panel tile: the picture scaled to at most TILE pixels, with a title band above."""
    img = Image.fromarray(rgb)
    scale = min(1.0, TILE / max(img.size))
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(size, Image.NEAREST if nearest else Image.BILINEAR)
    tile = Image.new("RGB", (img.width, img.height + TITLE_H), (255, 255, 255))
    tile.paste(img, (0, TITLE_H))
    ImageDraw.Draw(tile).text((2, 2), title, fill=(0, 0, 0), font=ImageFont.load_default())
    return tile


def panel(tiles: list[Image.Image]) -> Image.Image:
    """Tiles side by side with 4 px gaps."""
    gap = 4
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    panel = Image.new("RGB", (width, max(t.height for t in tiles)), (255, 255, 255))
    x = 0
    for t in tiles:
        panel.paste(t, (x, 0))
        x += t.width + gap
    return panel


def iou_chart(path: Path, metrics: dict) -> Optional[str]:
    """Writes a per-class IoU bar chart; returns a warning instead when matplotlib is missing."""
    try:  # no pyplot: an explicit Agg canvas needs no display and leaves no global figure state
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib not installed (pip install 'amrseg[viz]'): skipped the IoU chart iou.png"
    names = list(metrics["iou"])
    values = [100.0 * (v or 0.0) for v in metrics["iou"].values()]
    fig = Figure(figsize=(6, 0.25 * len(names) + 1.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.set_title(f"mIoU {100 * (metrics['miou'] or 0.0):.1f}% at threshold {metrics['threshold']:.2f}")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    return None


def check_metrics(metrics: Any) -> None:
    """The metrics dict comes from a user's file: check the fields used here before the long loop."""
    ok = (
        isinstance(metrics, dict)
        and isinstance(metrics.get("threshold"), (int, float))
        and isinstance(metrics.get("miou"), (int, float, type(None)))
        and isinstance(metrics.get("iou"), dict)
        and all(isinstance(v, (int, float, type(None))) for v in metrics["iou"].values())
        and isinstance(metrics.get("xi", 0.0), (int, float))
    )
    if not ok:
        raise AmrsegError("--metrics: not an eval-cam JSON (needs numeric 'miou', 'threshold' and an 'iou' dict)")


def cam_panel(img: np.ndarray, mask: Optional[np.ndarray], keys: np.ndarray, high_res: np.ndarray,
              class_names: list, threshold: float, title: str) -> tuple[Image.Image, Optional[float]]:
    """One image's panel and the mIoU of its prediction (None without a mask).

    The panel shows: input | ground truth (grey if none) | one heat map overlay per class of the
    CAMs, titled with the class name | prediction at `threshold`.
    """
    pred = predict_labels(high_res, keys, threshold)
    tiles = [_tile(img, title)]
    if mask is None:
        tiles.append(_tile(np.full_like(img, _BLANK), "no mask"))
        score = None
    else:
        tiles.append(_tile(colorize(mask), "ground truth", nearest=True))
        conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(mask), len(class_names))
        score = iou_from_confusion(conf)[1].item()
    for k, m in zip(keys, high_res):
        tiles.append(_tile(overlay(img, heatmap(m)), class_names[k + 1]))
    tiles.append(_tile(colorize(pred), f"prediction t={threshold:.2f}", nearest=True))
    return panel(tiles), score


def _pct(v: Optional[float]) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}"


def gallery_html(cams_dir: Path, rows: list, metrics: Optional[dict], chart: bool) -> str:
    """The gallery page: header (mIoU, per-class IoU table, chart) and one row per image."""
    out = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>amrseg CAMs</title>',
        "<style>body{font-family:sans-serif} td,th{padding:2px 8px;text-align:left} "
        "img{max-width:100%}</style></head><body>",
        f"<h1>CAMs: {html.escape(str(cams_dir))}</h1>",
    ]
    if metrics is not None:
        xi = f", xi {metrics['xi']:.2f}" if "xi" in metrics else ""
        out.append(
            f"<p>mIoU {_pct(metrics.get('miou'))}% at threshold {metrics['threshold']:.2f}{xi} "
            f"over {metrics.get('num_images', '?')} images</p>"
        )
        out.append("<table><tr><th>class</th><th>IoU (%)</th></tr>")
        out += [f"<tr><td>{html.escape(n)}</td><td>{_pct(v)}</td></tr>" for n, v in metrics["iou"].items()]
        out.append("</table>")
        if chart:
            out.append('<p><img src="iou.png" alt="per-class IoU"></p>')
    out.append("<table><tr><th>image</th><th>mIoU (%)</th><th>input | ground truth | CAMs | prediction</th></tr>")
    for image_id, score, rel in rows:
        src = urllib.parse.quote(rel.as_posix())
        out.append(
            f"<tr><td>{html.escape(image_id)}</td><td>{_pct(score)}</td>"
            f'<td><img src="{src}" alt="{html.escape(image_id)}"></td></tr>'
        )
    out.append("</table></body></html>")
    return "\n".join(out) + "\n"
