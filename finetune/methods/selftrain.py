"""Self-training with an EMA teacher for domain adaptation: DAFormer's training strategies and MIC's masked image
consistency (``method=selftrain`` of ``finetune/uda.py``).

Papers: Hoyer, Dai, Van Gool, "DAFormer: Improving Network Architectures and Training Strategies for
Domain-Adaptive Semantic Segmentation", CVPR 2022 (arXiv:2111.14887); Hoyer, Dai, Wang, Van Gool, "MIC: Masked
Image Consistency for Context-Enhanced Domain Adaptation", CVPR 2023 (arXiv:2212.01322); the self-training and
ClassMix follow DACS (Tranheden et al., WACV 2021). Reference code: lhoyer/DAFormer and lhoyer/MIC
(``seg/mmseg/models/uda/dacs.py``, ``masking_consistency_module.py``, ``models/utils/dacs_transforms.py``,
``models/utils/masking_transforms.py``, ``datasets/uda_dataset.py``, ``configs/_base_/uda/dacs*.py``,
``configs/mic/gtaHR2csHR_mic_hrda.py``); behaviour checked against it, no code copied.

Notation: ``x_s, y_s`` source image / mask (255 ignore), ``x_t`` target weak view, ``x_t^1, x_t^2`` two strong
views of the same target crop (pixel-aligned), ``x_s^1`` a strong view of the source crop, ``f_s`` the student
``self.model``, ``f_t`` the EMA teacher ``self.teacher``, ``g`` the frozen copy of the initial (DINO) backbone
``self.fd_backbone``, ``K`` classes, ``v`` valid-pixel masks.

Equation map:
    L_src = CE(f_s(x_s), y_s) [+ lambda_aux CE(aux)]                 -> ``SegMethod.supervised_loss`` (run's loss)
    Feature distance (DAFormer Sec. 3.3) on the deepest encoder feature ("bottleneck"):
        L_fd = mean_{j in M} || F_s(x_s)_j - g(x_s)_j ||_2,   M = cells whose label (majority class of the cell,
        kept when its share >= ``fd_min_ratio``) is in ``fd_classes`` (None: every labelled class)
                                                                      -> :func:`feature_distance_mask`,
                                                                         :func:`masked_feature_distance`
    Pseudo-labels (teacher on the weak target view, no gradient):
        yhat = argmax softmax f_t(x_t);  q = |{p valid: max softmax >= tau}| / |{p valid}|  (DAFormer's quality)
        w_p = q * v_p                                                 -> :func:`quality_pseudo_labels`
    Distribution alignment (optional, ``distribution_alignment``; ReMixMatch, Berthelot et al., ICLR 2020, Sec. 3.2,
    as CBST / DA for classes a source model never predicts on the target): the teacher's probabilities p are
        p~ = normalise(p * pi_s / pbar_t) before the argmax and the confidence above, pi_s the source pixel
        class distribution (train start), pbar_t a running mean (momentum ``da_momentum``, first batch as is)
        of the teacher's mean p over valid target pixels (all-reduced)   -> :func:`align_distribution`
    ClassMix (DACS): per source sample, ceil(n / 2) of its n labelled classes, M = [y_s in chosen]
        x_m = M x_s^1 + (1 - M) x_t^1,  y_m = M y_s + (1 - M) yhat,  w_m = M 1 + (1 - M) w
                                                                      -> :func:`classmix_masks`, ``mix``
        L_mix = (1 / |P|) sum_p w_m,p CE(f_s(x_m)_p, y_m,p)           -> :func:`weighted_ce` (over all pixels P)
    MIC: block mask B (blocks of ``mic_block_size`` px, each dropped with probability ``mic_ratio``)
        L_mic = (1 / |P|) sum_p w_p CE(f_s(B * x_t^2)_p, yhat_p)     -> :func:`block_masks`, :func:`weighted_ce`
    L = L_src + lambda_fd L_fd + lambda_mix L_mix + lambda_mic L_mic -> ``training_step``
    theta_t <- a_t theta_t + (1 - a_t) theta_s, a_t = min(1 - 1 / (t + 2), alpha) after the 0-based step t
                                                                      -> ``after_optimizer_step``
    Rare-class sampling (DAFormer Sec. 3.4), from the source masks at train start (counts all-reduced):
        f_c = n_c / sum_c' n_c',  P(c) = softmax_c((1 - f_c) / T),  S_c = {tiles with > ``rcs_min_fraction`` of
        their pixels of class c};  draw c ~ P, then a tile of S_c uniformly, i.e. per tile i
        w_i = sum_c P(c) [i in S_c] / |S_c|                           -> :func:`rare_class_probabilities`,
                                                                         :func:`rare_class_tile_weights`,
                                                                         ``sampling_weights("source", epoch)``
    target_entropy = mean over valid target pixels of H(softmax f_s(x)) / log K, on the target *training* tiles
        (``target_plain``; never ``target_val``)                      -> :func:`target_entropy`, ``extra_metrics``

Config defaults: ``configs/_base_/uda/dacs.py`` with ``dacs_a999_fdthings.py`` (alpha 0.999, FD weight 0.005,
cell ratio 0.75), the DAFormer RCS settings (T = 0.01, ``min_pixels`` 3000) and MIC's
``gtaHR2csHR_mic_hrda.py`` (mask ratio 0.7, 64 px blocks, ``mask_lambda`` 1). For checkpoint selection without
target labels set ``trainer.best_metric: target_entropy`` with ``trainer.best_mode: min``.

Deviations from the reference code:
    * SAR-safe augmentation: the reference colour-jitters and blurs the mixed and the masked images (RGB only);
      here they are built from the dataset's strong views (``augment.strong``: per-band gain/offset, speckle for
      dB bands, noise, blur, band dropout), one independent view per branch (``views``: one source, two target).
    * Invalid (nodata) pixels: never pseudo-labelled (label 255, weight 0) and left out of the quality ``q``; the
      reference's Cityscapes-specific ``pseudo_weight_ignore_top/bottom`` (ego-car rows) is replaced by this.
    * ``q`` is computed per process over its batch (the reference: per GPU over its batch, all pixels).
    * ClassMix draws the classes of each sample from that sample's own labels without the ignore label; the
      reference draws from ``torch.unique`` of the whole batch (ignore label included).
    * BatchNorm backbones: the masked (MIC) pass leaves the running statistics alone (``mic_freeze_bn_stats``,
      default on). MIC's MiT encoder has LayerNorm, so its masked images never reach evaluation statistics; with
      BatchNorm they would (measured on the demo: recalibrating BN on clean source tiles after a run raised source
      validation from 56.8 to 60.8 mIoU and target from 48.7 to 53.5, where the same recalibration of the source-only
      model lowered both).
    * Blocks too large for the crops are refused (:func:`check_mic_blocks`: at least 4 per side).
    * The EMA teacher runs in eval mode (dropout off, as the reference) and its BatchNorm buffers are copied from
      the student after every update (the reference's EMA model keeps its own, see ``mean_teacher``).
    * Rare-class sampling is per-tile sampling weights for the source stream's epochs (drawn with replacement,
      deterministic per epoch); ``rcs_min_fraction`` (default 0.0015 ~ 3000 px of a 1914 x 1052 GTA frame)
      replaces the absolute ``min_pixels`` so that it does not depend on the tile size. The reference re-crops a
      drawn image up to 10 times until the class covers ``min_crop_ratio * min_pixels`` pixels; crops are made in
      the dataset here, so that step is not done. Classes without any qualifying tile are left out of P (the
      reference asserts there are none).
    * Feature distance: against a frozen copy of the DINO backbone of ``model.weights`` (the reference: ImageNet
      weights). Without an export (``model.weights`` unset, or ``model.init_from``) the term is skipped and a note
      is printed; the export is recognised by the frozen copy's backbone equalling the student's initial one.
      With ``fd_classes`` unset only cells with a dominant labelled class count (the reference: every feature
      cell); ``fd_classes`` names the thing/rare classes (DAFormer's Cityscapes thing classes 6, 7, 11-18).
    * Distribution alignment is not in DAFormer / MIC (an option, off by default): its target prior is the source
      labels' class distribution, an assumption that holds for a region or sensor shift of the same land cover and
      not for a change of the class mix.
    * Mixed / masked losses use plain pixel-weighted cross-entropy (the reference's ``seg_weight``), not the
      run's ``loss`` section (OHEM / Dice do not take pixel weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.bands import IGNORE_INDEX
from common.ema import ema_update_, make_teacher
from common.errors import UserInputError
from finetune.methods import register
from finetune.methods.base import SegMethod
from finetune.methods.common import bn_stats_frozen, export_backbone_copy, mix, normalised_entropy, target_entropy
from finetune.methods.mean_teacher import ema_decay_at

__all__ = ["SelfTrainConfig", "SelfTrain", "quality_pseudo_labels", "align_distribution", "classmix_masks", "block_masks", "weighted_ce",
           "feature_distance_mask", "masked_feature_distance", "rare_class_probabilities",
           "rare_class_tile_weights", "class_pixel_counts", "normalised_entropy", "target_entropy",
           "export_backbone_copy"]  # the last three re-exported from finetune.methods.common


# ------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def quality_pseudo_labels(logits: torch.Tensor, valid: torch.Tensor, threshold: float,
                          ignore_index: int = IGNORE_INDEX, probs: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DAFormer's pseudo-labels of teacher logits ``(B, K, H, W)``: ``(labels, weights, q)`` (of ``probs`` instead
    of ``softmax(logits)`` when given, e.g. aligned ones).

    ``labels = argmax softmax`` (``ignore_index`` on invalid pixels), ``q`` = the fraction of valid pixels whose
    confidence is at least ``threshold`` (one scalar for the batch) and ``weights = q`` on valid pixels, 0 elsewhere.
    """
    conf, labels = (logits.float().softmax(1) if probs is None else probs).max(1)
    valid = valid.bool()
    q = ((conf >= threshold) & valid).sum() / valid.sum().clamp_min(1)
    labels = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    return labels, q * valid.float(), q


@torch.no_grad()
def align_distribution(probs: torch.Tensor, source_prior: torch.Tensor, target_mean: torch.Tensor) -> torch.Tensor:
    """ReMixMatch's distribution alignment of ``(B, K, H, W)`` probabilities: each pixel's ``p * pi_s / pbar_t``
    renormalised over the classes (``source_prior`` and ``target_mean`` ``(K,)``; a class with ``pbar_t = 0`` keeps
    weight 0)."""
    ratio = torch.where(target_mean > 0, source_prior / target_mean.clamp_min(1e-12), torch.zeros_like(target_mean))
    aligned = probs * ratio.view(1, -1, 1, 1).to(probs.dtype)
    return aligned / aligned.sum(1, keepdim=True).clamp_min(1e-12)


def classmix_masks(labels: torch.Tensor, generator: torch.Generator,
                   ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """ClassMix masks ``(B, H, W)`` (True: the source pixel is pasted) and the chosen classes of each sample:
    ``ceil(n / 2)`` of the ``n`` classes of the sample's labels (ignore label excluded), uniformly without
    replacement (``generator``: CPU)."""
    masks = torch.zeros_like(labels, dtype=torch.bool)
    chosen = []
    for i in range(labels.shape[0]):
        classes = torch.unique(labels[i]).cpu()
        classes = classes[classes != ignore_index]
        n = classes.numel()
        pick = classes[torch.randperm(n, generator=generator)[: (n + 1) // 2]] if n else classes
        chosen.append(pick)
        if n:
            masks[i] = torch.isin(labels[i], pick.to(labels.device))
    return masks, chosen


def block_masks(batch: int, height: int, width: int, ratio: float, block: int, generator: torch.Generator,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """MIC's random patch masks ``(B, H, W)`` as floats: 1 keeps a pixel, 0 masks it; blocks of ``block`` px (a
    ``round(H / block) x round(W / block)`` grid, at least 1 x 1, resized to ``(H, W)`` by nearest neighbour),
    each masked with probability ``ratio``."""
    gh, gw = max(1, round(height / block)), max(1, round(width / block))
    keep = (torch.rand(batch, 1, gh, gw, generator=generator) > ratio).float()
    return F.interpolate(keep, size=(height, width), mode="nearest")[:, 0].to(device)


MIC_MIN_BLOCKS = 4
"""Fewest MIC blocks per side of a target crop (MIC: 64 px blocks on 512-1024 px crops, 8-16 per side)."""


def check_mic_blocks(block: int, height: int, width: int) -> None:
    """Refuse MIC blocks too large for the target crops: with fewer than :data:`MIC_MIN_BLOCKS` blocks per side the
    mask drops whole tiles or halves (a 64 px block on a 48 px crop masks the entire crop with probability
    ``mic_ratio``), and the masked-consistency loss trains on images with nothing left to see."""
    side = min(height, width)
    if round(side / block) < MIC_MIN_BLOCKS:
        raise UserInputError(
            f"selftrain.mic_block_size={block} is too large for the {height} x {width} px target crops: "
            f"{max(1, round(side / block))} block(s) per side, so the masked view drops whole tiles or halves; set "
            f"selftrain.mic_block_size to at most {max(1, side // MIC_MIN_BLOCKS)} (MIC: 64 px blocks on 512-1024 px "
            f"crops, 8-16 blocks per side)")


def weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(1 / |P|) sum_p w_p CE(logits_p, labels_p)`` over every pixel ``P`` of the batch (mmseg's ``seg_weight``
    with ``reduction='mean'``): ignored pixels count as zeros."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    return (ce * weights).sum() / max(ce.numel(), 1)


def feature_distance_mask(labels: torch.Tensor, size: tuple[int, int], num_classes: int,
                          classes: tuple[int, ...] | None, min_ratio: float,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Feature cells ``(B, h, w)`` the feature distance applies to: the label of a cell is its majority class
    (ignore counting as a class) when that class covers at least ``min_ratio`` of it (DAFormer's
    ``downscale_label_ratio``); cells whose label is in ``classes`` (None: any labelled class) are kept."""
    lab = labels.long().clone()
    lab[(lab < 0) | (lab >= num_classes)] = num_classes
    onehot = F.one_hot(lab, num_classes + 1).permute(0, 3, 1, 2).float()
    ratio, cell = F.adaptive_avg_pool2d(onehot, size).max(1)
    cell[(cell == num_classes) | (ratio < min_ratio)] = ignore_index
    if classes is None:
        return cell != ignore_index
    return torch.isin(cell, torch.tensor(classes, device=cell.device))


def masked_feature_distance(student: torch.Tensor, frozen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the cells of ``mask`` of the L2 distance between the features ``(B, C, h, w)`` (0 when none)."""
    dist = (student.float() - frozen.float()).norm(dim=1)
    m = mask.to(dist.dtype)
    return (dist * m).sum() / m.sum().clamp_min(1.0)


def class_pixel_counts(labels: torch.Tensor, valid: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, K)`` number of valid pixels of each class per sample (ignore / out-of-range labels not counted)."""
    lab = labels.long()
    keep = valid.bool() & (lab >= 0) & (lab < num_classes)
    lab = torch.where(keep, lab, torch.full_like(lab, num_classes)).flatten(1)
    counts = torch.zeros(lab.shape[0], num_classes + 1, dtype=torch.float64, device=lab.device)
    counts.scatter_add_(1, lab, torch.ones_like(lab, dtype=torch.float64))
    return counts[:, :num_classes]


def rare_class_probabilities(pixel_counts: torch.Tensor, temperature: float) -> torch.Tensor:
    """``P(c) = softmax((1 - f_c) / T)`` over the classes with pixels (0 for the others), ``f_c`` the pixel share."""
    counts = pixel_counts.double()
    present = counts > 0
    if not present.any():
        return torch.zeros_like(counts)
    f = counts / counts.sum()
    logits = torch.where(present, (1.0 - f) / temperature, torch.full_like(f, -math.inf))
    return logits.softmax(0)


def rare_class_tile_weights(tile_counts: torch.Tensor, tile_pixels: torch.Tensor, temperature: float,
                            min_fraction: float) -> tuple[np.ndarray | None, torch.Tensor]:
    """Per-tile sampling weights of rare-class sampling and the class probabilities used.

    ``tile_counts`` ``(N, K)`` pixels of each class per tile, ``tile_pixels`` ``(N,)`` pixels per tile. Tile ``i``
    holds class ``c`` when ``tile_counts[i, c] > min_fraction * tile_pixels[i]``; classes held by no tile are left
    out and ``P`` renormalised. Returns ``(None, P)`` when no class is held by any tile (uniform sampling)."""
    counts = tile_counts.double()
    holds = counts > min_fraction * tile_pixels.double()[:, None]
    n_tiles = holds.sum(0)
    p = rare_class_probabilities(counts.sum(0), temperature)
    p = torch.where(n_tiles > 0, p, torch.zeros_like(p))
    if p.sum() <= 0:
        return None, p
    p = p / p.sum()
    w = (holds.double() * (p / n_tiles.clamp_min(1))[None]).sum(1)
    return w.numpy(), p


# ------------------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelfTrainConfig:
    """Hyper-parameters of DAFormer / MIC self-training (section ``selftrain``)."""

    ema_decay: float = 0.999  # alpha (dacs_a999_fdthings.py; dacs.py: 0.99)
    ema_warmup: bool = True  # a_t = min(1 - 1 / (t + 2), alpha) (DACS's min(1 - 1 / (iter + 1), alpha))
    threshold: float = 0.968  # tau: confidence for the quality q (dacs.py pseudo_threshold)
    mix_weight: float = 1.0  # lambda_mix (reference: 1, implicit)
    mic_weight: float = 1.0  # lambda_mic (MIC mask_lambda 1; 0: DAFormer without MIC)
    mic_ratio: float = 0.7  # MIC mask_ratio
    mic_block_size: int = 64  # MIC mask_block_size (px)
    mic_freeze_bn_stats: bool = True  # the masked pass leaves BatchNorm running statistics alone (MIC: LayerNorm)
    rcs: bool = True  # rare-class sampling of the source tiles
    rcs_temperature: float = 0.01  # T (DAFormer class_temp)
    rcs_min_fraction: float = 0.0015  # a tile holds a class above this share of its pixels (3000 px / GTA frame)
    rcs_batch_size: int = 16  # batch size of the class-count pass over the source tiles at train start
    fd_weight: float = 0.005  # lambda_fd (dacs_a999_fdthings.py imnet_feature_dist_lambda); 0: off
    fd_classes: tuple[int, ...] | None = None  # classes the FD applies to (None: every labelled class)
    fd_min_ratio: float = 0.75  # share of a feature cell its class must cover (imnet_feature_dist_scale_min_ratio)
    aux_weight: float = 0.4  # lambda_aux: auxiliary-head loss on the source (model.aux only)
    distribution_alignment: bool = False  # align the teacher's target class distribution to the source's (ReMixMatch)
    da_momentum: float = 0.99  # momentum of the running mean of the teacher's target class distribution
    entropy_batch_size: int = 8  # batch size of the target_entropy pass at evaluation
    entropy_max_tiles: int | None = None  # target tiles of that pass (first N; None: all)

    def validate(self) -> None:
        for key in ("ema_decay", "threshold", "da_momentum"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"selftrain.{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0.0 <= self.mic_ratio < 1.0:
            raise ValueError(f"selftrain.mic_ratio must be in [0, 1), got {self.mic_ratio}")
        if not 0.0 <= self.rcs_min_fraction < 1.0:
            raise ValueError(f"selftrain.rcs_min_fraction must be in [0, 1), got {self.rcs_min_fraction}")
        if not 0.0 < self.fd_min_ratio <= 1.0:
            raise ValueError(f"selftrain.fd_min_ratio must be in (0, 1], got {self.fd_min_ratio}")
        for key in ("mix_weight", "mic_weight", "fd_weight", "aux_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"selftrain.{key} must be >= 0, got {getattr(self, key)}")
        if self.rcs_temperature <= 0:
            raise ValueError(f"selftrain.rcs_temperature must be > 0, got {self.rcs_temperature}")
        for key in ("mic_block_size", "rcs_batch_size", "entropy_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"selftrain.{key} must be >= 1, got {getattr(self, key)}")
        if self.entropy_max_tiles is not None and self.entropy_max_tiles < 1:
            raise ValueError(f"selftrain.entropy_max_tiles must be >= 1 or null, got {self.entropy_max_tiles}")


@register
class SelfTrain(SegMethod):
    """DAFormer / MIC self-training: EMA teacher, quality-weighted pseudo-labels, ClassMix, masked image
    consistency, rare-class sampling and a feature distance to the frozen DINO backbone."""

    name = "selftrain"
    Config = SelfTrainConfig
    tasks = ("uda",)
    streams = ("source", "target")
    views = {"source": 1, "target": 2}

    def __init__(self, cfg: SelfTrainConfig, model: nn.Module, setup) -> None:
        super().__init__(cfg, model, setup)
        k = setup.num_classes
        if cfg.fd_classes is not None and any(not 0 <= c < k for c in cfg.fd_classes):
            raise UserInputError(f"selftrain.fd_classes={list(cfg.fd_classes)} lists classes outside 0..{k - 1} "
                                 f"(data.num_classes={k})")
        self.teacher = make_teacher(model)  # outside DDP, checkpointed
        self.fd_backbone: nn.Module | None = None
        self.fd_note = "selftrain: feature distance off (selftrain.fd_weight=0)"
        if cfg.fd_weight > 0:
            fresh = export_backbone_copy(setup)
            if fresh is None:
                self.fd_note = ("selftrain: feature distance skipped: no backbone export (model.weights) to stay "
                                "close to; give model.weights=<DINO export> to use it, or set selftrain.fd_weight=0")
            else:
                self.fd_backbone = fresh.backbone.requires_grad_(False)
                self.fd_note = "selftrain: feature distance to the frozen backbone of model.weights"
        # distribution alignment: pi_s (from the source masks at train start) and pbar_t (running), checkpointed
        self.register_buffer("da_source_prior", torch.zeros(k))
        self.register_buffer("da_target_mean", torch.zeros(k))
        self._rcs_weights: np.ndarray | None = None
        self._rcs_ready = False
        self._target_tiles = None

    def train(self, mode: bool = True) -> "SelfTrain":
        super().train(mode)
        self.teacher.eval()  # pseudo-labels without dropout; BatchNorm buffers copied from the student
        if self.fd_backbone is not None:
            self.fd_backbone.eval()
        return self

    # ---- hooks
    def on_train_start(self, ctx) -> None:
        self._target_tiles = ctx.datasets["target_plain"]
        ctx.print(self.fd_note)
        if self.cfg.rcs or self.cfg.distribution_alignment:
            counts, pixels = self._source_class_counts(ctx)
            if self.cfg.rcs:
                self._init_rare_class_sampling(ctx, counts, pixels)
            if self.cfg.distribution_alignment:
                total = counts.sum(0)
                self.da_source_prior.copy_((total / total.sum().clamp_min(1)).to(self.da_source_prior))
                names = self.setup.class_names or tuple(str(c) for c in range(len(total)))
                ctx.print("selftrain: distribution alignment to the source pixel classes: " + ", ".join(
                    f"{n} {float(v):.3f}" for n, v in zip(names, self.da_source_prior)))
        self._rcs_ready = True

    @torch.no_grad()
    def _source_class_counts(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, K)`` pixels of each class and ``(N,)`` pixels of every source tile (one pass, all processes)."""
        ds = ctx.datasets["source_plain"]
        k = self.setup.num_classes
        counts = torch.zeros(len(ds), k, dtype=torch.float64, device=ctx.device)
        pixels = torch.zeros(len(ds), dtype=torch.float64, device=ctx.device)
        for batch in ctx.eval_loader("source_plain", self.cfg.rcs_batch_size):
            idx = batch["index"].to(ctx.device).long()
            mask, valid = batch["mask"].to(ctx.device), batch["valid"].to(ctx.device)
            counts[idx] = class_pixel_counts(mask, valid, k)
            pixels[idx] = float(mask.shape[-2] * mask.shape[-1])
        return ctx.reduce(counts, "sum"), ctx.reduce(pixels, "sum")  # each tile on exactly one process

    @torch.no_grad()
    def _init_rare_class_sampling(self, ctx, counts: torch.Tensor, pixels: torch.Tensor) -> None:
        k = self.setup.num_classes
        weights, p = rare_class_tile_weights(counts.cpu(), pixels.cpu(), self.cfg.rcs_temperature,
                                             self.cfg.rcs_min_fraction)
        self._rcs_weights = weights
        names = self.setup.class_names or tuple(str(c) for c in range(k))
        if weights is None:
            ctx.print("selftrain: rare-class sampling off: no source tile holds a class above "
                                  f"selftrain.rcs_min_fraction={self.cfg.rcs_min_fraction}")
        else:
            ctx.print("selftrain: rare-class sampling P(c): " + ", ".join(
                f"{n} {float(v):.3f}" for n, v in zip(names, p)))

    def sampling_weights(self, stream: str, epoch: int) -> np.ndarray | None:
        if stream != "source" or not self.cfg.rcs:
            return None
        if not self._rcs_ready:
            raise RuntimeError("selftrain.sampling_weights called before on_train_start computed the class counts")
        return self._rcs_weights

    def extra_metrics(self, engine) -> dict[str, float]:
        if self._target_tiles is None:
            return {}
        return {"target_entropy": target_entropy(self.eval_model, self._target_tiles, engine,
                                                 self.cfg.entropy_batch_size, self.cfg.entropy_max_tiles)}

    def after_optimizer_step(self, step: int, epoch: int) -> None:
        ema_update_(self.teacher, self.model, ema_decay_at(step, self.cfg.ema_decay, self.cfg.ema_warmup),
                    copy_buffers=True)

    @torch.no_grad()
    def _aligned(self, probs: torch.Tensor, valid: torch.Tensor, ctx) -> torch.Tensor:
        """Update ``pbar_t`` with this batch's mean teacher distribution over valid pixels (all processes; the first
        batch sets it) and return the aligned probabilities."""
        v = valid.to(probs.dtype).unsqueeze(1)
        stats = torch.cat([(probs * v).sum((0, 2, 3)), v.sum().reshape(1)]).double()
        stats = ctx.reduce(stats, "sum").to(self.da_target_mean)
        mean = stats[:-1] / stats[-1].clamp_min(1)
        old = self.da_target_mean
        m = torch.where(old.sum() > 0, torch.full_like(stats[-1], self.cfg.da_momentum), torch.zeros_like(stats[-1]))
        # no device sync: a batch without valid pixels leaves pbar_t as it was
        self.da_target_mean.copy_(torch.where(stats[-1] > 0, m * old + (1.0 - m) * mean, old))
        return align_distribution(probs, self.da_source_prior, self.da_target_mean)

    # ---- one step
    def training_step(self, batch: dict, ctx) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        src, tgt = batch["source"], batch["target"]
        x_s, y_s = src["image"], src["mask"]
        x_s1 = src["strong"][:, 0]
        x_t, v_t = tgt["image"], tgt["valid"].bool()
        x_t1, x_t2 = tgt["strong"][:, 0], tgt["strong"][:, 1]
        b, _, h, w = x_t.shape
        net = self.wrapped("model")
        g = ctx.generator()

        # 1. source: supervised loss (+ feature distance on the deepest encoder feature)
        use_fd = self.fd_backbone is not None
        out = net(x_s, return_features=use_fd)
        loss, parts = self.supervised_loss(out, y_s, cfg.aux_weight)
        if use_fd:
            feat = out.features[-1]
            with torch.no_grad():
                frozen = self.fd_backbone(x_s)[-1]
            fd_mask = feature_distance_mask(y_s, tuple(feat.shape[-2:]), self.setup.num_classes, cfg.fd_classes,
                                            cfg.fd_min_ratio)
            loss_fd = masked_feature_distance(feat, frozen, fd_mask)
            loss = loss + cfg.fd_weight * loss_fd
            parts["loss_fd"] = loss_fd.detach()

        # 2. teacher pseudo-labels of the weak target view, DAFormer's quality weight
        with torch.no_grad():
            t_logits = self.teacher(x_t, return_aux=False).logits
            probs = self._aligned(t_logits.float().softmax(1), v_t, ctx) if cfg.distribution_alignment else None
        labels, weights, q = quality_pseudo_labels(t_logits, v_t, cfg.threshold, probs=probs)

        # 3. ClassMix: half of each source sample's classes pasted onto the target (strong views); target tile i
        #    gets source tile i mod B_s (the reference's batches are equal: i with i)
        pair = torch.arange(b, device=y_s.device) % y_s.shape[0]
        y_p, x_p = y_s[pair], x_s1[pair]
        masks, _ = classmix_masks(y_p, g)
        x_mix = mix(x_t1, x_p, masks)
        y_mix = mix(labels, y_p, masks)
        w_mix = mix(weights, torch.ones_like(weights), masks)
        loss_mix = weighted_ce(net(x_mix, return_aux=False).logits, y_mix, w_mix)
        loss = loss + cfg.mix_weight * loss_mix

        # 4. MIC: masked strong target view against the same pseudo-labels
        check_mic_blocks(cfg.mic_block_size, h, w)
        keep = block_masks(b, h, w, cfg.mic_ratio, cfg.mic_block_size, g, device=x_t.device)
        with bn_stats_frozen(net, cfg.mic_freeze_bn_stats):  # a masked image is a sample of neither domain
            logits_mic = net(x_t2 * keep.unsqueeze(1).to(x_t2.dtype), return_aux=False).logits
        loss_mic = weighted_ce(logits_mic, labels, weights)
        loss = loss + cfg.mic_weight * loss_mic

        return {"loss": loss, **parts, "loss_mix": loss_mix.detach(), "loss_mic": loss_mic.detach(),
                "pseudo_quality": q.detach().float(), "mix_frac": masks.float().mean().detach(),
                "mic_masked": 1.0 - keep.mean().detach()}
