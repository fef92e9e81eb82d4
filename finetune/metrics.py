"""Segmentation metrics: a confusion matrix (mIoU, F1, overall accuracy) and SpaceNet-style building F1.

Pixel metrics. :class:`ConfusionMatrix` counts ``M[t, p]`` (rows: target class, columns: predicted class) with
``torch.bincount`` on the device of the predictions. With ``TP_k = M[k, k]``, ``FP_k = sum_t M[t, k] - TP_k`` and
``FN_k = sum_p M[k, p] - TP_k``:

    IoU_k = TP_k / (TP_k + FP_k + FN_k)        F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k)        OA = sum_k TP_k / sum M

A class absent from both target and prediction has ``0 / 0``: its IoU/F1 are NaN and it is left out of mIoU and
mF1 (it says nothing about the model). A class that is predicted but absent from the target has IoU 0 and counts.

Distributed evaluation: every process counts only its own shard and :meth:`ConfusionMatrix.reduce` sums the
matrices (``accelerator.reduce(M, "sum")``). The sum is right only if every sample is counted exactly once: the
evaluation loader must not repeat samples. Accelerate's prepared loaders pad the last batch with repeated samples
(what ``accelerator.gather_for_metrics`` drops); with a prepared eval loader, pass only the real samples to
:meth:`ConfusionMatrix.update` (e.g. drop the batch items whose ``index`` was already seen, or use an unprepared,
sharded, unpadded loader with ``even_batches=False``).

Instance metrics. :func:`building_f1` scores building masks as SpaceNet does: connected components are buildings,
a prediction is a true positive when its IoU with a ground-truth building is at least 0.5 (one-to-one), ground-truth
buildings smaller than ``min_area`` pixels are ignored, and predictions matched to an ignored building count neither
as true nor as false positives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from common.bands import IGNORE_INDEX

__all__ = [
    "ConfusionMatrix",
    "InstanceCounts",
    "BuildingF1",
    "building_f1",
    "match_instances",
    "SPACENET_IOU_THRESHOLD",
    "SPACENET6_MIN_AREA_PX",
]

SPACENET_IOU_THRESHOLD = 0.5
"""A predicted building is a true positive when its IoU with a ground-truth building is >= this."""

SPACENET6_MIN_AREA_PX = 80
"""Ground-truth buildings below this many pixels are ignored (SpaceNet 6: 80 px = 20 m^2 at 0.5 m)."""


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` int64 confusion matrix (rows target, columns prediction).

    Args:
        num_classes: K.
        ignore_index: target value left out.
        class_names: names used in the keys of :meth:`compute` (default ``"0"``, ``"1"``, ...).
        device: where the matrix lives (default: moved to the first update's device).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 class_names: Sequence[str] | None = None, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in
                                                                                             range(num_classes)]
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Zero the counts."""
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Count one batch.

        Args:
            pred: class indices ``(B, H, W)`` or logits/probabilities ``(B, K, H, W)`` (argmax over K).
            target: ``(B, H, W)`` class indices, ``ignore_index`` for unlabelled pixels.
            valid: optional bool ``(B, H, W)``: False pixels are not counted (nodata).

        Raises:
            ValueError: shapes differ, or target values outside ``[0, K)`` other than ``ignore_index``.
        """
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        if self.mat.device != pred.device:
            self.mat = self.mat.to(pred.device)
        t = target.to(pred.device).long().flatten()
        p = pred.long().flatten()
        keep = t != self.ignore_index
        if valid is not None:
            keep &= valid.to(pred.device).flatten().bool()
        t, p = t[keep], p[keep]
        k = self.num_classes
        bad = (t < 0) | (t >= k) | (p < 0) | (p >= k)
        if bool(bad.any()):  # one host sync per update: wrong labels must not land in another class's bin
            raise ValueError(f"values outside [0, {k}) (ignore_index={self.ignore_index}): target "
                             f"{t[bad].unique().tolist()[:10]}, pred {p[bad].unique().tolist()[:10]}")
        self.mat += torch.bincount(t * k + p, minlength=k * k).view(k, k)

    def reduce(self, accelerator: Any | None = None) -> "ConfusionMatrix":
        """Sum over processes. Returns a new matrix (this one is unchanged, so calling twice cannot double-count).

        Args:
            accelerator: an ``accelerate.Accelerator`` (``reduce(tensor, "sum")`` is used), or None (one process).
        """
        out = ConfusionMatrix(self.num_classes, self.ignore_index, self.class_names, device=self.mat.device)
        mat = self.mat
        if accelerator is not None:
            mat = accelerator.reduce(mat.to(accelerator.device), reduction="sum")
        out.mat = mat.clone()
        return out

    def compute(self) -> dict[str, float]:
        """Metrics as a flat dict of floats.

        Keys: ``mIoU``, ``mF1``, ``OA`` and per class ``IoU/<name>``, ``F1/<name>``. Absent classes (no target and no
        prediction) have NaN per-class values and are left out of the means; means over no class and the accuracy
        of an empty matrix are NaN.
        """
        m = self.mat.double().cpu()
        tp = m.diag()
        fp = m.sum(0) - tp
        fn = m.sum(1) - tp
        denom_iou = tp + fp + fn
        present = denom_iou > 0
        nan = torch.full_like(tp, float("nan"))
        iou = torch.where(present, tp / denom_iou.clamp_min(1), nan)
        f1 = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp_min(1), nan)
        total = m.sum()
        out = {
            "mIoU": float(iou[present].mean()) if present.any() else math.nan,
            "mF1": float(f1[present].mean()) if present.any() else math.nan,
            "OA": float(tp.sum() / total) if total > 0 else math.nan,
        }
        for name, v_iou, v_f1 in zip(self.class_names, iou.tolist(), f1.tolist()):
            out[f"IoU/{name}"] = v_iou
            out[f"F1/{name}"] = v_f1
        return out


# --------------------------------------------------------------------------------------------------------------
# Building (instance) F1
# --------------------------------------------------------------------------------------------------------------


@dataclass
class InstanceCounts:
    """Building-level counts and scores."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def f1(self) -> float:
        # 2TP / (2TP + FP + FN): equals 2PR / (P + R) and is defined (0) when only one of P, R is.
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else math.nan

    def as_dict(self) -> dict[str, float]:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1,
                "tp": float(self.tp), "fp": float(self.fp), "fn": float(self.fn)}


def _label(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, n = ndimage.label(mask, structure=structure)
    return labels, int(n)


def _as_bool_mask(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask, got shape {x.shape}")
    return x.astype(bool)


def match_instances(pred_labels: np.ndarray, n_pred: int, gt_labels: np.ndarray, n_gt: int,
                    iou_threshold: float) -> list[tuple[int, int, float]]:
    """One-to-one matches ``(pred_id, gt_id, iou)`` with IoU >= threshold, greedily by decreasing IoU.

    For ``iou_threshold >= 0.5`` and disjoint instances (connected components) each prediction can reach the
    threshold with at most one ground-truth instance and vice versa, so greedy matching equals the optimal
    (Hungarian) one. Ids start at 1.
    """
    if n_pred == 0 or n_gt == 0:
        return []
    # Joint histogram of (pred id, gt id): intersections of every pair in one pass.
    joint = np.bincount(pred_labels.ravel().astype(np.int64) * (n_gt + 1) + gt_labels.ravel(),
                        minlength=(n_pred + 1) * (n_gt + 1)).reshape(n_pred + 1, n_gt + 1)
    area_p = joint.sum(1)[1:]
    area_g = joint.sum(0)[1:]
    inter = joint[1:, 1:].astype(np.float64)
    iou = inter / (area_p[:, None] + area_g[None, :] - inter)
    pi, gi = np.nonzero(iou >= iou_threshold)
    order = np.argsort(-iou[pi, gi], kind="stable")
    used_p, used_g, out = set(), set(), []
    for idx in order:
        p, g = int(pi[idx]), int(gi[idx])
        if p not in used_p and g not in used_g:
            used_p.add(p)
            used_g.add(g)
            out.append((p + 1, g + 1, float(iou[p, g])))
    return out


def building_f1(pred_mask: Any, gt_mask: Any, iou_threshold: float = SPACENET_IOU_THRESHOLD,
                min_area: int = SPACENET6_MIN_AREA_PX, connectivity: int = 4) -> InstanceCounts:
    """Building-level precision/recall/F1 of one tile, SpaceNet-style.

    Buildings are the connected components of each binary mask. A prediction matched (IoU >= ``iou_threshold``,
    one-to-one) to a ground-truth building of at least ``min_area`` pixels is a TP; matched to a smaller
    (ignored) building it is not counted; unmatched it is an FP. Unmatched ground-truth buildings of at least
    ``min_area`` pixels are FNs.

    Args:
        pred_mask: ``(H, W)`` bool/0-1 predicted building mask (numpy or torch).
        gt_mask: ``(H, W)`` ground-truth building mask. Pixels equal to ``IGNORE_INDEX`` count as background.
        iou_threshold: matching threshold.
        min_area: ground-truth buildings smaller than this (pixels) are ignored.
        connectivity: 4 or 8 neighbourhood for connected components.

    Returns:
        :class:`InstanceCounts` (``.precision``, ``.recall``, ``.f1``, ``.tp``, ``.fp``, ``.fn``).
    """
    gt = gt_mask.detach().cpu().numpy() if isinstance(gt_mask, torch.Tensor) else np.asarray(gt_mask)
    gt = np.where(gt == IGNORE_INDEX, 0, gt)
    gt = _as_bool_mask(gt, "gt_mask")
    pred = _as_bool_mask(pred_mask, "pred_mask")
    if pred.shape != gt.shape:
        raise ValueError(f"pred_mask {pred.shape} and gt_mask {gt.shape} differ")
    pred_labels, n_pred = _label(pred, connectivity)
    gt_labels, n_gt = _label(gt, connectivity)
    gt_area = np.bincount(gt_labels.ravel(), minlength=n_gt + 1)
    ignored_gt = {g for g in range(1, n_gt + 1) if gt_area[g] < min_area}
    matches = match_instances(pred_labels, n_pred, gt_labels, n_gt, iou_threshold)
    tp = sum(1 for _, g, _ in matches if g not in ignored_gt)
    matched_to_ignored = sum(1 for _, g, _ in matches if g in ignored_gt)
    fp = n_pred - tp - matched_to_ignored
    fn = (n_gt - len(ignored_gt)) - tp
    return InstanceCounts(tp=tp, fp=fp, fn=fn)


class BuildingF1:
    """Accumulates :func:`building_f1` counts over tiles (scores pooled over all buildings, not averaged per tile).

    Args:
        iou_threshold: matching threshold.
        min_area: ground-truth buildings below this many pixels are ignored.
        connectivity: 4 or 8.
    """

    def __init__(self, iou_threshold: float = SPACENET_IOU_THRESHOLD, min_area: int = SPACENET6_MIN_AREA_PX,
                 connectivity: int = 4):
        self.iou_threshold = iou_threshold
        self.min_area = min_area
        self.connectivity = connectivity
        self.counts = InstanceCounts()

    def reset(self) -> None:
        self.counts = InstanceCounts()

    def update(self, pred_mask: Any, gt_mask: Any) -> InstanceCounts:
        """Score one tile ``(H, W)`` or a batch ``(B, H, W)``; returns this call's counts."""
        pred_np = pred_mask.detach().cpu().numpy() if isinstance(pred_mask, torch.Tensor) else np.asarray(pred_mask)
        gt_np = gt_mask.detach().cpu().numpy() if isinstance(gt_mask, torch.Tensor) else np.asarray(gt_mask)
        if pred_np.ndim == 2:
            pred_np, gt_np = pred_np[None], gt_np[None]
        batch = InstanceCounts()
        for p, g in zip(pred_np, gt_np):
            c = building_f1(p, g, self.iou_threshold, self.min_area, self.connectivity)
            batch.tp += c.tp
            batch.fp += c.fp
            batch.fn += c.fn
        self.counts.tp += batch.tp
        self.counts.fp += batch.fp
        self.counts.fn += batch.fn
        return batch

    def reduce(self, accelerator: Any | None = None) -> InstanceCounts:
        """Counts summed over processes (each process must score distinct tiles)."""
        if accelerator is None:
            return InstanceCounts(self.counts.tp, self.counts.fp, self.counts.fn)
        t = torch.tensor([self.counts.tp, self.counts.fp, self.counts.fn], dtype=torch.int64, device=accelerator.device)
        tp, fp, fn = accelerator.reduce(t, reduction="sum").tolist()
        return InstanceCounts(int(tp), int(fp), int(fn))

    def compute(self) -> dict[str, float]:
        """``precision``, ``recall``, ``f1``, ``tp``, ``fp``, ``fn`` of this process's counts."""
        return self.counts.as_dict()
