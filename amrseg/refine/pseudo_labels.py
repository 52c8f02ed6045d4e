"""The maths of `pseudo-labels` (AMR.md section 7), per image; the stage is stages/pseudo_labels.py.

- crf: IRN's inter-pixel relation (IR) labels: the CAMs thresholded high and low, each refined by a
  dense CRF (refine.crf.ir_label); confident foreground, confident background, 255 between. They
  train the IRN (train-irn).
- irn: pseudo masks: each image's stride-4 CAMs (the CAM file's `cam` array), random-walked over the
  affinities of a trained IRN's boundary map (refine.random_walk.walk), upsampled x4 to the image,
  normalised there and argmax'd against a background plane (random_walk.walk_scores), as IRN's
  make_sem_seg_labels. They train the segmentation network (train-seg).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cam.io import evidence, load_cam
from ..data.transforms import normalize
from ..data.voc import SegData, read_image
from ..errors import AmrsegError
from .crf import ir_label
from .random_walk import rw_label, walk, walk_scores

STRIDE = 4  # IRN's grid


def strided_size(size: tuple[int, int]) -> tuple[int, int]:
    """The stride-4 grid of an HxW image: ceil(H / 4) x ceil(W / 4) (CONTRACT: the `cam` array)."""
    return -(-size[0] // STRIDE), -(-size[1] // STRIDE)


def checked_cam(path: Path, size: tuple[int, int], num_classes: int) -> dict[str, np.ndarray]:
    """The arrays of a CAM file, checked against the image, with inactive classes' maps at 0."""
    cam = evidence(load_cam(path))
    keys = cam["keys"]
    if keys.size and keys[-1] >= num_classes:
        raise AmrsegError(f"{path}: class key {int(keys[-1])} is outside the dataset's {num_classes} classes")
    if tuple(cam["high_res"].shape[1:]) != tuple(size):
        raise AmrsegError(f"{path}: CAMs are {cam['high_res'].shape[2]}x{cam['high_res'].shape[1]} (WxH), "
                          f"the image {size[1]}x{size[0]}")
    grid = strided_size(size)
    if "cam" in cam and tuple(cam["cam"].shape[1:]) != grid:
        raise AmrsegError(f"{path}: the stride-4 'cam' array is {cam['cam'].shape[2]}x{cam['cam'].shape[1]} (WxH), "
                          f"expected {grid[1]}x{grid[0]} for a {size[1]}x{size[0]} image")
    return cam


# --------------------------------------------------------------------------- crf: IR labels


def ir_label_of(image_path: Path, cam_path: Path, num_classes: int, fg: float, bg: float, crf: bool) -> np.ndarray:
    """The IR label (HxW uint8: class ids, 255 unsure) of one image from its CAM file."""
    img = read_image(image_path)
    cam = checked_cam(Path(cam_path), img.shape[:2], num_classes)
    return ir_label(img, cam["high_res"], cam["keys"], fg, bg, crf=crf)


def check_crf_extra() -> None:
    """Fails before any work (rather than in a pool worker) when pydensecrf is missing."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        raise AmrsegError("dense CRF needs the 'crf' extra: pip install 'amrseg[crf]' (pydensecrf2); "
                          "or pass --no-crf") from None


# --------------------------------------------------------------------------- irn: pseudo masks


def strided_cams(high_res: torch.Tensor) -> torch.Tensor:
    """Stride-4 CAMs for a CAM file without the `cam` array (an older make-cam): [n, H, W] -> [n, h, w].

    Resized as IRN resizes its maps to the grid (bilinear, half-pixel centres) to
    ceil(H / 4) x ceil(W / 4), then each divided by its own max (+1e-5), so that each peaks at
    about 1 like the `cam` make-cam writes. make-cam's `cam` is made from each scale's map, so this
    is only close to it.
    """
    n = high_res.shape[0]
    h, w = strided_size(tuple(high_res.shape[1:]))
    if n == 0:
        return high_res.new_zeros(0, h, w, dtype=torch.float32)
    x = F.interpolate(high_res[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    return x / (x.amax(dim=(1, 2), keepdim=True) + 1e-5)


class IRNInputs(torch.utils.data.Dataset):
    """(index, normalised image, keys, stride-4 CAMs, whether they came from high_res) of the images to label."""

    def __init__(self, data: SegData, cams: list[Path], index: list[int]):
        self.data, self.cams, self.index = data, cams, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> dict:
        i = self.index[j]
        img = self.data.load_image(i)
        cam = checked_cam(self.cams[i], img.shape[:2], self.data.num_classes)
        if "cam" in cam:
            strided, resized = torch.from_numpy(cam["cam"].astype(np.float32)), False
        else:
            strided, resized = strided_cams(torch.from_numpy(cam["high_res"].astype(np.float32))), True
        return {"i": i, "image": normalize(img), "keys": cam["keys"], "cam": strided, "resized": resized}


def irn_mask(model, image: torch.Tensor, keys: np.ndarray, cam: torch.Tensor, crop: int, radius: int, beta: float,
             exp_times: int, bg_threshold: float, cam_power: float) -> np.ndarray:
    """One pseudo mask (HxW uint8 class ids) from an image's stride-4 CAMs and the IRN's boundary map.

    IRN's make_sem_seg_labels: the boundary of the image and its flip at the IRN's inference canvas
    (models.irn.infer_boundary), the CAMs walked over its affinities (random_walk.walk), the walked
    maps upsampled x4, cut to the image and normalised there, a background plane in front, argmax.

    Args:
        model: The IRN, in eval mode.
        image: [3, H, W] normalised image.
        keys: [n] class keys of the CAMs.
        cam: [n, ceil(H / 4), ceil(W / 4)] CAMs (the file's `cam`, or `strided_cams`).
        crop: The IRN's training crop (its inference canvas).
    """
    from ..models.irn import infer_boundary  # the model pulls in the backbone code: only for this method

    device = next(model.parameters()).device
    height, width = image.shape[-2:]
    boundary = infer_boundary(model, image.to(device), crop)
    if tuple(cam.shape[1:]) != tuple(boundary.shape):
        raise AmrsegError(f"stride-4 CAMs {tuple(cam.shape)} do not match the boundary map {tuple(boundary.shape)}")
    walked = walk(cam.to(device).float(), boundary, radius=radius, beta=beta, exp_times=exp_times, cam_power=cam_power)
    return rw_label(walk_scores(walked, (height, width), STRIDE, bg_threshold), keys)
