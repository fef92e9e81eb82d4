"""Confusion-matrix metrics and SpaceNet-style building F1 against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finetune.metrics import BuildingF1, ConfusionMatrix, building_f1

IGN = 255


def _hand_case():
    target = torch.tensor([0, 0, 1, 1, 1, IGN, 0]).view(1, 1, 7)
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 0]).view(1, 1, 7)
    valid = torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool).view(1, 1, 7)
    return pred, target, valid


def test_confusion_matrix_hand_values_with_ignore_valid_and_absent_class():
    pred, target, valid = _hand_case()
    cm = ConfusionMatrix(3, class_names=["water", "forest", "urban"])
    cm.update(pred, target, valid)
    assert cm.mat.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    m = cm.compute()
    assert m["IoU/water"] == pytest.approx(1 / 3) and m["IoU/forest"] == pytest.approx(1 / 2)
    assert m["F1/water"] == pytest.approx(1 / 2) and m["F1/forest"] == pytest.approx(2 / 3)
    assert math.isnan(m["IoU/urban"]) and math.isnan(m["F1/urban"])  # absent in target and prediction
    assert m["mIoU"] == pytest.approx(5 / 12) and m["mF1"] == pytest.approx(7 / 12)
    assert m["OA"] == pytest.approx(3 / 5)
    assert all(isinstance(v, float) for v in m.values())


def test_predicted_but_absent_class_counts_as_zero():
    cm = ConfusionMatrix(3)
    pred, target, valid = _hand_case()
    cm.update(pred, target, valid)
    cm.update(torch.tensor([[[2]]]), torch.tensor([[[0]]]))
    m = cm.compute()
    assert m["IoU/2"] == 0.0 and m["IoU/0"] == pytest.approx(1 / 4)
    assert m["mIoU"] == pytest.approx((1 / 4 + 1 / 2 + 0) / 3)


def test_logits_are_argmaxed_and_bad_labels_raise():
    cm = ConfusionMatrix(2)
    logits = torch.tensor([[3.0, -1.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2)  # argmax: 0, 1
    cm.update(logits, torch.tensor([[[0, 0]]]))
    assert cm.mat.tolist() == [[1, 1], [0, 0]]
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([[[0]]]), torch.tensor([[[7]]]))
    empty = ConfusionMatrix(2).compute()
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["OA"])


class _FakeAccelerator:
    """Two processes holding the same counts."""

    device = torch.device("cpu")

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        return tensor.clone() * 2


def test_reduce_returns_a_new_matrix():
    pred, target, valid = _hand_case()
    cm = ConfusionMatrix(3)
    cm.update(pred, target, valid)
    reduced = cm.reduce(_FakeAccelerator())
    assert reduced.mat.tolist() == [[2, 2, 0], [2, 4, 0], [0, 0, 0]]
    assert cm.mat.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]  # unchanged: reducing twice cannot double-count
    assert reduced.compute()["mIoU"] == pytest.approx(cm.compute()["mIoU"])
    assert torch.equal(cm.reduce(None).mat, cm.mat)


def _rect(mask, r0, r1, c0, c1):
    mask[r0:r1 + 1, c0:c1 + 1] = 1


def _tile():
    gt = np.zeros((64, 64), np.uint8)
    pred = np.zeros((64, 64), np.uint8)
    _rect(gt, 2, 11, 2, 11)      # A: 100 px, predicted exactly -> TP
    _rect(pred, 2, 11, 2, 11)
    _rect(gt, 2, 11, 20, 29)     # B: 100 px, prediction shifted 6 px: IoU 40/160 = 0.25 -> FP + FN
    _rect(pred, 2, 11, 26, 35)
    _rect(gt, 20, 29, 2, 21)     # C: 200 px split in 120 px (IoU 0.6, TP) and 70 px (IoU 0.35, FP)
    _rect(pred, 20, 29, 2, 13)
    _rect(pred, 20, 29, 15, 21)
    _rect(gt, 40, 44, 40, 44)    # D: 25 px < 80: ignored; its exact prediction is neither TP nor FP
    _rect(pred, 40, 44, 40, 44)
    _rect(gt, 50, 52, 2, 4)      # E: 9 px, ignored, missed: not an FN
    return pred, gt


def test_building_f1_hand_made_rectangles():
    pred, gt = _tile()
    c = building_f1(pred, gt, iou_threshold=0.5, min_area=80)
    assert (c.tp, c.fp, c.fn) == (2, 2, 1)
    assert c.precision == pytest.approx(0.5) and c.recall == pytest.approx(2 / 3) and c.f1 == pytest.approx(4 / 7)
    # each case alone
    perfect = np.zeros((16, 16), np.uint8)
    _rect(perfect, 2, 11, 2, 11)
    assert building_f1(perfect, perfect, min_area=80).as_dict()["f1"] == 1.0
    # without the size filter the small buildings count: D becomes a TP, E an FN
    c0 = building_f1(pred, gt, min_area=0)
    assert (c0.tp, c0.fp, c0.fn) == (3, 2, 2)
    # an ignore value in the ground truth is background
    gt_ign = gt.copy()
    gt_ign[60:, 60:] = IGN
    assert building_f1(pred, gt_ign).fn == c.fn


def test_building_f1_accumulates_over_tiles_and_batches():
    pred, gt = _tile()
    acc = BuildingF1(min_area=80)
    acc.update(torch.from_numpy(pred), torch.from_numpy(gt))
    acc.update(np.stack([pred, np.zeros_like(pred)]), np.stack([gt, gt]))
    m = acc.compute()
    # tile 1 and 2: (2, 2, 1) each; tile 3: nothing predicted, 3 scored buildings missed
    assert (m["tp"], m["fp"], m["fn"]) == (4.0, 4.0, 5.0)
    assert m["f1"] == pytest.approx(8 / 17)
    reduced = acc.reduce(_FakeAccelerator())
    assert (reduced.tp, reduced.fp, reduced.fn) == (8, 8, 10)
