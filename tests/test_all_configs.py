"""Every shipped config runs: each file in ``configs/`` (found by globbing, so a new config is covered without
editing this test) trains on tiny generated data with a tiny backbone, in one process (``main(argv)`` in this
process) and in two processes (``accelerate launch --multi_gpu --num_processes 2`` on the CPU, ``-m slow``; CI runs
it from ``.ci/run``).

What a config is given: its data paths moved onto tiny data (the shipped ``data.root`` replaced by a generated
dataset of the same layout; other paths must follow through ``${data.root}``, else they are moved one by one), a
tiny backbone (``resnet10t``; ``test_vit`` for ViTs), 32 / 16 px crops and lengths short enough to run in seconds but
long enough to cross every phase boundary the config has: two epochs of at least two steps for pretraining (last-layer
freeze, lr warm-up and teacher-temperature warm-up all end after epoch 0), evaluation and checkpoints every 2 steps.
Everything else (optimiser, schedules, augmentations, head options, losses, layouts) is the config's own: a config
that cannot run fails here.

Tiny data: the demo dataset (``common.demo_data``, the session's ``tiny_demo``, copied) for the demo and SpaceNet-6
SAR configs, generated BigEarthNet-S2 / -S1 patch folders (one GeoTIFF per band at 10 / 20 / 60 m, S1 patches
paired through their ``corresponding_s2_patch`` metadata) for the BigEarthNet configs, and a backbone export for
fine-tuning configs that start from one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.config import config_to_dict, load_config
from conftest import REPO, launch, write_s2_export, write_tif

PRETRAIN = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
FINETUNE = sorted((REPO / "configs" / "finetune").glob("*.yaml"))
CONFIGS = [*PRETRAIN, *FINETUNE]
CONFIG_IDS = [f"{p.parent.name}/{p.stem}" for p in CONFIGS]

BEN_PATCHES = 8
BEN_SIZE = 48  # 10 m pixels: 20 m bands 24 px, 60 m bands 8 px
BEN_GRID = {"B02": 10, "B03": 10, "B04": 10, "B08": 10, "B05": 20, "B06": 20, "B07": 20, "B8A": 20, "B11": 20,
            "B12": 20, "B01": 60, "B09": 60}
CNN = "test_resnet"  # timm test model: a ResNet with 0.4 M parameters (resnet10t: 4.9 M, 57 MB checkpoints)
STEPS = 4  # fine-tuning length (warm-up 2 steps, evaluation and checkpoint every 2)


def _write_bigearthnet(root: Path) -> dict[str, Path]:
    """BigEarthNet-S2 / -S1 style patch folders (``<patch>/<patch>_<BAND>.tif``, labels metadata)."""
    rng = np.random.default_rng(0)
    s2, s1 = root / "BigEarthNet-S2", root / "BigEarthNet-S1"
    for k in range(BEN_PATCHES):
        name = f"S2A_MSIL2A_20170613T101031_{k}_{k + 40}"
        origin = (404400.0 + 480.0 * k, 5342400.0)
        for band, res in BEN_GRID.items():
            n = BEN_SIZE * 10 // res
            write_tif(s2 / name / f"{name}_{band}.tif", rng.integers(200, 4000, (1, n, n)).astype(np.uint16),
                      origin=origin, pixel=float(res))
        (s2 / name / f"{name}_labels_metadata.json").write_text(json.dumps({"labels": ["Pastures"]}))
        # the S1 patch names sort in another order than their S2 partners: pairing must follow the metadata
        s1_name = f"S1A_IW_GRDH_1SDV_20170613T165043_33UUP_{BEN_PATCHES - k}_{k}"
        for band, mean in (("VV", -12.0), ("VH", -18.0)):
            write_tif(s1 / s1_name / f"{s1_name}_{band}.tif",
                      (mean + 3 * rng.standard_normal((1, BEN_SIZE, BEN_SIZE))).astype(np.float32),
                      origin=origin, pixel=10.0)
        (s1 / s1_name / f"{s1_name}_labels_metadata.json").write_text(
            json.dumps({"labels": ["Pastures"], "corresponding_s2_patch": name}))
    return {"data/BigEarthNet-S2": s2, "data/BigEarthNet-S1": s1}


def _write_export(out: Path) -> Path:
    """A 12-band S2L2A backbone export as ssl/export.py writes it (random weights of the tiny CNN)."""
    return write_s2_export(out, CNN)


@pytest.fixture(scope="module")
def tiny_data(tiny_demo, tmp_path_factory) -> dict:
    """Shipped path prefix -> tiny data of the same layout, and the batch size (one process) for each data root."""
    base = tmp_path_factory.mktemp("all_configs")
    demo = base / "demo"  # a copy elsewhere: the configs must follow data.root alone (${data.root})
    shutil.copytree(tiny_demo, demo)
    seg = demo / "s2" / "source"
    train_ids = (seg / "splits" / "train_all.txt").read_text().split()
    (seg / "splits" / "train.txt").write_text("\n".join(train_ids) + "\n")  # the template's split name
    # 1/8 of 16 tiles is 2: too few for a batch of 2 on each of two processes; this tiny copy labels half
    (seg / "splits" / "labelled_1_8.txt").write_text("\n".join(train_ids[:8]) + "\n")
    (seg / "splits" / "unlabelled_1_8.txt").write_text("\n".join(train_ids[8:]) + "\n")
    sar_stats = demo / "sar" / "stats.json"
    assert sar_stats.is_file(), "common.demo_data writes sar/stats.json"
    paths = {
        "data/demo": demo,
        "data/my_s2_segmentation": seg,
        "data/SpaceNet6/SAR-Intensity": demo / "sar" / "images",
        "data/SpaceNet6/sar4_stats.json": sar_stats,
        "runs/ben_r50/backbone.safetensors": _write_export(base / "export" / "backbone.safetensors"),
        **_write_bigearthnet(base / "ben"),
    }
    # per-process batch sizes giving >= 2 optimisation steps per epoch in one and in two processes
    batch = {"data/demo": 16, "data/BigEarthNet-S2": 4, "data/BigEarthNet-S1": 4, "data/SpaceNet6/SAR-Intensity": 4}
    return {"paths": paths, "batch": batch}


def _strings(value, key=""):
    value = config_to_dict(value)
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(value, str):
        yield key, value


def _moved(value: str, paths: dict[str, Path]) -> str | None:
    for prefix, target in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        if value == prefix or value.startswith(prefix + "/"):
            return str(target) + value[len(prefix):]
    return None


def _config_class(path: Path):
    if path.parent.name == "pretrain":
        from eo_ssl.pretrain import PretrainConfig

        return PretrainConfig
    from finetune.training import finetune_config_class, task_of_config

    return finetune_config_class(task_of_config(path))


def smoke_overrides(path: Path, tiny: dict, processes: int = 1) -> list[str]:
    """The overrides that put ``path`` on tiny data and a tiny model (see the module docstring)."""
    cls, paths = _config_class(path), tiny["paths"]
    shipped = load_config(cls, path)
    root = shipped.data.root
    if _moved(root, paths) is None:
        pytest.fail(f"{path.name}: no tiny dataset for data.root={root}; add one to tests/test_all_configs.py")
    data_key = next(k for k in tiny["batch"] if root == k or root.startswith(k + "/")) if path.parent.name == \
        "pretrain" else None
    over = [f"data.root={_moved(root, paths)}"]
    # every other shipped path: follows data.root through ${data.root}, or is moved explicitly
    moved_root = load_config(cls, path, over)
    for key, value in _strings(moved_root):
        target = _moved(value, paths)
        if target is not None and key != "data.root":
            over.append(f"{key}={target}")
    unknown = [(k, v) for k, v in _strings(moved_root) if v.startswith(("data/", "runs/")) and _moved(v, paths) is None]
    if unknown:
        pytest.fail(f"{path.name}: no tiny data for {unknown}; add it to tests/test_all_configs.py")
    common = ["trainer.log_every=1", "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=3",
              "trainer.image_log_every=3", "trainer.num_workers=0", "trainer.progress_bar=false"]
    if path.parent.name == "pretrain":
        arch = "test_vit" if "vit" in shipped.model.arch else CNN
        batch = tiny["batch"][data_key] // processes
        over += [f"model.arch={arch}", f"data.batch_size={batch}", "dino.out_dim=64", "dino.hidden_dim=32",
                 "dino.bottleneck_dim=16", "augment.global_size=32", "augment.local_size=16",
                 f"augment.local_number={min(shipped.augment.local_number, 2)}",
                 "trainer.epochs=2", "trainer.max_steps=null", "dino.freeze_last_layer=1",
                 f"dino.warmup_teacher_temp_epochs={min(shipped.dino.warmup_teacher_temp_epochs, 1)}",
                 "optim.warmup_steps=0", f"optim.warmup_epochs={min(shipped.optim.warmup_epochs, 1)}",
                 "probe.k=3", *common]
        if shipped.optim.warmup_steps:  # a config that warms up in steps keeps doing so, over one epoch or less
            over[over.index("optim.warmup_steps=0")] = "optim.warmup_steps=2"
            over[over.index(f"optim.warmup_epochs={min(shipped.optim.warmup_epochs, 1)}")] = "optim.warmup_epochs=0"
        if shipped.data.tile_size is not None:
            over.append("data.tile_size=32")
    else:
        over += [f"model.arch={CNN}", "data.batch_size=2", "trainer.epochs=null",
                 f"trainer.max_steps={STEPS}", "optim.warmup_epochs=0",
                 f"optim.warmup_steps={2 if shipped.optim.warmup_steps or shipped.optim.warmup_epochs else 0}",
                 "eval.batch_size=4", "eval.num_images=2", *common]
        if shipped.augment.crop_size is not None:
            over.append("augment.crop_size=32")
        if shipped.eval.window is not None:
            over.append("eval.window=32")
    return over


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def check_run(path: Path, run: Path, overrides: list[str], processes: int) -> None:
    """Files and metrics every run must leave, and the phase boundaries crossed."""
    cls = _config_class(path)
    cfg = load_config(cls, path, overrides)
    for name in ("config.yaml", "metrics.jsonl", "metrics.json"):
        assert (run / name).is_file(), f"{path.name}: {name} missing"
    final = json.loads((run / "metrics.json").read_text())
    rows = _rows(run)
    train = [r for r in rows if "train/loss" in r]
    steps = final["steps"]
    assert steps >= STEPS and [r["step"] for r in train] == list(range(1, steps + 1)), path.name
    assert all(math.isfinite(r["train/loss"]) for r in train), path.name
    assert final.get("num_processes", processes) == processes
    ckpts = run / "checkpoints"
    assert any(ckpts.glob("step_*")) and (ckpts / "last.safetensors").is_file(), path.name
    assert [r for r in rows if r.get("step") == 2], path.name  # logged at the first checkpoint step
    lr = [r["train/lr"] for r in train]
    if cfg.optim.warmup_steps or cfg.optim.warmup_epochs:  # the warm-up started at 0 and reached the peak
        assert lr[0] == 0.0 and max(lr) > 0, (path.name, lr)
    saved = (run / "config.yaml").read_text()
    assert "${" not in saved and str(cfg.data.root) in saved  # the resolved config

    if path.parent.name == "pretrain":
        epochs = [r["train/epoch"] for r in train]
        assert max(epochs) == pytest.approx(2.0) and min(epochs) <= 1.0 < max(epochs), (path.name, epochs)
        assert all(r["train/momentum"] < 1.0 for r in train)
        temps = [r["train/teacher_temp"] for r in train]
        assert temps[-1] == pytest.approx(cfg.dino.teacher_temp), path.name
        if cfg.dino.warmup_teacher_temp_epochs:
            assert temps[0] == pytest.approx(cfg.dino.warmup_teacher_temp), path.name
        # the last layer trained after its freeze (the step that crashed fused SGD): student != its EMA teacher
        state = load_file(str(ckpts / "last.safetensors"))
        student = {k.split("last_layer", 1)[1]: v for k, v in state.items()
                   if k.startswith("student.") and "last_layer" in k}
        teacher = {k.split("last_layer", 1)[1]: v for k, v in state.items()
                   if k.startswith("teacher.") and "last_layer" in k}
        assert student and student.keys() == teacher.keys(), path.name
        assert any(not torch.equal(student[k], teacher[k]) for k in student), path.name
        for name in ("backbone.safetensors", "backbone.json"):
            assert (run / name).is_file(), f"{path.name}: export {name} missing"
        meta = json.loads((run / "backbone.json").read_text())
        assert meta["architecture"] == cfg.model.arch and meta["source"]["step"] == steps
        assert final["export"]["weights"].endswith("backbone.safetensors")
        if cfg.probe.root is not None:
            assert Path(cfg.probe.root).is_dir()
            probes = [r["step"] for r in rows if "val/knn_top1" in r]
            assert 2 in probes and steps in probes, (path.name, probes)
    else:
        assert (run / "model.json").is_file(), path.name
        evals = [r["step"] for r in rows if any(k.startswith("val/") and k.endswith("mIoU") for k in r)]
        assert evals == [2, 4], (path.name, evals)
        assert 0 <= final["last"]["mIoU"] <= 100 and final["last"]["step"] == STEPS
        if cfg.trainer.best_metric is not None:
            assert (ckpts / "best.safetensors").is_file(), path.name


def _main(path: Path):
    if path.parent.name == "pretrain":
        from eo_ssl.pretrain import main
    else:
        from finetune.training import task_of_config

        if task_of_config(path) == "uda":
            from finetune.uda import main
        else:
            from finetune.semisup import main
    return main


def _script(path: Path) -> str:
    if path.parent.name == "pretrain":
        return "ssl/pretrain.py"
    from finetune.training import task_of_config

    return "finetune/uda.py" if task_of_config(path) == "uda" else "finetune/semisup.py"


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_config_runs_in_one_process(path, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    over = smoke_overrides(path, tiny_data)
    t0 = time.perf_counter()
    try:
        _main(path)(["--config", str(path), "--output-dir", str(run), *over])
    except SystemExit as exc:  # a user error: cli_entry printed one line
        pytest.fail(f"{path.name} exited with {exc.code}: {capsys.readouterr().err[-3000:]}")
    print(f"{path.parent.name}/{path.name}: {time.perf_counter() - t0:.1f} s")
    check_run(path, run, over, processes=1)


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_config_runs_in_two_processes(path, tiny_data, tmp_path):
    run = tmp_path / "run"
    script = _script(path)
    over = smoke_overrides(path, tiny_data, processes=2)
    launch(script, ["--config", str(path), "--output-dir", str(run), *over], processes=2, timeout=600)
    check_run(path, run, over, processes=2)
