"""Datasets: sample contract on real BigEarthNet patches and generated tiles, and construction-time validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from common.bands import IGNORE_INDEX, get_sensor
from common.datasets import (
    BIGEARTHNET_CLASSES,
    BigEarthNetPatches,
    SegmentationDataset,
    SpaceNet6Tiles,
    UnlabelledTiles,
)
from common.raster import RasterError, unbatch_georef
from conftest import S2L2A_BANDS, TEST_ORIGIN, TEST_PIXEL, random_s2, write_tif


def _check_contract(sample, channels, size):
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (channels, size, size)
    assert sample["valid"].dtype == torch.bool and sample["valid"].shape == (size, size)
    assert isinstance(sample["index"], int)
    assert torch.isfinite(sample["image"]).all()
    if "mask" in sample:
        assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (size, size)


# ---------------------------------------------------------------------- BigEarthNet (real data)
def test_bigearthnet_s2_patches(bigearthnet_s2):
    ds = BigEarthNetPatches(bigearthnet_s2, "S2L2A", return_georef=True)
    assert len(ds) == 6 and ds.bands == S2L2A_BANDS
    s = ds[0]
    _check_contract(s, 12, 120)
    assert 0.0 < float(s["image"].mean()) < 1.0  # reflectance
    names = s["label_names"].split("|")
    assert set(names) == {BIGEARTHNET_CLASSES[i] for i in torch.nonzero(s["labels"]).flatten().tolist()}
    meta = json.loads(next(ds.patches[0].glob("*_labels_metadata.json")).read_text())
    assert names == meta["labels"]
    assert s["transform"][2] == meta["coordinates"]["ulx"] and s["transform"][5] == meta["coordinates"]["uly"]
    batch = next(iter(DataLoader(ds, batch_size=3, num_workers=1)))  # a worker process: no shared handles
    assert batch["image"].shape == (3, 12, 120, 120) and batch["labels"].shape == (3, 43)
    assert [c for c, _ in unbatch_georef(batch["crs"], batch["transform"])][0].startswith("EPSG:326")


def test_bigearthnet_s1_with_ratio(bigearthnet_s1):
    names = [p.name for p in sorted(bigearthnet_s1.iterdir())[:2]]
    ds = BigEarthNetPatches(bigearthnet_s1, "S1", ["VV", "VH", "VV/VH"], patches=names)
    s = ds[1]
    _check_contract(s, 3, 120)
    img = s["image"].numpy()
    np.testing.assert_allclose(img[2], img[0] / img[1], rtol=1e-5)
    with pytest.raises(ValueError, match="not found"):
        BigEarthNetPatches(bigearthnet_s1, "S1", patches=["nope"])
    with pytest.raises(ValueError, match="S2L2A"):
        BigEarthNetPatches(bigearthnet_s1, "SAR4")


def test_unlabelled_band_folders_auto(bigearthnet_s2):
    ds = UnlabelledTiles(bigearthnet_s2, "S2L2A", ["B04", "B03", "B02"])
    assert ds.layout == "band_files" and len(ds) == 6
    _check_contract(ds[5], 3, 120)


# ---------------------------------------------------------------------- generated tiles
def test_unlabelled_multiband_tiles(tmp_path):
    rng = np.random.default_rng(3)
    img = random_s2(rng, size=40)
    write_tif(tmp_path / "scene.tif", img, nodata=0)
    write_tif(tmp_path / "small.tif", random_s2(rng, size=20), nodata=0)
    ds = UnlabelledTiles(tmp_path, "S2L2A", ["B08", "B02"], tile_size=32, overlap=8, return_georef=True)
    assert ds.layout == "multiband" and len(ds) == 4 + 1
    s = ds[1]  # scene.tif sorts first: items 0..3 are its 2x2 tiles, item 4 is small.tif
    assert s["id"] == "scene" and ds[4]["id"] == "small"
    _check_contract(s, 2, 32)
    row, col = int(s["tile"][0]), int(s["tile"][1])
    expect = img[[7, 1], row : row + 32, col : col + 32].astype(np.float32) / 10000
    np.testing.assert_allclose(s["image"].numpy(), expect, rtol=1e-6)
    assert s["transform"][2] == TEST_ORIGIN[0] + col * TEST_PIXEL
    pad = ds[4]  # 20x20 file padded to the tile size with invalid pixels
    assert pad["image"].shape == (2, 32, 32) and not pad["valid"][20:].any() and pad["valid"][:20, :20].all()


def test_segmentation_splits_and_contract(seg_root):
    seen = {}

    def transform(sample):
        seen["types"] = (type(sample["image"]), type(sample["mask"]))
        sample["image"] = sample["image"][:, ::-1]  # numpy in: a negative-stride view must survive
        sample["mask"] = sample["mask"][::-1]
        sample["valid"] = sample["valid"][::-1]
        return sample

    ds = SegmentationDataset(seg_root, "labelled", num_classes=3, transform=transform)
    assert ds.ids == ["t0", "t1"]
    s = ds[0]
    _check_contract(s, 12, 16)
    assert seen["types"] == (np.ndarray, np.ndarray)
    mask, valid = s["mask"].flip(0), s["valid"].flip(0)
    assert not valid[0, :4].any() and (mask[0, :4] == IGNORE_INDEX).all()  # nodata -> invalid -> 255
    assert mask[15, 15] == IGNORE_INDEX and set(mask.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
    # invalid pixels are filled with the reference mean (-> 0 after normalisation)
    np.testing.assert_allclose(s["image"].flip(1)[:, 0, 0].numpy(), get_sensor("S2L2A").mean_array(), rtol=1e-6)
    un = SegmentationDataset(seg_root, "unlabelled.txt", labelled=False)
    assert "mask" not in un[0] and un.ids == ["t2"]
    assert len(SegmentationDataset(seg_root, None, num_classes=3, bands=["B04"])) == 4
    geo = SegmentationDataset(seg_root, ["t3"], num_classes=3, return_georef=True)[0]
    assert geo["crs"] == "EPSG:32633" and len(geo["transform"]) == 6


# ---------------------------------------------------------------------- bad inputs
def _expect(exc, name, fn):
    with pytest.raises(exc) as e:
        fn()
    assert name in str(e.value), str(e.value)
    return str(e.value)


def test_segmentation_bad_inputs(seg_root):
    img = seg_root / "images" / "t1.tif"
    mask = seg_root / "masks" / "t1.tif"
    good_img, good_mask = img.read_bytes(), mask.read_bytes()
    make = lambda **kw: SegmentationDataset(seg_root, "train_all", num_classes=3, **kw)  # noqa: E731

    img.write_bytes(good_img[: len(good_img) // 2])  # truncated image
    msg = _expect(RasterError, "t1.tif", make)
    assert "truncated" in msg
    img.write_bytes(good_img)

    write_tif(img, random_s2(np.random.default_rng(0), bands=10))  # wrong band count, no descriptions
    assert "10 band" in _expect(RasterError, "t1.tif", make)
    write_tif(img, random_s2(np.random.default_rng(0), bands=3), band_names=["B02", "B03", "B04"])
    assert "B08" in _expect(RasterError, "t1.tif", make)  # missing band name
    assert len(make(bands=["B04", "B02"])) == 3  # the same file is fine when only present bands are asked for
    img.write_bytes(good_img)

    write_tif(mask, np.zeros((8, 8), np.uint8))
    assert "size" in _expect(RasterError, "t1.tif", make)
    write_tif(mask, np.zeros((16, 16), np.uint8), crs="EPSG:32632")
    assert "CRS" in _expect(RasterError, "t1.tif", make)
    write_tif(mask, np.full((16, 16), 7, np.uint8))
    assert "7" in _expect(ValueError, "t1.tif", make)  # label outside the class list, found at construction
    lazy = make(label_check="access")
    lazy[0]
    _expect(ValueError, "t1.tif", lambda: lazy[1])  # ... or at first load
    mask.unlink()
    assert "mask" in _expect(ValueError, "t1.tif", make)
    mask.write_bytes(good_mask)

    (seg_root / "splits" / "bad.txt").write_text("t0\nt9\n")
    assert "t9" in _expect(ValueError, "bad.txt", lambda: SegmentationDataset(seg_root, "bad", num_classes=3))
    _expect(ValueError, "nosplit", lambda: SegmentationDataset(seg_root, "nosplit", num_classes=3))


def test_unlabelled_bad_inputs(tmp_path):
    write_tif(tmp_path / "a.tif", random_s2(np.random.default_rng(0), bands=4))
    _expect(RasterError, "a.tif", lambda: UnlabelledTiles(tmp_path, "S2L2A"))
    _expect(ValueError, "empty", lambda: UnlabelledTiles(tmp_path / "empty", "S2L2A"))


# ---------------------------------------------------------------------- SpaceNet-6-like SAR tiles
def _sar_root(tmp_path, geojson_features, crs_member=None):
    root = tmp_path / "sar"
    img = np.random.default_rng(0).uniform(0.001, 1.0, size=(4, 20, 20)).astype(np.float32)
    img[:, 19, 19] = 0  # nodata
    write_tif(root / "images" / "a.tif", img, nodata=0.0)
    doc = {"type": "FeatureCollection", "features": geojson_features}
    if crs_member:
        doc["crs"] = {"type": "name", "properties": {"name": crs_member}}
    (root / "geojson").mkdir(parents=True)
    (root / "geojson" / "a.geojson").write_text(json.dumps(doc))
    return root


def _square(x0, y0, x1, y1):
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}


def test_spacenet6_rasterises_footprints(tmp_path):
    x0, y0 = TEST_ORIGIN
    # a 5x4-pixel building, pixel columns 2..6, rows 3..6, in the tile CRS
    feat = _square(x0 + 20, y0 - 30, x0 + 70, y0 - 70)
    ds = SpaceNet6Tiles(_sar_root(tmp_path, [feat], crs_member="EPSG:32633"))
    s = ds[0]
    _check_contract(s, 4, 20)
    m = s["mask"].numpy()
    assert (m == 1).sum() == 20 and m[3:7, 2:7].min() == 1 and m[19, 19] == IGNORE_INDEX
    assert s["image"].max() <= 0.0  # linear intensity < 1 -> negative dB


def test_spacenet6_lonlat_geojson_and_mask_fallback(tmp_path):
    from rasterio.warp import transform_geom

    x0, y0 = TEST_ORIGIN
    feat = _square(x0 + 20, y0 - 30, x0 + 70, y0 - 70)
    feat["geometry"] = transform_geom("EPSG:32633", "EPSG:4326", feat["geometry"])
    root = _sar_root(tmp_path, [feat])  # no crs member: lon/lat coordinates -> EPSG:4326 (RFC 7946)
    m = SpaceNet6Tiles(root)[0]["mask"].numpy()
    assert 16 <= (m == 1).sum() <= 24 and m[4:6, 3:6].min() == 1
    (root / "geojson" / "a.geojson").unlink()
    _expect(ValueError, "a.geojson", lambda: SpaceNet6Tiles(root))
    mask = np.zeros((20, 20), np.uint8)
    mask[:2] = 1
    write_tif(root / "masks" / "a.tif", mask)
    assert (SpaceNet6Tiles(root)[0]["mask"] == 1).sum() == 40
    (root / "geojson" / "a.geojson").write_text("{broken")
    _expect(ValueError, "a.geojson", lambda: SpaceNet6Tiles(root))


def test_spacenet6_small_projected_coordinates_stay_in_tile_crs(tmp_path):
    root = tmp_path / "sar"
    write_tif(root / "images" / "b.tif", np.ones((4, 10, 10), np.float32), origin=(0.0, 100.0))
    doc = {"type": "FeatureCollection", "features": [_square(0.0, 100.0, 30.0, 80.0)]}  # lon/lat-sized numbers
    (root / "geojson").mkdir()
    (root / "geojson" / "b.geojson").write_text(json.dumps(doc))
    assert (SpaceNet6Tiles(root)[0]["mask"] == 1).sum() == 6  # 3x2 pixels in the tile's own CRS
