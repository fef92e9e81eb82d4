"""Raster reads (real BigEarthNet and generated files), tiling, atomic writes and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from torch.utils.data import default_collate

from common.bands import get_sensor
from common.raster import (
    RasterError,
    Tile,
    find_band_files,
    raster_info,
    read_band_files,
    read_raster,
    tile_windows,
    unbatch_georef,
    write_geotiff,
)
from conftest import S2L2A_BANDS, TEST_CRS, write_tif


# ---------------------------------------------------------------------- real BigEarthNet data
def test_bigearthnet_s2_all_bands_on_10m_grid(s2_patch):
    s = read_band_files(s2_patch, S2L2A_BANDS, fallback_nodata=0)
    assert s.array.shape == (12, 120, 120) and s.array.dtype == np.float32
    assert s.band_names == S2L2A_BANDS and s.valid.all()
    with rasterio.open(find_band_files(s2_patch, ["B02"])["B02"]) as ref:
        assert s.transform == tuple(ref.transform)[:6]
        assert rasterio.crs.CRS.from_user_input(s.crs) == ref.crs
        np.testing.assert_array_equal(s.array[1], ref.read(1))  # 10 m band copied unchanged
    # 20 m band, nearest: every 2x2 block repeats one source pixel; 60 m band: 6x6 blocks.
    near = read_band_files(s2_patch, ["B05", "B01", "B04"], resampling="nearest")
    with rasterio.open(find_band_files(s2_patch, ["B05"])["B05"]) as b5, rasterio.open(
        find_band_files(s2_patch, ["B01"])["B01"]
    ) as b1:
        np.testing.assert_array_equal(near.array[0], np.kron(b5.read(1), np.ones((2, 2))))
        np.testing.assert_array_equal(near.array[1], np.kron(b1.read(1), np.ones((6, 6))))
    # bilinear stays within the source range and keeps the block means close
    bil = read_band_files(s2_patch, ["B05"])
    assert bil.array.min() >= near.array[0].min() and bil.array.max() <= near.array[0].max()


def test_bigearthnet_s1_vv_vh(s1_patch):
    s = read_band_files(s1_patch, ["VV", "VH"])
    assert s.array.shape == (2, 120, 120) and s.valid.all()
    assert -40 < float(s.array[1].mean()) < float(s.array[0].mean()) < 5  # dB, VH weaker than VV
    assert s.crs.startswith("EPSG:326") and s.transform[0] == 10.0


def test_band_file_errors(s2_patch, tmp_path):
    with pytest.raises(RasterError) as e:
        find_band_files(s2_patch, ["B02", "B10"])
    assert s2_patch.name in str(e.value) and "B10" in str(e.value) and "B8A" in str(e.value)
    write_tif(tmp_path / "p_B02.tif", np.ones((4, 4), np.uint16))
    write_tif(tmp_path / "p_B05.tif", np.ones((2, 2), np.uint16), pixel=20.0, crs="EPSG:32632")
    with pytest.raises(RasterError, match="p_B05.tif.*CRS"):
        read_band_files(tmp_path, ["B02", "B05"])
    write_tif(tmp_path / "p_B05.tif", np.ones((2, 2), np.uint16), pixel=20.0, origin=(404500.0, 5342400.0))
    with pytest.raises(RasterError, match="p_B05.tif.*footprint"):
        read_band_files(tmp_path, ["B02", "B05"])


# ---------------------------------------------------------------------- generated files
def _multiband(make_tif, nodata=None, dtype=np.float32):
    rng = np.random.default_rng(1)
    arr = rng.uniform(1, 100, size=(3, 20, 30)).astype(dtype)
    return arr, make_tif("multi.tif", arr, nodata=nodata, band_names=["B02", "B03", "B04"])


def test_band_selection_by_name_and_index(make_tif):
    arr, p = _multiband(make_tif)
    s = read_raster(p, bands=["B04", "B02"])
    assert s.band_names == ("B04", "B02")
    np.testing.assert_array_equal(s.array, arr[[2, 0]])
    np.testing.assert_array_equal(read_raster(p, bands=[3, 1]).array, arr[[2, 0]])  # 1-based indexes
    with pytest.raises(RasterError) as e:
        read_raster(p, bands=["B08"])
    assert "multi.tif" in str(e.value) and "B08" in str(e.value) and "B03" in str(e.value)
    with pytest.raises(RasterError, match="1-based"):
        read_raster(p, bands=[0])


def test_default_band_names_and_count_mismatch(make_tif):
    p = make_tif("plain.tif", np.ones((2, 4, 4), np.float32))
    assert read_raster(p, bands=["VH"], default_band_names=["VV", "VH"]).band_names == ("VH",)
    with pytest.raises(RasterError, match="plain.tif.*2 band"):
        read_raster(p, default_band_names=get_sensor("S2L2A").bands)
    with pytest.raises(RasterError, match="plain.tif.*no band descriptions"):
        read_raster(p, bands=["VV"])


def test_partial_band_descriptions(make_tif):
    """Gaps in the descriptions are filled from the assumed order only where the described bands agree with it."""
    arr = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    agree = make_tif("agree.tif", arr, band_names=["VV", "", "VV/VH"])
    assert read_raster(agree, default_band_names=["VV", "VH", "VV/VH"]).band_names == ("VV", "VH", "VV/VH")
    clash = make_tif("clash.tif", arr, band_names=["VH", "", ""])
    with pytest.raises(RasterError, match=r"clash.tif.*band 1 is 'VH' where the assumed order .* has 'VV'"):
        read_raster(clash, default_band_names=["VV", "VH", "VV/VH"])


def test_nodata_and_nan_make_invalid(make_tif):
    arr = np.full((2, 4, 4), 5.0, np.float32)
    arr[0, 0, 0] = -1  # declared nodata
    arr[1, 1, 1] = np.nan
    arr[1, 2, 2] = np.inf
    s = read_raster(make_tif("nd.tif", arr, nodata=-1.0))
    expect = np.ones((4, 4), bool)
    expect[0, 0] = expect[1, 1] = expect[2, 2] = False
    np.testing.assert_array_equal(s.valid, expect)
    u = np.full((1, 3, 3), 7, np.uint16)
    u[0, 1, 1] = 0
    p = make_tif("u.tif", u)  # no declared nodata -> fallback
    assert read_raster(p).valid.all()
    assert not read_raster(p, fallback_nodata=0).valid[1, 1]


def test_window_equals_slice_and_transform(make_tif):
    arr, p = _multiband(make_tif)
    full = read_raster(p)
    part = read_raster(p, window=(5, 7, 10, 12))  # row_off, col_off, height, width
    np.testing.assert_array_equal(part.array, full.array[:, 5:15, 7:19])
    a, b, c, d, e, f = full.transform
    assert part.transform == pytest.approx((a, b, c + 7 * a, d, e, f + 5 * e))
    t = Tile(5, 7, 10, 12)
    np.testing.assert_array_equal(read_raster(p, window=t).array, full.array[(slice(None),) + t.slices])
    with pytest.raises(RasterError, match="multi.tif.*beyond"):
        read_raster(p, window=(15, 0, 10, 10))
    pad = read_raster(p, window=(15, 0, 10, 10), boundless=True)
    assert pad.array.shape == (3, 10, 10) and pad.valid[:5].all() and not pad.valid[5:].any()
    np.testing.assert_array_equal(pad.array[:, :5], full.array[:, 15:, :10])


def test_out_shape_resampling(make_tif):
    arr, p = _multiband(make_tif)
    s = read_raster(p, out_shape=(10, 15), resampling="average")
    assert s.array.shape == (3, 10, 15) and s.transform[0] == pytest.approx(20.0)
    np.testing.assert_allclose(s.array[:, 0, 0], arr[:, :2, :2].mean(axis=(1, 2)), rtol=1e-5)


@pytest.mark.parametrize("h,w,tile,overlap", [(100, 70, 32, 0), (100, 70, 32, 8), (30, 30, 32, 4), (64, 64, 32, 0)])
def test_tile_windows_cover(h, w, tile, overlap):
    tiles = tile_windows(h, w, tile, overlap)
    cover = np.zeros((h, w), int)
    for t in tiles:
        assert t.row_off >= 0 and t.col_off >= 0 and t.row_off + t.height <= h and t.col_off + t.width <= w
        assert t.height == min(tile, h) and t.width == min(tile, w)
        cover[t.slices] += 1
    assert cover.min() >= 1
    assert max(t.row_off + t.height for t in tiles) == h and max(t.col_off + t.width for t in tiles) == w
    if h >= tile and overlap:
        rows = sorted({t.row_off for t in tiles})
        assert all(b - a <= tile - overlap for a, b in zip(rows, rows[1:]))
    with pytest.raises(ValueError):
        tile_windows(h, w, tile, tile)


def test_write_geotiff_round_trip(tmp_path):
    arr = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
    transform = (10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)
    out = write_geotiff(
        tmp_path / "sub" / "pred.tif", arr, TEST_CRS, transform, nodata=-9999.0, band_names=["p0", "p1"]
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["pred.tif"]  # no temp file left
    s = read_raster(out)
    np.testing.assert_array_equal(s.array, arr)
    assert s.crs == TEST_CRS and s.transform == transform and s.band_names == ("p0", "p1")
    assert raster_info(out).nodata == (-9999.0, -9999.0)
    palette = {0: (0, 0, 0), 1: (255, 0, 0)}
    cls = write_geotiff(tmp_path / "cls.tif", np.zeros((4, 4), np.uint8), "EPSG:4326", transform, colormap=palette)
    with rasterio.open(cls) as src:
        assert src.count == 1 and src.colormap(1)[1][:3] == (255, 0, 0)
    with pytest.raises(RasterError, match="bad.tif"):
        write_geotiff(tmp_path / "bad.tif", np.zeros((1, 2, 3, 4)), TEST_CRS, transform)


def test_unreadable_and_truncated_files(make_tif, tmp_path):
    with pytest.raises(RasterError, match="nope.tif.*does not exist"):
        read_raster(tmp_path / "nope.tif")
    txt = tmp_path / "text.tif"
    txt.write_text("not a raster")
    with pytest.raises(RasterError, match="text.tif"):
        raster_info(txt)
    p = make_tif("big.tif", np.random.default_rng(0).integers(0, 1000, (3, 200, 200)).astype(np.uint16))
    cut = tmp_path / "cut.tif"
    cut.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(RasterError, match="cut.tif.*truncated"):
        raster_info(cut)
    with pytest.raises(RasterError, match="cut.tif"):
        read_raster(cut)


def test_georef_survives_default_collate():
    samples = [{"crs": "EPSG:32633", "transform": (10.0, 0.0, float(i), 0.0, -10.0, 5.0)} for i in range(3)]
    batch = default_collate(samples)
    pairs = unbatch_georef(batch["crs"], batch["transform"])
    assert pairs == [(s["crs"], s["transform"]) for s in samples]
    stacked = torch.tensor([s["transform"] for s in samples], dtype=torch.float64)
    assert unbatch_georef(batch["crs"], stacked) == pairs
    assert unbatch_georef("EPSG:1", samples[0]["transform"]) == [("EPSG:1", samples[0]["transform"])]
