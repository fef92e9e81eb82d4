"""Optimiser construction (``common.optim.build_optimizer``): the fused / foreach choice and its numbers on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import common.optim as optim_mod
from common.optim import OptimConfig, build_optimizer, optimizer_impl, param_groups_no_wd_for_norm_and_bias


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 4))
    model[3].bias.requires_grad_(False)  # frozen: left out of the groups
    return model


def _set_schedule(opt: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for g in opt.param_groups:  # what the engine does every step
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g["weight_decay"] = wd if g.get("apply_wd", True) else 0.0


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int = 3, twin: nn.Module | None = None,
           twin_opt: torch.optim.Optimizer | None = None) -> None:
    """``n`` optimiser steps; with a ``twin``, the twin takes the same steps with *the same gradients* (copied):
    the first Linear's bias feeds a BatchNorm, so its true gradient is 0 and Adam would amplify the thread-dependent
    rounding noise of two separate backward passes into lr-sized differences."""
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    for i in range(n):
        for o in (opt, twin_opt) if twin_opt is not None else (opt,):
            _set_schedule(o, lr=1e-2 * (i + 1), wd=0.04 * (i + 1))
            o.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        if i == 1:
            model[0].weight.grad = None  # a dropped gradient (DINO's last-layer freeze): the step skips it
        opt.step()
        if twin is not None:
            for p, q in zip(twin.parameters(), model.parameters()):
                p.grad = None if q.grad is None else q.grad.clone()
            twin_opt.step()


def _reference(name: str, groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    # torch's default single-tensor implementations
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=0.0, foreach=False, fused=False)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0, foreach=False, fused=False)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_build_optimizer_matches_the_reference_step_on_cpu(name, impl, monkeypatch):
    if impl == "foreach":  # the fallback path: pretend the CPU has no fused kernels
        monkeypatch.setattr(optim_mod, "FUSED_DEVICE_TYPES", ("cuda",))
    cfg = OptimConfig(name=name, lr=1e-2, betas=(0.9, 0.99), momentum=0.9)
    model, ref = _model(), _model()
    opt = build_optimizer(cfg, param_groups_no_wd_for_norm_and_bias(model.named_parameters()))
    ref_opt = _reference(name, param_groups_no_wd_for_norm_and_bias(ref.named_parameters()), cfg)
    assert opt.defaults["fused"] is (True if impl == "fused" else None)
    assert opt.defaults["foreach"] is (True if impl == "foreach" else None)
    # both optimisers see identical gradients: the test compares the update rule, not two backward passes
    _steps(model, opt, n=1, twin=ref, twin_opt=ref_opt)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert not torch.equal(model[0].weight, _model()[0].weight)  # it did step
    _steps(model, opt, n=3, twin=ref, twin_opt=ref_opt)  # more, with changing lr / wd and a dropped gradient
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_fused_refused_at_construction_falls_back_to_foreach(monkeypatch):
    real = torch.optim.AdamW

    class NoFused(real):
        def __init__(self, *args, fused=None, **kwargs):
            if fused:
                raise RuntimeError("fused kernels not built")
            super().__init__(*args, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", NoFused)
    model = _model()
    opt = build_optimizer(OptimConfig(name="adamw"), [{"params": model.parameters()}])  # a generator is fine too
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert len(opt.param_groups[0]["params"]) == 6  # the generator was materialised, not exhausted
    _steps(model, opt, n=1)


def test_optimizer_impl_choice():
    cpu = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    assert optimizer_impl(cpu) == "fused"
    assert optimizer_impl(cpu, fused_devices=("cuda",)) == "foreach"
    assert optimizer_impl([nn.Parameter(torch.zeros(2, device="meta"))]) == "foreach"
    assert optimizer_impl([]) == "foreach"


def test_lars_is_unchanged():
    model = _model()
    opt = build_optimizer(OptimConfig(name="lars"), param_groups_no_wd_for_norm_and_bias(model.named_parameters()))
    assert isinstance(opt, optim_mod.LARS)
    _steps(model, opt, n=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_weight_norm_magnitude_groups(norm_last_layer):
    """DINO's last-layer magnitude (``original0``, shape ``(K, 1)``): frozen and left out with norm_last_layer,
    else trainable and decayed (2-D, as the reference's ``weight_g``)."""
    from eo_ssl.dino import DINOHead

    head = DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4, norm_last_layer=norm_last_layer)
    magnitude = head.last_layer.parametrizations.weight.original0
    groups = param_groups_no_wd_for_norm_and_bias(head.named_parameters())
    decayed = [p for g in groups if g["apply_wd"] for p in g["params"]]
    in_groups = any(p is magnitude for g in groups for p in g["params"])
    assert in_groups is (not norm_last_layer)
    assert any(p is magnitude for p in decayed) is (not norm_last_layer)
    deepcopied = copy.deepcopy(head)  # the head stays copyable (teacher construction)
    assert deepcopied.last_layer.parametrizations.weight.original0.requires_grad is (not norm_last_layer)


def _dino_like() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))  # [2] plays DINO's head last layer


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_gradients_that_return_after_being_none(name, impl, monkeypatch):
    """DINO's last-layer freeze: the last layer's gradients are ``None`` for the first steps (so it has no optimiser
    state yet) and come back afterwards. torch's fused SGD with momentum failed at that first step with every
    gradient (``TypeError: expected Tensor as element N in argument 2, but got NoneType``); every optimiser the
    factory builds must take it and give the numbers of torch's single-tensor reference (the reference loop for
    LARS, which has no other implementation)."""
    if impl == "foreach":
        monkeypatch.setattr(optim_mod, "FUSED_DEVICE_TYPES", ("cuda",))
    cfg = OptimConfig(name=name, lr=1e-2, betas=(0.9, 0.99), momentum=0.9)
    model, ref = _dino_like(), _dino_like()
    opt = build_optimizer(cfg, param_groups_no_wd_for_norm_and_bias(model.named_parameters()))
    if name == "lars":
        ref_opt = optim_mod.LARS(param_groups_no_wd_for_norm_and_bias(ref.named_parameters()), lr=cfg.lr,
                                 momentum=cfg.momentum)
    else:
        ref_opt = _reference(name, param_groups_no_wd_for_norm_and_bias(ref.named_parameters()), cfg)
        assert opt.defaults["fused"] is (True if impl == "fused" else None)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    for step in range(4):
        for o in (opt, ref_opt):
            _set_schedule(o, lr=1e-2 * (step + 1), wd=0.04)
            o.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        if step < 2:  # frozen last layer: weight and bias gradients dropped
            model[2].weight.grad = model[2].bias.grad = None
        for p, q in zip(ref.parameters(), model.parameters()):
            p.grad = None if q.grad is None else q.grad.clone()
        opt.step()
        ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert not torch.equal(model[2].weight, _dino_like()[2].weight)  # the last layer did train afterwards


def test_fused_sgd_refuses_dampening_and_the_factory_falls_back():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="dampening"):
        optim_mod.SGD([p], lr=0.1, momentum=0.9, dampening=0.1, fused=True)
    assert optim_mod.SGD([p], lr=0.1, momentum=0.9, dampening=0.1, foreach=True).defaults["foreach"] is True


def test_ema_teacher_is_a_frozen_copy():
    from common.ema import ema_update_, make_teacher

    student = torch.nn.Linear(2, 1)
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher.weight, student.weight) and teacher.weight is not student.weight
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(0.0)
    ema_update_(teacher, student, 0.75)  # 0.75 * 0 + 0.25 * 1
    assert torch.allclose(teacher.weight, torch.full_like(teacher.weight, 0.25))
