"""The `amrseg` command: a thin shell that parses flags, calls one stage function and prints.

Bad input ends in one line on stderr naming the file or flag, and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from .errors import AmrsegError, one_line


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AmrsegError(f"{flag} {text!r}: expected comma-separated numbers") from None


def _given(a, cfg: Any, **converted) -> dict:
    """The flags typed on the command line, as the stage config's fields: every attribute of the
    parsed arguments named like a field (None and an unset switch mean: not given), then the
    `converted` values (a parsed --scales, a negated switch...)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    flags = {k: v for k, v in vars(a).items() if k in names and v is not None and v is not False}
    flags.update({k: v for k, v in converted.items() if v is not None})
    return flags


def _run_stage(a, flags: dict, preset: Optional[str] = None):
    """The command's resolved config (defaults < flags < --set) and its stage module."""
    from .stages import STAGES

    stage = STAGES[a.command]
    return stage.resolve(flags, a.set, preset), stage.load()


PRETTY = ("eval-cam", "eval-seg", "dataset-info")  # commands that print indented JSON


def _print(summary, warnings=(), pretty: bool = False) -> int:
    for w in warnings:
        print(f"amrseg: warning: {w}", file=sys.stderr)
    print(json.dumps(summary, indent=2 if pretty else None))
    return 0


def cmd_stage(a) -> int:
    """Every stage command but the training ones: flags to config, run, print the summary."""
    from .stages import STAGES

    converted = {"scales": _floats(a.scales, "--scales") if getattr(a, "scales", None) else None}
    if getattr(a, "count_weights", None):
        converted["count_weights"] = _floats(a.count_weights, "--count-weights")
    if getattr(a, "no_crf", False):
        converted["crf"] = False
    if a.command == "build-fashion-scenes":
        a.command = "build-scenes"
        converted["source"] = "fashion"
    cfg, stage = _run_stage(a, _given(a, STAGES[a.command].default_config(), **converted))
    result = stage.run(cfg, resume=True) if getattr(a, "resume", False) else stage.run(cfg)
    summary, warnings = result if isinstance(result, tuple) else (result, [])
    _print(summary, warnings, a.command in PRETTY)
    return _stopped(summary, a.command)


def _stopped(summary: dict, command: str) -> int:
    """130 (and how to go on) for a run stopped before its end (Ctrl-C), else 0."""
    if summary.get("finished", True):
        return 0
    print(f"stopped at step {summary['step']}/{summary['total_steps']}; run the same {command} command with "
          f"--resume to finish", file=sys.stderr)
    return 130


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


def cmd_train(a) -> int:
    """train-cam, train-irn, train-seg: flags to the run config, train, print the summary."""
    model = {"backbone": a.backbone, "base_width": a.base_width, "pretrained": a.pretrained}
    paths = {"data_root": str(Path(a.data).resolve()), "split": a.split}
    if a.command == "train-cam":
        model["init_spotlight"] = str(Path(a.init_spotlight).resolve()) if a.init_spotlight else None
    elif a.command == "train-irn":
        if not Path(a.cams).is_dir():
            raise AmrsegError(f"--cams {a.cams}: not a directory")
        paths.update(ir_labels=str(Path(a.ir_labels).resolve()), cams=str(Path(a.cams).resolve()))
    else:
        paths["labels"] = str(Path(a.labels).resolve())
    flags = _train_flags(a, {
        "model": model,
        "train": {"epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "device": a.device, "seed": a.seed},
        "data": {"crop": a.crop}})
    flags.update(paths)
    cfg, stage = _run_stage(a, flags, getattr(a, "preset", None))
    summary = stage.run(cfg, Path(a.out), resume=a.resume)
    print(json.dumps(summary))
    return _stopped(summary, a.command)


def cmd_run(a) -> int:
    from .pipeline import list_experiments, run_experiment

    if a.list:
        for name, text in list_experiments():
            print(f"{name:12s} {text}")
        return 0
    if not a.experiment:
        raise AmrsegError("EXPERIMENT: give an experiment file or a packaged name (amrseg run --list)")
    print(json.dumps(run_experiment(a.experiment, out=a.out, overrides=a.set, until=a.until)))
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
    "run": "Runs the stages of an experiment file in order into one folder: each step's config "
           "resolved and checked first, finished steps skipped, an interrupted training resumed from its "
           "checkpoint, per-image stages finishing what is missing. Writes report.html (figures, curves, "
           "galleries, every config) and report.json after every step. 'amrseg run demo' is the CPU demo.",
    "pseudo-labels": "Turns CAMs into pixel labels: --method crf writes IR labels (confident foreground and "
                     "background from two thresholds, refined by a dense CRF, 255 where unsure) to train IRN "
                     "on; --method irn writes the final pseudo masks by a random walk with a train-irn run. "
                     "Finished images are skipped.",
}


def _finish_parser(sub: argparse._SubParsersAction) -> None:
    """Every command: the default-showing help formatter, its description paragraph and `--set`."""
    for name, parser in sub.choices.items():
        parser.formatter_class = _HelpFormatter
        if not any("--set" in action.option_strings for action in parser._actions):
            parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                                help="override any field of this command's config by name, e.g. "
                                     "--set threshold=0.3 (repeatable; default: none)")
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
    from .models.backbones import BACKBONES
    from .runtime import DEVICES

    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--backbone", choices=list(BACKBONES),
                   help=f"{backbone} (default {d.model.backbone})")
    s.add_argument("--base-width", type=int, help=f"channels of the ResNet stem; 64 = the standard nets, "
                   f"less for CPU runs (default {d.model.base_width})")
    s.add_argument("--pretrained", help=pretrained)
    s.add_argument("--epochs", type=int, help=f"training epochs (default {d.train.epochs})")
    s.add_argument("--batch-size", type=int, help=f"images per step, over all processes "
                   f"(default {d.train.batch_size})")
    s.add_argument("--crop", type=int, help=f"{crop} (default {d.data.crop})")
    s.add_argument("--lr", type=float, help=f"{lr} (default {d.train.lr:g})")
    s.add_argument("--device", choices=list(DEVICES), help=DEVICE_HELP)
    s.add_argument("--seed", type=int, help=f"seed of the initial weights, sample order and "
                   f"augmentation (default {d.train.seed})")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint "
                   "(without it, a folder that holds a run is refused)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP + set_example)


def _add_cams_flags(s, split_help: str) -> None:
    """--cams, --data and --split: the inputs of the commands that read CAMs."""
    s.add_argument("--cams", required=True, help="CAMS folder of make-cam")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--split", required=True, help=split_help)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .cam.advcam import CLIMBS
    from .cam.methods import CAM_METHODS
    from .config import PRESETS, Config, IRNConfig, SegConfig
    from .models.backbones import BACKBONES
    from .runtime import DEVICES
    from .stages.build_scenes import SOURCES
    from .stages.predict import FORMATS
    from .stages.pseudo_labels import REFINERS

    # The defaults the help texts show come from the config dataclasses themselves.
    run_defaults = {"train-cam": Config(), "train-irn": IRNConfig(), "train-seg": SegConfig()}

    p = _Parser(prog="amrseg", description="Weakly supervised semantic segmentation with AMR.")
    p.add_argument("--version", action="version", version=f"amrseg {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("dataset-info", help="summarise a VOC-style dataset split as JSON")
    s.add_argument("--data", required=True, help="dataset root (VOC layout)")
    s.add_argument("--split", required=True, help=SPLIT_HELP)
    s.set_defaults(func=cmd_stage)

    s = sub.add_parser("fetch-art", help="get the open emoji art (Twemoji, Noto) for emoji-VOC with npm")
    s.add_argument("dir", nargs="?", help="art folder (default $AMRSEG_ART, else ~/.cache/amrseg/emoji-art)")
    s.add_argument("--tarballs", nargs="+", metavar="TGZ",
                   help="use these downloaded emoji-datasource-{twitter,google}-16.0.0.tgz instead of npm "
                        "(default: run npm pack)")
    s.set_defaults(func=cmd_stage)

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
            s.set_defaults(source="fashion", art=None, context_prob=None, object_scale=None, count_weights=None)
        else:
            s.add_argument("--source", required=True, choices=list(SOURCES),
                           help="emoji: emoji-VOC; fashion: Fashion-MNIST items")
            s.add_argument("--art", help=art_help)
            s.add_argument("--context-prob", type=float,
                           help="emoji: mean probability that an object brings its class's context emoji; each "
                                "image draws its own rate around it (default 0.5)")
            s.add_argument("--object-scale", type=float,
                           help="emoji: factor on the objects' size ranges, 0.25-2 (default 1: a lone object's "
                                "long side 45-100%% of the image)")
            s.add_argument("--count-weights",
                           help="emoji: probabilities of 1, 2 and 3 objects per scene, comma-separated "
                                "(default 0.5,0.3,0.2)")
        s.add_argument("--fmnist", help=fmnist_help)
        s.add_argument("--train", type=int, help="train images (default 10000 emoji, 8000 fashion)" if not fashion_only
                       else "train images (default 8000)")
        s.add_argument("--val", type=int, help="val images (default 1000)")
        s.add_argument("--size", type=int, help="image side in pixels (default 192 emoji, 128 fashion)"
                       if not fashion_only else "image side in pixels (default 128)")
        s.add_argument("--seed", type=int, default=0, help="the seed: same seed, same bytes (default 0)")
        s.set_defaults(func=cmd_stage)

    s = sub.add_parser("pretrain-backbone", help="pretrain a small backbone on single emoji (all ~1,900 of both "
                                                 "vendors) or Fashion-MNIST items: the CPU stand-in for ImageNet")
    s.add_argument("--out", required=True, help="weights file to write (torchvision names)")
    s.add_argument("--source", default="fashion", choices=list(SOURCES),
                   help="emoji: classify every emoji of the art; fashion: the 10 Fashion-MNIST classes "
                        "(default fashion)")
    s.add_argument("--art", help=art_help)
    s.add_argument("--fmnist", help=fmnist_help)
    s.add_argument("--backbone", default="resnet18", choices=list(BACKBONES),
                   help="ResNet depth; train with the same one")
    s.add_argument("--base-width", type=int, default=32, help="channels of the ResNet stem (64 = the standard nets)")
    s.add_argument("--epochs", type=int, help="epochs (default 5 emoji, 2 fashion)")
    s.add_argument("--size", type=int, help="image side in pixels (default 96 emoji, 96 fashion)")
    s.add_argument("--items", type=int, help="training items per epoch (default 24000 emoji, 12000 fashion)")
    s.add_argument("--batch-size", type=int, help="batch size (default 32 emoji, 64 fashion)")
    s.add_argument("--seed", type=int, default=0, help="seed of the weights, items and backgrounds")
    s.add_argument("--device", default="auto", choices=list(DEVICES), help=DEVICE_HELP)
    s.add_argument("--resume", action="store_true", help="continue the run of OUT.run/ from its checkpoint "
                   "(without it, an existing OUT.run/ is refused)")
    s.set_defaults(func=cmd_stage)

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
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("make-cam", help="compute CAMs of a trained run for a split")
    s.add_argument("--run", "--run-dir", required=True, metavar="RUN",
                   help="the train-cam run directory (--run-dir: the same, for torchrun, which takes --run "
                        "as its own --run-path)")
    s.add_argument("--data", required=True, help="dataset root, or a plain folder of images")
    s.add_argument("--split", default="train", help="the split to compute CAMs for")
    s.add_argument("--out", required=True, help="CAMS folder for the <id>.npz files")
    s.add_argument("--method", default="cam", choices=list(CAM_METHODS),
                   help="cam: the CAM itself (the method of every figure in the README); gradcam: Grad-CAM; "
                        "advcam: anti-adversarial climbing, the release's default, --adv-steps forward and "
                        "backward passes per scale")
    s.add_argument("--scales", default="1.0,0.5,1.5,2.0", help="image scales, each with its flip, summed")
    s.add_argument("--xi", type=float, default=0.5, help="weight of the spotlight CAM (default 0.5)")
    s.add_argument("--batch-size", type=int, default=8, help="images per forward pass where sizes allow "
                   "(default 8)")
    s.add_argument("--device", default="auto", choices=list(DEVICES), help=DEVICE_HELP)
    s.add_argument("--save-branches", action="store_true", help="also store each branch's maps (for --xi-sweep)")
    s.add_argument("--score-threshold", type=float, default=0.5,
                   help="unlabelled images: classes with sigmoid score above this (default 0.5)")
    s.add_argument("--adv-steps", type=int, default=27, help="advcam: climbing steps (default 27)")
    s.add_argument("--adv-climb", default="branch", choices=list(CLIMBS),
                   help="advcam: one climb per branch, each on its own objective (the release), or one "
                        "climb on the sum of both branches' objectives (default branch)")
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.set_defaults(func=cmd_stage)

    s = sub.add_parser("eval-cam", help="score CAMs against the masks (mIoU)")
    _add_cams_flags(s, "the split to score (its images need masks; VOC seeds: train)")
    s.add_argument("--threshold", type=float, help="background threshold (default 0.2 without --sweep)")
    s.add_argument("--sweep", help="LO:HI:STEP background thresholds, all scored in one pass "
                   "(default: none, one --threshold)")
    s.add_argument("--xi-sweep", help="LO:HI:STEP spotlight weights (needs make-cam --save-branches; "
                   "default: none, the stored fused maps)")
    s.add_argument("--device", default="cpu", choices=list(DEVICES),
                   help="where the confusion matrices are counted; cuda needs a CUDA device")
    s.add_argument("--out", help="write the JSON here too (default: stdout only)")
    s.set_defaults(func=cmd_stage)

    s = sub.add_parser("visualize", help="PNG panels and an HTML gallery of CAMs")
    _add_cams_flags(s, "the split whose CAMs to draw")
    s.add_argument("--out", required=True, help="folder for the panels and index.html")
    s.add_argument("--limit", type=int, help="draw only the first N images (default: all)")
    s.add_argument("--threshold", type=float, help="background threshold (default: the metrics' best, else 0.2)")
    s.add_argument("--metrics", help="eval-cam JSON: adds the mIoU and a per-class IoU chart (default: none)")
    s.set_defaults(func=cmd_stage)
    s = sub.add_parser("train-seg", help="train DeepLab-v2 on pseudo masks (255 ignored)")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--labels", required=True, help="folder of pseudo-mask PNGs (<id>.png)")
    s.add_argument("--split", required=True, help=TRAIN_SPLIT_HELP)
    _add_training_flags(s, run_defaults["train-seg"], "ResNet depth of DeepLab-v2",
                        "backbone weights: PATH (torch.save state dict) | URL | imagenet | none (default imagenet)",
                        "side of the square training crop in pixels",
                        "learning rate of the pretrained backbone; new layers get it x train.new_lr_mult",
                        "e.g. --set model.output_stride=16")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval-seg", help="score segmentation masks (a folder, or a train-seg run) against the masks")
    s.add_argument("--pred", help="folder of predicted PNG masks (<id>.png); give --pred or --run (default: none)")
    s.add_argument("--run", "--run-dir", metavar="RUN", help="train-seg run: predict and score in one go "
                   "(--run-dir: the same, for torchrun; default: none)")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--split", required=True, help="the split to score (its images need masks)")
    s.add_argument("--scales", default="1.0", help="with --run: e.g. 1.0,0.5,1.5 (each with its flip)")
    s.add_argument("--crf", action="store_true", help="with --run: refine with a dense CRF ('crf' extra)")
    s.add_argument("--save", help="with --run: also write the masks here (default: not written)")
    s.add_argument("--device", default="auto", choices=list(DEVICES), help=DEVICE_HELP)
    s.add_argument("--out", help="write the JSON here too (default: stdout only)")
    s.set_defaults(func=cmd_stage)

    s = sub.add_parser("predict", help="segment any JPEG/PNG images with a train-seg run")
    s.add_argument("--run", "--run-dir", required=True, metavar="RUN",
                   help="the train-seg run directory (--run-dir: the same, for torchrun)")
    s.add_argument("--input", required=True, help="an image file or a folder of images")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--format", default="png", choices=list(FORMATS),
                   help="png: masks + overlays; voc-test: the evaluation server's layout + tar.gz")
    s.add_argument("--scales", default="1.0", help="image scales, each with its flip, averaged (e.g. 1.0,0.5,1.5)")
    s.add_argument("--crf", action="store_true", help="refine with a dense CRF (the 'crf' extra)")
    s.add_argument("--device", default="auto", choices=list(DEVICES), help=DEVICE_HELP)
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.set_defaults(func=cmd_stage)

    s = sub.add_parser("train-irn", help="train IRN's boundary and displacement branches on IR labels")
    s.add_argument("--cams", required=True, help="the CAM folder the IR labels came from (recorded in the config)")
    s.add_argument("--ir-labels", required=True, help="folder of IR label PNGs (pseudo-labels --method crf)")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--split", required=True, help=TRAIN_SPLIT_HELP)
    _add_training_flags(s, run_defaults["train-irn"], "ResNet depth of the frozen backbone",
                        "PATH | URL | imagenet | none | a train-cam RUN (its spotlight backbone); default imagenet",
                        "side of the training crop, a multiple of 4",
                        "boundary branch; displacement x train.new_lr_mult", "e.g. --set model.radius=10")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("pseudo-labels", help="IR labels (crf) or IRN pseudo masks (irn) from CAMs")
    s.add_argument("--cams", required=True, help="CAMS folder of make-cam")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--split", required=True, help="the split to label (VOC: train_aug)")
    s.add_argument("--out", required=True,
                   help="folder for the <id>.png labels and the config.yaml that made them (finished images "
                        "are skipped)")
    s.add_argument("--method", required=True, choices=list(REFINERS),
                   help="crf: IR labels for train-irn; irn: pseudo masks by the random walk (needs --irn)")
    s.add_argument("--workers", type=int, help="crf: processes; irn: image loaders (default min(4, CPUs))")
    s.add_argument("--bg-threshold", type=float,
                   help="crf: low CAM threshold (default by CAM method: 0.05 cam/gradcam, 0.33 advcam); "
                        "irn: background plane (default 0.25)")
    s.add_argument("--fg-threshold", type=float,
                   help="crf: high CAM threshold (default 0.30 cam/gradcam, 0.60 advcam)")
    s.add_argument("--cam-method", choices=list(CAM_METHODS),
                   help="the CAMs' method, for the default thresholds (crf) and cam power (irn) "
                        "(default: CAMS/cams.json)")
    s.add_argument("--no-crf", action="store_true", help="crf: thresholded CAMs without the dense CRF")
    s.add_argument("--irn", help="irn: the train-irn run (default: none; required by --method irn)")
    s.add_argument("--cam-power", type=float,
                   help="irn: CAMs raised to this power before the walk (default: the one that goes with the "
                        "CAM method's IR thresholds: 1.5 advcam (0.60/0.33), 1 cam/gradcam (0.30/0.05))")
    s.add_argument("--radius", type=int, help="irn: affinity radius at stride 4 (default 5)")
    s.add_argument("--beta", type=float, help="irn: affinity exponent (default 10)")
    s.add_argument("--exp-times", type=int,
                   help="irn: the walk takes 2^N steps (default 8: IRN's, for VOC's ~500 px images; its reach "
                        "scales with sqrt(steps), so for images of side S px use about 8 + 2 log2(S / 512): "
                        "5 at 160 px)")
    s.add_argument("--device", choices=list(DEVICES), help="irn: default auto")
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.set_defaults(func=cmd_stage)
    s = sub.add_parser("run", help="run the pipeline of an experiment file (or a packaged experiment) with a report")
    s.add_argument("experiment", nargs="?", metavar="EXPERIMENT",
                   help="an experiment YAML file, or the name of a packaged one (see --list; default: none, with --list)")
    s.add_argument("--list", action="store_true", help="list the packaged experiments and exit")
    s.add_argument("--out", help="experiment folder (default: runs/<experiment name>)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="STEP.KEY=VALUE sets a field of one step's config (e.g. train-cam.train.epochs=1); "
                        "KEY=VALUE sets a variable of the experiment (e.g. data.root=/data/VOC2012); "
                        "repeatable (default: none)")
    s.add_argument("--until", metavar="STAGE", help="stop after the first step of this name or command, e.g. "
                   "eval-cam (default: run every step)")
    s.set_defaults(func=cmd_run)
    _finish_parser(sub)
    return p


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
        print(f"amrseg: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("amrseg: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `amrseg ... | head`: the reader has gone, nothing more to say
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, as the shell reports a tool that the closed pipe stopped
    except OSError as e:  # last resort: a file fault the stage did not name itself
        where = f"{e.filename}: " if e.filename else ""
        print(f"amrseg: error: {where}{e.strerror or one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
