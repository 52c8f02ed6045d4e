"""`predict`: masks for any JPEG/PNG images with a train-seg run (segment.py's maths).

format "png": OUT/<stem>.png palette masks and OUT/overlay/<stem>.jpg overlays. format "voc-test":
the official evaluation server's layout, OUT/results/VOC2012/Segmentation/comp6_test_cls/<id>.png,
and OUT/results.tar.gz holding it. Images whose mask exists are skipped (a re-run finishes the
job); OUT/config.yaml records what made the masks, and masks of other settings there are refused
(`overwrite` removes them first).
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image

from ..config import check_choice, check_range, check_scales
from ..data.voc import IMAGE_SUFFIXES, SegData, list_images, write_palette_png
from ..errors import AmrsegError
from ..fileio import check_writable_dir, atomic_write, save_image
from ..outputs import claim_folder, file_identity
from ..runs import load_run
from ..runtime import pick_device
from ..segment import predict_mask
from ..viz import colorize, overlay
from .loop import ImageLoop

VOC_TEST_DIR = Path("results/VOC2012/Segmentation/comp6_test_cls")
FORMATS = ("png", "voc-test")


@dataclass
class PredictConfig:
    run: str = ""  # the train-seg run
    input: str = ""  # an image file or a folder of images
    out: str = ""
    format: str = "png"  # png | voc-test
    scales: list = field(default_factory=lambda: [1.0])
    crf: bool = False
    device: str = "auto"
    overwrite: bool = False

    def validate(self) -> None:
        check_choice("format", self.format, FORMATS)
        check_scales(self.scales)
        for key in ("run", "input", "out"):
            check_range(key, getattr(self, key), nonempty=True)


def _inputs(path: Path, class_names: list[str]) -> SegData:
    """A folder of images, or one image file, as an unlabelled dataset."""
    path = Path(path)
    if path.is_dir():
        return list_images(path, class_names)
    if not path.is_file():
        raise AmrsegError(f"--input {path}: no such file or directory")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise AmrsegError(f"--input {path}: not a .jpg, .jpeg or .png image")
    return SegData(root=path.parent, split="images", ids=[path.stem], class_names=class_names, labels=None,
                   mask_paths=[None], image_paths=[path])


def run(cfg: PredictConfig, show_progress: Optional[bool] = None) -> dict:
    """Writes the masks (and overlays, or the server archive); returns a summary."""
    if cfg.format not in FORMATS:
        raise AmrsegError(f"--format {cfg.format!r}: not one of {', '.join(FORMATS)}")
    cfg.validate()
    check_writable_dir(cfg.out, "--out")
    device = pick_device(cfg.device)
    loaded = load_run(Path(cfg.run), "seg", device)
    data = _inputs(Path(cfg.input), loaded.class_names)
    out = Path(cfg.out)
    mask_dir = out / VOC_TEST_DIR if cfg.format == "voc-test" else out
    claim_folder(out, {"run": str(Path(cfg.run).resolve()), "model": file_identity(Path(cfg.run) / "model.pt"),
                       "format": cfg.format, "scales": list(cfg.scales), "crf": cfg.crf},
                 "--out", str(mask_dir.relative_to(out) / "*.png"), overwrite=cfg.overwrite)
    mask_dir.mkdir(parents=True, exist_ok=True)
    if cfg.format == "png":
        (out / "overlay").mkdir(exist_ok=True)

    def work(shard: list):
        for i in shard:
            image = data.load_image(i)  # one-line error naming an unreadable file
            mask = predict_mask(loaded.model, image, cfg.scales, device, cfg.crf)
            if cfg.format == "png":
                save_image(Image.fromarray(overlay(image, colorize(mask))), out / "overlay" / f"{data.ids[i]}.jpg",
                           format="JPEG", quality=90)
            write_palette_png(mask_dir / f"{data.ids[i]}.png", mask)
            yield i, None

    counts = ImageLoop(data, output=lambda i: mask_dir / f"{data.ids[i]}.png", desc="predict").run(work, show_progress)
    summary = {"out": str(out), **counts, "format": cfg.format}
    if cfg.format == "voc-test":
        archive = out / "results.tar.gz"
        atomic_write(archive, lambda tmp: _tar_results(tmp, out))
        summary["archive"] = str(archive)
    return summary


def _tar_results(tmp: str, out: Path) -> None:
    """results.tar.gz with the paths the server expects: results/VOC2012/Segmentation/comp6_test_cls/*.png."""
    with tarfile.open(tmp, "w:gz") as tar:
        for png in sorted((out / VOC_TEST_DIR).glob("*.png")):
            tar.add(png, arcname=str(VOC_TEST_DIR / png.name))
