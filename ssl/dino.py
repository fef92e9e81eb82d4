"""DINO: self-distillation with no labels (the pure method components).

Paper: M. Caron, H. Touvron, I. Misra, H. Jégou, J. Mairal, P. Bojanowski, A. Joulin, "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021 (arXiv:2104.14294).
Reference code: https://github.com/facebookresearch/dino (``main_dino.py``: ``DINOLoss``, ``train_one_epoch``;
``vision_transformer.py``: ``DINOHead``; ``utils.py``: ``MultiCropWrapper``, ``cosine_scheduler``,
``clip_gradients``, ``cancel_gradients_last_layer``, ``get_params_groups``).

Notation: ``g_s``/``g_t`` student/teacher network (backbone + :class:`DINOHead`) with parameters ``theta_s``/
``theta_t``; ``K`` output dimension; ``x_1^g, x_2^g`` the two global views, ``V`` all views (globals + locals);
``tau_s``/``tau_t`` student/teacher temperatures; ``c`` the center; ``m`` the center momentum; ``lambda`` the
teacher momentum; ``B`` batch size. Tensors: ``s`` student outputs ``(n_crops * B, K)`` and ``t`` teacher outputs
``(2 * B, K)``, crops stacked view-major (all images of view 0, then view 1, ...), as :class:`MultiCropWrapper`
returns them.

Equation map (paper -> code):

* Eq. (1) ``P_s(x) = softmax(g_s(x) / tau_s)`` -> :func:`dino_cross_entropy` (``log_softmax(s / tau_s)``);
  the teacher's ``P_t(x) = softmax((g_t(x) - c) / tau_t)`` (centering and sharpening, Sec. 3.1) ->
  :func:`teacher_probs`.
* Eq. (2) ``H(P_t(x), P_s(x)) = -sum P_t log P_s`` -> :func:`dino_cross_entropy` (inner term).
* Eq. (3) ``sum_{x in {x_1^g, x_2^g}} sum_{x' in V, x' != x} H(P_t(x), P_s(x'))`` -> :func:`dino_cross_entropy`,
  averaged over the batch and the ``2 (n_crops - 1)`` view pairs as the reference does; :class:`DINOLoss`.
* Teacher update ``theta_t <- lambda theta_t + (1 - lambda) theta_s`` (Sec. 3.1) -> :func:`common.ema.ema_update_`
  (parameters only: the teacher's BatchNorm statistics are its own), ``lambda`` per step from
  :func:`teacher_momentum_schedule` (cosine from 0.996 to 1).
* Eq. (4) ``c <- m c + (1 - m) (1 / B) sum_i g_t(x_i)`` -> :func:`batch_center` + :meth:`DINOLoss.update_center`.
* ``tau_t`` linear warm-up then constant, indexed per epoch -> :func:`teacher_temperature_schedule`.
* Head (Appendix, "projection head"): 3-layer MLP (hidden 2048, GELU) -> bottleneck 256 -> l2-normalisation ->
  weight-normalised linear layer to ``K`` -> :class:`DINOHead`.
* Multi-crop forward: one backbone pass per run of equal-resolution views -> :class:`MultiCropWrapper`.

Training step (``main_dino.train_one_epoch``). In this project :class:`DINOMethod`'s ``training_step`` does 1-3,
its ``before_optimizer_step`` hook the last-layer freeze of 4, the engine the clipping of 4 (``trainer.clip_grad=3.0``,
``trainer.clip_mode=per_parameter``) and the optimiser step 5, ``after_optimizer_step`` the EMA 6:

1. ``t = teacher(views[:2])`` (global views only, no gradient), ``s = student(views)`` (all views);
2. ``loss = DINOLoss(s, t, epoch)`` with the *current* center;
3. ``DINOLoss.update_center(t)`` (Eq. 4, after the loss; all-reduced over processes);
4. backward; :func:`clip_gradients_per_parameter` (3.0); :func:`cancel_last_layer_gradients` in the first
   ``freeze_last_layer`` epochs;
5. optimiser step (AdamW, :func:`get_param_groups`: no weight decay on biases and norm parameters, lr and weight
   decay on cosine schedules);
6. ``ema_update_(teacher, student, lambda[step])``;
7. monitor :func:`teacher_entropy` / :func:`teacher_student_kl`: a loss stuck at ``ln K`` with teacher entropy
   ``ln K`` is uniform collapse; teacher entropy near 0 (and a loss near 0) is collapse to one dimension.

Deviations from the paper / reference code (the values the reference *code* uses are the defaults here):

* The teacher-temperature warm-up lasts ``warmup_teacher_temp_epochs = 0`` epochs, as the released code's default
  (its help text and the paper say 30 epochs from 0.04 to 0.07).
* :class:`DINOLoss` does not update the center inside ``forward``; the caller calls :meth:`DINOLoss.update_center`
  after the loss (the reference does it at the end of ``forward``: same numbers, but explicit and once per batch
  under gradient accumulation). The batch mean is divided by the all-reduced number of samples instead of
  ``local batch * world size`` (equal when every process has the same batch).
* The loss and the center are computed in float32 whatever the autocast dtype of the head output.
* The last layer uses ``torch.nn.utils.parametrizations.weight_norm`` (``nn.utils.weight_norm`` is deprecated):
  its parameters are ``last_layer.parametrizations.weight.original0`` (magnitude ``g``, the reference's
  ``weight_g``) and ``...original1`` (direction ``v``, ``weight_v``); reference checkpoints need these renames.
* :class:`MultiCropWrapper` groups consecutive views of equal height *and* width (the reference compares widths),
  does not edit the backbone (build it with ``num_classes=0``) and concatenates once.
* :func:`clip_gradients_per_parameter` returns the norms as one tensor (the reference calls ``.item()`` per
  parameter, one device sync each).
* The number of global (teacher) views is a parameter of the loss functions (the reference hard-codes 2).

Addition (not in the paper; off by default): ``dino.dense_weight > 0`` adds :class:`DenseDINOLoss`, the same
self-distillation per location of the last feature map between the two global views, matched by DenseCL's feature
correspondence, with its own head and center: ``L = (1 - lambda) L_DINO + lambda L_d``. With ``model.output_stride``
16 the map is DeepLab's (3 x 3 locations on a 48 px crop for a ResNet). See the README's pretraining-value section
for what it gave on the demo data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from common.ema import ema_update_
from common.method import Method
from common.optim import clip_gradients_per_parameter, param_groups_no_wd_for_norm_and_bias  # re-exported here
from common.schedules import cosine_schedule

__all__ = [
    "DINOConfig",
    "DINOMethod",
    "teacher_temperature_schedule",
    "teacher_momentum_schedule",
    "teacher_probs",
    "dino_cross_entropy",
    "batch_center",
    "teacher_entropy",
    "teacher_student_kl",
    "clip_gradients_per_parameter",
    "cancel_last_layer_gradients",
    "get_param_groups",
    "DINOHead",
    "MultiCropWrapper",
    "DINOLoss",
    "backbone_tokens",
    "match_locations",
    "dense_cross_entropy",
    "DenseDINOLoss",
    "N_GLOBAL_CROPS",
]

N_GLOBAL_CROPS = 2
"""Views the teacher sees (the global crops), first in the list of views."""

LAST_LAYER = "last_layer"
"""Name of the head's weight-normalised output layer; gradients of parameters containing it are dropped early."""


@dataclass(frozen=True)
class DINOConfig:
    """DINO's hyper-parameters (defaults: the reference code's ``main_dino.py`` arguments)."""

    out_dim: int = 65536  # K, output dimension of the head (Eq. 1); smaller (e.g. 4096) for small data
    hidden_dim: int = 2048  # width of the head's MLP
    bottleneck_dim: int = 256  # bottleneck before the l2-normalisation and the last layer
    nlayers: int = 3  # linear layers of the head's MLP
    use_bn_in_head: bool = False  # BatchNorm in the head's MLP (reference: False; short runs need True, DEMO_NOTES)
    norm_last_layer: bool = True  # freeze the last layer's weight-norm magnitude at 1 (stabilises training)
    student_temp: float = 0.1  # tau_s (Eq. 1)
    teacher_temp: float = 0.04  # tau_t after the warm-up (P_t)
    warmup_teacher_temp: float = 0.04  # tau_t at epoch 0 (linear warm-up to teacher_temp)
    warmup_teacher_temp_epochs: int = 0  # warm-up epochs of tau_t (released code: 0; its help text / paper: 30)
    center_momentum: float = 0.9  # m (Eq. 4)
    momentum_teacher: float = 0.996  # lambda at step 0, cosine to 1 at the end (teacher EMA)
    freeze_last_layer: int = 1  # epochs during which the last layer's gradients are dropped
    dense_weight: float = 0.0  # lambda of the dense term (this project's; 0: DINO as published, see DenseDINOLoss)
    dense_out_dim: int = 1024  # K_d, output dimension of the dense head

    def validate(self) -> None:
        """Raise ``ValueError`` on impossible values."""
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "nlayers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.warmup_teacher_temp_epochs < 0 or self.freeze_last_layer < 0:
            raise ValueError("warmup_teacher_temp_epochs and freeze_last_layer must be >= 0")
        if not 0.0 <= self.center_momentum < 1.0:
            raise ValueError(f"center_momentum must be in [0, 1), got {self.center_momentum}")
        if not 0.0 <= self.momentum_teacher <= 1.0:
            raise ValueError(f"momentum_teacher must be in [0, 1], got {self.momentum_teacher}")
        if not 0.0 <= self.dense_weight < 1.0:
            raise ValueError(f"dense_weight must be in [0, 1) (0: no dense term), got {self.dense_weight}")
        if self.dense_out_dim < 1:
            raise ValueError(f"dense_out_dim must be >= 1, got {self.dense_out_dim}")


# ---------------------------------------------------------------------------------------------- schedules
def teacher_temperature_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int, nepochs: int
) -> np.ndarray:
    """``tau_t`` per epoch: ``linspace(warmup, final, warmup_epochs)`` (end point included) then constant.

    Exactly the reference's ``DINOLoss.teacher_temp_schedule``: with ``warmup_epochs = 30`` epoch 29 already uses
    ``teacher_temp``; with 0 every epoch does.

    Returns:
        Array of shape ``(nepochs,)``.
    """
    if not 0 <= warmup_epochs <= nepochs:
        raise ValueError(f"need 0 <= warmup_epochs <= nepochs, got {warmup_epochs} and {nepochs}")
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
        np.ones(nepochs - warmup_epochs) * teacher_temp,
    ))


def teacher_momentum_schedule(momentum_teacher: float, total_steps: int) -> np.ndarray:
    """``lambda`` per optimisation step: the reference's ``momentum_schedule = cosine_scheduler(momentum_teacher, 1,
    epochs, niter_per_ep)``, value for value (:func:`common.schedules.cosine_schedule`, no warm-up).

    ``lambda_i = 1 - (1 - momentum_teacher) * (1 + cos(pi * i / N)) / 2`` for ``i = 0 .. N-1``: it starts at
    ``momentum_teacher`` and approaches 1 without reaching it (over 10 steps from 0.99 the last is 0.99975), so the
    last EMA update is not a no-op. The learning-rate and weight-decay schedules of a DINO run are the same function
    (built by the engine from ``optim``).
    """
    return cosine_schedule(momentum_teacher, 1.0, total_steps)


# ---------------------------------------------------------------------------------------------- pure losses
def teacher_probs(teacher_output: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """``P_t = softmax((t - c) / tau_t)`` in float32, detached (the teacher gets no gradient). ``(N, K)``."""
    return F.softmax((teacher_output.detach().float() - center) / teacher_temp, dim=-1)


def dino_cross_entropy(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    n_crops: int,
    n_global: int = N_GLOBAL_CROPS,
) -> torch.Tensor:
    """Eq. (3): cross-entropy ``H(P_t(x), P_s(x'))`` over every pair of a teacher view ``x`` and a different
    student view ``x'``, averaged over the batch and over the ``n_global * (n_crops - 1)`` pairs.

    Args:
        student_output: ``(n_crops * B, K)`` student logits, view-major.
        teacher_output: ``(n_global * B, K)`` teacher logits of the global views, view-major.
        center: ``(1, K)`` center ``c``.
        student_temp: ``tau_s``.
        teacher_temp: ``tau_t`` of the current epoch.
        n_crops: number of student views (global + local).
        n_global: number of teacher views; teacher view ``i`` and student view ``i`` are the same crop.

    Returns:
        Scalar loss (float32).
    """
    log_p_s = F.log_softmax(student_output.float() / student_temp, dim=-1)  # (n_crops * B, K)
    p_t = teacher_probs(teacher_output, center, teacher_temp)  # (n_global * B, K)
    return _cross_entropy_pairs(log_p_s.chunk(n_crops), p_t.chunk(n_global))


def _cross_entropy_pairs(log_p_s: Sequence[torch.Tensor], p_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. (3) from per-view student log-probabilities and teacher probabilities (see :func:`dino_cross_entropy`)."""
    total, n_terms = log_p_s[0].new_zeros((), dtype=torch.float32), 0
    for iq, q in enumerate(p_t):
        neg_q = -q  # once per teacher view (the negation is exact: same numbers as -q in every pair)
        for v, log_p in enumerate(log_p_s):
            if v == iq:
                continue  # the student and the teacher see the same view
            total = total + torch.sum(neg_q * log_p, dim=-1).mean()
            n_terms += 1
    return total / n_terms


@torch.no_grad()
def batch_center(teacher_output: torch.Tensor) -> torch.Tensor:
    """``(1 / B) sum_i g_t(x_i)`` over the teacher outputs of *all* processes: ``(1, K)`` float32.

    The sum and the count are all-reduced together (one call) when ``torch.distributed`` is initialised, so the
    mean is exact under multi-process training, also with unequal per-process batches. On one process it is a
    plain mean.
    """
    t = teacher_output.detach().float()
    # (K + 1,): sums and the sample count. torch.full, not new_tensor([n]): no host-to-device copy (a sync on CUDA).
    summed = torch.cat([t.sum(dim=0), torch.full((1,), t.shape[0], dtype=t.dtype, device=t.device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Sync point: every process must reach it once per step (it is in DINOLoss.update_center).
        dist.all_reduce(summed)
    return (summed[:-1] / summed[-1]).unsqueeze(0)


@torch.no_grad()
def teacher_entropy(teacher_output: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Mean entropy (nats) of the centred, sharpened teacher distribution ``P_t``: ``ln K`` when uniform (uniform
    collapse), near 0 when every sample puts all mass on one dimension."""
    p = teacher_probs(teacher_output, center, teacher_temp)
    return _entropy(p, _safe_log(p))


def _safe_log(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p.clamp_min(1e-30))


def _entropy(p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return -(p * log_p).sum(dim=-1).mean()


@torch.no_grad()
def teacher_student_kl(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    n_crops: int,
    n_global: int = N_GLOBAL_CROPS,
) -> torch.Tensor:
    """Mean ``KL(P_t(x) || P_s(x'))`` over the loss's view pairs: the loss minus the teacher entropy.

    Near 0 with a loss near ``ln K`` means both networks output the uniform distribution (collapse)."""
    log_p_s = F.log_softmax(student_output.float() / student_temp, dim=-1)
    p_t = teacher_probs(teacher_output, center, teacher_temp)
    return _kl_pairs(log_p_s.chunk(n_crops), p_t.chunk(n_global), _safe_log(p_t).chunk(n_global))


@torch.no_grad()
def _kl_pairs(log_p_s: Sequence[torch.Tensor], p_t: Sequence[torch.Tensor],
              log_p_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean ``KL(P_t(x) || P_s(x'))`` over the loss's pairs from per-view (log-)probabilities."""
    total, n_terms = log_p_s[0].new_zeros((), dtype=torch.float32), 0
    for iq, (q, log_q) in enumerate(zip(p_t, log_p_t)):
        for v, log_p in enumerate(log_p_s):
            if v != iq:
                total = total + torch.sum(q * (log_q - log_p), dim=-1).mean()
                n_terms += 1
    return total / n_terms


# ---------------------------------------------------------------------------------------------- gradient helpers
def cancel_last_layer_gradients(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop (set to ``None``) the gradients of the head's last layer while ``epoch < freeze_last_layer``.

    Reference ``utils.cancel_gradients_last_layer``: every parameter whose name contains ``"last_layer"``; the
    optimiser then skips it (AdamW also skips its weight decay).
    """
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if LAST_LAYER in name:
            p.grad = None


def get_param_groups(model: nn.Module) -> list[dict]:
    """Reference ``utils.get_params_groups``: weights are decayed; biases and 1-D (norm) parameters are not;
    frozen parameters (``requires_grad=False``, e.g. the fixed weight-norm magnitude) are left out.

    Returns groups in the engine's format (``apply_wd``, ``lr_scale``; see :mod:`common.optim`).
    """
    return param_groups_no_wd_for_norm_and_bias(model.named_parameters())


# ---------------------------------------------------------------------------------------------- modules
class DINOHead(nn.Module):
    """Projection head: MLP (GELU, optional BatchNorm) -> bottleneck -> l2-normalise -> weight-normalised linear.

    Args:
        in_dim: backbone feature dimension.
        out_dim: ``K``.
        hidden_dim: MLP width.
        bottleneck_dim: dimension of the l2-normalised bottleneck.
        nlayers: linear layers in the MLP (1: a single linear layer to the bottleneck).
        use_bn: BatchNorm1d after each hidden linear layer.
        norm_last_layer: fix the weight-norm magnitude ``g`` of the last layer at 1 (no gradient), so every output
            unit's weight vector has unit norm.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)  # before the last layer exists: it keeps nn.Linear's init, as the reference
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0  # g, (out_dim, 1)
        with torch.no_grad():
            magnitude.fill_(1.0)
        if norm_last_layer:
            magnitude.requires_grad_(False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # (N, bottleneck_dim)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)  # (N, K)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of views: one backbone pass per run of consecutive views with the same
    ``(H, W)``, the head once on all features.

    Args:
        backbone: maps ``(N, C, H, W)`` to pooled features ``(N, D)`` (a timm model built with ``num_classes=0``;
            ViTs with ``dynamic_img_size=True`` so that local views of another size pass). A tuple output (XCiT)
            contributes its first element.
        head: maps ``(N, D)`` to ``(N, K)``.
        dense_head: optional head for the dense term (:class:`DenseDINOLoss`), applied to every location of the
            backbone's last feature map.

    ``forward(views)`` takes a tensor or a list of ``(B, C, h_i, w_i)`` tensors and returns ``(len(views) * B, K)``,
    view-major. ``forward(views, dense_views=n)`` (with a ``dense_head``) also returns, for the first ``n`` views
    (which must share the first resolution group), the last feature map's locations ``(n * B, L, D)``
    (:func:`backbone_tokens`, from the same backbone pass) and the dense head's outputs on them ``(n * B, L, K_d)``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, dense_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        if dense_head is not None:
            self.dense_head = dense_head

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor], dense_views: int = 0
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        views = [x] if isinstance(x, torch.Tensor) else list(x)
        if dense_views and not hasattr(self, "dense_head"):
            raise ValueError("dense_views needs a wrapper built with a dense_head")
        features, start = [], 0
        tokens = None
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            batch = torch.cat(views[start:end]) if end - start > 1 else views[start]
            if start == 0 and dense_views:
                if end < dense_views:
                    raise ValueError(f"the first {dense_views} views must have the same size for the dense term")
                out, tokens = backbone_tokens(self.backbone, batch)
                tokens = tokens[: dense_views * views[0].shape[0]]
            else:
                out = self.backbone(batch)
            if isinstance(out, tuple):
                out = out[0]
            if out.ndim != 2:
                raise ValueError(
                    f"backbone returned shape {tuple(out.shape)}; expected pooled features (N, D): build the timm "
                    "model with num_classes=0 (and a global pool)"
                )
            features.append(out)
            start = end
        head_out = self.head(torch.cat(features) if len(features) > 1 else features[0])
        if not dense_views:
            return head_out
        n, length, dim = tokens.shape
        return head_out, tokens, self.dense_head(tokens.reshape(n * length, dim)).reshape(n, length, -1)


def backbone_tokens(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of a timm ``num_classes=0`` model: its pooled features ``(N, D)`` (``forward_head`` of
    ``forward_features``: what ``backbone(x)`` returns) and the locations of its last feature map ``(N, L, D)`` (a
    CNN's ``(N, D, h, w)`` map flattened row-major, ``L = h w``; a ViT's patch tokens, prefix tokens left out)."""
    maps = backbone.forward_features(x)
    pooled = backbone.forward_head(maps)
    if maps.ndim == 4:
        tokens = maps.flatten(2).transpose(1, 2)
    elif maps.ndim == 3:
        tokens = maps[:, int(getattr(backbone, "num_prefix_tokens", 0)):]
    else:
        raise ValueError(f"forward_features returned shape {tuple(maps.shape)}; the dense term needs (N, D, h, w) "
                         f"maps or (N, L, D) tokens")
    return pooled, tokens


@torch.no_grad()
def match_locations(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For every location of view ``a``, the index of the location of view ``b`` of the same image with the most
    cosine-similar feature (DenseCL's correspondence): ``a`` ``(B, L_a, D)``, ``b`` ``(B, L_b, D)`` -> ``(B, L_a)``
    int64."""
    sim = torch.bmm(F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1).transpose(1, 2))
    return sim.argmax(dim=-1)


def dense_cross_entropy(student_dense: Sequence[torch.Tensor], teacher_probs_views: Sequence[torch.Tensor],
                        matches: dict[tuple[int, int], torch.Tensor], student_temp: float) -> torch.Tensor:
    """The dense term: for each ordered pair ``(a, b)`` of global views, every location ``i`` of the student's view
    ``a`` is trained towards the teacher's distribution at its matched location ``m_ab(i)`` of view ``b``:
    ``L_d = mean_{(a,b)} mean_{n,i} H(P_t^b[n, m_ab(n, i)], P_s^a[n, i])``.

    Args:
        student_dense: per global view ``(B, L, K_d)`` student dense logits.
        teacher_probs_views: per global view ``(B, L, K_d)`` teacher probabilities (centred, sharpened).
        matches: ``{(a, b): (B, L) indices into view b}`` (:func:`match_locations` of the teacher's features).
        student_temp: ``tau_s``.
    """
    total, n_terms = student_dense[0].new_zeros((), dtype=torch.float32), 0
    for (a, b), idx in matches.items():
        log_p = F.log_softmax(student_dense[a].float() / student_temp, dim=-1)
        q = torch.gather(teacher_probs_views[b], 1, idx.unsqueeze(-1).expand(-1, -1, teacher_probs_views[b].shape[-1]))
        total = total + torch.sum(-q * log_p, dim=-1).mean()
        n_terms += 1
    return total / n_terms


class DINOLoss(nn.Module):
    """Eq. (3) with centering and a per-epoch teacher temperature; holds the center ``c`` (a buffer, so it is in
    the ``state_dict`` and in checkpoints).

    Args:
        out_dim: ``K``.
        ncrops: number of student views (2 global + locals).
        warmup_teacher_temp: ``tau_t`` at epoch 0.
        teacher_temp: ``tau_t`` after the warm-up.
        warmup_teacher_temp_epochs: linear warm-up length in epochs.
        nepochs: training length in epochs (length of the temperature schedule).
        student_temp: ``tau_s``.
        center_momentum: ``m`` of Eq. (4).

    Use: ``loss = dino_loss(s, t, epoch)``, then ``dino_loss.update_center(t)`` (after the loss, once per batch).
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ):
        super().__init__()
        if ncrops < N_GLOBAL_CROPS:
            raise ValueError(f"ncrops must be >= {N_GLOBAL_CROPS}, got {ncrops}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # A too high teacher temperature makes training unstable at the beginning, hence the optional warm-up.
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )

    def teacher_temp(self, epoch: int) -> float:
        """``tau_t`` of ``epoch`` (the schedule is per epoch, not per step)."""
        if not 0 <= epoch < len(self.teacher_temp_schedule):
            raise IndexError(f"epoch {epoch} is outside the teacher-temperature schedule of "
                             f"{len(self.teacher_temp_schedule)} epochs")
        return float(self.teacher_temp_schedule[epoch])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Cross-entropy between the teacher's and the student's softmax outputs (Eq. 3), with the current center."""
        return dino_cross_entropy(student_output, teacher_output, self.center, self.student_temp,
                                  self.teacher_temp(epoch), self.ncrops)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Eq. (4): ``c <- m c + (1 - m) mean(t)``, the mean over all processes' teacher outputs. Call after the
        loss of the same batch, on every process."""
        self.center.mul_(self.center_momentum).add_(batch_center(teacher_output), alpha=1.0 - self.center_momentum)

    @torch.no_grad()
    def stats(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """Collapse monitors with the current center (detached scalars, no device sync): ``teacher_entropy``,
        ``teacher_student_kl`` and ``log_k`` (``ln K``, the value of both entropy and loss at uniform collapse)."""
        temp = self.teacher_temp(epoch)
        return {
            "teacher_entropy": teacher_entropy(teacher_output, self.center, temp),
            "teacher_student_kl": teacher_student_kl(student_output, teacher_output, self.center, self.student_temp,
                                                     temp, self.ncrops),
            "log_k": self._log_k(),
        }

    def _log_k(self) -> torch.Tensor:
        # torch.full, not new_tensor(value): no host-to-device copy (a sync on CUDA) every step.
        return torch.full((), math.log(self.center.shape[-1]), dtype=self.center.dtype, device=self.center.device)

    def loss_and_stats(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``forward`` and :meth:`stats` in one pass: the student log-softmax and the teacher probabilities are
        computed once and shared (the same numbers as the two separate calls, bit for bit)."""
        temp = self.teacher_temp(epoch)
        log_p_s = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        p_t = teacher_probs(teacher_output, self.center, temp)
        log_p_s_views = log_p_s.chunk(self.ncrops)
        p_t_views = p_t.chunk(N_GLOBAL_CROPS)
        loss = _cross_entropy_pairs(log_p_s_views, p_t_views)
        with torch.no_grad():
            log_p_t = _safe_log(p_t)
            stats = {
                "teacher_entropy": _entropy(p_t, log_p_t),
                "teacher_student_kl": _kl_pairs([x.detach() for x in log_p_s_views], p_t_views,
                                                log_p_t.chunk(N_GLOBAL_CROPS)),
                "log_k": self._log_k(),
            }
        return loss, stats


class DenseDINOLoss(nn.Module):
    """A dense self-distillation term beside DINO's (this project's; off by default, ``dino.dense_weight: 0``).

    DINO's loss trains the pooled feature only. For segmentation the per-location features of the last map matter
    (what DeepLab's head reads), so the same centring and sharpening is applied per location between the two global
    views: a dense head (a :class:`DINOHead` of output ``K_d`` on every location, :class:`MultiCropWrapper`'s
    ``dense_head``) and, because the views' crop geometry is not tracked, DenseCL's correspondence (Wang et al.,
    "Dense Contrastive Learning for Self-Supervised Visual Pre-Training", CVPR 2021): each location of one view is
    matched to the most cosine-similar location of the other view in the *teacher's* backbone features
    (:func:`match_locations`; DenseCL matches query and key encoder features). With ``lambda = dense_weight``:

    ``L = (1 - lambda) L_DINO + lambda L_d``, ``L_d`` of :func:`dense_cross_entropy` (DenseCL's mixing, lambda 0.5
    there), with its own center ``c_d`` (Eq. 4 over all locations of the teacher's global views) and DINO's
    temperatures and schedule.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float, center_momentum: float):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def loss_and_stats(self, student_dense: torch.Tensor, teacher_dense: torch.Tensor, teacher_tokens: torch.Tensor,
                       teacher_temp: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``student_dense`` / ``teacher_dense`` ``(2 B, L, K_d)`` and ``teacher_tokens`` ``(2 B, L, D)``, view-major
        over the two global views; the loss with the current center and the dense teacher entropy."""
        k = teacher_dense.shape[-1]
        p_t = teacher_probs(teacher_dense.reshape(-1, k), self.center, teacher_temp).reshape(teacher_dense.shape)
        t_views = teacher_tokens.chunk(N_GLOBAL_CROPS)
        matches = {(a, b): match_locations(t_views[a], t_views[b])
                   for a in range(N_GLOBAL_CROPS) for b in range(N_GLOBAL_CROPS) if a != b}
        loss = dense_cross_entropy(student_dense.chunk(N_GLOBAL_CROPS), p_t.chunk(N_GLOBAL_CROPS), matches,
                                   self.student_temp)
        with torch.no_grad():
            entropy = _entropy(p_t.reshape(-1, k), _safe_log(p_t.reshape(-1, k)))
        return loss, {"dense_loss": loss.detach(), "dense_teacher_entropy": entropy}

    @torch.no_grad()
    def update_center(self, teacher_dense: torch.Tensor) -> None:
        """Eq. (4) for ``c_d`` over every location of the teacher's global views (all processes)."""
        self.center.mul_(self.center_momentum).add_(batch_center(teacher_dense.reshape(-1, teacher_dense.shape[-1])),
                                                    alpha=1.0 - self.center_momentum)


# ---------------------------------------------------------------------------------------------- the method
class DINOMethod(Method):
    """DINO as a :class:`common.method.Method`: student, EMA teacher and loss (with its center) in one module, so
    one ``state_dict`` checkpoints all. Only the student is trained (and wrapped in DDP); the teacher and the
    center stay outside DDP and are updated by the EMA and Eq. (4) identically on every process.

    ``training_step`` = steps 1-3 of the module docstring, ``before_optimizer_step`` the last-layer freeze of 4,
    the engine clips and steps (5), ``after_optimizer_step`` is the EMA (6).

    Args:
        cfg: the ``dino`` section.
        student / teacher: two identical pooled backbones (``num_classes=0``), e.g. from
            :func:`common.backbones.create_embedding_backbone`; the teacher starts as a copy of the student.
        num_crops: views per tile (2 global + locals).
        epochs / total_steps: the run's length (teacher-temperature and momentum schedules).
        rgb: band indices shown in the logged multi-crop images.
    """

    name = "dino"
    streams = ("tiles",)
    trainable = ("student",)
    sync_bn_modules = ("student", "teacher")
    eval_prefix = "teacher.backbone."

    def __init__(self, cfg: DINOConfig, student: nn.Module, teacher: nn.Module, num_crops: int, epochs: int,
                 total_steps: int, rgb: tuple[int, int, int] = (0, 1, 2)):
        super().__init__()
        dim = student.embed_dim

        def head(norm_last_layer: bool) -> DINOHead:
            return DINOHead(dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.nlayers, cfg.use_bn_in_head,
                            norm_last_layer)

        def dense_head(norm_last_layer: bool) -> DINOHead | None:
            if cfg.dense_weight <= 0:
                return None
            return DINOHead(dim, cfg.dense_out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.nlayers,
                            cfg.use_bn_in_head, norm_last_layer)

        self.student = MultiCropWrapper(student, head(cfg.norm_last_layer), dense_head(cfg.norm_last_layer))
        self.teacher = MultiCropWrapper(teacher, head(True), dense_head(True))
        self.teacher.load_state_dict(self.student.state_dict())  # teacher and student start equal
        self.teacher.requires_grad_(False)
        self.loss_fn = DINOLoss(cfg.out_dim, num_crops, cfg.warmup_teacher_temp, cfg.teacher_temp,
                                cfg.warmup_teacher_temp_epochs, epochs, cfg.student_temp, cfg.center_momentum)
        self.dense_loss = (DenseDINOLoss(cfg.dense_out_dim, cfg.student_temp, cfg.center_momentum)
                           if cfg.dense_weight > 0 else None)
        self.cfg = cfg
        self.rgb = rgb
        self.momentum = teacher_momentum_schedule(cfg.momentum_teacher, total_steps)
        self.compile_modules = ("student", "teacher")

    @property
    def eval_model(self) -> nn.Module:
        return self.teacher.backbone

    def param_groups(self) -> list[dict]:
        return get_param_groups(self.student)

    def train(self, mode: bool = True) -> "DINOMethod":
        super().train(mode)
        self.teacher.train(mode)  # the teacher's BatchNorm uses batch statistics in training, as the reference
        return self

    def training_step(self, batch: dict, ctx) -> dict[str, torch.Tensor]:
        crops = batch["tiles"]
        if self.dense_loss is not None:
            return self._dense_step(crops, ctx.epoch)
        with torch.no_grad():
            teacher_out = self.teacher(crops[:N_GLOBAL_CROPS])
        student_out = self.wrapped("student")(crops)
        loss, stats = self.loss_fn.loss_and_stats(student_out, teacher_out, ctx.epoch)  # loss and monitors
        self.loss_fn.update_center(teacher_out)
        return {"loss": loss, **stats}

    def _dense_step(self, crops: Sequence[torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        """DINO's step with :class:`DenseDINOLoss`: the global views' feature maps come from the same backbone
        passes as their pooled features; ``loss = (1 - lambda) L_DINO + lambda L_d``, both centers updated after."""
        with torch.no_grad():
            teacher_out, teacher_tokens, teacher_dense = self.teacher(crops[:N_GLOBAL_CROPS], dense_views=N_GLOBAL_CROPS)
        student_out, _, student_dense = self.wrapped("student")(crops, dense_views=N_GLOBAL_CROPS)
        loss, stats = self.loss_fn.loss_and_stats(student_out, teacher_out, epoch)
        dense, dense_stats = self.dense_loss.loss_and_stats(student_dense, teacher_dense, teacher_tokens,
                                                            self.loss_fn.teacher_temp(epoch))
        self.loss_fn.update_center(teacher_out)
        self.dense_loss.update_center(teacher_dense)
        w = self.cfg.dense_weight
        return {"loss": (1.0 - w) * loss + w * dense, "dino_loss": loss.detach(), **stats, **dense_stats}

    def before_optimizer_step(self, name: str, step: int, epoch: int) -> None:
        cancel_last_layer_gradients(epoch, self.student, self.cfg.freeze_last_layer)

    @torch.no_grad()
    def after_optimizer_step(self, step: int, epoch: int) -> None:
        ema_update_(self.teacher, self.student, float(self.momentum[min(step, len(self.momentum) - 1)]))

    def log_values(self, step: int, epoch: int) -> dict[str, float]:
        return {"momentum": float(self.momentum[min(step, len(self.momentum) - 1)]),
                "teacher_temp": self.loss_fn.teacher_temp(min(epoch, len(self.loss_fn.teacher_temp_schedule) - 1))}

    def log_images(self, batch: dict, step: int) -> dict[str, np.ndarray]:
        from eo_ssl.multicrop import render_multicrop_grid

        return {"train/crops": render_multicrop_grid(batch["tiles"], rgb=self.rgb, max_samples=4)}
