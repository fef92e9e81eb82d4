"""PS-MT (finetune/methods/psmt.py): Conf-CE by hand, T-VAT (norm eps, adversarial, BatchNorm untouched), the
alternating EMA teachers by hand, the averaged-logit target, CutMix of images and targets, the head split T-VAT
hooks into (head_stages), and end to end through ``accelerate launch`` (1 and 2 processes, resume)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, assert_same_last_weights, cut_back, launch
from safetensors.torch import load_file
from torch import nn

from finetune.config import SegModelConfig
from finetune.deeplab import create_segmenter
from finetune.inputs import build_model
from finetune.losses import build_segmentation_loss
from finetune.methods.base import SegSetup
from finetune.methods.common import cutmix_masks
from finetune.methods.psmt import (
    PSMT,
    PSMTConfig,
    _unit,
    conf_ce,
    cutmix_pair,
    ema_teacher_,
    ensemble_logits,
    head_stages,
    rampup,
    teacher_for_epoch,
    tvat_perturbation,
)

CONFIG = str(REPO / "configs" / "finetune" / "demo.yaml")
K = 4


def tiny_psmt(**cfg) -> PSMT:
    torch.manual_seed(0)
    model = create_segmenter("test_resnet", "v3+", K, 3, output_stride=16)
    return PSMT(PSMTConfig(**cfg), model, SegSetup(K, build_segmentation_loss("ce", K)))


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------- Conf-CE
def test_conf_ce_against_hand_computed_value():
    ln = math.log
    # 1 image, 2 classes, 3 pixels. Teacher softmax: p0 = (0.5, 0.5) (below 0.6: dropped), p1 = (0.8, 0.2)
    # (label 0, weight 0.8), p2 = (0.1, 0.9) (label 1, weight 0.9).
    teacher = torch.tensor([[0.0, ln(4.0), 0.0], [0.0, 0.0, ln(9.0)]]).view(1, 2, 1, 3)
    # Student softmax at p1 = (0.5, 0.5): CE(label 0) = ln 2; at p2 = (0.75, 0.25): CE(label 1) = ln 4.
    student = torch.tensor([[5.0, 0.0, ln(3.0)], [-5.0, 0.0, 0.0]]).view(1, 2, 1, 3).requires_grad_(True)
    loss, kept = conf_ce(student, teacher, 0.6)
    # (0.8 ln 2 + 0.9 ln 4) / 2 kept pixels = (0.5545177 + 1.2476649) / 2
    assert float(loss.detach()) == pytest.approx(0.9010913, abs=1e-6)
    assert float(kept) == pytest.approx(2 / 3)
    valid = torch.tensor([[[True, True, False]]])  # an invalid pixel is never pseudo-labelled
    assert float(conf_ce(student, teacher, 0.6, valid)[0].detach()) == pytest.approx(0.8 * ln(2.0), abs=1e-6)
    none, kept = conf_ce(student, teacher, 0.95)  # nothing passes: 0, not NaN, and a finite (zero) gradient
    none.backward()
    assert float(none.detach()) == 0.0 and float(kept) == 0.0 and torch.all(student.grad == 0)
    six = torch.randn(2, 6, 3, 3)  # any number of classes (the reference hard-codes 21)
    assert torch.isfinite(conf_ce(torch.randn(2, 6, 3, 3), six, 0.0)[0])


# ------------------------------------------------------------------------------------------------- T-VAT
def small_decoder(seed: int) -> nn.Sequential:
    """conv 3x3 -> BN -> ReLU -> conv 1x1 to 3 classes, BN with non-trivial running statistics."""
    torch.manual_seed(seed)
    dec = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 3, 1))
    dec[1].running_mean.uniform_(-0.2, 0.2)
    dec[1].running_var.uniform_(0.5, 2.0)
    dec.requires_grad_(False)
    return dec


def kl_per_sample(decoders, z, r) -> torch.Tensor:
    """KL(mean teacher(z) || mean teacher(z + r)) per sample, in float64 on eval-mode copies of the decoders."""
    decs = [copy.deepcopy(d).double().eval() for d in decoders]
    with torch.no_grad():
        p = F.softmax(sum(d(z.double()) for d in decs) / len(decs), 1)
        q = sum(d(z.double() + r.double()) for d in decs) / len(decs)
        return F.kl_div(F.log_softmax(q, 1), p, reduction="none").flatten(1).sum(1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tvat_has_norm_eps_and_beats_a_random_perturbation(dtype):
    decoders = [small_decoder(1), small_decoder(2)]
    for d in decoders:
        d.train()  # T-VAT must put them in eval mode itself (BatchNorm statistics frozen) and restore train mode
    before = [state(d) for d in decoders]
    torch.manual_seed(3)
    z = torch.randn(3, 8, 6, 6)
    for eps in (2.0, 0.5):
        g = torch.Generator().manual_seed(0)
        r = tvat_perturbation(z, decoders, xi=1e-6, eps=eps, iterations=1, generator=g, size=(12, 12), dtype=dtype)
        assert r.shape == z.shape and r.dtype == z.dtype
        assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((3,), eps), rtol=1e-5)  # per sample, exactly eps
        rnd = torch.rand(z.shape, generator=torch.Generator().manual_seed(7)) - 0.5
        rnd = eps * rnd / rnd.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        kl_adv, kl_rnd = kl_per_sample(decoders, z, r), kl_per_sample(decoders, z, rnd)
        assert torch.all(kl_adv > 2 * kl_rnd), (kl_adv, kl_rnd)
        assert torch.all(kl_rnd > kl_per_sample(decoders, z, torch.zeros_like(z)))
    for d, b in zip(decoders, before):  # running statistics untouched, modes restored, no gradient left behind
        assert all(torch.equal(v, b[k]) for k, v in d.state_dict().items())
        assert all(m.training for m in d.modules())
        assert all(p.grad is None for p in d.parameters())


def test_scale_safe_normalisation_keeps_tiny_gradients_unit_norm():
    tiny = torch.full((2, 5), 1e-30)
    tiny[1] = 0.0  # a zero gradient keeps the previous direction
    prev = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0]])
    unit = _unit(tiny, fallback=prev)
    assert torch.allclose(unit.norm(dim=1), torch.ones(2)) and torch.equal(unit[1], prev[1])
    # the reference's d / (||d|| + 1e-8) leaves such a gradient with a norm near 0 instead of 1
    assert float((tiny[0] / (tiny[0].norm() + 1e-8)).norm()) < 1e-20


def test_tvat_search_leaves_the_teachers_bn_statistics_and_the_method_state_unchanged():
    method = tiny_psmt()
    method.train()
    teachers_before = {k: v.clone() for k, v in method.state_dict().items() if k.startswith("teacher_")}
    batch = make_batch()
    out = method(batch, step=0)
    assert torch.isfinite(out["loss"]) and float(out["tvat_norm"]) == pytest.approx(2.0, rel=1e-5)
    out["loss"].backward()
    after = method.state_dict()
    for k, v in teachers_before.items():  # the teachers change only in after_optimizer_step
        assert torch.equal(after[k], v), k
    assert not method.teacher_a.training and not method.teacher_b.training and method.model.training
    assert all(p.grad is None for t in method.teachers for p in t.parameters())
    assert all(p.grad is not None for p in method.model.parameters() if p.requires_grad)


def make_batch(b: int = 2, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(1)
    x_l, x_u = torch.randn(b, 3, size, size, generator=g), torch.randn(b, 3, size, size, generator=g)
    ones = torch.ones(b, size, size, dtype=torch.bool)
    return {"labelled": {"image": x_l, "mask": torch.randint(0, K, (b, size, size), generator=g), "valid": ones},
            "unlabelled": {"image": x_u, "strong": (x_u + 0.1)[:, None], "valid": ones}}


# ------------------------------------------------------------------------------------------------- head split
@pytest.mark.parametrize("version", ["v3+", "v3", "v2"])
def test_head_stages_split_reproduces_the_logits(version):
    torch.manual_seed(0)
    model = create_segmenter("test_resnet", version, K, 3, output_stride=16).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x, return_features=True)
    for at in ("decoder", "classifier"):
        entry, rest = head_stages(model, at)
        seen: list[torch.Tensor] = []
        handle = entry.register_forward_pre_hook(lambda _m, args, _seen=seen: _seen.append(args[0]))
        with torch.no_grad():
            out = model(x)
        handle.remove()
        assert len(seen) == 1 and torch.equal(out.logits, ref.logits)
        with torch.no_grad():
            logits = F.interpolate(rest(seen[0]), size=(32, 32), mode="bilinear", align_corners=False)
        assert torch.allclose(logits, ref.logits, atol=1e-5)
        if at == "classifier" or version == "v2":
            assert torch.equal(seen[0], ref.decoder_input)
    if version == "v3+":  # the released perturbation point: ASPP (256) + low-level projection (48) channels
        assert seen_channels(model) == 304
    with pytest.raises(ValueError, match="perturbation point"):
        head_stages(model, "encoder")


def seen_channels(model) -> int:
    entry, _ = head_stages(model, "decoder")
    return entry[0][0].in_channels


# ------------------------------------------------------------------------------------------------- teachers
def test_ema_by_hand_averages_running_stats_and_copies_integer_buffers():
    teacher, student = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.fill_(1.0), student.weight.fill_(3.0)
        teacher.running_mean.fill_(0.0), student.running_mean.fill_(2.0)
    teacher.num_batches_tracked.fill_(5), student.num_batches_tracked.fill_(7)
    ema_teacher_(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, torch.full((2,), 1.2))  # 0.9 * 1 + 0.1 * 3
    assert torch.allclose(teacher.running_mean, torch.full((2,), 0.2))  # 0.9 * 0 + 0.1 * 2
    assert int(teacher.num_batches_tracked) == 7  # copied (the reference would store int(5.2) = 5)


def test_teachers_update_alternately_by_epoch_after_the_warm_up():
    assert [teacher_for_epoch(e) for e in range(5)] == [0, 1, 0, 1, 0]
    method = tiny_psmt(warmup_steps=1, ema_decay=0.5)
    name = "head.classifier.bias"
    method.model.state_dict()[name].copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    method.after_optimizer_step(0, 0)  # warm-up step: both teachers copy the student (warmup_ema_decay = 0)
    for t in method.teachers:
        assert all(torch.equal(v, method.model.state_dict()[k]) for k, v in t.state_dict().items())
    with torch.no_grad():
        method.model.head.classifier.bias += 2.0  # the student moves: (3, 4, 5, 6)
    a0, b0 = state(method.teacher_a), state(method.teacher_b)
    method.after_optimizer_step(1, 0)  # even epoch: teacher A only, 0.5 * (1, 2, 3, 4) + 0.5 * (3, 4, 5, 6)
    assert torch.allclose(method.teacher_a.state_dict()[name], torch.tensor([2.0, 3.0, 4.0, 5.0]))
    assert all(torch.equal(v, b0[k]) for k, v in method.teacher_b.state_dict().items())
    a1 = state(method.teacher_a)
    method.after_optimizer_step(2, 1)  # odd epoch: teacher B only
    assert torch.allclose(method.teacher_b.state_dict()[name], torch.tensor([2.0, 3.0, 4.0, 5.0]))
    assert all(torch.equal(v, a1[k]) for k, v in method.teacher_a.state_dict().items())
    assert not torch.equal(a0[name], a1[name])


def test_target_averages_the_teachers_logits():
    a, b = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1), torch.tensor([0.0, 4.0]).view(1, 2, 1, 1)
    assert ensemble_logits(a, b).flatten().tolist() == [1.0, 2.0]
    assert ensemble_logits(a, b, 0.25).flatten().tolist() == [0.5, 3.0]
    method = tiny_psmt()
    with torch.no_grad():
        method.teacher_b.head.classifier.bias += 1.5  # make the teachers differ
        x = torch.randn(2, 3, 32, 32)
        want = (method.teacher_a(x).logits + method.teacher_b(x).logits) / 2
    assert torch.allclose(method.teacher_target(x), want, atol=1e-6)


# ------------------------------------------------------------------------------------------------- CutMix
def test_cutmix_mixes_images_targets_and_valid_with_one_box():
    image = torch.stack([torch.zeros(2, 4, 4), torch.ones(2, 4, 4)])  # sample 0 all 0, sample 1 all 1
    target = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 7.0)])
    valid = torch.stack([torch.ones(4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)])
    box = torch.zeros(2, 4, 4, dtype=torch.bool)
    box[0, 1:3, 1:3] = True  # one box in sample 0 (from sample 1), none in sample 1
    xm, tm, vm = cutmix_pair(image, target, valid, box)
    want = torch.zeros(4, 4)
    want[1:3, 1:3] = 1.0
    assert torch.equal(xm[0], want.expand(2, 4, 4)) and torch.equal(xm[1], image[1])
    assert torch.equal(tm[0], (want * 8 - 1).expand(3, 4, 4)) and torch.equal(tm[1], target[1])
    assert torch.equal(vm[0], want == 0) and torch.equal(vm[1], valid[1])
    # the boxes the method draws (cutmix_prob = 1): one axis-aligned rectangle per sample
    masks = cutmix_masks(3, 16, 16, torch.Generator().manual_seed(0), p=1.0)
    for m in masks:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert m.sum() == len(rows) * len(cols) > 0 and m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()


def test_rampup_and_config_checks():
    assert rampup("cosine", 0, 10) == 0.0 and rampup("cosine", 5, 10) == pytest.approx(0.5)
    assert rampup("cosine", 10, 10) == 1.0 and rampup("linear", 3, 10) == pytest.approx(0.3)
    method = tiny_psmt(warmup_steps=2, rampup_fraction=0.5, unsup_weight=1.5)
    method.on_train_start(SimpleNamespace(total_steps=6))  # ramp over 0.5 * (6 - 2) = 2 steps after the warm-up
    assert [method.unsup_weight_at(s) for s in range(5)] == pytest.approx([0.0, 0.0, 0.0, 0.75, 1.5])
    with pytest.raises(Exception, match="warmup_steps"):
        method.on_train_start(SimpleNamespace(total_steps=2))
    for bad in ({"conf_threshold": 1.5}, {"tvat_eps": 0.0}, {"cutmix_area": (0.5, 0.2)}):
        with pytest.raises(ValueError):
            PSMTConfig(**bad).validate()


# ------------------------------------------------------------------------------------------------- end to end
def psmt_overrides(root: Path, steps: int = 4) -> list[str]:
    return [f"data.root={root / 's2' / 'source'}", "method=psmt", "model.arch=test_resnet", "data.batch_size=2",
            "data.unlabelled_batch_size=2",
            f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.eval_every=2",
            "trainer.checkpoint_every=2", "trainer.keep_checkpoints=3", "trainer.progress_bar=false",
            "optim.warmup_steps=1", "eval.batch_size=4", "data.stats_file=null", "psmt.warmup_steps=1"]


@pytest.fixture(scope="module")
def psmt_run(tiny_demo, tmp_path_factory) -> Path:
    """4 steps, 2 per epoch (14 unlabelled tiles in batches of 7): warm-up step 0, epoch 0 = steps 0-1 (teacher A),
    epoch 1 = steps 2-3 (teacher B)."""
    run = tmp_path_factory.mktemp("psmt") / "run"
    launch("finetune/semisup.py", ["--config", CONFIG, "--output-dir", str(run), *psmt_overrides(tiny_demo),
                                   "data.unlabelled_batch_size=7"])
    return run


def test_end_to_end_trains_both_teachers_and_exports_the_student(psmt_run):
    final = json.loads((psmt_run / "metrics.json").read_text())
    assert final["method"] == "psmt" and final["steps"] == 4 and final["epochs"] == 2.0
    rows = [json.loads(line) for line in (psmt_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "loss_sup", "loss_unsup", "unsup_weight", "mask_ratio", "tvat_norm"):
        assert all(np.isfinite(r[f"train/{key}"]) for r in train), key
    assert train[0]["train/unsup_weight"] == 0.0 and train[0]["train/tvat_norm"] == 0.0  # the warm-up step
    assert all(r["train/tvat_norm"] == pytest.approx(2.0, rel=1e-4) for r in train[1:])
    assert 0 <= final["last"]["mIoU"] <= 100
    # teacher A was updated at step 1 (epoch 0) only, teacher B at steps 2-3 (epoch 1) only
    mid = load_file(str(psmt_run / "checkpoints" / "step_00000002" / "model.safetensors"))
    last = load_file(str(psmt_run / "checkpoints" / "last.safetensors"))
    a = [k for k in last if k.startswith("teacher_a.") and last[k].is_floating_point()]
    assert a and all(torch.equal(mid[k], last[k]) for k in a)
    assert any(not torch.equal(mid[k.replace("teacher_a.", "teacher_b.")], last[k.replace("teacher_a.", "teacher_b.")])
               for k in a)
    assert any(not torch.equal(mid[k], mid[k.replace("teacher_a.", "teacher_b.")]) for k in a)
    # the evaluated student loads strictly into a fresh DeepLab
    card = json.loads((psmt_run / "model.json").read_text())
    prefix = card["state_dict_prefix"]
    fresh = build_model(SegModelConfig(arch="test_resnet", aspp_channels=card["aspp_channels"],
                                       decoder_channels=card["decoder_channels"]), 6, None, len(card["bands"]))
    fresh.load_state_dict({k[len(prefix):]: v for k, v in last.items() if k.startswith(prefix)}, strict=True)


def test_resume_mid_run_matches_uninterrupted(psmt_run, tiny_demo, tmp_path):
    cut = cut_back(psmt_run, tmp_path / "cut")
    res = launch("finetune/semisup.py", ["--config", CONFIG, "--output-dir", str(cut), "--resume",
                                         *psmt_overrides(tiny_demo), "data.unlabelled_batch_size=7"])
    assert "resumed from" in res.stdout + res.stderr
    a = assert_same_last_weights(psmt_run, cut)  # student and both teachers, bit for bit
    assert any(k.startswith("teacher_b.") for k in a)


@pytest.mark.slow
def test_two_processes(tiny_demo, tmp_path):
    run = tmp_path / "ddp"
    launch("finetune/semisup.py", ["--config", CONFIG, "--output-dir", str(run), *psmt_overrides(tiny_demo, steps=2),
                                   "data.labelled_split=train_all"], processes=2)
    final = json.loads((run / "metrics.json").read_text())
    assert final["num_processes"] == 2 and np.isfinite(final["train"]["loss"])
    assert final["train"]["tvat_norm"] == pytest.approx(2.0, rel=1e-4)
