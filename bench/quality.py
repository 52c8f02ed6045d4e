"""Quality benchmark: cam vs the AMR presets on the scenes (emoji-VOC or Fashion-MNIST), one fixed CPU recipe.

Builds the scenes and a pretrained backbone (both reused when present, or given with --scenes and
--backbone), trains each preset with the same recipe, makes the val CAMs (with the branch maps, for
the xi sweep), scores them with a threshold sweep, and writes a markdown table. Everything goes
through the `amrseg` CLI, as a user would run it; every step resumes or skips what is done, so an
interrupted benchmark picks up where it stopped.

Besides the mIoU, each row has what says whether a CAM has VOC's problems:
- the classifier's multi-label mAP and exact-set accuracy on val (sigmoid of the branches' mean
  logit over the image and its flip; the set = classes above 0.5, the top class when none is);
- class-agnostic foreground precision and recall at the row's best threshold (a part-focused CAM
  has precision clearly above recall);
- emoji-VOC only: the share of the context pixels (SegmentationContext == 1: rails under a train,
  water under a boat) that the CAMs mark as foreground at that threshold, and at the threshold where
  the foreground recall is 60% (interpolated over the sweep): a map that covers less of everything
  covers less context too, and only the second figure compares what two maps take for the object.

amr-official is initialised from this benchmark's cam run (--init-spotlight), so list cam first.

With --train-seeds 0,1,2 every preset is trained once per seed (same scenes, same backbone) and a
second table gives the mean and spread of each preset's mIoU: the run-to-run noise that a gap
between two presets has to beat.

Usage: python bench/quality.py [--source emoji|fashion] [--out bench/out] [--train N] [--val N] [--epochs 4]
                               [--presets cam,amr-block] [--train-seeds 0,1,2] [--scenes DIR] [--backbone W.pt]
                               [--heldout DIR]
`--heldout DIR` adds each run's mIoU on DIR's val scenes, composed unlike the training ones.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from amrseg.runs import load_run  # noqa: E402
from amrseg.cam.io import load_cam  # noqa: E402
from amrseg.cli import main as amrseg  # noqa: E402
from amrseg.data.emoji_scenes import PART_CONTEXT  # noqa: E402
from amrseg.data.transforms import normalize  # noqa: E402
from amrseg.data.voc import IGNORE, open_dataset  # noqa: E402
from amrseg.eval.classification import mean_average_precision  # noqa: E402

# The fixed recipe of each source (the emoji one is issue 11's: crop 160, train-cam's default lr).
RECIPES = {
    "emoji": {"crop": 160, "lr": None, "train": 10000, "val": 1000, "pretrain": []},
    "fashion": {"crop": 128, "lr": 0.05, "train": 3000, "val": 500,
                "pretrain": ["--epochs", "2", "--items", "16000", "--size", "96"]},
}


def run(*args: str) -> None:
    code = amrseg([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"amrseg {' '.join(map(str, args))} failed with exit {code}")


def classifier_metrics(run_dir: Path, data) -> dict:
    """Multi-label mAP and exact-set accuracy of a train-cam run on the split (image + flip, full size)."""
    model = load_run(run_dir, "cam").model
    scores, branch_scores = [], {}
    with torch.no_grad():
        for i in range(len(data)):
            x = normalize(data.load_image(i))[None]
            out = model(torch.cat([x, x.flip(-1)]))
            branches = {k[len("logits_"):]: v.mean(0) for k, v in out.items() if k.startswith("logits_")}
            for b, v in branches.items():
                branch_scores.setdefault(b, []).append(torch.sigmoid(v))
            scores.append(torch.sigmoid(torch.stack(list(branches.values())).mean(0)))
    scores = torch.stack(scores)
    labels = torch.from_numpy(data.labels.astype(np.float32))
    # Each branch's own mAP: the fused score above averages a strong and a weak branch.
    by_branch = {b: mean_average_precision(torch.stack(v), labels) for b, v in branch_scores.items()}
    picked = scores > 0.5
    none = ~picked.any(1)
    picked[none, scores[none].argmax(1)] = True
    exact = (picked == (labels > 0)).all(1).float().mean().item()
    return {"map": mean_average_precision(scores, labels), "exact": exact,
            "map_s": by_branch.get("s"), "map_c": by_branch.get("c")}


# Foreground recall at which the context shares of two maps are compared: a map that marks less of
# everything marks less context too, so only shares at one recall say which map confuses context
# with the object (the tuning scenes' best thresholds give recalls of 62-66%).
MATCHED_RECALL = 0.6
SWEEP = "0.05:0.70:0.05"  # eval-cam --sweep of every run


def at_recall(recalls: list[float], values: list[float], level: float = MATCHED_RECALL) -> float | None:
    """`values` linearly interpolated at foreground recall `level` (recall falls as the threshold rises).

    The first pair of neighbouring thresholds whose recalls bracket `level` is used; None when no
    threshold of the sweep reaches `level` or none falls below it."""
    for (r0, v0), (r1, v1) in zip(zip(recalls, values), zip(recalls[1:], values[1:])):
        if r0 >= level >= r1:
            return v0 if r0 == r1 else v0 + (v1 - v0) * (r0 - level) / (r0 - r1)
    return None


def map_metrics(cams: Path, data, threshold: float, sweep: list[float]) -> dict:
    """Foreground precision/recall and the context share marked foreground at `threshold`, and the
    context share at MATCHED_RECALL foreground recall, interpolated over the thresholds `sweep`."""
    ts = sorted(set(sweep) | {threshold})
    tp, fp, fn, ctx_fg = (np.zeros(len(ts), np.int64) for _ in range(4))
    ctx = 0
    for i in range(len(data)):
        arrays = load_cam(cams / f"{data.ids[i]}.npz")
        gt = data.load_mask(i)
        maps = arrays["high_res"].astype(np.float32)
        top = maps.max(0) if len(maps) else np.full(gt.shape, -np.inf, np.float32)
        valid = gt != IGNORE
        fg = (gt > 0) & valid
        parts = Path(data.root) / "SegmentationContext" / f"{data.ids[i]}.png"
        context = np.array(Image.open(parts)) == PART_CONTEXT if parts.exists() else None
        ctx += 0 if context is None else int(context.sum())
        for k, t in enumerate(ts):
            pred = top > np.float32(t)
            tp[k] += int((pred & fg).sum())
            fp[k] += int((pred & ~fg & valid).sum())
            fn[k] += int((~pred & fg).sum())
            if context is not None:
                ctx_fg[k] += int((context & pred).sum())
    recall = (tp / np.maximum(tp + fn, 1)).tolist()
    share = (ctx_fg / ctx).tolist() if ctx else None
    b = ts.index(threshold)
    return {"precision": tp[b] / max(tp[b] + fp[b], 1), "recall": recall[b],
            "context_fg": share[b] if share else None,
            "context_fg_matched": at_recall(recall, share) if share else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default="emoji", choices=sorted(RECIPES), help="the scenes (default emoji)")
    p.add_argument("--out", default="bench/out", help="working folder (default bench/out)")
    p.add_argument("--scenes", help="reuse these scenes (default: OUT/scenes-<source>-s<seed>, built if absent)")
    p.add_argument("--backbone", help="reuse these pretrained weights (default: OUT/backbone-<source>.pt)")
    p.add_argument("--train", type=int, help="train scenes to build (default 10000 emoji, 3000 fashion)")
    p.add_argument("--val", type=int, help="val scenes to build (default 1000 emoji, 500 fashion)")
    p.add_argument("--epochs", type=int, default=4, help="train-cam epochs (default 4)")
    p.add_argument("--lr", type=float, help="train-cam lr (default: 0.05 fashion, train-cam's own for emoji)")
    p.add_argument("--presets", default="cam,amr,amr-block,amr-gtm,amr-official",
                   help="comma-separated presets, cam first (default all five)")
    p.add_argument("--seed", type=int, default=1, help="seed of the scenes (default 1)")
    p.add_argument("--train-seeds", default="0", help="train-cam --seed of each run, comma-separated (default 0)")
    p.add_argument("--scales", default="1.0,0.5,1.5", help="make-cam scales (default 1.0,0.5,1.5)")
    p.add_argument("--set", action="append", default=[], help="extra train-cam --set for every preset")
    p.add_argument("--heldout", help="also score every run on the val split of these scenes, composed unlike the "
                                     "training ones (e.g. build-scenes --seed 99 --object-scale 0.8 --count-weights "
                                     "0.25,0.35,0.4 --context-prob 0.8; default: none)")
    a = p.parse_args()
    recipe_of = RECIPES[a.source]
    out = Path(a.out)
    scenes = Path(a.scenes) if a.scenes else out / f"scenes-{a.source}-s{a.seed}"
    backbone = Path(a.backbone) if a.backbone else out / f"backbone-{a.source}.pt"
    if not (scenes / "ImageSets/Segmentation/val.txt").exists():
        run("build-scenes", scenes, "--source", a.source, "--train", a.train or recipe_of["train"],
            "--val", a.val or recipe_of["val"], "--seed", a.seed)
    if not backbone.exists():
        run("pretrain-backbone", "--source", a.source, "--out", backbone, "--backbone", "resnet18",
            "--base-width", 32, *recipe_of["pretrain"])
    lr = a.lr if a.lr is not None else recipe_of["lr"]
    recipe = ["--backbone", "resnet18", "--base-width", "32", "--pretrained", str(backbone), "--crop",
              str(recipe_of["crop"]), "--batch-size", "16", "--epochs", str(a.epochs)]
    recipe += ["--lr", str(lr)] if lr is not None else []
    for s in a.set:
        recipe += ["--set", s]
    val = open_dataset(scenes, "val")
    rows, xi_rows = [], []
    names = None
    by_preset: dict[str, list[float]] = {}
    runs = [(preset, int(seed)) for seed in a.train_seeds.split(",") for preset in a.presets.split(",")]
    for preset, seed in runs:
        seed_tag = "" if seed == 0 else f"-seed{seed}"  # seed 0 keeps the single-run names
        tag = preset + seed_tag + ("" if not a.set else "+" + "+".join(a.set))
        run_dir, cams = out / f"run-{a.source}-{tag}", out / f"cams-{a.source}-{tag}"
        t0, train_s = time.perf_counter(), None  # None: a finished run was reused
        if not (run_dir / "model.pt").exists():
            resume = ["--resume"] if (run_dir / "checkpoint.pt").exists() else []
            init = ["--init-spotlight", out / f"run-{a.source}-cam{seed_tag}"] if preset == "amr-official" else []
            run("train-cam", "--data", scenes, "--split", "train", "--preset", preset, "--out", run_dir, *recipe,
                "--seed", seed, *init, *resume)
            train_s = time.perf_counter() - t0
        run("make-cam", "--run", run_dir, "--data", scenes, "--split", "val", "--out", cams, "--scales", a.scales,
            "--save-branches")
        metrics = out / f"metrics-{a.source}-{tag}.json"
        run("eval-cam", "--cams", cams, "--data", scenes, "--split", "val", "--sweep", SWEEP,
            "--out", metrics)
        m = json.loads(metrics.read_text())
        names = [n for n in m["iou"] if n != "background"]
        extra = {**classifier_metrics(run_dir, val),
                 **map_metrics(cams, val, m["threshold"], [t for t, _ in m["sweep"]])}
        rows.append((tag, m["threshold"], m["miou"], [m["iou"][n] for n in ["background", *names]], train_s, extra))
        by_preset.setdefault(preset, []).append(m["miou"])
        if a.heldout:
            held = Path(a.heldout)
            held_cams = out / f"cams-{a.source}-{tag}-on-{held.name}"
            run("make-cam", "--run", run_dir, "--data", held, "--split", "val", "--out", held_cams, "--scales",
                a.scales)
            held_json = out / f"metrics-{a.source}-{tag}-on-{held.name}.json"
            run("eval-cam", "--cams", held_cams, "--data", held, "--split", "val", "--sweep", SWEEP,
                "--out", held_json)
            extra["heldout"] = json.loads(held_json.read_text())["miou"]
        if preset != "cam":
            xi_json = out / f"xi-{a.source}-{tag}.json"
            run("eval-cam", "--cams", cams, "--data", scenes, "--split", "val", "--sweep", SWEEP,
                "--xi-sweep", "0:1:0.1", "--out", xi_json)
            xi_rows.append((tag, json.loads(xi_json.read_text())["xi_sweep"]))

    def pct(v):
        return "-" if v is None or v != v else f"{100 * v:.1f}"

    built = json.loads((scenes / "scenes.json").read_text()) if (scenes / "scenes.json").exists() else {}
    lines = [f"CAM quality on {len(val)} val scenes ({a.source}, {scenes.name}, scene seed "
             f"{built.get('seed', '?')}), resnet18 width 32, crop "
             f"{recipe_of['crop']}, train scenes x {a.epochs} epochs, lr {lr if lr is not None else 'default'}, "
             f"scales {a.scales} + flip.", "",
             "| preset | best threshold | mIoU | cls mAP | mAP spotlight / compensation | exact set | fg precision "
             f"| fg recall | context as fg | context as fg at {100 * MATCHED_RECALL:.0f}% fg recall | train s |"
             + (f" mIoU on {Path(a.heldout).name} (held out) |" if a.heldout else ""),
             "|---" * (12 if a.heldout else 11) + "|"]
    for tag, t, miou, _, secs, x in rows:
        secs = "-" if secs is None else f"{secs:.0f}"
        branch_map = pct(x["map_s"]) + ("" if x["map_c"] is None else " / " + pct(x["map_c"]))
        lines.append(f"| {tag} | {t:.2f} | **{pct(miou)}** | {pct(x['map'])} | {branch_map} | {pct(x['exact'])} | "
                     f"{pct(x['precision'])} | {pct(x['recall'])} | {pct(x['context_fg'])} | "
                     f"{pct(x['context_fg_matched'])} | {secs} |"
                     + (f" {pct(x['heldout'])} |" if a.heldout else ""))
    lines += ["", "Per-class IoU:", "", "| preset | " + " | ".join(["bg", *names]) + " |",
              "|---" * (len(names) + 2) + "|"]
    for tag, _, _, ious, _, _ in rows:
        lines.append(f"| {tag} | " + " | ".join(pct(v) for v in ious) + " |")
    for tag, sweep in xi_rows:
        lines += ["", f"xi sweep for {tag} (xi = weight of the spotlight CAM; best threshold per xi):", "",
                  "| xi | " + " | ".join(f"{x:.1f}" for x, _, _ in sweep) + " |",
                  "|---" * (len(sweep) + 1) + "|",
                  "| mIoU | " + " | ".join(pct(m) for _, _, m in sweep) + " |"]
    if any(len(v) > 1 for v in by_preset.values()):
        lines += ["", f"Over the train seeds {a.train_seeds} (mIoU; sd is the sample standard deviation):", "",
                  "| preset | runs | mean | sd | min | max |", "|---|---|---|---|---|---|"]
        for preset, v in by_preset.items():
            sd = statistics.stdev(v) if len(v) > 1 else float("nan")
            lines.append(f"| {preset} | {len(v)} | **{pct(statistics.mean(v))}** | {pct(sd)} | {pct(min(v))} | "
                         f"{pct(max(v))} |")
    text = "\n".join(lines)
    print(text)
    (out / f"quality-{a.source}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
