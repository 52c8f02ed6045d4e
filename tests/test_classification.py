"""Classification AP / mAP against hand-computed values and a slow reference from the definition."""
import math

import pytest
import torch

from amrseg.eval.classification import average_precision, mean_average_precision


def test_ap_by_hand():
    # class 0: ranks 1 and 3 are positive: precisions 1/1 and 2/3 -> AP (1 + 2/3) / 2 = 5/6
    # class 1: the only positive is ranked last of 4: precision 1/4 -> AP 1/4
    # class 2: no positive -> NaN, left out of the mean
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.8, 0.7, 0.2], [0.7, 0.6, 0.3], [0.6, 0.5, 0.4]])
    labels = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    ap = average_precision(scores, labels)
    assert ap[0].item() == pytest.approx(5 / 6) and ap[1].item() == pytest.approx(0.25) and math.isnan(ap[2])
    assert mean_average_precision(scores, labels) == pytest.approx((5 / 6 + 0.25) / 2)


def test_ties_form_one_threshold():
    # both tied at 0.5, one positive: one threshold with precision 1/2 and recall 1 -> AP 1/2,
    # whatever order the sort leaves them in.
    for labels in (torch.tensor([[1], [0]]), torch.tensor([[0], [1]])):
        assert average_precision(torch.tensor([[0.5], [0.5]]), labels)[0].item() == pytest.approx(0.5)


def test_perfect_and_inverted_rankings():
    s = torch.tensor([[3.0], [2.0], [1.0], [0.0]])
    assert average_precision(s, torch.tensor([[1], [1], [0], [0]]))[0].item() == pytest.approx(1.0)
    # positives last: precisions 1/3 and 2/4 -> (1/3 + 1/2) / 2
    assert average_precision(s, torch.tensor([[0], [0], [1], [1]]))[0].item() == pytest.approx(5 / 12)


def _reference_ap(s: list, y: list) -> float:
    """The definition, threshold by threshold: sum over distinct scores t (high to low) of
    (R(t) - R(previous t)) * P(t), with P, R of the prediction score >= t."""
    pos = sum(y)
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s), reverse=True):
        picked = [yi for si, yi in zip(s, y) if si >= t]
        precision, recall = sum(picked) / len(picked), sum(picked) / pos
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def test_matches_the_definition_on_random_data_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40, 5), generator=g).float() / 5  # many ties
    labels = (torch.rand(40, 5, generator=g) < 0.3).long()
    ap = average_precision(scores, labels)
    for k in range(5):
        assert ap[k].item() == pytest.approx(_reference_ap(scores[:, k].tolist(), labels[:, k].tolist()), abs=1e-12)


def test_inputs_are_left_untouched_and_shapes_checked():
    scores, labels = torch.rand(6, 3), torch.randint(0, 2, (6, 3))
    s0, l0 = scores.clone(), labels.clone()
    average_precision(scores, labels)
    assert torch.equal(scores, s0) and torch.equal(labels, l0)
    with pytest.raises(ValueError):
        average_precision(torch.rand(6, 3), torch.rand(6, 2))
