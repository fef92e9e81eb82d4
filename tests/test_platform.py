"""The method platform through the real engine, with toy methods (tests/toy_methods.py): two streams of different
batch sizes, an EMA teacher outside DDP, an all-reduced bank, an epoch-start pass over a named dataset, manual
optimisation with two optimisers and their own schedules, exact resume, one process = two, fp16 GradScalers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import latest_checkpoint
from common.errors import UserInputError
from common.method import Method, MethodRegistry, TrainContext
from common.sampling import EpochSampler, weighted_epoch_indices
from toy_methods import TwoStreamToy, run
from toy_train import ToyData

REPO = Path(__file__).resolve().parents[1]


def _state(method: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def _assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("which", ["two_stream", "adversarial"])
def test_resume_is_bit_exact(tmp_path, which):
    straight, _, _ = run(which, str(tmp_path / "a"), max_steps=8)
    with pytest.raises(KeyboardInterrupt):
        run(which, str(tmp_path / "b"), max_steps=8, fail_at_step=5)  # checkpoint at step 4 exists
    resumed, final, _ = run(which, str(tmp_path / "b"), max_steps=8, resume=True)
    _assert_equal_states(_state(straight), _state(resumed))  # students, teacher, bank, discriminator
    assert final["steps"] == 8


def test_two_streams_teacher_outside_ddp_and_epoch_start_pass(tmp_path):
    method, final, engine = run("two_stream", str(tmp_path), max_steps=8, batch=4, batch2=6)
    assert method.trainable_modules().keys() == {"student"}
    assert final["train"]["unlabelled_batch"] == 6.0  # the second stream has its own batch size
    # 24 labelled tiles at batch 4: 6 steps per epoch -> epoch starts at steps 0 and 6: two passes over "probe"
    expected = ToyData(13, seed=3).x.mean(0)
    assert len(method.protos) == 2
    for proto in method.protos:
        torch.testing.assert_close(torch.tensor(proto), expected + 0 * expected, atol=2e-2, rtol=0)
    # the teacher is an EMA of the student: never trained, different from it, and in the checkpoint
    ckpt = latest_checkpoint(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))
    assert {"teacher.weight", "bank", "proto", "student.weight"} <= saved.keys()
    assert not torch.equal(saved["teacher.weight"], saved["student.weight"])


def test_adversarial_toy_two_optimisers_alternating(tmp_path):
    method, final, _ = run("adversarial", str(tmp_path), max_steps=6)
    # the discriminator never received a gradient from the generator's adversarial loss
    assert method.disc_grad_from_generator == [False] * 6
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "train/lr" in x]
    # generator: SGD lr 0.05, 2 warm-up steps then poly; discriminator: AdamW, constant 1e-3 (its own schedule)
    assert [r["train/lr_disc"] for r in rows] == [pytest.approx(1e-3)] * 6
    assert rows[0]["train/lr"] == 0.0 and rows[1]["train/lr"] == pytest.approx(0.05)
    assert rows[-1]["train/lr"] < rows[3]["train/lr"] < rows[2]["train/lr"] == pytest.approx(0.05)
    assert {"train/loss_seg", "train/loss_adv", "train/loss_d"} <= rows[-1].keys()
    opts = final["train"]
    assert np.isfinite([opts["loss_seg"], opts["loss_adv"], opts["loss_d"]]).all()


def test_fp16_grad_scalers_handle_two_optimisers(tmp_path):
    """fp16 runs have one GradScaler per optimiser: a real torch GradScaler on the CPU scales each backward by 2^16
    and unscales once before clipping; the update equals the unscaled run exactly (powers of two) and the scalers
    are checkpointed and resumed."""
    plain, _, _ = run("adversarial", str(tmp_path / "plain"), max_steps=6)
    scaled, _, engine = run("adversarial", str(tmp_path / "scaled"), max_steps=6, grad_scaler=True)
    assert set(engine._scalers) == {"main", "disc"}
    assert all(s.get_scale() == 65536.0 for s in engine._scalers.values())
    _assert_equal_states(_state(plain), _state(scaled))
    with pytest.raises(KeyboardInterrupt):
        run("adversarial", str(tmp_path / "cut"), max_steps=6, fail_at_step=3, grad_scaler=True)
    resumed, _, _ = run("adversarial", str(tmp_path / "cut"), max_steps=6, resume=True, grad_scaler=True)
    _assert_equal_states(_state(scaled), _state(resumed))


def test_gradient_accumulation_in_manual_mode(tmp_path):
    """Two micro-batches of 2 and 3 accumulate to one step of 4 and 6 (mean losses: equal up to rounding)."""
    whole, _, _ = run("adversarial", str(tmp_path / "whole"), max_steps=3, batch=4, batch2=6)
    accum, _, _ = run("adversarial", str(tmp_path / "accum"), max_steps=3, batch=2, batch2=3, grad_accum=2)
    a, b = _state(whole), _state(accum)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def _launch(tmp_path: Path, which: str, processes: int, batch: int, batch2: int) -> list[dict]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "0"]
    cmd += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    cmd += [str(REPO / "tests" / "toy_methods.py"), which, "--output-dir", str(tmp_path), "--max-steps", "6",
            "--batch", str(batch), "--batch2", str(batch2)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(processes)]


@pytest.mark.slow
def test_two_processes_equal_one_at_the_same_global_batch(tmp_path):
    """Banks are equal on both ranks after every step; the epoch-start prototype equals the one-process value; the
    weights of one process at batch 8 + 12 equal those of two processes at 4 + 6 (no BatchNorm, no dropout)."""
    two = _launch(tmp_path / "two", "two_stream", 2, 4, 6)
    one = _launch(tmp_path / "one", "two_stream", 1, 8, 12)[0]
    r0, r1 = two
    assert [h["bank"] for h in r0["history"]] == [h["bank"] for h in r1["history"]]
    assert len(r0["history"]) == 6 and r0["protos"] == r1["protos"]
    np.testing.assert_allclose(r0["protos"], one["protos"], atol=1e-6)
    for k in one["params"]:
        np.testing.assert_allclose(np.array(r0["params"][k]), np.array(one["params"][k]), atol=1e-5, rtol=1e-5,
                                   err_msg=k)
        assert r0["params"][k] == r1["params"][k], k
    adv = _launch(tmp_path / "adv", "adversarial", 2, 4, 6)
    assert adv[0]["params"] == adv[1]["params"]
    assert not any(adv[0]["disc_grad_from_generator"])


def test_registry_names_the_valid_methods():
    reg = MethodRegistry()

    class A(Method):
        name = "alpha"

    reg.register(A)
    assert reg.get("alpha") is A and reg.names() == ("alpha",)
    with pytest.raises(UserInputError, match="method='beta'.*valid: alpha"):
        reg.get("beta")


def test_class_aware_sampling_is_a_pure_function_of_the_epoch():
    w = np.array([1.0, 0.0, 3.0, 0.0])
    a = weighted_epoch_indices(w, seed=5, epoch=2, length=4000)
    assert a == weighted_epoch_indices(w, seed=5, epoch=2, length=4000)
    counts = np.bincount(a, minlength=4)
    assert counts[1] == counts[3] == 0 and abs(counts[2] / counts[0] - 3.0) < 0.3
    sampler = EpochSampler(4, seed=5, weights_fn=lambda epoch: w if epoch == 1 else None)
    assert sorted(sampler) == [0, 1, 2, 3]  # epoch 0: a permutation
    sampler.set_epoch(1)
    assert set(sampler) <= {0, 2}
    with pytest.raises(ValueError, match="sampling weights"):
        weighted_epoch_indices(np.zeros(3), 0, 0)


def test_method_forward_outside_the_engine():
    torch.manual_seed(0)
    m = TwoStreamToy()
    batch = {"labelled": {"x": torch.randn(3, 4), "y": torch.randn(3)}, "unlabelled": {"x": torch.randn(5, 4)}}
    out = m(batch)
    assert out["loss"].requires_grad and out["unlabelled_batch"] == 5



@pytest.mark.slow
def test_unimatch_with_an_aux_head_in_two_processes(tiny_demo, tmp_path):
    """UniMatch's perturbed and strong streams call the model without its auxiliary head and several forwards share
    one backward; the labelled forward uses the aux head, so every parameter gets a gradient each step and DDP runs
    without find_unused_parameters (which refuses several forwards per backward)."""
    from conftest import launch

    run = tmp_path / "run"
    launch("finetune/semisup.py", ["--config", str(REPO / "configs" / "finetune" / "demo.yaml"), "--output-dir",
                                   str(run), f"data.root={tiny_demo / 's2' / 'source'}", "method=unimatch",
                                   "model.aux=true", "model.arch=test_resnet", "data.batch_size=2",
                                   "data.unlabelled_batch_size=2",
                                   "data.labelled_split=train_all", "trainer.max_steps=2", "trainer.eval_every=2",
                                   "trainer.progress_bar=false"], processes=2)
    assert json.loads((run / "metrics.json").read_text())["num_processes"] == 2


def test_a_method_without_a_training_step_or_optimiser_is_refused():
    from common.method import OptimizerSpec, check_method

    class Empty(Method):
        name = "empty"

    with pytest.raises(TypeError, match="training_step"):
        check_method(Empty())
    with pytest.raises(TypeError, match="optimizers\\(\\) or param_groups\\(\\)"):
        Empty().optimizers()

    class WithGroups(Empty):
        def param_groups(self):
            return [{"params": []}]

    assert isinstance(WithGroups().optimizers()["main"], OptimizerSpec)


def test_a_methods_notes_print_once_per_run_not_once_per_node(capsys):
    """``TrainContext.print`` prints on the global main process only (``Accelerator.print`` would print once per
    node of a multi-node run), through the engine when there is one."""
    from types import SimpleNamespace

    def ctx(main: bool, engine=None) -> TrainContext:
        return TrainContext(SimpleNamespace(is_main_process=main), 1, 1, 1, 2, 2, torch.device("cpu"), Path("."),
                            _engine=engine)

    ctx(False).print("rank 1 of node 2")
    ctx(True).print("rank 0")
    said = []
    ctx(False, SimpleNamespace(print=lambda *a: said.append(a))).print("via", "engine")
    assert capsys.readouterr().out == "rank 0\n" and said == [("via", "engine")]
