"""Multi-node runs: two localhost "machines" of one process each equal a two-process single-node run.

Both "machines" are ``accelerate launch --num_machines 2 --machine_rank R --main_process_ip 127.0.0.1
--main_process_port P`` started concurrently on this CPU (gloo), writing into one run directory (the shared
filesystem of a real cluster). They are compared with ``launch(..., processes=2)`` (one machine, two processes) at
the same global batch: the global ranks, their data shards and seeds are the same, and an all-reduce over two ranks
is one commutative addition, so the weights are expected to be bit-identical and are compared with ``torch.equal``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, launch
from test_finetune import CONFIG as FINETUNE_CONFIG
from test_finetune import ft_overrides
from test_pretrain import CONFIG as PRETRAIN_CONFIG
from test_pretrain import tiny_overrides

pytestmark = pytest.mark.slow  # like the other multi-process tests


def free_port() -> int:
    """A TCP port free on localhost now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_machines(script: str, args: Sequence[str], machines: int = 2, timeout: int = 300) -> list[str]:
    """Run an entry point as ``machines`` localhost "machines" of one CPU process each (one ``accelerate launch`` per
    machine, started concurrently, as ``srun`` does on a cluster); returns each machine's stdout + stderr."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    port = free_port()
    with contextlib.ExitStack() as files:
        procs, outs = [], []
        for rank in range(machines):
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", str(machines),
                   "--num_processes", str(machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", script,
                   *args]
            outs.append(files.enter_context(tempfile.TemporaryFile("w+")))  # not a pipe: nobody reads meanwhile
            # own session: a machine stuck in the rendezvous is killed with its worker (our process group only)
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=outs[-1], stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
        # A machine that fails leaves the others waiting in the rendezvous: stop them then (and at the timeout),
        # killing each launcher's own process group (launcher + its worker), then report every machine's output.
        deadline = time.monotonic() + timeout
        while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
            if any(proc.poll() not in (None, 0) for proc in procs):
                break
            time.sleep(0.5)
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        logs = []
        for out in outs:
            out.seek(0)
            logs.append(out.read())
    failed = [(rank, proc.returncode) for rank, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        raise AssertionError(f"machines {failed} (rank, exit status; -9: stopped) failed:\n"
                             + "\n".join(f"--- machine {r}:\n{log[-4000:]}" for r, log in enumerate(logs)))
    return logs


def assert_same_run(single: Path, multi: Path, weights: Sequence[str]) -> dict:
    """The two run directories hold the same files and bit-identical weights; metrics.json equal except timings."""
    def files(run: Path) -> list[str]:
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "tb" not in p.parts)

    assert files(single) == files(multi)
    events = {run: list((run / "tb").rglob("events.out.tfevents.*")) for run in (single, multi)}
    assert len(events[multi]) == len(events[single])
    assert len({f.name.split(".")[-2] for f in events[multi]}) == 1  # .<host>.<pid>.<n>: one writer, the main process
    for name in weights:
        a, b = load_file(str(single / name)), load_file(str(multi / name))
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"
    rows = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (single, multi)}
    for row in (*rows[single], *rows[multi]):
        row.pop("train/steps_per_s", None)  # timing, not computation
    assert rows[single] == rows[multi]  # logged once (main process), same values
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (single, multi))
    for m in (ma, mb):
        m.pop("export", None)  # holds the run's own path
        m.pop("train_time_s")  # timings
        m["train"].pop("steps_per_s")
    assert ma == mb
    return mb


def test_pretrain_two_machines_equal_two_processes(tiny_demo, tmp_path):
    args = ["--config", PRETRAIN_CONFIG, *tiny_overrides(tiny_demo, steps=2), "data.batch_size=2", "probe.root=null"]
    launch("ssl/pretrain.py", [*args, "--output-dir", str(tmp_path / "single")], processes=2)
    logs = launch_machines("ssl/pretrain.py", [*args, "--output-dir", str(tmp_path / "multi")])
    final = assert_same_run(tmp_path / "single", tmp_path / "multi",
                            ["checkpoints/last.safetensors", "checkpoints/step_00000002/model.safetensors",
                             "backbone.safetensors"])
    assert final["num_processes"] == 2 and final["global_batch_size"] == 4  # data.batch_size is per process
    assert "DINO pretraining" in logs[0] and "DINO pretraining" not in logs[1]  # printed by the main process only


def test_finetune_two_machines_equal_two_processes(tiny_demo, tmp_path):
    args = ["--config", FINETUNE_CONFIG, *ft_overrides(tiny_demo, steps=2), "data.labelled_split=train_all"]
    launch("finetune/semisup.py", [*args, "--output-dir", str(tmp_path / "single")], processes=2)
    logs = launch_machines("finetune/semisup.py", [*args, "--output-dir", str(tmp_path / "multi")])
    final = assert_same_run(tmp_path / "single", tmp_path / "multi",
                            ["checkpoints/last.safetensors", "checkpoints/best.safetensors"])
    assert final["num_processes"] == 2 and final["global_batch_size"] == 4
    assert final["last"]["step"] == 2 and 0 <= final["last"]["mIoU"] <= 100  # evaluation over both machines' shards
    assert "validation mIoU" in logs[0] and "validation mIoU" not in logs[1]
