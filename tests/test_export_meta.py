"""The normalisation written into ``backbone.json`` (ssl/export.py) and ``model.json`` (finetune runs) is enough for
a client without this project: raw file values -> model input with numpy and the JSON alone equals the project's
own conversion (``common.datasets`` readers, ``common.bands.to_model_units``) + normalisation
(``finetune.transforms.normalise``) with its nodata policy, on a real BigEarthNet-S2 patch (skipped when
``../shared/data`` is absent) and on generated S2 / S1 / quad-pol SAR tiles. The export stays loadable strictly by
timm, and sidecars written before these keys existed still read.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import rasterio
import timm
import torch
import yaml

from common.bands import COMPLEX_CONVERSIONS, CONVERSIONS, SensorSpec, to_model_units
from common.datasets import UnlabelledTiles
from common.raster import read_band_files
from common.weights import Normalisation, read_export_meta
from eo_ssl.export import TEACHER_PREFIX, export_run
from finetune.config import SegDataConfig, SegModelConfig
from finetune.inputs import resolve_inputs
from finetune.model_card import write_model_card
from finetune.transforms import normalise

from conftest import S2L2A_BANDS, write_tif

REPO = Path(__file__).resolve().parents[1]
ARCH = "resnet10t"

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------------------
# the client: numpy and the JSON, nothing of this project
# ------------------------------------------------------------------------------------------------------------


def client_model_input(norm: dict, raw: dict[str, np.ndarray], file_nodata: dict[str, float | None],
                       reader_valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Model input ``(C, H, W)`` and validity from raw file values per band name, following ``norm`` only.

    ``file_nodata``: the nodata value each band's file declares (None: none declared). ``reader_valid``: pixels the
    reader already knows to be invalid (a band file's resampling, a mask band), True where valid.
    """
    shape = next(iter(raw.values())).shape
    invalid = np.zeros(shape, bool) if reader_valid is None else ~reader_valid

    def convert(entry: dict, values: np.ndarray) -> np.ndarray:
        v = values.astype(np.complex128 if np.iscomplexobj(values) else np.float64)
        v = v * entry["scale"] + entry["add_offset"]
        if entry["abs_power"] is not None:
            v = np.abs(v) ** entry["abs_power"]
        if entry["to_db"]:
            v = 10.0 * np.log10(np.maximum(v, entry["db_floor"]))
        return v

    model: dict[str, np.ndarray] = {}
    for e in norm["bands"]:
        inputs = e["derived"]["inputs"] if "derived" in e else [e["band"]]
        for name in inputs:
            r = raw[name]
            nd = file_nodata.get(name)
            nd = e["nodata"] if nd is None else nd
            invalid |= ~np.isfinite(r)
            if nd is not None:
                invalid |= r == nd
        if "derived" in e:
            d = e["derived"]
            assert d["op"] == "ratio"
            a, b = (convert(e, raw[n]) for n in d["inputs"])
            den = np.where(b < 0, -1.0, 1.0) * np.maximum(np.abs(b), d["min_abs_denominator"])
            model[e["band"]] = a / den
        else:
            model[e["band"]] = convert(e, raw[e["band"]])
    assert norm["nodata"]["fill"] == "band_mean" and norm["nodata"]["normalised_value"] == 0.0
    x = np.stack([(model[e["band"]] - e["mean"]) / e["std"] for e in norm["bands"]])
    with np.errstate(invalid="ignore"):
        invalid |= ~np.isfinite(x).all(axis=0)
    x[:, invalid] = norm["nodata"]["normalised_value"]
    return x.astype(np.float32), ~invalid


def project_model_input(source: Path | list[Path], spec, norm: dict, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """The project's reader (invalid pixels filled with the band mean) + normalisation, with the JSON's statistics."""
    ds = UnlabelledTiles([str(source)] if not isinstance(source, list) else source, sensor=spec, layout=layout,
                         offset=norm["offset"], validate="header")
    s = ds[0]
    image, valid = s["image"].numpy(), s["valid"].numpy()
    mean, std = np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
    return normalise(image, mean, std, valid), valid


def _file_raw(path: Path) -> tuple[dict[str, np.ndarray], dict[str, float | None]]:
    """Raw values and declared nodata per band of a multi-band GeoTIFF with band descriptions, with plain rasterio."""
    with rasterio.open(path) as src:
        data = src.read()
        return ({n: data[i] for i, n in enumerate(src.descriptions)},
                {n: src.nodatavals[i] for i, n in enumerate(src.descriptions)})


# ------------------------------------------------------------------------------------------------------------
# a pretraining run to export (the config as pretraining writes it, a checkpoint with teacher/student tensors)
# ------------------------------------------------------------------------------------------------------------


def _pretrain_run(run: Path, data: dict) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "pretrain" / "demo.yaml").read_text())
    cfg["data"] = {"batch_size": 4, **data}
    cfg["model"]["arch"] = ARCH
    cfg.pop("probe", None)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    from eo_ssl.pretrain import PretrainDataConfig, resolve_data_sensor
    from common.config import build_config

    n = len(resolve_data_sensor(build_config(PretrainDataConfig, cfg["data"])).bands)
    torch.manual_seed(0)
    backbone = timm.create_model(ARCH, in_chans=n, num_classes=0).state_dict()
    state = {TEACHER_PREFIX + k: v for k, v in backbone.items()}
    state.update({"student.backbone." + k: v.clone() for k, v in backbone.items()})
    state["teacher.head.w"] = torch.zeros(3)
    from safetensors.torch import save_file

    (run / "checkpoints").mkdir()
    save_file(state, str(run / "checkpoints" / "last.safetensors"), metadata={"step": "7"})
    return run


def _export(tmp_path: Path, data: dict) -> tuple[dict, Path]:
    weights, sidecar = export_run(_pretrain_run(tmp_path / "run", data), tmp_path / "backbone.safetensors")
    return json.loads(sidecar.read_text()), weights


# ------------------------------------------------------------------------------------------------------------
# the JSON alone reproduces the project's model input
# ------------------------------------------------------------------------------------------------------------


def test_backbone_json_alone_prepares_a_real_bigearthnet_patch(tmp_path, s2_patch):
    meta, weights = _export(tmp_path, {"root": str(s2_patch.parent), "sensor": "S2L2A", "layout": "band_files"})
    norm = meta["normalisation"]
    assert [e["band"] for e in norm["bands"]] == list(S2L2A_BANDS) == meta["bands"]
    for e in norm["bands"]:
        assert (e["units"], e["scale"], e["add_offset"], e["nodata"]) == ("reflectance", 1e-4, 0.0, 0)
        assert not e["to_db"] and e["abs_power"] is None
    assert norm["formula"] and "band_mean" == norm["nodata"]["fill"]
    # bilinear resampling of the 20/60 m band files onto the 10 m grid is the reader's (stated in nodata.band_files);
    # from the raw DN on that grid on, the client uses the JSON only
    r = read_band_files(s2_patch, list(S2L2A_BANDS), fallback_nodata=None)
    raw = {b: r.array[i] for i, b in enumerate(S2L2A_BANDS)}
    x_client, ok_client = client_model_input(norm, raw, {b: None for b in S2L2A_BANDS}, r.valid)
    x_proj, ok_proj = project_model_input(s2_patch, meta["sensor"], norm, "band_files")
    assert x_proj.shape == (12, 120, 120)
    np.testing.assert_array_equal(ok_client, ok_proj)
    np.testing.assert_allclose(x_client, x_proj, rtol=1e-5, atol=2e-5)
    # the 10 m bands straight from their files with plain rasterio, no resampling involved
    for i, b in enumerate(S2L2A_BANDS):
        if meta["normalisation"]["bands"][i]["gsd"] == 10.0:
            with rasterio.open(next(s2_patch.glob(f"*_{b}.tif"))) as src:
                dn = src.read(1)
            e = norm["bands"][i]
            np.testing.assert_allclose((dn * e["scale"] + e["add_offset"] - e["mean"]) / e["std"], x_proj[i],
                                       rtol=1e-5, atol=2e-5)
    # still loadable strictly by timm alone
    model = timm.create_model(meta["architecture"], in_chans=meta["in_chans"], num_classes=0,
                              checkpoint_path=str(weights))
    assert model.num_features == meta["num_features"]


def _sar4_tile(path: Path) -> Path:
    """Quad-pol linear intensity, nodata 0 declared: a zero strip, a NaN, values below the dB floor."""
    rng = np.random.default_rng(0)
    x = rng.gamma(3.0, 0.05, size=(4, 40, 48)).astype(np.float32)
    x[:, :, :5] = 0.0  # swath edge
    x[1, 10, 20] = np.nan
    x[2, 30, 30] = 1e-9  # below the floor: -60 dB, valid
    x[3, 5, 40] = 0.0  # one band at nodata
    return write_tif(path, x, nodata=0.0, band_names=["HH", "HV", "VH", "VV"], pixel=0.5)


def _s1_tile(path: Path) -> Path:
    """VV, VH in dB, NaN nodata, one VH value at 0 dB (the ratio's clamped denominator)."""
    rng = np.random.default_rng(1)
    x = np.stack([rng.normal(-12, 4, (32, 32)), rng.normal(-19, 4, (32, 32))]).astype(np.float32)
    x[1, 3, 3] = 0.0
    x[0, 7, 9] = np.nan
    return write_tif(path, x, nodata=float("nan"), band_names=["VV", "VH"])


def _s2_tile(path: Path) -> Path:
    rng = np.random.default_rng(2)
    x = rng.integers(1000, 5000, size=(12, 32, 32)).astype(np.uint16)
    x[:, :4, :6] = 0
    x[5, 20, 20] = 0
    return write_tif(path, x, nodata=0, band_names=list(S2L2A_BANDS))


@pytest.mark.parametrize("sensor, bands, offset, make", [
    ("SAR4", None, 0.0, _sar4_tile),
    ("S1", ["VV", "VH", "VV/VH"], 0.0, _s1_tile),
    ("S2L2A", None, -1000.0, _s2_tile),
])
def test_backbone_json_alone_prepares_generated_tiles(tmp_path, sensor, bands, offset, make):
    tile = make(tmp_path / "tiles" / "t.tif")
    data = {"root": str(tile.parent), "sensor": sensor, "offset": offset, **({"bands": bands} if bands else {})}
    meta, _ = _export(tmp_path, data)
    norm = meta["normalisation"]
    units = {"SAR4": "dB", "S1": "dB", "S2L2A": "reflectance"}[sensor]
    assert {e["units"] for e in norm["bands"]} == {units}
    if sensor == "SAR4":
        assert all(e["to_db"] and e["db_floor"] == 1e-6 and e["abs_power"] is None for e in norm["bands"])
    if sensor == "S2L2A":
        assert all(e["add_offset"] == pytest.approx(-0.1) for e in norm["bands"])
    raw, nodata = _file_raw(tile)
    x_client, ok_client = client_model_input(norm, raw, nodata)
    x_proj, ok_proj = project_model_input(tile, meta["sensor"] if bands is None else _spec(sensor, bands), norm,
                                          "multiband")
    assert 0.5 < ok_proj.mean() < 1.0  # the tiles do carry invalid pixels
    np.testing.assert_array_equal(ok_client, ok_proj)
    np.testing.assert_allclose(x_client, x_proj, rtol=1e-5, atol=2e-5)
    assert (x_proj[:, ~ok_proj] == 0).all()


def _spec(sensor: str, bands: list[str]):
    from common.bands import get_sensor

    return get_sensor(sensor, bands)


def test_a_stack_export_spells_out_each_sensor(tmp_path):
    s2 = _s2_tile(tmp_path / "s2" / "t.tif")
    _s1_tile(tmp_path / "s1" / "t.tif")
    meta, _ = _export(tmp_path, {"root": str(s2.parent), "sensor": "S2L2A", "offset": -1000.0,
                                 "stack": [{"root": str(tmp_path / "s1"), "glob": "*.tif", "sensor": "S1"}]})
    norm = meta["normalisation"]
    assert [(e["band"], e["units"], e["sensor"]) for e in norm["bands"]][-3:] == [
        ("B12", "reflectance", "S2L2A"), ("VV", "dB", "S1"), ("VH", "dB", "S1")]
    # the S2 DN offset applies to the S2 bands only
    assert norm["bands"][0]["add_offset"] == pytest.approx(-0.1) and norm["bands"][-1]["add_offset"] == 0.0
    assert norm["bands"][-1]["nodata"] is None and norm["bands"][0]["nodata"] == 0


def test_model_json_alone_prepares_inputs(tmp_path):
    tile = _sar4_tile(tmp_path / "images" / "t.tif")
    data = SegDataConfig(root=str(tmp_path), num_classes=2, sensor="SAR4")
    model = SegModelConfig(arch=ARCH)
    inputs = resolve_inputs(data, model)
    write_model_card(tmp_path, model, data, inputs, "supervised", "model.")
    card = json.loads((tmp_path / "model.json").read_text())
    norm = card["normalisation"]
    assert [e["band"] for e in norm["bands"]] == card["bands"] and {e["units"] for e in norm["bands"]} == {"dB"}
    raw, nodata = _file_raw(tile)
    x_client, ok_client = client_model_input(norm, raw, nodata)
    x_proj, ok_proj = project_model_input(tile, inputs.spec, norm, "multiband")
    np.testing.assert_array_equal(ok_client, ok_proj)
    np.testing.assert_allclose(x_client, x_proj, rtol=1e-5, atol=2e-5)
    # prediction still reads the card
    from finetune.predict import ModelCard

    assert ModelCard.from_json(tmp_path / "model.json").bands == tuple(card["bands"])


def test_exports_written_before_the_per_band_keys_still_read(tmp_path):
    meta, weights = _export(tmp_path, {"root": str(_sar4_tile(tmp_path / "t" / "t.tif").parent), "sensor": "SAR4"})
    sidecar = weights.with_suffix(".json")
    old = json.loads(sidecar.read_text())
    for k in ("bands", "nodata", "formula"):
        old["normalisation"].pop(k)
    sidecar.write_text(json.dumps(old))
    m = read_export_meta(weights)
    assert m.normalisation.bands == [] and m.normalisation.mean == meta["normalisation"]["mean"]
    assert m.format == "eoseg-backbone/1"
    # a key added by a later writer does not stop this reader
    old["normalisation"]["later"] = 1
    old["later_key"] = {"x": 1}
    sidecar.write_text(json.dumps(old))
    assert read_export_meta(weights).bands == meta["bands"]


def test_normalisation_round_trips_through_the_sidecar(tmp_path):
    meta, weights = _export(tmp_path, {"root": str(_s1_tile(tmp_path / "t" / "t.tif").parent), "sensor": "S1",
                                       "bands": ["VV", "VH", "VV/VH"]})
    m = read_export_meta(weights)
    assert isinstance(m.normalisation, Normalisation)
    assert m.normalisation.bands == meta["normalisation"]["bands"]
    assert m.normalisation.bands[2]["derived"] == {"op": "ratio", "inputs": ["VV", "VH"],
                                                   "min_abs_denominator": 1e-3}


@pytest.mark.parametrize("conversion", CONVERSIONS)
def test_every_conversion_is_spelled_out(conversion):
    """Each conversion of the registry, on a sensor of three bands (complex pixels for the complex ones): the
    client's value from the JSON entries equals ``to_model_units``."""
    kw = {"scale_factor": 2.75e-5, "add_offset": -0.2} if conversion == "scale_offset" else {}
    spec = SensorSpec(name="X", bands=("a", "b", "c"), gsd=dict.fromkeys("abc", 10.0),
                      mean={"a": 0.1, "b": -3.0, "c": 5.0}, std={"a": 0.5, "b": 2.0, "c": 4.0}, nodata=None,
                      rgb=("a", "b", "c"), conversion=conversion, units="other", **kw)
    rng = np.random.default_rng(3)
    raw = rng.gamma(2.0, 300.0, size=(3, 8, 9)).astype(np.float32)
    if conversion in COMPLEX_CONVERSIONS:
        raw = (raw + 1j * rng.normal(0, 200.0, raw.shape)).astype(np.complex64)
    raw[0, 0, 0] = 0.0  # the dB floor where a log is taken
    offset = -1000.0 if conversion == "dn_to_reflectance" else 0.0
    norm = asdict(Normalisation.from_spec(spec, offset))
    x_client, ok = client_model_input(norm, {b: raw[i] for i, b in enumerate(spec.bands)}, {})
    assert ok.all()
    model = to_model_units(raw, spec, offset=offset)
    expect = (model - spec.mean_array()[:, None, None]) / spec.std_array()[:, None, None]
    np.testing.assert_allclose(x_client, expect, rtol=1e-5, atol=2e-5)
