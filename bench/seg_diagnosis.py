"""Where a segmentation run loses: localisation or classification.

Scores a train-seg run on a split twice: as is, and with the image's ground-truth classes given
(every class absent from the image-level labels is removed before the argmax). CAMs and pseudo
masks are always made over the image's ground-truth classes, so the second figure is the one to
set against their mIoU; the gap between the two is what the network loses by having to name the
classes itself.

With --cam-run RUN it also scores how well that train-cam run names the classes of each image, with
the rule make-cam uses for unlabelled images (sigmoid of the branch-mean logits of the image and its
flip > 0.5; the top class when none is): the share of images whose class set is exactly right,
and the precision and recall of the predicted classes.

Usage: python bench/seg_diagnosis.py --run SEG --data ROOT --split val [--scales 1.0] [--cam-run RUN]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from amrseg.cam.infer import InferConfig, scale_batch  # noqa: E402
from amrseg.data.transforms import normalize  # noqa: E402
from amrseg.data.voc import open_dataset  # noqa: E402
from amrseg.runtime import pick_device  # noqa: E402
from amrseg.runs import load_run  # noqa: E402
from amrseg.segment import predict_probs  # noqa: E402
from amrseg.stages.loop import score_masks as evaluate_masks  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--scales", default="1.0")
    p.add_argument("--cam-run", help="a train-cam run: also score its image-level class predictions")
    a = p.parse_args()
    device = pick_device("auto", 0)
    data = open_dataset(a.data, a.split)
    model = load_run(Path(a.run), "seg", device).model
    scales = [float(s) for s in a.scales.split(",")]
    probs = {}

    def probs_of(i: int) -> torch.Tensor:
        if i not in probs:
            probs[i] = predict_probs(model, data.load_image(i), scales, device).cpu()
        return probs[i]

    def plain(i: int) -> np.ndarray:
        return probs_of(i).argmax(0).to(torch.uint8).numpy()

    def given_classes(i: int) -> np.ndarray:
        present = torch.cat([torch.ones(1, dtype=torch.bool), torch.as_tensor(data.labels[i]).bool()])
        return probs_of(i).masked_fill(~present[:, None, None], -1).argmax(0).to(torch.uint8).numpy()

    as_is = evaluate_masks(data, plain, desc="as is")
    oracle = evaluate_masks(data, given_classes, desc="classes given")
    pred_fg = np.mean([(plain(i) > 0).mean() for i in range(len(data))])
    gt_fg = np.mean([(data.load_mask(i) > 0).mean() for i in range(len(data)) if data.mask_paths[i] is not None])
    print(f"| run | split | mIoU | mIoU, image classes given | foreground predicted | foreground in GT |\n"
          f"|---|---|---|---|---|---|\n"
          f"| {a.run} | {a.split} | {100 * as_is['miou']:.1f} | {100 * oracle['miou']:.1f} | "
          f"{100 * pred_fg:.1f}% | {100 * gt_fg:.1f}% |")
    if a.cam_run:
        print("\n" + classification_row(Path(a.cam_run), data, device))


def classification_row(run: Path, data, device: torch.device) -> str:
    """How well a train-cam run names the classes of the split's images (make-cam's rule for unlabelled images)."""
    model = load_run(run, "cam", device).model
    exact = tp = fp = fn = 0
    for i in range(len(data)):
        x = normalize(data.load_image(i))[None].to(device)
        keys = [None]
        scale_batch(model, x, keys, 1.0, InferConfig())  # fills keys with the predicted classes
        pred, gt = set(keys[0].tolist()), set(np.flatnonzero(data.labels[i]).tolist())
        exact += pred == gt
        tp, fp, fn = tp + len(pred & gt), fp + len(pred - gt), fn + len(gt - pred)
    return (f"| classifier | split | class set exactly right | precision | recall |\n|---|---|---|---|---|\n"
            f"| {run} | {data.split} | {100 * exact / len(data):.1f}% | {100 * tp / max(tp + fp, 1):.1f}% | "
            f"{100 * tp / max(tp + fn, 1):.1f}% |")


if __name__ == "__main__":
    main()
