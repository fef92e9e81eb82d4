"""Segmentation losses: cross-entropy, online hard example mining (OHEM) cross-entropy, soft Dice.

Every loss is a :class:`SegmentationLoss`: ``loss(logits (B, K, H, W), target (B, H, W) int64) -> scalar``, with
pixels equal to ``ignore_index`` (:data:`common.bands.IGNORE_INDEX`, 255) left out. Losses are computed in float32
whatever the autocast dtype of the logits, and a batch whose pixels are all ignored gives a zero loss (still
connected to the graph) instead of the ``0 / 0 = NaN`` of ``F.cross_entropy(reduction="mean")``, so the engine's
finite-loss check does not stop a run on an all-nodata crop.

Equation map (``p`` valid pixel, ``y_p`` its class, ``q_p = softmax(z_p)``, ``w_k`` class weights, default 1):
    CE:    L = sum_p w_{y_p} (-log q_p[y_p]) / sum_p w_{y_p}                          -> ``CrossEntropyLoss``
    OHEM:  the same sum over the hard pixels H only                                   -> ``OhemCrossEntropyLoss``
           H = {p : q_p[y_p] < max(tau, q_(m))}, q_(m) the (m+1)-th smallest q_p[y_p], m = min_kept * B
           (``thresh=None``: H = the m pixels with the largest loss)
    Dice:  L = 1 - mean_{k in present} (2 sum_p q_pk g_pk + s) / (sum_p q_pk + sum_p g_pk + s)  -> ``DiceLoss``
           (g one-hot target, sums over the whole batch, ``present`` = classes in the batch's target)

References: OHEM as in Wu et al. 2016 ("High-performance semantic segmentation using very deep fully convolutional
networks") and mmsegmentation's ``OHEMPixelSampler``; soft Dice as in Milletari et al. 2016 (V-Net).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.bands import IGNORE_INDEX

__all__ = [
    "SegmentationLoss",
    "CrossEntropyLoss",
    "OhemCrossEntropyLoss",
    "DiceLoss",
    "CombinedLoss",
    "LOSSES",
    "build_segmentation_loss",
    "DEFAULT_OHEM_THRESH",
    "DEFAULT_OHEM_MIN_KEPT",
    "DEFAULT_DICE_SMOOTH",
]

DEFAULT_OHEM_THRESH = 0.7
"""OHEM probability threshold tau: pixels whose true-class probability is below it are hard (mmseg default)."""

DEFAULT_OHEM_MIN_KEPT = 100_000
"""OHEM: at least this many pixels per image are kept (mmseg's ``min_kept``; PS-MT uses 200k per batch)."""

DEFAULT_DICE_SMOOTH = 1.0
"""Additive smoothing ``s`` of the soft Dice ratio (keeps it defined for empty classes)."""


def _class_weight_tensor(class_weights: Sequence[float] | torch.Tensor | None, num_classes: int) -> torch.Tensor | None:
    if class_weights is None:
        return None
    w = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
    if w.numel() != num_classes:
        raise ValueError(f"class_weights has {w.numel()} entries, expected num_classes={num_classes}")
    if (w < 0).any():
        raise ValueError("class_weights must be >= 0")
    return w


class SegmentationLoss(nn.Module):
    """Base class: ``forward(logits (B, K, H, W), target (B, H, W)) -> scalar``.

    Args:
        num_classes: K.
        ignore_index: target value left out of the loss.
        class_weights: optional per-class weights ``w_k`` (length K).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 class_weights: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.register_buffer("class_weights", _class_weight_tensor(class_weights, num_classes), persistent=False)

    def _check(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.ndim != 4 or target.ndim != 3 or logits.shape[0] != target.shape[0] \
                or logits.shape[2:] != target.shape[1:]:
            raise ValueError(f"expected logits (B, K, H, W) and target (B, H, W) of the same B, H, W; got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}")
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, the loss was built for {self.num_classes}")

    def _pixel_ce(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel weighted CE (0 at ignored pixels) and per-pixel weight (0 at ignored pixels), both (B, H, W)."""
        loss = F.cross_entropy(logits.float(), target, weight=self.class_weights, ignore_index=self.ignore_index,
                               reduction="none")
        valid = target != self.ignore_index
        if self.class_weights is None:
            weight = valid.to(loss.dtype)
        else:
            weight = self.class_weights[target.clamp(0, self.num_classes - 1)] * valid
        return loss, weight


class CrossEntropyLoss(SegmentationLoss):
    """Pixel-wise cross-entropy, averaged over valid pixels (weighted mean with class weights, like PyTorch)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check(logits, target)
        loss, weight = self._pixel_ce(logits, target)
        # sum / clamp(sum of weights): equals PyTorch's "mean" and gives 0 (not NaN) when every pixel is ignored.
        return loss.sum() / weight.sum().clamp_min(torch.finfo(loss.dtype).tiny)


class OhemCrossEntropyLoss(SegmentationLoss):
    """Cross-entropy over the hard pixels only (online hard example mining).

    With ``thresh`` set, a pixel is hard when its true-class probability is below ``max(thresh, q_(m))`` where
    ``q_(m)`` is the ``(m+1)``-th smallest true-class probability and ``m = min_kept * B``: at least ``m`` pixels are
    kept, and every pixel less confident than ``thresh``. With ``thresh=None`` the ``m`` pixels with the largest loss
    are kept. When a batch has at most ``m`` valid pixels, all are kept.

    Args:
        num_classes: K.
        thresh: probability threshold tau in (0, 1], or None for loss ranking only.
        min_kept: pixels kept per image at least.
        ignore_index: target value left out.
        class_weights: optional per-class weights.
    """

    def __init__(self, num_classes: int, thresh: float | None = DEFAULT_OHEM_THRESH,
                 min_kept: int = DEFAULT_OHEM_MIN_KEPT, ignore_index: int = IGNORE_INDEX,
                 class_weights: Sequence[float] | torch.Tensor | None = None):
        super().__init__(num_classes, ignore_index, class_weights)
        if thresh is not None and not 0 < thresh <= 1:
            raise ValueError(f"ohem thresh must be in (0, 1], got {thresh}")
        if min_kept < 1:
            raise ValueError(f"ohem min_kept must be >= 1, got {min_kept}")
        self.thresh = thresh
        self.min_kept = min_kept

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check(logits, target)
        loss, weight = self._pixel_ce(logits, target)
        valid = target != self.ignore_index
        n_keep = self.min_kept * target.shape[0]
        with torch.no_grad():  # the selection is not differentiated through
            if self.thresh is not None:
                # True-class probability q_p[y_p] = exp(-CE) (unweighted), 1.0 (never hard) at ignored pixels.
                ce_plain = F.cross_entropy(logits.detach().float(), target, ignore_index=self.ignore_index,
                                           reduction="none")
                prob = torch.where(valid, torch.exp(-ce_plain), torch.ones_like(ce_plain)).flatten()
                n_valid = int(valid.sum())
                if n_valid > n_keep:
                    kth = torch.kthvalue(prob, n_keep + 1).values  # (m+1)-th smallest
                    threshold = torch.clamp(kth, min=self.thresh)
                    hard = (prob < threshold) & valid.flatten()
                else:
                    hard = valid.flatten()
            else:
                ranked = torch.where(valid, loss.detach(), torch.full_like(loss, -1.0)).flatten()
                k = min(n_keep, int(valid.sum()))
                hard = torch.zeros_like(ranked, dtype=torch.bool)
                if k > 0:
                    hard[torch.topk(ranked, k).indices] = True
            hard = hard.view_as(loss)
        kept_weight = weight * hard
        return (loss * hard).sum() / kept_weight.sum().clamp_min(torch.finfo(loss.dtype).tiny)


class DiceLoss(SegmentationLoss):
    """Multi-class soft Dice loss, ``1 - mean`` over the classes present in the batch's target.

    Sums run over the whole batch (one Dice per class). Ignored pixels contribute neither probability nor target.
    Classes absent from the target are left out of the mean (their Dice would only measure how little they are
    predicted, which cross-entropy already handles); a batch with no valid pixel gives 0. ``class_weights`` turn
    the mean into a weighted mean over the present classes.

    Args:
        num_classes: K.
        smooth: additive smoothing ``s``.
        ignore_index: target value left out.
        class_weights: optional per-class weights.
    """

    def __init__(self, num_classes: int, smooth: float = DEFAULT_DICE_SMOOTH, ignore_index: int = IGNORE_INDEX,
                 class_weights: Sequence[float] | torch.Tensor | None = None):
        super().__init__(num_classes, ignore_index, class_weights)
        if smooth < 0:
            raise ValueError(f"dice smooth must be >= 0, got {smooth}")
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check(logits, target)
        valid = (target != self.ignore_index).unsqueeze(1)  # (B, 1, H, W)
        q = logits.float().softmax(dim=1) * valid  # (B, K, H, W)
        g = F.one_hot(target.clamp(0, self.num_classes - 1), self.num_classes).permute(0, 3, 1, 2) * valid
        g = g.to(q.dtype)
        dims = (0, 2, 3)
        intersection = (q * g).sum(dims)  # (K,)
        cardinality = q.sum(dims) + g.sum(dims)
        dice = (2 * intersection + self.smooth) / (cardinality + self.smooth).clamp_min(torch.finfo(q.dtype).tiny)
        present = (g.sum(dims) > 0).to(q.dtype)
        w = present if self.class_weights is None else present * self.class_weights
        # No host sync: with no class present the numerator is 0 and the loss 0 (still connected to the graph).
        return ((1 - dice) * w).sum() / w.sum().clamp_min(torch.finfo(q.dtype).tiny)


class CombinedLoss(SegmentationLoss):
    """Weighted sum of losses: ``sum_i lambda_i L_i`` (e.g. CE + Dice for building masks)."""

    def __init__(self, losses: Sequence[SegmentationLoss], weights: Sequence[float]):
        if len(losses) != len(weights) or not losses:
            raise ValueError("CombinedLoss needs one weight per loss")
        super().__init__(losses[0].num_classes, losses[0].ignore_index)
        self.losses = nn.ModuleList(losses)
        self.weights = tuple(float(w) for w in weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * loss(logits, target) for w, loss in zip(self.weights, self.losses))


def _ce(num_classes: int, class_weights=None, ignore_index: int = IGNORE_INDEX) -> SegmentationLoss:
    return CrossEntropyLoss(num_classes, ignore_index, class_weights)


def _ohem(num_classes: int, class_weights=None, ignore_index: int = IGNORE_INDEX,
          thresh: float | None = DEFAULT_OHEM_THRESH, min_kept: int = DEFAULT_OHEM_MIN_KEPT) -> SegmentationLoss:
    return OhemCrossEntropyLoss(num_classes, thresh, min_kept, ignore_index, class_weights)


def _dice(num_classes: int, class_weights=None, ignore_index: int = IGNORE_INDEX,
          smooth: float = DEFAULT_DICE_SMOOTH) -> SegmentationLoss:
    return DiceLoss(num_classes, smooth, ignore_index, class_weights)


def _ce_dice(num_classes: int, class_weights=None, ignore_index: int = IGNORE_INDEX,
             smooth: float = DEFAULT_DICE_SMOOTH, dice_weight: float = 1.0) -> SegmentationLoss:
    return CombinedLoss([CrossEntropyLoss(num_classes, ignore_index, class_weights),
                         DiceLoss(num_classes, smooth, ignore_index)], [1.0, dice_weight])


LOSSES: dict[str, Callable[..., SegmentationLoss]] = {
    "ce": _ce,
    "ohem": _ohem,
    "dice": _dice,
    "ce_dice": _ce_dice,
}
"""Loss factories by name: ``factory(num_classes, class_weights=None, ignore_index=255, **kw)``."""


def build_segmentation_loss(name: str, num_classes: int, class_weights: Sequence[float] | None = None,
                            **kw: Any) -> SegmentationLoss:
    """Build a loss by name (``ce``, ``ohem``, ``dice``, ``ce_dice``).

    Args:
        name: key of :data:`LOSSES`.
        num_classes: K.
        class_weights: optional per-class weights.
        **kw: the factory's options (``ignore_index``; ``thresh``/``min_kept`` for ``ohem``; ``smooth`` for ``dice``;
            ``smooth``/``dice_weight`` for ``ce_dice``).

    Raises:
        KeyError: unknown name (the message lists the valid names).
        TypeError: an option the named loss does not take.
    """
    if name not in LOSSES:
        raise KeyError(f"unknown segmentation loss {name!r}; valid names: {sorted(LOSSES)}")
    return LOSSES[name](num_classes, class_weights=class_weights, **kw)
