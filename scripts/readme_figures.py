"""The README's pictures, from a finished `amrseg run demo` folder (`python scripts/readme_figures.py demo docs/img`).

Writes OUT/cam-gallery.png (the first --panels val panels of the gallery: image, ground truth, each
class's CAM, the prediction at the best threshold) and OUT/chain.png (for --images train images,
the IR labels, the pseudo masks and, for val images, the segmentation network's masks, as the
report draws them). Pictures only: every figure comes from the experiment's own files.
"""
import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw


def stack(images: list, pad: int = 4, labels: list = ()) -> Image.Image:
    """The images one below the other on white, left-aligned, each under its label (if any)."""
    label_h = 14 if labels else 0
    width = max(im.width for im in images)
    height = sum(im.height + label_h + pad for im in images) - pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for i, im in enumerate(images):
        if labels:
            draw.text((2, y + 1), labels[i], fill="black")
            y += label_h
        sheet.paste(im.convert("RGB"), (0, y))
        y += im.height + pad
    return sheet


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("demo", type=Path, help="a finished `amrseg run demo` folder")
    p.add_argument("out", type=Path, help="where to write the PNGs (e.g. docs/img)")
    p.add_argument("--panels", type=int, default=4, help="val CAM panels to show (default 4)")
    p.add_argument("--images", type=int, default=2, help="images per stage in chain.png (default 2)")
    a = p.parse_args()
    panels = sorted((a.demo / "gallery" / "panels").glob("*.png"))[:a.panels]
    files = a.demo / "report_files"
    stages = [("ir-labels", "IR labels (dense CRF)"), ("pseudo-masks", "pseudo masks (IRN random walk)"),
              ("eval-seg", "DeepLab-v2 on val")]
    strips, labels = [], []
    for stage, title in stages:
        found = sorted(files.glob(f"masks-*-{stage}-*.png"))[:a.images]
        for f in found:
            strips.append(Image.open(f))
            labels.append(f"{title}: {f.stem.split(stage + '-')[-1]} (image | mask | overlay)")
    if not panels or not strips:
        print(f"{a.demo}: no gallery panels or report strips (run `amrseg run demo` to its end first)",
              file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    # 256-colour PNGs: a third of the bytes, and the pictures still read.
    stack([Image.open(f) for f in panels]).quantize(256).save(a.out / "cam-gallery.png", optimize=True)
    stack(strips, labels=labels).quantize(256).save(a.out / "chain.png", optimize=True)
    print(f"wrote {a.out / 'cam-gallery.png'} and {a.out / 'chain.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
