"""``common.schedules`` against facebookresearch/dino ``utils.cosine_scheduler`` (written out below) and the
warm-up / end conventions shared by the cosine, poly and constant policies."""

from __future__ import annotations

import numpy as np
import pytest

from common.schedules import build_lr_schedule, cosine_schedule, linear_warmup_constant, poly_schedule


def reference_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """facebookresearch/dino ``utils.cosine_scheduler``, verbatim."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def test_cosine_tiny_case_by_hand():
    # warm-up linspace(0, 1, 2) = [0, 1] (end point included: the peak is reached), then
    # (1 + cos(pi j / 3)) / 2 for j = 0, 1, 2 = 1, 0.75, 0.25 (the final 0 is not reached)
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 5, warmup_steps=2), [0.0, 1.0, 1.0, 0.75, 0.25],
                               rtol=0, atol=1e-15)
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 4), [1.0, 0.5 + 0.5 ** 0.5 / 2, 0.5, 0.5 - 0.5 ** 0.5 / 2],
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("base,final,epochs,niter,warmup,start", [
    (5e-4, 1e-6, 100, 7, 10, 0.0),                # ViT lr: warm-up 10 epochs then cosine to min_lr
    (0.04, 0.4, 100, 7, 0, 0.0),                  # weight decay 0.04 -> 0.4
    (0.996, 1.0, 100, 7, 0, 0.0),                 # teacher momentum
    (0.03, 0.0, 3, 5, 1, 0.0),                    # a short SGD run, one warm-up epoch
    (1.0, 0.0, 2, 3, 1, 0.5),                     # warm-up from a non-zero start
    (2.0, 1.0, 1, 1, 0, 0.0),                     # one step
])
def test_cosine_matches_the_reference(base, final, epochs, niter, warmup, start):
    ref = reference_cosine_scheduler(base, final, epochs, niter, warmup, start)
    ours = cosine_schedule(base, final, epochs * niter, warmup_steps=warmup * niter, warmup_start=start)
    assert ours.dtype == np.float64 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(build_lr_schedule("cosine", base, epochs * niter, warmup * niter, final),
                                  reference_cosine_scheduler(base, final, epochs, niter, warmup))


def test_last_teacher_momentum_is_not_a_no_op():
    lam = cosine_schedule(0.996, 1.0, 1000)
    assert lam[0] == 0.996 and lam[-1] < 1.0
    assert lam[-1] == pytest.approx(1 - 0.004 * (1 + np.cos(np.pi * 999 / 1000)) / 2, rel=0, abs=1e-15)


def test_poly_and_constant_share_the_warm_up_and_end_convention():
    # warm-up [0, 1] as the cosine; poly (1 - j / 3) ** 1 for j = 0, 1, 2
    np.testing.assert_allclose(poly_schedule(1.0, 5, power=1.0, warmup_steps=2), [0, 1, 1, 2 / 3, 1 / 3], atol=1e-15)
    np.testing.assert_allclose(poly_schedule(2.0, 4, power=0.9, final_value=1.0),
                               [1 + (1 - j / 4) ** 0.9 for j in range(4)], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(linear_warmup_constant(1.0, 5, 3), [0.0, 0.5, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(build_lr_schedule("constant", 1.0, 5, 3), [0.0, 0.5, 1.0, 1.0, 1.0])
    for name in ("cosine", "poly", "constant"):
        s = build_lr_schedule(name, 0.1, 10, warmup_steps=4, final_value=0.0)
        assert s.shape == (10,) and s[3] == 0.1 and s[4] == 0.1  # the peak ends the warm-up and starts the decay
        assert build_lr_schedule(name, 0.1, 3, warmup_steps=5).shape == (3,)  # warm-up clipped to the run
        assert build_lr_schedule(name, 0.1, 0, warmup_steps=2).shape == (0,)
    with pytest.raises(ValueError, match="unknown schedule"):
        build_lr_schedule("step", 0.1, 10)
    with pytest.raises(ValueError, match=">= 0"):
        cosine_schedule(1.0, 0.0, -1)
