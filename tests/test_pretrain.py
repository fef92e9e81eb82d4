"""End to end: DINO pretraining through `accelerate launch` (1 and 2 processes), resume, export, timm loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import REPO, assert_same_last_weights, cut_back, launch

CONFIG = str(REPO / "configs" / "pretrain" / "demo.yaml")


def tiny_overrides(root: Path, steps: int = 4) -> list[str]:
    return [
        f"data.root={root}", "data.batch_size=4", "model.arch=resnet10t",
        "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16",
        "augment.global_size=32", "augment.local_size=16", "augment.local_number=2",
        f"trainer.max_steps={steps}", "trainer.epochs=null", "trainer.log_every=1", "trainer.eval_every=2",
        "trainer.checkpoint_every=2", "trainer.keep_checkpoints=3", "trainer.progress_bar=false",
        "optim.warmup_epochs=0", "optim.warmup_steps=1",
        f"probe.root={root / 's2' / 'source'}", "probe.k=3",
    ]


@pytest.fixture(scope="module")
def pretrain_run(tiny_demo, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pretrain") / "run"
    launch("ssl/pretrain.py", ["--config", CONFIG, "--output-dir", str(run), *tiny_overrides(tiny_demo)])
    return run


def test_run_directory_contract(pretrain_run):
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "backbone.safetensors", "backbone.json"):
        assert (pretrain_run / name).is_file(), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((pretrain_run / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "train/crops" in events.Tags()["images"]  # the multi-crop views in false colour
    assert {"train/loss", "train/teacher_entropy", "val/knn_top1"} <= set(events.Tags()["scalars"])
    rows = [json.loads(line) for line in (pretrain_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "teacher_entropy", "teacher_student_kl", "lr", "wd", "momentum", "teacher_temp"):
        assert all(np.isfinite(r[f"train/{key}"]) for r in train), key
    # momentum follows the reference cosine schedule 0.99 -> 1 over 4 steps (demo config: momentum_teacher 0.99):
    # m_i = 1 - 0.01 (1 + cos(pi i / 4)) / 2, logged after step i + 1 (the last stays below 1, as the reference)
    assert train[0]["train/momentum"] == pytest.approx(0.99)
    assert train[1]["train/momentum"] == pytest.approx(1.0 - 0.005 * (1 + 0.5 ** 0.5))
    assert train[-1]["train/momentum"] == pytest.approx(1.0 - 0.005 * (1 - 0.5 ** 0.5))
    probes = [r for r in rows if "val/knn_top1" in r]
    assert [r["step"] for r in probes] == [2, 4] and all(0 <= r["val/knn_top1"] <= 100 for r in probes)
    final = json.loads((pretrain_run / "metrics.json").read_text())
    assert final["steps"] == 4 and final["export"]["weights"].endswith("backbone.safetensors")


def test_export_is_the_teacher_backbone_and_loads_in_timm_strictly(pretrain_run):
    meta = json.loads((pretrain_run / "backbone.json").read_text())
    assert meta["architecture"] == "resnet10t" and meta["in_chans"] == 12 and len(meta["bands"]) == 12
    assert meta["normalisation"]["conversion"] == "dn_to_reflectance" and len(meta["normalisation"]["mean"]) == 12
    assert meta["source"]["dino"]["out_dim"] == 64 and meta["source"]["step"] == 4 and len(meta["sha256"]) == 64
    weights = pretrain_run / "backbone.safetensors"
    exported = load_file(str(weights))
    run_state = load_file(str(pretrain_run / "checkpoints" / "last.safetensors"))
    teacher = {k[len("teacher.backbone."):]: v for k, v in run_state.items() if k.startswith("teacher.backbone.")}
    assert exported.keys() == teacher.keys() and all(torch.equal(exported[k], teacher[k]) for k in teacher)
    assert not any("head" in k or "last_layer" in k for k in exported)

    # one call with timm, strict (timm's load_checkpoint is strict by default)
    model = timm.create_model("resnet10t", in_chans=12, num_classes=0, checkpoint_path=str(weights))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())
    model2 = timm.create_model("resnet10t", in_chans=12, num_classes=0, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(weights), first_conv=None))
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in exported.items())
    missing, unexpected = timm.create_model("resnet10t", in_chans=12, num_classes=0).load_state_dict(exported)
    assert not missing and not unexpected


def test_export_cli_and_checksum(pretrain_run, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "exp.safetensors"
    res = subprocess.run([sys.executable, "ssl/export.py", "--run", str(pretrain_run), "--out", str(out),
                          "--checkpoint", "latest"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "load with: timm.create_model('resnet10t'" in res.stdout
    from common.weights import read_export

    state, meta = read_export(out)
    assert meta.source["step"] == 4
    out.write_bytes(out.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match="checksum"):
        read_export(out)


def test_resume_mid_run_matches_uninterrupted(pretrain_run, tmp_path):
    """Cut the finished run back to its step-2 checkpoint, resume: the teacher export must be identical."""
    cut = cut_back(pretrain_run, tmp_path / "cut", drop=("backbone.safetensors", "backbone.json"))
    res = launch("ssl/pretrain.py", ["--config", CONFIG, "--output-dir", str(cut), "--resume",
                                     *tiny_overrides(Path(json.loads((pretrain_run / "backbone.json").read_text())
                                                          ["source"]["data"]["root"]))])
    assert "resumed from" in res.stdout + res.stderr
    a = assert_same_last_weights(pretrain_run, cut)  # student, teacher, head and the DINO center
    assert "loss_fn.center" in a and a["loss_fn.center"].abs().sum() > 0


@pytest.mark.slow
def test_two_processes(tiny_demo, tmp_path):
    run = tmp_path / "ddp"
    launch("ssl/pretrain.py", ["--config", CONFIG, "--output-dir", str(run), *tiny_overrides(tiny_demo, steps=2),
                               "data.batch_size=2"], processes=2)
    final = json.loads((run / "metrics.json").read_text())
    assert final["num_processes"] == 2 and final["global_batch_size"] == 4
    assert (run / "backbone.safetensors").is_file()


def test_bad_config_fails_before_work(tiny_demo, tmp_path, capsys):
    from eo_ssl.pretrain import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", CONFIG, "--output-dir", str(tmp_path / "x"), "dino.out_dimm=5"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unknown key 'dino.out_dimm'" in err and "out_dim" in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exc:
        main(["--config", CONFIG, "--output-dir", str(tmp_path / "y"), f"data.root={tmp_path / 'nothing'}"])
    assert exc.value.code == 2 and "nothing" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_exclude_ids_from_leaves_validation_tiles_out(tiny_demo, tmp_path):
    from common.bands import resolve_sensor
    from common.config import load_config
    from eo_ssl.pretrain import PretrainConfig, build_dataset

    val = tiny_demo / "s2" / "source" / "splits" / "val.txt"
    base = [f"data.root={tiny_demo}", "data.glob=s2/source/images/*.tif"]
    spec = resolve_sensor("S2L2A")
    every = build_dataset(load_config(PretrainConfig, CONFIG, base), spec)
    kept = build_dataset(load_config(PretrainConfig, CONFIG, base + [f"data.exclude_ids_from=[{val}]"]), spec)
    val_ids = set(val.read_text().split())
    assert len(every) - len(kept) == len(val_ids) > 0
    assert not val_ids & {kept.base[i]["id"] for i in range(len(kept))}
    with pytest.raises(FileNotFoundError, match="exclude_ids_from"):
        build_dataset(load_config(PretrainConfig, CONFIG, base + [f"data.exclude_ids_from=[{tmp_path / 'no.txt'}]"]),
                      spec)
