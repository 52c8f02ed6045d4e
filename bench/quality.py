"""Quality benchmark: cam vs the AMR presets on the Fashion-MNIST scenes, one fixed CPU recipe.

Builds the scenes and a pretrained backbone (both reused when present), trains each preset with the
same recipe, makes the val CAMs (with the branch maps, for the xi sweep), scores them with a
threshold sweep, and writes a markdown table. Everything goes through the `amrseg` CLI, as a user
would run it; every step resumes or skips what is done, so an interrupted benchmark picks up where
it stopped.

amr-official is initialised from this benchmark's cam run (--init-spotlight), so list cam first.

With --train-seeds 0,1,2 every preset is trained once per seed (same scenes, same backbone) and a
second table gives the mean and spread of each preset's mIoU: the run-to-run noise that a gap
between two presets has to beat.

Usage: python bench/quality.py [--out bench/out] [--train 3000] [--val 500] [--epochs 4] [--lr 0.05]
                               [--presets cam,amr-block] [--train-seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from amrseg.cli import main as amrseg  # noqa: E402


def run(*args: str) -> None:
    code = amrseg([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"amrseg {' '.join(map(str, args))} failed with exit {code}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/out")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--presets", default="cam,amr,amr-block,amr-gtm,amr-official")
    p.add_argument("--seed", type=int, default=1, help="seed of the scenes")
    p.add_argument("--train-seeds", default="0", help="train-cam --seed of each run, comma-separated")
    p.add_argument("--scales", default="1.0,0.5,1.5")
    p.add_argument("--set", action="append", default=[], help="extra train-cam --set for every preset")
    a = p.parse_args()
    out = Path(a.out)
    scenes, backbone = out / f"scenes-s{a.seed}", out / "backbone.pt"
    if not (scenes / "ImageSets/Segmentation/val.txt").exists():
        run("build-fashion-scenes", scenes, "--train", a.train, "--val", a.val, "--seed", a.seed)
    if not backbone.exists():
        run("pretrain-backbone", "--out", backbone, "--backbone", "resnet18", "--base-width", 32, "--epochs", 2,
            "--items", 16000, "--size", 96)
    recipe = ["--backbone", "resnet18", "--base-width", "32", "--pretrained", str(backbone), "--crop", "128",
              "--batch-size", "16", "--epochs", str(a.epochs), "--lr", str(a.lr)]
    for s in a.set:
        recipe += ["--set", s]
    rows, xi_rows = [], []
    names = None
    by_preset: dict[str, list[float]] = {}
    runs = [(preset, int(seed)) for seed in a.train_seeds.split(",") for preset in a.presets.split(",")]
    for preset, seed in runs:
        seed_tag = "" if seed == 0 else f"-seed{seed}"  # seed 0 keeps the single-run names
        tag = preset + seed_tag + ("" if not a.set else "+" + "+".join(a.set))
        run_dir, cams = out / f"run-{tag}", out / f"cams-{tag}"
        t0, train_s = time.perf_counter(), None  # None: a finished run was reused
        if not (run_dir / "model.pt").exists():
            resume = ["--resume"] if (run_dir / "checkpoint.pt").exists() else []
            init = ["--init-spotlight", out / f"run-cam{seed_tag}"] if preset == "amr-official" else []
            run("train-cam", "--data", scenes, "--split", "train", "--preset", preset, "--out", run_dir, *recipe,
                "--seed", seed, *init, *resume)
            train_s = time.perf_counter() - t0
        run("make-cam", "--run", run_dir, "--data", scenes, "--split", "val", "--out", cams, "--scales", a.scales,
            "--save-branches")
        metrics = out / f"metrics-{tag}.json"
        run("eval-cam", "--cams", cams, "--data", scenes, "--split", "val", "--sweep", "0.05:0.70:0.05",
            "--out", metrics)
        m = json.loads(metrics.read_text())
        names = [n for n in m["iou"] if n != "background"]
        rows.append((tag, m["threshold"], m["miou"], [m["iou"][n] for n in ["background", *names]], train_s))
        by_preset.setdefault(preset, []).append(m["miou"])
        if preset != "cam":
            xi_json = out / f"xi-{tag}.json"
            run("eval-cam", "--cams", cams, "--data", scenes, "--split", "val", "--sweep", "0.05:0.70:0.05",
                "--xi-sweep", "0:1:0.1", "--out", xi_json)
            xi_rows.append((tag, json.loads(xi_json.read_text())["xi_sweep"]))

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = [f"CAM quality on {a.val} val scenes (Fashion-MNIST t10k items), resnet18 width 32, 128 px, "
             f"{a.train} train scenes x {a.epochs} epochs, lr {a.lr}, scales {a.scales} + flip.", "",
             "| preset | best threshold | mIoU | " + " | ".join(["bg", *names]) + " | train s |",
             "|---" * (len(names) + 5) + "|"]
    for tag, t, miou, ious, secs in rows:
        secs = "-" if secs is None else f"{secs:.0f}"
        lines.append(f"| {tag} | {t:.2f} | **{pct(miou)}** | " + " | ".join(pct(v) for v in ious) + f" | {secs} |")
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
    (out / "quality.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
