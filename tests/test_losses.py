"""Segmentation losses against hand-computed values on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.losses import (
    LOSSES,
    CrossEntropyLoss,
    DiceLoss,
    OhemCrossEntropyLoss,
    build_segmentation_loss,
)

IGN = 255
LN2 = math.log(2)


def _logits_for_probs(p_true: list[float], target: list[int]) -> torch.Tensor:
    """Two-class logits (1, 2, 1, N) whose true-class probability is ``p_true``."""
    z = []
    for p, t in zip(p_true, target):
        margin = math.log(p / (1 - p))  # logit of the true class minus the other's
        z.append([margin, 0.0] if t == 0 else [0.0, margin])
    return torch.tensor(z).T.reshape(1, 2, 1, len(p_true))


def test_cross_entropy_with_ignore_and_weights():
    # pixel 0: logits (0, 0), y=0 -> ln 2; pixel 1: logits (ln 3, 0), y=1 -> -ln(1/4) = 2 ln 2; pixel 2 ignored.
    logits = torch.tensor([[0.0, math.log(3), 5.0], [0.0, 0.0, -5.0]]).reshape(1, 2, 1, 3)
    target = torch.tensor([[[0, 1, IGN]]])
    assert CrossEntropyLoss(2)(logits, target).item() == pytest.approx(1.5 * LN2, rel=1e-6)
    # weights (1, 3): (1 * ln2 + 3 * 2 ln2) / (1 + 3)
    weighted = CrossEntropyLoss(2, class_weights=[1.0, 3.0])(logits, target)
    assert weighted.item() == pytest.approx(7 / 4 * LN2, rel=1e-6)


def test_all_ignored_gives_zero_with_gradient():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), IGN)
    for loss_fn in (CrossEntropyLoss(3), OhemCrossEntropyLoss(3, min_kept=1), DiceLoss(3)):
        loss = loss_fn(logits, target)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(logits.grad).all()


def test_ohem_probability_threshold_and_min_kept():
    p = [0.9, 0.6, 0.3, 0.8]
    target = [0, 1, 0, 1]
    logits, y = _logits_for_probs(p, target), torch.tensor([target]).reshape(1, 1, 4)
    nll = [-math.log(v) for v in p]
    # min_kept=1: threshold = max(0.7, 2nd smallest 0.6) = 0.7 -> pixels with p < 0.7: 0.6, 0.3
    loss = OhemCrossEntropyLoss(2, thresh=0.7, min_kept=1)(logits, y)
    assert loss.item() == pytest.approx((nll[1] + nll[2]) / 2, rel=1e-5)
    # min_kept=3: threshold = max(0.7, 4th smallest 0.9) = 0.9 -> 0.6, 0.3, 0.8
    loss = OhemCrossEntropyLoss(2, thresh=0.7, min_kept=3)(logits, y)
    assert loss.item() == pytest.approx((nll[1] + nll[2] + nll[3]) / 3, rel=1e-5)
    # loss ranking only: the two largest losses
    loss = OhemCrossEntropyLoss(2, thresh=None, min_kept=2)(logits, y)
    assert loss.item() == pytest.approx((nll[1] + nll[2]) / 2, rel=1e-5)
    # at most min_kept valid pixels: all kept = plain CE (ignored pixel left out)
    y_ign = y.clone()
    y_ign[0, 0, 3] = IGN
    loss = OhemCrossEntropyLoss(2, thresh=0.7, min_kept=10)(logits, y_ign)
    assert loss.item() == pytest.approx(sum(nll[:3]) / 3, rel=1e-5)


def test_dice_hand_values_ignore_and_absent_class():
    # q(pixel 0) = (0.75, 0.25) with y=0; q(pixel 1) = (0.5, 0.5) with y=1; pixel 2 ignored (anything).
    logits = torch.tensor([[math.log(3), 0.0, 9.0], [0.0, 0.0, -9.0]]).reshape(1, 2, 1, 3)
    y = torch.tensor([[[0, 1, IGN]]])
    # class 0: 2 * 0.75 / (1.25 + 1); class 1: 2 * 0.5 / (0.75 + 1)
    expected = 1 - (1.5 / 2.25 + 1.0 / 1.75) / 2
    assert DiceLoss(2, smooth=0.0)(logits, y).item() == pytest.approx(expected, rel=1e-6)
    expected_s1 = 1 - ((1.5 + 1) / (2.25 + 1) + (1.0 + 1) / (1.75 + 1)) / 2
    assert DiceLoss(2, smooth=1.0)(logits, y).item() == pytest.approx(expected_s1, rel=1e-6)
    # a third class absent from the target is left out of the mean
    logits3 = torch.cat([logits, torch.full((1, 1, 1, 3), -30.0)], dim=1)
    assert DiceLoss(3, smooth=0.0)(logits3, y).item() == pytest.approx(expected, rel=1e-5)


def test_factory_and_errors():
    assert sorted(LOSSES) == ["ce", "ce_dice", "dice", "ohem"]
    logits, y = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    ce = build_segmentation_loss("ce", 3)(logits, y)
    dice = build_segmentation_loss("dice", 3)(logits, y)
    both = build_segmentation_loss("ce_dice", 3, dice_weight=0.5)(logits, y)
    assert both.item() == pytest.approx(ce.item() + 0.5 * dice.item(), rel=1e-6)
    assert build_segmentation_loss("ohem", 3, class_weights=[1, 2, 3], thresh=0.5, min_kept=4)(logits, y).isfinite()
    with pytest.raises(KeyError, match="valid names.*ce.*dice.*ohem"):
        build_segmentation_loss("focal", 3)
    with pytest.raises(ValueError, match="class_weights"):
        build_segmentation_loss("ce", 3, class_weights=[1, 2])
    with pytest.raises(ValueError, match="classes"):
        build_segmentation_loss("ce", 4)(logits, y)


def test_bfloat16_logits_give_float32_loss():
    logits, y = torch.randn(1, 3, 4, 4).bfloat16(), torch.randint(0, 3, (1, 4, 4))
    assert CrossEntropyLoss(3)(logits, y).dtype == torch.float32
