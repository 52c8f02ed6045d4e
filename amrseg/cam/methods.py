"""CAM methods: the contract every method keeps (CamMethod, written once) and their registry, CAM_METHODS.

make-cam (cam/infer.py, cams_for_batch) does everything that is not the method's: the scale
pyramid, the image + flip pairs, the one gradient-free forward whose raw class scores pick the
classes of unlabelled images and the fallback of dead classes, the upsampling to the image, the sums
over scales, the per-branch max normalisation and the fusion of the branches. A method says only how
a branch's maps are read off the network at one scale (as pytorch-grad-cam's grad_cam.py over
base_cam.py). pseudo-labels takes a method's default IR thresholds and random-walk power from here.

A new method is a function with the signature of CamMethod.maps (here or in its own file, as
advcam.py) and one line in CAM_METHODS; tests/test_cam_methods.py runs the contract over every entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from ..errors import AmrsegError
from .advcam import OPTIONS as ADVCAM_OPTIONS, advcam_branch_maps, check_options as check_advcam_options

if TYPE_CHECKING:
    from ..models.amr import AMRNet


@dataclass(frozen=True)
class ScaleBatch:
    """What make-cam hands a method at one scale: B images of one size, each with its flip.

    Attributes:
        pairs: [B, 2, 3, h, w] the normalised input; pairs[:, 1] is pairs[:, 0] flipped left-right.
        features: {branch: final feature map F [B, 2, C, h', w']} of the pairs, from one gradient-free
            forward in which the network saw them interleaved (image, flip, image, flip, ...), so that
            AMMs with eval_stats 'pair' take their statistics over each image and its flip.
        scores: {branch: raw class scores W . F [B, 2, K, h', w']} of that forward.
        keys: per image, the class indices [n_b] whose maps are wanted (n_b may be 0).
        scale: this scale's factor (1.0: the image's own size).
        options: make-cam's settings (cam.infer.InferConfig); a method reads the fields it names in
            CamMethod.options.
    """

    pairs: torch.Tensor
    features: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    keys: list[torch.Tensor]
    scale: float
    options: Any


def _no_check(options: Any) -> None:
    return None


@dataclass(frozen=True)
class CamMethod:
    """The contract of a CAM method: all that make-cam and pseudo-labels know of it.

    Attributes:
        name: its key in CAM_METHODS: the value of `make-cam --method`, of "method" in CAMS/cams.json
            and of `pseudo-labels --cam-method`.
        maps: maps(model, batch: ScaleBatch) -> {branch: [per image of the batch: maps [n_b, h', w']]}
            for every branch of model.branches(). Row j is the map of class batch.keys[b][j]: the
            image's map plus its flip's map flipped back (`pair_sum`), on the feature grid h' x w' of
            batch.scores, finite and >= 0, 0 where the method sees no evidence. An image's maps depend
            on that image (and its flip) alone, not on the other images of the batch, and swapping an
            image with its flip flips its maps. make-cam sums them over scales, upsamples, normalises
            and fuses them; a class whose maps are 0 everywhere in every branch gets the peak of its
            raw scores instead (cam.infer.peak_map).
        needs_grad: True when `maps` runs autograd: make-cam then calls it with gradients enabled,
            otherwise under torch.inference_mode (no graph is recorded). The contract test measures it.
        thresholds: the default IR-label thresholds (fg, bg) of its maps, 0 < bg < fg < 1
            (pseudo-labels --method crf): flatter maps need higher ones.
        cam_power: the random walk's default power of its CAMs (pseudo-labels --method irn): the one
            that goes with its thresholds.
        options: the InferConfig fields it reads (make-cam records them with its CAMs; the fields of
            other methods are left out).
        check: check(options) raises a one-line AmrsegError, naming the flag, for settings it cannot
            run with.
    """

    name: str
    maps: Callable[[AMRNet, ScaleBatch], dict[str, list[torch.Tensor]]]
    needs_grad: bool
    thresholds: tuple[float, float]
    cam_power: float
    options: tuple[str, ...] = ()
    check: Callable[[Any], None] = _no_check


# --------------------------------------------------------------------------- helpers for methods


def pair_sum(maps: torch.Tensor) -> torch.Tensor:
    """[B, 2, ..., h, w] -> [B, ..., h, w]: each image's map plus its flip's map flipped back."""
    return maps[:, 0] + maps[:, 1].flip(-1)


def per_image(maps: torch.Tensor, keys: list[torch.Tensor]) -> list[torch.Tensor]:
    """[B, K, h, w] -> per image b, its classes' maps [n_b, h, w]."""
    return [maps[b, k] for b, k in enumerate(keys)]


def classifier_weights(model: AMRNet) -> dict[str, torch.Tensor]:
    """{branch: classifier weight W [K, C]} (1x1 conv, no bias)."""
    return {name: branch.classifier.weight.flatten(1) for name, branch in model.branches()}


# --------------------------------------------------------------------------- cam, gradcam


def cam_branch_maps(model: AMRNet, batch: ScaleBatch) -> dict[str, list[torch.Tensor]]:
    """The CAM (AMR.md section 1): ReLU(W_c . F)."""
    return {name: per_image(pair_sum(F.relu(s)), batch.keys) for name, s in batch.scores.items()}


def gradcam_branch_maps(model: AMRNet, batch: ScaleBatch) -> dict[str, list[torch.Tensor]]:
    """The release's Grad-CAM (gradcam_from_scores), in closed form: no backward pass."""
    weights = classifier_weights(model)
    return {name: per_image(pair_sum(gradcam_from_scores(s, weights[name])), batch.keys)
            for name, s in batch.scores.items()}


def gradcam_from_scores(raw: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The release's Grad-CAM of every class, from the raw class scores of image + flip pairs.

    ReLU(sum_k a_k F_k), a_k = (sum over positions of dS/dF_k) / P, S = the sum of the class's ReLU
    CAM over the image and its flip, P = ONE count, the positive entries of the pair's whole gradient
    tensor. With a linear head dS/dF_k(h, w) = W_ck [W_c . F > 0], so the map is the ReLU CAM times
    |mask| / P (checked against autograd and against cam/reference.py in the tests).

    Args:
        raw: W . F [B, 2, K, h, w]: axis 1 is the pair (an image and its flip).
        weight: classifier weight W [K, C] (1x1 conv, no bias).
    Returns:
        [B, 2, K, h, w] = ReLU(W_c . F) * |mask_n| / (P + 1e-12), mask_n = {W_c . F_n > 0} and
        P = (|mask_0| + |mask_1|) * #{k: W_ck > 0}: the positive entries of the gradient of
        S = sum over the pair of the ReLU CAM, dS/dF_nk(h, w) = W_ck mask_n(h, w).
    """
    count = (raw > 0).sum(dim=(-2, -1)).to(raw.dtype)  # |mask_n| [B, 2, K]
    p = count.sum(dim=1, keepdim=True) * (weight > 0).sum(dim=1).to(raw.dtype)  # P [B, 1, K]
    return F.relu(raw) * (count / (p + 1e-12))[..., None, None]


def gradcam_maps(feat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of every class from the final feature maps F [B, 2, C, h, w] of image + flip pairs."""
    return gradcam_from_scores(torch.einsum("kc,bnchw->bnkhw", weight, feat), weight)


# --------------------------------------------------------------------------- the registry

# IR thresholds: IRN's for CAM and Grad-CAM maps, the AMR release's for AdvCAM maps (flatter after
# the climbing, hence higher). The walk's power goes with them: the release raises its AdvCAMs to
# 1.5 and thresholds them at 0.60/0.33; IRN walks its CAMs as they are (power 1) after 0.30/0.05.
CAM_METHODS: dict[str, CamMethod] = {
    "cam": CamMethod("cam", cam_branch_maps, needs_grad=False, thresholds=(0.30, 0.05), cam_power=1.0),
    "gradcam": CamMethod("gradcam", gradcam_branch_maps, needs_grad=False, thresholds=(0.30, 0.05), cam_power=1.0),
    "advcam": CamMethod("advcam", advcam_branch_maps, needs_grad=True, thresholds=(0.60, 0.33), cam_power=1.5,
                        options=ADVCAM_OPTIONS, check=check_advcam_options),
}


def cam_method(name: str, flag: str = "--method") -> CamMethod:
    """The registered method `name`; a one-line AmrsegError naming `flag` and the known names."""
    try:
        return CAM_METHODS[name]
    except (KeyError, TypeError):
        raise AmrsegError(f"{flag} {name!r}: not one of {', '.join(CAM_METHODS)}") from None


class _RegistryField(Mapping):
    """{method name: one attribute of its CamMethod}, read from CAM_METHODS at every lookup, so that a
    method added to the registry (or patched into it by a test) is seen by every caller."""

    def __init__(self, attr: str):
        self._attr = attr

    def __getitem__(self, name: str) -> Any:
        return getattr(CAM_METHODS[name], self._attr)

    def __iter__(self) -> Iterator[str]:
        return iter(CAM_METHODS)

    def __len__(self) -> int:
        return len(CAM_METHODS)

    def __repr__(self) -> str:
        return repr(dict(self))


# (fg, bg) IR-label thresholds per CAM method (refine.crf and pseudo-labels read them by this name).
DEFAULT_THRESHOLDS: Mapping[str, tuple[float, float]] = _RegistryField("thresholds")


def default_cam_power(cam_method: str) -> float:
    """The random walk's default CAM power: the method's, the one that goes with its IR thresholds."""
    return CAM_METHODS[cam_method].cam_power
