"""ADVENT: entropy minimisation and adversarial entropy alignment (``method=advent`` of ``finetune/uda.py``), with
the class-ratio prior and IntraDA's entropy-ranked intra-domain stage as options.

Papers: Vu, Jain, Bucher, Cord, Perez, "ADVENT: Adversarial Entropy Minimization for Domain Adaptation in Semantic
Segmentation", CVPR 2019; Pan, Shin, Rameau, Lee, Kweon, "Unsupervised Intra-domain Adaptation for Semantic
Segmentation through Self-Supervision", CVPR 2020 (IntraDA). Reference code: github.com/valeoai/ADVENT
(``advent/domain_adaptation/train_UDA.py``, ``config.py``, ``utils/func.py``, ``utils/loss.py``) and
github.com/feipan664/IntraDA (``entropy_rank/entropy.py``, ``intrada/``); behaviour checked against them, no code
copied.

Equation map (``P = softmax(G(x))`` (B, K, H, W) at input resolution, ``v`` valid-pixel masks, ``K`` classes):

    I_x = -P * log P / log K                 (B, K, H, W)  weighted self-information -> :func:`self_information`
    E_x = sum_k I_x^(k)                      (B, H, W) in [0, 1]  normalised entropy  -> :func:`normalised_entropy`
    L_ent = mean over valid target pixels of E_x                                      -> :func:`entropy_loss`
    L_seg = CE(P_s^main, y_s) + lambda_seg CE(P_s^aux, y_s)        ``seg_aux_weight`` (LAMBDA_SEG_AUX)
    MinEnt: L = L_seg + sum_l lambda_ent^l L_ent(P_t^l)            ``ent_weight`` / ``ent_aux_weight``
    AdvEnt: L = L_seg + sum_l lambda_adv^l BCE(D_l(I_t^l), 0)      ``adv_weight`` / ``adv_aux_weight``
            L_D^l = 0.5 BCE(D_l(sg(I_s^l)), 0) + 0.5 BCE(D_l(sg(I_t^l)), 1)    ``disc_weight``
    class-ratio prior (paper Sec. 3.3):
            L_cp = sum_k max(0, mu p_s^(k) - p_t^(k)),  p_t^(k) = mean over valid pixels of P_t^(k) (per image,
            averaged over the images),  p_s = L1-normalised source label histogram    -> :func:`class_prior_loss`
            L += ``class_prior_weight`` * L_cp (main level), mu = ``class_prior_mu``
    (BCE with nodata weighting: :func:`finetune.discriminator.bce_to_label`; sg = stop-gradient;
    ``mode``: ``minent``, ``advent`` or ``both`` (both terms in one run))

Update order (as the release's ``train_advent``): G's backward on the source loss, then on the target loss (the
adversarial part through the frozen discriminators), G steps (the run's ``optim`` section); then each
discriminator on the detached source and target maps (its own Adam, ``disc_optim``). The discriminators get no
gradient from G's loss and G none from theirs.

IntraDA (option ``intra.enabled``), the design chosen here: IntraDA ranks the target images by the mean entropy of
a trained inter-domain model, calls the ``lambda`` fraction with the lowest entropy "easy" and the rest "hard",
pseudo-labels the easy ones with that model's argmax and trains AdvEnt again with easy (pseudo-labelled, "source")
against hard ("target"). Here that second stage is a second ``advent`` run started from the first with
``model.init_from=<first run> advent.intra.enabled=true``:

* ``__init__`` keeps a frozen copy of the starting segmenter, the *labeller* (eval mode, outside DDP, in the
  checkpoint); ``on_train_start`` ranks every ``target_plain`` tile by the labeller's mean normalised entropy over
  its valid pixels (summed over processes, so every process holds the same ranking; ties by tile index), and marks
  the ``floor(lambda * N)`` lowest as easy (``intra_easy``, with the scores in ``intra_entropy``; both checkpointed);
  the split is written to ``<run>/intra_split/easy.txt`` and ``hard.txt`` (tile ids, split-file format) and
  ``easy_entropy.tsv`` / ``hard_entropy.tsv`` (id and score) by the main process.
* In each step, the target batch's tiles are split by ``intra_easy`` (the batch's ``index``): easy tiles get the
  labeller's argmax on the same augmented crop as pseudo-labels (255 on nodata) and a cross-entropy loss
  (``intra.pseudo_weight``; IntraDA's LAMBDA_SEG_MAIN, and ``seg_aux_weight`` on the aux head); the discriminators
  learn easy = 0 / hard = 1 on the target batch, and G's adversarial (and entropy) losses act on the hard tiles.
  The labelled source keeps its supervised loss with ``intra.source_weight`` (default 1; IntraDA's second stage
  has no real source: set 0, then the source stream is not forwarded).

Defaults, from the release (``advent/domain_adaptation/config.py`` and ``scripts/configs/*.yml``): ``mode: advent``
(``DA_METHOD = 'AdvEnt'``), ``levels: [main, aux]`` (``MULTI_LEVEL = True``), ``LAMBDA_SEG_AUX = 0.1``,
``LAMBDA_ADV_MAIN = 0.001``, ``LAMBDA_ADV_AUX = 0.0002``, ``LAMBDA_ENT_MAIN = 0.001``, ``LAMBDA_ENT_AUX = 0.0002``,
``LEARNING_RATE_D = 1e-4`` with Adam betas (0.9, 0.99) and poly 0.9, the discriminator of
:mod:`finetune.discriminator`, ``source_label = 0``, ``target_label = 1``; IntraDA's ``lambda1 = 0.67``. The
segmenter's SGD (lr 2.5e-4, momentum 0.9, weight decay 5e-4, poly 0.9, 10x on the classifier) is the run's
``optim`` section and ``model.backbone_lr_mult``.

Deviations from the reference code:

* Entropy in natural logs over ``log K`` (the release uses log2 over log2 K: the same ratio), computed from
  ``log_softmax`` (no ``+ 1e-30``). L_ent is the mean over *valid* pixels (the release divides by all pixels: equal
  without nodata); the self-information maps are zeroed on nodata and each discriminator cell weighted by its valid
  fraction (:mod:`finetune.discriminator`).
* The class-ratio prior is not in the release; ``class_prior_weight`` defaults to 0 (off, as the release), and
  ``class_prior_mu = 0.5`` is our reading of the paper. The prior counts the source labels once, at train start,
  over ``source_plain`` (all source training tiles, un-augmented), summed over processes, in the buffer
  ``class_prior``.
* ``mode: both`` trains MinEnt and AdvEnt jointly in one run; the release's "AdvEnt+MinEnt" result averages the
  predictions of two separately trained models (not offered here).
* The release's "ER" (self-training on low-entropy pseudo-labels) is not offered; the IntraDA design above is.
* IntraDA: the ranking uses the normalised entropy mean over valid pixels (IntraDA: the mean of the K-channel
  self-information map, the same ranking up to the factor K; its optional rare-class "normalizor" is not offered);
  pseudo-labels are computed on the augmented crop by the frozen labeller instead of once per image on disk (the
  same labels up to the crop); the second stage is initialised from the first run (IntraDA restarts from ImageNet);
  tiles with no valid pixel rank last (hard).
* ``levels: [main]`` trains the single-level variant; ``[main, aux]`` needs ``model.aux=true``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from common.bands import IGNORE_INDEX
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
from finetune.methods.adaptsegnet import check_levels, level_logits, require_aux_head
from finetune.methods.base import SegMethod, SegSetup
from finetune.methods.common import normalised_entropy, self_information

__all__ = ["IntraConfig", "AdventConfig", "Advent", "self_information", "normalised_entropy", "entropy_loss",
           "class_prior_loss", "source_class_prior", "entropy_rank_split", "masked_cross_entropy"]

INTRA_SPLIT_DIR = "intra_split"
"""Run sub-directory of the written easy / hard split (IntraDA)."""


@dataclass(frozen=True)
class IntraConfig:
    """IntraDA's intra-domain stage (``advent.intra``); see the module docstring."""

    enabled: bool = False  # rank the target tiles at train start, easy (pseudo-labelled) vs hard
    easy_fraction: float = 0.67  # IntraDA's lambda1: fraction of target tiles called easy
    pseudo_weight: float = 1.0  # CE on the easy tiles' pseudo-labels (IntraDA: LAMBDA_SEG_MAIN of stage 2)
    source_weight: float = 1.0  # supervised loss on the labelled source (IntraDA's stage 2: none, i.e. 0)
    rank_batch_size: int = 8  # batch size of the ranking pass over the target tiles

    def validate(self) -> None:
        if not 0.0 < self.easy_fraction < 1.0:
            raise ValueError(f"advent.intra.easy_fraction must be in (0, 1), got {self.easy_fraction}")
        if self.pseudo_weight < 0 or self.source_weight < 0:
            raise ValueError("advent.intra.pseudo_weight and source_weight must be >= 0")
        if self.rank_batch_size < 1:
            raise ValueError(f"advent.intra.rank_batch_size must be >= 1, got {self.rank_batch_size}")


@dataclass(frozen=True)
class AdventConfig:
    """Hyper-parameters of ADVENT (section ``advent``); sources in the module docstring."""

    mode: Literal["minent", "advent", "both"] = "advent"  # DA_METHOD: MinEnt, AdvEnt, or both losses jointly
    levels: tuple[Literal["main", "aux"], ...] = ("main", "aux")  # MULTI_LEVEL: main head and aux head
    seg_aux_weight: float = 0.1  # LAMBDA_SEG_AUX: source loss of the aux head (used whenever the model has one)
    ent_weight: float = 0.001  # LAMBDA_ENT_MAIN (MinEnt)
    ent_aux_weight: float = 0.0002  # LAMBDA_ENT_AUX
    adv_weight: float = 0.001  # LAMBDA_ADV_MAIN (AdvEnt)
    adv_aux_weight: float = 0.0002  # LAMBDA_ADV_AUX
    disc_weight: float = 0.5  # each domain's BCE in the discriminator loss (the release's loss_d / 2)
    class_prior_weight: float = 0.0  # class-ratio prior (paper Sec. 3.3; not in the release: off)
    class_prior_mu: float = 0.5  # relaxation mu of the prior
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    disc_optim: OptimConfig = field(default_factory=default_discriminator_optim)  # one Adam per discriminator
    intra: IntraConfig = field(default_factory=IntraConfig)

    @property
    def adversarial(self) -> bool:
        return self.mode in ("advent", "both")

    @property
    def minent(self) -> bool:
        return self.mode in ("minent", "both")

    def validate(self) -> None:
        check_levels(self.levels, "advent")
        for key in ("seg_aux_weight", "ent_weight", "ent_aux_weight", "adv_weight", "adv_aux_weight", "disc_weight",
                    "class_prior_weight", "class_prior_mu"):
            if getattr(self, key) < 0:
                raise ValueError(f"advent.{key} must be >= 0, got {getattr(self, key)}")
        self.discriminator.validate()
        self.disc_optim.validate()
        self.intra.validate()


# ------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------
def entropy_loss(logits: torch.Tensor, valid: torch.Tensor | None = None,
                 sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean normalised entropy over the valid pixels (of the samples with ``sample_weight`` > 0, weighted by it);
    0 with the graph kept when none."""
    ent = normalised_entropy(logits)
    w = torch.ones_like(ent) if valid is None else valid.to(ent.dtype)
    if sample_weight is not None:
        w = w * sample_weight.to(ent.dtype).view(-1, 1, 1)
    return (ent * w).sum() / w.sum().clamp_min(1e-12)


def class_prior_loss(logits: torch.Tensor, prior: torch.Tensor, mu: float, valid: torch.Tensor | None = None,
                     sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_k max(0, mu prior_k - p_k)`` with ``p_k`` an image's mean softmax probability of class k over its valid
    pixels, averaged over the images (with ``sample_weight``; images without valid pixels left out)."""
    p = logits.float().softmax(1)
    v = torch.ones_like(p[:, 0]) if valid is None else valid.to(p.dtype)
    count = v.sum((1, 2))
    ratio = (p * v.unsqueeze(1)).sum((2, 3)) / count.clamp_min(1.0).unsqueeze(1)  # (B, K)
    per_image = (mu * prior.to(p.dtype).unsqueeze(0) - ratio).clamp_min(0.0).sum(1)
    w = (count > 0).to(p.dtype)
    if sample_weight is not None:
        w = w * sample_weight.to(p.dtype)
    return (per_image * w).sum() / w.sum().clamp_min(1e-12)


def source_class_prior(counts: torch.Tensor) -> torch.Tensor:
    """L1-normalised class histogram (uniform when nothing was counted)."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return torch.full_like(counts, 1.0 / counts.numel()).float()
    return (counts / total).float()


def entropy_rank_split(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """IntraDA's split: the ``floor(fraction * N)`` tiles of lowest score are easy (bool (N,)); ties by index."""
    n = scores.numel()
    order = torch.sort(scores.double(), stable=True).indices
    easy = torch.zeros(n, dtype=torch.bool, device=scores.device)
    easy[order[: int(n * fraction)]] = True
    return easy


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels; 0 with the graph kept when none is labelled."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    keep = (labels != ignore_index).to(ce.dtype)
    return (ce * keep).sum() / keep.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------------------
@register
class Advent(SegMethod):
    """MinEnt / AdvEnt (manual optimisation), optionally with the class-ratio prior and IntraDA's second stage."""

    name = "advent"
    Config = AdventConfig
    tasks = ("uda",)
    streams = ("source", "target")
    trainable = ("model", "disc_main", "disc_aux")  # the instance keeps the configured levels' discriminators
    manual_optimization = True

    def __init__(self, cfg: AdventConfig, model: torch.nn.Module, setup: SegSetup):
        super().__init__(cfg, model, setup)
        if setup.num_classes < 2:
            raise UserInputError(f"advent needs data.num_classes >= 2 (entropy over log K), got {setup.num_classes}")
        require_aux_head(model, cfg.levels, "advent")
        self.disc_levels = cfg.levels if cfg.adversarial else ()
        for level in self.disc_levels:
            setattr(self, f"disc_{level}", FCDiscriminator(setup.num_classes, cfg.discriminator))
        self.trainable = ("model", *(f"disc_{level}" for level in self.disc_levels))
        self.register_buffer("class_prior", torch.full((setup.num_classes,), 1.0 / setup.num_classes))
        if cfg.intra.enabled:
            self.labeller = copy.deepcopy(model).eval().requires_grad_(False)  # the starting (stage-1) segmenter
            self.register_buffer("intra_entropy", torch.zeros(0))  # sized at train start (number of target tiles)
            self.register_buffer("intra_easy", torch.zeros(0, dtype=torch.bool))

    def train(self, mode: bool = True) -> "Advent":
        super().train(mode)
        if getattr(self, "labeller", None) is not None:
            self.labeller.eval()
        return self

    def discriminator(self, level: str) -> FCDiscriminator:
        return getattr(self, f"disc_{level}")

    def optimizers(self) -> dict[str, OptimizerSpec]:
        specs = {"main": OptimizerSpec(self.param_groups())}
        for level in self.disc_levels:
            params = param_groups_no_wd_for_norm_and_bias(self.discriminator(level).named_parameters())
            specs[f"disc_{level}"] = OptimizerSpec(params, self.cfg.disc_optim)
        return specs

    # ---- train start: the source class prior, IntraDA's ranking
    @torch.no_grad()
    def on_train_start(self, ctx) -> None:
        if self.cfg.class_prior_weight > 0:
            counts = torch.zeros(self.setup.num_classes, dtype=torch.float64, device=ctx.device)
            for b in ctx.eval_loader("source_plain", self.cfg.intra.rank_batch_size):
                y = b["mask"].to(ctx.device)
                y = y[y != self.setup.ignore_index]
                counts += torch.bincount(y.flatten(), minlength=self.setup.num_classes)[: counts.numel()].double()
            self.class_prior.copy_(source_class_prior(ctx.reduce(counts, "sum")).to(self.class_prior.device))
        if self.cfg.intra.enabled:
            self._rank_target(ctx)

    @torch.no_grad()
    def _rank_target(self, ctx) -> None:
        n = len(ctx.datasets["target_plain"])
        total = torch.zeros(n, dtype=torch.float64, device=ctx.device)
        seen = torch.zeros(n, dtype=torch.float64, device=ctx.device)
        for b in ctx.eval_loader("target_plain", self.cfg.intra.rank_batch_size):
            x, idx = b["image"].to(ctx.device), b["index"].to(ctx.device).long()
            valid = b["valid"].to(ctx.device) if "valid" in b else None
            ent = normalised_entropy(self.labeller(x).logits)
            w = torch.ones_like(ent) if valid is None else valid.to(ent.dtype)
            count = w.sum((1, 2))
            score = torch.where(count > 0, (ent * w).sum((1, 2)) / count.clamp_min(1.0),
                                torch.full_like(count, float("inf")))  # nothing valid: hard
            total.index_add_(0, idx, score.double())
            seen.index_add_(0, idx, torch.ones_like(score, dtype=torch.float64))
        total, seen = ctx.reduce(total, "sum"), ctx.reduce(seen, "sum")
        if not bool((seen == 1).all()):
            raise RuntimeError(f"the ranking pass scored {int((seen > 0).sum())} of {n} target tiles once")
        self.intra_entropy = total.float()
        self.intra_easy = entropy_rank_split(total, self.cfg.intra.easy_fraction)
        if ctx.accelerator.is_main_process:
            ds = ctx.datasets["target_plain"]
            out = ctx.run_dir / INTRA_SPLIT_DIR
            out.mkdir(parents=True, exist_ok=True)
            for name, keep in (("easy", self.intra_easy), ("hard", ~self.intra_easy)):
                ids = torch.nonzero(keep).flatten().tolist()
                (out / f"{name}.txt").write_text("".join(f"{ds.sample_key(i)}\n" for i in ids))
                (out / f"{name}_entropy.tsv").write_text("".join(f"{ds.sample_key(i)}\t{float(total[i]):.6f}\n"
                                                                 for i in ids))

    # ---- one step
    def _ent_weight(self, level: str) -> float:
        return self.cfg.ent_weight if level == "main" else self.cfg.ent_aux_weight

    def _adv_weight(self, level: str) -> float:
        return self.cfg.adv_weight if level == "main" else self.cfg.adv_aux_weight

    def _supervised(self, out, labels: torch.Tensor, ce) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        main = ce(out.logits, labels)
        aux = ce(out.aux, labels) if out.aux is not None else None
        total = main if aux is None else main + self.cfg.seg_aux_weight * aux
        return total, main, aux

    def training_step(self, batch: dict, ctx) -> dict[str, torch.Tensor]:
        cfg, intra = self.cfg, self.cfg.intra
        src, tgt = batch["source"], batch["target"]
        x_s, y_s, v_s = src["image"], src["mask"], src.get("valid")
        x_t, v_t = tgt["image"], tgt.get("valid")
        model = self.wrapped("model")
        logs: dict[str, torch.Tensor] = {}

        # IntraDA: which target tiles are easy (pseudo-labelled, discriminator label 0) and which hard
        easy = self.intra_easy[tgt["index"].to(self.intra_easy.device).long()].to(x_t.device) if intra.enabled \
            else None
        hard = (~easy).float() if easy is not None else None  # the "target" side of the step's target losses

        # 1. segmenter on the source: L_seg (backward right after the forward)
        out_s = None
        source_weight = intra.source_weight if intra.enabled else 1.0
        if source_weight > 0:
            out_s = model(x_s)
            loss, main, aux = self._supervised(out_s, y_s, self.criterion)
            logs["loss_seg"] = main.detach()
            if aux is not None:
                logs["loss_seg_aux"] = aux.detach()
            ctx.backward(source_weight * loss, "main")

        # 2. segmenter on the target: entropy, class prior, pseudo-labels, fooling the frozen discriminators
        out_t = model(x_t)
        loss_t = out_t.logits.new_zeros((), dtype=torch.float32)
        if cfg.minent:
            for level in cfg.levels:
                ent = entropy_loss(level_logits(out_t, level), v_t, hard)
                loss_t = loss_t + self._ent_weight(level) * ent
                logs["loss_entropy" if level == "main" else "loss_entropy_aux"] = ent.detach()
        else:  # a monitor: the target's mean normalised entropy
            logs["loss_entropy"] = entropy_loss(out_t.logits.detach(), v_t, hard)
        if cfg.class_prior_weight > 0:
            cp = class_prior_loss(out_t.logits, self.class_prior, cfg.class_prior_mu, v_t, hard)
            loss_t = loss_t + cfg.class_prior_weight * cp
            logs["loss_class_prior"] = cp.detach()
        if intra.enabled:
            with torch.no_grad():
                pseudo = self.labeller(x_t).logits.argmax(1)
                keep = easy.view(-1, 1, 1) if v_t is None else easy.view(-1, 1, 1) & v_t.bool()
                pseudo = torch.where(keep, pseudo, torch.full_like(pseudo, self.setup.ignore_index))
            loss_p, main_p, _ = self._supervised(out_t, pseudo, masked_cross_entropy)
            loss_t = loss_t + intra.pseudo_weight * loss_p
            logs["loss_pseudo"] = main_p.detach()
            logs["easy_frac"] = easy.float().mean()
        maps_s, maps_t = {}, {}
        with frozen(*(self.discriminator(level) for level in self.disc_levels)):
            for level in self.disc_levels:
                if not intra.enabled:
                    maps_s[level] = masked_input(self_information(level_logits(out_s, level).detach()), v_s)
                maps_t[level] = masked_input(self_information(level_logits(out_t, level)), v_t)
                d_t = self.discriminator(level)(maps_t[level])  # the plain module: no DDP, no parameter gradient
                w = valid_fraction(v_t, d_t.shape[-2:], d_t.shape[0], d_t.device)
                adv = bce_to_label(d_t, SOURCE_LABEL, w if hard is None else w * hard.view(-1, 1, 1, 1))
                loss_t = loss_t + self._adv_weight(level) * adv
                logs["loss_adv" if level == "main" else "loss_adv_aux"] = adv.detach()
        if out_t.aux is not None and not (cfg.minent and "aux" in cfg.levels) and "aux" not in self.disc_levels \
                and not intra.enabled:
            loss_t = loss_t + 0.0 * out_t.aux.sum()  # every parameter in the graph (DDP without unused params)
        ctx.backward(loss_t, "main")
        ctx.optimizer_step("main")
        ctx.zero_grad("main")

        # 3. discriminators on the detached maps: source (or easy) 0, target (or hard) 1
        for level in self.disc_levels:
            name = f"disc_{level}"
            disc = self.wrapped(name)
            loss_d = out_t.logits.new_zeros((), dtype=torch.float32)
            if intra.enabled:  # one forward over the target batch, labels per tile
                d = disc(maps_t[level].detach())
                w = valid_fraction(v_t, d.shape[-2:], d.shape[0], d.device)
                e = easy.float().view(-1, 1, 1, 1)
                part = cfg.disc_weight * (bce_to_label(d, SOURCE_LABEL, w * e)
                                          + bce_to_label(d, TARGET_LABEL, w * (1.0 - e)))
                ctx.backward(part, name)
                loss_d = loss_d + part.detach()
            else:
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
