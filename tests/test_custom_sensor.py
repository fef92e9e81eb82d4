"""End to end with a sensor defined in the config: HLS-like tiles (6 bands, int16 DN, no band descriptions) go through
DINO pretraining (2 steps, tiny backbone), the export records the definition, fine-tuning names the sensor only
(re-created from the export), ``model.json`` records it and prediction rebuilds it: the same conversion (DN x 1e-4)
and band order at every stage, in one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml

from common.bands import SensorSpec
from common.errors import DataError

from conftest import write_tif

HLS_BANDS = ["B02", "B03", "B04", "B8A", "B11", "B12"]
HLS = {"name": "HLS", "bands": HLS_BANDS, "input_units": "dn", "scale_factor": 0.0001, "nodata": -9999, "gsd": 30,
       "mean": dict.fromkeys(HLS_BANDS, 0.15), "std": dict.fromkeys(HLS_BANDS, 0.08)}
SIZE = 32


@pytest.fixture(scope="module")
def hls_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hls") / "hls"
    rng = np.random.default_rng(0)
    for k in range(6):
        dn = rng.integers(300, 3000, size=(6, SIZE, SIZE)).astype(np.int16)
        dn[:, 0, :3] = -9999  # HLS fill, undeclared in the file: the sensor's nodata
        write_tif(root / "images" / f"t{k}.tif", dn)  # no band descriptions
        write_tif(root / "masks" / f"t{k}.tif", (dn[2] > 1600).astype(np.uint8))
    (root / "splits").mkdir()
    (root / "splits" / "labelled.txt").write_text("t0\nt1\nt2\nt3\n")
    (root / "splits" / "val.txt").write_text("t4\nt5\n")
    return root


def _yaml(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def pretrained(hls_root, tmp_path_factory) -> Path:
    from eo_ssl.pretrain import main

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("pre")
    cfg = {
        "data": {"root": str(hls_root / "images"), "glob": "*.tif", "sensor": HLS, "batch_size": 3},
        "model": {"arch": "resnet10t"},
        "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_teacher_temp_epochs": 0},
        "augment": {"global_size": 32, "local_size": 16, "local_number": 2},
        "optim": {"warmup_epochs": 0, "warmup_steps": 1},
        "trainer": {"max_steps": 2, "epochs": None, "log_every": 1, "eval_every": 2, "checkpoint_every": 2,
                    "progress_bar": False},
    }
    run = tmp / "run"
    main(["--config", _yaml(tmp / "pretrain.yaml", cfg), "--output-dir", str(run), "--cpu"])
    return run


def test_export_records_the_custom_sensor(pretrained):
    meta = json.loads((pretrained / "backbone.json").read_text())
    assert meta["sensor"] == "HLS" and meta["bands"] == HLS_BANDS and meta["in_chans"] == 6
    assert meta["normalisation"]["conversion"] == "scale_offset"
    spec = SensorSpec.from_dict(meta["sensor_def"])
    assert (spec.name, spec.bands, spec.file_bands) == ("HLS", tuple(HLS_BANDS), tuple(HLS_BANDS))
    assert (spec.scale_factor, spec.add_offset, spec.nodata, spec.units) == (1e-4, 0.0, -9999, "reflectance")
    assert spec.mean["B02"] == pytest.approx(0.15) and spec.gsd["B12"] == 30.0


def _finetune_cfg(hls_root: Path, weights: Path, sensor) -> dict:
    return {
        "method": "supervised",
        "data": {"root": str(hls_root), "num_classes": 2, "sensor": sensor, "labelled_split": "labelled",
                 "val_split": "val", "batch_size": 2},
        "model": {"arch": "resnet10t", "weights": str(weights), "output_stride": 16},
        "trainer": {"max_steps": 2, "epochs": None, "eval_every": 2, "checkpoint_every": 2, "progress_bar": False},
        "eval": {"num_images": 0},
    }


def test_finetune_and_predict_keep_the_custom_sensor(pretrained, hls_root, tmp_path):
    from finetune.predict import ModelCard, main as predict_main
    from finetune.semisup import main as finetune_main

    weights = pretrained / "backbone.safetensors"
    run = tmp_path / "ft"
    finetune_main(["--config", _yaml(tmp_path / "ft.yaml", _finetune_cfg(hls_root, weights, "HLS")),
                   "--output-dir", str(run), "--cpu"])  # data.sensor: HLS is re-created from the export
    card = json.loads((run / "model.json").read_text())
    assert card["sensor"] == "HLS" and card["normalisation"]["conversion"] == "scale_offset"
    spec = ModelCard.from_json(run / "model.json").sensor_spec()
    assert spec.conversion == "scale_offset" and spec.scale_factor == 1e-4 and spec.file_bands == tuple(HLS_BANDS)

    out = tmp_path / "pred"
    tile = hls_root / "images" / "t5.tif"
    predict_main(["--run", str(run), "--checkpoint", "last", "--input", str(tile), "--output", str(out), "--cpu"])
    pred = next(out.glob("t5*.tif"))
    with rasterio.open(pred) as src:
        classes = src.read(1)
    assert classes.shape == (SIZE, SIZE) and set(np.unique(classes)) <= {0, 1, 255}
    assert (classes[0, :3] == 255).all() and (classes[1:] != 255).all()  # the HLS fill is nodata


def test_finetune_refuses_another_scale_than_the_exports(pretrained, hls_root, tmp_path):
    from finetune.config import SegDataConfig, SegModelConfig
    from finetune.inputs import resolve_inputs
    from common.config import build_config

    other = {**HLS, "scale_factor": 0.001}
    data = build_config(SegDataConfig, _finetune_cfg(hls_root, pretrained, other)["data"])
    model = SegModelConfig(arch="resnet10t", weights=str(pretrained / "backbone.safetensors"))
    with pytest.raises(DataError, match=r"sensor HLS of the config scales raw values with scale_factor 0.001 .* the "
                                        r"export's with 0.0001"):
        resolve_inputs(data, model, source="the config")
    same = build_config(SegDataConfig, _finetune_cfg(hls_root, pretrained, HLS)["data"])
    assert resolve_inputs(same, model).spec.conversion == "scale_offset"
