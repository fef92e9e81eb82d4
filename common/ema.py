"""Exponential moving averages of model parameters (mean teacher, DINO teacher, PS-MT teachers).

``theta_t <- m * theta_t + (1 - m) * theta_s`` for every parameter. Buffers (BatchNorm running statistics) are
*not* averaged by default: as in facebookresearch/dino, the teacher keeps its own statistics, computed by its own
forward passes. ``copy_buffers=True`` copies the student's buffers instead (the mean-teacher convention of some
semi-supervised repositories).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_update_", "make_teacher"]


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float, copy_buffers: bool = False) -> None:
    """In-place EMA update of ``teacher`` towards ``student``.

    Args:
        teacher: the averaged model (updated in place, never receives gradients).
        student: the trained model, with the same parameter names and shapes.
        momentum: ``m`` in ``theta_t <- m * theta_t + (1 - m) * theta_s``; 1.0 freezes the teacher.
        copy_buffers: copy the student's floating-point buffers into the teacher.

    Raises:
        ValueError: if the two models do not have the same parameters.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    params_t = dict(teacher.named_parameters())
    params_s = dict(student.named_parameters())
    if params_t.keys() != params_s.keys():
        missing = sorted(set(params_s) ^ set(params_t))[:10]
        raise ValueError(f"teacher and student parameters differ, e.g. {missing}")
    names = list(params_s)
    t = [params_t[n].data for n in names]
    s = [params_s[n].detach().data.to(params_t[n].dtype) for n in names]
    # One fused kernel call over all parameters: t = m * t + (1 - m) * s.
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)
    if copy_buffers:
        for (_, b_t), (_, b_s) in zip(teacher.named_buffers(), student.named_buffers()):
            b_t.copy_(b_s)


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of ``student`` whose parameters take no gradient: the EMA teacher of mean-teacher methods (a plain
    sub-module of the method, outside DDP, updated with :func:`ema_update_`)."""
    import copy

    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher
