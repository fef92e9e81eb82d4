"""DINO components (``eo_ssl.dino``) against hand-computed values, plus a two-process all-reduce of the center."""

from __future__ import annotations

import copy
import math
import socket

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from common.ema import ema_update_
from eo_ssl.dino import (
    DINOConfig,
    DINOHead,
    DINOLoss,
    MultiCropWrapper,
    batch_center,
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    dino_cross_entropy,
    get_param_groups,
    teacher_entropy,
    teacher_momentum_schedule,
    teacher_student_kl,
    teacher_temperature_schedule,
)

# ---------------------------------------------------------------------------------------------- the loss by hand
# K = 3, 2 global views + 1 local view (n_crops = 3), batch B = 2. Logits are built as
# temperature * log(probabilities) (+ center for the teacher), so that the softmax gives back the probabilities.
TAU_S, TAU_T = 0.5, 0.25
CENTER = torch.tensor([[0.3, -0.2, 0.1]])
P_T = {  # teacher distributions P_t[view][sample]
    0: [[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]],
    1: [[0.1, 0.6, 0.3], [0.25, 0.25, 0.5]],
}
P_S = {  # student distributions P_s[view][sample]
    0: [[0.25, 0.25, 0.5], [0.4, 0.4, 0.2]],
    1: [[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]],
    2: [[0.125, 0.125, 0.75], [0.6, 0.2, 0.2]],
}


def _logits(probs: dict, temp: float, center: torch.Tensor | None = None) -> torch.Tensor:
    rows = [p for v in sorted(probs) for p in probs[v]]  # view-major: view 0 samples, view 1 samples, ...
    out = temp * torch.log(torch.tensor(rows, dtype=torch.float64))
    return (out + center if center is not None else out).float()


def _h(p: list[float], q: list[float]) -> float:
    """Cross-entropy H(p, q) = -sum p log q."""
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q))


def test_loss_hand_computed_pairs_skip_same_view_and_average():
    s = _logits(P_S, TAU_S)
    t = _logits(P_T, TAU_T, CENTER)
    # pairs (teacher view, student view): (0, 1), (0, 2), (1, 0), (1, 2); not (0, 0) nor (1, 1)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum(0.5 * (_h(P_T[i][0], P_S[v][0]) + _h(P_T[i][1], P_S[v][1])) for i, v in pairs) / 4
    # written out for the first sample of the first pair, to pin the numbers down:
    assert _h(P_T[0][0], P_S[1][0]) == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    loss = dino_cross_entropy(s, t, CENTER, TAU_S, TAU_T, n_crops=3)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # including the same-view pairs, or summing instead of averaging, gives other numbers
    with_same = (sum(0.5 * (_h(P_T[i][0], P_S[v][0]) + _h(P_T[i][1], P_S[v][1]))
                     for i in (0, 1) for v in (0, 1, 2))) / 6
    assert abs(loss.item() - with_same) > 1e-2 and abs(loss.item() - 4 * expected) > 1e-2
    # the module gives the same value with a zero-epoch warm-up and this center
    module = DINOLoss(3, 3, warmup_teacher_temp=TAU_T, teacher_temp=TAU_T, warmup_teacher_temp_epochs=0,
                      nepochs=2, student_temp=TAU_S)
    module.center.copy_(CENTER)
    assert module(s, t, epoch=1).item() == pytest.approx(expected, rel=1e-5)


def test_loss_gradient_flows_to_the_student_only():
    s = _logits(P_S, TAU_S).requires_grad_(True)
    t = _logits(P_T, TAU_T, CENTER).requires_grad_(True)
    dino_cross_entropy(s, t, CENTER, TAU_S, TAU_T, n_crops=3).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None  # the teacher distribution is detached


def test_loss_is_float32_under_low_precision_inputs():
    s, t = _logits(P_S, TAU_S).bfloat16(), _logits(P_T, TAU_T, CENTER).bfloat16()
    loss = dino_cross_entropy(s, t, CENTER, TAU_S, TAU_T, n_crops=3)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------- the center
def test_center_update_is_an_ema_applied_after_the_loss():
    m = 0.9
    loss_fn = DINOLoss(3, 3, 0.04, 0.04, 0, nepochs=1, student_temp=0.1, center_momentum=m)
    s = torch.randn(6, 3)
    t1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0], [0.0, 0.0, 1.0], [2.0, 2.0, 1.0]])
    # the loss uses the current (zero) center ...
    loss = loss_fn(s, t1, epoch=0)
    assert loss.item() == pytest.approx(dino_cross_entropy(s, t1, torch.zeros(1, 3), 0.1, 0.04, 3).item())
    loss_fn.update_center(t1)
    # ... and only then c <- m c + (1 - m) mean(t): mean(t1) = [1.5, 1.0, 1.0]
    assert torch.allclose(loss_fn.center, torch.tensor([[0.15, 0.1, 0.1]]))
    t2 = torch.tensor([[0.0, 1.0, 0.0], [2.0, 1.0, 0.0], [1.0, 1.0, 2.0], [1.0, 1.0, 2.0]])  # mean [1, 1, 1]
    loss_fn.update_center(t2)
    assert torch.allclose(loss_fn.center, torch.tensor([[0.9 * 0.15 + 0.1, 0.9 * 0.1 + 0.1, 0.9 * 0.1 + 0.1]]))
    assert loss_fn(s, t1, epoch=0).item() != pytest.approx(loss.item())  # the next loss sees the new center
    assert "center" in loss_fn.state_dict()  # saved with checkpoints


def test_teacher_temperature_schedule_per_epoch():
    sched = teacher_temperature_schedule(0.04, 0.07, warmup_epochs=3, nepochs=5)
    np.testing.assert_allclose(sched, [0.04, 0.055, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(teacher_temperature_schedule(0.04, 0.07, 0, 4), [0.07] * 4)
    with pytest.raises(ValueError):
        teacher_temperature_schedule(0.04, 0.07, 6, 5)
    loss_fn = DINOLoss(3, 3, 0.04, 0.07, 3, nepochs=5)
    assert [loss_fn.teacher_temp(e) for e in range(5)] == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07])
    s, t = _logits(P_S, TAU_S), _logits(P_T, TAU_T)
    for epoch in (0, 1, 4):  # the loss reads the temperature of its epoch
        expected = dino_cross_entropy(s, t, torch.zeros(1, 3), 0.1, float(sched[epoch]), 3)
        assert loss_fn(s, t, epoch).item() == pytest.approx(expected.item())
    with pytest.raises(IndexError):
        loss_fn.teacher_temp(5)


def test_teacher_momentum_schedule_is_the_reference_cosine_towards_one():
    """Reference ``momentum_schedule = cosine_scheduler(0.996, 1, epochs, niter)``: ``1 - 0.004 (1 + cos(pi i / N)) / 2``
    for ``i < N``, so the last value stays below 1 (the last EMA update still moves the teacher)."""
    lam = teacher_momentum_schedule(0.996, 11)
    i = np.arange(11)
    np.testing.assert_array_equal(lam, 1.0 + 0.5 * (0.996 - 1.0) * (1 + np.cos(np.pi * i / 11)))
    assert lam[0] == 0.996 and lam[-1] < 1.0 and np.all(np.diff(lam) > 0)
    assert lam[-1] == pytest.approx(0.999919, abs=1e-6)  # 1 - 0.002 (1 + cos(10 pi / 11))
    # hand-computed for 4 steps from 0.99: 1 - 0.005 (1 + cos(pi i / 4))
    np.testing.assert_allclose(teacher_momentum_schedule(0.99, 4),
                               [0.99, 1 - 0.005 * (1 + 0.5 ** 0.5), 0.995, 1 - 0.005 * (1 - 0.5 ** 0.5)], atol=1e-15)


def test_collapse_monitors():
    k = 8
    uniform = torch.zeros(4, k)
    assert teacher_entropy(uniform, torch.zeros(1, k), 0.04).item() == pytest.approx(math.log(k), rel=1e-5)
    peaked = torch.zeros(4, k)
    peaked[:, 3] = 10.0
    assert teacher_entropy(peaked, torch.zeros(1, k), 0.04).item() < 1e-3
    # KL(P_t || P_s) over the loss's pairs = loss - mean teacher entropy (each teacher view is in n_crops-1 pairs)
    s, t, c = torch.randn(6, k), torch.randn(4, k), 0.1 * torch.randn(1, k)
    kl = teacher_student_kl(s, t, c, 0.1, 0.07, n_crops=3)
    loss = dino_cross_entropy(s, t, c, 0.1, 0.07, n_crops=3)
    assert kl.item() == pytest.approx(loss.item() - teacher_entropy(t, c, 0.07).item(), rel=1e-4)
    stats = DINOLoss(k, 3, 0.04, 0.04, 0, 1).stats(s, t, 0)
    assert set(stats) == {"teacher_entropy", "teacher_student_kl", "log_k"}
    assert stats["log_k"].item() == pytest.approx(math.log(k))


# ---------------------------------------------------------------------------------------------- gradients
def test_clip_gradients_per_parameter_hand_values():
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(2))
    c = nn.Parameter(torch.zeros(2))  # no gradient: skipped
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    norms = clip_gradients_per_parameter([a, b, c], clip=1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]) / (5.0 + 1e-6))  # clipped to norm ~1
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # below the threshold: untouched
    assert c.grad is None
    # on a module; each parameter separately (a global-norm clip would scale both)
    lin = nn.Linear(2, 1)
    lin.weight.grad, lin.bias.grad = torch.tensor([[6.0, 8.0]]), torch.tensor([0.5])
    clip_gradients_per_parameter(lin, 3.0)
    torch.testing.assert_close(lin.weight.grad, torch.tensor([[6.0, 8.0]]) * 3.0 / (10.0 + 1e-6))
    torch.testing.assert_close(lin.bias.grad, torch.tensor([0.5]))


def _small_student(in_chans: int = 3, out_dim: int = 16, use_bn: bool = False) -> MultiCropWrapper:
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=in_chans)
    head = DINOHead(backbone.num_features, out_dim, hidden_dim=32, bottleneck_dim=8, use_bn=use_bn)
    return MultiCropWrapper(backbone, head)


def test_last_layer_gradients_dropped_in_the_first_epoch_only():
    torch.manual_seed(0)
    model = _small_student()
    views = [torch.randn(2, 3, 32, 32)]
    for epoch, expect_grad in ((0, False), (1, True)):
        model.zero_grad(set_to_none=True)
        model(views).pow(2).sum().backward()
        cancel_last_layer_gradients(epoch, model, freeze_last_layer=1)
        v = model.head.last_layer.parametrizations.weight.original1
        assert (v.grad is not None) == expect_grad
        assert model.head.mlp[0].weight.grad is not None and model.backbone.conv1.weight.grad is not None


def test_weight_norm_magnitude_is_frozen_at_one():
    torch.manual_seed(0)
    head = DINOHead(8, 5, hidden_dim=16, bottleneck_dim=4, norm_last_layer=True)
    names = dict(head.named_parameters())
    g = names["last_layer.parametrizations.weight.original0"]  # the reference's weight_g
    assert g.shape == (5, 1) and not g.requires_grad and torch.all(g == 1)
    assert all(p is not g for grp in get_param_groups(head) for p in grp["params"])  # not optimised
    opt = torch.optim.AdamW([p for grp in get_param_groups(head) for p in grp["params"]], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        head(torch.randn(4, 8)).sum().backward()
        opt.step()
    torch.testing.assert_close(torch.linalg.vector_norm(head.last_layer.weight, dim=1), torch.ones(5))
    free = DINOHead(8, 5, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    g_free = dict(free.named_parameters())["last_layer.parametrizations.weight.original0"]
    assert g_free.requires_grad and torch.all(g_free == 1)


def test_head_structure_and_init():
    torch.manual_seed(0)
    head = DINOHead(64, 10, hidden_dim=32, bottleneck_dim=8, nlayers=3, use_bn=True)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    assert head.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.2) and head.mlp[0].bias.abs().sum() == 0
    # the reference's trunc_normal_(std=.02) truncates at +-2 (absolute), i.e. 100 std: effectively not at all
    assert head.mlp[0].weight.abs().max() <= 2.0
    assert isinstance(DINOHead(64, 10, nlayers=1, bottleneck_dim=8).mlp, nn.Linear)
    out = head(torch.randn(4, 64))
    assert out.shape == (4, 10)
    # outputs are cosine similarities of an l2-normalised bottleneck with unit-norm rows: |out| <= 1
    assert out.abs().max() <= 1.0 + 1e-5


def test_param_groups_split_like_the_reference():
    model = _small_student(use_bn=True)
    groups = get_param_groups(model)
    by_wd = {g["apply_wd"]: g["params"] for g in groups}
    named = dict(model.named_parameters())
    no_wd = {id(p) for p in by_wd[False]}
    for name, p in named.items():
        if not p.requires_grad:
            assert all(id(p) != id(q) for g in groups for q in g["params"])
        elif name.endswith(".bias") or p.ndim == 1:
            assert id(p) in no_wd, name
        else:
            assert id(p) not in no_wd, name


# ---------------------------------------------------------------------------------------------- multi-crop wrapper
@pytest.mark.parametrize("arch,kwargs", [
    ("resnet18", {}),
    ("vit_tiny_patch16_224", {"img_size": 32, "dynamic_img_size": True}),
])
def test_multicrop_wrapper_equals_one_pass_per_view(arch, kwargs):
    torch.manual_seed(0)
    backbone = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=4, **kwargs)
    head = DINOHead(backbone.num_features, 12, hidden_dim=32, bottleneck_dim=8, use_bn=True)
    model = MultiCropWrapper(backbone, head).eval()  # eval: BatchNorm does not depend on the batch composition
    views = [torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32), torch.randn(2, 4, 16, 16),
             torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 32)]
    calls = []
    hook = backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    with torch.no_grad():
        out = model(views)
        hook.remove()
        separate = torch.cat([head(backbone(v)) for v in views])
    assert out.shape == (10, 12)
    torch.testing.assert_close(out, separate, rtol=1e-4, atol=1e-5)
    assert calls == [(4, 4, 32, 32), (4, 4, 16, 16), (2, 4, 16, 32)]  # one pass per run of equal (H, W)


def test_multicrop_wrapper_rejects_unpooled_backbones():
    backbone = nn.Conv2d(3, 8, 3)
    with pytest.raises(ValueError, match="num_classes=0"):
        MultiCropWrapper(backbone, nn.Identity())([torch.randn(1, 3, 8, 8)])


def test_one_training_step_with_ema_teacher():
    """Step 1-6 of the module docstring on a tiny model: finite loss, student moved, teacher moved by (1 - lambda)."""
    torch.manual_seed(0)
    cfg = DINOConfig(out_dim=16, hidden_dim=32, bottleneck_dim=8, use_bn_in_head=True)
    cfg.validate()
    student = _small_student(out_dim=cfg.out_dim, use_bn=cfg.use_bn_in_head)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    loss_fn = DINOLoss(cfg.out_dim, 4, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs, 2,
                       cfg.student_temp, cfg.center_momentum)
    opt = torch.optim.AdamW(get_param_groups(student), lr=1e-2)
    views = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 2
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    t = teacher(views[:2])
    loss = loss_fn(student(views), t, epoch=1)
    loss_fn.update_center(t)
    loss.backward()
    clip_gradients_per_parameter(student, 3.0)
    cancel_last_layer_gradients(1, student, cfg.freeze_last_layer)
    opt.step()
    lam = 0.9
    teacher_before = {k: v.clone() for k, v in teacher.named_parameters()}
    ema_update_(teacher, student, lam)
    assert torch.isfinite(loss)
    assert not torch.equal(before_s["head.mlp.0.weight"], student.state_dict()["head.mlp.0.weight"])
    for name, p_t in teacher.named_parameters():
        p_s = dict(student.named_parameters())[name]
        torch.testing.assert_close(p_t, lam * teacher_before[name] + (1 - lam) * p_s)


# ---------------------------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _teacher_outputs(rank: int) -> torch.Tensor:
    # unequal batches on purpose: 2 samples on rank 0, 3 on rank 1
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2 + rank, 5, generator=g)


def _center_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        loss_fn = DINOLoss(5, 3, 0.04, 0.04, 0, 1, center_momentum=0.9)
        loss_fn.update_center(_teacher_outputs(rank))
        torch.save({"center": loss_fn.center, "mean": batch_center(_teacher_outputs(rank))}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_center_is_all_reduced_over_two_processes(tmp_path):
    # fork where available: the children need not re-import torch and timm (seconds on a small CPU)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_center_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method=method)
    everything = torch.cat([_teacher_outputs(0), _teacher_outputs(1)])  # 5 samples
    expected = 0.1 * everything.mean(dim=0, keepdim=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["center"], expected)  # identical on both processes
        torch.testing.assert_close(got["mean"], everything.mean(dim=0, keepdim=True))
    # a single process (no process group): the plain local mean
    torch.testing.assert_close(batch_center(_teacher_outputs(0)), _teacher_outputs(0).mean(0, keepdim=True))
