"""AMR losses against hand computations on tiny tensors."""
import math

import torch

from amrseg.config import LossConfig
from amrseg.models.losses import amr_loss, area_loss, classification_loss, cps_loss


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_classification_loss_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = torch.tensor([[1, 0, 0], [0, 1, 1]])
    # -log sigmoid(x) = softplus(-x) for positives, -log(1 - sigmoid(x)) = softplus(x) for negatives.
    img0 = (softplus(-2.0) + softplus(-1.0) + softplus(0.5)) / 3
    img1 = (softplus(0.0) + softplus(-3.0) + softplus(2.0)) / 3
    expected = (img0 + img1) / 2
    assert abs(classification_loss(logits, labels).item() - expected) < 1e-6
    assert abs(expected - 0.7138) < 1e-4  # (0.1269 + 0.3133 + 0.9741) / 3, (0.6931 + 0.0486 + 2.1269) / 3


def test_good_logits_beat_bad_logits():
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    good = torch.tensor([[4.0, -4.0, 3.0]])
    bad = torch.tensor([[-4.0, 4.0, -3.0]])
    assert classification_loss(good, labels) < classification_loss(torch.zeros(1, 3), labels)
    assert classification_loss(torch.zeros(1, 3), labels) < classification_loss(bad, labels)


def test_cps_loss():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    b = torch.tensor([[[[0.0, 2.0], [5.0, 1.0]]]])
    assert cps_loss(a, b).item() == (1 + 0 + 2 + 3) / 4
    assert cps_loss(a, b).item() == cps_loss(b, a).item()
    assert cps_loss(a, a.clone()).item() == 0
    a.requires_grad_(True)
    b.requires_grad_(True)
    cps_loss(a, b).backward()  # neither side detached
    torch.testing.assert_close(a.grad, torch.tensor([[[[0.25, 0.0], [-0.25, 0.25]]]]))
    torch.testing.assert_close(b.grad, -a.grad)


def test_area_loss_by_hand():
    cam = torch.tensor([
        [[[0.0, 1.0], [2.0, 4.0]], [[3.0, 3.0], [3.0, 3.0]]],  # image 0
        [[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]],  # image 1
    ])
    # Image 0: class 0 -> (0 + 1 + 2 + 4) / (4 + 1e-5) / 4 positions; class 1 -> 4 * 3 / (3 + 1e-5) / 4.
    c0 = 7 / (4 + 1e-5) / 4  # ~0.4375
    c1 = 3 / (3 + 1e-5)  # ~1
    only_first = torch.tensor([[1, 0], [0, 0]])
    assert abs(area_loss(cam, only_first).item() - c0) < 1e-6
    both = torch.tensor([[1, 1], [0, 0]])
    assert abs(area_loss(cam, both).item() - (c0 + c1) / 2) < 1e-6
    # Image 1's class 0: one hot pixel out of 4 -> 0.25 / (1 + 1e-5) ... averaged over images.
    with_second = torch.tensor([[1, 1], [1, 0]])
    expected = ((c0 + c1) / 2 + 1 / (1 + 1e-5) / 4) / 2
    assert abs(area_loss(cam, with_second).item() - expected) < 1e-6
    # An image with no present class does not dilute the mean; none at all gives 0.
    assert area_loss(cam, torch.zeros(2, 2)).item() == 0
    # A map that covers more of the image (relative to its peak) costs more.
    spread = torch.ones(1, 1, 4, 4)
    peak = torch.zeros(1, 1, 4, 4)
    peak[..., 0, 0] = 1
    assert area_loss(spread, torch.ones(1, 1)) > area_loss(peak, torch.ones(1, 1))


def outputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "logits_s": torch.randn(2, 3, generator=g), "cam_s": torch.rand(2, 3, 4, 4, generator=g),
        "logits_c": torch.randn(2, 3, generator=g), "cam_c": torch.rand(2, 3, 4, 4, generator=g),
    }


def test_amr_loss_composition():
    out = outputs()
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]])
    terms = amr_loss(out, labels, LossConfig(cps_weight=0.5, area_weight=0.25))
    assert set(terms) == {"total", "cls", "cls_s", "cls_c", "cps", "area"}
    cls_s = classification_loss(out["logits_s"], labels)
    cls_c = classification_loss(out["logits_c"], labels)
    cps = cps_loss(out["cam_s"], out["cam_c"])
    area = area_loss(out["cam_c"], labels)  # the compensation CAM
    torch.testing.assert_close(terms["cls"], 0.5 * (cls_s + cls_c))
    torch.testing.assert_close(terms["cps"], cps)
    torch.testing.assert_close(terms["area"], area)
    torch.testing.assert_close(terms["total"], 0.5 * (cls_s + cls_c) + 0.5 * cps + 0.25 * area)
    assert not torch.allclose(area, area_loss(out["cam_s"], labels))

    zero = amr_loss(out, labels, LossConfig(cps_weight=0.0, area_weight=0.0))
    torch.testing.assert_close(zero["total"], zero["cls"])  # weight 0: reported, not added
    assert zero["cps"].item() > 0 and zero["area"].item() > 0


def test_amr_loss_spotlight_only():
    out = {k: v for k, v in outputs().items() if k.endswith("_s")}
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]])
    terms = amr_loss(out, labels, LossConfig())
    assert set(terms) == {"total", "cls", "cls_s"}
    torch.testing.assert_close(terms["total"], classification_loss(out["logits_s"], labels))
