"""Mean teacher (finetune/methods/mean_teacher.py): the EMA step, the ramp-up, the thresholded consistency on
hand-made tensors; training through ``accelerate launch`` (one and two processes), the teacher as the exported
network, and an exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from common.errors import UserInputError
from conftest import REPO, assert_same_last_weights, cut_back, launch
from finetune.deeplab import SegmenterOutput
from finetune.methods.base import SegSetup
from finetune.methods.mean_teacher import MeanTeacher, MeanTeacherConfig, consistency_loss, ema_decay_at

torch.set_num_threads(1)
CONFIG = str(REPO / "configs" / "finetune" / "demo.yaml")


class _Pixelwise(nn.Module):
    """A 1x1-conv 'segmenter' (2 bands -> 2 classes) with a BatchNorm, returning a SegmenterOutput."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor, return_aux: bool | None = None) -> SegmenterOutput:
        return SegmenterOutput(self.bn(self.conv(x)))


def _method(**cfg) -> MeanTeacher:
    setup = SegSetup(2, nn.CrossEntropyLoss(ignore_index=255))
    return MeanTeacher(MeanTeacherConfig(**cfg), _Pixelwise(), setup)


# ---------------------------------------------------------------------------------------------- hand-made tensors
def test_ema_step_by_hand_and_bn_buffers():
    m = _method(ema_decay=0.99)
    with torch.no_grad():
        m.model.conv.weight.fill_(3.0)
        m.teacher.conv.weight.fill_(1.0)
        m.model.bn.running_mean.fill_(7.0)
    assert not any(p.requires_grad for p in m.teacher.parameters())
    m.after_optimizer_step(step=0, epoch=0)  # warm-up: decay min(1 - 1/2, 0.99) = 0.5 -> 0.5 * 1 + 0.5 * 3
    assert torch.equal(m.teacher.conv.weight, torch.full_like(m.teacher.conv.weight, 2.0))
    assert torch.equal(m.teacher.bn.running_mean, torch.full((2,), 7.0))  # teacher_bn=copy: the student's buffers
    m.after_optimizer_step(step=10, epoch=0)  # decay min(1 - 1/12, 0.99) = 11/12: 11/12 * 2 + 1/12 * 3
    assert torch.allclose(m.teacher.conv.weight, torch.full_like(m.teacher.conv.weight, 2.0 + 1.0 / 12))
    assert ema_decay_at(10, 0.99, warmup=True) == pytest.approx(11 / 12)
    assert ema_decay_at(1000, 0.99, warmup=True) == 0.99 and ema_decay_at(0, 0.99, warmup=False) == 0.99

    own = _method(ema_decay=0.99, ema_warmup=False, teacher_bn="own")
    with torch.no_grad():
        own.model.conv.bias.fill_(1.0)
        own.teacher.conv.bias.fill_(0.0)
        own.model.bn.running_mean.fill_(7.0)
    own.after_optimizer_step(step=0, epoch=0)  # 0.99 * 0 + 0.01 * 1; the teacher keeps its own statistics
    assert torch.allclose(own.teacher.conv.bias, torch.full((2,), 0.01))
    assert torch.equal(own.teacher.bn.running_mean, torch.zeros(2))


def test_thresholded_consistency_by_hand():
    # 1 image, 2 classes, 1 x 3 pixels; teacher confidences softmax([2, 0]) = 0.881, softmax([0, 4]) = 0.982,
    # softmax([5, 0]) = 0.993 (but the third pixel is invalid: never pseudo-labelled)
    teacher = torch.tensor([[2.0, 0.0, 5.0], [0.0, 4.0, 0.0]]).view(1, 2, 1, 3)
    student = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]).view(1, 2, 1, 3)
    valid = torch.tensor([[[True, True, False]]])
    loss, keep = consistency_loss(student, teacher, valid, threshold=0.9, kind="ce", denominator="valid")
    assert keep.tolist() == [[[False, True, False]]]
    ce_pixel2 = math.log(1 + math.e)  # student [1, 0], label 1: -log(1 / (e + 1))
    assert loss.item() == pytest.approx(ce_pixel2 / 2)  # two valid pixels
    loss, _ = consistency_loss(student, teacher, valid, threshold=0.9, kind="ce", denominator="kept")
    assert loss.item() == pytest.approx(ce_pixel2)
    loss, keep = consistency_loss(student, teacher, valid, threshold=0.0, kind="mse", denominator="valid")
    assert keep.tolist() == [[[True, True, False]]]
    p_s = [torch.tensor([0.0, 0.0]).softmax(0), torch.tensor([1.0, 0.0]).softmax(0)]
    p_t = [torch.tensor([2.0, 0.0]).softmax(0), torch.tensor([0.0, 4.0]).softmax(0)]
    expected = sum(float(((s - t) ** 2).sum()) for s, t in zip(p_s, p_t)) / 2
    assert loss.item() == pytest.approx(expected)


def test_training_step_rampup_teacher_and_eval_prefix():
    torch.manual_seed(0)
    m = _method(consistency_weight=2.0, rampup_steps=10, threshold=0.0).train()
    batch = {"labelled": {"image": torch.randn(2, 2, 4, 4), "mask": torch.randint(0, 2, (2, 4, 4))},
             "unlabelled": {"image": torch.randn(3, 2, 4, 4), "strong": torch.randn(3, 1, 2, 4, 4),
                            "valid": torch.ones(3, 4, 4, dtype=torch.bool)}}
    out = m(batch, step=5)
    assert out["cons_weight"].item() == pytest.approx(2.0 * math.exp(-5 * 0.5 ** 2))  # exp(-5 (1 - 5/10)^2)
    assert m(batch, step=10)["cons_weight"].item() == pytest.approx(2.0)
    assert out["mask_ratio"].item() == 1.0 and torch.isfinite(out["loss_cons"])
    out["loss"].backward()
    assert m.model.conv.weight.grad is not None and m.teacher.conv.weight.grad is None
    assert not m.teacher.training  # teacher_bn=copy: pseudo-labels from the running statistics
    assert m.eval_prefix == "teacher." and m.eval_model is m.teacher
    student = _method(eval_model="student")
    assert student.eval_prefix == "model." and student.eval_model is student.model
    with pytest.raises(ValueError, match="ema_decay"):
        MeanTeacherConfig(ema_decay=1.5).validate()


def test_rampup_longer_than_the_run_is_refused():
    class Ctx:
        total_steps = 4

    with pytest.raises(UserInputError, match="rampup_steps=5"):
        _method(rampup_steps=5).on_train_start(Ctx())


# ---------------------------------------------------------------------------------------------- end to end
def _overrides(root: Path, steps: int = 4, labelled: str = "labelled_1_8") -> list[str]:
    return [f"data.root={root / 's2' / 'source'}", "method=mean_teacher", "data.batch_size=2",
            "data.unlabelled_batch_size=2",
            f"data.labelled_split={labelled}", "model.arch=test_resnet", f"trainer.max_steps={steps}",
            "trainer.log_every=1", "trainer.eval_every=2", "trainer.checkpoint_every=2",
            "trainer.progress_bar=false", "optim.warmup_steps=1", "eval.batch_size=4",
            "mean_teacher.rampup_steps=2", "mean_teacher.threshold=0.5"]


@pytest.fixture(scope="module")
def mt_run(tiny_demo, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("mt") / "run"
    launch("finetune/semisup.py", ["--config", CONFIG, "--output-dir", str(run), *_overrides(tiny_demo)])
    return run


def test_trains_and_exports_the_teacher(mt_run):
    from finetune.predict import load_run_model

    final = json.loads((mt_run / "metrics.json").read_text())
    assert final["method"] == "mean_teacher" and final["steps"] == 4 and final["last"]["step"] == 4
    for key in ("loss", "loss_sup", "loss_cons", "mask_ratio", "cons_weight"):
        assert math.isfinite(final["train"][key]), key
    assert final["train"]["cons_weight"] == 1.0  # ramp-up of 2 steps done
    assert 0 <= final["last"]["mIoU"] <= 100
    card = json.loads((mt_run / "model.json").read_text())
    assert card["method"] == "mean_teacher" and card["state_dict_prefix"] == "teacher."
    state = load_file(str(mt_run / "checkpoints" / "last.safetensors"))
    run = load_run_model(mt_run, "last")  # a fresh DeepLab from model.json, loaded strictly
    for key, value in run.net.state_dict().items():
        assert torch.equal(value, state["teacher." + key]), key
    moved = [k for k in state if k.startswith("model.") and state[k].is_floating_point()
             and not torch.equal(state[k], state["teacher." + k[len("model."):]])]
    assert moved  # the teacher is an average, not the student


def test_resume_mid_run_matches_uninterrupted(mt_run, tiny_demo, tmp_path):
    cut = cut_back(mt_run, tmp_path / "cut")
    res = launch("finetune/semisup.py", ["--config", CONFIG, "--output-dir", str(cut), "--resume",
                                         *_overrides(tiny_demo)])
    assert "resumed from" in res.stdout + res.stderr
    a = assert_same_last_weights(mt_run, cut)  # student and teacher
    assert any(k.startswith("teacher.") for k in a)


@pytest.mark.slow
def test_two_processes(tiny_demo, tmp_path):
    run = tmp_path / "ddp"
    launch("finetune/semisup.py", ["--config", CONFIG, "--output-dir", str(run),
                                   *_overrides(tiny_demo, steps=2, labelled="train_all")], processes=2)
    final = json.loads((run / "metrics.json").read_text())
    assert final["num_processes"] == 2 and final["global_batch_size"] == 4
    assert all(math.isfinite(final["train"][k]) for k in ("loss", "loss_sup", "loss_cons"))
    assert json.loads((run / "model.json").read_text())["state_dict_prefix"] == "teacher."
