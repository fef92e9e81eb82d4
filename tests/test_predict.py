"""Prediction over GeoTIFF scenes (finetune/predict.py): georeferencing and metadata of the outputs, nodata,
equality with the direct forward pass and with whole-scene sliding-window inference, probabilities, inputs and
outputs of the command line, and the errors that name the offending file; read-ahead (same files on and off, a
corrupt block read on the reader thread exits 2 with the same message, no thread left behind) and the model input
built with torch (finetune/model_input.py) against the numpy path.

The run directory is built as finetune/semisup.py builds it: ``write_model_card`` for ``model.json`` and the
``state_dict`` of the real :class:`~finetune.methods.supervised.Supervised` method (prefix ``model.``) for the checkpoint,
around a random-init DeepLab v3+ on ``resnet10t``; the inputs are demo tiles (64 px, 12 S2 bands, nodata 0).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from torch import nn

from common.bands import IGNORE_INDEX, S2_REFLECTANCE_SCALE
from common.checkpoint import CHECKPOINT_DIR, atomic_save_safetensors
from common.demo_data import CLASS_NAMES, generate
from common.raster import RasterError
from finetune.config import LossConfig, SegDataConfig, SegModelConfig
from finetune.evaluation import PALETTE
from finetune.inputs import build_loss, build_model, resolve_inputs
from finetune.model_card import write_model_card
from finetune.deeplab import SegmenterOutput
from finetune.inference import sliding_window_inference
from finetune.predict import (
    MODEL_CARD,
    RunModel,
    find_inputs,
    load_run_model,
    main,
    output_paths,
    predict_file,
    predict_raster,
)
from finetune.methods.base import SegSetup
from finetune.methods.supervised import Supervised, SupervisedConfig

from conftest import S2L2A_BANDS, write_tif

REPO = Path(__file__).resolve().parents[1]
K = len(CLASS_NAMES)
TILE = 64

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> list[Path]:
    """Three demo S2 tiles (64 px, 12 bands with descriptions, uint16 DN, nodata 0)."""
    out = tmp_path_factory.mktemp("demo") / "data"
    generate(out, seed=0, tiles=2, val_tiles=1, size=TILE, sar_scenes=2, sar_grid=1, sar_size=32,
             sar_val_scenes=1)
    files = sorted((out / "s2" / "source" / "images").glob("*.tif"))
    assert len(files) == 3
    return files


def _make_run(run_dir: Path, checkpoints: tuple[str, ...] = ("last",)) -> Path:
    data = SegDataConfig(num_classes=K, class_names=tuple(CLASS_NAMES), sensor="S2L2A")
    model = SegModelConfig(arch="resnet10t", version="v3+", output_stride=16)
    inputs = resolve_inputs(data, model)
    torch.manual_seed(0)
    net = build_model(model, K, inputs, len(inputs.spec.bands), load_weights=False)
    method = Supervised(SupervisedConfig(), net, SegSetup(K, build_loss(LossConfig(), K)))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_model_card(run_dir, model, data, inputs, "supervised", method.eval_prefix)
    for name in checkpoints:
        atomic_save_safetensors(method.state_dict(), run_dir / CHECKPOINT_DIR / f"{name}.safetensors")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run with ``model.json`` and ``checkpoints/last.safetensors`` only (no best)."""
    return _make_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def run(run_dir: Path) -> RunModel:
    return load_run_model(run_dir, "last")


def _normalised(path: Path, card: dict) -> tuple[torch.Tensor, np.ndarray]:
    """Reference input: the file read with plain rasterio, DN / 10000, (x - mean) / std, 0 where any band is 0."""
    with rasterio.open(path) as src:
        dn = src.read().astype(np.float32)
    valid = (dn != 0).all(axis=0)
    norm = card["normalisation"]
    mean = np.asarray(norm["mean"], np.float32)[:, None, None]
    std = np.asarray(norm["std"], np.float32)[:, None, None]
    x = ((dn + norm["offset"]) / S2_REFLECTANCE_SCALE - mean) / std
    x[:, ~valid] = 0.0
    return torch.from_numpy(x.astype(np.float32))[None], valid


def _card(run_dir: Path) -> dict:
    return json.loads((run_dir / MODEL_CARD).read_text())


def _read(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(), {"crs": src.crs, "transform": src.transform, "shape": (src.height, src.width),
                            "nodata": src.nodata, "dtypes": src.dtypes, "descriptions": src.descriptions,
                            "tags": src.tags(), "colormap": src.colormap(1) if src.count == 1 else None}


def _with_nodata(src: Path, dst: Path) -> Path:
    """Copy of ``src`` with a 10x12 block at nodata in every band and one pixel at nodata in one band only."""
    shutil.copy(src, dst)
    with rasterio.open(dst, "r+") as ds:
        arr = ds.read()
        arr[:, 5:15, 20:32] = 0
        arr[3, 40, 40] = 0
        ds.write(arr)
    return dst


# ------------------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------------------


def test_class_map_has_the_input_grid_dtype_and_metadata(tiles, run, tmp_path):
    out = predict_raster(run, tiles[0], tmp_path / "pred.tif")
    mask, meta = _read(out.mask)
    _, ref = _read(tiles[0])
    assert meta["crs"] == ref["crs"] and meta["transform"] == ref["transform"] and meta["shape"] == ref["shape"]
    assert mask.shape == (1, TILE, TILE) and meta["dtypes"] == ("uint8",)
    assert meta["nodata"] == IGNORE_INDEX and meta["descriptions"] == ("class",)
    assert json.loads(meta["tags"]["class_names"]) == list(CLASS_NAMES)
    assert meta["tags"]["class_1"] == CLASS_NAMES[1]
    assert meta["colormap"][0][:3] == tuple(PALETTE[0]) and meta["colormap"][K - 1][:3] == tuple(PALETTE[K - 1])
    assert meta["colormap"][IGNORE_INDEX][3] == 0  # nodata transparent
    assert out.probabilities is None and not (tmp_path / "pred_prob.tif").exists()
    assert out.windows == 1 and mask.max() < K


def test_one_pass_equals_the_direct_forward_of_the_normalised_image(tiles, run, run_dir, tmp_path):
    out = predict_file(run_dir, tiles[1], tmp_path / "p.tif", checkpoint="last", device="cpu")
    x, valid = _normalised(tiles[1], _card(run_dir))
    with torch.no_grad():
        expected = run.net(x).logits.argmax(1)[0].numpy()
    assert valid.all()
    np.testing.assert_array_equal(_read(out.mask)[0][0], expected)


def test_nodata_pixels_are_written_as_255(tiles, run, run_dir, tmp_path):
    src = _with_nodata(tiles[0], tmp_path / "holes.tif")
    out = predict_raster(run, src, tmp_path / "holes_pred.tif", probabilities=True)
    mask = _read(out.mask)[0][0]
    x, valid = _normalised(src, _card(run_dir))
    assert not valid[5:15, 20:32].any() and not valid[40, 40] and valid.sum() == TILE * TILE - 121
    assert (mask[~valid] == IGNORE_INDEX).all() and (mask[valid] < K).all()
    with torch.no_grad():  # invalid pixels enter the network as 0, as in training
        expected = run.net(x).logits.argmax(1)[0].numpy()
    np.testing.assert_array_equal(mask[valid], expected[valid])
    prob = _read(out.probabilities)[0]
    assert np.isnan(prob[:, ~valid]).all() and np.isfinite(prob[:, valid]).all()
    assert out.valid_fraction == pytest.approx(valid.mean())


@pytest.mark.parametrize("window, block_width", [(32, 8192), (24, 8192), (16, 20)])
def test_windows_equal_whole_scene_sliding_window_inference(tiles, run, run_dir, tmp_path, window, block_width):
    """Streaming by window rows and column blocks gives what sliding_window_inference gives on the whole scene."""
    src = _with_nodata(tiles[2], tmp_path / "t.tif")
    out = predict_raster(run, src, tmp_path / "w.tif", window=window, probabilities=True, block_width=block_width)
    x, valid = _normalised(src, _card(run_dir))
    logits = sliding_window_inference(lambda t: run.net(t).logits, x, window, 0.5, K, blend="gaussian")
    top2 = logits[0].topk(2, dim=0).values.numpy()
    sure = valid & (top2[0] - top2[1] > 1e-4)  # windows batched differently change logits in the last bits
    assert sure.sum() > 0.99 * valid.sum() and out.windows > 1
    np.testing.assert_array_equal(_read(out.mask)[0][0][sure], logits.argmax(1)[0].numpy()[sure])
    prob = _read(out.probabilities)[0]
    np.testing.assert_allclose(prob[:, valid], logits.softmax(1)[0].numpy()[:, valid], atol=1e-5)


class _Pointwise(nn.Module):
    """Fully convolutional with no spatial context (1x1 convs): window borders cannot change its output."""

    def __init__(self, in_chans: int, num_classes: int):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Conv2d(in_chans, 16, 1), nn.ReLU(), nn.Conv2d(16, num_classes, 1))

    def forward(self, x: torch.Tensor) -> SegmenterOutput:
        return SegmenterOutput(self.body(x))


@pytest.mark.parametrize("window, block_width", [(16, 8192), (20, 30)])
def test_windows_place_every_pixel_where_it_belongs(tiles, run, tmp_path, window, block_width):
    """With a context-free network, the windowed prediction equals the one-pass prediction pixel for pixel."""
    pointwise = RunModel(net=_Pointwise(len(run.card.bands), K).eval(), card=run.card, spec=run.spec,
                         checkpoint=run.checkpoint, run_dir=run.run_dir)
    whole = predict_raster(pointwise, tiles[0], tmp_path / "whole.tif", probabilities=True)
    windowed = predict_raster(pointwise, tiles[0], tmp_path / "win.tif", window=window, probabilities=True,
                              block_width=block_width, batch_size=3)
    assert whole.windows == 1 and windowed.windows > 16
    np.testing.assert_array_equal(_read(windowed.mask)[0], _read(whole.mask)[0])
    np.testing.assert_allclose(_read(windowed.probabilities)[0], _read(whole.probabilities)[0], atol=1e-5)


def test_probabilities_are_a_distribution_per_valid_pixel(tiles, run, tmp_path):
    out = predict_raster(run, tiles[1], tmp_path / "x_pred.tif", window=32, probabilities=True)
    assert out.probabilities == tmp_path / "x_prob.tif"
    prob, meta = _read(out.probabilities)
    _, ref = _read(tiles[1])
    assert prob.shape == (K, TILE, TILE) and meta["dtypes"] == ("float32",) * K
    assert meta["crs"] == ref["crs"] and meta["transform"] == ref["transform"]
    assert meta["descriptions"] == tuple(CLASS_NAMES)
    np.testing.assert_allclose(prob.sum(0), 1.0, atol=1e-5)
    assert (prob >= 0).all()
    np.testing.assert_array_equal(prob.argmax(0), _read(out.mask)[0][0])


# ------------------------------------------------------------------------------------------------------------
# command line, inputs and outputs
# ------------------------------------------------------------------------------------------------------------


def test_glob_into_a_directory_writes_one_file_per_input(tiles, run_dir, tmp_path, capsys):
    pattern = str(tiles[0].parent / "*.tif")
    done = main(["--run", str(run_dir), "--input", pattern, "--output", str(tmp_path / "out"), "--probabilities",
                 "--window", "48", "--cpu"])
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted([f"{p.stem}_pred.tif" for p in tiles] + [f"{p.stem}_prob.tif" for p in tiles])
    assert [r.input for r in done] == tiles
    assert "best.safetensors does not exist" in capsys.readouterr().err  # fell back to last


def test_a_single_input_and_a_tif_output_writes_that_file(tiles, run_dir, tmp_path):
    dst = tmp_path / "sub" / "scene.tif"
    main(["--run", str(run_dir), "--input", str(tiles[0]), "--output", str(dst), "--checkpoint", "last", "--cpu"])
    assert [p.name for p in dst.parent.iterdir()] == ["scene.tif"]  # atomic write leaves no temporary file


def test_a_directory_input_takes_its_geotiffs(tiles):
    assert find_inputs(tiles[0].parent) == tiles


def test_inputs_and_outputs_are_refused_with_a_clear_message(tiles, run_dir, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        find_inputs(str(tmp_path / "nothing_here" / "*.tif"))
    with pytest.raises(ValueError, match="names one file but 3 inputs"):
        output_paths(tiles, tmp_path / "one.tif")
    with pytest.raises(SystemExit) as exc:
        main(["--run", str(run_dir), "--input", str(tmp_path / "*.tif"), "--output", str(tmp_path)])
    assert exc.value.code == 2 and "no input file matches" in capsys.readouterr().err


def test_band_problems_name_the_file(run, run_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    eleven = write_tif(tmp_path / "eleven.tif", rng.integers(1, 4000, (11, 16, 16)).astype(np.uint16), nodata=0)
    with pytest.raises(RasterError, match=r"eleven\.tif: has 11 band\(s\) and no band descriptions"):
        predict_raster(run, eleven, tmp_path / "o.tif")
    names = list(S2L2A_BANDS)
    names[4] = "red edge"  # B05 missing
    renamed = write_tif(tmp_path / "renamed.tif", rng.integers(1, 4000, (12, 16, 16)).astype(np.uint16), nodata=0,
                        band_names=names)
    with pytest.raises(RasterError, match=r"renamed\.tif.*B05"):
        predict_raster(run, renamed, tmp_path / "o.tif")
    with pytest.raises(SystemExit):  # the command line checks every input before predicting any
        main(["--run", str(run_dir), "--input", str(tmp_path / "*.tif"), "--output", str(tmp_path / "out")])
    assert "eleven.tif" in capsys.readouterr().err and not (tmp_path / "out").exists()
    # twelve bands without descriptions are taken in the sensor's band order
    plain = write_tif(tmp_path / "plain" / "plain.tif", rng.integers(1, 4000, (12, 16, 16)).astype(np.uint16),
                      nodata=0)
    assert _read(predict_raster(run, plain, tmp_path / "plain_pred.tif").mask)[0].shape == (1, 16, 16)


def test_missing_run_files_are_named(run_dir, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="absent: run directory not found"):
        load_run_model(tmp_path / "absent", "best")
    no_card = _make_run(tmp_path / "no_card")
    (no_card / MODEL_CARD).unlink()
    with pytest.raises(FileNotFoundError, match=r"no_card/model\.json"):
        load_run_model(no_card, "last")
    no_weights = _make_run(tmp_path / "no_weights", checkpoints=())
    with pytest.raises(FileNotFoundError, match=r"no_weights/checkpoints/last\.safetensors"):
        load_run_model(no_weights, "last")
    with pytest.raises(FileNotFoundError, match=r"best\.safetensors: checkpoint not found"):
        load_run_model(no_weights, "best")
    assert load_run_model(run_dir, "best").checkpoint.name == "last.safetensors"
    assert "best.safetensors does not exist" in capsys.readouterr().err


def test_weights_that_do_not_fit_the_card_are_refused(run_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    card = _card(bad)
    card["num_classes"], card["class_names"] = 4, None
    (bad / MODEL_CARD).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="do not fit DeepLab"):
        load_run_model(bad, "last")
    card["num_classes"], card["state_dict_prefix"] = K, "teacher."
    (bad / MODEL_CARD).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="prefix 'teacher.'"):
        load_run_model(bad, "last")


def test_command_line_help():
    proc = subprocess.run([sys.executable, "finetune/predict.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--probabilities" in proc.stdout and "--checkpoint" in proc.stdout


def test_normalise_hand_values_and_invalid_pixels():
    from finetune.transforms import normalise

    x = np.array([[[1.0, 3.0], [np.nan, 5.0]], [[-10.0, np.inf], [0.0, -20.0]]], dtype=np.float64)
    valid = np.array([[True, True], [True, False]])
    out = normalise(x, np.array([1.0, -10.0], np.float32), np.array([2.0, 5.0], np.float32), valid)
    # (x - mean) / std; NaN / inf and invalid pixels -> 0 (the band mean)
    expected = np.array([[[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [2.0, 0.0]]], dtype=np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


# ------------------------------------------------------------------------------------------------------------
# band folders (BigEarthNet layout: <patch>/<patch>_B02.tif, one GeoTIFF per band at its native resolution)
# ------------------------------------------------------------------------------------------------------------

_GSD = {"B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10, "B8A": 20,
        "B09": 60, "B11": 20, "B12": 20}


def _band_folder(root: Path, name: str, seed: int, size: int = 60) -> Path:
    """A generated band folder: uint16 DN, 10 m bands size x size, 20 m and 60 m bands on the same footprint at their
    resolution, no nodata declared (DN 0 is S2 nodata): a 0 block in B05 (20 m) and one 0 pixel in B02 (row
    size // 2 + 10, column 7)."""
    rng = np.random.default_rng(seed)
    folder = root / name
    for b, gsd in _GSD.items():
        n = size * 10 // gsd
        dn = rng.integers(200, 4000, size=(n, n)).astype(np.uint16)
        if b == "B05":
            dn[3:6, 10:14] = 0
        if b == "B02":
            dn[n // 2 + 10, 7] = 0
        write_tif(folder / f"{name}_{b}.tif", dn, pixel=float(gsd))
    return folder


def _as_multiband(folder: Path, out: Path) -> Path:
    """The folder's bands on its 10 m grid (as training resamples them) in one float32 multi-band file with band
    names, invalid pixels written as the declared nodata 0."""
    from common.raster import read_band_files

    r = read_band_files(folder, list(S2L2A_BANDS), fallback_nodata=0)
    arr = np.where(r.valid[None], r.array, 0).astype(np.float32)
    with rasterio.open(next(folder.glob("*_B02.tif"))) as src:
        crs, transform = src.crs, src.transform
    out.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(out, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=12, dtype="float32",
                       crs=crs, transform=transform, nodata=0) as dst:
        dst.write(arr)
        for i, b in enumerate(S2L2A_BANDS, start=1):
            dst.set_band_description(i, b)
    return out


def _check_band_folder_predictions(folders: list[Path], preds: Path, run: RunModel, tmp_path: Path) -> None:
    for folder in folders:
        pred = preds / f"{folder.name}_pred.tif"
        classes, meta = _read(pred)
        with rasterio.open(next(folder.glob("*_B02.tif"))) as ref:  # the patch's 10 m grid
            assert meta["crs"] == ref.crs and meta["transform"] == ref.transform
            assert meta["shape"] == (ref.height, ref.width)
        same = predict_raster(run, _as_multiband(folder, tmp_path / "mb" / f"{folder.name}.tif"),
                              tmp_path / "mb_pred" / f"{folder.name}.tif", device="cpu")
        expect, expect_meta = _read(same.mask)
        assert expect_meta["transform"] == meta["transform"]
        np.testing.assert_array_equal(classes, expect)


def test_band_folders_predict_on_their_10m_grid_as_their_multiband_file(run, run_dir, tmp_path):
    root = tmp_path / "patches"
    folders = [_band_folder(root, f"P_{i}", seed=i) for i in range(2)]
    preds = tmp_path / "preds"
    done = main(["--run", str(run_dir), "--checkpoint", "last", "--input", str(root), "--output", str(preds),
                 "--cpu", "--window", "32", "--overlap", "0.25"])
    assert [r.input for r in done] == folders and all(r.shape == (60, 60) for r in done)
    # the block of 0 in the 20 m band B05 and the 0 in B02 are nodata (255), as training marks them invalid
    classes, _ = _read(preds / "P_0_pred.tif")
    assert (classes[0, 6:12, 20:28] == IGNORE_INDEX).all() and classes[0, 40, 7] == IGNORE_INDEX
    assert (classes != IGNORE_INDEX).mean() > 0.9
    for r in done:  # windows: the multi-band file predicted with the same windows
        mb = _as_multiband(r.input, tmp_path / "mbw" / f"{r.input.name}.tif")
        same = predict_raster(run, mb, tmp_path / "mbw_pred" / f"{r.input.name}.tif", window=32, overlap=0.25,
                              device="cpu")
        np.testing.assert_array_equal(_read(r.mask)[0], _read(same.mask)[0])
        assert _read(r.mask)[1]["transform"] == _read(same.mask)[1]["transform"]


def test_band_folder_inputs_by_folder_glob_and_band_files(run, tmp_path):
    root = tmp_path / "patches"
    folders = [_band_folder(root, f"Q_{i}", seed=10 + i, size=30) for i in range(2)]
    bands = run.spec.raw_bands
    assert find_inputs(folders[0], bands) == [folders[0]]
    assert find_inputs(root, bands) == folders
    assert find_inputs(str(root / "*"), bands) == folders
    assert find_inputs(str(root / "*" / "*_B0[23].tif"), bands) == folders  # band files stand for their folder
    assert output_paths(folders, tmp_path / "o") == [tmp_path / "o" / "Q_0_pred.tif", tmp_path / "o" / "Q_1_pred.tif"]
    (folders[1] / "Q_1_B8A.tif").unlink()
    with pytest.raises(RasterError, match=r"Q_1.*B8A"):
        find_inputs(root, bands)


def test_real_bigearthnet_patches_predict_on_their_10m_grid(run, run_dir, bigearthnet_s2, tmp_path):
    folders = sorted(p for p in bigearthnet_s2.iterdir() if p.is_dir())
    preds = tmp_path / "preds"
    done = main(["--run", str(run_dir), "--checkpoint", "last", "--input", str(bigearthnet_s2), "--output",
                 str(preds), "--cpu"])
    assert [r.input for r in done] == folders and all(r.shape == (120, 120) for r in done)
    _check_band_folder_predictions(folders, preds, run, tmp_path)


def test_a_stacked_model_takes_band_folders_for_each_sensor(tmp_path):
    """S2 band folder + S1 band folder (``--stack-input``) give the class map of the 14-band multi-band file."""
    from common.raster import read_band_files
    from finetune.config import SegStackConfig

    data = SegDataConfig(num_classes=K, class_names=tuple(CLASS_NAMES), sensor="S2L2A",
                         stack=(SegStackConfig(sensor="S1", image_dir="s1"),))
    model = SegModelConfig(arch="resnet10t", version="v3+", output_stride=16)
    inputs = resolve_inputs(data, model)
    assert len(inputs.spec.bands) == 14
    torch.manual_seed(1)
    net = build_model(model, K, inputs, 14, load_weights=False)
    run_dir = tmp_path / "run"
    write_model_card(run_dir, model, data, inputs, "supervised", "model.")
    atomic_save_safetensors({"model." + k: v for k, v in net.state_dict().items()},
                            run_dir / CHECKPOINT_DIR / "last.safetensors")
    s2 = _band_folder(tmp_path / "s2", "P_7", seed=7, size=30)
    rng = np.random.default_rng(7)
    s1 = tmp_path / "s1" / "P_7"
    db = np.stack([rng.normal(-12, 3, (30, 30)), rng.normal(-19, 3, (30, 30))]).astype(np.float32)
    for i, b in enumerate(("VV", "VH")):
        write_tif(s1 / f"P_7_{b}.tif", db[i], nodata=float("nan"))
    done = main(["--run", str(run_dir), "--checkpoint", "last", "--input", str(s2), "--output", str(tmp_path / "o"),
                 "--stack-input", str(tmp_path / "s1" / "{stem}"), "--cpu"])
    classes, meta = _read(done[0].mask)
    with rasterio.open(s2 / "P_7_B02.tif") as ref:
        assert meta["transform"] == ref.transform and meta["crs"] == ref.crs
    r = read_band_files(s2, list(S2L2A_BANDS), fallback_nodata=0)
    stacked = np.concatenate([np.where(r.valid[None], r.array, 0), db]).astype(np.float32)
    mb = write_tif(tmp_path / "mb" / "P_7.tif", stacked, nodata=0, band_names=[*S2L2A_BANDS, "VV", "VH"])
    same = predict_file(run_dir, mb, tmp_path / "mb_pred" / "P_7.tif", checkpoint="last", device="cpu")
    np.testing.assert_array_equal(classes, _read(same.mask)[0])


def test_narrow_head_widths_travel_through_the_model_card(tiles, tmp_path):
    """model.aspp_channels / decoder_channels are written to model.json and predict rebuilds that network (a card
    read as the published 256 would not load the checkpoint)."""
    data = SegDataConfig(num_classes=K, class_names=tuple(CLASS_NAMES), sensor="S2L2A")
    model = SegModelConfig(arch="resnet10t", version="v3+", output_stride=16, aspp_channels=32, decoder_channels=24)
    inputs = resolve_inputs(data, model)
    torch.manual_seed(0)
    net = build_model(model, K, inputs, len(inputs.spec.bands), load_weights=False)
    assert net.head.aspp.project[0][0].out_channels == 32
    assert net.head.classifier.in_channels == 24
    method = Supervised(SupervisedConfig(), net, SegSetup(K, build_loss(LossConfig(), K)))
    run_dir = tmp_path / "narrow"
    run_dir.mkdir()
    write_model_card(run_dir, model, data, inputs, "supervised", method.eval_prefix)
    atomic_save_safetensors(method.state_dict(), run_dir / CHECKPOINT_DIR / "last.safetensors")
    card = _card(run_dir)
    assert (card["aspp_channels"], card["decoder_channels"]) == (32, 24)
    loaded = load_run_model(run_dir, "last")
    x, _ = _normalised(tiles[0], card)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x).logits, net(x).logits)


# ------------------------------------------------------------------------------------------------------------
# read-ahead (a background thread reads and decodes the next window rows) and model input built on the device
# ------------------------------------------------------------------------------------------------------------


def _reader_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "predict-read-ahead"]


def _strip_file(path: Path, corrupt_rows: tuple[int, int] | None = None) -> Path:
    """A 48 x 40 12-band S2 file (uint16 DN, nodata 0 with a hole, band names) in deflate strips of 4 rows; with
    ``corrupt_rows`` (a multiple of 4 and the next one) the bytes of that strip are overwritten: the header and the
    other rows read, those rows do not."""
    from affine import Affine

    rng = np.random.default_rng(3)
    dn = rng.integers(200, 4000, (12, 48, 40)).astype(np.uint16)
    dn[:, 20:26, 3:9] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=40, height=48, count=12, dtype="uint16", crs="EPSG:32633",
                       transform=Affine(10.0, 0.0, 404400.0, 0.0, -10.0, 5342400.0), nodata=0, compress="deflate",
                       blockysize=4) as dst:
        dst.write(dn)
        for i, b in enumerate(S2L2A_BANDS, start=1):
            dst.set_band_description(i, b)
    if corrupt_rows is not None:
        strip = corrupt_rows[0] // 4
        with rasterio.open(path) as src:
            assert src.block_shapes[0] == (4, 40)
            offset = int(src.get_tag_item(f"BLOCK_OFFSET_0_{strip}", "TIFF", bidx=1))
            size = int(src.get_tag_item(f"BLOCK_SIZE_0_{strip}", "TIFF", bidx=1))
        data = bytearray(path.read_bytes())
        data[offset:offset + size] = b"\xff" * size
        path.write_bytes(bytes(data))
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("source", ["multiband", "band_folder"])
def test_read_ahead_on_and_off_write_identical_files(tiles, run, tmp_path, source):
    """Several column blocks x window rows (each row read while the previous one is predicted): the class map and the
    probabilities are byte-for-byte the same with read-ahead off, 1 and 2 rows ahead, and 2 GDAL threads."""
    src = (_with_nodata(tiles[2], tmp_path / "t.tif") if source == "multiband"
           else _band_folder(tmp_path / "patches", "P_9", seed=9, size=36))
    outs = {}
    for read_ahead, io_threads in ((0, 1), (1, 1), (2, 1), (2, 2)):
        r = predict_raster(run, src, tmp_path / f"ra{read_ahead}_{io_threads}" / "p.tif", window=16, block_width=20,
                           probabilities=True, batch_size=3, read_ahead=read_ahead, io_threads=io_threads)
        assert r.windows > 16  # column blocks of 20 px: border windows twice
        outs[read_ahead, io_threads] = (_read(r.mask), _read(r.probabilities)[0], r.valid_fraction)
    (mask, meta), prob, valid_fraction = outs[0, 1]
    assert (mask == IGNORE_INDEX).any() and np.isnan(prob).any() and 0.9 < valid_fraction < 1
    for (m, mt), p, v in outs.values():
        np.testing.assert_array_equal(m, mask)
        np.testing.assert_array_equal(p, prob)  # NaN (nodata) in the same places
        assert mt == meta and v == valid_fraction
    assert not _reader_threads()


@pytest.mark.timeout(120)
def test_a_corrupt_block_read_ahead_gives_the_same_exit_2_message(run_dir, tmp_path, capsys):
    """Rows 32-35 do not decode: the error raised on the read-ahead thread (while rows above are predicted) reaches
    the command line as without read-ahead: one message naming the file, exit status 2, no thread left behind."""
    bad = _strip_file(tmp_path / "in" / "broken.tif", corrupt_rows=(32, 36))
    errs = {}
    for read_ahead in (0, 2):
        with pytest.raises(SystemExit) as exc:
            main(["--run", str(run_dir), "--checkpoint", "last", "--input", str(bad), "--output",
                  str(tmp_path / f"out{read_ahead}"), "--window", "16", "--cpu", "--read-ahead", str(read_ahead)])
        assert exc.value.code == 2
        errs[read_ahead] = capsys.readouterr().err
        assert not _reader_threads()
    assert errs[2] == errs[0]
    assert errs[0].startswith("predict: error: ") and "broken.tif: pixel data cannot be read" in errs[0]
    assert "Traceback" not in errs[0] and not (tmp_path / "out2" / "broken_pred.tif").exists()
    with pytest.raises(SystemExit) as exc:
        main(["--run", str(run_dir), "--input", str(bad), "--output", str(tmp_path / "o"), "--read-ahead", "-1"])
    assert exc.value.code == 2 and "--read-ahead must be >= 0" in capsys.readouterr().err


def test_a_corrupt_block_read_ahead_exits_the_process_with_status_2(run_dir, tmp_path):
    """The same from a real process: it ends (no thread keeps it alive) with status 2 and the one-line message."""
    bad = _strip_file(tmp_path / "broken.tif", corrupt_rows=(32, 36))
    proc = subprocess.run([sys.executable, "finetune/predict.py", "--run", str(run_dir), "--checkpoint", "last",
                           "--input", str(bad), "--output", str(tmp_path / "out"), "--window", "16", "--cpu",
                           "--read-ahead", "2"], cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert "broken.tif: pixel data cannot be read" in proc.stderr


class _Interrupting(_Pointwise):
    """A context-free network whose ``n``-th forward raises ``exc`` (as Ctrl-C or a failing network would)."""

    def __init__(self, in_chans: int, num_classes: int, n: int, exc: BaseException):
        super().__init__(in_chans, num_classes)
        self.calls, self.n, self.exc = 0, n, exc

    def forward(self, x: torch.Tensor) -> SegmenterOutput:
        self.calls += 1
        if self.calls == self.n:
            raise self.exc
        return super().forward(x)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("network failed")], ids=["interrupt", "error"])
def test_an_interrupted_prediction_stops_the_read_ahead_thread(tiles, run, tmp_path, exc):
    """Ctrl-C or an error in the main thread while the reader waits on a full queue: the exception propagates at
    once and the reader thread is gone."""
    net = _Interrupting(len(run.card.bands), K, n=2, exc=exc).eval()
    broken = RunModel(net=net, card=run.card, spec=run.spec, checkpoint=run.checkpoint, run_dir=run.run_dir)
    with pytest.raises(type(exc)):
        predict_raster(broken, tiles[0], tmp_path / "x.tif", window=16, block_width=20, batch_size=2, read_ahead=1)
    assert net.calls == 2 and not _reader_threads() and not (tmp_path / "x.tif").exists()


def _sensor_cases():
    """(name, spec, raw (C_raw, 2, 4), raw validity, exact) for each conversion; raw values include nodata, NaN, inf,
    zeros, negatives and (VV/VH) zero and negative denominators."""
    from common.bands import SensorDef, get_sensor, stack_sensors

    s2 = get_sensor("S2L2A")
    dn = np.array([[0, 1, 999, 1000], [1001, 4000, 11000, 65535]], np.uint16)
    raw_s2 = np.stack([dn + i for i in range(12)]).astype(np.uint16)
    raw_s2[:, 0, 0] = 0  # nodata in every band
    raw_s2[3, 1, 1] = 0  # nodata in one band
    ok_s2 = (raw_s2 != 0).all(0)
    s1 = get_sensor("S1", ["VV", "VH", "VV/VH"])
    db = np.array([[[-12.5, np.nan, 0.0, 3.0], [-20.0, 1e-4, -1e-4, np.inf]],
                   [[-19.0, -15.0, 0.0, -1e-4], [0.0, 2.0, 5e-4, -3.0]]], np.float32)
    ok_db = np.isfinite(db).all(0)
    sar = get_sensor("SAR4")
    lin = np.array([[0.0, 1e-9, 1e-6, 0.01], [0.5, 1.0, 123.4, np.nan]], np.float32)
    raw_lin = np.stack([lin * (i + 1) for i in range(4)])
    ok_lin = np.isfinite(raw_lin).all(0) & (raw_lin != 0).all(0)
    z = (raw_lin + 1j * raw_lin[::-1] * 0.5).astype(np.complex64)
    landsat = ("SR_B2", "SR_B3")
    ls = SensorDef(name="LC09", bands=landsat, input_units="dn", scale_factor=0.0000275, add_offset=-0.2, nodata=0,
                   gsd=30.0, mean={"SR_B2": 0.1, "SR_B3": 0.12}, std={"SR_B2": 0.07, "SR_B3": 0.09}).to_spec()
    amp = SensorDef(name="SLC-AMP", bands=sar.bands, input_units="complex", model_units="amplitude", gsd=0.5,
                    mean=dict.fromkeys(sar.bands, 1.0), std=dict.fromkeys(sar.bands, 3.0)).to_spec()
    return [
        ("S2 DN (offset -1000)", s2, raw_s2, ok_s2, True),
        ("Landsat scale_offset", ls, np.stack([dn, dn[::-1]]), (np.stack([dn, dn[::-1]]) != 0).all(0), True),
        ("S1 dB + VV/VH", s1, db, ok_db, True),
        ("linear_to_db", sar, raw_lin, ok_lin, False),
        ("amplitude_to_db", sar.with_input_units("amplitude"), raw_lin, ok_lin, False),
        ("complex_to_intensity_db", sar.with_input_units("complex"), z, ok_lin, False),
        ("complex_to_amplitude", amp, z, ok_lin, True),
        ("S2 + S1 stack", stack_sensors(s2, s1),
         np.concatenate([raw_s2.astype(np.float32), db[:, :, ::-1]]), ok_s2 & ok_db[:, ::-1], True),
    ]


@pytest.mark.parametrize("case", _sensor_cases(), ids=lambda c: c[0])
def test_model_input_on_torch_equals_the_numpy_path(case):
    """finetune.model_input (torch) against common.bands.to_model_units + isfinite + finetune.transforms.normalise
    (numpy, the path before the device conversion) on hand-made values: bit-identical, the dB conversions to 2 ulp
    in model units (log10 differs between the libraries) and to 1e-6 after normalisation."""
    from common.bands import to_model_units
    from finetune.model_input import model_input, to_model_units_torch
    from finetune.transforms import normalise

    _, spec, raw, raw_ok, exact = case
    offset = -1000.0
    mean, std = spec.mean_array().astype(np.float32), spec.std_array().astype(np.float32)
    units = to_model_units(raw, spec, offset=offset)
    ok = raw_ok & np.isfinite(units).all(0)
    expected = normalise(units, mean, std, ok)
    units_t = to_model_units_torch(torch.from_numpy(raw), spec, offset=offset).numpy()
    z, ok_t = model_input([torch.from_numpy(raw)], torch.from_numpy(raw_ok), [spec], torch.from_numpy(mean),
                          torch.from_numpy(std), offset=offset)
    assert z.dtype == torch.float32 and z.shape == expected.shape and ok_t.dtype == torch.bool
    np.testing.assert_array_equal(ok_t.numpy(), ok)
    assert (z.numpy()[:, ~ok] == 0).all() and not ok.all() and ok.any()
    if exact:
        np.testing.assert_array_equal(units_t, units)
        np.testing.assert_array_equal(z.numpy(), expected)
        assert z.numpy().tobytes() == expected.tobytes()  # also the signs of zeros
    else:
        np.testing.assert_array_max_ulp(units_t[:, ok], units[:, ok], maxulp=2)
        np.testing.assert_allclose(z.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_model_input_hand_values_of_s2_dn():
    """(DN - 1000) / 10000, (x - mean) / std, 0 where a band is nodata (DN 0) or the raw validity is False."""
    from common.bands import get_sensor
    from finetune.model_input import model_input

    s2 = get_sensor("S2L2A", ["B02", "B03"])
    raw = torch.tensor([[[0, 1000, 3000]], [[2000, 6000, 1500]]], dtype=torch.uint16)  # (2, 1, 3)
    ok = torch.tensor([[True, True, False]])
    z, valid = model_input([raw], ok & (raw != 0).all(0), [s2], torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.25]),
                           offset=-1000)
    # B02: (0 - 1000)/1e4 = -0.1 (nodata), 0.0 -> (0 - 0.1)/0.5 = -0.2, 0.2 (invalid); B03: 0.1, 0.5 -> 1.2, 0.05
    np.testing.assert_array_equal(valid.numpy(), [[False, True, False]])
    np.testing.assert_allclose(z.numpy(), [[[0.0, -0.2, 0.0]], [[0.0, 1.2, 0.0]]], rtol=1e-6)


def test_a_derived_band_without_a_torch_version_takes_its_numpy_function(monkeypatch):
    """The fallback for a derived band registered without a torch twin: computed on the host, same values."""
    import finetune.model_input as model_input_module
    from common.bands import to_model_units

    _, spec, raw, _, _ = next(c for c in _sensor_cases() if c[0] == "S1 dB + VV/VH")
    with_torch = model_input_module.to_model_units_torch(torch.from_numpy(raw), spec).numpy()
    monkeypatch.setattr(model_input_module, "_DERIVED_TORCH", {})
    without = model_input_module.to_model_units_torch(torch.from_numpy(raw), spec).numpy()
    np.testing.assert_array_equal(without, with_torch)
    np.testing.assert_array_equal(without, to_model_units(raw, spec))


def test_read_ahead_defaults_to_two_rows_on_a_gpu_and_none_on_the_cpu():
    """On the CPU the network takes the cores and read-ahead only added CPU time (bench_predict_cpu.json)."""
    from finetune.predict import DEFAULT_READ_AHEAD, resolve_read_ahead

    assert resolve_read_ahead(None, torch.device("cpu")) == 0
    assert resolve_read_ahead(None, torch.device("cuda")) == DEFAULT_READ_AHEAD == 2
    assert resolve_read_ahead(1, torch.device("cpu")) == 1
    with pytest.raises(ValueError, match="read_ahead must be >= 0"):
        resolve_read_ahead(-1, torch.device("cuda"))
