"""Files the project writes get the mode ``open()`` gives a new file, ``0666 & ~umask``, whatever library writes
them (safetensors alone creates 0600): exports, weight checkpoints, JSON sidecars, model cards."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from common.checkpoint import (
    apply_default_modes,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    default_file_mode,
)
from common.weights import ExportMeta, Normalisation, write_export
from finetune.config import SegDataConfig, SegModelConfig
from finetune.inputs import resolve_inputs
from finetune.model_card import write_model_card


@pytest.fixture(params=[0o027, 0o002, 0o022])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_written_file_gets_0666_masked_by_the_umask(tmp_path, umask):
    want = 0o666 & ~umask
    assert default_file_mode() == want
    assert os.umask(umask) == umask  # reading the mode left the umask alone
    weights, sidecar = write_export(
        {"w": torch.zeros(2, 3)},
        ExportMeta("resnet10t", 2, ["VV", "VH"], "S1", Normalisation("db", [0.0, 0.0], [1.0, 1.0]), 4),
        tmp_path / "export" / "backbone.safetensors")
    atomic_save_safetensors({"x": torch.ones(3)}, tmp_path / "checkpoints" / "last.safetensors")
    atomic_write_json(tmp_path / "metrics.json", {"a": 1})
    atomic_write_text(tmp_path / "notes.txt", "x")
    data, model = SegDataConfig(num_classes=2, sensor="S1"), SegModelConfig(arch="resnet10t")
    write_model_card(tmp_path, model, data, resolve_inputs(data, model), "supervised", "model.")
    files = [weights, sidecar, tmp_path / "checkpoints" / "last.safetensors", tmp_path / "metrics.json",
             tmp_path / "notes.txt", tmp_path / "model.json"]
    assert {f.name: oct(_mode(f)) for f in files} == {f.name: oct(want) for f in files}


def test_a_stale_temp_file_does_not_pass_its_mode_on(tmp_path, umask):
    target = tmp_path / "metrics.json"
    stale = tmp_path / f".metrics.json.tmp{os.getpid()}"  # left behind by a crashed writer, 0600
    stale.write_text("{")
    stale.chmod(0o600)
    atomic_write_json(target, {"a": 1})
    assert _mode(target) == 0o666 & ~umask


def test_a_checkpoint_directory_written_by_another_library_is_given_the_default_mode(tmp_path, umask):
    step = tmp_path / "step_00000010"
    (step / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "sub/optimizer.bin"):
        (step / name).write_bytes(b"x")
        (step / name).chmod(0o600)
    apply_default_modes(step)
    assert {_mode(step / n) for n in ("model.safetensors", "sub/optimizer.bin")} == {0o666 & ~umask}
