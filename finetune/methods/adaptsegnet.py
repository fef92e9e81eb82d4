"""AdaptSegNet: output-space adversarial domain adaptation, multi-level (``method=adaptsegnet`` of ``finetune/uda.py``).

Paper: Tsai, Hung, Schulter, Sohn, Yang, Chandraker, "Learning to Adapt Structured Output Space for Semantic
Segmentation", CVPR 2018. Reference code: github.com/wasidennis/AdaptSegNet (``train_gta2cityscapes_multi.py``,
``model/discriminator.py``); behaviour checked against it, no code copied.

A segmenter G (DeepLab, ``self.model``) is trained on the labelled source while, at each output level ``l`` (the
main head and the auxiliary head on the stage before, AdaptSegNet's ``layer5`` classifier on ``conv4``), a
discriminator D_l (:class:`finetune.discriminator.FCDiscriminator`) learns to tell the softmax maps of source images
(label 0) from those of target images (label 1), and G learns to make target maps look like source ones.

Equation map (``P = softmax(G(x))`` at input resolution, ``y_s`` source masks with 255 = ignore and on nodata,
``v`` the valid-pixel masks, ``w_v`` the valid fraction under each discriminator output cell):

    L_seg = CE(P_s^main, y_s) + lambda_seg CE(P_s^aux, y_s)              -> step 1 (``self.criterion``)
                                                                          lambda_seg = ``seg_aux_weight``
    L_adv = sum_l lambda_adv^l BCE_{w_v}(D_l(P_t^l * v_t), 0)             -> step 2, D_l frozen (plain modules)
            lambda_adv^main = ``adv_weight``, lambda_adv^aux = ``adv_aux_weight``
    L_D^l = 0.5 BCE_{w_v}(D_l(sg(P_s^l) * v_s), 0) + 0.5 BCE_{w_v}(D_l(sg(P_t^l) * v_t), 1)
                                                                          -> step 3, ``disc_weight`` = 0.5
    (BCE_{w_v}: :func:`finetune.discriminator.bce_to_label`; sg = stop-gradient)

Update order (as the release): G's backward on the source segmentation loss, then on the target adversarial loss
through the frozen discriminators; G steps (SGD, the run's ``optim`` section); then each discriminator on the
detached source and target maps of the same step (each its own Adam, ``disc_optim``, poly schedule). The
discriminators' gradients come only from L_D (the generator's adversarial loss flows through the plain modules
with ``requires_grad`` off: :func:`common.method.frozen`), and the segmenter's only from L_seg + L_adv (the
discriminators read detached maps; G's gradients are cleared after its step).

Defaults, from the release (``train_gta2cityscapes_multi.py``): ``LAMBDA_SEG = 0.1``, ``LAMBDA_ADV_TARGET1 = 0.0002``
(aux), ``LAMBDA_ADV_TARGET2 = 0.001`` (main), ``LEARNING_RATE_D = 1e-4`` with Adam betas (0.9, 0.99) and the same
poly decay (power 0.9), discriminator 4x4 convs, stride 2, widths 64-128-256-512-1, LeakyReLU 0.2, no
normalisation, ``source_label = 0``, ``target_label = 1``. The release's segmenter optimiser (SGD, lr 2.5e-4,
momentum 0.9, weight decay 5e-4, poly 0.9, 10x lr on the classifiers) is the run's ``optim`` section and
``model.backbone_lr_mult`` (0.1 gives the 10x ratio), not this section.

Deviations from the reference code:

* Nodata: the discriminators' input is zeroed on invalid pixels and each output cell is weighted by its valid
  fraction (:mod:`finetune.discriminator`); source masks are 255 on nodata, so invalid pixels enter no loss.
  Without nodata the losses are the release's.
* Segmenter: the platform's DeepLab v2 sums all four ASPP branches (the release sums two); logits are bilinear
  with ``align_corners=False``; the source loss is the run's ``loss`` section (the release: cross-entropy).
* ``levels: [main]`` trains the single-level variant (one discriminator); ``[main, aux]`` (default) needs the
  auxiliary head (``model.aux=true``; with ``model.version=v2`` it is the release's v2 classifier on the stage before
  the last). With ``levels: [main]`` and an aux head, the aux head still gets its supervised source loss.
* The release steps G after the discriminators' backward; here G steps first. Both update the discriminators from
  the maps G produced *before* its step, so the updates are the same.
* The least-squares GAN option of the release (``--gan LS``) is not offered (its default and the paper use BCE).
* With gradient accumulation (``trainer.grad_accum_steps``) both G and D accumulate over the micro-batches
  (the release's ``iter_size``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from common.errors import UserInputError
from common.method import OptimizerSpec, frozen
from common.optim import OptimConfig, param_groups_no_wd_for_norm_and_bias
from finetune.discriminator import (
    SOURCE_LABEL,
    TARGET_LABEL,
    DiscriminatorConfig,
    FCDiscriminator,
    bce_to_label,
    default_discriminator_optim,
    masked_input,
    valid_fraction,
)
from finetune.methods import register
from finetune.methods.base import SegMethod, SegSetup

__all__ = ["AdaptSegNetConfig", "AdaptSegNet", "LEVELS", "level_logits", "check_levels"]

LEVELS = ("main", "aux")
"""Output levels: the main head's logits and the auxiliary head's."""


@dataclass(frozen=True)
class AdaptSegNetConfig:
    """Hyper-parameters of AdaptSegNet (section ``adaptsegnet``); sources in the module docstring."""

    levels: tuple[Literal["main", "aux"], ...] = ("main", "aux")  # output levels with a discriminator (multi-level)
    seg_aux_weight: float = 0.1  # LAMBDA_SEG: source loss of the aux head (used whenever the model has one)
    adv_weight: float = 0.001  # LAMBDA_ADV_TARGET2: adversarial loss of the main level
    adv_aux_weight: float = 0.0002  # LAMBDA_ADV_TARGET1: adversarial loss of the aux level
    disc_weight: float = 0.5  # each domain's BCE in the discriminator loss (the release's loss_D / 2)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    disc_optim: OptimConfig = field(default_factory=default_discriminator_optim)  # one Adam per discriminator

    def validate(self) -> None:
        check_levels(self.levels, "adaptsegnet")
        for key in ("seg_aux_weight", "adv_weight", "adv_aux_weight", "disc_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"adaptsegnet.{key} must be >= 0, got {getattr(self, key)}")
        self.discriminator.validate()
        self.disc_optim.validate()


def check_levels(levels: tuple[str, ...], section: str) -> None:
    """``levels`` must be a non-empty list of distinct names of :data:`LEVELS`."""
    if not levels or len(set(levels)) != len(levels) or any(lv not in LEVELS for lv in levels):
        raise ValueError(f"{section}.levels must list distinct levels of {list(LEVELS)}, got {list(levels)}")


def level_logits(out: Any, level: str) -> torch.Tensor:
    """The logits of an output level of a :class:`finetune.deeplab.SegmenterOutput`."""
    return out.logits if level == "main" else out.aux


def require_aux_head(model: torch.nn.Module, levels: tuple[str, ...], section: str) -> None:
    """Refuse the aux level on a segmenter without an auxiliary head, naming the keys that fix it."""
    if "aux" in levels and getattr(model, "aux_head", None) is None:
        raise UserInputError(
            f"{section}.levels includes 'aux' (multi-level adaptation) but the segmenter has no auxiliary head: set "
            f"model.aux=true (with model.version=v2 it is AdaptSegNet's classifier on the stage before the last), "
            f"or {section}.levels=[main] for the single-level variant")


@register
class AdaptSegNet(SegMethod):
    """Output-space adversarial adaptation with one discriminator per output level (manual optimisation)."""

    name = "adaptsegnet"
    Config = AdaptSegNetConfig
    tasks = ("uda",)
    streams = ("source", "target")
    trainable = ("model", "disc_main", "disc_aux")  # the instance keeps the configured levels' discriminators
    manual_optimization = True

    def __init__(self, cfg: AdaptSegNetConfig, model: torch.nn.Module, setup: SegSetup):
        super().__init__(cfg, model, setup)
        require_aux_head(model, cfg.levels, "adaptsegnet")
        for level in cfg.levels:
            setattr(self, f"disc_{level}", FCDiscriminator(setup.num_classes, cfg.discriminator))
        self.trainable = ("model", *(f"disc_{level}" for level in cfg.levels))

    def discriminator(self, level: str) -> FCDiscriminator:
        return getattr(self, f"disc_{level}")

    def optimizers(self) -> dict[str, OptimizerSpec]:
        specs = {"main": OptimizerSpec(self.param_groups())}
        for level in self.cfg.levels:
            params = param_groups_no_wd_for_norm_and_bias(self.discriminator(level).named_parameters())
            specs[f"disc_{level}"] = OptimizerSpec(params, self.cfg.disc_optim)
        return specs

    def _adv_weight(self, level: str) -> float:
        return self.cfg.adv_weight if level == "main" else self.cfg.adv_aux_weight

    def training_step(self, batch: dict, ctx) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        src, tgt = batch["source"], batch["target"]
        x_s, y_s, v_s = src["image"], src["mask"], src.get("valid")
        x_t, v_t = tgt["image"], tgt.get("valid")
        model = self.wrapped("model")
        logs: dict[str, torch.Tensor] = {}

        # 1. segmenter on the source: L_seg (backward right after the forward)
        out_s = model(x_s)
        loss_seg = self.criterion(out_s.logits, y_s)
        loss = loss_seg
        logs["loss_seg"] = loss_seg.detach()
        if out_s.aux is not None:
            loss_seg_aux = self.criterion(out_s.aux, y_s)
            loss = loss + cfg.seg_aux_weight * loss_seg_aux
            logs["loss_seg_aux"] = loss_seg_aux.detach()
        ctx.backward(loss, "main")

        # 2. segmenter on the target: fool the frozen discriminators (target maps labelled source = 0)
        out_t = model(x_t)
        maps_s, maps_t = {}, {}
        loss_adv = out_t.logits.new_zeros(())
        with frozen(*(self.discriminator(level) for level in cfg.levels)):
            for level in cfg.levels:
                maps_s[level] = masked_input(level_logits(out_s, level).detach().float().softmax(1), v_s)
                maps_t[level] = masked_input(level_logits(out_t, level).float().softmax(1), v_t)
                d_t = self.discriminator(level)(maps_t[level])  # the plain module: no DDP, no parameter gradient
                adv = bce_to_label(d_t, SOURCE_LABEL, valid_fraction(v_t, d_t.shape[-2:], d_t.shape[0], d_t.device))
                loss_adv = loss_adv + self._adv_weight(level) * adv
                logs["loss_adv" if level == "main" else "loss_adv_aux"] = adv.detach()
        if out_t.aux is not None and "aux" not in cfg.levels:
            loss_adv = loss_adv + 0.0 * out_t.aux.sum()  # every parameter in the graph (DDP without unused params)
        ctx.backward(loss_adv, "main")
        ctx.optimizer_step("main")
        ctx.zero_grad("main")

        # 3. discriminators on the detached maps: source 0, target 1 (each backward right after its forward)
        for level in cfg.levels:
            name = f"disc_{level}"
            disc = self.wrapped(name)
            loss_d = out_t.logits.new_zeros(())
            for maps, valid, label in ((maps_s, v_s, SOURCE_LABEL), (maps_t, v_t, TARGET_LABEL)):
                d = disc(maps[level].detach())
                part = cfg.disc_weight * bce_to_label(d, label, valid_fraction(valid, d.shape[-2:], d.shape[0],
                                                                                d.device))
                ctx.backward(part, name)
                loss_d = loss_d + part.detach()
            ctx.optimizer_step(name)
            ctx.zero_grad(name)
            logs["loss_disc" if level == "main" else "loss_disc_aux"] = loss_d
        return logs
