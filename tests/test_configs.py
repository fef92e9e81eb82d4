"""Every shipped config loads strictly, and the real-data pretraining configs run their data pipeline (and a DINO
step) on the BigEarthNet example patches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import load_config
from conftest import REPO
from eo_ssl.pretrain import PretrainConfig, build_dataset, build_method, resolve_data_sensor
from eo_ssl.multicrop import collate_multicrop
from finetune.training import finetune_config_class, task_of_config

PRETRAIN = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
FINETUNE = sorted((REPO / "configs" / "finetune").glob("*.yaml"))


def test_the_contract_configs_exist():
    names = {p.name for p in PRETRAIN} | {p.name for p in FINETUNE}
    assert {"demo.yaml", "bigearthnet_s2_resnet50.yaml", "bigearthnet_s2_vits.yaml", "bigearthnet_s1.yaml",
            "bigearthnet_s2s1.yaml", "demo_s2s1.yaml", "spacenet6_sar.yaml"} <= names


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: p.name)
def test_pretrain_configs_load(path):
    cfg = load_config(PretrainConfig, path)
    assert cfg.data.root and cfg.augment.num_crops >= 2
    assert cfg.trainer.clip_mode == "per_parameter"


@pytest.mark.parametrize("path", FINETUNE, ids=lambda p: p.name)
def test_finetune_configs_load(path):
    cfg = load_config(finetune_config_class(task_of_config(path)), path)
    assert cfg.data.root and cfg.method


def _one_batch(cfg: PretrainConfig, n: int = 2):
    spec = resolve_data_sensor(cfg.data)
    ds = build_dataset(cfg, spec)
    return spec, ds, collate_multicrop([ds[i] for i in range(n)])


@pytest.mark.parametrize("name,bands", [("bigearthnet_s2_resnet50.yaml", 12), ("bigearthnet_s2_vits.yaml", 12)])
def test_bigearthnet_s2_configs_on_real_patches(name, bands, bigearthnet_s2):
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / name,
                      [f"data.root={bigearthnet_s2}", "dino.out_dim=256",
                       "dino.hidden_dim=64", "dino.bottleneck_dim=32"])
    spec, ds, crops = _one_batch(cfg)
    assert len(ds) == 6 and ds.base.layout == "band_files"
    g, lo = cfg.augment.global_size, cfg.augment.local_size
    assert [tuple(c.shape) for c in crops] == [(2, bands, g, g)] * 2 + [(2, bands, lo, lo)] * cfg.augment.local_number
    assert all(torch.isfinite(c).all() for c in crops)
    # normalised real reflectance: roughly zero-mean, unit-scale per band
    assert abs(float(crops[0].mean())) < 3 and 0.05 < float(crops[0].std()) < 10
    method = build_method(cfg, bands)
    method.train()
    out = method({"tiles": crops}, step=0, epoch=0)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad


def test_bigearthnet_s1_config_on_real_patches(bigearthnet_s1):
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "bigearthnet_s1.yaml",
                      [f"data.root={bigearthnet_s1}"])
    spec, ds, crops = _one_batch(cfg)
    assert spec.bands == ("VV", "VH") and len(ds) == 6
    assert tuple(crops[0].shape) == (2, 2, 120, 120) and all(torch.isfinite(c).all() for c in crops)


def test_bigearthnet_s2s1_config_on_real_patches(bigearthnet_s2, bigearthnet_s1):
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "bigearthnet_s2s1.yaml",
                      [f"data.root={bigearthnet_s2}", f"data.stack[0].root={bigearthnet_s1}", "dino.out_dim=256",
                       "dino.hidden_dim=64", "dino.bottleneck_dim=32", "model.arch=resnet18"])
    spec, ds, crops = _one_batch(cfg)
    assert spec.name == "S2L2A+S1" and spec.bands[12:] == ("VV", "VH") and len(ds) == 6
    assert ds.transform.cfg.sensor_groups == (tuple(range(12)), (12, 13))
    assert tuple(crops[0].shape) == (2, 14, 120, 120) and all(torch.isfinite(c).all() for c in crops)
    # normalised with each sensor's statistics: the S1 channels are dB-scale no longer
    assert float(crops[0][:, 12:].abs().mean()) < 3
    method = build_method(cfg, 14)
    method.train()
    assert torch.isfinite(method({"tiles": crops}, step=0, epoch=0)["loss"])


def test_spacenet6_config_on_demo_sar(tiny_demo):
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "spacenet6_sar.yaml",
                      [f"data.root={tiny_demo / 'sar' / 'images'}", "data.stats_file=null", "data.tile_size=16",
                       "augment.global_size=16", "augment.local_size=8"])
    spec, ds, crops = _one_batch(cfg)
    assert spec.bands == ("HH", "HV", "VH", "VV") and spec.conversion == "linear_to_db"
    assert len(ds) == len(list((tiny_demo / "sar" / "images").glob("*.tif"))) * 4  # 32 px tiles -> 2 x 2 tiles
    assert tuple(crops[0].shape) == (2, 4, 16, 16) and all(torch.isfinite(c).all() for c in crops)


def _strings(value, key=""):
    """(dotted key, string) of every string in a loaded config."""
    from common.config import config_to_dict

    value = config_to_dict(value)
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(value, str):
        yield key, value


@pytest.mark.parametrize("path", PRETRAIN + FINETUNE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_one_data_root_override_moves_every_path_under_it(path, tmp_path):
    """Paths under the data root are written ``${data.root}/...``: after ``data.root=<elsewhere>`` no value may still
    point into the shipped root (the demo's probe.root did, and a moved demo died with "dataset root does not
    exist")."""
    cls = PretrainConfig if path.parent.name == "pretrain" else finetune_config_class(task_of_config(path))
    shipped = load_config(cls, path).data.root.rstrip("/")
    moved = load_config(cls, path, [f"data.root={tmp_path / 'elsewhere'}"])
    stale = [(k, v) for k, v in _strings(moved) if v == shipped or v.startswith(shipped + "/")]
    assert not stale, f"{path.name}: still under the shipped data root {shipped}: {stale}"


def test_moved_demo_copy_probe_and_excluded_splits_follow(tiny_demo, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_demo, copy)
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "demo.yaml", [f"data.root={copy}"])
    assert cfg.probe.root == f"{copy}/s2/source" and Path(cfg.probe.root, "splits").is_dir()
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "demo_long.yaml", [f"data.root={copy}"])
    assert cfg.probe.root == f"{copy}/s2/source" and all(Path(p).is_file() for p in cfg.data.exclude_ids_from)
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "demo_s2s1.yaml", [f"data.root={copy / 's2'}"])
    assert Path(cfg.probe.root).resolve() == (copy / "s2" / "source").resolve()
    assert Path(cfg.data.stack[0].root).resolve() == (copy / "s1").resolve()
