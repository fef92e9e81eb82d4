"""Band registry, reference statistics, unit conversions and stats files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.bands import (
    IGNORE_INDEX,
    S2_BASELINE_0400_OFFSET,
    BandStats,
    SensorSpec,
    complex_to_intensity,
    dn_to_reflectance,
    get_sensor,
    linear_to_db,
    s2_offset_for_baseline,
    sensor_names,
    to_model_units,
)


def test_ignore_index():
    assert IGNORE_INDEX == 255


def test_sensor_registry_layout():
    assert set(sensor_names()) == {"S2L1C", "S2L2A", "S1", "SAR4"}
    l1c, l2a = get_sensor("S2L1C"), get_sensor("S2L2A")
    assert len(l1c.bands) == 13 and "B10" in l1c.bands and "B8A" in l1c.bands
    assert len(l2a.bands) == 12 and "B10" not in l2a.bands
    assert l2a.bands == tuple(b for b in l1c.bands if b != "B10")
    assert get_sensor("S1").bands == ("VV", "VH")
    assert get_sensor("SAR4").bands == ("HH", "HV", "VH", "VV")
    assert {l2a.gsd[b] for b in ("B02", "B03", "B04", "B08")} == {10.0}
    assert {l2a.gsd[b] for b in ("B05", "B06", "B07", "B8A", "B11", "B12")} == {20.0}
    assert l1c.gsd["B01"] == l1c.gsd["B09"] == l1c.gsd["B10"] == 60.0
    assert l2a.rgb == ("B04", "B03", "B02") and l2a.conversion == "dn_to_reflectance" and l2a.nodata == 0
    assert get_sensor("S1").conversion == "db" and get_sensor("SAR4").conversion == "linear_to_db"


def test_reference_stats_from_seed():
    s2 = get_sensor("S2L2A")
    assert s2.mean["B02"] == pytest.approx(429.9430203 / 10000)
    assert s2.std["B12"] == pytest.approx(818.86747235 / 10000)
    s1 = get_sensor("S1", ["VV", "VH", "VV/VH"])
    assert s1.mean["VV"] == pytest.approx(-12.619993741972035) and s1.std["VH"] == pytest.approx(5.464428464912864)
    assert s1.mean["VV/VH"] == pytest.approx(0.6525036195871579)
    for spec in (get_sensor(n) for n in sensor_names()):
        assert np.all(spec.std_array() > 0) and np.all(np.isfinite(spec.mean_array()))


def test_get_sensor_errors_and_case():
    assert get_sensor("s2l2a").name == "S2L2A"
    with pytest.raises(KeyError) as e:
        get_sensor("S3")
    assert "S2L2A" in str(e.value) and "SAR4" in str(e.value)


def test_subset_order_rgb_and_errors():
    spec = get_sensor("S2L2A").subset(["B08", "B04", "B03", "B02"])
    assert spec.bands == ("B08", "B04", "B03", "B02")
    assert spec.rgb_indices() == (1, 2, 3)
    np.testing.assert_allclose(spec.mean_array()[0], 2218.94553375 / 10000, rtol=1e-6)
    with pytest.raises(ValueError) as e:
        get_sensor("S2L2A").subset(["B02", "B10"])
    assert "B10" in str(e.value) and "B8A" in str(e.value)  # names the missing band and lists the valid ones
    with pytest.raises(ValueError):
        get_sensor("S2L2A").subset(["B02", "B02"])
    s1 = get_sensor("S1", ["VV", "VH", "VV/VH"])
    assert s1.rgb == ("VV", "VH", "VV/VH") and s1.raw_bands == ("VV", "VH")
    assert get_sensor("S1").rgb == ("VV", "VH", "VV")
    assert get_sensor("S1", ["VV/VH"]).raw_bands == ("VV", "VH")


def test_metadata_round_trip():
    spec = get_sensor("S1", ["VH", "VV", "VV/VH"])
    d = json.loads(json.dumps(spec.to_dict()))
    back = SensorSpec.from_dict(d)
    assert back.bands == spec.bands and back.mean_array().tolist() == spec.mean_array().tolist()
    text = get_sensor("S2L2A").describe()
    assert "B8A" in text and "reflectance" in text


def test_conversions_hand_computed():
    np.testing.assert_allclose(dn_to_reflectance(np.array([0, 10000, 1234], np.uint16)), [0.0, 1.0, 0.1234], rtol=1e-6)
    out = dn_to_reflectance(np.array([1234], np.uint16), offset=S2_BASELINE_0400_OFFSET)
    assert out.dtype == np.float32 and out[0] == pytest.approx(0.0234)
    db = linear_to_db(np.array([1.0, 10.0, 100.0, 0.01, 0.0]))
    np.testing.assert_allclose(db, [0.0, 10.0, 20.0, -20.0, -60.0], atol=1e-5)
    assert db.dtype == np.float32
    assert linear_to_db(np.array([0.0]), floor=1e-3)[0] == pytest.approx(-30.0)
    z = np.array([3 + 4j, 1j, 0], np.complex64)
    np.testing.assert_allclose(complex_to_intensity(z), [25.0, 1.0, 0.0])
    assert s2_offset_for_baseline("04.00") == s2_offset_for_baseline("N0509") == -1000
    assert s2_offset_for_baseline("02.09") == s2_offset_for_baseline(None) == 0


def test_to_model_units_per_sensor():
    raw = np.full((12, 2, 2), 2500, np.uint16)
    out = to_model_units(raw, get_sensor("S2L2A"))
    assert out.shape == (12, 2, 2) and out.dtype == np.float32 and np.allclose(out, 0.25)
    sar = np.stack([np.full((2, 2), v, np.float32) for v in (1.0, 0.1, 0.01, 10.0)])
    np.testing.assert_allclose(to_model_units(sar, get_sensor("SAR4"))[:, 0, 0], [0.0, -10.0, -20.0, 10.0], atol=1e-5)
    s1 = get_sensor("S1", ["VV/VH", "VV"])
    vv_vh = np.stack([np.full((1, 1), -10.0, np.float32), np.full((1, 1), -20.0, np.float32)])
    out = to_model_units(vv_vh, s1, raw_bands=("VV", "VH"))
    np.testing.assert_allclose(out[:, 0, 0], [0.5, -10.0])
    spec = SensorSpec(
        "SLC", ("HH",), {"HH": 1.0}, {"HH": 0.0}, {"HH": 1.0}, None, ("HH",) * 3, "complex_to_intensity_db"
    )
    slc = np.full((1, 1, 1), 3 + 4j, np.complex64)
    np.testing.assert_allclose(to_model_units(slc, spec), [[[10 * np.log10(25)]]], rtol=1e-6)
    with pytest.raises(ValueError):
        to_model_units(np.zeros((3, 2, 2)), get_sensor("S1"))


def test_band_stats_json(tmp_path):
    spec = get_sensor("S2L2A", ["B04", "B03"])
    stats = BandStats.from_spec(spec)
    p = tmp_path / "stats.json"
    stats.to_json(p)
    back = BandStats.from_json(p)
    assert back.mean == stats.mean and back.sensor == "S2L2A"
    m, s = back.arrays(["B03", "B04"])
    assert m.tolist() == pytest.approx([spec.mean["B03"], spec.mean["B04"]])
    with pytest.raises(ValueError) as e:
        back.arrays(["B08"])
    assert "stats.json" in str(e.value) and "B08" in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text('{"mean": {"B02": 1.0}}')
    with pytest.raises(ValueError, match="bad.json"):
        BandStats.from_json(bad)
    with pytest.raises(ValueError, match="missing.json"):
        BandStats.from_json(tmp_path / "missing.json")
    new = BandStats(mean={"B04": 1.0, "B03": 2.0}, std={"B04": 3.0, "B03": 4.0})
    replaced = get_sensor("S2L2A", ["B04", "B03"]).with_stats(new)
    assert replaced.mean_array().tolist() == [1.0, 2.0] and replaced.std_array().tolist() == [3.0, 4.0]
