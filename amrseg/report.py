"""The experiment report of `amrseg run`: EXP/report.json and one self-contained EXP/report.html.

report.json is the runner's record (stages, their configs, summaries, outputs and runs) plus
`provenance`: the git revision of the amrseg checkout, the versions of Python, torch, numpy and
amrseg, the machine, and the time it was written.

report.html needs nothing from the network: its pictures are files of the experiment folder (the
visualize galleries' PNG panels) or written next to it into EXP/report_files/ (loss and
learning-rate curves, eval-cam threshold sweeps, strips of image | mask | overlay for folders of
palette masks). Every file is written atomically (fileio), the page last. A file that the record
names but that is missing or unreadable is left out of the page, never an error.
"""
from __future__ import annotations

import csv
import datetime
import html
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import yaml
from PIL import Image

from . import __version__
from .fileio import atomic_write, save_image, write_text
from .viz import colorize, overlay, panel

FILES_DIR = "report_files"  # pictures of the page, next to it
GALLERY_LIMIT = 8  # panels or masks shown per stage output
THUMB = 128  # height of a mask-strip picture in pixels
_LOG_META = ("step", "epoch", "lr", "images_per_s")  # log.csv columns that are not losses
_MASK_KINDS = ("labels", "pred")
_NO_MATPLOTLIB = "matplotlib is not installed (pip install 'amrseg[viz]'): no curves on this page."
_CSS = ("body{font-family:sans-serif;margin:1em 2em;max-width:80em} table{border-collapse:collapse} "
        "td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd} td.n{text-align:right} "
        "img{max-width:100%} figure{display:inline-block;margin:4px;vertical-align:top} "
        "figcaption{font-size:small} pre{background:#f6f6f6;padding:6px;overflow-x:auto} "
        "summary{cursor:pointer}")


def write_report(exp_dir: Union[str, Path], record: dict, limit: int = GALLERY_LIMIT) -> tuple[Path, Path]:
    """Writes EXP/report.html and EXP/report.json (and the pictures in EXP/report_files/).

    Args:
        exp_dir: the experiment folder; relative paths in the record are relative to it.
        record: what the runner ran: {"experiment", "file", "out", "stages": [{"name", "command",
            "status", "seconds", "config", "summary", "outputs"}], "runs": {name: run dir}}.
        limit: panels or masks shown per gallery.

    Returns:
        (path of report.html, path of report.json).

    Raises:
        AmrsegError: a file of the report cannot be written (fileio).
    """
    exp_dir = Path(exp_dir)
    record = _plain(record)
    report = {**record, "provenance": provenance()}
    json_path, html_path = exp_dir / "report.json", exp_dir / "report.html"
    write_text(json_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    page = _Page(exp_dir, limit)
    write_text(html_path, page.render(report))
    return html_path, json_path


# --------------------------------------------------------------------------- provenance


def provenance() -> dict:
    """git revision of the amrseg checkout, versions, machine and the time, JSON-ready."""
    torch = _torch()
    gpu = None
    if torch is not None:
        try:
            gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except Exception:  # a broken driver must not cost the report
            gpu = None
    revision, dirty = git_revision()
    return {
        "git": revision,
        "git_dirty": dirty,
        "versions": {"python": platform.python_version(), "torch": getattr(torch, "__version__", None),
                     "numpy": np.__version__, "amrseg": __version__},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "gpu": gpu},
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "--no-optional-locks", *args], cwd=root, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_revision() -> tuple[Optional[str], Optional[bool]]:
    """(HEAD, has uncommitted changes to tracked files) of the checkout amrseg is imported from.

    (None, None) when amrseg is not imported from the top of a git checkout (an installed wheel,
    even inside some other repository) or git is missing.
    """
    root = Path(__file__).resolve().parent.parent
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != root:
        return None, None
    head = _git(root, "rev-parse", "HEAD")
    if head is None:
        return None, None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return head.strip(), None if status is None else bool(status.strip())


def _plain(obj: Any) -> Any:
    """A JSON- and YAML-safe copy: str keys, lists for tuples, None for NaN/inf, str for paths."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


# --------------------------------------------------------------------------- formatting


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _pct(value: Any) -> str:
    v = _num(value)
    return "-" if v is None else f"{100 * v:.1f}"


def _fixed(value: Any, digits: int) -> str:
    v = _num(value)
    return "-" if v is None else f"{v:.{digits}f}"


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _safe(name: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))[:60] or "_"


def _first(summary: dict, *keys: str) -> Any:
    return next((summary[k] for k in keys if summary.get(k) is not None), None)


def _details(summary: dict) -> str:
    """The summary's other scalars, in a few words: training progress, image counts..."""
    if "total_steps" in summary:
        done = "" if summary.get("finished", True) else " (unfinished)"
        return f"step {summary.get('step', '?')}/{summary['total_steps']}{done}"
    shown = {"miou", "threshold", "iou", "sweep", "precision", "confident", "confident_precision",
             "confident_fraction"}
    words = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
             if k not in shown and isinstance(v, (int, float, str)) and not isinstance(v, bool) and len(str(v)) < 40]
    return ", ".join(words[:4])


# --------------------------------------------------------------------------- pictures


def _figure_classes() -> Optional[tuple]:
    """(Figure, FigureCanvasAgg), or None without matplotlib. No pyplot: no display, no global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def read_log(path: Path) -> dict[str, list[tuple[float, float]]]:
    """log.csv -> {column: [(step, value), ...]} by step; the last row of a step wins (a resumed
    run logs a step again), empty and non-numeric cells are left out."""
    by_step: dict[float, dict] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                step = _parse(row.get("step"))
                if step is not None:
                    by_step[step] = row
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    series: dict[str, list[tuple[float, float]]] = {}
    for step in sorted(by_step):
        for key, cell in by_step[step].items():
            value = _parse(cell)
            if key and key not in ("step", "epoch") and value is not None:
                series.setdefault(key, []).append((step, value))
    return series


def _parse(cell: Any) -> Optional[float]:
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _save_figure(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight"))


def curves_png(series: dict, path: Path, title: str, mpl: tuple) -> bool:
    """Loss curves (each logged loss) | learning rate | val_* figures, against the step; False when
    the log has nothing to draw."""
    groups = [("loss", [k for k in series if k not in _LOG_META and not k.startswith("val_")]),
              ("learning rate", [k for k in ("lr",) if k in series]),
              ("validation", [k for k in series if k.startswith("val_")])]
    groups = [(label, keys) for label, keys in groups if keys]
    if not groups:
        return False
    Figure, Canvas = mpl
    fig = Figure(figsize=(4.2 * len(groups), 3.0))
    Canvas(fig)
    for i, (label, keys) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for key in keys:
            xs, ys = zip(*series[key])
            ax.plot(xs, ys, label=key, marker="." if len(xs) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(f"{title}: {label}", fontsize=10)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    _save_figure(fig, path)
    return True


def sweep_png(sweep: list, path: Path, title: str, mpl: tuple) -> bool:
    """mIoU (%) against the background threshold of an eval-cam sweep."""
    points = [(_num(p[0]), _num(p[1])) for p in sweep if isinstance(p, list) and len(p) == 2]
    points = [(t, 100 * m) for t, m in points if t is not None and m is not None]
    if len(points) < 2:
        return False
    Figure, Canvas = mpl
    fig = Figure(figsize=(4.2, 3.0))
    Canvas(fig)
    ax = fig.add_subplot()
    ax.plot(*zip(*points), marker=".")
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title, fontsize=10)
    _save_figure(fig, path)
    return True


def _open(path: Path, mode: str) -> Optional[np.ndarray]:
    try:
        with Image.open(path) as img:
            if mode == "mask" and img.mode not in ("P", "L"):
                return None
            return np.array(img if mode == "mask" else img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _thumb(rgb: np.ndarray, nearest: bool) -> Image.Image:
    img = Image.fromarray(rgb)
    scale = min(1.0, THUMB / img.height)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.NEAREST if nearest else Image.BILINEAR)


def mask_strip(mask_path: Path, image_path: Optional[Path], out: Path) -> bool:
    """image | mask in the VOC colours | overlay, side by side (the mask alone without its image);
    False when the mask cannot be read."""
    mask = _open(mask_path, "mask")
    if mask is None:
        return False
    img = _open(image_path, "rgb") if image_path is not None else None
    tiles = [_thumb(colorize(mask), nearest=True)]
    if img is not None and img.shape[:2] == mask.shape:
        tiles = [_thumb(img, False), tiles[0], _thumb(overlay(img, colorize(mask)), False)]
    save_image(panel(tiles), out, format="PNG")  # side by side with 4 px gaps, as visualize's panels
    return True


def _data_root(config: dict) -> Optional[Path]:
    """The dataset root of a stage config: "data_root", "data" (a path) or "data": {"root": ...}."""
    data = config.get("data")
    for value in (config.get("data_root"), data, _dict(data).get("root")):
        if isinstance(value, str) and value:
            return Path(value)
    return None


def _image_of(image_id: str, mask_dir: Path, root: Optional[Path]) -> Optional[Path]:
    """The picture a mask belongs to: ROOT/JPEGImages/<id>.jpg|.png, or predict's overlay/<id>.jpg."""
    candidates = [root / "JPEGImages" / f"{image_id}{s}" for s in (".jpg", ".jpeg", ".png")] if root else []
    candidates.append(mask_dir / "overlay" / f"{image_id}.jpg")
    return next((p for p in candidates if p.is_file()), None)


# --------------------------------------------------------------------------- the page


class _Page:
    """Builds report.html; pictures go to EXP/report_files/ as they are needed."""

    def __init__(self, exp_dir: Path, limit: int):
        self.exp_dir, self.limit = exp_dir, max(0, int(limit))
        self.files = exp_dir / FILES_DIR
        self.mpl = _figure_classes()

    def _resolve(self, rel: Any) -> Optional[Path]:
        if not isinstance(rel, str) or not rel:
            return None
        path = Path(rel)
        return path if path.is_absolute() else self.exp_dir / path

    def _url(self, path: Path) -> str:
        """The address of a file relative to the page, percent-encoded."""
        from urllib.parse import quote

        return _e(quote(Path(os.path.relpath(path, self.exp_dir)).as_posix()))

    def _img(self, path: Path, alt: str, caption: str = "") -> str:
        cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
        return f'<figure><img src="{self._url(path)}" alt="{_e(alt)}" loading="lazy">{cap}</figure>'

    def render(self, report: dict) -> str:
        stages = [s for s in report.get("stages") or [] if isinstance(s, dict)]
        title = f"amrseg report: {report.get('experiment', '?')}"
        out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
               f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>",
               self._header(report), self._table(stages), self._curves(report, stages),
               self._galleries(stages), self._stages(stages), self._provenance(report.get("provenance") or {}),
               "</body></html>"]
        return "\n".join(part for part in out if part) + "\n"

    def _header(self, report: dict) -> str:
        prov = report.get("provenance") or {}
        rows = [("experiment file", report.get("file")), ("folder", report.get("out") or str(self.exp_dir)),
                ("written", prov.get("created")), ("amrseg", _dict(prov.get("versions")).get("amrseg")),
                ("git", prov.get("git") or "not a git checkout")]
        return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows if v) + "</table>"

    def _table(self, stages: list) -> str:
        head = ("<h2>Figures</h2><table><tr><th>stage</th><th>command</th><th>status</th><th>mIoU (%)</th>"
                "<th>threshold</th><th>confident (%)</th><th>precision (%)</th><th>details</th>"
                "<th>time (s)</th></tr>")
        rows, total = [], 0.0
        for stage in stages:
            summary = _dict(stage.get("summary"))
            total += _num(stage.get("seconds")) or 0.0
            cells = [_e(stage.get("name", "?")), _e(stage.get("command", "")), _e(stage.get("status", "")),
                     _pct(summary.get("miou")), _fixed(summary.get("threshold"), 2),
                     _pct(_first(summary, "confident_fraction", "confident")),
                     _pct(_first(summary, "confident_precision", "precision")),
                     _e(_details(summary)), _fixed(stage.get("seconds"), 1)]
            rows.append("<tr>" + "".join(f'<td class="n">{c}</td>' if 3 <= i <= 6 or i == 8 else f"<td>{c}</td>"
                                         for i, c in enumerate(cells)) + "</tr>")
        rows.append(f'<tr><th colspan="8">total</th><td class="n">{total:.1f}</td></tr>')
        note = ("<p>mIoU over the stage's split; confident: share of the pixels an IR label marks "
                "(not 255), precision: share of those that agree with the ground truth.</p>")
        return head + "".join(rows) + "</table>" + note

    def _curves(self, report: dict, stages: list) -> str:
        runs = _dict(report.get("runs"))
        sweeps = [(i, s) for i, s in enumerate(stages) if isinstance(_dict(s.get("summary")).get("sweep"), list)]
        if not runs and not sweeps:
            return ""
        out = ["<h2>Curves</h2>"]
        if self.mpl is None:
            return out[0] + f"<p>{_e(_NO_MATPLOTLIB)}</p>"
        for i, (name, rel) in enumerate(runs.items()):
            run_dir = self._resolve(rel)
            series = read_log(run_dir / "log.csv") if run_dir is not None else {}
            png = self.files / f"curves-{i:02d}-{_safe(name)}.png"
            if series and curves_png(series, png, str(name), self.mpl):
                out.append(self._img(png, f"loss and learning rate of {name}", f"{name}: {rel}/log.csv"))
            else:
                out.append(f"<p>{_e(name)}: no log.csv with figures in {_e(rel)}</p>")
        for i, stage in sweeps:
            name = stage.get("name", "?")
            png = self.files / f"sweep-{i:02d}-{_safe(name)}.png"
            if sweep_png(stage["summary"]["sweep"], png, f"{name}: threshold sweep", self.mpl):
                out.append(self._img(png, f"mIoU against the threshold, {name}", f"{name}: threshold sweep"))
        return "\n".join(out)

    def _galleries(self, stages: list) -> str:
        out = []
        for i, stage in enumerate(stages):
            for kind, rel in _dict(stage.get("outputs")).items():
                folder = self._resolve(rel)
                if folder is None or not folder.is_dir():
                    continue
                if kind == "gallery":
                    out.append(self._gallery(stage, folder))
                elif kind in _MASK_KINDS:
                    out.append(self._masks(i, stage, folder))
        return "<h2>Galleries</h2>" + "\n".join(p for p in out if p) if any(out) else ""

    def _gallery(self, stage: dict, folder: Path) -> str:
        panels = sorted(p for p in (folder / "panels").glob("*.png") if not p.name.startswith("."))
        head = f"<h3>{_e(stage.get('name', '?'))}: CAMs</h3>"
        index = folder / "index.html"
        link = (f'<p>First {min(self.limit, len(panels))} of {len(panels)} panels (input | ground truth | '
                f'CAMs | prediction); <a href="{self._url(index)}">the whole gallery</a>.</p>'
                if index.is_file() else "")
        chart = [self._img(folder / "iou.png", "per-class IoU")] if (folder / "iou.png").is_file() else []
        images = chart + [self._img(p, p.stem) for p in panels[:self.limit]]
        return head + link + "<div>" + "\n".join(images) + "</div>" if images or link else ""

    def _masks(self, i: int, stage: dict, folder: Path) -> str:
        root = _data_root(_dict(stage.get("config")))
        if root is not None and not root.is_absolute() and not root.is_dir():
            root = self.exp_dir / root  # relative to the experiment folder rather than to the cwd
        masks = sorted(p for p in folder.glob("*.png") if not p.name.startswith("."))
        figures = []
        for mask in masks[:self.limit]:
            png = self.files / f"masks-{i:02d}-{_safe(stage.get('name'))}-{_safe(mask.stem)}.png"
            image = _image_of(mask.stem, folder, root)
            if mask_strip(mask, image, png):
                figures.append(self._img(png, mask.stem, mask.stem))
        if not figures:
            return ""
        what = "image | mask | overlay" if root is not None or (folder / "overlay").is_dir() else "masks"
        return (f"<h3>{_e(stage.get('name', '?'))}: masks</h3><p>First {len(figures)} of {len(masks)} in "
                f"{_e(folder)} ({what}, where the image was found).</p><div>" + "\n".join(figures) + "</div>")

    def _stages(self, stages: list) -> str:
        out = ["<h2>Stages and their configs</h2>"]
        for stage in stages:
            summary, config = _dict(stage.get("summary")), _dict(stage.get("config"))
            outputs = "".join(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in _dict(stage.get("outputs")).items())
            out.append(f"<h3>{_e(stage.get('name', '?'))}</h3><p>{_e(stage.get('command', ''))}, "
                       f"{_e(stage.get('status', ''))}</p>" + (f"<ul>{outputs}</ul>" if outputs else ""))
            out.append(_iou_table(summary))
            out.append(_collapsible("resolved config", yaml.safe_dump(config, sort_keys=False) if config else "{}"))
            out.append(_collapsible("summary", json.dumps(summary, indent=1)))
        return "\n".join(p for p in out if p)

    def _provenance(self, prov: dict) -> str:
        rows = [("git revision", prov.get("git") or "not a git checkout"),
                ("uncommitted changes", {True: "yes", False: "no"}.get(prov.get("git_dirty"), "-")),
                *[(k, v) for k, v in _dict(prov.get("versions")).items()],
                *[(k, v) for k, v in _dict(prov.get("machine")).items()],
                ("written", prov.get("created"))]
        return ("<h2>Provenance</h2><table>"
                + "".join(f"<tr><th>{_e(k)}</th><td>{_e('-' if v is None else v)}</td></tr>" for k, v in rows)
                + "</table>")


def _iou_table(summary: dict) -> str:
    iou = _dict(summary.get("iou"))
    if not iou:
        return ""
    rows = "".join(f'<tr><td>{_e(k)}</td><td class="n">{_pct(v)}</td></tr>' for k, v in iou.items())
    return _collapsible("per-class IoU", "<table><tr><th>class</th><th>IoU (%)</th></tr>" + rows + "</table>",
                        escaped=True)


def _collapsible(label: str, body: str, escaped: bool = False) -> str:
    inner = body if escaped else f"<pre>{_e(body)}</pre>"
    return f"<details><summary>{_e(label)}</summary>{inner}</details>"
