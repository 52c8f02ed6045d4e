"""The `amrseg` command: a thin shell that parses flags, calls one stage function and prints.

Bad input ends in one line on stderr naming the file or flag, and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import AmrsegError
from .fileio import check_writable_dir, check_writable_file


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


def cmd_fetch_art(a) -> int:
    from .data.emoji_art import fetch_art

    if a.dir:
        check_writable_dir(a.dir, "DIR")
    print(json.dumps(fetch_art(a.dir, tarballs=a.tarballs)))
    return 0


# build-scenes defaults per --source (build-fashion-scenes keeps the fashion ones).
SCENE_DEFAULTS = {"emoji": {"train": 10000, "val": 1000, "size": 192},
                  "fashion": {"train": 8000, "val": 1000, "size": 128}}


def _only_for(a, source: str, flags: dict) -> None:
    for flag, value in flags.items():
        if value is not None:
            raise AmrsegError(f"{flag}: only for --source {source} (got --source {a.source})")


def cmd_build_scenes(a) -> int:
    from .runtime import progress

    check_writable_dir(a.out, "OUT")
    for key, value in SCENE_DEFAULTS[a.source].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    with progress(total=a.train + a.val, desc=f"build-scenes {a.source}", unit="img") as bar:
        if a.source == "emoji":
            from .data.emoji_scenes import DEFAULT_CONTEXT_PROB, build_emoji_scenes

            _only_for(a, "fashion", {"--fmnist": a.fmnist})
            summary = build_emoji_scenes(
                a.out, art=a.art, n_train=a.train, n_val=a.val, size=a.size, seed=a.seed,
                context_prob=DEFAULT_CONTEXT_PROB if a.context_prob is None else a.context_prob, progress=bar.update)
        else:
            from .data.fashion import build_scenes

            _only_for(a, "emoji", {"--art": a.art, "--context-prob": a.context_prob})
            summary = build_scenes(a.out, fmnist=a.fmnist, n_train=a.train, n_val=a.val, size=a.size, seed=a.seed,
                                   progress=bar.update)
    print(json.dumps(summary))
    return 0


def cmd_pretrain_backbone(a) -> int:
    from .engine.pretrain import PretrainConfig, pretrain_backbone

    check_writable_file(a.out, "--out")
    if a.source == "emoji":
        _only_for(a, "fashion", {"--fmnist": a.fmnist})
    else:
        _only_for(a, "emoji", {"--art": a.art})
    cfg = PretrainConfig.for_source(a.source, backbone=a.backbone, base_width=a.base_width, epochs=a.epochs,
                                    size=a.size, items=a.items, batch_size=a.batch_size, seed=a.seed,
                                    device=a.device)
    print(json.dumps(pretrain_backbone(a.out, cfg, fmnist=a.fmnist, art=a.art)))
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
        _check_weights(pretrained, "--pretrained")
        flags.setdefault("model", {})["pretrained"] = str(Path(pretrained).resolve())
    if getattr(a, "init_spotlight", None):
        _check_weights(a.init_spotlight, "--init-spotlight")
    return flags


def _check_weights(path: str, flag: str) -> None:
    """A file given as weights must be one torch.save wrote (a folder is a run: checked later)."""
    from .fileio import check_weights_file

    if Path(path).is_file():
        check_weights_file(Path(path), flag)


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
                       adv_steps=a.adv_steps, adv_climb=a.adv_climb, overwrite=a.overwrite)
    check_writable_dir(a.out, "--out")
    print(json.dumps(make_cams(Path(a.run), a.data, a.split, Path(a.out), icfg)))
    return 0


def cmd_eval_cam(a) -> int:
    from .data.voc import open_dataset
    from .runtime import pick_device
    from .eval.eval_cam import evaluate_cams, parse_range
    from .fileio import write_text

    if a.sweep and a.threshold is not None:
        raise AmrsegError("--sweep and --threshold: give one of them")
    thresholds = parse_range(a.sweep, "--sweep") if a.sweep else [a.threshold if a.threshold is not None else 0.2]
    xis = parse_range(a.xi_sweep, "--xi-sweep") if a.xi_sweep else None
    device = pick_device(a.device)
    if a.out:
        check_writable_file(a.out, "--out")
    data = open_dataset(a.data, a.split, require_labels=False)
    result = evaluate_cams(Path(a.cams), data, thresholds, xi_values=xis, device=device, progress=None)
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
    check_writable_dir(a.out, "--out")
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
    if a.out:
        check_writable_file(a.out, "--out")
    if a.save:
        check_writable_dir(a.save, "--save")
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

    check_writable_dir(a.out, "--out")
    print(json.dumps(predict(Path(a.run), Path(a.input), Path(a.out), fmt=a.format,
                             scales=_floats(a.scales, "--scales"), crf=a.crf, device=a.device,
                             overwrite=a.overwrite)))
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
                            device=a.device, overwrite=a.overwrite)
    check_writable_dir(a.out, "--out")
    data = open_dataset(a.data, a.split, require_labels=False)
    summary, warnings = make_pseudo_labels(Path(a.cams), data, Path(a.out), cfg)
    for w in warnings:
        print(f"amrseg: warning: {w}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


# --------------------------------------------------------------------------- parser

OVERWRITE_HELP = ("remove the outputs already in --out and make them all again (default: keep the ones made with "
                  "the same settings, refuse a folder made with other settings)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (CONTRACT: bad input is one line naming the flag); the
    subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default after its help, unless the help already states it in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []  # 0 is a default
        if ("default" not in text.lower() and not action.required and not unset
                and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


# One paragraph per command, shown by `amrseg COMMAND --help`.
DESCRIPTIONS = {
    "dataset-info": "Opens a split of a VOC-style dataset (see README 'Your own data') and prints one JSON "
                    "object: the number of images and classes, the class names and how many images show each "
                    "class. A quick check that a dataset root is laid out as amrseg expects.",
    "fetch-art": "Downloads the open emoji art (Twemoji and Noto, npm packages emoji-datasource-twitter and "
                 "emoji-datasource-google 16.0.0) with the npm client into DIR, for build-scenes --source emoji "
                 "and pretrain-backbone --source emoji. Needs npm and the network once; everything after it "
                 "runs offline.",
    "build-scenes": "Writes a VOC-style dataset of synthetic scenes (JPEG images, palette PNG masks, train and "
                    "val split lists, classes.txt, cls_labels.csv) into OUT: emoji-VOC, the 20 VOC classes drawn "
                    "from emoji art with context and clutter, or Fashion-MNIST items on cluttered backgrounds. "
                    "The same seed gives the same bytes. These are the CPU demo's data.",
    "build-fashion-scenes": "The same as 'build-scenes --source fashion': writes VOC-style scenes of 1-3 tinted "
                            "Fashion-MNIST items on cluttered backgrounds into OUT (the built-in CPU demo data).",
    "pretrain-backbone": "The CPU stand-in for ImageNet pretraining: trains a small ResNet from scratch to "
                         "classify single emoji or Fashion-MNIST items on cluttered backgrounds, and writes a "
                         "torchvision-named state dict that --pretrained of the training commands accepts. On "
                         "a GPU with real data, use --pretrained imagenet instead.",
    "train-cam": "Trains the classifier whose class activation maps (CAMs) become the pseudo labels, from "
                 "image-level labels only: the plain CAM baseline (--preset cam) or AMR's two-branch network "
                 "(the amr* presets). Writes RUN/config.yaml, checkpoint.pt (every epoch, every "
                 "train.checkpoint_every steps and every train.checkpoint_minutes), model.pt and log.csv. "
                 "Interrupt it any time and run the same command with --resume to continue bit-exactly.",
    "make-cam": "Computes the CAMs of a train-cam run for every image of a split (or a plain folder of "
                "images) and writes CAMS/<id>.npz atomically: multi-scale, flipped, fused over the two branches "
                "with weight --xi, each map max-normalised to 1. Finished images are skipped, so an "
                "interrupted run continues where it stopped.",
    "eval-cam": "Scores CAMs against the ground-truth masks: a background plane at each threshold, argmax, "
                "mIoU from one confusion matrix over the split. --sweep scores many thresholds in one pass "
                "and reports the best. Prints the JSON (and writes it to --out).",
    "visualize": "Draws, for the first --limit images, the image, its mask, each class's CAM and the "
                 "thresholded prediction as PNG panels, with an index.html gallery (and a per-class IoU chart "
                 "when --metrics gives eval-cam's JSON).",
    "train-seg": "Trains DeepLab-v2 (ResNet-101 by default) on pseudo masks, pixels labelled 255 ignored: the "
                 "last step of the weakly supervised pipeline. Same run directory, resume and logging as "
                 "train-cam.",
    "eval-seg": "Scores segmentation masks against the ground truth (mIoU): a folder of PNG masks (--pred, "
                "e.g. pseudo masks), or a train-seg run that predicts the split first (--run, with optional "
                "multi-scale and dense CRF).",
    "predict": "Segments any JPEG/PNG images with a train-seg run: palette masks and overlays, or the PASCAL "
               "VOC evaluation server's layout with a tar.gz ready to upload (--format voc-test).",
    "train-irn": "Trains IRN's boundary and displacement branches on IR labels (pseudo-labels --method crf) "
                 "over frozen backbone features; pseudo-labels --method irn then propagates the CAMs with a "
                 "random walk on the learned boundaries. Same run directory and resume as train-cam.",
    "pseudo-labels": "Turns CAMs into pixel labels: --method crf writes IR labels (confident foreground and "
                     "background from two thresholds, refined by a dense CRF, 255 where unsure) to train IRN "
                     "on; --method irn writes the final pseudo masks by a random walk with a train-irn run. "
                     "Finished images are skipped.",
}


def _finish_parser(sub: argparse._SubParsersAction) -> None:
    """Every command: the default-showing help formatter and its description paragraph."""
    for name, parser in sub.choices.items():
        parser.formatter_class = _HelpFormatter
        if name in DESCRIPTIONS:
            parser.description = DESCRIPTIONS[name]


DATA_HELP = "dataset root in the VOC layout (README 'Your own data')"
SPLIT_HELP = "split name: ROOT/ImageSets/Segmentation/SPLIT.txt (VOC 2012: the shipped train, train_aug, val, test)"
TRAIN_SPLIT_HELP = "the training split: ROOT/ImageSets/Segmentation/SPLIT.txt (VOC 2012: train_aug, 10,582 images)"
SET_HELP = "override any config field by dotted name (repeatable; default: none; the fields: README 'Configuration'), "
DEVICE_HELP = "auto: a CUDA GPU when there is one, else the CPU; cuda: a CUDA GPU or an error (default auto)"


def _add_training_flags(s, d, backbone: str, pretrained: str, crop: str, lr: str, set_example: str) -> None:
    """The flags train-cam, train-irn and train-seg share (--out ... --set); `d` is the command's default
    config, whose values the help shows (a flag not given leaves the config's value)."""
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                   help=f"{backbone} (default {d.model.backbone})")
    s.add_argument("--base-width", type=int, help=f"channels of the ResNet stem; 64 = the standard nets, "
                   f"less for CPU runs (default {d.model.base_width})")
    s.add_argument("--pretrained", help=pretrained)
    s.add_argument("--epochs", type=int, help=f"training epochs (default {d.train.epochs})")
    s.add_argument("--batch-size", type=int, help=f"images per step, over all processes "
                   f"(default {d.train.batch_size})")
    s.add_argument("--crop", type=int, help=f"{crop} (default {d.data.crop})")
    s.add_argument("--lr", type=float, help=f"{lr} (default {d.train.lr:g})")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help=DEVICE_HELP)
    s.add_argument("--seed", type=int, help=f"seed of the initial weights, sample order and "
                   f"augmentation (default {d.train.seed})")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint "
                   "(without it, a folder that holds a run is refused)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP + set_example)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import PRESETS, Config, IRNConfig, SegConfig

    # The defaults the help texts show come from the config dataclasses themselves.
    run_defaults = {"train-cam": Config(), "train-irn": IRNConfig(), "train-seg": SegConfig()}

    p = _Parser(prog="amrseg", description="Weakly supervised semantic segmentation with AMR.")
    p.add_argument("--version", action="version", version=f"amrseg {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("dataset-info", help="summarise a VOC-style dataset split as JSON")
    s.add_argument("--data", required=True, help="dataset root (VOC layout)")
    s.add_argument("--split", required=True, help=SPLIT_HELP)
    s.set_defaults(func=cmd_dataset_info)

    s = sub.add_parser("fetch-art", help="get the open emoji art (Twemoji, Noto) for emoji-VOC with npm")
    s.add_argument("dir", nargs="?", help="art folder (default $AMRSEG_ART, else ~/.cache/amrseg/emoji-art)")
    s.add_argument("--tarballs", nargs="+", metavar="TGZ",
                   help="use these downloaded emoji-datasource-{twitter,google}-16.0.0.tgz instead of npm "
                        "(default: run npm pack)")
    s.set_defaults(func=cmd_fetch_art)

    art_help = "emoji art folder (default $AMRSEG_ART, else ~/.cache/amrseg/emoji-art; 'amrseg fetch-art' fills it)"
    fmnist_help = "folder with the Fashion-MNIST IDX files (default $AMRSEG_FMNIST, else " \
                  "/usr/share/datasets/fashion-mnist)"
    for name in ("build-scenes", "build-fashion-scenes"):
        fashion_only = name == "build-fashion-scenes"
        s = sub.add_parser(name, help="write the built-in VOC-style demo scenes (alias of build-scenes --source "
                                      "fashion)" if fashion_only else
                           "write a VOC-style scenes dataset: emoji-VOC (the 20 VOC classes from emoji art) or "
                           "Fashion-MNIST scenes")
        s.add_argument("out", metavar="OUT", help="folder to write the dataset into (VOC layout)")
        if fashion_only:
            s.set_defaults(source="fashion", art=None, context_prob=None)
        else:
            s.add_argument("--source", required=True, choices=["emoji", "fashion"],
                           help="emoji: emoji-VOC; fashion: Fashion-MNIST items")
            s.add_argument("--art", help=art_help)
            s.add_argument("--context-prob", type=float,
                           help="emoji: mean probability that an object brings its class's context emoji; each "
                                "image draws its own rate around it (default 0.5)")
        s.add_argument("--fmnist", help=fmnist_help)
        s.add_argument("--train", type=int, help="train images (default 10000 emoji, 8000 fashion)" if not fashion_only
                       else "train images (default 8000)")
        s.add_argument("--val", type=int, help="val images (default 1000)")
        s.add_argument("--size", type=int, help="image side in pixels (default 192 emoji, 128 fashion)"
                       if not fashion_only else "image side in pixels (default 128)")
        s.add_argument("--seed", type=int, default=0, help="the seed: same seed, same bytes (default 0)")
        s.set_defaults(func=cmd_build_scenes)

    s = sub.add_parser("pretrain-backbone", help="pretrain a small backbone on single emoji (all ~1,900 of both "
                                                 "vendors) or Fashion-MNIST items: the CPU stand-in for ImageNet")
    s.add_argument("--out", required=True, help="weights file to write (torchvision names)")
    s.add_argument("--source", default="fashion", choices=["emoji", "fashion"],
                   help="emoji: classify every emoji of the art; fashion: the 10 Fashion-MNIST classes "
                        "(default fashion)")
    s.add_argument("--art", help=art_help)
    s.add_argument("--fmnist", help=fmnist_help)
    s.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                   help="ResNet depth; train with the same one")
    s.add_argument("--base-width", type=int, default=32, help="channels of the ResNet stem (64 = the standard nets)")
    s.add_argument("--epochs", type=int, help="epochs (default 5 emoji, 2 fashion)")
    s.add_argument("--size", type=int, help="image side in pixels (default 64 emoji, 96 fashion)")
    s.add_argument("--items", type=int, help="training items per epoch (default 40000 emoji, 12000 fashion)")
    s.add_argument("--batch-size", type=int, help="batch size (default 32 emoji, 64 fashion)")
    s.add_argument("--seed", type=int, default=0, help="seed of the weights, items and backgrounds")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help=DEVICE_HELP)
    s.set_defaults(func=cmd_pretrain_backbone)

    s = sub.add_parser("train-cam", help="train the AMR network (or the plain CAM) on image-level labels")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--split", required=True, help=TRAIN_SPLIT_HELP)
    s.add_argument("--preset", required=True, choices=PRESETS,
                   help="cam: the plain CAM baseline; amr: AMR with one AMM after each stage (the paper); "
                        "amr-block: AMMs in every block (the release's placement, the best in the README's "
                        "quality table); amr-official: the authors' release; amr-gtm: amr + threshold modulation "
                        "and area regulariser (README 'The presets')")
    _add_training_flags(s, run_defaults["train-cam"], "ResNet depth of both branches",
                        "backbone weights: PATH (torch.save state dict) | URL | imagenet | none (default imagenet)",
                        "side of the square training crop in pixels",
                        "learning rate of the pretrained backbone; new layers get it x train.new_lr_mult",
                        "e.g. --set amm.threshold=0.1")
    s.add_argument("--init-spotlight", help="RUN dir or model.pt of a trained `cam` run (amr-official; "
                                            "the release trains that run with cutout: train it with "
                                            "--set data.cutout=true). Default: none")
    s.set_defaults(func=cmd_train_cam)

    s = sub.add_parser("make-cam", help="compute CAMs of a trained run for a split")
    s.add_argument("--run", "--run-dir", required=True, metavar="RUN",
                   help="the train-cam run directory (--run-dir: the same, for torchrun, which takes --run "
                        "as its own --run-path)")
    s.add_argument("--data", required=True, help="dataset root, or a plain folder of images")
    s.add_argument("--split", default="train", help="the split to compute CAMs for")
    s.add_argument("--out", required=True, help="CAMS folder for the <id>.npz files")
    s.add_argument("--method", default="cam", choices=["cam", "gradcam", "advcam"],
                   help="cam: the CAM itself (the method of every figure in the README); gradcam: Grad-CAM; "
                        "advcam: anti-adversarial climbing, the release's default, --adv-steps forward and "
                        "backward passes per scale")
    s.add_argument("--scales", default="1.0,0.5,1.5,2.0", help="image scales, each with its flip, summed")
    s.add_argument("--xi", type=float, default=0.5, help="weight of the spotlight CAM (default 0.5)")
    s.add_argument("--batch-size", type=int, default=8, help="images per forward pass where sizes allow "
                   "(default 8)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help=DEVICE_HELP)
    s.add_argument("--save-branches", action="store_true", help="also store each branch's maps (for --xi-sweep)")
    s.add_argument("--score-threshold", type=float, default=0.5,
                   help="unlabelled images: classes with sigmoid score above this (default 0.5)")
    s.add_argument("--adv-steps", type=int, default=27, help="advcam: climbing steps (default 27)")
    s.add_argument("--adv-climb", default="branch", choices=["branch", "joint"],
                   help="advcam: one climb per branch, each on its own objective (the release), or one "
                        "climb on the sum of both branches' objectives (default branch)")
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.set_defaults(func=cmd_make_cam)

    s = sub.add_parser("eval-cam", help="score CAMs against the masks (mIoU)")
    s.add_argument("--cams", required=True, help="CAMS folder of make-cam")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--split", required=True, help="the split to score (its images need masks; VOC seeds: train)")
    s.add_argument("--threshold", type=float, help="background threshold (default 0.2 without --sweep)")
    s.add_argument("--sweep", help="LO:HI:STEP background thresholds, all scored in one pass "
                   "(default: none, one --threshold)")
    s.add_argument("--xi-sweep", help="LO:HI:STEP spotlight weights (needs make-cam --save-branches; "
                   "default: none, the stored fused maps)")
    s.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="where the confusion matrices are counted; cuda needs a CUDA device")
    s.add_argument("--out", help="write the JSON here too (default: stdout only)")
    s.set_defaults(func=cmd_eval_cam)

    s = sub.add_parser("visualize", help="PNG panels and an HTML gallery of CAMs")
    s.add_argument("--cams", required=True, help="CAMS folder of make-cam")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--split", required=True, help="the split whose CAMs to draw")
    s.add_argument("--out", required=True, help="folder for the panels and index.html")
    s.add_argument("--limit", type=int, help="draw only the first N images (default: all)")
    s.add_argument("--threshold", type=float, help="background threshold (default: the metrics' best, else 0.2)")
    s.add_argument("--metrics", help="eval-cam JSON: adds the mIoU and a per-class IoU chart (default: none)")
    s.set_defaults(func=cmd_visualize)
    s = sub.add_parser("train-seg", help="train DeepLab-v2 on pseudo masks (255 ignored)")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--labels", required=True, help="folder of pseudo-mask PNGs (<id>.png)")
    s.add_argument("--split", required=True, help=TRAIN_SPLIT_HELP)
    _add_training_flags(s, run_defaults["train-seg"], "ResNet depth of DeepLab-v2",
                        "backbone weights: PATH (torch.save state dict) | URL | imagenet | none (default imagenet)",
                        "side of the square training crop in pixels",
                        "learning rate of the pretrained backbone; new layers get it x train.new_lr_mult",
                        "e.g. --set model.output_stride=16")
    s.set_defaults(func=cmd_train_seg)

    s = sub.add_parser("eval-seg", help="score segmentation masks (a folder, or a train-seg run) against the masks")
    s.add_argument("--pred", help="folder of predicted PNG masks (<id>.png); give --pred or --run (default: none)")
    s.add_argument("--run", "--run-dir", metavar="RUN", help="train-seg run: predict and score in one go "
                   "(--run-dir: the same, for torchrun; default: none)")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--split", required=True, help="the split to score (its images need masks)")
    s.add_argument("--scales", default="1.0", help="with --run: e.g. 1.0,0.5,1.5 (each with its flip)")
    s.add_argument("--crf", action="store_true", help="with --run: refine with a dense CRF ('crf' extra)")
    s.add_argument("--save", help="with --run: also write the masks here (default: not written)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help=DEVICE_HELP)
    s.add_argument("--out", help="write the JSON here too (default: stdout only)")
    s.set_defaults(func=cmd_eval_seg)

    s = sub.add_parser("predict", help="segment any JPEG/PNG images with a train-seg run")
    s.add_argument("--run", "--run-dir", required=True, metavar="RUN",
                   help="the train-seg run directory (--run-dir: the same, for torchrun)")
    s.add_argument("--input", required=True, help="an image file or a folder of images")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--format", default="png", choices=["png", "voc-test"],
                   help="png: masks + overlays; voc-test: the evaluation server's layout + tar.gz")
    s.add_argument("--scales", default="1.0", help="image scales, each with its flip, averaged (e.g. 1.0,0.5,1.5)")
    s.add_argument("--crf", action="store_true", help="refine with a dense CRF (the 'crf' extra)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help=DEVICE_HELP)
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("train-irn", help="train IRN's boundary and displacement branches on IR labels")
    s.add_argument("--cams", required=True, help="the CAM folder the IR labels came from (recorded in the config)")
    s.add_argument("--ir-labels", required=True, help="folder of IR label PNGs (pseudo-labels --method crf)")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--split", required=True, help=TRAIN_SPLIT_HELP)
    _add_training_flags(s, run_defaults["train-irn"], "ResNet depth of the frozen backbone",
                        "PATH | URL | imagenet | none | a train-cam RUN (its spotlight backbone); default imagenet",
                        "side of the training crop, a multiple of 4",
                        "boundary branch; displacement x train.new_lr_mult", "e.g. --set model.radius=10")
    s.set_defaults(func=cmd_train_irn)

    s = sub.add_parser("pseudo-labels", help="IR labels (crf) or IRN pseudo masks (irn) from CAMs")
    s.add_argument("--cams", required=True, help="CAMS folder of make-cam")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--split", required=True, help="the split to label (VOC: train_aug)")
    s.add_argument("--out", required=True,
                   help="folder for the <id>.png labels and the config.yaml that made them (finished images "
                        "are skipped)")
    s.add_argument("--method", required=True, choices=["crf", "irn"],
                   help="crf: IR labels for train-irn; irn: pseudo masks by the random walk (needs --irn)")
    s.add_argument("--workers", type=int, help="crf: processes; irn: image loaders (default min(4, CPUs))")
    s.add_argument("--bg-threshold", type=float,
                   help="crf: low CAM threshold (default by CAM method: 0.05 cam/gradcam, 0.33 advcam); "
                        "irn: background plane (default 0.25)")
    s.add_argument("--fg-threshold", type=float,
                   help="crf: high CAM threshold (default 0.30 cam/gradcam, 0.60 advcam)")
    s.add_argument("--cam-method", choices=["cam", "gradcam", "advcam"],
                   help="the CAMs' method, for the default thresholds (crf) and cam power (irn) "
                        "(default: CAMS/cams.json)")
    s.add_argument("--no-crf", action="store_true", help="crf: thresholded CAMs without the dense CRF")
    s.add_argument("--irn", help="irn: the train-irn run (default: none; required by --method irn)")
    s.add_argument("--cam-power", type=float,
                   help="irn: CAMs raised to this power before the walk (default: the one that goes with the "
                        "CAM method's IR thresholds: 1.5 advcam (0.60/0.33), 1 cam/gradcam (0.30/0.05))")
    s.add_argument("--radius", type=int, help="irn: affinity radius at stride 4 (default 5)")
    s.add_argument("--beta", type=float, help="irn: affinity exponent (default 10)")
    s.add_argument("--exp-times", type=int, help="irn: the walk takes 2^N steps (default 8)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="irn: default auto")
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.set_defaults(func=cmd_pseudo_labels)
    _finish_parser(sub)
    return p


def _one_line(exc: BaseException) -> str:
    """An AmrsegError re-raised from a DataLoader worker carries the worker's traceback: keep the message."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(exc).__name__
    for prefix in ("amrseg.errors.AmrsegError: ", "AmrsegError: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
    return last


def _quiet_stdout() -> None:
    """After a broken pipe: stdout to /dev/null, so the interpreter's last flush stays silent."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests)
        pass


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
    except BrokenPipeError:  # `amrseg ... | head`: the reader has gone, nothing more to say
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, as the shell reports a tool that the closed pipe stopped
    except OSError as e:  # last resort: a file fault the stage did not name itself
        where = f"{e.filename}: " if e.filename else ""
        print(f"amrseg: error: {where}{e.strerror or _one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
