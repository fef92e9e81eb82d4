"""The backbone export format shared by pretraining (writer) and fine-tuning (reader).

An export is two files side by side::

    backbone.safetensors   # state_dict of ``timm.create_model(arch, num_classes=0, in_chans=C)``
    backbone.json          # this module's metadata: architecture, bands, normalisation, DINO settings, checksum

A user loads it with timm in one call, with strict key matching::

    timm.create_model(arch, in_chans=C, num_classes=0, checkpoint_path="backbone.safetensors")

or through timm's pretrained machinery::

    timm.create_model(arch, in_chans=C, num_classes=0, pretrained=True,
                      pretrained_cfg_overlay=dict(file="backbone.safetensors", first_conv=None))

A backbone pretrained without its ResNet stem max-pool (``"stem_pool": false`` in the sidecar, from
``model.stem_pool: false``) has the same keys; the same network then needs ``model.maxpool = torch.nn.Identity()``
after loading (the sidecar's ``load_with`` says so). Sidecars written before the key existed read as ``true``.

Our own fine-tuning configs name the ``.safetensors`` (or the ``.json``) file; :func:`check_compatible` then refuses
a dataset whose bands or normalisation differ, with a message that says what differs and how to fix it.
Files are read with safetensors only: nothing is ever unpickled.

The sidecar's ``normalisation`` says how a raw file value becomes model input without this project's code
(:meth:`Normalisation.from_spec`, also used for the ``model.json`` of fine-tuning runs). Per band, in model channel
order (``normalisation.bands``)::

    value = raw * scale + add_offset          # S2: scale 1e-4, add_offset = DN offset / 10000; SAR: 1, 0
    value = abs(value) ** abs_power           # only if "abs_power" is not null: 2 = |z|^2 of complex or real
                                              # amplitude (intensity), 1 = |z| of complex amplitude
    value = 10 * log10(max(value, db_floor))  # only if "to_db" (linear intensity -> dB)
    x = (value - mean) / std                  # model input

A derived band (``"derived": {"op": "ratio", "inputs": [a, b], "min_abs_denominator": eps}``) is computed from its
inputs' raw values converted with its own entry's steps: ``a / (sign(b) * max(|b|, eps))`` (sign(0) = +1), then
normalised. Invalid pixels
(``normalisation.nodata``): where any band equals its file's declared nodata value (or, for a file that declares
none, the band's ``nodata``), is NaN/inf in the file or after conversion, or is masked by the file's mask band; such a
pixel takes the band mean in every band, i.e. ``x = 0``. Band files at 20/60 m are resampled (bilinear) onto the grid
of the finest band before conversion; a pixel any invalid source pixel contributes to is invalid.
Exports written before these keys existed lack ``bands``/``nodata``/``formula`` and read as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.bands import (
    DB_FLOOR,
    DERIVED_BANDS,
    RATIO_DENOMINATOR_EPS,
    S2_REFLECTANCE_SCALE,
    SensorSpec,
)
from common.checkpoint import atomic_save_safetensors, atomic_write_json, load_safetensors
from common.errors import DataError, MissingFileError

__all__ = [
    "EXPORT_FORMAT",
    "Normalisation",
    "NODATA_POLICY",
    "band_conversions",
    "ExportMeta",
    "write_export",
    "read_export",
    "read_export_meta",
    "sha256_file",
    "check_compatible",
    "ExportMismatchError",
]

EXPORT_FORMAT = "eoseg-backbone/1"


class ExportMismatchError(DataError):
    """An export's bands or normalisation do not match the dataset it is used with."""


NORMALISATION_FORMULA = (
    "per band: value = raw * scale + add_offset; if abs_power: value = abs(value)**abs_power; if to_db: "
    "value = 10*log10(max(value, db_floor)); derived bands from their inputs' values (see 'derived'); "
    "x = (value - mean) / std; invalid pixels (see 'nodata'): x = 0 in every band"
)
"""The ``normalisation.formula`` of exports and model cards (the module docstring spells it out)."""

NODATA_POLICY: dict[str, Any] = {
    "invalid": "a pixel is invalid where any band equals its file's declared nodata value (or the band's 'nodata' "
               "for files that declare none), is NaN or infinite in the file or after conversion, or is masked by "
               "the file's mask band",
    "fill": "band_mean",
    "normalised_value": 0.0,
    "band_files": "bands of coarser resolution are resampled (bilinear) onto the grid of the finest band before "
                  "conversion; an output pixel that any invalid source pixel contributes to is invalid",
}
"""How invalid pixels are handled (``normalisation.nodata``): filled with the band mean, i.e. 0 after
normalisation, as the datasets and prediction do."""


def _steps(part: SensorSpec, offset: float) -> dict[str, Any]:
    """The per-band arithmetic of a (single) sensor's conversion (:data:`common.bands.CONVERSIONS`)."""
    conversion = part.conversion
    scale, add, power, to_db = 1.0, 0.0, None, False
    if conversion == "dn_to_reflectance":
        scale, add = 1.0 / S2_REFLECTANCE_SCALE, float(offset) / S2_REFLECTANCE_SCALE
    elif conversion == "scale_offset":
        scale, add = float(part.scale_factor), float(part.add_offset)
    elif conversion == "linear_to_db":
        to_db = True
    elif conversion in ("amplitude_to_db", "complex_to_intensity_db"):
        power, to_db = 2, True
    elif conversion == "complex_to_amplitude":
        power = 1
    elif conversion not in ("db", "none"):
        raise ValueError(f"sensor {part.name}: conversion {conversion!r} has no per-band formula for exports")
    return {"scale": scale, "add_offset": add, "abs_power": power, "to_db": to_db,
            "db_floor": DB_FLOOR if to_db else None}


def band_conversions(spec: SensorSpec, offset: float = 0.0) -> list[dict[str, Any]]:
    """One entry per band of ``spec`` (model channel order, every part of a stack with its own conversion): name,
    sensor, units, conversion, the arithmetic of the module docstring (``scale``, ``add_offset``, ``abs_power``,
    ``to_db``, ``db_floor``; for a derived band also ``derived``), the raw nodata value
    assumed for files that declare none, ground sampling distance, mean and std.

    Args:
        spec: the sensor (stack) with the statistics used for normalisation.
        offset: Sentinel-2 DN offset (``data.offset``); applies to ``dn_to_reflectance`` bands only.
    """
    out = []
    for part in spec.parts or (spec,):
        for band in part.bands:
            entry: dict[str, Any] = {"band": band, "sensor": part.name, "units": part.units,
                                     "conversion": part.conversion}
            if band in DERIVED_BANDS:
                d = DERIVED_BANDS[band]
                if d.fn.__name__ != "_ratio":
                    raise ValueError(f"derived band {band} has no formula for exports")
                entry["derived"] = {"op": "ratio", "inputs": list(d.inputs),
                                    "min_abs_denominator": RATIO_DENOMINATOR_EPS}
            entry.update(_steps(part, offset))  # a derived band's: of its inputs' raw values
            entry.update(nodata=part.nodata, gsd=float(part.gsd[band]), mean=float(part.mean[band]),
                         std=float(part.std[band]))
            out.append(entry)
    return out


@dataclass
class Normalisation:
    """How raw file values become model input: ``x = (convert(raw) - mean) / std`` per band.

    ``conversion`` names the rule of :mod:`common.bands` (``dn_to_reflectance``: DN / 10000 (+ offset); ``db``:
    values already in dB; ``linear_to_db``: 10 log10 of linear power; ``none``). ``bands``, ``nodata`` and
    ``formula`` (:meth:`from_spec`) spell the rule out per band, so that a client needs nothing but the JSON (see the
    module docstring); they are empty in exports written before they existed.
    """

    conversion: str
    mean: list[float]
    std: list[float]
    offset: float = 0.0  # DN offset added before the /10000 scaling (-1000 for S2 processing baseline >= 04.00)
    bands: list[dict[str, Any]] = field(default_factory=list)  # band_conversions(): per-band arithmetic and stats
    nodata: dict[str, Any] = field(default_factory=dict)  # NODATA_POLICY
    formula: str = ""

    @classmethod
    def from_spec(cls, spec: SensorSpec, offset: float = 0.0) -> "Normalisation":
        """The normalisation of data described by ``spec`` (statistics included) with S2 DN offset ``offset``."""
        return cls(conversion=spec.conversion, mean=[float(v) for v in spec.mean_array()],
                   std=[float(v) for v in spec.std_array()], offset=float(offset),
                   bands=band_conversions(spec, offset), nodata=dict(NODATA_POLICY), formula=NORMALISATION_FORMULA)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)


@dataclass
class ExportMeta:
    """The JSON sidecar of an export."""

    architecture: str
    in_chans: int
    bands: list[str]
    sensor: str
    normalisation: Normalisation
    num_features: int
    source: dict[str, Any] = field(default_factory=dict)  # DINO settings, epoch, step, run directory
    sensor_parts: list[dict[str, Any]] = field(default_factory=list)  # a sensor stack's sensors in channel order:
    #                                     {sensor, bands, conversion, units} each (empty for a single sensor)
    sensor_def: dict[str, Any] | None = None  # the sensor (stack) as SensorSpec.to_dict(): conversion, file bands,
    #                               scale/offset, nodata, gsd, statistics; fine-tuning re-creates a custom sensor from it
    format: str = EXPORT_FORMAT
    sha256: str = ""
    timm_version: str = ""
    stem_pool: bool = True  # False: pretrained without the ResNet stem max-pool (model.maxpool = nn.Identity())

    def load_snippet(self, weights_file: str) -> str:
        """The Python that rebuilds the pretrained network with timm alone (the sidecar's ``load_with``)."""
        create = (f"timm.create_model({self.architecture!r}, in_chans={self.in_chans}, num_classes=0, "
                  f"checkpoint_path={weights_file!r})")
        if self.stem_pool:
            return create
        return f"model = {create}; model.maxpool = torch.nn.Identity()  # pretrained without the stem max-pool"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_export(state_dict: dict[str, torch.Tensor], meta: ExportMeta, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``out`` (``.safetensors``) and its ``.json`` sidecar atomically. Returns both paths."""
    import timm

    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    atomic_save_safetensors(state_dict, out, metadata={"format": EXPORT_FORMAT, "architecture": meta.architecture,
                                                       "in_chans": meta.in_chans, "bands": ",".join(meta.bands)})
    meta.sha256 = sha256_file(out)
    meta.timm_version = timm.__version__
    sidecar = out.with_suffix(".json")
    payload = asdict(meta)
    payload["load_with"] = meta.load_snippet(out.name)
    atomic_write_json(sidecar, payload)
    return out, sidecar


def read_export(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, torch.Tensor], ExportMeta]:
    """Read an export given its ``.safetensors`` or ``.json`` path; verify the checksum.

    Raises:
        FileNotFoundError: a file is missing (the message names it).
        ValueError: the sidecar is not an export of this format or the checksum does not match.
    """
    meta = read_export_meta(path, verify)
    return load_safetensors(Path(path).with_suffix(".safetensors")), meta


def read_export_meta(path: str | os.PathLike, verify: bool = True) -> ExportMeta:
    """The metadata of an export (its ``.json`` sidecar), with the weights file's checksum verified but its tensors
    not loaded. Raises as :func:`read_export`."""
    path = Path(path)
    weights = path.with_suffix(".safetensors")
    sidecar = path.with_suffix(".json")
    for p in (weights, sidecar):
        if not p.is_file():
            raise MissingFileError(f"backbone export incomplete: {p} not found (an export is a .safetensors file "
                                    f"with a .json sidecar of the same name, written by ssl/export.py)")
    try:
        raw = json.loads(sidecar.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{sidecar}: not valid JSON: {exc}") from exc
    if raw.get("format") != EXPORT_FORMAT:
        raise DataError(f"{sidecar}: format {raw.get('format')!r} is not {EXPORT_FORMAT!r}")
    raw.pop("load_with", None)
    norm_keys = {f.name for f in fields(Normalisation)}
    raw["normalisation"] = Normalisation(**{k: v for k, v in raw["normalisation"].items() if k in norm_keys})
    meta_keys = {f.name for f in fields(ExportMeta)}
    meta = ExportMeta(**{k: v for k, v in raw.items() if k in meta_keys})  # keys of later additions are skipped
    if verify and meta.sha256 and sha256_file(weights) != meta.sha256:
        raise DataError(f"{weights}: checksum does not match {sidecar} (file modified or truncated)")
    return meta


def check_compatible(meta: ExportMeta, bands: list[str] | tuple[str, ...], conversion: str, mean, std,
                     source: str = "the dataset", rtol: float = 1e-3) -> None:
    """Refuse an export whose bands (names and order) or normalisation differ from the dataset's.

    Args:
        meta: the export's metadata.
        bands: the dataset's band names in model order.
        conversion: the dataset's raw-to-model-units rule.
        mean: the dataset's per-band mean in model units.
        std: the dataset's per-band std.
        source: what to call the dataset in messages (e.g. the config file).

    Raises:
        ExportMismatchError: naming what differs and the config keys that fix it.
    """
    bands = list(bands)
    if list(meta.bands) != bands:
        missing = [b for b in meta.bands if b not in bands]
        extra = [b for b in bands if b not in meta.bands]
        detail = []
        if missing:
            detail.append(f"missing in {source}: {missing}")
        if extra:
            detail.append(f"not in the export: {extra}")
        if not missing and not extra:
            detail.append("same bands in a different order")
        raise ExportMismatchError(
            f"backbone export was trained on bands {meta.bands} but {source} gives {bands} ({'; '.join(detail)}). "
            f"Set data.bands to the export's bands, or set model.band_mapping=true to map the first convolution by "
            f"band name."
        )
    if meta.normalisation.conversion != conversion:
        raise ExportMismatchError(
            f"backbone export expects raw values converted with {meta.normalisation.conversion!r} but {source} uses "
            f"{conversion!r}"
        )
    m_e, s_e = meta.normalisation.arrays()
    m_d, s_d = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if m_e.shape != m_d.shape or not (np.allclose(m_e, m_d, rtol=rtol, atol=1e-6) and np.allclose(s_e, s_d, rtol=rtol, atol=1e-6)):
        worst = int(np.argmax(np.abs(m_e - m_d) / np.maximum(s_e, 1e-6))) if m_e.shape == m_d.shape else 0
        raise ExportMismatchError(
            f"normalisation of {source} differs from the export's (band {bands[worst]}: export mean/std "
            f"{m_e[worst]:.5g}/{s_e[worst]:.5g}, dataset {m_d[worst]:.5g}/{s_d[worst]:.5g}). Use the export's "
            f"statistics (data.stats_file: null with model.weights set takes them from the export)."
        )
