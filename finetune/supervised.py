"""Supervised baseline: DeepLab trained on the labelled split only.

Paper: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation" (DeepLab v3, 2017) and
"Encoder-Decoder with Atrous Separable Convolution" (DeepLab v3+, 2018); v2 from Chen et al. 2016/2017.

Equation map:
    L = (1 / |P|) sum_{p in P, y_p != 255} l(f(x)_p, y_p)   ->  ``SegmentationLoss`` in :mod:`finetune.losses`
    L_total = L(main) + lambda_aux * L(aux)                  ->  ``Supervised.forward``

Notation: ``x_l`` labelled images (B, C, H, W), ``y_l`` masks (B, H, W) with 255 = ignore, ``logits_l`` (B, K, H, W).

Deviations: none; the auxiliary head (when the model has one) adds ``aux_weight`` times the same loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.optim import param_groups_no_wd_for_norm_and_bias

__all__ = ["SupervisedConfig", "Supervised"]


@dataclass(frozen=True)
class SupervisedConfig:
    """Hyper-parameters of the supervised baseline (section ``supervised``)."""

    aux_weight: float = 0.4  # lambda_aux: weight of the auxiliary-head loss (ignored without an aux head)

    def validate(self) -> None:
        if self.aux_weight < 0:
            raise ValueError(f"supervised.aux_weight must be >= 0, got {self.aux_weight}")


class Supervised(nn.Module):
    """Plain supervised training of a segmenter.

    Args:
        model: a :class:`finetune.deeplab.DeepLab` (any module returning an object with ``logits``/``aux``).
        criterion: the segmentation loss ``criterion(logits, target) -> scalar``.
        cfg: method hyper-parameters.
        backbone_lr_mult: lr multiplier of the backbone's parameter groups.
    """

    eval_prefix = "model."  # state_dict prefix of the network used for evaluation and prediction

    def __init__(self, model: nn.Module, criterion: nn.Module, cfg: SupervisedConfig, backbone_lr_mult: float = 1.0,
                 freeze_backbone: bool = False):
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.cfg = cfg
        self.backbone_lr_mult = backbone_lr_mult
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:  # linear probing: only the head learns; the backbone's BatchNorm statistics stay fixed
            self.model.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "Supervised":
        super().train(mode)
        if self.freeze_backbone:
            self.model.backbone.eval()
        return self

    def param_groups(self) -> list[dict]:
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return param_groups_no_wd_for_norm_and_bias(params, prefix_scales={"backbone.": self.backbone_lr_mult})

    @property
    def eval_model(self) -> nn.Module:
        """The network evaluated and exported for prediction."""
        return self.model

    def forward(self, batch: dict, step: int, epoch: int) -> dict[str, torch.Tensor]:
        # 1. labelled batch
        x_l, y_l = batch["labelled"]["image"], batch["labelled"]["mask"]
        # 2. prediction and loss
        out = self.model(x_l)
        loss_sup = self.criterion(out.logits, y_l)
        losses = {"loss_sup": loss_sup}
        loss = loss_sup
        if getattr(out, "aux", None) is not None and self.cfg.aux_weight > 0:
            loss_aux = self.criterion(out.aux, y_l)
            losses["loss_aux"] = loss_aux
            loss = loss + self.cfg.aux_weight * loss_aux
        return {"loss": loss, **{k: v.detach() for k, v in losses.items()}}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K, H, W) of the model used for evaluation."""
        return self.eval_model(x).logits
