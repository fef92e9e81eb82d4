"""The training engine: exact resume, atomic checkpoints, the finite-loss guard, precision fallback, 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.checkpoint import latest_checkpoint, list_checkpoints
from common.engine import (
    NonFiniteLossError,
    RunDirError,
    clip_gradients,
    clip_gradients_per_parameter,
    compile_in_place,
    resolve_mixed_precision,
)
from toy_train import run

REPO = Path(__file__).resolve().parents[1]


def _params(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_resume_is_bit_exact(tmp_path):
    straight, final = run(str(tmp_path / "a"), max_steps=8)
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "b"), max_steps=8, fail_at_step=5)  # crashes during step 5 (0-based); ckpt at 4 exists
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [4]
    resumed, final_b = run(str(tmp_path / "b"), max_steps=8, resume=True)
    assert torch.equal(_params(straight), _params(resumed))  # student, teacher and buffers all equal
    assert int(resumed.ema_steps) == 8
    assert final["steps"] == final_b["steps"] == 8
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [2, 4, 6, 8]
    assert (tmp_path / "a" / "metrics.json").is_file() and (tmp_path / "a" / "config.yaml").is_file()
    assert any((tmp_path / "a" / "tb").rglob("events.out.tfevents*"))


def test_resume_with_accumulation_and_per_parameter_clipping(tmp_path):
    a, _ = run(str(tmp_path / "a"), max_steps=6, grad_accum=2, checkpoint_every=3, clip_mode="per_parameter")
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "b"), max_steps=6, grad_accum=2, checkpoint_every=3, fail_at_step=4,
            clip_mode="per_parameter")
    b, _ = run(str(tmp_path / "b"), max_steps=6, grad_accum=2, checkpoint_every=3, resume=True,
               clip_mode="per_parameter")
    assert torch.equal(_params(a), _params(b))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        run(str(tmp_path), max_steps=12, nan_at_step=5, checkpoint_every=4)
    ckpts = list_checkpoints(tmp_path)
    assert [s for s, _ in ckpts] == [4]
    # The surviving checkpoint is complete and loadable.
    state = json.loads((latest_checkpoint(tmp_path) / "engine_state.json").read_text())
    assert state["step"] == 4
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(RunDirError, match="no checkpoint"):
        run(str(tmp_path), resume=True)


def test_rerunning_into_a_run_directory_is_refused_without_overwrite(tmp_path):
    """A second run into a directory holding a run used to retrain silently (duplicate steps in metrics.jsonl)."""
    run(str(tmp_path), max_steps=4)
    with pytest.raises(RunDirError, match="already holds a run.*--resume.*--overwrite"):
        run(str(tmp_path), max_steps=4)
    run(str(tmp_path), max_steps=4, overwrite=True)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(4) == 2 and steps.count(2) == 1  # one train log at 2 and at 4 (+ the evaluation at 4)


def test_mixed_precision_falls_back_on_cpu():
    assert resolve_mixed_precision("fp16", cuda=False) == "no"
    assert resolve_mixed_precision("auto", cuda=False) == "no"
    assert resolve_mixed_precision("bf16", cuda=False) == "bf16"
    assert resolve_mixed_precision("no", cuda=True) == "no"


@pytest.mark.parametrize("mode", ["global_norm", "per_parameter"])
def test_clipping_unscales_fp16_gradients_once(mode):
    """fp16 runs (CUDA only) have a GradScaler per optimiser that refuses a second unscale_ before the step; the engine
    must unscale once in both clip modes. A real torch GradScaler on the CPU."""

    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale((p * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum()).backward()  # grads 8x [1, 2, 3, 4]

    clip_gradients(scaler, opt, [p], 1.0, mode)  # raised "unscale_() has already been called" before the fix
    expected = torch.tensor([1.0, 2.0, 3.0, 4.0]) / 30**0.5  # unscaled, then norm 1 (one parameter: same result)
    torch.testing.assert_close(p.grad, expected)


def test_compiling_keeps_checkpoint_keys():
    """trainer.compile must not rename state_dict keys (torch.compile(module) would add '_orig_mod.'), or compiled
    runs could not resume eager checkpoints nor be exported. Compilation itself is lazy: nothing runs here."""

    class Method(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
            self.teacher = torch.nn.Linear(4, 2)

    m = Method()
    keys = list(m.state_dict())
    compile_in_place(m, ("student", "teacher"))
    assert list(m.state_dict()) == keys and type(m.student) is torch.nn.Sequential
    wrapped = Method()
    wrapped.student = torch.compile(wrapped.student)
    assert any(k.startswith("student._orig_mod.") for k in wrapped.state_dict())  # what the engine avoids
    with pytest.raises(ValueError, match="'head'"):
        compile_in_place(m, ("head",))


def test_per_parameter_clipping_hand_values():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    a.grad = torch.tensor([3.0, 4.0])  # norm 5 -> scaled to norm 1
    b.grad = torch.tensor([0.5])  # norm 0.5 -> untouched
    norms = clip_gradients_per_parameter([a, b], 1.0)
    assert norms.tolist() == pytest.approx([5.0, 0.5])
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.8]), atol=1e-6)
    assert torch.equal(b.grad, torch.tensor([0.5]))


@pytest.mark.slow
def test_two_gloo_processes(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO / "tests" / "toy_train.py"), "--output-dir", str(tmp_path), "--max-steps", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert r0["w"] == r1["w"]  # gradients were all-reduced: both replicas took identical steps
    final = json.loads((tmp_path / "metrics.json").read_text())
    assert final["num_processes"] == 2 and final["global_batch_size"] == 8
