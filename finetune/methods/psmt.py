"""PS-MT: Perturbed and Strict Mean Teachers (``method=psmt``).

Paper: Y. Liu, Y. Tian, Y. Chen, F. Liu, V. Belagiannis, G. Carneiro, "Perturbed and Strict Mean Teachers for
Semi-supervised Semantic Segmentation", CVPR 2022 (arXiv:2111.12903).
Reference code: https://github.com/yyliu01/PS-MT (``VocCode/train.py`` ``Trainer``; ``VocCode/Model/Deeplabv3_plus/
encoder_decoder.py`` ``get_r_adv_t``, ``VATDecoderNetwork``; ``VocCode/Utils/losses.py`` ``semi_ce_loss``,
``ConsistencyWeight``; ``VocCode/Base/base_trainer.py`` ``train``; ``scripts/train_voc_aug.sh`` for the settings).

Notation: student ``f_s = h_s o g_s`` (encoder ``g``: backbone + ASPP [+ low-level projection], decoder ``h``: the
decoder convolutions + classifier, split by :func:`head_stages`), teachers ``f_t1``, ``f_t2``
(``teacher_a``, ``teacher_b``); ``x_l``/``y_l`` labelled images/masks, ``x_w``/``x_s`` the weak/strong view of an
unlabelled crop (pixel-aligned); logits ``(B, K, H, W)``; ``e`` the epoch (a pass over the unlabelled stream, which
is the first stream, as the reference's ``len(unsupervised_loader)`` iterations), ``t`` the optimisation step.

Equation map (paper -> code):

* Network perturbation, the teachers' ensemble: ``y_hat = gamma f_t1(x_w) + (1 - gamma) f_t2(x_w)`` on logits
  (``gamma = 0.5``: the average) -> :func:`ensemble_logits` (``teacher_weight``).
* Strict teachers, Conf-CE: ``L_u = (1 / |P|) sum_{p in P} c_p CE(f_s(x_s)_p, argmax y_hat_p)`` with
  ``c_p = max softmax(y_hat_p)`` and ``P = {p : c_p >= tau, p valid}`` -> :func:`conf_ce` (``conf_threshold``).
* Input perturbation: teachers see ``x_w``, the student ``x_s`` (strong, SAR-safe); CutMix of the strong images with
  the teachers' logits mixed by the same box (the teachers predict each image whole) -> :func:`cutmix_pair`.
* Feature perturbation, T-VAT: ``r_adv = argmax_{||r|| = eps} KL(mean_i h_ti(z) || mean_i h_ti(z + r))``
  with ``z = g_s(x)`` the student's feature, found by power iteration from a random ``d``:
  ``d <- normalise(grad_d KL(p || q(z + xi d)))``, ``r_adv = eps d`` per sample; the student then predicts
  ``h_s(z + r_adv)`` -> :func:`tvat_perturbation` (``tvat_xi``, ``tvat_eps``, ``tvat_iterations``), applied
  through a forward pre-hook at ``head_stages(model, tvat_at)``'s entry.
* Total loss ``L = L_s(x_l) + lambda(t) L_u`` with ``lambda(t) = unsup_weight * ramp(t - warmup_steps)`` ->
  :meth:`PSMT.unsup_weight_at` (``rampup_type``, ``rampup_fraction``).
* Teachers: ``theta_ti <- alpha theta_ti + (1 - alpha) theta_s`` for *one* teacher per epoch: ``teacher_a`` in even
  epochs, ``teacher_b`` in odd ones (``e mod 2``, the epoch of the run counted from 0; the reference's
  ``curr_id = 1 if epoch % 2 != 0 else 2`` with epochs counted from 1) -> :func:`teacher_for_epoch`,
  :func:`ema_teacher_` (``ema_decay``).
* Supervised warm-up: the first ``warmup_steps`` steps train the student on ``x_l`` only, and after each of them
  *both* teachers track the student with ``warmup_ema_decay`` (0: they copy it).

Training step: (1) warm-up steps: ``L_s`` only; (2) otherwise: ``y_hat`` from the teachers on ``x_w`` (eval mode, no
gradient); CutMix of ``x_s``, ``y_hat`` and the valid mask; student on ``x_l`` and on ``x_s``, each with its own
T-VAT perturbation; ``L_s + lambda(t) L_u``. After the optimiser step (``after_optimizer_step``) the EMA update.

Deviations from the paper / reference code (reference bugs fixed are marked *fixed*):

* *fixed* T-VAT's ``_l2_normalize`` divides by ``norm + 1e-8``: at the released ``xi = 1e-6``, ``eps = 2`` the
  gradient's norm is far below that guard, so ``r_adv`` ends with a norm near 1e-5 instead of ``eps``. Here the
  normalisation is scale-safe (divide by the largest magnitude, then by the norm) and ``||r_adv||_2 = eps`` for every
  sample (exactly, up to rounding to the feature's dtype). A sample whose gradient is exactly zero keeps its previous
  direction.
* *fixed* In float32, ``z + xi d`` at ``xi = 1e-6`` rounds back to ``z`` (each element of a unit ``d`` is far below
  float32's resolution of ``z``), so the released gradient is the decoders' Jacobian applied to rounding residuals,
  not the finite difference. The search runs in ``tvat_dtype`` (float64 by default; autocast off), where
  ``xi = 1e-6`` is a meaningful finite difference. (On a 304 x 64 x 64 feature of two random v3+ heads the KL the
  perturbation causes was 41.0 in float64, 35.9 in float32 and 0.006 for a random direction of the same norm;
  ``tvat_dtype=float32`` halves the search's cost on a CPU and is far cheaper on GPUs with slow float64.)
* *fixed* ``semi_ce_loss`` is hard-coded for 21 classes and its negative-learning term is NaN with the released
  ``semi_n_th = 0``; negative learning is off in the released runs and not implemented here. Conf-CE works for any
  number of classes and is 0 (not NaN) when no pixel passes the threshold.
* *fixed* ``update_teachers`` averages the whole ``state_dict`` and so rounds BatchNorm's integer
  ``num_batches_tracked``; here parameters and floating-point buffers (running statistics) are averaged and integer
  buffers copied from the student.
* T-VAT's random start and the CutMix boxes come from ``ctx.generator()`` (per seed, step and process), not the
  global RNG: resumed runs repeat them exactly.
* The perturbation point is configurable: ``tvat_at = "decoder"`` (default) perturbs the input of the decoder
  convolutions, where the released DeepLab v3+ does (ASPP output concatenated with the low-level projection);
  ``"classifier"`` perturbs ``decoder_input`` (the 1x1 classifier's input). The search puts the teachers' decoders in
  eval mode (BatchNorm statistics frozen, no dropout) and restores their modes.
* The teachers always run in eval mode (running statistics, no dropout): the reference predicts with them in
  training mode (batch statistics). Their running statistics are the EMA of the student's.
* The reference's ``assist_mask_calculate`` (the non-updated teacher's logits replaced by the updated one's outside
  its top-7 classes; "doesn't bring improvements" per its comment) is not implemented: the target is the plain
  weighted average of the two teachers' logits.
* Warm-up: the reference trains each teacher and the student separately on the labelled data for ``--warm_up=5``
  epochs (each with its own optimiser); here the student trains for ``warmup_steps`` steps and the teachers track it
  (``warmup_ema_decay``), so the method has one optimiser. Default 0 steps, the reference code's default
  (``warm_up_epoch: 0`` / ``--warm_up`` default 0); its scripts use 5 labelled epochs.
* CutMix boxes come from :func:`finetune.methods.common.cutmix_masks` (probability ``cutmix_prob``, area fraction
  in ``cutmix_area``, aspect ratio in ``cutmix_ratio``) and the partner of sample ``i`` is sample ``i - 1`` (a
  roll of the batch). The reference boxes every image with side ``sqrt(1 - lam)``, ``lam ~ Beta(4, 4)``, centre in
  ``[W/8, W)`` clipped to the image, and partners from a random permutation (which may pair an image with itself).
* Labelled images reach the student in the weak view (the reference feeds its strong view); T-VAT applies to the
  labelled batch too (``tvat_labelled``, as the reference), the auxiliary head (when the model has one) adds
  ``aux_weight`` times the supervised loss.
* The ramp-up length is a fraction of the steps after the warm-up (the reference: 12 of 80 epochs, cosine).
* Evaluation and prediction use the student (``model.``, strict DeepLab weights); the reference validates the
  teachers' averaged logits.
* With several processes each process's teachers average its own student's running statistics (parameters are the
  same everywhere); the engine broadcasts rank 0's buffers before every evaluation and checkpoints hold rank 0's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from common.ema import ema_update_, make_teacher
from common.errors import UserInputError
from finetune.deeplab import DeepLab
from finetune.methods import register
from finetune.methods.base import SegMethod
from finetune.methods.common import (
    cutmix_masks,
    masked_mean,
    mix,
    pseudo_labels,
    sigmoid_rampup,
)

__all__ = ["PSMT", "PSMTConfig", "conf_ce", "cutmix_pair", "ema_teacher_", "ensemble_logits", "head_stages",
           "rampup", "teacher_for_epoch", "tvat_perturbation"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class PSMTConfig:
    """Hyper-parameters of PS-MT (section ``psmt``); defaults from the released VOC settings
    (``configs/config_deeplab_v3+.json``, ``scripts/train_voc_aug.sh``, ``VATDecoderNetwork``)."""

    ema_decay: float = 0.996  # alpha: teacher EMA keep rate (update_teachers' keep_rate)
    teacher_weight: float = 0.5  # gamma: weight of teacher_a's logits in the target (config trainer.gamma)
    conf_threshold: float = 0.6  # tau: Conf-CE keeps pixels whose teacher confidence is >= tau (--semi_p_th)
    unsup_weight: float = 1.5  # lambda after the ramp-up (--unsup_weight, VOC aug)
    rampup_type: Literal["cosine", "sigmoid", "linear"] = "cosine"  # ConsistencyWeight(ramp_type="cosine_rampup")
    rampup_fraction: float = 0.15  # ramp-up length / steps after the warm-up (ramp_up 12 of 80 epochs)
    warmup_steps: int = 0  # supervised-only steps first (reference code default 0; its scripts: 5 labelled epochs)
    warmup_ema_decay: float = 0.0  # teachers' EMA keep rate during the warm-up (0: they copy the student)
    tvat: bool = True  # T-VAT feature perturbation of the student
    tvat_at: Literal["decoder", "classifier"] = "decoder"  # where it enters (head_stages)
    tvat_xi: float = 1e-6  # xi: finite-difference step of the power iteration (VATDecoderNetwork: xi=1e-6)
    tvat_eps: float = 2.0  # eps: L2 norm of r_adv per sample (VATDecoderNetwork: eps=2.0)
    tvat_iterations: int = 1  # power iterations (it=1); 0: a random direction of norm eps
    tvat_labelled: bool = True  # perturb the labelled forward too (the reference does)
    tvat_dtype: Literal["float64", "float32"] = "float64"  # precision of the search (float32 loses xi=1e-6)
    cutmix_prob: float = 1.0  # probability that an unlabelled image gets a box (the reference boxes every image)
    cutmix_area: tuple[float, float] = (0.02, 0.4)  # box area fraction range (cutmix_masks' default)
    cutmix_ratio: tuple[float, float] = (0.3, 1 / 0.3)  # box aspect-ratio range (cutmix_masks' default)
    aux_weight: float = 0.4  # weight of the auxiliary-head loss (ignored without an aux head)

    def validate(self) -> None:
        for name in ("ema_decay", "warmup_ema_decay", "teacher_weight", "conf_threshold", "rampup_fraction",
                     "cutmix_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"psmt.{name} must be in [0, 1], got {v}")
        if self.unsup_weight < 0 or self.aux_weight < 0:
            raise ValueError("psmt.unsup_weight and psmt.aux_weight must be >= 0")
        if self.warmup_steps < 0 or self.tvat_iterations < 0:
            raise ValueError("psmt.warmup_steps and psmt.tvat_iterations must be >= 0")
        if not (self.tvat_xi > 0 and self.tvat_eps > 0):
            raise ValueError(f"psmt.tvat_xi and psmt.tvat_eps must be > 0, got {self.tvat_xi}, {self.tvat_eps}")
        lo, hi = self.cutmix_area
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"psmt.cutmix_area must satisfy 0 < low <= high <= 1, got {self.cutmix_area}")
        lo, hi = self.cutmix_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"psmt.cutmix_ratio must satisfy 0 < low <= high, got {self.cutmix_ratio}")


# ---------------------------------------------------------------------------------------------------------------
# The method's pieces (pure functions of their inputs; tested one by one)
# ---------------------------------------------------------------------------------------------------------------
def head_stages(model: DeepLab, at: Literal["decoder", "classifier"] = "decoder") -> tuple[nn.Module, nn.Sequential]:
    """Split ``model``'s head where a feature perturbation enters (PS-MT's T-VAT).

    Returns ``(entry, rest)``: ``entry`` is the sub-module whose (first) input is the feature at ``at``, so a forward
    pre-hook on it perturbs that feature inside an ordinary forward (also through a DDP wrapper); ``rest`` chains the
    modules from that feature to the class scores at feature resolution (before upsampling), so that ``rest(z)``
    decodes a feature ``z`` with this model's decoder (e.g. a teacher's decoder on the student's feature).

    Args:
        model: the segmenter.
        at: ``"decoder"``: the input of the decoder convolutions, where PS-MT's released DeepLab v3+ perturbs: v3+
            the ASPP output upsampled to stride 4 concatenated with the projected low-level feature, v3 the ASPP
            output; ``"classifier"``: ``decoder_input``, the input of the 1x1 classifier. For v2 both are the deepest
            encoder feature, the input of the atrous classifier.
    """
    if at not in ("decoder", "classifier"):
        raise ValueError(f"unknown perturbation point {at!r}; valid: 'decoder', 'classifier'")
    if model.version == "v2":
        return model.head, nn.Sequential(model.head)
    if at == "decoder":
        return model.head.fuse, nn.Sequential(model.head.fuse, model.head.classifier)
    return model.head.classifier, nn.Sequential(model.head.classifier)


def ensemble_logits(logits_a: torch.Tensor, logits_b: torch.Tensor, weight_a: float = 0.5) -> torch.Tensor:
    """The teachers' target ``gamma a + (1 - gamma) b`` on logits (float32)."""
    return weight_a * logits_a.float() + (1.0 - weight_a) * logits_b.float()


def conf_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, threshold: float,
            valid: torch.Tensor | None = None, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Conf-CE: the mean over kept pixels of ``c_p CE(student_p, argmax teacher_p)``, ``c_p`` the teacher's max
    softmax probability, kept where ``c_p >= threshold`` (and ``valid``). Returns ``(loss, kept fraction)``; the loss
    is 0 when no pixel is kept."""
    labels, conf, keep = pseudo_labels(teacher_logits, threshold, valid, ignore_index)
    ce = F.cross_entropy(student_logits.float(), labels, ignore_index=ignore_index, reduction="none")
    return masked_mean(ce * conf, keep, "kept"), keep.float().mean()


def teacher_for_epoch(epoch: int) -> int:
    """Which teacher the EMA updates in ``epoch`` (0-based): 0 (``teacher_a``) in even epochs, 1 in odd ones."""
    return epoch % 2


@torch.no_grad()
def ema_teacher_(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``theta_t <- decay theta_t + (1 - decay) theta_s`` for parameters and floating-point buffers (BatchNorm
    running statistics); integer buffers (``num_batches_tracked``) are copied, not averaged."""
    ema_update_(teacher, student, decay)
    buffers_s = dict(student.named_buffers())
    for name, b_t in teacher.named_buffers():
        b_s = buffers_s[name]
        if b_t.is_floating_point():
            b_t.mul_(decay).add_(b_s.to(b_t.dtype), alpha=1.0 - decay)
        else:
            b_t.copy_(b_s)


def cutmix_pair(image: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None,
                box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Paste into sample ``i`` the box ``box[i]`` (``(B, H, W)`` bool) of sample ``i - 1``, the same way in the
    images ``(B, C, H, W)``, the teachers' logits ``(B, K, H, W)`` and the valid mask ``(B, H, W)``."""
    def other(t: torch.Tensor) -> torch.Tensor:
        return torch.roll(t, 1, dims=0)

    mixed_valid = None if valid is None else mix(valid, other(valid), box)
    return mix(image, other(image), box), mix(target, other(target), box), mixed_valid


def rampup(kind: str, step: int, length: int) -> float:
    """Ramp from 0 to 1 over ``length`` steps: ``cosine`` ``(1 - cos(pi t)) / 2`` (the reference's
    ``cosine_rampup``), ``sigmoid`` ``exp(-5 (1 - t)^2)``, ``linear`` ``t``; ``t = step / length`` in [0, 1]; 1 for
    ``length == 0``."""
    if length <= 0:
        return 1.0
    if kind == "sigmoid":
        return sigmoid_rampup(step, length)
    t = min(max(step / length, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * t))
    if kind == "linear":
        return t
    raise ValueError(f"unknown ramp-up {kind!r}; valid: cosine, sigmoid, linear")


def _unit(v: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """``v / ||v||_2`` per sample (dimension 0), scale-safe: divided by its largest magnitude first, so tiny
    gradients normalise as well as large ones. Samples that are all zero (or not finite) take ``fallback``."""
    flat = v.flatten(1)
    scale = flat.abs().amax(dim=1, keepdim=True)
    ok = (scale > 0) & torch.isfinite(scale)
    flat = flat / torch.where(ok, scale, torch.ones_like(scale))
    norm = flat.norm(dim=1, keepdim=True)
    flat = flat / torch.where(ok, norm, torch.ones_like(norm))
    if fallback is not None:
        flat = torch.where(ok, flat, fallback.flatten(1).to(flat.dtype))
    else:
        flat = torch.where(ok, flat, torch.zeros_like(flat))
    return flat.view_as(v)


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]):
    modes = [[m.training for m in module.modules()] for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, flags in zip(modules, modes):
            for m, flag in zip(module.modules(), flags):
                m.training = flag


def tvat_perturbation(z: torch.Tensor, decoders: Sequence[nn.Module], *, xi: float, eps: float, iterations: int = 1,
                      generator: torch.Generator | None = None, size: Sequence[int] | None = None,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """T-VAT: the perturbation ``r`` of ``z`` (``||r_b||_2 = eps`` per sample ``b``) that most raises the KL
    divergence between the decoders' averaged predictions on ``z`` and on ``z + r``, by power iteration.

    Args:
        z: the student's feature ``(B, ...)`` (detached here: no gradient reaches the student).
        decoders: modules mapping a feature to logits ``(B, K, h, w)`` (the teachers' ``head_stages(...)[1]``); put
            in eval mode during the search (BatchNorm statistics frozen) and restored after; their parameters get no
            gradient.
        xi: finite-difference step ``z + xi d`` (``d`` of unit norm per sample).
        eps: norm of the result per sample.
        iterations: power iterations (0: the normalised random start).
        generator: draws the random start ``U(-0.5, 0.5)`` (CPU generator; default: the global RNG).
        size: upsample the decoders' logits to this ``(H, W)`` before the softmax (the reference decodes at the
            input size).
        dtype: precision of the search.

    Returns:
        ``r`` with ``z``'s shape, dtype and device.
    """
    mods = list(decoders)
    with _eval_mode(mods), torch.enable_grad(), torch.autocast(z.device.type, enabled=False):
        z0 = z.detach().to(dtype)
        states = [{k: (t.to(dtype) if t.is_floating_point() else t)
                   for k, t in (*m.named_parameters(), *m.named_buffers())} for m in mods]

        def averaged(x: torch.Tensor) -> torch.Tensor:
            out = sum(functional_call(m, s, (x,)) for m, s in zip(mods, states)) / len(mods)
            if size is not None and tuple(out.shape[-2:]) != tuple(size):
                out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
            return out

        with torch.no_grad():
            p = F.softmax(averaged(z0), dim=1)
        d = torch.rand(z0.shape, generator=generator, dtype=dtype).to(z0.device).sub_(0.5)
        d = _unit(d)
        for _ in range(iterations):
            d.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(averaged(z0 + xi * d), dim=1), p, reduction="batchmean")
            (grad,) = torch.autograd.grad(kl, d)
            d = _unit(grad, fallback=d.detach())
        return (eps * d.detach()).to(z.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------
@register
class PSMT(SegMethod):
    """Two EMA teachers updated alternately, Conf-CE on their averaged logits, T-VAT on the student's features."""

    name = "psmt"
    Config = PSMTConfig
    tasks = ("semisup",)
    streams = ("unlabelled", "labelled")  # the epoch is a pass over the unlabelled data, as in the reference
    views: ClassVar[dict[str, int]] = {"unlabelled": 1}  # weak + one strong view per unlabelled crop

    def __init__(self, cfg: PSMTConfig, model: nn.Module, setup: Any):
        super().__init__(cfg, model, setup)
        self.teacher_a = make_teacher(model)  # outside DDP (not trainable), in the state_dict
        self.teacher_b = make_teacher(model)
        self.teacher_a.eval()
        self.teacher_b.eval()
        self._rampup_steps = 0

    @property
    def teachers(self) -> tuple[nn.Module, nn.Module]:
        return self.teacher_a, self.teacher_b

    def train(self, mode: bool = True) -> PSMT:
        super().train(mode)
        for t in self.teachers:  # always predict with running statistics and no dropout
            t.eval()
        return self

    # ---- hooks
    def on_train_start(self, ctx: Any) -> None:
        semi = ctx.total_steps - self.cfg.warmup_steps
        if semi <= 0:
            raise UserInputError(f"psmt.warmup_steps={self.cfg.warmup_steps} covers the whole run of "
                                 f"{ctx.total_steps} steps: no semi-supervised step would run; lower psmt.warmup_steps")
        self._rampup_steps = round(self.cfg.rampup_fraction * semi)

    def after_optimizer_step(self, step: int, epoch: int) -> None:
        if step < self.cfg.warmup_steps:
            for t in self.teachers:
                ema_teacher_(t, self.model, self.cfg.warmup_ema_decay)
        else:
            ema_teacher_(self.teachers[teacher_for_epoch(epoch)], self.model, self.cfg.ema_decay)

    def unsup_weight_at(self, step: int) -> float:
        """``lambda(t)``: 0 during the warm-up, then ``unsup_weight`` times the ramp-up."""
        if step < self.cfg.warmup_steps:
            return 0.0
        return self.cfg.unsup_weight * rampup(self.cfg.rampup_type, step - self.cfg.warmup_steps, self._rampup_steps)

    # ---- forward passes
    def _student(self, x: torch.Tensor, perturb: bool, generator: torch.Generator,
                 return_aux: bool | None = None) -> tuple[Any, torch.Tensor | None]:
        """The student (through DDP) on ``x``, its feature at ``tvat_at`` shifted by T-VAT when ``perturb``.
        Returns the output and the mean norm of the perturbation (None without)."""
        net = self.wrapped("model")
        if not perturb:
            return net(x, return_aux=return_aux), None
        cfg = self.cfg
        entry, _ = head_stages(self.model, cfg.tvat_at)
        decoders = [head_stages(t, cfg.tvat_at)[1] for t in self.teachers]
        size = tuple(x.shape[-2:])
        norms: list[torch.Tensor] = []

        def hook(_module: nn.Module, args: tuple) -> tuple:
            z = args[0]
            r = tvat_perturbation(z, decoders, xi=cfg.tvat_xi, eps=cfg.tvat_eps, iterations=cfg.tvat_iterations,
                                  generator=generator, size=size, dtype=_DTYPES[cfg.tvat_dtype])
            norms.append(r.detach().float().flatten(1).norm(dim=1).mean())
            return (z + r, *args[1:])

        handle = entry.register_forward_pre_hook(hook)
        try:
            out = net(x, return_aux=return_aux)
        finally:
            handle.remove()
        return out, (norms[-1] if norms else None)

    @torch.no_grad()
    def teacher_target(self, x_w: torch.Tensor) -> torch.Tensor:
        """The teachers' averaged logits on the weak view (float32, no gradient)."""
        a, b = (t(x_w).logits for t in self.teachers)
        return ensemble_logits(a, b, self.cfg.teacher_weight)

    def training_step(self, batch: dict, ctx: Any) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        x_l, y_l = batch["labelled"]["image"], batch["labelled"]["mask"]  # 1. labelled batch
        if ctx.step < cfg.warmup_steps:  # 2a. supervised warm-up (the teachers track the student afterwards)
            loss, parts = self.supervised_loss(self.wrapped("model")(x_l), y_l, cfg.aux_weight)
            zero = torch.zeros((), device=loss.device)
            return {"loss": loss, **parts, "loss_unsup": zero, "unsup_weight": zero, "mask_ratio": zero,
                    "tvat_norm": zero}
        unl = batch["unlabelled"]
        x_w, x_s, valid = unl["image"], unl["strong"][:, 0], unl["valid"].bool()
        g = ctx.generator()
        y_hat = self.teacher_target(x_w)  # 2b. the teachers' averaged logits on the weak view
        b, _, h, w = x_s.shape
        box = cutmix_masks(b, h, w, g, p=cfg.cutmix_prob, area=cfg.cutmix_area, ratio=cfg.cutmix_ratio,
                           device=x_s.device)
        x_s, y_hat, valid = cutmix_pair(x_s, y_hat, valid, box)  # 3. CutMix of images and targets
        out_l, _ = self._student(x_l, cfg.tvat and cfg.tvat_labelled, g)  # 4. student on x_l (T-VAT)
        loss_sup, parts = self.supervised_loss(out_l, y_l, cfg.aux_weight)
        out_u, tvat_norm = self._student(x_s, cfg.tvat, g, return_aux=False)  # 5. student on mixed x_s (T-VAT)
        loss_u, kept = conf_ce(out_u.logits, y_hat, cfg.conf_threshold, valid, self.setup.ignore_index)  # 6.
        weight = self.unsup_weight_at(ctx.step)
        loss = loss_sup + weight * loss_u  # 7. L = L_s + lambda(t) L_u
        return {"loss": loss, **parts, "loss_unsup": loss_u.detach(),
                "unsup_weight": torch.tensor(weight, device=loss.device), "mask_ratio": kept.detach(),
                "tvat_norm": tvat_norm if tvat_norm is not None else torch.zeros((), device=loss.device)}
