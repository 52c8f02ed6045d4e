"""Where AMR's gain comes from: the two branches' coverage, and two plain CAMs averaged.

AMR's claim is that the compensation branch lights up the less discriminative object regions that
the spotlight misses, so the fused map covers more of each object. Two checks of that claim:

1. Coverage: class-agnostic foreground precision and recall (foreground = the max over the
   image's class maps above t) at fixed thresholds, for the spotlight map, the compensation map
   and the fused map of a make-cam --save-branches folder. A compensation branch that spreads
   has the higher recall at every threshold.
2. Ensemble: the CAMs of two independently trained plain `cam` runs (e.g. two train seeds),
   fused exactly as AMR fuses its branches (xi 0.5, AMR.md section 5) and scored with the same
   threshold sweep. AMR trains two backbones; if it beats one CAM only by what averaging two CAMs
   gives, the gain is an ensemble effect, not the compensation branch.

It also scores the CAMs on the images with one class and on those with several apart: where the
plain CAM loses is a hint of what a better map has to fix.

Usage: python bench/amr_analysis.py --data ROOT --split val --amr-cams CAMS_AMR --cam-cams CAMS_1,CAMS_2
       (bench/quality.py --presets cam,amr-block --train-seeds 0,1,2 makes all of these)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from amrseg.cam.io import fuse, load_cam, save_cam  # noqa: E402
from amrseg.data.voc import IGNORE, open_dataset  # noqa: E402
from amrseg.eval.eval_cam import evaluate_cams, parse_range  # noqa: E402

BRANCHES = {"spotlight": "high_res_spotlight", "compensation": "high_res_compensation", "fused": "high_res"}


def coverage(cams: Path, data, thresholds: list[float], maps_of: dict[str, str]) -> dict[str, np.ndarray]:
    """{name: [T, 3] counts of (true fg, false fg, missed fg) pixels} over the split, 255 ignored.

    maps_of: {name: npz key} of the maps to score, e.g. BRANCHES.
    """
    counts = {name: np.zeros((len(thresholds), 3), dtype=np.int64) for name in maps_of}
    t = np.asarray(thresholds, dtype=np.float32)[:, None]
    for i in range(len(data)):
        if data.mask_paths[i] is None:
            continue
        arrays = load_cam(cams / f"{data.ids[i]}.npz")
        gt = data.load_mask(i)
        valid = gt != IGNORE
        fg = (gt[valid] > 0)[None]
        for name, key in maps_of.items():
            if key not in arrays:
                raise SystemExit(f"{cams}: no '{key}' maps (make the CAMs with make-cam --save-branches)")
            maps = arrays[key].astype(np.float32)
            top = maps.max(axis=0)[valid] if len(maps) else np.zeros(int(valid.sum()), np.float32)
            pred = top[None] > t
            counts[name] += np.stack([(pred & fg).sum(1), (pred & ~fg).sum(1), (~pred & fg).sum(1)], axis=1)
    return counts


def subset(data, keep: list[int]):
    """The images `keep` of a SegData, as a SegData."""
    return dataclasses.replace(data, ids=[data.ids[i] for i in keep], labels=data.labels[keep],
                               mask_paths=[data.mask_paths[i] for i in keep],
                               image_paths=[data.image_paths[i] for i in keep])


def ensemble(cams_a: Path, cams_b: Path, out: Path, ids: list[str]) -> None:
    """out/<id>.npz = fuse(a, b, 0.5) of the two folders' fused maps (same keys required)."""
    for image_id in ids:
        a, b = load_cam(cams_a / f"{image_id}.npz"), load_cam(cams_b / f"{image_id}.npz")
        if not np.array_equal(a["keys"], b["keys"]):
            raise SystemExit(f"{image_id}: the two CAM folders hold different classes")
        maps = fuse(a["high_res"].astype(np.float32), b["high_res"].astype(np.float32), 0.5)
        save_cam(out / f"{image_id}.npz", keys=a["keys"], high_res=maps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--amr-cams", required=True, help="make-cam --save-branches output of an AMR run")
    p.add_argument("--cam-cams", required=True, help="two CAM folders of plain cam runs, comma-separated")
    p.add_argument("--thresholds", default="0.1:0.6:0.1", help="coverage thresholds LO:HI:STEP")
    p.add_argument("--sweep", default="0.05:0.70:0.05", help="threshold sweep of the mIoU (as bench/quality.py)")
    a = p.parse_args()
    data = open_dataset(a.data, a.split)
    thresholds = parse_range(a.thresholds, "--thresholds")
    sweep = parse_range(a.sweep, "--sweep")

    cam_dirs = [Path(d) for d in a.cam_cams.split(",")]
    if len(cam_dirs) != 2:
        raise SystemExit("--cam-cams: give exactly two folders")
    amr = Path(a.amr_cams)

    counts = {f"cam run 1 ({cam_dirs[0]})": coverage(cam_dirs[0], data, thresholds, {"": "high_res"})[""]}
    counts.update({f"AMR {name} ({amr})": c for name, c in coverage(amr, data, thresholds, BRANCHES).items()})
    lines = [f"Foreground precision / recall (class-agnostic, %) on {a.split}:", "",
             "| map | " + " | ".join(f"t {t:.2f}" for t in thresholds) + " |", "|---" * (len(thresholds) + 1) + "|"]
    for name, c in counts.items():
        cells = [f"{100 * tp / max(tp + fp, 1):.1f} / {100 * tp / max(tp + fn, 1):.1f}" for tp, fp, fn in c]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    n_classes = data.labels.sum(axis=1)
    parts = {"all": data, "1 class": subset(data, np.flatnonzero(n_classes == 1).tolist()),
             "2+ classes": subset(data, np.flatnonzero(n_classes > 1).tolist())}
    lines += ["", "| CAMs | best threshold | mIoU | " + " | ".join(
              f"mIoU, {k} ({len(v)} images)" for k, v in parts.items() if k != "all") + " |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        ensemble(cam_dirs[0], cam_dirs[1], Path(tmp), data.ids)
        for label, folder in ((f"cam run 1 ({cam_dirs[0]})", cam_dirs[0]), (f"cam run 2 ({cam_dirs[1]})", cam_dirs[1]),
                              (f"AMR ({amr})", amr), ("cam runs 1 and 2 fused (xi 0.5)", Path(tmp))):
            m = evaluate_cams(folder, data, sweep)
            # The parts at the threshold that is best on the whole split.
            by_part = [evaluate_cams(folder, part, [m["threshold"]])["miou"] for k, part in parts.items() if k != "all"]
            lines.append(f"| {label} | {m['threshold']:.2f} | **{100 * m['miou']:.1f}** | "
                         + " | ".join(f"{100 * v:.1f}" for v in by_part) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
