"""ProDA: prototypical pseudo-label denoising and target structure learning, then distillation into a
self-supervised student (``method=proda`` of ``finetune/uda.py``).

Paper: Zhang, Zhang, Zhang, Chen, Wang, Wen, "Prototypical Pseudo Label Denoising and Target Structure Learning for
Domain Adaptive Semantic Segmentation", CVPR 2021 (arXiv:2101.10979). Reference code: microsoft/ProDA
(``models/adaptation_modelv2.py``, ``calc_prototype.py``, ``generate_pseudo_label.py``, ``parser_train.py`` and
the README's training commands); behaviour checked against it, no code copied.

Stages (``proda.stage``):
    1  (ProDA stage 1) start from a warm-up model: ``model.init_from=<run>`` of ``method=source_only`` (or an
       adversarial warm-up such as AdaptSegNet). The warm-up model stays frozen (``self.warmup``) and gives the
       soft pseudo-labels; an EMA of the student (``self.ema``) gives the features for the prototypes
       (``self.prototypes``, a checkpointed buffer) initialised at train start by a pass of the warm-up model over
       the target tiles (``ctx.datasets["target_plain"]``, sums and counts all-reduced across processes).
    2  (ProDA stages 2 and 3) knowledge distillation into a student: the student is the run's segmenter (with
       ``model.weights=<DINO export>`` its backbone is our self-supervised one, the head new: stage 2) and the
       teacher (``self.teacher``, frozen) is the segmenter of ``proda.teacher_run=<stage-1 run>`` (built with
       ``setup.make_model()`` and loaded from that run's checkpoint). Without ``proda.teacher_run`` the teacher is a
       frozen copy of the initial segmenter, i.e. of ``model.init_from=<stage-2 run>``: the released stage 3
       (student and teacher both start from the stage-2 model). Stage 3 as a second distillation into a fresh
       self-supervised student is stage 2 again with ``proda.teacher_run=<stage-2 run>``.
    ``model.init_from`` and ``model.weights`` exclude each other in this platform (``SegModelConfig.validate``),
    hence the teacher's own key ``proda.teacher_run``.

Notation: ``x_s, y_s`` source image / mask, ``x_w`` the weak target view, ``x_st`` its strong view (pixel-aligned),
``f`` the feature before the classifier (``decoder_input``), ``eta_k`` the prototype of class ``k``, ``tau`` the
temperature, ``K`` classes. Target losses are computed at 1 / ``label_stride`` of the input resolution, as the
released code (features and logits resized bilinearly, validity = cells with only valid pixels).

Equation map, stage 1:
    p0 = softmax(h_warmup(x_w))                (fixed soft pseudo-label, paper's p_{t,o})   -> ``_stage1``
    d_k = || f_ema(x_w) - eta_k ||_2,  omega_k = softmax_k(-d_k / tau)      -> :func:`prototype_distances`,
                                                                               :func:`rectified_pseudo_labels`
    yhat = argmax_k omega_k p0_k (255 where the normalised max < ``rectify_threshold`` or invalid)
    l_sce = alpha CE(p, yhat) + beta RCE(p, yhat),  RCE = -sum_k p_k log clamp(onehot_k, ``rce_label_clamp``)
                                                                            -> :func:`symmetric_ce`
    l_reg = -(1/K) sum_k log p_k averaged over pixels ("mrkld", the paper's Eq. 9 / CRST)
                                                                            -> :func:`degeneration_regulariser`
    z_w = softmax(-d(f_ema(x_w)) / tau),  z_st = softmax(-d(f_s(x_st)) / tau)
    l_kl = (1/K) mean_pixels sum_k z_w,k (log z_w,k - log z_st,k)          -> :func:`kl_divergence`
    L = CE(x_s, y_s) [+ aux] + l_sce + lambda_reg l_reg + lambda_kl l_kl   -> ``training_step``
    eta_k <- m eta_k + (1 - m) fbar_k for every target image holding >= ``proto_min_pixels`` pixels predicted k
         by the EMA model (fbar_k the mean EMA feature over them; images of all processes, in rank order)
                                                                            -> :func:`class_mean_features`,
                                                                               :func:`update_prototypes`
    theta_ema <- 0.999 theta_ema + 0.001 theta_s (buffers copied)          -> ``after_optimizer_step``
    eta_k(0) = mean over target tiles of fbar_k of the warm-up model        -> :func:`initial_prototypes`,
                                                                               ``on_train_start``
Equation map, stage 2:
    yhat = argmax of the teacher's softmax of x_w averaged with its horizontally flipped prediction; 255 where
         that confidence <= ``distill_threshold`` or invalid                -> :func:`teacher_hard_labels`
    L = CE(x_s, y_s) [+ aux] + CE(f_s(x_st), yhat) + lambda_kd KL(softmax h_t(x_st) || softmax f_s(x_st))
                                                                            -> ``_stage2``, :func:`kl_divergence`
``target_entropy``: mean normalised entropy of the student's predictions over the target training tiles
(:func:`finetune.methods.common.target_entropy`), for ``trainer.best_metric: target_entropy`` with
``trainer.best_mode: min``.

Config defaults: ``parser_train.py`` with the README's GTA5 stage-1 command (``--proto_rectify --moving_prototype
--ema --proto_consistW 10 --rce --regular_w 0.1``) and stage-2 command (``--S_pseudo 1 --threshold 0.95
--distillation 1``, pseudo-labels generated with ``--flip``).

Deviations from the released code:
    * The distillation KL is fixed: the released ``step_distillation`` passes ``softmax`` (probabilities) as the
      input of ``F.kl_div``, which requires log-probabilities; its value is
      ``sum_k p_t,k (log p_t,k - p_s,k) <= 0`` (e.g. -0.35 where the true KL is 0.03) and its gradient does not
      make the student match the teacher. Here it is ``sum_k p_t,k (log p_t,k - log p_s,k) >= 0``
      (:func:`kl_divergence`, used for both KL terms).
    * Prototype weights are ``softmax(-d / tau)`` as in the paper; the released code computes
      ``softmax(-d * tau)`` (identical at the default tau = 1).
    * Strong pseudo-label view (``pseudo_view: strong``, the released ``S_pseudo > 0``) works; the released
      ``step()`` fails there (``cluster_argS`` used before it is set). The default is the released stage 1: the
      pseudo-label loss on the weak view, the prototype consistency on the strong view.
    * Ignore label 255 (the released CE ignores 250) and invalid (nodata) pixels are never pseudo-labelled and
      left out of every target loss, prototype statistic and the regulariser; all masked means are over valid
      pixels.
    * Soft pseudo-labels come from the frozen warm-up model applied online to the weak crop, and the EMA features
      from the weak crop itself; the released code loads soft labels precomputed on the full image and maps the
      EMA features of the full image to the crop (``full2weak``); the context at crop borders differs.
    * Strong views are the dataset's SAR-safe strong views (``augment.strong``), photometric and pixel-aligned with
      the weak view; the released RandAugment + Cutout has geometric ops whose inverse it applies to the labels.
    * The EMA model runs in eval mode (``ema_batch_stats: false``); the released EMA network stays in training
      mode (BatchNorm batch statistics), available as ``ema_batch_stats: true`` (dropout stays off either way).
    * Prototype updates of all processes are gathered and applied in rank order, so every process holds the same
      prototypes; the released code runs one process (DataParallel). The running ``objective_vectors_num`` cap
      is not needed (moving average only). Prototypes are initialised in ``on_train_start`` from one pass over
      the target tiles (the released ``calc_prototype.py`` repeats 4 identical epochs); classes never predicted
      keep a zero prototype, as released.
    * Stage 2: hard pseudo-labels from the teacher online (weak view + flip, threshold 0.95) instead of files
      generated once; ``--finetune``'s 10x head learning rate maps to ``model.backbone_lr_mult`` (0.1) and the
      extra BatchNorm of SimCLR (``--bn_clr``) has no counterpart.
    * KL terms average over classes and valid pixels as released (``(loss * mask).sum() / mask.sum()`` over
      class channels), i.e. (1/K) sum_k.
    * The source loss is the run's configured loss (``loss`` section); the target CE terms are plain CE.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.bands import IGNORE_INDEX
from common.ema import ema_update_, make_teacher
from common.errors import UserInputError
from finetune.methods import register
from finetune.methods.base import SegMethod
from finetune.methods.common import target_entropy

__all__ = ["ProDAConfig", "ProDA", "prototype_distances", "prototype_weights", "rectified_pseudo_labels",
           "symmetric_ce", "kl_divergence", "degeneration_regulariser", "class_mean_features", "update_prototypes",
           "initial_prototypes", "teacher_hard_labels", "valid_cells", "feature_dim"]


# ------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------
def feature_dim(model: nn.Module) -> int:
    """Channels of ``decoder_input`` of a :class:`finetune.deeplab.DeepLab` (the feature the prototypes live in)."""
    if model.version == "v2":
        return int(model.backbone.channels[model.high_index])
    return int(model.head.classifier.in_channels)


def resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(B, C, H, W)`` to ``size`` (identity when already there)."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)


def valid_cells(valid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, h, w)`` cells of ``size`` whose every covered pixel is valid (area average of the valid mask == 1)."""
    if tuple(valid.shape[-2:]) == tuple(size):
        return valid.bool()
    return F.interpolate(valid.float().unsqueeze(1), size=tuple(size), mode="area")[:, 0] > 1.0 - 1e-6


def prototype_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``d_k = ||f - eta_k||_2`` per pixel: features ``(B, D, h, w)``, prototypes ``(K, D)`` -> ``(B, K, h, w)``."""
    f = features.float()
    return torch.stack([(f - p.view(1, -1, 1, 1)).norm(dim=1) for p in prototypes.float()], dim=1)


def prototype_weights(distances: torch.Tensor, temperature: float) -> torch.Tensor:
    """``omega = softmax_k(-d_k / tau)`` (paper Eq. 3; the released code multiplies by tau)."""
    return (-distances / temperature).softmax(1)


@torch.no_grad()
def rectified_pseudo_labels(soft: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, threshold: float = 0.0,
                            ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, confidence)`` of the rectified soft pseudo-labels ``omega * p0`` (``(B, K, h, w)`` each):
    ``argmax_k``, with ``ignore_index`` where the normalised maximum is below ``threshold`` or the cell is invalid."""
    r = weights * soft
    labels = r.argmax(1)
    conf = (r / r.sum(1, keepdim=True).clamp_min(1e-12)).amax(1)
    keep = valid.bool() & (conf >= threshold)
    return torch.where(keep, labels, torch.full_like(labels, ignore_index)), conf


def symmetric_ce(logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float, label_clamp: float = 1e-4,
                 prob_clamp: float = 1e-7,
                 ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric cross-entropy (Wang et al., ICCV 2019) ``alpha CE + beta RCE`` over labelled pixels, with
    ``RCE = -sum_k clamp(p_k, prob_clamp, 1) log clamp(onehot_k, label_clamp, 1)``. Returns ``(loss, ce, rce)``."""
    keep = labels != ignore_index
    n = keep.sum().clamp_min(1)
    ce = (F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none") * keep).sum() / n
    k = logits.shape[1]
    p = logits.float().softmax(1).clamp(prob_clamp, 1.0)
    onehot = F.one_hot(torch.where(keep, labels, torch.zeros_like(labels)), k).permute(0, 3, 1, 2).float()
    rce = -(p * onehot.clamp(label_clamp, 1.0).log()).sum(1)
    rce = (rce * keep).sum() / n
    return alpha * ce + beta * rce, ce, rce


def kl_divergence(p_teacher: torch.Tensor, logp_student: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(1/K) mean_{valid pixels} sum_k p_t,k (log p_t,k - log p_s,k)`` (>= 0) of teacher probabilities and student
    log-probabilities ``(B, K, h, w)``: what the released ``F.kl_div(softmax, ...)`` meant (see the module
    docstring)."""
    kl = torch.xlogy(p_teacher, p_teacher) - p_teacher * logp_student
    m = valid.to(kl.dtype)
    return (kl.sum(1) * m).sum() / (m.sum().clamp_min(1.0) * kl.shape[1])


def degeneration_regulariser(logits: torch.Tensor, valid: torch.Tensor, kind: str = "mrkld") -> torch.Tensor:
    """The regulariser against degenerate (empty-cluster) solutions over valid pixels.

    ``mrkld`` (paper, released default): ``-(1/K) sum_k log p_k`` per pixel (KL(uniform || p) - log K);
    ``mrent``: ``sum_k p_k log p_k`` per pixel (negative entropy); ``mean_kl``: ``KL(pbar || uniform)`` of the mean
    prediction ``pbar`` over valid pixels."""
    logp = logits.float().log_softmax(1)
    m = valid.to(logp.dtype)
    n = m.sum().clamp_min(1.0)
    if kind == "mrkld":
        return (-logp.mean(1) * m).sum() / n
    if kind == "mrent":
        return ((logp.exp() * logp).sum(1) * m).sum() / n
    if kind == "mean_kl":
        k = logits.shape[1]
        pbar = (logp.exp() * m.unsqueeze(1)).sum((0, 2, 3)) / n
        return torch.xlogy(pbar, pbar * k).sum()
    raise ValueError(f"unknown regulariser {kind!r}; valid: mrkld, mrent, mean_kl")


@torch.no_grad()
def class_mean_features(features: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor, num_classes: int,
                        min_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and class, the mean feature over the valid pixels predicted as that class: ``(B, K, D)`` and
    ``ok`` ``(B, K)`` (at least ``min_pixels`` such pixels; the released ``calculate_mean_vector``)."""
    pred = logits.argmax(1)
    onehot = F.one_hot(pred, num_classes).permute(0, 3, 1, 2).float() * valid.unsqueeze(1).float()
    counts = onehot.sum((2, 3))
    sums = torch.einsum("bkhw,bdhw->bkd", onehot, features.float())
    return sums / counts.clamp_min(1.0).unsqueeze(-1), counts >= min_pixels


@torch.no_grad()
def update_prototypes(prototypes: torch.Tensor, means: torch.Tensor, ok: torch.Tensor, momentum: float) -> None:
    """In place, image by image in order: ``eta_k <- m eta_k + (1 - m) fbar_k`` for the classes ``ok`` marks."""
    for v, o in zip(means, ok.bool()):
        prototypes.copy_(torch.where(o.unsqueeze(1), momentum * prototypes + (1.0 - momentum) * v, prototypes))


@torch.no_grad()
def initial_prototypes(net: nn.Module, loader, num_classes: int, dim: int, label_stride: int, min_pixels: int,
                       reduce, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prototypes (K, D), counts (K,))``: the mean over images of the per-image class-mean features of ``net``
    over ``loader`` (this process's shard), sums and counts summed over processes with ``reduce``; classes never
    predicted get a zero prototype."""
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for batch in loader:
        x, valid = batch["image"].to(device), batch["valid"].to(device).bool()
        size = (max(1, x.shape[-2] // label_stride), max(1, x.shape[-1] // label_stride))
        out = net(x, return_features=True, return_aux=False)
        means, ok = class_mean_features(resize(out.decoder_input, size), resize(out.logits, size),
                                        valid_cells(valid, size), num_classes, min_pixels)
        sums += (means.double() * ok.unsqueeze(-1)).sum(0)
        counts += ok.double().sum(0)
    sums, counts = reduce(sums, "sum"), reduce(counts, "sum")
    protos = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp_min(1.0).unsqueeze(1), torch.zeros_like(sums))
    return protos.float(), counts


@torch.no_grad()
def teacher_hard_labels(teacher: nn.Module, x: torch.Tensor, valid: torch.Tensor, threshold: float, flip: bool,
                        ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, confidence)`` at input resolution: argmax of the teacher's softmax (averaged with the prediction of
    the horizontally flipped image, flipped back, when ``flip``); ``ignore_index`` where the confidence is
    ``<= threshold`` or the pixel is invalid (the released ``generate_pseudo_label.py --flip`` + ``--threshold``)."""
    p = teacher(x, return_aux=False).logits.float().softmax(1)
    if flip:
        p = (p + teacher(x.flip(-1), return_aux=False).logits.float().softmax(1).flip(-1)) / 2
    conf, labels = p.max(1)
    keep = valid.bool() & (conf > threshold)
    return torch.where(keep, labels, torch.full_like(labels, ignore_index)), conf


# ------------------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProDAConfig:
    """Hyper-parameters of ProDA (section ``proda``)."""

    stage: int = 1  # 1: denoising + structure learning from a warm-up run; 2: distillation (stages 2 and 3)
    label_stride: int = 4  # target losses at 1 / label_stride of the input resolution (released: 1/4)
    aux_weight: float = 0.4  # lambda_aux: auxiliary-head loss on the source (model.aux only)
    # stage 1
    ema_decay: float = 0.999  # EMA model momentum (released, hard-coded)
    ema_batch_stats: bool = False  # EMA BatchNorm in training mode (released: true; module docstring)
    proto_momentum: float = 0.9999  # m: prototype momentum (released --proto_momentum 0.0001 = 1 - m)
    proto_temperature: float = 1.0  # tau in softmax(-d / tau) (--proto_temperature 1)
    proto_min_pixels: int = 10  # pixels of a class an image needs to update / initialise its prototype (released)
    proto_batch_size: int = 8  # batch size of the prototype initialisation pass over the target tiles
    rectify: bool = True  # --proto_rectify: weight p0 by the prototypes (false: argmax p0)
    rectify_threshold: float = 0.0  # --train_thred: normalised rectified confidence to keep a pseudo-label
    pseudo_view: Literal["weak", "strong"] = "weak"  # student view of the pseudo-label loss (strong: S_pseudo > 0)
    sce: bool = True  # --rce: symmetric CE (false: plain CE)
    sce_alpha: float = 0.1  # --rce_alpha
    sce_beta: float = 1.0  # --rce_beta
    rce_label_clamp: float = 1e-4  # one-hot clamp of the reverse CE (released)
    rce_prob_clamp: float = 1e-7  # probability clamp of the reverse CE (released)
    consistency_weight: float = 10.0  # lambda_kl: --proto_consistW 10 (README stage-1 command)
    regulariser: Literal["mrkld", "mrent", "mean_kl"] = "mrkld"  # --regular_type
    regular_weight: float = 0.1  # lambda_reg: --regular_w 0.1 (README GTA5 stage-1 command)
    # stage 2
    teacher_run: str | None = None  # stage-1 (or stage-2) run directory whose segmenter is the teacher
    teacher_checkpoint: Literal["best", "last"] = "best"  # which weights of teacher_run
    distill_threshold: float = 0.95  # --threshold: teacher confidence above which a pixel is pseudo-labelled
    distill_flip: bool = True  # pseudo-labels averaged with the flipped image's prediction (--flip)
    distill_weight: float = 1.0  # lambda_kd: --distillation 1
    distill_sce: bool = False  # symmetric CE in stage 2 (the README's stage-2 command has no --rce)
    entropy_batch_size: int = 8  # batch size of the target_entropy pass at evaluation
    entropy_max_tiles: int | None = None  # target tiles of that pass (first N; None: all)

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"proda.stage must be 1 or 2, got {self.stage}")
        if self.teacher_run is not None and self.stage != 2:
            raise ValueError("proda.teacher_run is the distillation teacher: set proda.stage=2 (stage 1 starts from "
                             "model.init_from=<warm-up run>)")
        for key in ("ema_decay", "proto_momentum", "rectify_threshold", "distill_threshold"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"proda.{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("proto_temperature", "rce_label_clamp", "rce_prob_clamp"):
            if getattr(self, key) <= 0:
                raise ValueError(f"proda.{key} must be > 0, got {getattr(self, key)}")
        for key in ("aux_weight", "sce_alpha", "sce_beta", "consistency_weight", "regular_weight", "distill_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"proda.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("label_stride", "proto_min_pixels", "proto_batch_size", "entropy_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"proda.{key} must be >= 1, got {getattr(self, key)}")
        if self.entropy_max_tiles is not None and self.entropy_max_tiles < 1:
            raise ValueError(f"proda.entropy_max_tiles must be >= 1 or null, got {self.entropy_max_tiles}")


def _load_teacher(teacher: nn.Module, run_dir: str, checkpoint: str, setup) -> str:
    """Load the segmenter of the run ``run_dir`` into ``teacher``, refusing one of other classes, band count or
    normalisation (compared through the band std the run feeds the model)."""
    from finetune.training import load_init_from

    card_path = Path(run_dir) / "model.json"
    if not card_path.is_file():
        raise UserInputError(f"proda.teacher_run: {run_dir} is not a fine-tuning run (no model.json); point it at the "
                             f"--output-dir of the proda.stage=1 run")
    card = json.loads(card_path.read_text())
    if len(card.get("bands", [])) != len(setup.band_units):
        raise UserInputError(f"proda.teacher_run: the run {run_dir} reads bands {card.get('bands')}, this run "
                             f"{len(setup.band_units)} bands; use the same data.bands")
    std = card.get("normalisation", {}).get("std")
    if setup.band_std is not None and std is not None and not np.allclose(np.asarray(std, np.float64),
                                                                          np.asarray(setup.band_std, np.float64),
                                                                          rtol=1e-4):
        raise UserInputError(f"proda.teacher_run: the run {run_dir} normalises its input with std {std}, this run "
                             f"with {[float(v) for v in setup.band_std]}: the teacher would see other inputs; set "
                             f"data.stats_file (or use an export with the same statistics) so that both agree")
    arch = getattr(teacher.backbone, "arch", card.get("arch"))
    return load_init_from(teacher, run_dir, checkpoint, arch, teacher.version, setup.num_classes, card["bands"],
                          stem_pool=getattr(teacher.backbone, "stem_pool", True))


@register
class ProDA(SegMethod):
    """ProDA stage 1 (prototype-rectified self-training) or stage 2 (distillation into a new student)."""

    name = "proda"
    Config = ProDAConfig
    tasks = ("uda",)
    streams = ("source", "target")
    views = {"target": 1}

    def __init__(self, cfg: ProDAConfig, model: nn.Module, setup) -> None:
        super().__init__(cfg, model, setup)
        k = setup.num_classes
        from_export = setup.weights is not None and setup.init_from is None
        if cfg.stage == 1:
            if from_export:
                raise UserInputError("proda.stage=1 starts from a warm-up run: set model.init_from=<run dir of "
                                     "method=source_only> instead of model.weights (the export is for stage 2)")
            self.warmup = make_teacher(model)  # frozen: the soft pseudo-labels p0
            self.ema = make_teacher(model)  # EMA of the student: features for prototypes and rectification
            self.register_buffer("prototypes", torch.zeros(k, feature_dim(model)))
            self.register_buffer("proto_count", torch.zeros(k))
            self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        else:
            if cfg.teacher_run is not None:
                if setup.make_model is None:
                    raise ValueError("proda.teacher_run needs SegSetup.make_model")
                self.teacher = setup.make_model()
                self.teacher_file = _load_teacher(self.teacher, cfg.teacher_run, cfg.teacher_checkpoint, setup)
                self.teacher.requires_grad_(False)
            else:
                if from_export:
                    raise UserInputError("proda.stage=2 needs a teacher: set proda.teacher_run=<run dir of the "
                                         "proda.stage=1 run> (or model.init_from=<stage-2 run> for the released "
                                         "stage 3)")
                self.teacher = make_teacher(model)
        self._target_tiles = None

    def train(self, mode: bool = True) -> "ProDA":
        super().train(mode)
        if self.cfg.stage == 1:
            self.warmup.eval()
            self.ema.eval()
            if mode and self.cfg.ema_batch_stats:
                for m in self.ema.modules():
                    if isinstance(m, _BatchNorm):
                        m.train()
        else:
            self.teacher.eval()
        return self

    # ---- hooks
    def on_train_start(self, ctx) -> None:
        self._target_tiles = ctx.datasets["target_plain"]
        if self.cfg.stage != 1:
            return
        loader = ctx.eval_loader("target_plain", self.cfg.proto_batch_size)
        protos, counts = initial_prototypes(self.warmup, loader, self.setup.num_classes, self.prototypes.shape[1],
                                            self.cfg.label_stride, self.cfg.proto_min_pixels, ctx.reduce, ctx.device)
        self.prototypes.copy_(protos)
        self.proto_count.copy_(counts.float())
        missing = [i for i, c in enumerate(counts.tolist()) if c == 0]
        if missing:
            names = self.setup.class_names or tuple(str(c) for c in range(self.setup.num_classes))
            ctx.print("proda: no target tile has >= proda.proto_min_pixels pixels predicted as "
                                  + ", ".join(names[i] for i in missing) + ": zero prototype (as released)")

    def extra_metrics(self, engine) -> dict[str, float]:
        if self._target_tiles is None:
            return {}
        return {"target_entropy": target_entropy(self.eval_model, self._target_tiles, engine,
                                                 self.cfg.entropy_batch_size, self.cfg.entropy_max_tiles)}

    def after_optimizer_step(self, step: int, epoch: int) -> None:
        if self.cfg.stage != 1:
            return
        for means, ok in self._pending:
            update_prototypes(self.prototypes, means.to(self.prototypes.device), ok.to(self.prototypes.device),
                              self.cfg.proto_momentum)
        self._pending = []
        ema_update_(self.ema, self.model, self.cfg.ema_decay, copy_buffers=True)

    # ---- one step
    def training_step(self, batch: dict, ctx) -> dict[str, torch.Tensor]:
        src = batch["source"]
        out = self.wrapped("model")(src["image"])
        loss_sup, parts = self.supervised_loss(out, src["mask"], self.cfg.aux_weight)
        if self.cfg.stage == 1:
            loss, more = self._stage1(batch["target"], ctx)
        else:
            loss, more = self._stage2(batch["target"])
        return {"loss": loss_sup + loss, **parts, **more}

    def _size(self, x: torch.Tensor) -> tuple[int, int]:
        s = self.cfg.label_stride
        return max(1, x.shape[-2] // s), max(1, x.shape[-1] // s)

    def _stage1(self, tgt: dict, ctx) -> tuple[torch.Tensor, dict]:
        cfg, k = self.cfg, self.setup.num_classes
        x_w, x_st, valid = tgt["image"], tgt["strong"][:, 0], tgt["valid"].bool()
        size = self._size(x_w)
        v = valid_cells(valid, size)
        net = self.wrapped("model")
        with torch.no_grad():
            p0 = resize(self.warmup(x_w, return_aux=False).logits.float(), size).softmax(1)
            ema_out = self.ema(x_w, return_features=True, return_aux=False)
            f_ema = resize(ema_out.decoder_input.float(), size)
            d_ema = prototype_distances(f_ema, self.prototypes)
            z_w = prototype_weights(d_ema, cfg.proto_temperature)
            if cfg.rectify:
                labels, _ = rectified_pseudo_labels(p0, z_w, v, cfg.rectify_threshold)
            else:
                labels, _ = rectified_pseudo_labels(p0, torch.ones_like(p0), v, cfg.rectify_threshold)
            means, ok = class_mean_features(f_ema, resize(ema_out.logits.float(), size), v, k, cfg.proto_min_pixels)
            self._pending.append((ctx.gather(means.contiguous()), ctx.gather(ok.float()) > 0.5))

        out_st = net(x_st, return_features=True, return_aux=False)
        out_pl = out_st if cfg.pseudo_view == "strong" else net(x_w, return_aux=False)
        logits_pl = resize(out_pl.logits.float(), size)
        if cfg.sce:
            loss_pl, ce, rce = symmetric_ce(logits_pl, labels, cfg.sce_alpha, cfg.sce_beta, cfg.rce_label_clamp,
                                            cfg.rce_prob_clamp)
        else:
            loss_pl, ce, rce = symmetric_ce(logits_pl, labels, 1.0, 0.0)
        loss_reg = degeneration_regulariser(logits_pl, v, cfg.regulariser)
        d_st = prototype_distances(resize(out_st.decoder_input, size), self.prototypes)
        loss_kl = kl_divergence(z_w, (-d_st / cfg.proto_temperature).log_softmax(1), v)
        loss = loss_pl + cfg.regular_weight * loss_reg + cfg.consistency_weight * loss_kl
        kept = (labels != IGNORE_INDEX).sum() / v.sum().clamp_min(1)
        return loss, {"loss_pl": loss_pl.detach(), "loss_ce_t": ce.detach(), "loss_rce_t": rce.detach(),
                      "loss_reg": loss_reg.detach(), "loss_proto_kl": loss_kl.detach(),
                      "pseudo_ratio": kept.detach().float()}

    def _stage2(self, tgt: dict) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        x_w, x_st, valid = tgt["image"], tgt["strong"][:, 0], tgt["valid"].bool()
        size = self._size(x_w)
        v = valid_cells(valid, size)
        with torch.no_grad():
            labels, _ = teacher_hard_labels(self.teacher, x_w, valid, cfg.distill_threshold, cfg.distill_flip)
            labels = F.interpolate(labels.unsqueeze(1).float(), size=size, mode="nearest")[:, 0].long()
            labels = torch.where(v, labels, torch.full_like(labels, IGNORE_INDEX))
            p_t = resize(self.teacher(x_st, return_aux=False).logits.float(), size).softmax(1)
        logits = resize(self.wrapped("model")(x_st, return_aux=False).logits.float(), size)
        if cfg.distill_sce:
            loss_pl, _, _ = symmetric_ce(logits, labels, cfg.sce_alpha, cfg.sce_beta, cfg.rce_label_clamp,
                                         cfg.rce_prob_clamp)
        else:
            loss_pl, _, _ = symmetric_ce(logits, labels, 1.0, 0.0)
        loss_kd = kl_divergence(p_t, logits.log_softmax(1), v)
        kept = (labels != IGNORE_INDEX).sum() / v.sum().clamp_min(1)
        return loss_pl + cfg.distill_weight * loss_kd, {"loss_pl": loss_pl.detach(), "loss_kd": loss_kd.detach(),
                                                        "pseudo_ratio": kept.detach().float()}
