"""Segmentation inference of a train-seg run: `eval-seg` and `predict`.

Per image: the class scores at every scale, of the image and its flip (flipped back), upsampled
bilinearly to the image, softmaxed and averaged; optionally a dense CRF on those probabilities; the
argmax is the mask. Scores are compared with the ground truth by the one confusion-matrix code of
eval/metrics.py, as eval-cam does.
"""
from __future__ import annotations

import dataclasses
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import SegConfig, load_run_config, merge, run_kind
from .data.transforms import normalize
from .data.voc import IMAGE_SUFFIXES, SegData, list_images, read_mask, write_palette_png
from .fileio import load_torch
from .runtime import pick_device, progress
from .errors import AmrsegError
from .outputs import claim_folder, file_identity
from .eval.eval_cam import nan_to_none
from .eval.metrics import confusion_matrix, iou_from_confusion
from .fileio import atomic_write, save_image
from .models.deeplab import DeepLabV2
from .viz import colorize, overlay

VOC_TEST_DIR = Path("results/VOC2012/Segmentation/comp6_test_cls")


def load_seg_run(run: Path, device: torch.device) -> tuple[DeepLabV2, SegConfig, list[str]]:
    """The trained DeepLab of a train-seg run directory (RUN/model.pt), in eval mode."""
    run = Path(run)
    run_kind(run, "seg")
    cfg = load_run_config(run, "seg")
    state = load_torch(run / "model.pt", "trained model (is the run finished? resume it with train-seg --resume)")
    if "state_dict" not in state or "class_names" not in state:
        raise AmrsegError(f"{run / 'model.pt'}: not a train-seg model file (no state_dict/class_names)")
    cfg = merge(SegConfig(), state.get("config", dataclasses.asdict(cfg)))
    class_names = list(state["class_names"])
    model = DeepLabV2(cfg.model, len(class_names))
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        raise AmrsegError(f"{run / 'model.pt'}: weights do not fit the saved config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), cfg, class_names


@torch.inference_mode()
def predict_probs(model: DeepLabV2, image: np.ndarray, scales: Sequence[float], device: torch.device) -> torch.Tensor:
    """[C, H, W] class probabilities of an HxWx3 uint8 image, averaged over scales and flips."""
    x = normalize(image)[None].to(device)
    H, W = x.shape[-2:]
    total = torch.zeros(model.num_classes, H, W, device=device)
    for s in scales:
        h, w = max(1, round(H * s)), max(1, round(W * s))
        xs = x if (h, w) == (H, W) else F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        logits = model(torch.cat([xs, xs.flip(-1)])).float()
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)
        total += probs[0] + probs[1].flip(-1)
    return total / (2 * len(scales))


def predict_mask(model: DeepLabV2, image: np.ndarray, scales: Sequence[float], device: torch.device,
                 crf: bool = False) -> np.ndarray:
    """HxW uint8 class mask of an image (optionally CRF-refined)."""
    probs = predict_probs(model, image, scales, device)
    if crf:
        from .refine.crf import crf_inference_prob

        return np.argmax(crf_inference_prob(image, probs.cpu().numpy()), axis=0).astype(np.uint8)
    return probs.argmax(dim=0).to(torch.uint8).cpu().numpy()


def _check_scales(scales: Sequence[float]) -> None:
    if not scales or any(s <= 0 for s in scales):
        raise AmrsegError(f"--scales {list(scales)}: expected positive scales")


def evaluate_masks(data: SegData, pred_of: "callable", show_progress: Optional[bool] = None,
                   desc: str = "eval-seg") -> dict:
    """mIoU of the masks pred_of(i) over the images of `data` that have ground truth.

    Returns the eval JSON: {"miou", "iou": {class: IoU}, "num_images"} (IoU as AMR.md section 6).
    """
    n_cls = data.num_classes + 1
    conf = torch.zeros(n_cls, n_cls, dtype=torch.int64)
    count = 0
    scored = [i for i in range(len(data)) if data.mask_paths[i] is not None]
    if not scored:
        raise AmrsegError(f"--split {data.split}: no image of the split has a ground-truth mask to score against")
    for i in progress(scored, enabled=show_progress, desc=desc, unit="img"):
        gt = data.load_mask(i)
        pred = pred_of(i)
        if pred.shape != gt.shape:
            raise AmrsegError(f"prediction for {data.ids[i]} is {pred.shape[1]}x{pred.shape[0]}, the mask "
                              f"{gt.shape[1]}x{gt.shape[0]}")
        if pred.max(initial=0) >= n_cls:
            raise AmrsegError(f"prediction for {data.ids[i]} has class {int(pred.max())}, the dataset has "
                              f"{n_cls} (background included)")
        conf += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), n_cls)
        count += 1
    iou, miou = iou_from_confusion(conf)
    return {"miou": nan_to_none(miou.item()),
            "iou": {name: nan_to_none(v) for name, v in zip(data.class_names, iou.tolist())},
            "num_images": count}


def eval_pred_dir(pred: Path, data: SegData, show_progress: Optional[bool] = None) -> dict:
    """Scores the PNG masks PRED/<id>.png (e.g. pseudo masks, or predict's output) against the split."""
    pred = Path(pred)
    if not pred.is_dir():
        raise AmrsegError(f"--pred {pred}: not a directory")
    missing = [data.ids[i] for i in range(len(data)) if data.mask_paths[i] is not None
               and not (pred / f"{data.ids[i]}.png").is_file()]
    if missing:
        raise AmrsegError(f"--pred {pred}: no mask for {len(missing)} images of the split (first: {missing[0]}.png)")
    return evaluate_masks(data, lambda i: read_mask(pred / f"{data.ids[i]}.png"), show_progress)


def eval_run(run: Path, data: SegData, scales: Sequence[float], device: str = "auto", crf: bool = False,
             save: Optional[Path] = None, show_progress: Optional[bool] = None) -> dict:
    """Predicts the split with a train-seg run and scores it in one go; `save` also writes the masks."""
    _check_scales(scales)
    dev = pick_device(device)
    model, _, class_names = load_seg_run(run, dev)
    if len(class_names) != data.num_classes + 1:
        raise AmrsegError(f"--run {run}: trained on {len(class_names)} classes, the dataset has "
                          f"{data.num_classes + 1}")

    def pred_of(i: int) -> np.ndarray:
        mask = predict_mask(model, data.load_image(i), scales, dev, crf)
        if save is not None:
            write_palette_png(Path(save) / f"{data.ids[i]}.png", mask)
        return mask

    if save is not None:
        Path(save).mkdir(parents=True, exist_ok=True)
    result = evaluate_masks(data, pred_of, show_progress)
    result.update({"scales": list(scales), "crf": crf})
    return result


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


def predict(run: Path, inputs: Path, out: Path, fmt: str = "png", scales: Sequence[float] = (1.0,),
            crf: bool = False, device: str = "auto", show_progress: Optional[bool] = None,
            overwrite: bool = False) -> dict:
    """Masks for any JPEG/PNG images.

    fmt "png": OUT/<stem>.png palette masks and OUT/overlay/<stem>.jpg overlays. fmt "voc-test": the
    official evaluation server's layout, OUT/results/VOC2012/Segmentation/comp6_test_cls/<id>.png, and
    OUT/results.tar.gz holding it. Images whose mask exists are skipped (a re-run finishes the job);
    OUT/config.yaml records what made the masks, and masks of other settings there are refused
    (`overwrite` removes them first).
    """
    if fmt not in ("png", "voc-test"):
        raise AmrsegError(f"--format {fmt!r}: not one of png, voc-test")
    _check_scales(scales)
    dev = pick_device(device)
    model, _, class_names = load_seg_run(run, dev)
    data = _inputs(inputs, class_names)
    out = Path(out)
    mask_dir = out / VOC_TEST_DIR if fmt == "voc-test" else out
    claim_folder(out, {"run": str(Path(run).resolve()), "model": file_identity(Path(run) / "model.pt"),
                       "format": fmt, "scales": list(scales), "crf": crf},
                 "--out", str(mask_dir.relative_to(out) / "*.png"), overwrite=overwrite)
    mask_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "png":
        (out / "overlay").mkdir(exist_ok=True)
    written = skipped = 0
    for i in progress(range(len(data)), enabled=show_progress, desc="predict", unit="img"):
        target = mask_dir / f"{data.ids[i]}.png"
        if target.exists():
            skipped += 1
            continue
        image = data.load_image(i)  # one-line error naming an unreadable file
        mask = predict_mask(model, image, scales, dev, crf)
        if fmt == "png":
            save_image(Image.fromarray(overlay(image, colorize(mask))), out / "overlay" / f"{data.ids[i]}.jpg",
                       format="JPEG", quality=90)
        write_palette_png(target, mask)
        written += 1
    summary = {"out": str(out), "written": written, "skipped": skipped, "format": fmt}
    if fmt == "voc-test":
        archive = out / "results.tar.gz"
        atomic_write(archive, lambda tmp: _tar_results(tmp, out))
        summary["archive"] = str(archive)
    return summary


def _tar_results(tmp: str, out: Path) -> None:
    """results.tar.gz with the paths the server expects: results/VOC2012/Segmentation/comp6_test_cls/*.png."""
    with tarfile.open(tmp, "w:gz") as tar:
        for png in sorted((out / VOC_TEST_DIR).glob("*.png")):
            tar.add(png, arcname=str(VOC_TEST_DIR / png.name))
