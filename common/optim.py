"""Optimisers and parameter groups shared by every stage.

Parameter groups carry two extra keys that the engine's schedules read every step:
``lr_scale`` (multiplies the scheduled learning rate, e.g. a backbone lr multiplier) and ``apply_wd``
(whether the scheduled weight decay applies: biases and normalisation parameters get none, as in DINO's
``get_params_groups``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["OptimConfig", "LARS", "SGD", "param_groups_no_wd_for_norm_and_bias", "build_optimizer", "optimizer_impl",
           "FUSED_DEVICE_TYPES"]


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and learning-rate/weight-decay schedules (values per optimisation step)."""

    name: Literal["adamw", "sgd", "lars"] = "adamw"  # optimiser
    lr: float = 1e-3  # peak learning rate (before scaling by global batch, see scale_lr_with_batch)
    scale_lr_with_batch: bool = False  # lr *= global_batch / 256 (DINO's linear scaling rule)
    min_lr: float = 0.0  # final learning rate of the cosine/poly schedule
    schedule: Literal["cosine", "poly", "constant"] = "cosine"  # learning-rate policy after warm-up
    poly_power: float = 0.9  # exponent of the poly policy
    warmup_steps: int = 0  # linear warm-up length in optimisation steps
    warmup_epochs: float = 0.0  # alternative warm-up length in epochs (converted with the steps per epoch)
    weight_decay: float = 0.0  # weight decay at the start
    weight_decay_end: float | None = None  # cosine weight-decay schedule end value (None: constant)
    momentum: float = 0.9  # SGD/LARS momentum
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0 or self.warmup_epochs < 0:
            raise ValueError("optim.warmup_steps and optim.warmup_epochs must be >= 0")
        if self.weight_decay < 0 or (self.weight_decay_end is not None and self.weight_decay_end < 0):
            raise ValueError("optim.weight_decay must be >= 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"optim.momentum must be in [0, 1), got {self.momentum}")


def _is_no_wd(name: str, param: torch.Tensor) -> bool:
    # Biases and 1-D parameters (norm scales/shifts) are not decayed, as in DINO's get_params_groups. A weight-norm
    # magnitude (DINO head: last_layer.parametrizations.weight.original0) has shape (out_dim, 1), so it is *not*
    # caught here: with norm_last_layer=True (the default) it has requires_grad=False and the param groups skip it;
    # with norm_last_layer=False it is trainable and decayed, like the reference's 2-D weight_g.
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups_no_wd_for_norm_and_bias(
    named_params: Iterable[tuple[str, nn.Parameter]], lr_scale: float = 1.0, prefix_scales: dict[str, float] | None = None
) -> list[dict]:
    """Split trainable parameters into decayed and non-decayed groups (optionally per name prefix lr scale).

    Args:
        named_params: ``model.named_parameters()``.
        lr_scale: lr multiplier of every group.
        prefix_scales: extra multipliers for parameters whose name starts with a prefix (e.g. ``{"backbone.": 0.1}``).
    """
    buckets: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        scale = lr_scale
        for prefix, s in (prefix_scales or {}).items():
            if name.startswith(prefix):
                scale *= s
        buckets.setdefault((not _is_no_wd(name, p), scale), []).append(p)
    groups = []
    for (apply_wd, scale), params in sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        groups.append({"params": params, "apply_wd": apply_wd, "lr_scale": scale, "weight_decay": 0.0})
    return groups


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in facebookresearch/dino ``utils.LARS``: SGD with a layer-wise trust ratio.

    1-D parameters (biases, norms) get neither weight decay nor the trust ratio.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch API
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0, torch.where(update_norm > 0, (g["eta"] * param_norm / update_norm), one), one
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` whose fused path also takes parameters that have no momentum buffer yet.

    torch's fused SGD with momentum needs either *every* parameter of a step to have a momentum buffer or *none*
    (its first step): a parameter whose gradient was ``None`` in the earlier steps and comes back later (DINO's
    last layer after ``cancel_last_layer_gradients`` stops, any parameter unused for a while) has none while the
    others have one, and the step fails with ``TypeError: expected Tensor as element N in argument 2, but got
    NoneType``. Before each step this class gives every such parameter (with a gradient now) a zero buffer: with
    ``dampening = 0`` the fused update ``buf = momentum * 0 + grad`` is exactly the ``buf = grad`` that the
    foreach and single-tensor implementations start a buffer with, so the three give the same numbers.
    A non-zero ``dampening`` has no such equivalent and is refused with ``fused=True`` (``build_optimizer`` then
    uses foreach). The foreach and single-tensor paths are torch's, untouched.
    """

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        if any(g["fused"] and g["momentum"] != 0 and g["dampening"] != 0 for g in self.param_groups):
            raise ValueError("fused SGD with momentum and dampening != 0 cannot start momentum buffers mid-run")

    @torch.no_grad()
    def _start_momentum_buffers(self) -> None:
        for group in self.param_groups:
            if not group["fused"] or group["momentum"] == 0:
                continue
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def step(self, closure=None):  # noqa: D102 - torch API (same signature: GradScaler inspects it)
        self._start_momentum_buffers()
        return super().step(closure)


FUSED_DEVICE_TYPES = ("cuda", "cpu")
"""Devices where torch's fused AdamW / SGD kernels are used (one kernel over all parameters; on CPU the fused
AdamW step over the DINO demo model, 12.3 M parameters, took 8 ms on one core against 61 ms for torch's default
per-parameter loop and 53 ms for foreach; see bench/bench_dino_step.py)."""

_FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _params_of(groups: list) -> list[torch.Tensor]:
    return [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]


def optimizer_impl(params: list[torch.Tensor], fused_devices: tuple[str, ...] | None = None) -> str:
    """``"fused"`` when every parameter is a dense floating-point tensor on a device type in ``fused_devices``
    (default :data:`FUSED_DEVICE_TYPES`), ``"foreach"`` otherwise (torch's multi-tensor path; it falls back per
    tensor where a device lacks multi-tensor kernels)."""
    fused_devices = FUSED_DEVICE_TYPES if fused_devices is None else fused_devices
    ok = bool(params) and all(
        type(p) in (torch.Tensor, nn.Parameter) and p.device.type in fused_devices and p.dtype in _FUSED_DTYPES
        and not p.is_sparse
        for p in params
    )
    return "fused" if ok else "foreach"


def _fast(ctor, groups: list[dict], **kwargs) -> torch.optim.Optimizer:
    """``ctor(groups, fused=True)`` where :func:`optimizer_impl` allows it, else ``foreach=True``; a torch build
    that refuses ``fused`` at construction also gets ``foreach=True``."""
    # Materialise generators (``model.parameters()``): the parameters are inspected before the optimiser sees them.
    groups = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in groups]
    if optimizer_impl(_params_of(groups)) == "fused":
        try:
            return ctor(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError) as exc:  # e.g. an older torch without CPU fused kernels
            logger.info("fused %s unavailable (%s); using foreach", ctor.__name__, exc)
    return ctor(groups, foreach=True, **kwargs)


def build_optimizer(cfg: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """Create the optimiser named by ``cfg.name``; lr and weight decay are set by the engine every step.

    AdamW and SGD use torch's fused kernels when every parameter is on CUDA or the CPU (build the optimiser after
    moving the model to its device), otherwise the foreach implementation; LARS is the reference's loop.
    Every optimiser built here takes steps in which some parameters have no gradient (``grad is None``: skipped)
    and later steps in which they have one again; SGD is :class:`SGD` for that (torch's fused SGD alone fails).
    """
    if cfg.name == "adamw":
        return _fast(torch.optim.AdamW, groups, lr=cfg.lr, betas=cfg.betas, weight_decay=0.0)
    if cfg.name == "sgd":
        return _fast(SGD, groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0)
    if cfg.name == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optimiser {cfg.name!r}; valid: adamw, sgd, lars")


@torch.no_grad()
def clip_gradients_per_parameter(params: nn.Module | Iterable[torch.Tensor], clip: float) -> torch.Tensor:
    """Clip each parameter's gradient to norm ``clip`` separately (facebookresearch/dino ``utils.clip_gradients``).

    ``grad <- grad * min(1, clip / (||grad|| + 1e-6))`` for every parameter that has a gradient (unscale
    mixed-precision gradients first). The scales are computed on the stacked norms (the same numbers as one clamp
    per parameter, bit for bit) and applied with one ``_foreach_mul_``.

    Returns:
        The norms before clipping, one per parameter with a gradient, as one tensor (no host sync).
    """
    params = params.parameters() if isinstance(params, nn.Module) else params
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))
    torch._foreach_mul_(grads, torch.clamp(clip / (norms + 1e-6), max=1.0).unbind(0))
    return norms
