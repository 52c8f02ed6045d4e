"""The `amrseg` command: a thin shell that parses flags, calls one stage function and prints.

Bad input ends in one line on stderr naming the file or flag, and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import AmrsegError


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AmrsegError(f"{flag} {text!r}: expected comma-separated numbers") from None


# --------------------------------------------------------------------------- commands


def cmd_dataset_info(a) -> int:
    from .data.voc import dataset_info, open_dataset

    print(json.dumps(dataset_info(open_dataset(a.data, a.split)), indent=2))
    return 0


def cmd_build_fashion_scenes(a) -> int:
    from .data.fashion import build_scenes
    from .engine.common import progress

    with progress(total=a.train + a.val, desc="build-fashion-scenes", unit="img") as bar:
        summary = build_scenes(a.out, fmnist=a.fmnist, n_train=a.train, n_val=a.val, size=a.size, seed=a.seed,
                               progress=bar.update)
    print(json.dumps(summary))
    return 0


def cmd_pretrain_backbone(a) -> int:
    from .engine.pretrain import PretrainConfig, pretrain_backbone

    cfg = PretrainConfig(backbone=a.backbone, base_width=a.base_width, epochs=a.epochs, size=a.size,
                         items=a.items, batch_size=a.batch_size, seed=a.seed, device=a.device)
    print(json.dumps(pretrain_backbone(a.out, cfg, fmnist=a.fmnist)))
    return 0


def _train_flags(a, sections: dict) -> dict:
    """Nested config dict of the flags given on the command line (None = not given)."""
    flags: dict = {}
    for section, values in sections.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            flags[section] = given
    pretrained = getattr(a, "pretrained", None)
    if pretrained not in (None, "none", "imagenet") and "://" not in pretrained:
        flags.setdefault("model", {})["pretrained"] = str(Path(pretrained).resolve())
    return flags


def _finish_training(summary: dict, command: str) -> int:
    print(json.dumps(summary))
    if not summary["finished"]:
        print(f"stopped at step {summary['step']}/{summary['total_steps']}; run the same {command} command with "
              f"--resume to finish", file=sys.stderr)
        return 130
    return 0


def cmd_train_cam(a) -> int:
    from .config import resolve
    from .engine.train_cam import train_cam

    flags = _train_flags(a, {
        "model": {"backbone": a.backbone, "base_width": a.base_width, "pretrained": a.pretrained,
                  "init_spotlight": str(Path(a.init_spotlight).resolve()) if a.init_spotlight else None},
        "train": {"epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "device": a.device, "seed": a.seed},
        "data": {"crop": a.crop}})
    flags.update({"data_root": str(Path(a.data).resolve()), "split": a.split})
    cfg = resolve(a.preset, flags, a.set)
    return _finish_training(train_cam(cfg, Path(a.out), resume=a.resume), "train-cam")


def cmd_make_cam(a) -> int:
    from .cam.infer import InferConfig, make_cams

    icfg = InferConfig(method=a.method, scales=_floats(a.scales, "--scales"), xi=a.xi, batch_size=a.batch_size,
                       device=a.device, save_branches=a.save_branches, score_threshold=a.score_threshold,
                       adv_steps=a.adv_steps)
    print(json.dumps(make_cams(Path(a.run), a.data, a.split, Path(a.out), icfg)))
    return 0


def cmd_eval_cam(a) -> int:
    from .data.voc import open_dataset
    from .fileio import write_text
    from .eval.eval_cam import evaluate_cams, parse_range

    if a.sweep and a.threshold is not None:
        raise AmrsegError("--sweep and --threshold: give one of them")
    thresholds = parse_range(a.sweep, "--sweep") if a.sweep else [a.threshold if a.threshold is not None else 0.2]
    xis = parse_range(a.xi_sweep, "--xi-sweep") if a.xi_sweep else None
    data = open_dataset(a.data, a.split, require_labels=False)
    result = evaluate_cams(Path(a.cams), data, thresholds, xi_values=xis, device=a.device, progress=None)
    text = json.dumps(result, indent=2)
    if a.out:
        write_text(a.out, text + "\n")
    print(text)
    return 0


def cmd_visualize(a) -> int:
    from .data.voc import open_dataset
    from .viz import visualize

    metrics = None
    if a.metrics:
        try:
            metrics = json.loads(Path(a.metrics).read_text())
        except (OSError, ValueError) as e:
            raise AmrsegError(f"--metrics {a.metrics}: cannot read JSON ({e})") from None
    threshold = a.threshold if a.threshold is not None else (metrics or {}).get("threshold", 0.2)
    data = open_dataset(a.data, a.split, require_labels=False)
    index, warnings = visualize(Path(a.cams), data, Path(a.out), threshold, limit=a.limit, metrics=metrics,
                                progress=None)
    for w in warnings:
        print(f"amrseg: warning: {w}", file=sys.stderr)
    print(json.dumps({"index": str(index), "threshold": threshold}))
    return 0


def cmd_train_seg(a) -> int:
    from .config import resolve_run
    from .engine.train_seg import train_seg

    flags = _train_flags(a, {
        "model": {"backbone": a.backbone, "base_width": a.base_width, "pretrained": a.pretrained},
        "train": {"epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "device": a.device, "seed": a.seed},
        "data": {"crop": a.crop}})
    flags.update({"data_root": str(Path(a.data).resolve()), "split": a.split, "labels": str(Path(a.labels).resolve())})
    cfg = resolve_run("seg", flags, a.set)
    return _finish_training(train_seg(cfg, Path(a.out), resume=a.resume), "train-seg")


def cmd_eval_seg(a) -> int:
    from .data.voc import open_dataset
    from .fileio import write_text
    from .segment import eval_pred_dir, eval_run

    if (a.pred is None) == (a.run is None):
        raise AmrsegError("--pred and --run: give exactly one of them")
    data = open_dataset(a.data, a.split, require_labels=False)
    if a.pred:
        result = eval_pred_dir(Path(a.pred), data)
    else:
        result = eval_run(Path(a.run), data, _floats(a.scales, "--scales"), device=a.device, crf=a.crf,
                          save=Path(a.save) if a.save else None)
    text = json.dumps(result, indent=2)
    if a.out:
        write_text(a.out, text + "\n")
    print(text)
    return 0


def cmd_predict(a) -> int:
    from .segment import predict

    print(json.dumps(predict(Path(a.run), Path(a.input), Path(a.out), fmt=a.format,
                             scales=_floats(a.scales, "--scales"), crf=a.crf, device=a.device)))
    return 0


def cmd_train_irn(a) -> int:
    from .config import resolve_irn
    from .engine.train_irn import train_irn

    if not Path(a.cams).is_dir():
        raise AmrsegError(f"--cams {a.cams}: not a directory")
    flags = _train_flags(a, {
        "model": {"backbone": a.backbone, "base_width": a.base_width, "pretrained": a.pretrained},
        "train": {"epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "device": a.device, "seed": a.seed},
        "data": {"crop": a.crop}})
    flags.update({"data_root": str(Path(a.data).resolve()), "split": a.split,
                  "ir_labels": str(Path(a.ir_labels).resolve()), "cams": str(Path(a.cams).resolve())})
    cfg = resolve_irn(flags, a.set)
    return _finish_training(train_irn(cfg, Path(a.out), resume=a.resume), "train-irn")


def cmd_pseudo_labels(a) -> int:
    from .data.voc import open_dataset
    from .refine.pseudo_labels import PseudoLabelConfig, make_pseudo_labels

    cfg = PseudoLabelConfig(method=a.method, workers=a.workers, bg_threshold=a.bg_threshold,
                            fg_threshold=a.fg_threshold, cam_method=a.cam_method, crf=not a.no_crf, irn=a.irn,
                            cam_power=a.cam_power, radius=a.radius, beta=a.beta, exp_times=a.exp_times,
                            device=a.device)
    data = open_dataset(a.data, a.split, require_labels=False)
    summary, warnings = make_pseudo_labels(Path(a.cams), data, Path(a.out), cfg)
    for w in warnings:
        print(f"amrseg: warning: {w}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import PRESETS

    p = argparse.ArgumentParser(prog="amrseg", description="Weakly supervised semantic segmentation with AMR.")
    p.add_argument("--version", action="version", version=f"amrseg {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("dataset-info", help="summarise a VOC-style dataset split as JSON")
    s.add_argument("--data", required=True, help="dataset root (VOC layout)")
    s.add_argument("--split", required=True)
    s.set_defaults(func=cmd_dataset_info)

    s = sub.add_parser("build-fashion-scenes", help="write the built-in VOC-style demo scenes")
    s.add_argument("out")
    s.add_argument("--fmnist", help="folder with the Fashion-MNIST IDX files")
    s.add_argument("--train", type=int, default=8000, help="train images (default 8000)")
    s.add_argument("--val", type=int, default=1000, help="val images (default 1000)")
    s.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_build_fashion_scenes)

    s = sub.add_parser("pretrain-backbone", help="pretrain a small backbone on Fashion-MNIST items (CPU stand-in "
                                                 "for ImageNet)")
    s.add_argument("--out", required=True, help="weights file to write (torchvision names)")
    s.add_argument("--fmnist")
    s.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    s.add_argument("--base-width", type=int, default=32)
    s.add_argument("--epochs", type=int, default=2)
    s.add_argument("--size", type=int, default=96)
    s.add_argument("--items", type=int, default=12000, help="training items per epoch (default 12000)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.set_defaults(func=cmd_pretrain_backbone)

    s = sub.add_parser("train-cam", help="train the AMR network (or the plain CAM) on image-level labels")
    s.add_argument("--data", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--preset", required=True, choices=PRESETS)
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    s.add_argument("--base-width", type=int)
    s.add_argument("--pretrained", help="PATH | URL | imagenet | none (default imagenet)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--crop", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--seed", type=int)
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    s.add_argument("--init-spotlight", help="RUN dir or model.pt of a trained `cam` run (amr-official)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field by dotted name, e.g. --set amm.threshold=0.1")
    s.set_defaults(func=cmd_train_cam)

    s = sub.add_parser("make-cam", help="compute CAMs of a trained run for a split")
    s.add_argument("--run", required=True)
    s.add_argument("--data", required=True, help="dataset root, or a plain folder of images")
    s.add_argument("--split", default="train")
    s.add_argument("--out", required=True)
    s.add_argument("--method", default="cam", choices=["cam", "gradcam", "advcam"])
    s.add_argument("--scales", default="1.0,0.5,1.5,2.0")
    s.add_argument("--xi", type=float, default=0.5, help="weight of the spotlight CAM (default 0.5)")
    s.add_argument("--batch-size", type=int, default=8, help="images per forward pass where sizes allow")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--save-branches", action="store_true", help="also store each branch's maps (for --xi-sweep)")
    s.add_argument("--score-threshold", type=float, default=0.5,
                   help="unlabelled images: classes with sigmoid score above this (default 0.5)")
    s.add_argument("--adv-steps", type=int, default=27, help="advcam: climbing steps (default 27)")
    s.set_defaults(func=cmd_make_cam)

    s = sub.add_parser("eval-cam", help="score CAMs against the masks (mIoU)")
    s.add_argument("--cams", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--threshold", type=float)
    s.add_argument("--sweep", help="LO:HI:STEP background thresholds, all scored in one pass")
    s.add_argument("--xi-sweep", help="LO:HI:STEP spotlight weights (needs make-cam --save-branches)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", help="write the JSON here too")
    s.set_defaults(func=cmd_eval_cam)

    s = sub.add_parser("visualize", help="PNG panels and an HTML gallery of CAMs")
    s.add_argument("--cams", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--limit", type=int)
    s.add_argument("--threshold", type=float, help="background threshold (default: the metrics' best, else 0.2)")
    s.add_argument("--metrics", help="eval-cam JSON: adds the mIoU and a per-class IoU chart")
    s.set_defaults(func=cmd_visualize)
    s = sub.add_parser("train-seg", help="train DeepLab-v2 on pseudo masks (255 ignored)")
    s.add_argument("--data", required=True)
    s.add_argument("--labels", required=True, help="folder of pseudo-mask PNGs (<id>.png)")
    s.add_argument("--split", required=True)
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                   help="default resnet101")
    s.add_argument("--base-width", type=int)
    s.add_argument("--pretrained", help="PATH | URL | imagenet | none (default imagenet)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--crop", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--seed", type=int)
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field by dotted name, e.g. --set model.output_stride=16")
    s.set_defaults(func=cmd_train_seg)

    s = sub.add_parser("eval-seg", help="score segmentation masks (a folder, or a train-seg run) against the masks")
    s.add_argument("--pred", help="folder of predicted PNG masks (<id>.png)")
    s.add_argument("--run", help="train-seg run: predict and score in one go")
    s.add_argument("--data", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--scales", default="1.0", help="with --run: e.g. 1.0,0.5,1.5 (each with its flip)")
    s.add_argument("--crf", action="store_true", help="with --run: refine with a dense CRF ('crf' extra)")
    s.add_argument("--save", help="with --run: also write the masks here")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--out", help="write the JSON here too")
    s.set_defaults(func=cmd_eval_seg)

    s = sub.add_parser("predict", help="segment any JPEG/PNG images with a train-seg run")
    s.add_argument("--run", required=True)
    s.add_argument("--input", required=True, help="an image file or a folder of images")
    s.add_argument("--out", required=True)
    s.add_argument("--format", default="png", choices=["png", "voc-test"],
                   help="png: masks + overlays; voc-test: the evaluation server's layout + tar.gz")
    s.add_argument("--scales", default="1.0")
    s.add_argument("--crf", action="store_true")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("train-irn", help="train IRN's boundary and displacement branches on IR labels")
    s.add_argument("--cams", required=True, help="the CAM folder the IR labels came from (recorded in the config)")
    s.add_argument("--ir-labels", required=True, help="folder of IR label PNGs (pseudo-labels --method crf)")
    s.add_argument("--data", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                   help="default resnet50")
    s.add_argument("--base-width", type=int)
    s.add_argument("--pretrained", help="PATH | URL | imagenet | none | a train-cam RUN (its spotlight backbone); "
                                        "default imagenet")
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--crop", type=int, help="a multiple of 4 (default 512)")
    s.add_argument("--lr", type=float, help="boundary branch (default 0.1); displacement x train.new_lr_mult")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--seed", type=int)
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field by dotted name, e.g. --set model.radius=10")
    s.set_defaults(func=cmd_train_irn)

    s = sub.add_parser("pseudo-labels", help="IR labels (crf) or IRN pseudo masks (irn) from CAMs")
    s.add_argument("--cams", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--out", required=True, help="folder for the <id>.png labels (finished images are skipped)")
    s.add_argument("--method", required=True, choices=["crf", "irn"])
    s.add_argument("--workers", type=int, help="crf: processes; irn: image loaders (default min(4, CPUs))")
    s.add_argument("--bg-threshold", type=float,
                   help="crf: low CAM threshold (default by CAM method: 0.05 cam/gradcam, 0.33 advcam); "
                        "irn: background plane (default 0.25)")
    s.add_argument("--fg-threshold", type=float,
                   help="crf: high CAM threshold (default 0.30 cam/gradcam, 0.60 advcam)")
    s.add_argument("--cam-method", choices=["cam", "gradcam", "advcam"],
                   help="crf: the CAMs' method for the default thresholds (default: CAMS/cams.json)")
    s.add_argument("--no-crf", action="store_true", help="crf: thresholded CAMs without the dense CRF")
    s.add_argument("--irn", help="irn: the train-irn run")
    s.add_argument("--cam-power", type=float, help="irn: CAMs raised to this power before the walk (default 1.5)")
    s.add_argument("--radius", type=int, help="irn: affinity radius at stride 4 (default 5)")
    s.add_argument("--beta", type=float, help="irn: affinity exponent (default 10)")
    s.add_argument("--exp-times", type=int, help="irn: the walk takes 2^N steps (default 8)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="irn: default auto")
    s.set_defaults(func=cmd_pseudo_labels)
    return p


def _one_line(exc: BaseException) -> str:
    """An AmrsegError re-raised from a DataLoader worker carries the worker's traceback: keep the message."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(exc).__name__
    for prefix in ("amrseg.errors.AmrsegError: ", "AmrsegError: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
    return last


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AmrsegError as e:
        print(f"amrseg: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("amrseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
