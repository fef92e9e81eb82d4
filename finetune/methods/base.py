"""What every segmentation method shares: the segmenter being fine-tuned, its loss, parameter groups with the
backbone's lr multiplier, optional backbone freezing, and the supervised term with the auxiliary head.

A segmentation method is built as ``Method(cfg, model, setup)``: ``cfg`` its own config section, ``model`` the
DeepLab to train (``self.model``, evaluated and used for prediction: ``state_dict`` prefix ``model.``), ``setup``
the run's :class:`SegSetup` (classes, loss, band units, a factory for further segmenters such as teachers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from common.bands import IGNORE_INDEX
from common.ema import make_teacher
from common.method import Method
from common.optim import param_groups_no_wd_for_norm_and_bias

__all__ = ["SegSetup", "SegMethod", "make_teacher"]


@dataclass
class SegSetup:
    """The run-level facts a segmentation method may need."""

    num_classes: int
    criterion: nn.Module  # segmentation loss criterion(logits, target) with ignore index 255
    band_units: tuple[str, ...] = ()  # per band: "reflectance", "db", "other" (SAR-safe augmentations)
    band_std: np.ndarray | None = None  # per-band std in model units (speckle in normalised space)
    backbone_lr_mult: float = 1.0
    freeze_backbone: bool = False
    make_model: Callable[[], nn.Module] | None = None  # a fresh segmenter as configured (e.g. a second student)
    class_names: tuple[str, ...] | None = None
    ignore_index: int = IGNORE_INDEX
    weights: str | None = None  # model.weights: the backbone file the run started from (a DINO export), if any
    init_from: str | None = None  # model.init_from: the run whose whole segmenter the run started from, if any


class SegMethod(Method):
    """Base of the fine-tuning methods: ``self.model`` is trained (in DDP) and evaluated."""

    tasks: ClassVar[tuple[str, ...]] = ("semisup",)  # entry scripts that offer it: semisup (finetune/semisup.py), uda
    views: ClassVar[dict[str, int]] = {}  # stream -> number of strong views per sample (MultiViewTransform)
    trainable = ("model",)
    eval_prefix = "model."

    def __init__(self, cfg: Any, model: nn.Module, setup: SegSetup):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.criterion = setup.criterion
        object.__setattr__(self, "setup", setup)  # plain attribute: not a sub-module, not in the state_dict
        if setup.freeze_backbone:  # linear probing: only the head learns; the backbone's BN statistics stay fixed
            self.model.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "SegMethod":
        super().train(mode)
        if self.setup.freeze_backbone:
            self.model.backbone.eval()
        return self

    def seg_param_groups(self, module: nn.Module) -> list[dict]:
        """No weight decay on biases / norms; ``model.backbone_lr_mult`` on the backbone."""
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        return param_groups_no_wd_for_norm_and_bias(params, prefix_scales={"backbone.": self.setup.backbone_lr_mult})

    def param_groups(self) -> list[dict]:
        return self.seg_param_groups(self.model)

    def supervised_loss(self, out: Any, target: torch.Tensor, aux_weight: float) -> tuple[torch.Tensor, dict]:
        """``L(main) + aux_weight * L(aux)`` (the aux term only when the model has an auxiliary head)."""
        loss_sup = self.criterion(out.logits, target)
        parts = {"loss_sup": loss_sup.detach()}
        loss = loss_sup
        if getattr(out, "aux", None) is not None and aux_weight > 0:
            loss_aux = self.criterion(out.aux, target)
            parts["loss_aux"] = loss_aux.detach()
            loss = loss + aux_weight * loss_aux
        return loss, parts

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K, H, W) of the model used for evaluation."""
        return self.eval_model(x).logits
