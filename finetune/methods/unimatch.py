"""UniMatch: unified image- and feature-level weak-to-strong consistency (``method=unimatch``).

Paper: Yang, Qi, Feng, Zhang, Shi, "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic
Segmentation", CVPR 2023 (arXiv:2208.09910). Reference code: LiheYoung/UniMatch ``unimatch.py``,
``dataset/semi.py``, ``dataset/transform.py``, ``model/semseg/deeplabv3plus.py`` (commit 0324f3d), read to check
behaviour; nothing is copied.

Notation: ``x_l, y_l`` labelled images / masks; ``x_w`` the weak view of an unlabelled crop, ``x_s1, x_s2`` two
strong views of the same crop (pixel-aligned, from the dataset: ``augment.strong``); ``valid`` its valid pixels;
``f = D(E(.))`` the segmenter (encoder E, decoder D); ``H`` pixel-wise cross-entropy; ``tau`` the threshold;
``pi`` the partner of each unlabelled sample (the batch rolled by one); ``M_1, M_2`` CutMix boxes.

Equation map:
    p_w = softmax(f(x_w)) (detached, train mode, the pass that also gives L_s)   -> ``logits_w`` in ``training_step``
    p_fp = softmax(D(Dropout2d_0.5(E(x_w))))  (UniPerb feature perturbation)     -> ``DeepLab.decode_dropped`` via
                                                                                    ``forward(feature_dropout=...)``
    y_w = argmax p_w, kept where max p_w >= tau and valid                         -> ``pseudo_labels``
    x_si' = M_i * x_si[pi] + (1 - M_i) * x_si ; y_si, valid_i mixed with the same M_i from the partner's weak
        prediction (eval mode, no gradient, as the reference's ``model.eval()``)  -> ``cutmix_masks``, ``mix``
    L_s  = H(f(x_l), y_l)  (+ aux_weight * aux head, model.aux only)             -> ``SegMethod.supervised_loss``
    L_si = sum_p [kept] H(f(x_si')_p, y_si,p) / sum_p valid_i,p                    -> ``unsup_ce``
    L_fp = sum_p [kept] H(p_fp,p, y_w,p) / sum_p valid_p                            -> ``unsup_ce``
    L_u  = lambda L_fp + mu / 2 (L_s1 + L_s2),   lambda = mu = 0.5
    L    = (L_s + L_u) / 2                                                        -> ``total_loss``
    i.e. the reference's ``(loss_x + 0.25 loss_u_s1 + 0.25 loss_u_s2 + 0.5 loss_u_w_fp) / 2``:
    L = 0.5 L_s + 0.125 L_s1 + 0.125 L_s2 + 0.25 L_fp with the defaults.

Behaviour of the reference kept:
    * The unsupervised losses are averaged over every non-padded pixel (the reference divides by
      ``(ignore_mask != 255).sum()``): low-confidence pixels count as zeros in the denominator, so the loss shrinks
      with the fraction of confident pixels. Our ``valid`` (nodata and padding excluded) is that mask.
    * The labelled and the weak unlabelled images share one forward pass, whose decoder also runs on the dropped
      features (clean and dropped halves normalised together); the two strong views share a second pass.
    * The partner's pseudo-labels come from an extra no-gradient pass in eval mode (``partner_eval_mode``); the
      sample's own pseudo-labels from the train-mode pass (the author: "``img_u_w`` is to provide clean and
      informative BN statistics", issue #68). ``partner_eval_mode: false`` reuses the train-mode predictions of the
      partner instead (one pass less; the author says the eval mode is not a necessity).
    * Feature dropout: channel dropout (``nn.Dropout2d(0.5)``) of the features the decoder reads (stride-4 and
      deepest for v3+; the one feature map of a plain ViT), scaled by 1 / (1 - p).

Deviations from the reference code:
    * CutMix partner: the batch rolled by one (sample i mixes with sample i - 1 of the same batch). The reference
      zips the unlabelled loader with itself; with its DistributedSampler both iterators yield the same ids, so it
      mixes two crops of the same image, which the authors call unintended; mixing with a shuffled copy of the batch
      performs the same (issues #34, #51, #85). With one unlabelled sample per process the partner is the sample.
    * CutMix boxes come from ``finetune.methods.common.cutmix_masks`` with the step's generator (``ctx.generator``:
      per seed, step and rank; identical after a resume) instead of Python's ``random`` in the data workers; the
      aspect ratio is drawn log-uniformly in [0.3, 1 / 0.3] (the reference: uniformly, with rejection until the box
      fits) and boxes are rounded instead of truncated.
    * Strong views: SAR-safe per-band gain / offset, speckle, noise, blur and band dropout (``augment.strong``)
      instead of colour jitter, grayscale and blur of RGB photos.
    * Feature-dropout masks are drawn from the step's generator, not the global RNG (independent across processes).
    * The pseudo-labels never cover invalid (nodata / padding) pixels; the reference only excludes padding.
    * Optional auxiliary-head term (``aux_weight``, with ``model.aux``); the reference has no auxiliary head.

Option from UniMatch V2 (Yang et al., "UniMatch V2: Pushing the Limit of Semi-Supervised Semantic Segmentation",
TPAMI 2025, arXiv:2410.10777; reference LiheYoung/UniMatch-V2 ``unimatch_v2.py``): ``teacher_ema: a`` takes the
pseudo-labels (own and partner) from an EMA teacher in eval mode instead of the model being trained:
    theta_t <- a_t theta_t + (1 - a_t) theta_s after optimiser step t (0-based),
        a_t = min(1 - 1 / (t + 2), a)  (V2's ``min(1 - 1 / (iters + 1), 0.996)``)  -> ``after_optimizer_step``
    p_w = softmax(f_t(x_w)) (eval mode, no gradient)                                -> ``training_step``
The student's weak pass still runs (its decoder gives L_fp and its BatchNorm sees the weak images). Deviation: the
teacher's BatchNorm statistics are copied from the student after every EMA step (V2 averages them with the same
decay). ``eval_model: teacher`` evaluates and exports the teacher (V2 reports both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from common.bands import IGNORE_INDEX
from common.ema import ema_update_, make_teacher
from finetune.methods import register
from finetune.methods.base import SegMethod
from finetune.methods.common import cutmix_masks, mix, pseudo_labels

__all__ = ["UniMatchConfig", "UniMatch", "unsup_ce", "total_loss"]


@dataclass(frozen=True)
class UniMatchConfig:
    """Hyper-parameters of UniMatch (section ``unimatch``)."""

    threshold: float = 0.95  # tau (paper; reference conf_thresh: 0.95 Pascal / COCO, 0 Cityscapes with OHEM)
    feature_dropout: float = 0.5  # p of the channel dropout on the decoder's input features (ref. Dropout2d(0.5))
    sup_weight: float = 0.5  # weight of L_s in L (reference: (loss_x + ...) / 2)
    unsup_weight: float = 0.5  # weight of L_u in L (reference: / 2)
    fp_weight: float = 0.5  # lambda: weight of L_fp in L_u (reference: 0.5)
    strong_weight: float = 0.5  # mu: weight of the two strong streams in L_u, mu / 2 each (reference: 0.25 each)
    aux_weight: float = 0.4  # auxiliary-head CE on labelled images (model.aux only; not in the reference)
    cutmix_p: float = 0.5  # probability of a CutMix box per sample and strong view (reference obtain_cutmix_box)
    cutmix_area: tuple[float, float] = (0.02, 0.4)  # box area as a fraction of the crop (reference size_min / max)
    cutmix_ratio: tuple[float, float] = (0.3, 1 / 0.3)  # box aspect ratio h / w range (reference ratio_1 / ratio_2)
    partner_eval_mode: bool = True  # partner pseudo-labels from an eval-mode pass (reference) or the train pass
    teacher_ema: float | None = None  # a: pseudo-labels from an EMA teacher with this decay (V2: 0.996); null: V1
    eval_model: Literal["student", "teacher"] = "student"  # network evaluated and exported (teacher: teacher_ema)

    def validate(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"unimatch.threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 < self.feature_dropout < 1.0:
            raise ValueError(f"unimatch.feature_dropout must be in (0, 1), got {self.feature_dropout}")
        for key in ("sup_weight", "unsup_weight", "fp_weight", "strong_weight", "aux_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"unimatch.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.cutmix_p <= 1.0:
            raise ValueError(f"unimatch.cutmix_p must be in [0, 1], got {self.cutmix_p}")
        lo, hi = self.cutmix_area
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"unimatch.cutmix_area must satisfy 0 < low <= high <= 1, got {self.cutmix_area}")
        lo, hi = self.cutmix_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"unimatch.cutmix_ratio must satisfy 0 < low <= high, got {self.cutmix_ratio}")
        if self.teacher_ema is not None and not 0.0 <= self.teacher_ema < 1.0:
            raise ValueError(f"unimatch.teacher_ema must be in [0, 1) or null, got {self.teacher_ema}")
        if self.eval_model not in ("student", "teacher"):
            raise ValueError(f"unimatch.eval_model must be 'student' or 'teacher', got {self.eval_model!r}")
        if self.eval_model == "teacher" and self.teacher_ema is None:
            raise ValueError("unimatch.eval_model: teacher needs a teacher: set unimatch.teacher_ema (e.g. 0.99) "
                             "or eval_model: student")


def unsup_ce(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with hard pseudo-labels ``(B, H, W)`` (``IGNORE_INDEX`` where not kept), summed over the kept
    pixels and divided by the number of ``valid`` pixels (the reference's normalisation; 0 when none is valid)."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return ce.sum() / valid.bool().sum().clamp_min(1)


def total_loss(cfg: UniMatchConfig, loss_sup: torch.Tensor, loss_s1: torch.Tensor, loss_s2: torch.Tensor,
               loss_fp: torch.Tensor) -> torch.Tensor:
    """``L = sup_weight * L_s + unsup_weight * (fp_weight * L_fp + strong_weight / 2 * (L_s1 + L_s2))``."""
    loss_u = cfg.fp_weight * loss_fp + cfg.strong_weight / 2 * (loss_s1 + loss_s2)
    return cfg.sup_weight * loss_sup + cfg.unsup_weight * loss_u


@register
class UniMatch(SegMethod):
    """FixMatch-style weak-to-strong consistency with two CutMixed strong views and a feature-perturbed stream."""

    name = "unimatch"
    Config = UniMatchConfig
    tasks = ("semisup",)
    streams = ("labelled", "unlabelled")
    views = {"unlabelled": 2}

    def __init__(self, cfg: UniMatchConfig, model: torch.nn.Module, setup) -> None:
        super().__init__(cfg, model, setup)
        if cfg.teacher_ema is not None:  # outside DDP (not in ``trainable``), checkpointed with the method
            self.teacher = make_teacher(model)
            self.teacher.eval()
            if cfg.eval_model == "teacher":
                self.eval_prefix = "teacher."

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.teacher if self.cfg.eval_model == "teacher" else self.model

    def train(self, mode: bool = True) -> "UniMatch":
        super().train(mode)
        if self.cfg.teacher_ema is not None:
            self.teacher.eval()  # the teacher always predicts in eval mode (V2's ``model_ema.eval()``)
        return self

    def after_optimizer_step(self, step: int, epoch: int) -> None:
        if self.cfg.teacher_ema is not None:
            ema_update_(self.teacher, self.model, min(1.0 - 1.0 / (step + 2), self.cfg.teacher_ema),
                        copy_buffers=True)

    def training_step(self, batch: dict, ctx) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        lab, unl = batch["labelled"], batch["unlabelled"]
        x_l, y_l = lab["image"], lab["mask"]  # 1. labelled batch
        x_w, valid = unl["image"], unl["valid"].bool()  # 2. weak view, two strong views, valid pixels
        x_s1, x_s2 = unl["strong"][:, 0], unl["strong"][:, 1]
        n_l, n_u = x_l.shape[0], x_w.shape[0]
        device = x_w.device
        g = ctx.generator()  # CutMix boxes (CPU) and, on CPU, the dropout masks: one stream per step and rank
        g_dev = g if device.type == "cpu" else ctx.generator(device)
        box1, box2 = (cutmix_masks(n_u, x_w.shape[-2], x_w.shape[-1], g, cfg.cutmix_p, cfg.cutmix_area,
                                   cfg.cutmix_ratio, device=device) for _ in range(2))
        partner = torch.roll(torch.arange(n_u, device=device), 1)  # 3. sample i mixes with sample i - 1

        teacher_w = None
        if cfg.teacher_ema is not None:  # 4. V2: the EMA teacher labels every weak view (own and partner)
            with torch.no_grad():
                teacher_w = self.teacher(x_w, return_aux=False).logits
            logits_partner = teacher_w
        elif cfg.partner_eval_mode:  # 4. partner predictions: eval mode, no gradient (reference's img_u_w_mix pass)
            was_training = self.training
            with torch.no_grad():
                self.model.eval()
                logits_partner = self.model(x_w, return_aux=False).logits
            self.train(was_training)

        # 5. labelled + weak in one pass; the decoder also runs on the channel-dropped features (L_fp)
        out = self.wrapped("model")(torch.cat([x_l, x_w]), feature_dropout=cfg.feature_dropout, generator=g_dev)
        logits_l, logits_w = out.logits.split([n_l, n_u])
        logits_fp = out.perturbed[n_l:]
        aux_l = out.aux[:n_l] if out.aux is not None else None
        loss_sup, parts = self.supervised_loss(out._replace(logits=logits_l, aux=aux_l), y_l, cfg.aux_weight)

        # 6. both strong views, each CutMixed with its partner's same view, in a second pass
        x_s1m = mix(x_s1, x_s1[partner], box1)
        x_s2m = mix(x_s2, x_s2[partner], box2)
        logits_s1, logits_s2 = self.wrapped("model")(torch.cat([x_s1m, x_s2m]), return_aux=False).logits.chunk(2)

        # 7. pseudo-labels (invalid pixels never labelled), mixed with the same boxes as the images
        y_w, _, keep_w = pseudo_labels(logits_w.detach() if teacher_w is None else teacher_w, cfg.threshold, valid)
        if teacher_w is None and not cfg.partner_eval_mode:
            logits_partner = logits_w.detach()
        y_p, _, _ = pseudo_labels(logits_partner, cfg.threshold, valid)
        y_p, valid_p = y_p[partner], valid[partner]
        y_1, valid_1 = mix(y_w, y_p, box1), mix(valid, valid_p, box1)
        y_2, valid_2 = mix(y_w, y_p, box2), mix(valid, valid_p, box2)

        loss_s1 = unsup_ce(logits_s1, y_1, valid_1)  # 8. the three unsupervised streams
        loss_s2 = unsup_ce(logits_s2, y_2, valid_2)
        loss_fp = unsup_ce(logits_fp, y_w, valid)
        loss = total_loss(cfg, loss_sup, loss_s1, loss_s2, loss_fp)  # 9. L
        ratio = keep_w.sum() / valid.sum().clamp_min(1)
        return {"loss": loss, **parts, "loss_s1": loss_s1.detach(), "loss_s2": loss_s2.detach(),
                "loss_fp": loss_fp.detach(), "mask_ratio": ratio.detach().float()}
