"""Per-step schedules for learning rate, weight decay, EMA momentum and temperatures.

Every schedule is a pure function that returns a float64 numpy array with one value per optimisation step,
like ``cosine_scheduler`` in facebookresearch/dino: the engine indexes it with the global step, so a resumed
run reads exactly the value an uninterrupted run would have used.

:func:`cosine_schedule` is the reference's ``utils.cosine_scheduler`` value for value (it is used for the DINO
learning rate, weight decay and teacher momentum, and for every ``optim.schedule: cosine``):

* the linear warm-up is ``np.linspace(warmup_start, base_value, warmup_steps)``, end point *included*: the last
  warm-up step already uses the peak ``base_value`` (and the first cosine step uses it again);
* the cosine runs over ``j = 0 .. J-1`` of the ``J`` post-warm-up steps with ``cos(pi * j / J)``, so it starts at
  ``base_value`` and does *not* reach ``final_value``: its last value is
  ``final + (base - final) * (1 + cos(pi * (J - 1) / J)) / 2`` (a teacher momentum 0.996 -> 1 over 1000 steps ends
  at 0.99999999, over 10 steps at 0.99990, not at the no-op 1.0).

The poly and constant policies share the same warm-up (end point included) and the same convention after it:
step ``j`` of ``J`` uses ``j / J``, so poly starts at the peak and stops one step short of ``final_value``.
A one-step warm-up is ``linspace(start, base, 1) = [start]`` (as the reference).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["cosine_schedule", "linear_warmup", "linear_warmup_constant", "poly_schedule", "per_epoch_to_per_step",
           "build_lr_schedule"]


def _lengths(total_steps: int, warmup_steps: int) -> tuple[int, int]:
    if total_steps < 0 or warmup_steps < 0:
        raise ValueError(f"schedule lengths must be >= 0, got total_steps={total_steps}, warmup_steps={warmup_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    return warmup_steps, total_steps - warmup_steps


def linear_warmup(warmup_start: float, base_value: float, warmup_steps: int) -> np.ndarray:
    """``np.linspace(warmup_start, base_value, warmup_steps)``: end point included, the last step is the peak
    (reference ``cosine_scheduler``'s ``warmup_schedule``)."""
    if warmup_steps <= 0:
        return np.zeros(0, dtype=np.float64)
    return np.linspace(warmup_start, base_value, warmup_steps, dtype=np.float64)


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """facebookresearch/dino ``utils.cosine_scheduler`` per step: linear warm-up, then a half cosine.

    ``value = linspace(warmup_start, base, W)`` (end point included) for the ``W`` warm-up steps, then
    ``final + 0.5 * (base - final) * (1 + cos(pi * j / J))`` for ``j = 0 .. J-1``, ``J = total - W`` (the last value
    is one step short of ``final_value``). Example: base 1, final 0, 5 steps, warm-up 2 ->
    ``[0, 1, 1, 0.75, 0.25]``.

    Args:
        base_value: peak value (last warm-up step and first cosine step).
        final_value: value the cosine approaches (reached one step after the last).
        total_steps: number of steps (length of the returned array).
        warmup_steps: linear warm-up length (clipped to ``total_steps``).
        warmup_start: value at step 0 of the warm-up.

    Returns:
        Array of shape ``(total_steps,)``.
    """
    warmup_steps, n = _lengths(total_steps, warmup_steps)
    j = np.arange(n, dtype=np.float64)
    cosine = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(math.pi * j / max(n, 1)))
    out = np.concatenate([linear_warmup(warmup_start, base_value, warmup_steps), cosine]).astype(np.float64)
    assert out.shape == (total_steps,)
    return out


def linear_warmup_constant(
    base_value: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base_value`` (end point included, as :func:`cosine_schedule`),
    then constant ``base_value``."""
    warmup_steps, n = _lengths(total_steps, warmup_steps)
    return np.concatenate([linear_warmup(warmup_start, base_value, warmup_steps),
                           np.full(n, base_value, dtype=np.float64)])


def poly_schedule(
    base_value: float,
    total_steps: int,
    power: float = 0.9,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    final_value: float = 0.0,
) -> np.ndarray:
    """DeepLab's "poly" policy: ``final + (base - final) * (1 - j / J) ** power`` for ``j = 0 .. J-1`` after the
    linear warm-up of :func:`cosine_schedule` (end point included). Example: base 1, final 0, power 1, 5 steps,
    warm-up 2 -> ``[0, 1, 1, 2/3, 1/3]``."""
    warmup_steps, n = _lengths(total_steps, warmup_steps)
    j = np.arange(n, dtype=np.float64)
    poly = final_value + (base_value - final_value) * (1.0 - j / max(n, 1)) ** power
    return np.concatenate([linear_warmup(warmup_start, base_value, warmup_steps), poly])


def per_epoch_to_per_step(values_per_epoch: np.ndarray, steps_per_epoch: int) -> np.ndarray:
    """Repeat a per-epoch schedule so that it can be indexed with the global step."""
    return np.repeat(np.asarray(values_per_epoch, dtype=np.float64), steps_per_epoch)


def build_lr_schedule(
    name: str, base_value: float, total_steps: int, warmup_steps: int = 0, final_value: float = 0.0, power: float = 0.9
) -> np.ndarray:
    """Flat factory for the learning-rate policies that configs may name: ``cosine``, ``poly`` or ``constant``
    (all with the warm-up of :func:`cosine_schedule`, end point included)."""
    if name == "cosine":
        return cosine_schedule(base_value, final_value, total_steps, warmup_steps)
    if name == "poly":
        return poly_schedule(base_value, total_steps, power=power, warmup_steps=warmup_steps, final_value=final_value)
    if name == "constant":
        return linear_warmup_constant(base_value, total_steps, warmup_steps)
    raise ValueError(f"unknown schedule {name!r}; valid: cosine, poly, constant")
