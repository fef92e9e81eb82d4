"""Per-step schedules for learning rate, weight decay, EMA momentum and temperatures.

Every schedule is a pure function that returns a float64 numpy array with one value per optimisation step,
like ``cosine_scheduler`` in facebookresearch/dino: the engine indexes it with the global step, so a resumed
run reads exactly the value an uninterrupted run would have used.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["cosine_schedule", "linear_warmup_constant", "poly_schedule", "per_epoch_to_per_step", "build_lr_schedule"]


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base_value``, then a half cosine down to ``final_value``.

    ``value[i] = final + (base - final) * (1 + cos(pi * j / J)) / 2`` for the ``j``-th of ``J`` post-warm-up steps.

    Args:
        base_value: value at the end of the warm-up (peak).
        final_value: value reached at the last step.
        total_steps: number of steps (length of the returned array).
        warmup_steps: linear warm-up length (clipped to ``total_steps``).
        warmup_start: value at step 0 of the warm-up.

    Returns:
        Array of shape ``(total_steps,)``.
    """
    if total_steps < 0 or warmup_steps < 0:
        raise ValueError(f"schedule lengths must be >= 0, got total_steps={total_steps}, warmup_steps={warmup_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, base_value, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    n = total_steps - warmup_steps
    j = np.arange(n, dtype=np.float64)
    # With a single post-warm-up step the cosine starts (and stays) at the base value.
    cosine = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(math.pi * j / max(n - 1, 1)))
    out = np.concatenate([warmup, cosine]).astype(np.float64)
    assert out.shape == (total_steps,)
    return out


def linear_warmup_constant(
    base_value: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base_value``, then constant."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, base_value, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    return np.concatenate([warmup, np.full(total_steps - warmup_steps, base_value, dtype=np.float64)])


def poly_schedule(
    base_value: float,
    total_steps: int,
    power: float = 0.9,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    final_value: float = 0.0,
) -> np.ndarray:
    """DeepLab's "poly" policy: ``final + (base - final) * (1 - j / J) ** power`` after a linear warm-up."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, base_value, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    n = total_steps - warmup_steps
    j = np.arange(n, dtype=np.float64)
    poly = final_value + (base_value - final_value) * (1.0 - j / max(n, 1)) ** power
    return np.concatenate([warmup, poly])


def per_epoch_to_per_step(values_per_epoch: np.ndarray, steps_per_epoch: int) -> np.ndarray:
    """Repeat a per-epoch schedule so that it can be indexed with the global step."""
    return np.repeat(np.asarray(values_per_epoch, dtype=np.float64), steps_per_epoch)


def build_lr_schedule(
    name: str, base_value: float, total_steps: int, warmup_steps: int = 0, final_value: float = 0.0, power: float = 0.9
) -> np.ndarray:
    """Flat factory for the learning-rate policies that configs may name: ``cosine``, ``poly`` or ``constant``."""
    if name == "cosine":
        return cosine_schedule(base_value, final_value, total_steps, warmup_steps)
    if name == "poly":
        return poly_schedule(base_value, total_steps, power=power, warmup_steps=warmup_steps, final_value=final_value)
    if name == "constant":
        return linear_warmup_constant(base_value, total_steps, warmup_steps)
    raise ValueError(f"unknown schedule {name!r}; valid: cosine, poly, constant")
