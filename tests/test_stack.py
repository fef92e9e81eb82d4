"""Sensor stacks (S2 + S1 ...): the stacked spec, per-sensor conversion, pairing of co-registered tiles, and the
stack through pretraining, export, fine-tuning and prediction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch

from common.bands import BandStats, SensorSpec, file_band_names, get_sensor, stack_sensors, to_model_units
from common.datasets import (
    BigEarthNetPatches,
    SegmentationDataset,
    StackedDataset,
    UnlabelledTiles,
    stacked_segmentation_dataset,
)
from common.raster import RasterError
from conftest import S2L2A_BANDS, TEST_ORIGIN, launch, random_s2, write_tif

S2S1 = S2L2A_BANDS + ("VV", "VH")


# ------------------------------------------------------------------------------------------------------------
# the stacked sensor spec
# ------------------------------------------------------------------------------------------------------------
def test_stack_spec_concatenates_the_sensors():
    s2, s1 = get_sensor("S2L2A"), get_sensor("S1")
    st = get_sensor("S2L2A+S1")
    assert st == stack_sensors(s2, s1)
    assert st.name == "S2L2A+S1" and st.bands == S2S1 and st.is_stack and not st.is_sar
    assert st.conversion == "dn_to_reflectance+db" and st.units == "reflectance+dB"
    assert st.sensor_groups() == (tuple(range(12)), (12, 13))
    np.testing.assert_array_equal(st.mean_array(), np.concatenate([s2.mean_array(), s1.mean_array()]))
    np.testing.assert_array_equal(st.std_array(), np.concatenate([s2.std_array(), s1.std_array()]))
    assert st.rgb == ("B04", "B03", "B02") and st.rgb_indices() == (3, 2, 1)
    assert get_sensor("s1+s2l2a").name == "S1+S2L2A" and get_sensor("S1+S2L2A").rgb == ("B04", "B03", "B02")
    assert file_band_names(st) == S2S1
    assert stack_sensors(get_sensor("S1"), get_sensor("S1+S2L2A").parts[1]).name == "S1+S2L2A"


def test_stack_subset_keeps_sensor_order_and_drops_empty_sensors():
    st = get_sensor("S2L2A+S1", ["B02", "B03", "B04", "B08", "VV", "VH", "VV/VH"])
    assert [p.name for p in st.parts] == ["S2L2A", "S1"]
    assert st.parts[1].bands == ("VV", "VH", "VV/VH") and st.raw_bands == ("B02", "B03", "B04", "B08", "VV", "VH")
    only_s1 = get_sensor("S2L2A+S1", ["VV", "VH"])
    assert not only_s1.is_stack and only_s1.name == "S1"
    with pytest.raises(ValueError, match=r"mix the sensors' bands.*\['B02', 'VV'\]"):
        get_sensor("S2L2A+S1", ["VV", "B02"])
    with pytest.raises(ValueError, match="has no band"):
        get_sensor("S2L2A+S1", ["B02", "HH"])
    with pytest.raises(ValueError, match="both have a band named VH"):
        get_sensor("S1+SAR4")
    with pytest.raises(ValueError, match="at least two"):
        stack_sensors(get_sensor("S1"))
    with pytest.raises(KeyError, match="S2L2A\\+S1"):
        get_sensor("S2L2B")


def test_stack_converts_each_sensor_with_its_own_rule():
    st = get_sensor("S2L2A+S1", ["B02", "B04", "VV", "VH", "VV/VH"])
    raw = np.stack([np.full((2, 2), v, np.float32) for v in (1000.0, 2500.0, -10.0, -20.0)])
    out = to_model_units(raw, st, offset=-1000)
    # S2: (DN - 1000) / 10000; S1: dB unchanged; VV/VH = -10 / -20
    np.testing.assert_allclose(out[:, 0, 0], [0.0, 0.15, -10.0, -20.0, 0.5], rtol=1e-6)
    # raw bands found by name whatever their order
    np.testing.assert_allclose(to_model_units(raw[::-1], st, raw_bands=["VH", "VV", "B04", "B02"], offset=-1000),
                               out)
    with pytest.raises(ValueError, match="S1 are not among raw bands"):
        to_model_units(raw[:2], st, raw_bands=["B02", "B04"])


def test_stack_statistics_and_metadata_round_trip(tmp_path):
    st = get_sensor("S2L2A+S1", ["B02", "B03", "VV", "VH"])
    stats = BandStats(mean={"B02": 0.1, "B03": 0.2, "VV": -5.0, "VH": -15.0},
                      std={"B02": 0.01, "B03": 0.02, "VV": 2.0, "VH": 3.0})
    with_stats = st.with_stats(stats)
    np.testing.assert_allclose(with_stats.mean_array(), [0.1, 0.2, -5.0, -15.0])
    np.testing.assert_allclose(with_stats.parts[1].std_array(), [2.0, 3.0])  # the parts carry them too
    back = SensorSpec.from_dict(json.loads(json.dumps(with_stats.to_dict())))
    assert back.name == st.name and back.bands == st.bands and back.conversion == st.conversion
    np.testing.assert_allclose(back.mean_array(), with_stats.mean_array())
    with pytest.raises(ValueError, match="no statistics for band"):
        st.with_stats(BandStats(mean={"B02": 0.1}, std={"B02": 0.1}))


def test_band_units_follow_each_sensor():
    from eo_ssl.multicrop import band_units

    assert band_units(get_sensor("S2L2A+S1", ["B02", "B03", "VV", "VH", "VV/VH"])) == (
        "reflectance", "reflectance", "db", "db", "other")


# ------------------------------------------------------------------------------------------------------------
# pairing co-registered tiles
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def s2_s1_tiles(tmp_path):
    """Three S2 tiles (nodata 0) and their S1 tiles (NaN nodata) on the same grid, in mirrored folders."""
    rng = np.random.default_rng(1)
    for k in range(3):
        s2 = random_s2(rng, size=8)
        s2[:, 0, 0] = 0  # S2 no-data
        s1 = rng.normal(-15.0, 3.0, size=(2, 8, 8)).astype(np.float32)
        s1[1, 7, 7] = np.nan  # S1 no-data in one band
        write_tif(tmp_path / "s2" / "scene" / f"t{k}.tif", s2, nodata=0, band_names=S2L2A_BANDS)
        write_tif(tmp_path / "s1" / "scene" / f"t{k}.tif", s1, band_names=["VV", "VH"])
    return tmp_path


def parts(root, **kw):
    a = UnlabelledTiles(root / "s2", "S2L2A", fill_value=None, **kw)
    b = UnlabelledTiles(root / "s1", "S1", fill_value=None, **kw)
    return a, b


def test_stacked_sample_is_the_parts_side_by_side(s2_s1_tiles):
    a, b = parts(s2_s1_tiles)
    st = StackedDataset.join([a, b], return_georef=True)
    assert len(st) == 3 and st.spec.name == "S2L2A+S1" and st.bands == S2S1
    for i in range(3):
        s = st[i]
        ra, rb = a[i], b[i]
        valid = ra["valid"] & rb["valid"]
        assert s["id"] == ra["id"] and s["image"].dtype == torch.float32 and s["image"].shape == (14, 8, 8)
        assert torch.equal(s["valid"], valid)
        assert not s["valid"][0, 0] and not s["valid"][7, 7] and int(s["valid"].sum()) == 62
        stacked = torch.cat([ra["image"], rb["image"]])
        assert torch.equal(s["image"][:, valid], stacked[:, valid])
        # invalid pixels get the stack's band means (0 once normalised), in every band
        np.testing.assert_allclose(s["image"][:, 0, 0].numpy(), st.spec.mean_array())
        assert s["crs"] == ra["crs"] and s["transform"] == ra["transform"]


def test_pairing_follows_the_key_not_the_file_order(s2_s1_tiles, tmp_path):
    (tmp_path / "s1" / "scene" / "t0.tif").rename(tmp_path / "s1" / "scene" / "z_t0.tif")
    a, b = parts(s2_s1_tiles)
    with pytest.raises(ValueError, match=r"1 of 3 S2L2A samples have no S1 partner.*'scene/t0'.*stack_missing"):
        StackedDataset.join([a, b])
    st = StackedDataset.join([a, b], missing="skip")
    assert len(st) == 2 and st.skipped == ["scene/t0"] and st[0]["id"] == "t1"
    assert [b.sample_key(i) for i in range(3)] == ["scene/t1", "scene/t2", "scene/z_t0"]
    assert torch.equal(st[1]["image"][12:, 1:6, 1:6], b[1]["image"][:, 1:6, 1:6])


def test_stem_matching_refuses_ambiguous_names(s2_s1_tiles, tmp_path):
    write_tif(tmp_path / "s1" / "other" / "t1.tif", np.zeros((2, 8, 8), np.float32), band_names=["VV", "VH"])
    a, b = parts(s2_s1_tiles)
    with pytest.raises(ValueError, match="share the key 't1'"):
        StackedDataset.join([a, b], match="stem")
    assert len(StackedDataset.join([a, b], match="path")) == 3


def test_tiles_on_another_grid_are_refused_naming_both_files(s2_s1_tiles, tmp_path):
    shifted = (TEST_ORIGIN[0] + 10.0, TEST_ORIGIN[1])
    write_tif(tmp_path / "s1" / "scene" / "t2.tif", np.zeros((2, 8, 8), np.float32), band_names=["VV", "VH"],
              origin=shifted)
    a, b = parts(s2_s1_tiles)
    with pytest.raises(RasterError, match=r"s1/scene/t2.tif.*is not on the pixel grid of .*s2/scene/t2.tif"):
        StackedDataset.join([a, b])
    st = StackedDataset.join([a, b], check_grids=False)  # skipped at construction, still caught when read
    with pytest.raises(RasterError, match=r"sample 't2' of S1 .* is not on the grid of sample 't2' of S2L2A"):
        st[2]


def test_tiled_scenes_pair_tile_by_tile(s2_s1_tiles):
    a, b = parts(s2_s1_tiles, tile_size=4)
    st = StackedDataset.join([a, b])
    assert len(st) == 12 and st.sample_key(1) == "scene/t0@0_4"
    assert torch.equal(st[1]["image"][12:, 1:3, 1:3], b[1]["image"][:, 1:3, 1:3])


def test_parts_must_leave_the_transform_to_the_stack(s2_s1_tiles):
    a = UnlabelledTiles(s2_s1_tiles / "s2", "S2L2A", transform=lambda s: s)
    b = UnlabelledTiles(s2_s1_tiles / "s1", "S1")
    with pytest.raises(ValueError, match="give the stack the transform"):
        StackedDataset([a, b])


def test_real_bigearthnet_s1_patches_pair_with_their_s2_patches(bigearthnet_s2, bigearthnet_s1):
    s2 = BigEarthNetPatches(bigearthnet_s2, "S2L2A", fill_value=None)
    s1 = BigEarthNetPatches(bigearthnet_s1, "S1", bands=["VV", "VH", "VV/VH"], fill_value=None)
    st = StackedDataset.join([s2, s1], match="bigearthnet")
    assert len(st) == 6 and st.bands == S2S1 + ("VV/VH",)
    by_name = {s1.sample_key(i, "bigearthnet"): i for i in range(len(s1))}
    for i in (0, 5):
        s = st[i]
        j = by_name[s["id"]]
        meta = json.loads(next(s1.patches[j].glob("*_labels_metadata.json")).read_text())
        assert meta["corresponding_s2_patch"] == s["id"]
        assert torch.equal(s["image"][:12], s2[i]["image"]) and torch.equal(s["image"][12:], s1[j]["image"])
        assert torch.equal(s["labels"], s2[i]["labels"]) and s["image"].shape == (15, 120, 120)
    # the same pairing from the band-folder layout of the unlabelled reader (what pretraining uses)
    u2 = UnlabelledTiles(bigearthnet_s2, "S2L2A", glob="*/*.tif")
    u1 = UnlabelledTiles(bigearthnet_s1, "S1", glob="*/*_V*.tif")
    assert len(StackedDataset.join([u2, u1], match="bigearthnet")) == 6
    with pytest.raises(ValueError, match="no S1 partner"):
        StackedDataset.join([u2, u1], match="stem")


def test_stacked_segmentation_takes_masks_from_the_first_sensor(tiny_demo):
    root = tiny_demo / "s2" / "source"
    spec = get_sensor("S2L2A+S1")
    ds = stacked_segmentation_dataset(root, "val", spec, ["images", tiny_demo / "s1" / "source" / "images"],
                                      num_classes=6)
    s2 = SegmentationDataset(root, "val", sensor="S2L2A", num_classes=6)
    assert len(ds) == len(s2) and ds.bands == S2S1
    s = ds[3]
    assert s["id"] == s2.ids[3] and torch.equal(s["mask"], s2[3]["mask"])
    assert torch.equal(s["image"][:12], s2[3]["image"])
    with rasterio.open(tiny_demo / "s1" / "source" / "images" / f"{s2.ids[3]}.tif") as src:
        np.testing.assert_allclose(s["image"][12:].numpy(), src.read().astype(np.float32))
    with pytest.raises(ValueError, match="needs 2 image directories"):
        stacked_segmentation_dataset(root, "val", spec, ["images"], num_classes=6)


# ------------------------------------------------------------------------------------------------------------
# through pretraining, export, fine-tuning and prediction
# ------------------------------------------------------------------------------------------------------------
PRETRAIN = "configs/pretrain/demo_s2s1.yaml"
FINETUNE = "configs/finetune/demo_s2s1.yaml"


def pretrain_overrides(demo):
    return [f"data.root={demo}/s2", f"data.stack=[{{root: {demo}/s1, glob: '*/images/*.tif', sensor: S1}}]",
            f"probe.root={demo}/s2/source", "data.batch_size=4", "augment.global_size=32", "augment.local_size=16",
            "augment.local_number=2", "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16",
            "trainer.epochs=null", "trainer.max_steps=3", "dino.warmup_teacher_temp_epochs=0",
            "optim.warmup_epochs=0", "trainer.eval_every=3", "trainer.checkpoint_every=3",
            "trainer.progress_bar=false"]


def test_pretraining_dataset_fills_sensor_groups_and_refuses_raw_channel_copies(tiny_demo):
    from common.config import load_config
    from eo_ssl.pretrain import PretrainConfig, build_dataset, resolve_data_sensor

    cfg = load_config(PretrainConfig, PRETRAIN, pretrain_overrides(tiny_demo))
    spec = resolve_data_sensor(cfg.data)
    ds = build_dataset(cfg, spec)
    assert spec.name == "S2L2A+S1" and len(ds) == 48  # (16 train + 8 val) tiles x 2 domains
    assert ds.transform.cfg.sensor_groups == (tuple(range(12)), (12, 13))
    assert ds.transform.units == ("reflectance",) * 12 + ("db", "db")
    crops = ds[0]
    assert len(crops) == 4 and crops[0].shape == (14, 32, 32)
    raw = load_config(PretrainConfig, PRETRAIN, pretrain_overrides(tiny_demo) + ["augment.channel_mode=raw"])
    with pytest.raises(ValueError, match="channel_mode: normalized"):
        build_dataset(raw, spec)


@pytest.fixture(scope="module")
def stack_export(tiny_demo, tmp_path_factory):
    run = tmp_path_factory.mktemp("s2s1") / "pretrain"
    launch("ssl/pretrain.py", ["--config", PRETRAIN, "--output-dir", str(run), *pretrain_overrides(tiny_demo)])
    return run


def test_stack_export_describes_each_sensor_and_loads_in_timm(stack_export):
    import timm

    meta = json.loads((stack_export / "backbone.json").read_text())
    assert meta["sensor"] == "S2L2A+S1" and meta["bands"] == list(S2S1) and meta["in_chans"] == 14
    assert meta["normalisation"]["conversion"] == "dn_to_reflectance+db"
    assert [p["sensor"] for p in meta["sensor_parts"]] == ["S2L2A", "S1"]
    assert meta["sensor_parts"][1] == {"sensor": "S1", "bands": ["VV", "VH"], "conversion": "db", "units": "dB"}
    assert meta["source"]["data"]["stack"][0]["sensor"] == "S1"
    model = timm.create_model("resnet18", in_chans=14, num_classes=0,
                              checkpoint_path=str(stack_export / "backbone.safetensors"))
    assert model.conv1.weight.shape[1] == 14
    metrics = json.loads((stack_export / "metrics.json").read_text())
    assert "knn_top1" in metrics["last"]  # the probe read the S1 tiles too


def test_finetune_and_predict_on_the_stack(stack_export, tiny_demo, tmp_path):
    from finetune.predict import load_run_model, predict_raster

    weights = stack_export / "backbone.safetensors"
    run = tmp_path / "ft"
    common = [f"data.root={tiny_demo}/s2/source", f"data.stack=[{{sensor: S1, image_dir: {tiny_demo}/s1/source/images}}]",
              "trainer.max_steps=2", "trainer.eval_every=2", "trainer.progress_bar=false", "eval.num_images=0",
              "data.batch_size=2"]
    launch("finetune/semisup.py", ["--config", FINETUNE, "--output-dir", str(run), f"model.weights={weights}",
                                   *common])
    card = json.loads((run / "model.json").read_text())
    assert card["sensor"] == "S2L2A+S1" and card["bands"] == list(S2S1)
    assert card["normalisation"]["conversion"] == "dn_to_reflectance+db"

    # the export's S1 bands are missing from S2-only data: refused before training, naming them
    out = launch("finetune/semisup.py", ["--config", "configs/finetune/demo.yaml", "--output-dir", str(tmp_path / "x"),
                                         f"data.root={tiny_demo}/s2/source", f"model.weights={weights}"], check=False)
    assert out.returncode != 0 and "reads S2L2A" in out.stderr and "['VV', 'VH']" in out.stderr and "data.stack" in out.stderr

    # prediction from the S2 file + its S1 file equals prediction from one file holding all 14 bands
    model = load_run_model(run, "last")
    tile = sorted((tiny_demo / "s2" / "source" / "images").glob("*.tif"))[0]
    s1 = tiny_demo / "s1" / "source" / "images" / tile.name
    with rasterio.open(tile) as a, rasterio.open(s1) as b:
        both = np.concatenate([a.read().astype(np.float32), b.read().astype(np.float32)])
        profile = a.profile
    combined = tmp_path / "combined.tif"
    with rasterio.open(combined, "w", **{**profile, "count": 14, "dtype": "float32"}) as dst:
        dst.write(both)
        for i, name in enumerate(S2S1, start=1):
            dst.set_band_description(i, name)
    p1 = predict_raster(model, tile, tmp_path / "a.tif", stack_inputs=[str(s1.parent / "{stem}.tif")],
                        probabilities=True)
    p2 = predict_raster(model, combined, tmp_path / "b.tif", probabilities=True)
    with rasterio.open(p1.mask) as x, rasterio.open(p2.mask) as y:
        np.testing.assert_array_equal(x.read(), y.read())
    with rasterio.open(p1.probabilities) as x, rasterio.open(p2.probabilities) as y:
        np.testing.assert_allclose(x.read(), y.read(), atol=1e-5)
    # the command line: --stack-input per further sensor
    from finetune.predict import main as predict_main

    done = predict_main(["--run", str(run), "--checkpoint", "last", "--input", str(tile), "--output",
                         str(tmp_path / "cli"), "--stack-input", str(s1.parent / "{stem}.tif")])
    with rasterio.open(done[0].mask) as x, rasterio.open(p1.mask) as y:
        np.testing.assert_array_equal(x.read(), y.read())
    with pytest.raises(SystemExit):
        predict_main(["--run", str(run), "--input", str(tile), "--output", str(tmp_path / "cli2")])
    with pytest.raises(RasterError, match="need --stack-input for S1"):
        predict_raster(model, tile, tmp_path / "c.tif")
    with pytest.raises(ValueError, match="one --stack-input per sensor"):
        predict_raster(model, tile, tmp_path / "c.tif", stack_inputs=["a/{stem}.tif", "b/{stem}.tif"])
