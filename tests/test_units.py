"""Input units: complex SAR, SAR files already in dB, files without band descriptions, custom sensors from the
config (HLS, Landsat, a band subset), empty split files, and the DataError family of the data layer.

Expected values are computed by hand: a complex pixel 3+4j has intensity |z|^2 = 25, i.e. 10 log10 25 = 13.979 dB,
and amplitude |z| = 5; HLS DN 1234 with scale 0.0001 is reflectance 0.1234; Landsat Collection 2 DN 10000 with scale
0.0000275 and offset -0.2 is 0.075.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import rasterio
from affine import Affine

from common.bands import (
    SensorDef,
    SensorSpec,
    UnknownSensorError,
    check_raw_values,
    get_sensor,
    resolve_sensor,
    to_model_units,
)
from common.config import ConfigError, build_config
from common.datasets import BigEarthNetPatches, SegmentationDataset, UnlabelledTiles
from common.errors import DataError
from common.raster import RasterError, read_raster
from common.weights import ExportMismatchError

from conftest import S2L2A_BANDS, TEST_CRS, TEST_ORIGIN, TEST_PIXEL, random_s2, write_tif

SAR4 = ("HH", "HV", "VH", "VV")
DB_3_4J = 10 * math.log10(25.0)  # 13.979 dB


def _complex_tif(path, dtype="complex64", value=3 + 4j, size=8, band_names=SAR4):
    arr = np.full((len(band_names), size, size), value, dtype=np.complex128)
    arr[1] = value * 2  # HV: |z|^2 = 100 -> 20 dB
    if dtype == "complex_int16":  # GDAL CInt16 (Capella / ICEYE SLC): written through rasterio's complex_int16
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=len(band_names),
                           dtype="complex_int16", crs=TEST_CRS,
                           transform=Affine(TEST_PIXEL, 0, TEST_ORIGIN[0], 0, -TEST_PIXEL, TEST_ORIGIN[1])) as dst:
            dst.write(arr.astype(np.complex64))
            for i, n in enumerate(band_names, start=1):
                dst.set_band_description(i, n)
        return path
    return write_tif(path, arr.astype(dtype), band_names=band_names)


# ------------------------------------------------------------------------------------------------------------
# 1. complex SAR
# ------------------------------------------------------------------------------------------------------------


def test_complex_conversions_by_hand():
    z = np.full((4, 2, 2), 3 + 4j, np.complex64)
    db = to_model_units(z, get_sensor("SAR4").with_input_units("complex"))
    assert db.dtype == np.float32 and np.allclose(db, DB_3_4J, atol=1e-5)
    assert DB_3_4J == pytest.approx(13.979, abs=1e-3)
    amp = SensorDef(name="SLC-AMP", bands=SAR4, input_units="complex", model_units="amplitude", gsd=0.5,
                    mean=dict.fromkeys(SAR4, 1.0), std=dict.fromkeys(SAR4, 1.0)).to_spec()
    assert amp.conversion == "complex_to_amplitude" and np.allclose(to_model_units(z, amp), 5.0)
    # real pixels for a complex conversion, complex pixels for a real one: refused by name
    with pytest.raises(DataError, match="band HH holds real float32 pixels"):
        to_model_units(np.ones((4, 2, 2), np.float32), get_sensor("SAR4").with_input_units("complex"))
    with pytest.raises(DataError, match=r"band HH holds complex pixels.*keep only the real part.*"
                                        r"data.input_units: complex"):
        to_model_units(z, get_sensor("SAR4"))


@pytest.mark.parametrize("dtype", ["complex64", "complex128", "complex_int16"])
def test_complex_file_is_intensity_db(tmp_path, dtype):
    path = _complex_tif(tmp_path / "slc.tif", dtype)
    assert np.iscomplexobj(read_raster(path).array)  # the reader never drops the imaginary part
    ds = UnlabelledTiles(path, sensor="SAR4", input_units="complex")
    assert ds.spec.conversion == "complex_to_intensity_db"
    img = ds[0]["image"].numpy()
    assert np.allclose(img[0], DB_3_4J, atol=1e-4) and np.allclose(img[1], 20.0, atol=1e-4)
    assert bool(ds[0]["valid"].all())


def test_complex_file_refused_at_construction_without_complex_units(tmp_path):
    path = _complex_tif(tmp_path / "slc.tif")
    for validate in ("header", "full"):
        with pytest.raises(DataError, match=r"slc.tif: band HH holds complex pixels \(complex64.*data.input_units: "
                                            r"complex"):
            UnlabelledTiles(path, sensor="SAR4", validate=validate)
    real = write_tif(tmp_path / "real" / "r.tif", np.ones((4, 8, 8), np.float32), band_names=list(SAR4))
    with pytest.raises(DataError, match=r"r.tif: band HH holds real float32 pixels but sensor SAR4 declares complex"):
        UnlabelledTiles(real, sensor="SAR4", input_units="complex")


def test_complex_band_files_are_not_resampled(tmp_path):
    from common.raster import read_band_files

    folder = tmp_path / "p"
    for b in ("HH", "HV"):
        write_tif(folder / f"p_{b}.tif", np.full((1, 8, 8), 3 + 4j, np.complex64))
    r = read_band_files(folder, ["HH", "HV"])
    assert r.array.dtype == np.complex64 and np.allclose(r.array, 3 + 4j)
    write_tif(folder / "p_HV.tif", np.full((1, 4, 4), 3 + 4j, np.complex64), pixel=2 * TEST_PIXEL)
    with pytest.raises(RasterError, match="p_HV.tif: band file for HV holds complex pixels"):
        read_band_files(folder, ["HH", "HV"])


# ------------------------------------------------------------------------------------------------------------
# 2. SAR files already in dB, optical files in reflectance
# ------------------------------------------------------------------------------------------------------------


def _db_chip(rng, size=16):
    return rng.uniform(-22.0, 32.0, size=(4, size, size)).astype(np.float32)


def test_sar4_db_file_is_refused_as_linear_and_read_as_is_with_db_units(tmp_path):
    rng = np.random.default_rng(0)
    chip = _db_chip(rng)
    path = write_tif(tmp_path / "sar" / "db.tif", chip, band_names=list(SAR4))
    with pytest.raises(DataError, match=r"db.tif: band HH holds values -2.*negative values cannot be linear power.*"
                                        r"set data.input_units: db"):
        UnlabelledTiles(path, sensor="SAR4")
    ds = UnlabelledTiles(path, sensor="SAR4", input_units="db")
    img = ds[0]["image"].numpy()
    assert ds.spec.conversion == "db" and np.allclose(img, chip)  # -22..32 dB stays -22..32 dB
    assert img.min() < -21 and img.max() > 31


def test_input_units_in_the_config_pick_the_conversion():
    from eo_ssl.pretrain import PretrainDataConfig, resolve_data_sensor

    assert resolve_data_sensor(build_config(PretrainDataConfig, {"sensor": "SAR4"})).conversion == "linear_to_db"
    for units, conv in (("db", "db"), ("amplitude", "amplitude_to_db"), ("complex", "complex_to_intensity_db")):
        cfg = build_config(PretrainDataConfig, {"sensor": "SAR4", "input_units": units})
        assert resolve_data_sensor(cfg).conversion == conv
    cfg = build_config(PretrainDataConfig, {"sensor": "S2L2A", "input_units": "reflectance"})
    assert resolve_data_sensor(cfg).conversion == "none"
    with pytest.raises(ConfigError, match="input_units"):
        build_config(PretrainDataConfig, {"sensor": "SAR4", "input_units": "decibel"})
    with pytest.raises(DataError, match=r"'db' files cannot give sensor S2L2A's model units 'reflectance'"):
        resolve_sensor("S2L2A", input_units="db")
    # amplitude a -> 10 log10 a^2: amplitude 10 is 20 dB
    assert np.allclose(to_model_units(np.full((4, 1, 1), 10.0, np.float32),
                                      get_sensor("SAR4").with_input_units("amplitude")), 20.0)


def test_bigearthnet_s1_db_patches_refused_as_linear_power(s1_patch):
    ok = UnlabelledTiles([s1_patch], sensor="S1", layout="band_files")
    assert np.asarray(ok[0]["image"]).min() < 0  # real S1 backscatter in dB
    with pytest.raises(DataError, match=r"_V[VH].tif: band V[VH] holds values -.*negative values cannot be linear "
                                        r"power.*set data.input_units: db"):
        UnlabelledTiles([s1_patch], sensor="S1", layout="band_files", input_units="linear_power")


def test_bigearthnet_s2_patches_refused_as_reflectance(bigearthnet_s2):
    with pytest.raises(DataError, match=r"band B\w+ holds values .* reflectance lies in.*set data.input_units: dn"):
        UnlabelledTiles(bigearthnet_s2, sensor="S2L2A", layout="band_files", glob="*/*.tif",
                        input_units="reflectance")


def test_s2_reflectance_file_refused_as_dn_and_read_with_reflectance_units(tmp_path):
    rng = np.random.default_rng(1)
    refl = rng.uniform(0.01, 0.45, size=(12, 16, 16)).astype(np.float32)
    path = write_tif(tmp_path / "refl.tif", refl, band_names=list(S2L2A_BANDS))
    with pytest.raises(DataError, match=r"refl.tif: band B01 .*already holds reflectance; set data.input_units: "
                                        r"reflectance"):
        UnlabelledTiles(path, sensor="S2L2A")
    ds = UnlabelledTiles(path, sensor="S2L2A", input_units="reflectance")
    assert np.allclose(ds[0]["image"].numpy(), refl)


def test_every_read_checks_hard_limits(tmp_path):
    rng = np.random.default_rng(2)
    good = write_tif(tmp_path / "a" / "t0.tif", rng.uniform(0.01, 1.0, (4, 8, 8)).astype(np.float32),
                     band_names=list(SAR4))
    ds = UnlabelledTiles(good, sensor="SAR4")
    write_tif(good, _db_chip(rng, 8), band_names=list(SAR4))  # the file changes after construction
    with pytest.raises(DataError, match="t0.tif: band HH .*cannot be linear power"):
        ds[0]
    spec = get_sensor("SAR4").with_input_units("db")
    with pytest.raises(DataError, match=r"f.tif: band HV holds values 0..5000.*above 100 dB"):
        check_raw_values(np.stack([np.full((8, 8), -10.0), np.linspace(0, 5000, 64).reshape(8, 8)]), None,
                         spec, ["HH", "HV"], "f.tif")


# ------------------------------------------------------------------------------------------------------------
# 3. files without band descriptions
# ------------------------------------------------------------------------------------------------------------


def test_optical_file_without_descriptions_is_not_quad_pol_sar(tmp_path, caplog):
    rng = np.random.default_rng(3)
    dn = rng.integers(200, 4000, size=(4, 16, 16)).astype(np.uint16)  # an optical 4-band chip (DN)
    path = write_tif(tmp_path / "opt.tif", dn)
    with caplog.at_level(logging.WARNING, logger="common.datasets"), pytest.raises(
            DataError, match=r"opt.tif: band HH holds values .*not named by band descriptions.*not plausible "
                             r"backscatter.*name the bands"):
        UnlabelledTiles(path, sensor="SAR4")
    assert "no band descriptions" in caplog.text
    with pytest.raises(DataError, match=r"opt.tif: band HH holds values .*above 100 dB"):
        UnlabelledTiles(path, sensor="SAR4", input_units="db")


def test_unnamed_files_are_reported_once_per_dataset(tmp_path, caplog):
    rng = np.random.default_rng(4)
    for k in range(3):
        write_tif(tmp_path / "sar" / f"t{k}.tif", rng.uniform(0.001, 2.0, (4, 8, 8)).astype(np.float32))
    with caplog.at_level(logging.WARNING, logger="common.datasets"):
        ds = UnlabelledTiles(tmp_path / "sar", sensor="SAR4")
        for i in range(len(ds)):
            ds[i]
            ds.sample_grid(i)
    warnings = [r for r in caplog.records if "no band descriptions" in r.getMessage()]
    assert len(warnings) == 1 and "HH, HV, VH, VV" in warnings[0].getMessage()


def test_ten_band_file_without_descriptions_with_data_bands(tmp_path, caplog):
    ten = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
    rng = np.random.default_rng(5)
    dn = random_s2(rng, bands=10)
    path = write_tif(tmp_path / "s2_10.tif", dn, nodata=0)
    with pytest.raises(RasterError, match=r"has 10 band\(s\) and no band descriptions, but 12 bands were expected "
                                          r".*data.sensor mapping"):
        UnlabelledTiles(path, sensor="S2L2A")
    with caplog.at_level(logging.WARNING, logger="common.datasets"):
        ds = UnlabelledTiles(path, sensor="S2L2A", bands=ten)
    assert "B02, B03, B04, B05, B06, B07, B08, B8A, B11, B12 in this order" in caplog.text
    assert np.allclose(ds[0]["image"].numpy(), dn / 10000.0)
    # the same from the config: a band subset of a registry sensor in a file without descriptions
    sub = build_config(SensorDef, {"base": "S2L2A", "name": "S2-10", "bands": list(ten)})
    ds2 = UnlabelledTiles(path, sensor=sub)
    assert ds2.spec.name == "S2-10" and ds2.spec.file_bands == ten and ds2.spec.conversion == "dn_to_reflectance"
    assert np.allclose(ds2[0]["image"].numpy(), dn / 10000.0)
    assert ds2.spec.mean["B02"] == get_sensor("S2L2A").mean["B02"]
    # a selection of the custom sensor's bands reads them by their file position
    ds3 = UnlabelledTiles(path, sensor=sub, bands=["B04", "B03", "B02"])
    assert np.allclose(ds3[0]["image"].numpy(), dn[[2, 1, 0]] / 10000.0)


# ------------------------------------------------------------------------------------------------------------
# 4. custom sensors from the config
# ------------------------------------------------------------------------------------------------------------

HLS_BANDS = ("B02", "B03", "B04", "B8A", "B11", "B12")


def hls_sensor(**extra) -> dict:
    return {"name": "HLS", "bands": list(HLS_BANDS), "input_units": "dn", "scale_factor": 0.0001, "nodata": -9999,
            "gsd": 30, "mean": dict.fromkeys(HLS_BANDS, 0.1), "std": dict.fromkeys(HLS_BANDS, 0.05), **extra}


def test_hls_sensor_from_the_config(tmp_path):
    from eo_ssl.pretrain import PretrainDataConfig, resolve_data_sensor

    dn = np.full((6, 8, 8), 1234, np.int16)
    dn[:, 0, 0] = -9999
    path = write_tif(tmp_path / "hls.tif", dn)  # HLS v2 COG stack without descriptions, nodata undeclared
    cfg = build_config(PretrainDataConfig, {"root": str(tmp_path), "sensor": hls_sensor()})
    assert isinstance(cfg.sensor, SensorDef)
    spec = resolve_data_sensor(cfg)
    assert (spec.name, spec.conversion, spec.scale_factor, spec.units) == ("HLS", "scale_offset", 1e-4, "reflectance")
    assert spec.rgb == ("B04", "B03", "B02") and spec.gsd["B11"] == 30.0
    ds = UnlabelledTiles(path, sensor=spec, fill_value=None)
    img, valid = ds[0]["image"].numpy(), ds[0]["valid"].numpy()
    assert not valid[0, 0] and valid.sum() == 63 and np.allclose(img[:, valid], 0.1234)
    assert SensorSpec.from_dict(spec.to_dict()) == spec  # what exports and model cards record


def test_landsat_scale_and_offset():
    bands = ("SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7")
    spec = SensorDef(name="LC09", bands=bands, input_units="dn", scale_factor=0.0000275, add_offset=-0.2, nodata=0,
                     gsd=30.0, mean=dict.fromkeys(bands, 0.1), std=dict.fromkeys(bands, 0.1)).to_spec()
    out = to_model_units(np.full((6, 2, 2), 10000, np.uint16), spec)
    assert np.allclose(out, 0.075, atol=1e-6)
    with pytest.raises(DataError, match=r"band SR_B2 holds values 4e\+06..4e\+06 .* give reflectance 109.8..109.8"):
        check_raw_values(np.full((6, 8, 8), 4e6, np.float32), None, spec, bands, "ls.tif")


def test_custom_sensor_with_a_stats_file_and_subset(tmp_path):
    from common.bands import BandStats

    stats = tmp_path / "hls_stats.json"
    BandStats(mean=dict.fromkeys(HLS_BANDS, 0.2), std=dict.fromkeys(HLS_BANDS, 0.3)).to_json(stats)
    d = build_config(SensorDef, {k: v for k, v in hls_sensor(stats_file=str(stats)).items() if k not in ("mean", "std")})
    spec = resolve_sensor(d, ["B8A", "B04"])
    assert spec.bands == ("B8A", "B04") and spec.file_bands == HLS_BANDS
    assert np.allclose(spec.mean_array(), 0.2) and np.allclose(spec.std_array(), 0.3)


@pytest.mark.parametrize("change, message", [
    ({"scale_factor": None}, "input_units dn needs scale_factor"),
    ({"input_units": None}, "input_units is required"),
    ({"input_units": "db"}, "scale_factor/add_offset apply to input_units dn only"),
    ({"name": "S2L2A"}, "a registry sensor's name"),
    ({"gsd": None}, "gsd is required"),
    ({"mean": {"B02": 0.1}}, "give mean and std together|mean must have one value per band"),
    ({"rgb": ["B04", "B03", "B01"]}, r"rgb \['B04', 'B03', 'B01'\] must name bands"),
    ({"bands": ["B02", "B02"]}, "bands must be distinct"),
])
def test_sensor_definition_is_validated(change, message):
    raw = {k: v for k, v in {**hls_sensor(), **change}.items() if v is not None}
    with pytest.raises(DataError, match=message):
        SensorDef(**{k: tuple(v) if k in ("bands", "rgb") else v for k, v in raw.items()}).validate()
    with pytest.raises(ConfigError):
        build_config(SensorDef, raw)


def test_custom_sensor_without_statistics_is_refused_by_name():
    d = SensorDef(name="PS", bands=("blue", "green", "red", "nir"), input_units="dn", scale_factor=0.0001, gsd=3.0)
    with pytest.raises(DataError, match=r"sensor 'PS' has no statistics: give mean and std.*stats_file.*"
                                        r"python -m common.stats"):
        resolve_sensor(d)
    assert d.to_spec(require_stats=False).bands == ("blue", "green", "red", "nir")


def test_unknown_sensor_is_a_data_error_and_a_key_error():
    with pytest.raises(UnknownSensorError) as e:
        get_sensor("HLS")
    assert isinstance(e.value, KeyError) and isinstance(e.value, DataError)
    assert str(e.value).startswith("unknown sensor 'HLS'") and "data.sensor: {name, bands" in str(e.value)


def test_stats_cli_computes_a_custom_sensors_statistics(tmp_path):
    import yaml

    from common.bands import BandStats
    from common.stats import main

    rng = np.random.default_rng(6)
    for k in range(2):
        write_tif(tmp_path / "tiles" / f"t{k}.tif", rng.integers(500, 1500, (6, 8, 8)).astype(np.int16))
    cfg = tmp_path / "pretrain.yaml"
    out = tmp_path / "stats.json"  # named by the config before it exists
    cfg.write_text(yaml.safe_dump({"data": {"sensor": {**{k: v for k, v in hls_sensor().items()
                                                          if k not in ("mean", "std")}, "stats_file": str(out)}}}))
    assert main(["--root", str(tmp_path / "tiles"), "--sensor", str(cfg), "--out", str(out)]) == 0
    stats = BandStats.from_json(out)
    assert stats.sensor == "HLS" and set(stats.bands) == set(HLS_BANDS)
    assert 0.05 < stats.mean["B02"] < 0.15 and stats.minimum["B02"] >= 0.05 and stats.maximum["B02"] < 0.15


# ------------------------------------------------------------------------------------------------------------
# 5. split files, error types
# ------------------------------------------------------------------------------------------------------------


def test_empty_split_file_is_named(seg_root):
    split = seg_root / "splits" / "labelled.txt"
    split.write_text("# no tiles yet\n\n")
    with pytest.raises(DataError, match=r"labelled.txt: split file holds no tile ids .*data.labelled_split"):
        SegmentationDataset(seg_root, "labelled", num_classes=3)
    with pytest.raises(DataError, match="holds no tile ids"):
        SegmentationDataset(seg_root, [], num_classes=3)


def test_empty_patch_list_is_named(bigearthnet_s2, tmp_path):
    split = tmp_path / "patches.txt"
    split.write_text("\n")
    with pytest.raises(DataError, match=r"patches.txt: split file holds no tile ids"):
        BigEarthNetPatches(bigearthnet_s2, patches=split)


def test_error_family():
    assert issubclass(RasterError, DataError) and issubclass(ExportMismatchError, DataError)
    assert issubclass(DataError, ValueError)
