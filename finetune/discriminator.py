"""The fully-convolutional domain discriminator of output-space adversarial adaptation (AdaptSegNet, ADVENT), its
config, its default optimiser and the masked binary cross-entropy both methods train it (and fool it) with.

Papers: Tsai, Hung, Schulter, Sohn, Yang, Chandraker, "Learning to Adapt Structured Output Space for Semantic
Segmentation", CVPR 2018 (Sec. 3.3 "Discriminator"); Vu, Jain, Bucher, Cord, Perez, "ADVENT: Adversarial Entropy
Minimization for Domain Adaptation in Semantic Segmentation", CVPR 2019 (the same network, DCGAN-like).
Reference code: wasidennis/AdaptSegNet ``model/discriminator.py`` (``FCDiscriminator``), valeoai/ADVENT
``advent/model/discriminator.py`` (``get_fc_discriminator``); behaviour checked against them, no code copied.

Structure map (``C_in`` input channels: the K class probabilities for AdaptSegNet, the K-channel self-information
map for ADVENT):

    x (B, C_in, H, W) -> [conv k x k, stride s, padding p -> LeakyReLU(slope)] for each width in ``channels``
                      -> conv k x k, stride s, padding p to 1 channel -> logits (B, 1, h, w)

With the released defaults (``channels = (64, 128, 256, 512)``, kernel 4, stride 2, padding 1, slope 0.2, no
normalisation layers, biases on) every convolution halves the size: ``h = H / 32`` for ``H`` a multiple of 32
(:func:`discriminator_output_size` gives it in general). The output is a patch map of logits; label convention of
both papers: **source = 0, target = 1** (:data:`SOURCE_LABEL`, :data:`TARGET_LABEL`).

Masked loss: EO tiles carry nodata pixels (``valid = False``), which neither reference has. :func:`masked_input`
zeroes the discriminator's input there (so no gradient reaches those pixels' logits), and :func:`bce_to_label`
weights every output cell by the valid fraction of its footprint (:func:`valid_fraction`, an area average of the
valid mask onto the output grid), so a cell over nodata only does not enter the loss. On tiles without nodata the
loss is the references' ``BCEWithLogitsLoss`` (mean over cells) exactly.

Deviations from the reference code: channel widths, kernel, stride, padding and slope are config values (the
references hard-code ``ndf = 64`` and 0.2); the nodata weighting above; the LeakyReLU is not in-place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.optim import OptimConfig

__all__ = ["SOURCE_LABEL", "TARGET_LABEL", "DiscriminatorConfig", "FCDiscriminator", "default_discriminator_optim",
           "discriminator_output_size", "masked_input", "valid_fraction", "bce_to_label"]

SOURCE_LABEL = 0.0
"""Discriminator label of source-domain outputs (AdaptSegNet / ADVENT ``source_label = 0``)."""
TARGET_LABEL = 1.0
"""Discriminator label of target-domain outputs (``target_label = 1``)."""


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The discriminator's architecture (``<method>.discriminator``); defaults: the released ``FCDiscriminator``."""

    channels: tuple[int, ...] = (64, 128, 256, 512)  # hidden widths (ndf * (1, 2, 4, 8), ndf = 64)
    kernel_size: int = 4  # every convolution, classifier included
    stride: int = 2
    padding: int = 1
    negative_slope: float = 0.2  # LeakyReLU slope

    def validate(self) -> None:
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"discriminator.channels must be a non-empty list of widths >= 1, got {self.channels}")
        if self.kernel_size < 1 or self.stride < 1 or self.padding < 0:
            raise ValueError("discriminator.kernel_size and stride must be >= 1, padding >= 0")
        if self.negative_slope < 0:
            raise ValueError(f"discriminator.negative_slope must be >= 0, got {self.negative_slope}")


def default_discriminator_optim() -> OptimConfig:
    """Adam, lr 1e-4, betas (0.9, 0.99), no weight decay, poly decay with power 0.9 over the run (both releases:
    ``optim.Adam(D.parameters(), lr=1e-4, betas=(0.9, 0.99))`` and ``adjust_learning_rate_D``). AdamW with zero
    weight decay is Adam."""
    return OptimConfig(name="adamw", lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, schedule="poly", poly_power=0.9,
                       warmup_steps=0)


class FCDiscriminator(nn.Module):
    """Fully-convolutional discriminator (see the module docstring for the structure).

    Args:
        in_channels: channels of the map it judges (K).
        cfg: widths, kernel, stride, padding and LeakyReLU slope.
    """

    def __init__(self, in_channels: int, cfg: DiscriminatorConfig | None = None):
        super().__init__()
        cfg = cfg or DiscriminatorConfig()
        cfg.validate()
        self.cfg = cfg
        layers: list[nn.Module] = []
        width = in_channels
        for out in cfg.channels:
            layers += [nn.Conv2d(width, out, cfg.kernel_size, stride=cfg.stride, padding=cfg.padding),
                       nn.LeakyReLU(cfg.negative_slope)]
            width = out
        layers.append(nn.Conv2d(width, 1, cfg.kernel_size, stride=cfg.stride, padding=cfg.padding))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> logits ``(B, 1, h, w)`` (> 0: "target")."""
        return self.net(x)


def discriminator_output_size(size: Sequence[int], cfg: DiscriminatorConfig | None = None) -> tuple[int, int]:
    """``(h, w)`` of the discriminator's output for an input of spatial ``size`` (convolution arithmetic)."""
    cfg = cfg or DiscriminatorConfig()
    h, w = int(size[0]), int(size[1])
    for _ in range(len(cfg.channels) + 1):
        h = (h + 2 * cfg.padding - cfg.kernel_size) // cfg.stride + 1
        w = (w + 2 * cfg.padding - cfg.kernel_size) // cfg.stride + 1
    return h, w


def masked_input(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``x`` (B, C, H, W) with every channel zeroed where ``valid`` (B, H, W) is False (identity for None)."""
    if valid is None:
        return x
    return x * valid.unsqueeze(1).to(x.dtype)


def valid_fraction(valid: torch.Tensor | None, out_size: Sequence[int], batch: int,
                   device: torch.device | None = None) -> torch.Tensor:
    """``(B, 1, h, w)`` float32: the fraction of valid input pixels under each discriminator output cell (an
    adaptive area average of ``valid`` (B, H, W)); all ones for ``valid=None``."""
    if valid is None:
        return torch.ones(batch, 1, *out_size, device=device)
    return F.adaptive_avg_pool2d(valid.unsqueeze(1).float(), tuple(out_size))


def bce_to_label(d_logits: torch.Tensor, label: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of discriminator logits ``(B, 1, h, w)`` against the constant ``label`` (0 source,
    1 target), averaged over the output cells with ``weight`` (broadcastable to the logits: valid fractions, times a
    per-sample selection); the plain mean without weights. 0 (with the graph kept) when every weight is 0."""
    d = d_logits.float()
    loss = F.binary_cross_entropy_with_logits(d, torch.full_like(d, float(label)), reduction="none")
    if weight is None:
        return loss.mean()
    w = weight.to(loss.dtype).expand_as(loss)
    return (loss * w).sum() / w.sum().clamp_min(1e-12)
