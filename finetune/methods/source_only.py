"""Source-only baseline of domain adaptation: DeepLab trained on the labelled source domain, evaluated on the target
(``method=source_only`` of ``finetune/uda.py``).

Equation map:
    L = (1 / |P|) sum_{p in P, y_p != 255} l(f(x_s)_p, y_p)   ->  ``SegmentationLoss`` (:mod:`finetune.losses`)
    L_total = L(main) + lambda_aux * L(aux)                    ->  ``SegMethod.supervised_loss``

Notation: ``x_s`` source images (B, C, H, W), ``y_s`` source masks (B, H, W) with 255 = ignore.

The target tiles are not read in training; the target validation set (``data.target.val_split``) is a report
(``target_val/mIoU``), the checkpoint is chosen on the source validation set (``trainer.best_metric: mIoU``).
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.methods import register
from finetune.methods.supervised import Supervised

__all__ = ["SourceOnlyConfig", "SourceOnly"]


@dataclass(frozen=True)
class SourceOnlyConfig:
    """Hyper-parameters of the source-only baseline (section ``source_only``)."""

    aux_weight: float = 0.4  # lambda_aux: weight of the auxiliary-head loss (ignored without an aux head)

    def validate(self) -> None:
        if self.aux_weight < 0:
            raise ValueError(f"source_only.aux_weight must be >= 0, got {self.aux_weight}")


@register
class SourceOnly(Supervised):
    """:class:`~finetune.methods.supervised.Supervised` on the source stream, offered by ``finetune/uda.py``."""

    name = "source_only"
    Config = SourceOnlyConfig
    tasks = ("uda",)
    streams = ("source",)
