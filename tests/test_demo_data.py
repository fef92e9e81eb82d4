"""Built-in demo data (common.demo_data): layout contract, GeoTIFF metadata, determinism, SAR footprints, splits,
and cheap proxies of the calibration (texture needed for crops vs grass, a real domain shift)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize

from common.bands import IGNORE_INDEX, get_sensor
from common.demo_data import (
    CLASS_NAMES,
    CROPLAND,
    DOMAINS,
    FOREST,
    GRASSLAND,
    generate,
    main,
)

TINY = dict(tiles=8, val_tiles=4, size=32, sar_scenes=2, sar_grid=2, sar_size=32, sar_overlap=8)
S2_SPLITS = ("train_all", "labelled_1_8", "unlabelled_1_8", "labelled_1_32", "unlabelled_1_32", "val")
SAR_SPLITS = ("train_all", "labelled_1_8", "unlabelled_1_8", "val")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "data"
    return out, generate(out, seed=3, **TINY)


def _ids(path: Path) -> list[str]:
    return path.read_text().split()


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_layout_follows_contract(demo):
    root, meta = demo
    assert json.loads((root / "dataset.json").read_text()) == meta
    assert meta["classes"] == list(CLASS_NAMES) and len(meta["palette"]) == len(CLASS_NAMES)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in meta["palette"])
    assert set(meta["domains"]) == set(DOMAINS) == {"source", "target"}
    assert meta["seed"] == 3 and meta["settings"]["tiles"] == 8 and meta["ignore_index"] == IGNORE_INDEX
    for dom in DOMAINS:
        for split in S2_SPLITS:
            assert (root / "s2" / dom / "splits" / f"{split}.txt").is_file()
        ids = _ids(root / "s2" / dom / "splits" / "train_all.txt") + _ids(root / "s2" / dom / "splits" / "val.txt")
        assert len(ids) == 12
        for i in ids:
            for sub in ("s2/{d}/images", "s2/{d}/masks", "s1/{d}/images", "s1/{d}/masks"):
                assert (root / sub.format(d=dom) / f"{i}.tif").is_file()
        for split in S2_SPLITS:  # each S1 domain is a segmentation dataset of its own, with the S2 labels
            assert (root / "s1" / dom / "splits" / f"{split}.txt").read_text() == \
                (root / "s2" / dom / "splits" / f"{split}.txt").read_text()
        tid = ids[0]
        np.testing.assert_array_equal(_read(root / "s1" / dom / "masks" / f"{tid}.tif"),
                                      _read(root / "s2" / dom / "masks" / f"{tid}.tif"))
    sar_ids = _ids(root / "sar" / "splits" / "train_all.txt") + _ids(root / "sar" / "splits" / "val.txt")
    assert len(sar_ids) == 2 * 2 * 2
    for i in sar_ids:
        assert (root / "sar" / "images" / f"{i}.tif").is_file()
        assert (root / "sar" / "masks" / f"{i}.tif").is_file()
        assert (root / "sar" / "geojson" / f"{i}.geojson").is_file()


def test_geotiff_metadata(demo):
    root, _ = demo
    s2_bands, s1_bands, sar_bands = (get_sensor(n).bands for n in ("S2L2A", "S1", "SAR4"))
    for dom, epsg in (("source", 32633), ("target", 32630)):
        tid = _ids(root / "s2" / dom / "splits" / "train_all.txt")[0]
        with rasterio.open(root / "s2" / dom / "images" / f"{tid}.tif") as src:
            assert src.crs.to_epsg() == epsg and src.count == 12 and src.dtypes[0] == "uint16"
            assert src.nodata == 0 and src.descriptions == s2_bands
            assert src.transform.a == 10 and src.transform.e == -10 and src.transform.c > 1e5
            assert (src.width, src.height) == (32, 32)
            s2_transform = src.transform
        with rasterio.open(root / "s2" / dom / "masks" / f"{tid}.tif") as src:
            assert src.dtypes[0] == "uint8" and src.nodata == IGNORE_INDEX and src.transform == s2_transform
        with rasterio.open(root / "s1" / dom / "images" / f"{tid}.tif") as src:
            assert src.crs.to_epsg() == epsg and src.transform == s2_transform  # co-registered
            assert src.descriptions == s1_bands and src.dtypes == ("float32", "float32")
            s1 = src.read()
            assert np.isnan(src.nodata) and np.isfinite(s1).all() and -45 < s1.mean() < 5  # dB
    sid = _ids(root / "sar" / "splits" / "train_all.txt")[0]
    with rasterio.open(root / "sar" / "images" / f"{sid}.tif") as src:
        assert src.crs.to_epsg() == 32631 and src.descriptions == sar_bands and src.dtypes[0] == "float32"
        assert src.nodata == 0 and src.transform.a == 0.5 and src.transform.e == -0.5
        assert (src.read() >= 0).all()
    with rasterio.open(root / "sar" / "masks" / f"{sid}.tif") as src:
        assert src.dtypes[0] == "uint8" and src.crs.to_epsg() == 32631


def test_masks_and_nodata(demo):
    root, _ = demo
    for dom in DOMAINS:
        for p in sorted((root / "s2" / dom / "masks").glob("*.tif")):
            mask = _read(p)[0]
            assert set(np.unique(mask)) <= set(range(len(CLASS_NAMES))) | {IGNORE_INDEX}
            dn = _read(root / "s2" / dom / "images" / p.name)
            np.testing.assert_array_equal((dn == 0).all(0), mask == IGNORE_INDEX)
            assert ((dn == 0).any(0) == (dn == 0).all(0)).all()  # nodata in all bands or none
    for p in (root / "sar" / "masks").glob("*.tif"):
        assert set(np.unique(_read(p))) <= {0, 1}


def test_same_seed_identical_other_seed_different(demo, tmp_path):
    root, _ = demo
    generate(tmp_path / "again", seed=3, **TINY)
    assert _digests(root) == _digests(tmp_path / "again")
    generate(tmp_path / "other", seed=4, **TINY)
    a = _read(root / "s2" / "source" / "images" / "source_00000.tif")
    b = _read(tmp_path / "other" / "s2" / "source" / "images" / "source_00000.tif")
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert _digests(root).keys() == _digests(tmp_path / "other").keys()


def test_sar_masks_match_geojson_footprints(demo):
    root, meta = demo
    inter = union = 0
    n_buildings = 0
    for tid in meta["sar"]["tiles"]:
        gj = json.loads((root / "sar" / "geojson" / f"{tid}.geojson").read_text())
        assert gj["type"] == "FeatureCollection" and gj["crs"]["properties"]["name"].endswith("32631")
        with rasterio.open(root / "sar" / "masks" / f"{tid}.tif") as src:
            mask, transform, shape = src.read(1), src.transform, src.shape
        geoms = [f["geometry"] for f in gj["features"]]
        assert all(g["type"] == "Polygon" for g in geoms)
        n_buildings += len(geoms)
        burnt = rasterize([(g, 1) for g in geoms], out_shape=shape, transform=transform, dtype="uint8") if geoms \
            else np.zeros(shape, np.uint8)  # fmt: skip
        inter += int((burnt & mask).sum())
        union += int((burnt | mask).sum())
    assert n_buildings > 0 and inter / union > 0.97


def test_sar_tiles_overlap_within_scenes(demo):
    root, meta = demo
    tiles = meta["sar"]["tiles"]
    a, b = "sar_s00_r0000_c0000", "sar_s00_r0000_c0024"
    assert tiles[b]["scene"] == tiles[a]["scene"] and tiles[b]["col_off"] - tiles[a]["col_off"] == 24
    ia, ib = _read(root / "sar" / "images" / f"{a}.tif"), _read(root / "sar" / "images" / f"{b}.tif")
    np.testing.assert_array_equal(ia[:, :, 24:], ib[:, :, :8])  # the 8 px overlap holds the same pixels


def test_splits_disjoint_and_covering(demo):
    root, meta = demo
    for dom in DOMAINS:
        s = {k: _ids(root / "s2" / dom / "splits" / f"{k}.txt") for k in S2_SPLITS}
        assert len(s["labelled_1_8"]) == 1 and len(s["train_all"]) == 8
        assert not set(s["labelled_1_8"]) & set(s["unlabelled_1_8"])
        assert sorted(s["labelled_1_8"] + s["unlabelled_1_8"]) == sorted(s["train_all"])
        assert len(s["labelled_1_32"]) == 1 and set(s["labelled_1_32"]) <= set(s["labelled_1_8"])
        assert sorted(s["labelled_1_32"] + s["unlabelled_1_32"]) == sorted(s["train_all"])
        assert not set(s["train_all"]) & set(s["val"])
    train = _ids(root / "sar" / "splits" / "train_all.txt")
    val = _ids(root / "sar" / "splits" / "val.txt")
    scenes = lambda ids: {meta["sar"]["tiles"][i]["scene"] for i in ids}  # noqa: E731
    assert train and val and not scenes(train) & scenes(val)  # overlapping tiles never straddle splits


def _sar_overlap(meta: dict, a: str, b: str) -> bool:
    ta, tb, size = meta["sar"]["tiles"][a], meta["sar"]["tiles"][b], meta["sar"]["tile_size"]
    return ta["scene"] == tb["scene"] and abs(ta["row_off"] - tb["row_off"]) < size \
        and abs(ta["col_off"] - tb["col_off"]) < size


def _check_sar_semisup(root: Path, meta: dict) -> dict[str, list[str]]:
    s = {k: _ids(root / "sar" / "splits" / f"{k}.txt") for k in SAR_SPLITS}
    info = meta["sar"]["semisup_split"]
    assert meta["sar"]["splits"] == {k: len(v) for k, v in s.items()}
    assert s["labelled_1_8"] and s["unlabelled_1_8"]
    assert len(s["labelled_1_8"]) == max(1, round(len(s["train_all"]) / 8))
    assert not set(s["labelled_1_8"]) & set(s["unlabelled_1_8"])
    left_out = info["left_out_overlapping_labelled"]
    assert sorted(s["labelled_1_8"] + s["unlabelled_1_8"] + left_out) == sorted(s["train_all"])
    straddling = {u for u in s["unlabelled_1_8"] for lab in s["labelled_1_8"] if _sar_overlap(meta, u, lab)}
    assert straddling == set(info["overlapping_labelled"])
    assert all(any(_sar_overlap(meta, t, lab) for lab in s["labelled_1_8"]) for t in left_out)
    return s


def test_sar_semisup_splits_tiny(demo):
    """At the tiny settings (one training scene of 2 x 2 overlapping tiles) every other tile overlaps the labelled
    one: the splits stay non-empty (1 labelled, 3 unlabelled) and the overlap is declared."""
    root, meta = demo
    s = _check_sar_semisup(root, meta)
    assert (len(s["labelled_1_8"]), len(s["unlabelled_1_8"])) == (1, 3)
    assert sorted(meta["sar"]["semisup_split"]["overlapping_labelled"]) == sorted(s["unlabelled_1_8"])


@pytest.mark.parametrize("scenes, grid, whole", [(3, 3, 0), (17, 2, 2)])
def test_sar_semisup_splits_keep_overlapping_tiles_apart(tmp_path, scenes, grid, whole):
    """Larger SAR settings: the labelled tiles are whole scenes and/or one compact block, no unlabelled tile overlaps
    a labelled one (those are left out, listed in dataset.json), deterministic for a seed."""
    sizes = {"tiles": 1, "val_tiles": 1, "size": 16, "sar_scenes": scenes, "sar_grid": grid, "sar_size": 16,
             "sar_overlap": 4}
    meta = generate(tmp_path / "a", seed=5, **sizes)
    s = _check_sar_semisup(tmp_path / "a", meta)
    info = meta["sar"]["semisup_split"]
    assert not info["overlapping_labelled"] and len(info["labelled_whole_scenes"]) == whole
    tiles = meta["sar"]["tiles"]
    lab_scenes = {tiles[i]["scene"] for i in s["labelled_1_8"]}
    assert not set(info["labelled_whole_scenes"]) & {tiles[i]["scene"] for i in s["unlabelled_1_8"]}
    assert len(lab_scenes) == whole + (len(s["labelled_1_8"]) > whole * grid * grid)
    if scenes == 3:  # 18 training tiles: 2 labelled side by side in a corner, the 4 tiles around them left out
        assert len(s["labelled_1_8"]) == 2 and len(info["left_out_overlapping_labelled"]) == 4
    again = generate(tmp_path / "b", seed=5, **sizes)
    assert again["sar"]["semisup_split"] == info
    for k in ("labelled_1_8", "unlabelled_1_8"):
        assert _ids(tmp_path / "b" / "sar" / "splits" / f"{k}.txt") == s[k]


def test_calibration_proxies(tmp_path):
    """Per-pixel spectra cannot tell crops from grass; source and target spectra differ."""
    root = tmp_path / "calib"
    generate(root, seed=0, tiles=24, val_tiles=8, size=48, sar_scenes=2, sar_grid=1, sar_size=16, sar_overlap=0)

    def pixels(dom: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for p in sorted((root / "s2" / dom / "masks").glob("*.tif")):
            ys.append(_read(p)[0].ravel())
            xs.append(_read(root / "s2" / dom / "images" / p.name).reshape(12, -1).T / 1e4)
        return np.concatenate(xs), np.concatenate(ys)

    x, y = pixels("source")
    # Nearest class mean (standardised spectra), crops vs grass only, half the pixels to fit, half to test.
    keep = (y == CROPLAND) | (y == GRASSLAND)
    x, y = (x[keep] - x[keep].mean(0)) / x[keep].std(0), y[keep]
    fit = np.arange(len(y)) % 2 == 0
    means = np.stack([x[fit & (y == c)].mean(0) for c in (CROPLAND, GRASSLAND)])
    pred = np.where(((x[~fit] - means[0]) ** 2).sum(1) < ((x[~fit] - means[1]) ** 2).sum(1), CROPLAND, GRASSLAND)
    acc = (pred == y[~fit]).mean()
    assert acc < 0.70, f"crops vs grass separable per pixel ({acc:.2f}): texture would not be needed"

    # Domain shift: the target's vegetation is drier (lower NDVI = (B08 - B04) / (B08 + B04)) than the source's.
    xs, ys = pixels("source")
    xt, yt = pixels("target")

    def ndvi(x: np.ndarray) -> float:
        return float(((x[:, 7] - x[:, 3]) / (x[:, 7] + x[:, 3])).mean())

    drops = [ndvi(xs[ys == c]) - ndvi(xt[yt == c]) for c in (FOREST, CROPLAND, GRASSLAND)]
    assert np.mean(drops) > 0.035, f"NDVI drop source -> target per class (forest, crop, grass): {drops}"


def test_cli_idempotent_and_guarded(tmp_path, capsys):
    args = ["--out", str(tmp_path / "d"), "--seed", "1", "--tiles", "2", "--val-tiles", "1", "--size", "16",
            "--sar-scenes", "2", "--sar-grid", "1", "--sar-size", "16", "--sar-overlap", "0"]  # fmt: skip
    assert main(args) == 0
    stamp = (tmp_path / "d" / "dataset.json").stat().st_mtime_ns
    assert main(args) == 0  # same settings: kept as is
    assert (tmp_path / "d" / "dataset.json").stat().st_mtime_ns == stamp
    assert main(args[:-1] + ["2"]) == 2 and "overwrite" in capsys.readouterr().err
    assert main(args[:-1] + ["2", "--overwrite"]) == 0
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["settings"]["sar_overlap"] == 2


def test_a_dataset_of_an_older_generator_is_regenerated(tmp_path):
    out = tmp_path / "d"
    meta = generate(out, seed=1, **TINY)
    old = {**meta, "format": "eoseg-demo/1"}
    (out / "dataset.json").write_text(json.dumps(old))
    (out / "sar" / "splits" / "labelled_1_8.txt").unlink()  # written by this version only
    assert generate(out, seed=1, **TINY) == meta
    assert (out / "sar" / "splits" / "labelled_1_8.txt").is_file()


def test_a_dataset_written_before_a_setting_existed_is_kept_with_its_default(tmp_path):
    out = tmp_path / "d"
    meta = generate(out, seed=1, **TINY)
    old = {**meta, "settings": {k: v for k, v in meta["settings"].items() if k != "pool_tiles"}}
    (out / "dataset.json").write_text(json.dumps(old))
    assert generate(out, seed=1, **TINY) == old  # kept: pool_tiles defaults to 0, the settings it was written with
    with pytest.raises(FileExistsError):
        generate(out, seed=1, **{**TINY, "pool_tiles": 2})


def test_the_pretraining_pool_adds_images_and_changes_nothing_else(demo, tmp_path):
    root, meta = demo
    pooled = tmp_path / "pooled"
    pmeta = generate(pooled, seed=3, **TINY, pool_tiles=3)
    n = TINY["tiles"] + TINY["val_tiles"]
    for dom in DOMAINS:
        pool = _ids(pooled / "s2" / dom / "splits" / "pool.txt")
        assert pool == [f"{dom}_{i:05d}" for i in range(n, n + 3)] and pmeta["domains"][dom]["tiles"]["pool"] == 3
        for sensor in ("s2", "s1"):
            for split in S2_SPLITS:  # the labelled, unlabelled and validation tiles are the pool-less dataset's
                assert _ids(pooled / sensor / dom / "splits" / f"{split}.txt") == \
                    _ids(root / sensor / dom / "splits" / f"{split}.txt")
            for tile in _ids(root / sensor / dom / "splits" / "train_all.txt")[:2]:
                np.testing.assert_array_equal(_read(pooled / sensor / dom / "images" / f"{tile}.tif"),
                                              _read(root / sensor / dom / "images" / f"{tile}.tif"))
            for tile in pool:  # images without masks, in the same grid layout
                assert (pooled / sensor / dom / "images" / f"{tile}.tif").is_file()
                assert not (pooled / sensor / dom / "masks" / f"{tile}.tif").exists()
        assert not (root / "s2" / dom / "splits" / "pool.txt").exists()  # no pool, no split file
        assert pmeta["domains"][dom]["class_frequency"] == meta["domains"][dom]["class_frequency"]


@pytest.mark.parametrize("bad", [dict(tiles=0), dict(size=8), dict(sar_scenes=1), dict(sar_overlap=64),
                                 dict(shift=1.5), dict(pool_tiles=-1), dict(bogus=1)])  # fmt: skip
def test_invalid_settings(tmp_path, bad):
    with pytest.raises(ValueError):
        generate(tmp_path, seed=0, **bad)


# ------------------------------------------------------------------------------------------------------------
# per-sensor statistics and the demo configs that use them
# ------------------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
SENSOR_DIRS = {"S2L2A": "s2", "S1": "s1", "SAR4": "sar"}
# demo config -> the data.root override that puts it on the generated demo (relative to the demo root)
DEMO_CONFIGS = {
    "pretrain/demo.yaml": ".", "pretrain/demo_long.yaml": ".", "pretrain/demo_s2s1.yaml": "s2",
    "finetune/demo.yaml": "s2/source", "finetune/demo_s2s1.yaml": "s2/source", "finetune/demo_sar.yaml": "sar",
    "finetune/demo_uda.yaml": "s2/source", "finetune/demo_uda_s1.yaml": "s1/source",
}


def test_generator_writes_each_sensors_statistics_with_common_stats(demo):
    from common.bands import BandStats
    from common.stats import compute_band_stats

    root, meta = demo
    assert meta["stats_files"] == {"s2": "s2/stats.json", "s1": "s1/stats.json", "sar": "sar/stats.json"}
    for sensor, sub in SENSOR_DIRS.items():
        stats = BandStats.from_json(root / sub / "stats.json")
        pattern = "images/*.tif" if sub == "sar" else "*/images/*.tif"
        expect = compute_band_stats(root / sub, sensor, glob=pattern, layout="multiband")
        assert stats.sensor == sensor and stats.bands == get_sensor(sensor).bands
        assert stats.mean == pytest.approx(expect.mean, rel=1e-12) and stats.std == pytest.approx(expect.std)
        assert stats.source["samples"] == len(list(root.glob(f"{sub}/{pattern}")))


def test_a_kept_dataset_without_statistics_gets_them(tmp_path):
    out = tmp_path / "d"
    generate(out, seed=1, **TINY)
    before = (out / "s2" / "stats.json").read_text()
    for sub in SENSOR_DIRS.values():
        (out / sub / "stats.json").unlink()  # a dataset generated before the statistics files existed
    generate(out, seed=1, **TINY)
    assert (out / "s2" / "stats.json").read_text() == before and (out / "sar" / "stats.json").is_file()


def _load(name: str, root: Path, *extra: str):
    from common.config import load_config

    if name.startswith("pretrain/"):
        from eo_ssl.pretrain import PretrainConfig as cls
    elif "uda" in name:
        from finetune.uda import UDAConfig as cls
    else:
        from finetune.semisup import FinetuneConfig as cls
    return load_config(cls, REPO / "configs" / name, [f"data.root={root}", *extra])


def _spec(name: str, cfg):
    if name.startswith("pretrain/"):
        from eo_ssl.pretrain import resolve_data_sensor

        return resolve_data_sensor(cfg.data)
    from finetune.inputs import resolve_inputs

    return resolve_inputs(cfg.data, cfg.model).spec


def _normalised_moments(files: list[Path], spec) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std over the valid pixels of ``files``, normalised with ``spec``'s statistics."""
    from common.datasets import UnlabelledTiles
    from common.stats import compute_band_stats

    ds = UnlabelledTiles([str(f) for f in files], sensor=spec, layout="multiband", fill_value=None)
    stats = compute_band_stats(ds)
    mean, std = stats.arrays(spec.bands)
    return (mean - spec.mean_array()) / spec.std_array(), std / spec.std_array()


@pytest.mark.parametrize("name", sorted(DEMO_CONFIGS))
def test_demo_configs_normalise_demo_data_to_zero_mean_unit_std(demo, name):
    """Every band of the demo data a config reads comes out with mean ~0 and std ~1 after its normalisation (the
    BigEarthNet reference statistics gave demo B09 a mean of -0.9). Pretraining configs: the tiles they pretrain on
    (both domains). Fine-tuning configs: the sensor's demo tiles the statistics describe (both domains, as the demo
    export's; the source domain alone sits within the designed domain shift of that)."""
    root, _ = demo
    cfg = _load(name, root / DEMO_CONFIGS[name])
    spec = _spec(name, cfg)
    parts = spec.parts or (spec,)
    for part in parts:
        sub = SENSOR_DIRS[part.name]
        pattern = "images/*.tif" if sub == "sar" else "*/images/*.tif"
        files = sorted(root.glob(f"{sub}/{pattern}"))
        if name == "pretrain/demo_long.yaml":  # its tiles: the validation tiles are left out
            val = {i for p in cfg.data.exclude_ids_from for i in Path(p).read_text().split()}
            files = [f for f in files if f.stem not in val]
        assert files
        mean, std = _normalised_moments(files, part)
        assert np.abs(mean).max() < 0.1, dict(zip(part.bands, mean.round(3)))
        assert np.abs(std - 1).max() < 0.1, dict(zip(part.bands, std.round(3)))


@pytest.mark.parametrize("pretrain, finetune, sub", [("pretrain/demo.yaml", "finetune/demo.yaml", "."),
                                                     ("pretrain/demo_s2s1.yaml", "finetune/demo_s2s1.yaml", "s2")])
def test_fine_tuning_the_demo_export_uses_the_demo_statistics_consistently(demo, tmp_path, pretrain, finetune, sub):
    """The demo fine-tuning config with the export of the demo pretraining config: accepted (its stats file agrees
    with the export), and both normalise with the demo statistics."""
    import timm
    from safetensors.torch import save_file

    from common.bands import BandStats
    from common.config import save_config
    from eo_ssl.export import TEACHER_PREFIX, export_run
    from finetune.inputs import resolve_inputs

    root, _ = demo
    pre = _load(pretrain, root / sub, "model.arch=resnet10t")
    run = tmp_path / "pretrain"
    save_config(pre, run / "config.yaml")  # as ssl/pretrain.py does: the resolved config
    n = len(_spec(pretrain, pre).bands)
    backbone = timm.create_model("resnet10t", in_chans=n, num_classes=0).state_dict()
    (run / "checkpoints").mkdir()
    save_file({TEACHER_PREFIX + k: v for k, v in backbone.items()}, str(run / "checkpoints" / "last.safetensors"),
              metadata={"step": "1"})
    weights, sidecar = export_run(run)
    export = json.loads(sidecar.read_text())["normalisation"]
    ft = _load(finetune, root / "s2" / "source", f"model.weights={weights}", "model.arch=resnet10t")
    inputs = resolve_inputs(ft.data, ft.model)
    s2 = BandStats.from_json(root / "s2" / "stats.json")
    expect_mean = list(s2.mean.values())
    expect_std = list(s2.std.values())
    if inputs.spec.parts:
        s1 = BandStats.from_json(root / "s1" / "stats.json")
        expect_mean += list(s1.mean.values())
        expect_std += list(s1.std.values())
    assert inputs.export is not None and list(inputs.spec.bands) == export_bands(sidecar)
    np.testing.assert_allclose(inputs.spec.mean_array(), export["mean"], rtol=1e-6)
    np.testing.assert_allclose(inputs.spec.std_array(), export["std"], rtol=1e-6)
    np.testing.assert_allclose(export["mean"], expect_mean, rtol=1e-6)
    np.testing.assert_allclose(export["std"], expect_std, rtol=1e-6)


def export_bands(sidecar: Path) -> list[str]:
    return json.loads(sidecar.read_text())["bands"]
