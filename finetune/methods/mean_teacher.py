"""Mean teacher for semi-supervised segmentation (``method=mean_teacher``).

Paper: Tarvainen & Valpola, "Mean teachers are better role models: Weight-averaged consistency targets improve
semi-supervised deep learning results", NeurIPS 2017 (arXiv:1703.01780); as used for segmentation by French et al.,
"Semi-supervised semantic segmentation needs strong, varied perturbations", BMVC 2020 (arXiv:1906.01916) and as the
mean-teacher baseline of PS-MT (Liu et al., CVPR 2022).
Reference code: CuriousAI/mean-teacher ``pytorch/main.py`` (EMA, ramp-up), Britefury/cutmix-semisup-seg
``train_seg_semisup_mask_mt.py`` (segmentation: confidence threshold, consistency losses, defaults).

Equation map (``x_l, y_l`` labelled images / masks, ``x_w`` the weak view of an unlabelled crop, ``x_s`` a strong
view of the same crop, pixel-aligned; ``f_s`` the student ``self.model``, ``f_t`` the teacher ``self.teacher``):
    theta_t <- a_t theta_t + (1 - a_t) theta_s after every optimiser step        -> ``after_optimizer_step``
        a_t = min(1 - 1 / (t + 2), alpha) after the 0-based step t               -> ``ema_decay_at`` (``ema_warmup``)
        (Tarvainen's ``min(1 - 1 / (global_step + 1), alpha)``, global_step incremented before the update)
    p_t = softmax(f_t(x_w)), c = max_k p_t, y_hat = argmax_k p_t  (no gradient)   -> ``pseudo_labels``
    m = [c >= tau] * valid                                                       -> ``keep`` in ``consistency_loss``
    L_cons = sum_p m_p l(f_s(x_s)_p, p_t) / N                                     -> ``consistency_loss``
        l = CE(., y_hat) (``consistency: ce``) or sum_k (softmax(f_s)_k - p_t,k)^2 (``consistency: mse``)
        N = number of valid pixels (``denominator: valid``) or of kept ones (``kept``)
    w(t) = w * exp(-5 (1 - min(t / T, 1))^2)                                      -> ``sigmoid_rampup``
    L = CE(f_s(x_l), y_l) [+ lambda_aux CE(aux)] + w(t) L_cons                    -> ``training_step``

Teacher: a copy of the student made with ``make_teacher`` (no gradient, not in DDP, checkpointed with the method).
Its BatchNorm statistics (``teacher_bn``):
    ``copy`` (default): the teacher runs in eval mode and its buffers (running mean / variance) are copied from the
        student after every EMA step (``ema_update_(copy_buffers=True)``): the pseudo-labels of a pixel do not depend on
        the rest of the batch and the teacher's dropout is off.
    ``own``: as Tarvainen's code (``ema_model.train()``, EMA of parameters only): the teacher runs in train mode on
        the weak views (batch statistics, ASPP dropout on) and keeps its own running statistics, used at evaluation.

Deviations from the reference code:
    * French et al. average BatchNorm running statistics with the EMA (every float ``state_dict`` entry); we copy
      them (``copy``) or let the teacher keep its own (``own``, Tarvainen).
    * The ramp-up is indexed by optimiser step, not by epoch (French et al., Tarvainen et al.).
    * ``mse`` sums the squared probability differences over classes (French et al.'s ``var``); Tarvainen's
      ``softmax_mse_loss`` divides by the number of classes K, i.e. ``consistency_weight / K``.
    * ``denominator: valid`` averages over valid pixels (padding and nodata count in neither numerator nor
      denominator); French et al. average over every pixel of the batch, padding included.
    * The student sees the labelled and the strong unlabelled images in one forward pass (one BatchNorm batch), as
      Tarvainen's mixed minibatches; French et al. run two passes.
    * No input mixing (CutMix) or masking in the consistency branch: perturbation comes from the strong view of the
      dataset (``augment.strong``: SAR-safe, no colour jitter).
    * French et al. use no EMA warm-up (``ema_warmup: false``); the default follows Tarvainen's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from common.ema import ema_update_, make_teacher
from common.errors import UserInputError
from finetune.methods import register
from finetune.methods.base import SegMethod
from finetune.methods.common import check_rampup_fits, pseudo_labels, sigmoid_rampup

__all__ = ["MeanTeacherConfig", "MeanTeacher", "ema_decay_at", "consistency_loss"]


@dataclass(frozen=True)
class MeanTeacherConfig:
    """Hyper-parameters of mean teacher (section ``mean_teacher``)."""

    ema_decay: float = 0.99  # alpha: teacher EMA decay (French et al. --teacher_alpha 0.99; Tarvainen 0.99 / 0.999)
    ema_warmup: bool = True  # decay min(1 - 1 / (t + 2), alpha) after step t: a true average early (Tarvainen's code)
    teacher_bn: Literal["copy", "own"] = "copy"  # teacher BatchNorm statistics (module docstring)
    threshold: float = 0.97  # tau: teacher confidence to keep a pixel (French et al. --conf_thresh 0.97; 0: all)
    consistency: Literal["mse", "ce"] = "mse"  # MSE on probabilities (French et al. 'var', Tarvainen) or CE on y_hat
    consistency_weight: float = 1.0  # w: weight of L_cons after the ramp-up (French et al. --cons_weight 1.0)
    rampup_steps: int = 0  # T: sigmoid ramp-up length in steps (0: none, French et al. --rampup -1)
    denominator: Literal["valid", "kept"] = "valid"  # L_cons averaged over valid pixels or over kept pixels only
    aux_weight: float = 0.4  # lambda_aux: auxiliary-head CE on labelled images (model.aux only; as supervised)
    eval_model: Literal["teacher", "student"] = "teacher"  # network evaluated and exported (French et al.: teacher)

    def validate(self) -> None:
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"mean_teacher.ema_decay must be in [0, 1], got {self.ema_decay}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"mean_teacher.threshold must be in [0, 1], got {self.threshold}")
        for key in ("consistency_weight", "aux_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"mean_teacher.{key} must be >= 0, got {getattr(self, key)}")
        if self.rampup_steps < 0:
            raise ValueError(f"mean_teacher.rampup_steps must be >= 0, got {self.rampup_steps}")


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """EMA decay used after optimiser step ``step`` (0-based): ``min(1 - 1 / (step + 2), decay)`` with the warm-up
    (Tarvainen's ``update_ema_variables`` with ``global_step = step + 1``), else ``decay``."""
    return min(1.0 - 1.0 / (step + 2), decay) if warmup else decay


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor,
                     threshold: float, kind: str = "mse",
                     denominator: str = "valid") -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_cons, keep)`` of student logits ``(B, K, H, W)`` against teacher logits of the same pixels.

    ``keep`` ``(B, H, W)``: valid pixels whose teacher confidence is at least ``threshold``; invalid pixels never
    get a pseudo-label. ``kind``: ``"ce"`` (cross-entropy with the teacher's argmax) or ``"mse"`` (squared
    probability differences summed over classes); ``denominator``: ``"valid"`` or ``"kept"`` pixel count.
    """
    labels, _, keep = pseudo_labels(teacher_logits.detach(), threshold, valid)
    if kind == "ce":
        per_pixel = F.cross_entropy(student_logits.float(), labels, ignore_index=255, reduction="none")
    elif kind == "mse":
        diff = student_logits.float().softmax(1) - teacher_logits.detach().float().softmax(1)
        per_pixel = diff.pow(2).sum(1) * keep
    else:
        raise ValueError(f"unknown consistency loss {kind!r}; valid: ce, mse")
    if denominator == "valid":
        count = valid.bool().sum()
    elif denominator == "kept":
        count = keep.sum()
    else:
        raise ValueError(f"unknown denominator {denominator!r}; valid: valid, kept")
    return per_pixel.sum() / count.clamp_min(1), keep


@register
class MeanTeacher(SegMethod):
    """Student trained on labels and on an EMA teacher's predictions of the weak view, seen through a strong view."""

    name = "mean_teacher"
    Config = MeanTeacherConfig
    tasks = ("semisup",)
    streams = ("labelled", "unlabelled")
    views = {"unlabelled": 1}

    def __init__(self, cfg: MeanTeacherConfig, model: torch.nn.Module, setup) -> None:
        super().__init__(cfg, model, setup)
        self.teacher = make_teacher(model)  # outside DDP (not in ``trainable``), checkpointed with the method
        self.eval_prefix = "teacher." if cfg.eval_model == "teacher" else "model."

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.teacher if self.cfg.eval_model == "teacher" else self.model

    def on_train_start(self, ctx) -> None:
        check_rampup_fits("mean_teacher.rampup_steps", self.cfg.rampup_steps, ctx.total_steps,
                          "mean_teacher.consistency_weight")

    def training_step(self, batch: dict, ctx) -> dict[str, torch.Tensor]:
        lab, unl = batch["labelled"], batch["unlabelled"]
        x_l, y_l = lab["image"], lab["mask"]  # 1. labelled batch
        x_w, x_s, valid = unl["image"], unl["strong"][:, 0], unl["valid"].bool()  # 2. weak / strong views
        with torch.no_grad():  # 3. teacher pseudo-targets on the weak view
            own = self.cfg.teacher_bn == "own"
            self.teacher.train(own)
            if own and self.setup.freeze_backbone:  # a frozen backbone keeps its statistics, as the student's
                self.teacher.backbone.eval()
            teacher_logits = self.teacher(x_w, return_aux=False).logits
        n_l = x_l.shape[0]
        out = self.wrapped("model")(torch.cat([x_l, x_s]))  # 4. student: labelled + strong, one pass
        logits_l, logits_s = out.logits.split([n_l, x_s.shape[0]])
        aux_l = out.aux[:n_l] if out.aux is not None else None
        loss_sup, parts = self.supervised_loss(out._replace(logits=logits_l, aux=aux_l), y_l, self.cfg.aux_weight)
        loss_cons, keep = consistency_loss(logits_s, teacher_logits, valid, self.cfg.threshold,  # 5. L_cons
                                           self.cfg.consistency, self.cfg.denominator)
        weight = self.cfg.consistency_weight * sigmoid_rampup(ctx.step, self.cfg.rampup_steps)  # 6. w(t)
        loss = loss_sup + weight * loss_cons  # 7. L
        ratio = keep.sum() / valid.sum().clamp_min(1)
        return {"loss": loss, **parts, "loss_cons": loss_cons.detach(), "mask_ratio": ratio.detach().float(),
                "cons_weight": torch.tensor(weight, device=loss.device)}

    def after_optimizer_step(self, step: int, epoch: int) -> None:
        ema_update_(self.teacher, self.model, ema_decay_at(step, self.cfg.ema_decay, self.cfg.ema_warmup),
                    copy_buffers=self.cfg.teacher_bn == "copy")
