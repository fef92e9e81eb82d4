"""AEL: Adaptive Equalization Learning for semi-supervised segmentation (``method=ael``).

Paper: Hu, Wei, Hu, Ye, Cui, Wang, "Semi-Supervised Semantic Segmentation via Adaptive Equalization Learning",
NeurIPS 2021. Reference code: github.com/hzhupku/SemiSeg-AEL (``train.py``, ``semseg/utils/utils.py``,
``semseg/utils/loss_helper.py``, ``experiments/*/config.yaml``); behaviour checked against it, no code copied.

A mean teacher (EMA of the student, outside DDP) whose training is tilted towards the classes the student is
least sure of, read from a class-wise *confidence bank*:

Equation map (``c`` a class, ``K`` classes, ``m`` = ``confidence_momentum``, ``p^s`` / ``p^t`` student / teacher
softmax, ``y`` labels with 255 = ignore, ``P_c`` the labelled pixels of class ``c`` in the global batch):

    Conf_c = (1 / |P_c|) sum_{i in P_c} p^s_c(x_i)  (0 when |P_c| = 0)
                                  -> :func:`class_confidence_sums` (summed over processes), :func:`class_confidence`
    Bank_c <- m Bank_c + (1 - m) Conf_c                        -> :func:`update_confidence_bank` (``self.confidence``)
    q_c = softmax_c((1 - Bank_c)^a)                            -> :func:`class_probabilities`
          a = ``copy_paste_power`` (0.5) over the classes not in ``copy_paste_exclude`` for copy-paste,
          a = ``cutmix_power`` (1.0) over all classes for CutMix
    adaptive copy-paste:  M = 1[y_j in S], S ~ q (``copy_paste_classes`` draws), with probability
          ``copy_paste_prob``:  x_i <- (1 - M) x_i + M x_j,  y_i <- (1 - M) y_i + M y_j
                                                               -> :func:`copy_paste`
    adaptive CutMix: c ~ q, x_b = a recent unlabelled image whose teacher prediction holds c, M = bounding box of a
          random connected region of c in argmax p^t(x_b) (a random box of area ``cutmix_fallback_area`` when there
          is none):  x~ = (1 - M) x_u + M x_b,  target p~ = (1 - M) p^t(x_u) + M p^t(x_b)
                                                               -> :func:`adaptive_cutmix_masks`, ``mix``
    dynamic re-weighting + equalising sampling of the consistency loss, over pixels i:
          yhat_i = argmax p~_i (255 below ``threshold`` or on invalid pixels),  w_i = (max p~_i)^gamma * s_i,
          s_i ~ Bernoulli(d_{argmax p^s_i}),  d_c = ((1 - Bank_c) / max_c'(1 - Bank_c'))^gamma2
          L_u = sum_i w_i CE(p^s_i, yhat_i) / sum_{i: yhat_i != 255} w_i
                                                               -> :func:`sampling_mask`, :func:`reweighted_consistency`
    L = L_sup(x_l, y_l) + lambda_aux L_sup^aux + lambda_u r(t) (L_u(labelled) + L_u(unlabelled))
                                                               -> ``training_step`` (``SegMethod.supervised_loss``)
    theta_t <- d_t theta_t + (1 - d_t) theta_s,  d_t = min(1 - 1 / (t + 1), ``ema_decay``)
                                                               -> ``after_optimizer_step`` (``common.ema``)

Config defaults come from the released Cityscapes config (``experiments/cityscapes_2/config.yaml``) and
``train.py`` unless a deviation below says otherwise (Pascal VOC differs in ``threshold`` 0.7,
``copy_paste_classes`` 1 and the CutMix area thresholds 0.03).

Deviations from the reference code (each a config value where it is a choice):

* Confidence bank: the per-class sums and pixel counts are all-reduced (``ctx.reduce``), so every process holds
  the same bank and two processes compute what one process does on the concatenated batch; it is a buffer, so
  checkpoints hold it and a resumed run continues it. The reference updates an unsynchronised bank per GPU and does
  not save it (a resumed run would restart from ``torch.rand``). Initial value: the constant
  ``confidence_init`` (0.5, the mean of the reference's ``torch.rand(K)`` start, which also allocates two unused
  rows).
* Copy-paste: the pasted image is another sample of the same labelled batch (same augmentation); the reference
  loads a random labelled image with its own random resize (0.1-2.0). Classes excluded from the draw are
  ``copy_paste_exclude`` (default none; the reference hard-codes Cityscapes' road, sidewalk, building, vegetation
  and sky, ``[0, 1, 2, 8, 10]``). The reference skips a paste whose label sum is 0 (meant for its all-zero
  placeholder; it also drops real pastes of an all-class-0 label); here each sample pastes with probability
  ``copy_paste_prob`` (the reference's ``prob: 0.5`` is the probability of *not* pasting). The valid-pixel mask
  is composed with the image.
* CutMix bank: the reference keeps a class-presence table over the whole unlabelled set and re-reads the chosen
  image from disk. Here the bank holds the ``bank_size`` most recent unlabelled weak views (``bank_push`` per
  process per step) with their valid masks and teacher-predicted class presence, in buffers (checkpointed: a
  resumed run is bit-exact; cost ``bank_size * (C + 1) * H * W * 4`` bytes in every checkpoint). Images pushed on
  every process are gathered, so all processes hold one bank. The presence of an image is recorded when it is
  pushed (the reference also refreshes it from the teacher's prediction when it reuses the image). The bank is empty
  at the first step: no mixing then. Every unlabelled sample is mixed with its own bank partner (the reference mixes
  one of its two per-GPU images). Regions and presence count valid pixels only; area thresholds are fractions of
  ``H * W`` (the reference's ``h ** 2`` assumes square crops). The released configs set ``no_pad`` and ``no_slim``,
  so the box is the region's bounding box as is (the unused padding/slimming variants are not offered).
* Consistency denominator: ``consistency_denominator="kept"`` normalises by the weights of pseudo-labelled pixels;
  the reference (``"all"``) also counts the weights of ignored pixels (below ``threshold``, or nodata here), which
  shrinks the loss with the nodata fraction of a SAR swath.
* Equalising sampling draws one uniform map per pixel from ``ctx.generator()`` (the reference draws one per class
  from the global CUDA RNG; same distribution).
* Student input: ``student_view="weak"`` is the reference (the mixed image is the only perturbation); ``"strong"``
  mixes the platform's SAR-safe strong view instead (the pasted bank region stays a weak view). ``views`` is a
  class attribute, so the data pipeline makes the one strong view even when ``"weak"`` leaves it unused.
* Supervised loss: the run's configured criterion (``loss`` section); the reference's OHEM with
  ``min_kept=100000`` is plain cross-entropy on its crops.
* ``rampup_steps`` (sigmoid ramp of ``consistency_weight``) defaults to 0: none, as the reference.
* Evaluated and exported network: the teacher (``eval_teacher``; the reference selects and saves the teacher).
  Like the reference, the teacher runs in training mode during training (``teacher_train_mode``: BatchNorm uses
  batch statistics and keeps its own running statistics; the EMA averages parameters only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from common.bands import IGNORE_INDEX
from common.ema import ema_update_
from common.errors import UserInputError
from finetune.methods import register
from finetune.methods.base import SegMethod, SegSetup, make_teacher
from finetune.methods.common import check_rampup_fits, mix, pseudo_labels, sigmoid_rampup

__all__ = ["AELConfig", "AEL", "class_confidence_sums", "class_confidence", "update_confidence_bank",
           "class_probabilities", "copy_paste", "class_presence", "component_box", "random_box",
           "adaptive_cutmix_masks", "sampling_mask", "reweighted_consistency"]


@dataclass(frozen=True)
class AELConfig:
    """Hyper-parameters of AEL (section ``ael``); the source of each default is in the module docstring."""

    # mean teacher
    ema_decay: float = 0.99  # net.ema_decay of the released configs
    ema_warmup: bool = True  # decay min(1 - 1 / (step + 1), ema_decay) (train.py)
    teacher_train_mode: bool = True  # the teacher forwards in training mode (model_teacher.train() in train.py)
    eval_teacher: bool = True  # evaluate / export the teacher (the reference validates and saves the teacher)
    # losses
    aux_weight: float = 0.4  # net.aux_loss.loss_weight (used when the model has an auxiliary head)
    consistency_weight: float = 1.0  # criterion.consist_weight (default 1)
    rampup_steps: int = 0  # sigmoid ramp-up of the consistency weight (0: none, as the reference)
    labelled_consistency: bool = True  # consistency term on the labelled batch too (loss_consistency1)
    threshold: float = 0.0  # teacher confidence below which a pixel gets no pseudo-label (Cityscapes 0, VOC 0.7)
    gamma: float = 2.0  # criterion.cons.gamma: weight (teacher confidence)^gamma
    dynamic_sampling: bool = True  # criterion.cons.sample: class-equalising pixel sampling
    gamma2: float = 1.0  # criterion.cons.gamma2: exponent of the per-class sampling rate
    consistency_denominator: Literal["kept", "all"] = "kept"  # "all": the reference's (ignored pixels counted)
    eps: float = 1e-12  # guard of the reference's normalisations
    # confidence bank
    confidence_momentum: float = 0.999  # acp.momentum / acm.momentum / cons.momentum
    confidence_init: float = 0.5  # initial bank value (reference: torch.rand)
    # adaptive copy-paste
    copy_paste: bool = True  # dataset.acp
    copy_paste_prob: float = 0.5  # probability that a labelled sample receives a paste (1 - acp.prob)
    copy_paste_classes: int = 3  # acp.number: class draws per step (duplicates merged)
    copy_paste_power: float = 0.5  # q = softmax((1 - Bank)^power): the reference's conf ** 0.5
    copy_paste_exclude: tuple[int, ...] = ()  # class indices never pasted (reference: Cityscapes [0, 1, 2, 8, 10])
    # adaptive CutMix
    adaptive_cutmix: bool = True  # dataset.train.acm
    cutmix_power: float = 1.0  # q = softmax((1 - Bank)^power) (sample_from_bank, smooth=False)
    cutmix_area_thresh: float = 0.005  # acm.area_thresh: least region area (fraction of H * W) to cut
    bank_area_thresh: float = 0.01  # acm.area_thresh2: least predicted area for an image to hold a class
    cutmix_fallback_area: float = 0.5  # random box area when the class has no region (init_cutmix)
    bank_size: int = 16  # recent unlabelled images kept for CutMix (checkpointed)
    bank_push: int = 1  # images each process adds to the bank per step
    student_view: Literal["weak", "strong"] = "weak"  # unlabelled student input before mixing

    def validate(self) -> None:
        for key in ("ema_decay", "confidence_momentum", "copy_paste_prob", "threshold", "confidence_init",
                    "cutmix_area_thresh", "bank_area_thresh"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"ael.{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0.0 < self.cutmix_fallback_area <= 1.0:
            raise ValueError(f"ael.cutmix_fallback_area must be in (0, 1], got {self.cutmix_fallback_area}")
        for key in ("aux_weight", "consistency_weight", "gamma", "gamma2", "copy_paste_power", "cutmix_power",
                    "eps"):
            if getattr(self, key) < 0:
                raise ValueError(f"ael.{key} must be >= 0, got {getattr(self, key)}")
        if self.rampup_steps < 0:
            raise ValueError(f"ael.rampup_steps must be >= 0, got {self.rampup_steps}")
        for key in ("copy_paste_classes", "bank_size", "bank_push"):
            if getattr(self, key) < 1:
                raise ValueError(f"ael.{key} must be >= 1, got {getattr(self, key)}")
        if len(set(self.copy_paste_exclude)) != len(self.copy_paste_exclude):
            raise ValueError(f"ael.copy_paste_exclude lists a class twice: {list(self.copy_paste_exclude)}")


# ---------------------------------------------------------------------------------------------------------------
# Building blocks (pure functions, tested on hand-made tensors)
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def class_confidence_sums(logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                          ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class ``c``: the sum of the softmax probability of ``c`` over the pixels labelled ``c``, and their count
    (float32 ``(K,)`` each; ``ignore_index`` pixels count nowhere). Sums add up across processes."""
    prob = logits.detach().float().softmax(dim=1)
    onehot = torch.stack([target == c for c in range(num_classes)], dim=1)  # (B, K, H, W); 255 matches no class
    onehot = onehot & (target != ignore_index).unsqueeze(1)
    m = onehot.to(prob.dtype)
    return (prob * m).sum(dim=(0, 2, 3)), m.sum(dim=(0, 2, 3))


def class_confidence(logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """AEL's ``cal_category_confidence``: per class the mean softmax probability of the true class over the pixels
    labelled with it, 0 for a class absent from ``target``."""
    sums, counts = class_confidence_sums(logits, target, num_classes, ignore_index)
    return _mean_or_zero(sums, counts)


def _mean_or_zero(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.zeros_like(sums))


def update_confidence_bank(bank: torch.Tensor, confidence: torch.Tensor, momentum: float) -> torch.Tensor:
    """``momentum * bank + (1 - momentum) * confidence`` (a new tensor)."""
    return bank * momentum + confidence.to(bank.dtype) * (1.0 - momentum)


def class_probabilities(bank: torch.Tensor, power: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Sampling distribution of classes: ``softmax((1 - bank)^power)`` over the ``allowed`` classes (0 elsewhere)."""
    score = (1.0 - bank.double()).clamp_min(0.0).pow(power)
    if allowed is not None:
        score = torch.where(allowed.to(score.device), score, torch.full_like(score, -math.inf))
    return score.softmax(dim=0)


def copy_paste(image: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor, partner: torch.Tensor,
               paste: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Adaptive copy-paste: sample ``i`` receives the pixels of sample ``partner[i]`` labelled with one of
    ``classes`` (image, label and valid mask), where ``paste[i]``.

    Args:
        image: ``(B, C, H, W)``; mask: ``(B, H, W)`` labels (255 = ignore, never pasted); valid: ``(B, H, W)``.
        partner: ``(B,)`` index of the sample to copy from; paste: ``(B,)`` bool; classes: ``(n,)`` class indices.

    Returns ``(image, mask, valid, alpha)`` with ``alpha`` the ``(B, H, W)`` pasted pixels.
    """
    src_mask = mask[partner]
    alpha = torch.isin(src_mask, classes.to(mask.device)) & paste.to(mask.device).view(-1, 1, 1)
    return (mix(image, image[partner], alpha), mix(mask, src_mask, alpha), mix(valid, valid[partner], alpha), alpha)


def class_presence(pred: torch.Tensor, valid: torch.Tensor, num_classes: int, area_thresh: float) -> torch.Tensor:
    """``(B, K)`` uint8: class ``c`` covers at least ``area_thresh * H * W`` valid pixels of ``pred`` (and at least
    one pixel), the reference's ``update_cutmix_bank`` test."""
    h, w = pred.shape[-2:]
    counts = torch.stack([((pred == c) & valid).sum(dim=(1, 2)) for c in range(num_classes)], dim=1)
    return ((counts > 0) & (counts >= area_thresh * h * w)).to(torch.uint8)


def component_box(class_map: np.ndarray, valid: np.ndarray, cls: int, min_area: float,
                  u: float) -> tuple[int, int, int, int] | None:
    """Bounding box ``(y0, x0, y1, x1)`` (end exclusive) of a connected region (8-connected) of ``cls`` in
    ``class_map`` over valid pixels, of more than ``min_area`` pixels, chosen by ``u`` in [0, 1) among those
    regions; ``None`` when there is none."""
    labels, n = ndimage.label((class_map == cls) & valid, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    big = np.flatnonzero(sizes > min_area)
    if big.size == 0:
        return None
    k = int(big[min(int(u * big.size), big.size - 1)])
    ys, xs = ndimage.find_objects(labels)[k]
    return ys.start, xs.start, ys.stop, xs.stop


def random_box(height: int, width: int, area: float, u: tuple[float, float, float]) -> tuple[int, int, int, int]:
    """The reference's ``init_cutmix`` box of ``area`` (fraction) from three uniforms: height fraction
    ``exp(u0 log area)``, width fraction ``area / that``, top-left uniform in the free range."""
    y_prop = math.exp(u[0] * math.log(area))
    x_prop = area / y_prop
    h, w = round(y_prop * height), round(x_prop * width)
    y0, x0 = round((height - h) * u[1]), round((width - w) * u[2])
    return y0, x0, y0 + h, x0 + w


def adaptive_cutmix_masks(partner_pred: torch.Tensor, partner_valid: torch.Tensor, classes: torch.Tensor,
                          area_thresh: float, fallback_area: float,
                          u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(B, H, W)`` masks of the pixels taken from the partner image: the bounding box of a random region
    of ``classes[i]`` in the partner's predicted class map (regions larger than ``area_thresh * H * W``), else a
    random box of ``fallback_area``. ``u``: ``(B, 4)`` uniforms (region pick, box shape and position).

    Returns ``(masks, found)``, ``found[i]`` whether a region of the class was cut."""
    b, h, w = partner_pred.shape
    pred, valid = partner_pred.cpu().numpy(), partner_valid.bool().cpu().numpy()
    masks = torch.zeros(b, h, w, dtype=torch.bool)
    found = torch.zeros(b, dtype=torch.bool)
    for i in range(b):
        box = component_box(pred[i], valid[i], int(classes[i]), area_thresh * h * w, float(u[i, 0]))
        found[i] = box is not None
        if box is None:
            box = random_box(h, w, fallback_area, (float(u[i, 1]), float(u[i, 2]), float(u[i, 3])))
        y0, x0, y1, x1 = box
        masks[i, y0:y1, x0:x1] = True
    return masks.to(partner_pred.device), found


def sampling_mask(student_pred: torch.Tensor, bank: torch.Tensor, gamma2: float, rand: torch.Tensor,
                  eps: float = 1e-12) -> torch.Tensor:
    """Class-equalising pixel sampling: a pixel the student predicts as ``c`` is kept with probability
    ``d_c = ((1 - Bank_c) / max(1 - Bank))^gamma2``, i.e. where ``rand > 1 - d_c`` (``rand`` uniform in [0, 1))."""
    d = 1.0 - bank.float()
    d = (d / (d.max() + eps)).pow(gamma2)
    return rand.to(student_pred.device) > (1.0 - d)[student_pred]


def reweighted_consistency(student_logits: torch.Tensor, confidence: torch.Tensor, pseudo: torch.Tensor,
                           gamma: float, keep: torch.Tensor | None = None, denominator: str = "kept",
                           eps: float = 1e-12, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """AEL's consistency loss (``Criterion_cons``): ``sum_i w_i CE_i / sum w_i`` with ``w_i = confidence_i^gamma``
    (times ``keep_i``); ``CE_i = 0`` at ``ignore_index`` pixels, whose weights the denominator counts only with
    ``denominator="all"`` (the reference)."""
    ce = F.cross_entropy(student_logits.float(), pseudo, ignore_index=ignore_index, reduction="none")
    weight = confidence.float().pow(gamma)
    if keep is not None:
        weight = weight * keep.to(weight.dtype)
    if denominator == "all":
        total = weight.sum()
    elif denominator == "kept":
        total = (weight * (pseudo != ignore_index).to(weight.dtype)).sum()
    else:
        raise ValueError(f"denominator must be 'kept' or 'all', got {denominator!r}")
    return (weight * ce).sum() / (total + eps)


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------
_BANK_BUFFERS = ("bank_images", "bank_valid", "bank_classes")


@register
class AEL(SegMethod):
    """Mean teacher with a class-confidence bank driving copy-paste, CutMix and the consistency loss's weights."""

    name = "ael"
    Config = AELConfig
    tasks = ("semisup",)
    streams = ("labelled", "unlabelled")
    views = {"unlabelled": 1}

    def __init__(self, cfg: AELConfig, model: torch.nn.Module, setup: SegSetup):
        super().__init__(cfg, model, setup)
        k = setup.num_classes
        bad = [c for c in cfg.copy_paste_exclude if not 0 <= c < k]
        if bad:
            names = f" ({', '.join(f'{i} {n}' for i, n in enumerate(setup.class_names))})" if setup.class_names else ""
            raise UserInputError(f"ael.copy_paste_exclude lists {bad}, not classes of data.num_classes={k}: use "
                                 f"class indices 0..{k - 1}{names}")
        allowed = torch.ones(k, dtype=torch.bool)
        allowed[list(cfg.copy_paste_exclude)] = False
        if cfg.copy_paste and not bool(allowed.any()):
            raise UserInputError("ael.copy_paste_exclude excludes every class: leave one to paste or set "
                                 "ael.copy_paste=false")
        object.__setattr__(self, "_allowed", allowed)  # plain tensor: not a buffer (not broadcast, not saved)
        self.teacher = make_teacher(model)
        self.register_buffer("confidence", torch.full((k,), float(cfg.confidence_init)))
        if cfg.adaptive_cutmix:  # shaped at the first push (crop size, band count) or by a checkpoint
            self.register_buffer("bank_images", torch.zeros(0, 0, 0, 0))
            self.register_buffer("bank_valid", torch.zeros(0, 0, 0, dtype=torch.uint8))
            self.register_buffer("bank_classes", torch.zeros(0, k, dtype=torch.uint8))
            self.register_buffer("bank_count", torch.zeros((), dtype=torch.long))
            self.register_buffer("bank_next", torch.zeros((), dtype=torch.long))
        self.eval_prefix = "teacher." if cfg.eval_teacher else "model."
        self._rank, self._world = 0, 1

    # ---- engine hooks
    @property
    def eval_model(self) -> torch.nn.Module:
        return self.teacher if self.cfg.eval_teacher else self.model

    def train(self, mode: bool = True) -> "AEL":
        super().train(mode)
        if mode and not self.cfg.teacher_train_mode:
            self.teacher.eval()
        if self.setup.freeze_backbone:
            self.teacher.backbone.eval()
        return self

    def on_train_start(self, ctx) -> None:
        check_rampup_fits("ael.rampup_steps", self.cfg.rampup_steps, ctx.total_steps, "ael.consistency_weight")
        self._rank, self._world = int(ctx.accelerator.process_index), int(ctx.num_processes)

    def after_optimizer_step(self, step: int, epoch: int) -> None:
        decay = min(1.0 - 1.0 / (step + 1), self.cfg.ema_decay) if self.cfg.ema_warmup else self.cfg.ema_decay
        ema_update_(self.teacher, self.model, decay)

    def log_values(self, step: int, epoch: int) -> dict[str, float]:
        names = self.setup.class_names or tuple(str(c) for c in range(self.setup.num_classes))
        return {f"confidence/{n}": float(v) for n, v in zip(names, self.confidence.tolist())}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The bank buffers take the checkpoint's shape (they are sized by the first batch of a run).
        for name in _BANK_BUFFERS:
            key = prefix + name
            if name in self._buffers and key in state_dict and state_dict[key].shape != self._buffers[name].shape:
                old = self._buffers[name]
                self._buffers[name] = torch.zeros(state_dict[key].shape, dtype=old.dtype, device=old.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- step
    def training_step(self, batch: dict, ctx) -> dict[str, torch.Tensor]:
        cfg, k = self.cfg, self.setup.num_classes
        g = ctx.generator()
        bank = self.confidence.detach().clone()  # sampling uses the bank before this step's update
        lab, unl = batch["labelled"], batch["unlabelled"]
        x_l, y_l = lab["image"], lab["mask"]
        v_l = lab["valid"] if "valid" in lab else torch.ones_like(y_l, dtype=torch.bool)
        x_w = unl["image"]
        v_u = unl["valid"] if "valid" in unl else torch.ones(x_w.shape[0], *x_w.shape[2:], dtype=torch.bool,
                                                              device=x_w.device)
        x_s = unl["strong"][:, 0] if cfg.student_view == "strong" else x_w
        zero = torch.zeros((), device=x_l.device)  # every key at every step (the engine averages logged keys)
        logs: dict[str, torch.Tensor] = {"cutmix_frac": zero, "cutmix_region_found": zero}

        # 1. adaptive copy-paste on the labelled batch
        if cfg.copy_paste:
            x_l, y_l, v_l, alpha = self._copy_paste(x_l, y_l, v_l, bank, g)
            logs["copy_paste_frac"] = alpha.float().mean()

        # 2. teacher targets; adaptive CutMix of the unlabelled batch with bank images
        with torch.no_grad():
            n = x_w.shape[0]
            partners = self._pick_partners(bank, n, g) if cfg.adaptive_cutmix else None
            if partners is not None:
                idx, cls = partners
                x_b = self.bank_images[idx].to(x_w.dtype)
                v_b = self.bank_valid[idx].bool()
                t_all = self.teacher(torch.cat([x_w, x_b])).logits.float()
                t_u, t_b = t_all[:n], t_all[n:]
            else:
                t_u = self.teacher(x_w).logits.float()
            if cfg.adaptive_cutmix:
                self._push(x_w, v_u, t_u.argmax(dim=1), ctx)
            if partners is not None:
                u = torch.rand(n, 4, generator=g, dtype=torch.float64)
                m, found = adaptive_cutmix_masks(t_b.argmax(dim=1), v_b, cls, cfg.cutmix_area_thresh,
                                                 cfg.cutmix_fallback_area, u)
                x_s, t_u, v_u = mix(x_s, x_b.to(x_s.dtype), m), mix(t_u, t_b, m), mix(v_u, v_b, m)
                logs["cutmix_frac"] = m.float().mean()
                logs["cutmix_region_found"] = found.float().mean().to(x_l.device)
            pseudo_u, conf_u, _ = pseudo_labels(t_u, cfg.threshold, v_u)
            if cfg.labelled_consistency:
                pseudo_l, conf_l, _ = pseudo_labels(self.teacher(x_l).logits.float(), cfg.threshold, v_l)

        # 3. student
        net = self.wrapped("model")
        out_l = net(x_l)
        loss, parts = self.supervised_loss(out_l, y_l, cfg.aux_weight)
        out_u = net(x_s)

        # 4. confidence bank (global over processes), then the re-weighted consistency with the updated bank
        with torch.no_grad():
            sums, counts = class_confidence_sums(out_l.logits, y_l, k)
            total = ctx.reduce(torch.stack([sums, counts]), "sum")
            self.confidence.copy_(update_confidence_bank(self.confidence, _mean_or_zero(total[0], total[1]),
                                                         cfg.confidence_momentum))
        keep_u = keep_l = None
        if cfg.dynamic_sampling:
            with torch.no_grad():
                keep_u = sampling_mask(out_u.logits.argmax(dim=1), self.confidence, cfg.gamma2,
                                       torch.rand(pseudo_u.shape, generator=g), cfg.eps)
                logs["sampled_frac"] = keep_u.float().mean()
                if cfg.labelled_consistency:
                    keep_l = sampling_mask(out_l.logits.argmax(dim=1), self.confidence, cfg.gamma2,
                                           torch.rand(pseudo_l.shape, generator=g), cfg.eps)
        cons = {"gamma": cfg.gamma, "denominator": cfg.consistency_denominator, "eps": cfg.eps}
        loss_u = reweighted_consistency(out_u.logits, conf_u, pseudo_u, keep=keep_u, **cons)
        loss_c = loss_u
        logs["loss_cons_u"] = loss_u.detach()
        if cfg.labelled_consistency:
            loss_cl = reweighted_consistency(out_l.logits, conf_l, pseudo_l, keep=keep_l, **cons)
            loss_c = loss_c + loss_cl
            logs["loss_cons_l"] = loss_cl.detach()
        weight = cfg.consistency_weight * sigmoid_rampup(ctx.step, cfg.rampup_steps)
        loss = loss + weight * loss_c
        logs["pseudo_frac"] = (pseudo_u != IGNORE_INDEX).float().mean()
        return {"loss": loss, **parts, **logs, "cons_weight": weight}

    # ---- parts of the step
    def _copy_paste(self, x, y, v, bank, g):
        cfg, b = self.cfg, x.shape[0]
        q = class_probabilities(bank.cpu(), cfg.copy_paste_power, self._allowed)
        classes = torch.multinomial(q, cfg.copy_paste_classes, replacement=True, generator=g).unique()
        paste = torch.rand(b, generator=g, dtype=torch.float64) < cfg.copy_paste_prob
        shift = torch.randint(1, max(b, 2), (b,), generator=g)
        if b < 2:  # no other sample to copy from
            paste[:] = False
        partner = (torch.arange(b) + shift) % b
        return copy_paste(x, y, v, partner.to(x.device), paste, classes)

    def _pick_partners(self, bank: torch.Tensor, n: int, g: torch.Generator):
        """``(bank slots (n,), classes (n,))``: per sample a class drawn from the bank's distribution and a bank image
        predicted to hold it (any bank image when none does); ``None`` while the bank is empty."""
        filled = int(self.bank_count)
        if filled == 0:
            return None
        q = class_probabilities(bank.cpu(), self.cfg.cutmix_power)
        classes = torch.multinomial(q, n, replacement=True, generator=g)
        u = torch.rand(n, generator=g, dtype=torch.float64)
        presence = self.bank_classes[:filled].bool().cpu()
        slots = []
        for i in range(n):
            cand = torch.nonzero(presence[:, classes[i]]).flatten()
            if cand.numel() == 0:
                cand = torch.arange(filled)
            slots.append(int(cand[min(int(u[i] * cand.numel()), cand.numel() - 1)]))
        return torch.tensor(slots, device=self.bank_images.device), classes

    @torch.no_grad()
    def _push(self, x: torch.Tensor, valid: torch.Tensor, pred: torch.Tensor, ctx) -> None:
        """Add the first ``bank_push`` images of this process's batch to the ring buffer; images of every process
        are gathered (rank order), so the bank is the same everywhere."""
        cfg, k = self.cfg, self.setup.num_classes
        p = min(cfg.bank_push, x.shape[0])
        c, h, w = x.shape[1:]
        presence = class_presence(pred[:p], valid[:p].bool(), k, cfg.bank_area_thresh)
        flat = torch.cat([x[:p].float().reshape(p, -1), valid[:p].float().reshape(p, -1), presence.float()], dim=1)
        if self._world > 1:  # all-gather as a sum of zero-padded slots (adding zeros is exact)
            slots = torch.zeros(self._world, *flat.shape, dtype=flat.dtype, device=flat.device)
            slots[self._rank] = flat
            flat = ctx.reduce(slots, "sum").reshape(-1, flat.shape[1])
        flat = flat[-cfg.bank_size:]
        m = flat.shape[0]
        images = flat[:, :c * h * w].reshape(m, c, h, w)
        val = flat[:, c * h * w:c * h * w + h * w].reshape(m, h, w).to(torch.uint8)
        cls = flat[:, c * h * w + h * w:].to(torch.uint8)
        if self.bank_images.numel() == 0:
            dev = self.bank_images.device
            self.bank_images = torch.zeros(cfg.bank_size, c, h, w, device=dev)
            self.bank_valid = torch.zeros(cfg.bank_size, h, w, dtype=torch.uint8, device=dev)
            self.bank_classes = torch.zeros(cfg.bank_size, k, dtype=torch.uint8, device=dev)
        elif tuple(self.bank_images.shape[1:]) != (c, h, w):
            raise UserInputError(f"ael: unlabelled crops of shape {(c, h, w)} after {tuple(self.bank_images.shape[1:])}"
                                 f": the CutMix bank needs one crop size; set augment.crop_size")
        slots = (int(self.bank_next) + torch.arange(m)) % cfg.bank_size
        slots = slots.to(self.bank_images.device)
        self.bank_images[slots] = images.to(self.bank_images.dtype)
        self.bank_valid[slots] = val
        self.bank_classes[slots] = cls
        self.bank_next.fill_((int(self.bank_next) + m) % cfg.bank_size)
        self.bank_count.fill_(min(int(self.bank_count) + m, cfg.bank_size))
