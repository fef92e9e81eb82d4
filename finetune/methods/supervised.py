"""Supervised baseline: DeepLab trained on the labelled split only (``method=supervised``).

Paper: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation" (DeepLab v3, 2017) and
"Encoder-Decoder with Atrous Separable Convolution" (DeepLab v3+, 2018); v2 from Chen et al. 2016/2017.

Equation map:
    L = (1 / |P|) sum_{p in P, y_p != 255} l(f(x)_p, y_p)   ->  ``SegmentationLoss`` in :mod:`finetune.losses`
    L_total = L(main) + lambda_aux * L(aux)                  ->  ``SegMethod.supervised_loss``

Notation: ``x_l`` labelled images (B, C, H, W), ``y_l`` masks (B, H, W) with 255 = ignore, ``logits_l`` (B, K, H, W).

Deviations: none; the auxiliary head (when the model has one) adds ``aux_weight`` times the same loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.methods import register
from finetune.methods.base import SegMethod

__all__ = ["SupervisedConfig", "Supervised"]


@dataclass(frozen=True)
class SupervisedConfig:
    """Hyper-parameters of the supervised baseline (section ``supervised``)."""

    aux_weight: float = 0.4  # lambda_aux: weight of the auxiliary-head loss (ignored without an aux head)

    def validate(self) -> None:
        if self.aux_weight < 0:
            raise ValueError(f"supervised.aux_weight must be >= 0, got {self.aux_weight}")


@register
class Supervised(SegMethod):
    """Plain supervised training of a segmenter on the labelled stream."""

    name = "supervised"
    Config = SupervisedConfig
    tasks = ("semisup",)
    streams = ("labelled",)

    def training_step(self, batch: dict, ctx) -> dict[str, torch.Tensor]:
        b = batch[self.streams[0]]  # the labelled stream ("source" for the adaptation baseline)
        x_l, y_l = b["image"], b["mask"]  # 1. labelled batch
        out = self.wrapped("model")(x_l)  # 2. prediction (through DDP)
        loss, parts = self.supervised_loss(out, y_l, self.cfg.aux_weight)  # 3. L_total
        return {"loss": loss, **parts}
