"""Band registry: sensors, their bands, ground sampling distances, reference statistics and unit conversions.

Every dataset in this project hands the model images in *model units*:

* Sentinel-2 (``S2L1C``, ``S2L2A``): reflectance, ``(DN + offset) / 10000``. Products of processing baseline
  04.00 and later (from 25 January 2022) carry a radiometric offset of ``-1000`` DN
  (``BOA_ADD_OFFSET``/``RADIO_ADD_OFFSET`` in the product metadata); pass ``offset=S2_BASELINE_0400_OFFSET`` or use
  :func:`s2_offset_for_baseline`. DN ``0`` is the Sentinel-2 no-data value.
* Sentinel-1 (``S1``): backscatter in dB. BigEarthNet-S1 files already hold dB, so the conversion is ``"db"``
  (identity). The optional derived band ``"VV/VH"`` is the ratio of the two dB values, ``VV_dB / VH_dB``: that is the
  definition behind the reference statistics (mean 0.65 = -12.6 / -19.3).
* Quad-pol SAR (``SAR4``, SpaceNet-6-like HH, HV, VH, VV): files hold linear intensity which is converted to dB
  with ``10 * log10(max(x, floor))``.

Normalisation ``(x - mean) / std`` is *not* done here; it belongs to the transform pipeline, with mean/std from the
sensor's reference statistics (:attr:`SensorSpec.mean`/:attr:`SensorSpec.std`) or from a stats file written by
``python -m common.stats`` (:class:`BandStats`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "IGNORE_INDEX",
    "CONVERSIONS",
    "S2_REFLECTANCE_SCALE",
    "S2_BASELINE_0400_OFFSET",
    "DB_FLOOR",
    "DERIVED_BANDS",
    "SensorSpec",
    "BandStats",
    "SENSORS",
    "get_sensor",
    "sensor_names",
    "dn_to_reflectance",
    "s2_offset_for_baseline",
    "linear_to_db",
    "complex_to_intensity",
    "to_model_units",
    "STACK_SEPARATOR",
    "stack_sensors",
    "file_band_names",
    "resolve_sensors",
]

IGNORE_INDEX = 255
"""Mask value ignored by losses and metrics (invalid pixels, unlabelled pixels)."""

CONVERSIONS = ("dn_to_reflectance", "db", "linear_to_db", "complex_to_intensity_db", "none")
"""Allowed values of :attr:`SensorSpec.conversion` (a stack's is its parts' joined with ``+``)."""

STACK_SEPARATOR = "+"
"""Joins the sensor names (``"S2L2A+S1"``) and conversions (``"dn_to_reflectance+db"``) of a sensor stack."""

S2_REFLECTANCE_SCALE = 10000.0
"""Sentinel-2 quantification value: reflectance = (DN + offset) / 10000."""

S2_BASELINE_0400_OFFSET = -1000
"""Radiometric offset (DN) added before scaling for Sentinel-2 processing baseline >= 04.00."""

S2_OFFSET_BASELINE = (4, 0)
"""First processing baseline (major, minor) that carries :data:`S2_BASELINE_0400_OFFSET`."""

S2_NODATA_DN = 0
"""Sentinel-2 L1C/L2A no-data digital number."""

DB_FLOOR = 1e-6
"""Smallest linear intensity used before ``10 * log10`` (-60 dB); zeros and negatives are clipped to it."""

RATIO_DENOMINATOR_EPS = 1e-3
"""Smallest |denominator| (dB) used for the derived ``VV/VH`` ratio, to keep it finite where VH is 0 dB."""

STATS_FORMAT = "eoseg-band-stats/1"
"""Value of the ``format`` key of a band statistics JSON file."""

# Sentinel-2 band layout and ground sampling distance (metres), in product band order.
_S2_GSD = {
    "B01": 60.0, "B02": 10.0, "B03": 10.0, "B04": 10.0, "B05": 20.0, "B06": 20.0, "B07": 20.0,
    "B08": 10.0, "B8A": 20.0, "B09": 60.0, "B10": 60.0, "B11": 20.0, "B12": 20.0,
}  # fmt: skip
_S2L1C_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
_S2L2A_BANDS = tuple(b for b in _S2L1C_BANDS if b != "B10")

# Reference statistics from the user's BAND_STATS (BigEarthNet-S2 L2A, digital numbers); divided by
# S2_REFLECTANCE_SCALE below to give reflectance.
_S2_MEAN_DN = {
    "B01": 340.76769064, "B02": 429.9430203, "B03": 614.21682446, "B04": 590.23569706, "B05": 950.68368468,
    "B06": 1792.46290469, "B07": 2075.46795189, "B08": 2218.94553375, "B8A": 2266.46036911,
    "B09": 2246.0605464, "B11": 1594.42694882, "B12": 1009.32729131,
}  # fmt: skip
_S2_STD_DN = {
    "B01": 554.81258967, "B02": 572.41639287, "B03": 582.87945694, "B04": 675.88746967, "B05": 729.89827633,
    "B06": 1096.01480586, "B07": 1273.45393088, "B08": 1365.45589904, "B8A": 1356.13789355,
    "B09": 1302.3292881, "B11": 1079.19066363, "B12": 818.86747235,
}  # fmt: skip
# B10 (cirrus, 1375 nm) is absent from BigEarthNet (L2A drops it). Top-of-atmosphere reflectance in this deep
# water-vapour absorption band is close to zero except over high clouds; these are order-of-magnitude priors
# (reflectance 0.0022 +- 0.0051). Recompute with `python -m common.stats` for L1C data.
_S2_B10_MEAN_DN, _S2_B10_STD_DN = 22.0, 51.0

# Sentinel-1 reference statistics (user's BAND_STATS, BigEarthNet-S1, dB).
_S1_MEAN = {"VV": -12.619993741972035, "VH": -19.29044597721542, "VV/VH": 0.6525036195871579}
_S1_STD = {"VV": 5.115911777546365, "VH": 5.464428464912864, "VV/VH": 30.75264076801808}

# Quad-pol SAR (SpaceNet-6-like, airborne X-band, 0.5 m, urban/harbour scenes), dB. No reference statistics were
# supplied; these are priors: co-polarised channels around -10 dB, cross-polarised around -17 dB (about 7 dB
# weaker), with a wide spread (7 dB) because urban scenes mix dark water/shadow and very bright double-bounce
# scatterers. Recompute with `python -m common.stats --sensor SAR4` before serious training.
_SAR4_MEAN = {"HH": -10.0, "HV": -17.0, "VH": -17.0, "VV": -10.0}
_SAR4_STD = {"HH": 7.0, "HV": 7.0, "VH": 7.0, "VV": 7.0}
_SAR4_GSD = 0.5
_S1_GSD = 10.0

_RGB_S2 = ("B04", "B03", "B02")
_RGB_S1_RATIO = ("VV", "VH", "VV/VH")
_RGB_S1 = ("VV", "VH", "VV")
_RGB_SAR4 = ("HH", "HV", "VV")


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` with ``|denominator|`` clamped to :data:`RATIO_DENOMINATOR_EPS`."""
    sign = np.where(denominator < 0, -1.0, 1.0).astype(np.float32)
    safe = sign * np.maximum(np.abs(denominator), RATIO_DENOMINATOR_EPS)
    return (numerator / safe).astype(np.float32)


@dataclass(frozen=True)
class DerivedBand:
    """A band computed from other bands *in model units*.

    Attributes:
        name: Band name, e.g. ``"VV/VH"``.
        inputs: Names of the bands it is computed from (read from files).
        fn: ``fn(*arrays) -> array`` taking the inputs in model units, in the order of ``inputs``.
        description: One line for datasheets.
    """

    name: str
    inputs: tuple[str, ...]
    fn: Callable[..., np.ndarray]
    description: str


DERIVED_BANDS: dict[str, DerivedBand] = {
    "VV/VH": DerivedBand("VV/VH", ("VV", "VH"), _ratio, "ratio of dB values VV_dB / VH_dB"),
}
"""Derived bands by name. A sensor lists the ones it supports in :attr:`SensorSpec.derived`."""


@dataclass(frozen=True)
class SensorSpec:
    """Description of one sensor (or a band subset of it).

    Attributes:
        name: Registry name (``"S2L1C"``, ``"S2L2A"``, ``"S1"``, ``"SAR4"``).
        bands: Band names in channel order of the images this spec describes.
        gsd: Ground sampling distance (metres) per band.
        mean: Reference mean per band in model units (after conversion, before normalisation).
        std: Reference standard deviation per band in model units.
        nodata: No-data value of the *raw* files when a file declares none (``None``: only NaN is invalid).
        rgb: Three band names used for RGB previews.
        conversion: Raw-to-model-unit conversion, one of :data:`CONVERSIONS`.
        units: Model units, for humans (``"reflectance"``, ``"dB"``).
        derived: Names of derived bands (see :data:`DERIVED_BANDS`) this sensor can provide; those of them that
            are in :attr:`bands` are computed, not read.
        description: One line for datasheets.
        parts: For a *sensor stack* (co-registered sensors whose bands are concatenated, e.g. Sentinel-2 + Sentinel-1;
            build it with :func:`stack_sensors` or ``get_sensor("S2L2A+S1")``): the spec of each sensor, in channel
            order. Each part keeps its own conversion, nodata and statistics; ``conversion`` is theirs joined with
            ``+``. Empty for a single sensor.
    """

    name: str
    bands: tuple[str, ...]
    gsd: dict[str, float]
    mean: dict[str, float]
    std: dict[str, float]
    nodata: float | None
    rgb: tuple[str, str, str]
    conversion: str
    units: str = ""
    derived: tuple[str, ...] = ()
    description: str = ""
    parts: tuple["SensorSpec", ...] = ()

    def __post_init__(self) -> None:
        if self.parts:
            expected = STACK_SEPARATOR.join(p.conversion for p in self.parts)
            if self.conversion != expected:
                raise ValueError(f"sensor stack {self.name}: conversion {self.conversion!r} is not its parts' "
                                 f"{expected!r}")
        elif self.conversion not in CONVERSIONS:
            raise ValueError(f"sensor {self.name}: conversion {self.conversion!r} is not one of {CONVERSIONS}")
        if len(set(self.bands)) != len(self.bands):
            raise ValueError(f"sensor {self.name}: duplicate band names in {self.bands}")
        known = set(self.available_bands)
        for attr in ("gsd", "mean", "std"):
            missing = [b for b in self.bands if b not in getattr(self, attr)]
            if missing:
                raise ValueError(f"sensor {self.name}: {attr} lacks bands {missing}")
        unknown = [b for b in self.bands if b not in known]
        if unknown:
            raise ValueError(f"sensor {self.name}: bands {unknown} are neither raw nor derived bands")
        if len(self.rgb) != 3:
            raise ValueError(f"sensor {self.name}: rgb must name three bands, got {self.rgb}")

    # ------------------------------------------------------------------ band bookkeeping
    @property
    def num_bands(self) -> int:
        """Number of channels of images described by this spec."""
        return len(self.bands)

    @property
    def available_bands(self) -> tuple[str, ...]:
        """All band names this sensor can provide: raw bands with statistics plus its derived bands."""
        raw = tuple(b for b in self.gsd if b not in DERIVED_BANDS)
        return raw + tuple(d for d in self.derived if d not in raw)

    @property
    def raw_bands(self) -> tuple[str, ...]:
        """Bands that must be read from files to produce :attr:`bands` (inputs of derived bands appended; a stack's
        are its parts' raw bands, part after part)."""
        if self.parts:
            return tuple(b for p in self.parts for b in p.raw_bands)
        out = [b for b in self.bands if b not in DERIVED_BANDS]
        for b in self.bands:
            if b in DERIVED_BANDS:
                out += [i for i in DERIVED_BANDS[b].inputs if i not in out]
        return tuple(out)

    @property
    def is_sar(self) -> bool:
        """True for SAR sensors (dB model units); for a stack, True when every part is SAR."""
        if self.parts:
            return all(p.is_sar for p in self.parts)
        return self.conversion in ("db", "linear_to_db", "complex_to_intensity_db")

    @property
    def is_stack(self) -> bool:
        """True for a sensor stack (see :attr:`parts`)."""
        return bool(self.parts)

    def sensor_groups(self) -> tuple[tuple[int, ...], ...]:
        """Channel indices of each part of a stack (one group holding every channel for a single sensor); the
        ``augment.sensor_groups`` of sensor dropout."""
        if not self.parts:
            return (tuple(range(len(self.bands))),)
        out, start = [], 0
        for p in self.parts:
            out.append(tuple(range(start, start + len(p.bands))))
            start += len(p.bands)
        return tuple(out)

    def subset(self, bands: Iterable[str]) -> "SensorSpec":
        """Spec restricted to ``bands``, in the given order.

        Args:
            bands: Band names, each a raw or derived band of this sensor.

        Returns:
            A new :class:`SensorSpec` whose :attr:`bands` are ``bands``; ``rgb`` is kept when all three of its bands
            remain, otherwise the sensor's fallback preview is used.

        Raises:
            ValueError: A band is unknown (the message names it and lists the valid ones), or a band is repeated.
        """
        bands = tuple(bands)
        if not bands:
            raise ValueError(f"sensor {self.name}: empty band selection")
        if self.parts:
            return self._subset_stack(bands)
        valid = self.available_bands
        missing = [b for b in bands if b not in valid]
        if missing:
            raise ValueError(
                f"sensor {self.name} has no band(s) {missing}; valid bands: {', '.join(valid)}"
            )
        if len(set(bands)) != len(bands):
            raise ValueError(f"sensor {self.name}: duplicate bands in selection {list(bands)}")
        rgb = _preview_bands(self.name, bands, self.rgb)
        return replace(self, bands=bands, rgb=rgb)

    def _subset_stack(self, bands: tuple[str, ...]) -> "SensorSpec":
        owner = {}
        for i, p in enumerate(self.parts):
            for b in p.available_bands:
                owner.setdefault(b, i)
        missing = [b for b in bands if b not in owner]
        if missing:
            raise ValueError(f"sensor stack {self.name} has no band(s) {missing}; valid bands: {', '.join(owner)}")
        if len(set(bands)) != len(bands):
            raise ValueError(f"sensor stack {self.name}: duplicate bands in selection {list(bands)}")
        order = [owner[b] for b in bands]
        if order != sorted(order):
            want = [b for i in sorted(set(order)) for b in bands if owner[b] == i]
            raise ValueError(
                f"sensor stack {self.name}: bands {list(bands)} mix the sensors' bands; list each sensor's bands "
                f"together, in the stack's sensor order ({', '.join(p.name for p in self.parts)}), e.g. {want}")
        parts = [p.subset([b for b in bands if owner[b] == i]) for i, p in enumerate(self.parts) if i in order]
        return parts[0] if len(parts) == 1 else stack_sensors(*parts)

    def with_stats(self, stats: "BandStats") -> "SensorSpec":
        """Spec whose mean/std are replaced by ``stats`` for every band of :attr:`bands` (in every part of a stack).

        Raises:
            ValueError: ``stats`` lacks a band (message names the stats file and the band).
        """
        if self.parts:
            stats.arrays(self.bands)  # one message naming every missing band
            return stack_sensors(*(p.with_stats(stats) for p in self.parts))
        mean, std = stats.arrays(self.bands)
        return replace(
            self,
            mean={**self.mean, **dict(zip(self.bands, map(float, mean)))},
            std={**self.std, **dict(zip(self.bands, map(float, std)))},
        )

    def mean_array(self) -> np.ndarray:
        """Reference means in channel order, float32 ``(C,)``."""
        return np.array([self.mean[b] for b in self.bands], dtype=np.float32)

    def std_array(self) -> np.ndarray:
        """Reference standard deviations in channel order, float32 ``(C,)``."""
        return np.array([self.std[b] for b in self.bands], dtype=np.float32)

    def rgb_indices(self) -> tuple[int, int, int]:
        """Channel indices of :attr:`rgb` within :attr:`bands`."""
        return tuple(self.bands.index(b) for b in self.rgb)  # type: ignore[return-value]

    # ------------------------------------------------------------------ metadata
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (for checkpoint metadata); inverse of :meth:`from_dict`."""
        return {
            "name": self.name,
            "bands": list(self.bands),
            "gsd": {b: self.gsd[b] for b in self.bands},
            "mean": {b: self.mean[b] for b in self.bands},
            "std": {b: self.std[b] for b in self.bands},
            "nodata": self.nodata,
            "rgb": list(self.rgb),
            "conversion": self.conversion,
            "units": self.units,
            "derived": [b for b in self.derived if b in self.bands],
            "description": self.description,
            **({"parts": [p.to_dict() for p in self.parts]} if self.parts else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SensorSpec":
        """Rebuild a spec written by :meth:`to_dict` (e.g. from a checkpoint)."""
        if d.get("parts"):
            return stack_sensors(*(cls.from_dict(p) for p in d["parts"]))
        return cls(
            name=d["name"],
            bands=tuple(d["bands"]),
            gsd={k: float(v) for k, v in d["gsd"].items()},
            mean={k: float(v) for k, v in d["mean"].items()},
            std={k: float(v) for k, v in d["std"].items()},
            nodata=d.get("nodata"),
            rgb=tuple(d["rgb"]),  # type: ignore[arg-type]
            conversion=d["conversion"],
            units=d.get("units", ""),
            derived=tuple(d.get("derived", ())),
            description=d.get("description", ""),
        )

    def describe(self) -> str:
        """Multi-line human-readable summary (band, GSD, mean, std)."""
        if self.parts:
            return "\n".join([f"{self.name}: {self.description}"] + [p.describe() for p in self.parts])
        lines = [
            f"{self.name}: {self.description}".rstrip(": "),
            f"  conversion={self.conversion} units={self.units} nodata={self.nodata} rgb={','.join(self.rgb)}",
            f"  {'band':<7}{'gsd_m':>7}{'mean':>12}{'std':>12}",
        ]
        for b in self.bands:
            tag = " (derived)" if b in DERIVED_BANDS else ""
            lines.append(f"  {b:<7}{self.gsd[b]:>7g}{self.mean[b]:>12.5g}{self.std[b]:>12.5g}{tag}")
        return "\n".join(lines)


def _preview_bands(sensor: str, bands: Sequence[str], default: Sequence[str]) -> tuple[str, str, str]:
    """RGB preview bands of a band subset: the sensor default when present (S1: VV, VH, VV/VH or VV, VH, VV)."""
    if sensor == "S1" and "VV" in bands and "VH" in bands:
        return _RGB_S1_RATIO if "VV/VH" in bands else _RGB_S1
    if all(b in bands for b in default):
        return tuple(default)  # type: ignore[return-value]
    if all(b in bands for b in _RGB_S2):
        return _RGB_S2
    picks = list(bands[:3])
    while len(picks) < 3:
        picks.append(picks[-1])
    return tuple(picks)  # type: ignore[return-value]


def _s2_spec(name: str, bands: tuple[str, ...], description: str) -> SensorSpec:
    mean = {b: v / S2_REFLECTANCE_SCALE for b, v in _S2_MEAN_DN.items()}
    std = {b: v / S2_REFLECTANCE_SCALE for b, v in _S2_STD_DN.items()}
    if "B10" in bands:
        mean["B10"] = _S2_B10_MEAN_DN / S2_REFLECTANCE_SCALE
        std["B10"] = _S2_B10_STD_DN / S2_REFLECTANCE_SCALE
    return SensorSpec(
        name=name,
        bands=bands,
        gsd={b: _S2_GSD[b] for b in bands},
        mean=mean,
        std=std,
        nodata=S2_NODATA_DN,
        rgb=_RGB_S2,
        conversion="dn_to_reflectance",
        units="reflectance",
        description=description,
    )


SENSORS: dict[str, SensorSpec] = {
    "S2L1C": _s2_spec("S2L1C", _S2L1C_BANDS, "Sentinel-2 MSI Level-1C top-of-atmosphere, 13 bands, uint16 DN"),
    "S2L2A": _s2_spec("S2L2A", _S2L2A_BANDS, "Sentinel-2 MSI Level-2A bottom-of-atmosphere, 12 bands, uint16 DN"),
    "S1": SensorSpec(
        name="S1",
        bands=("VV", "VH"),
        gsd={"VV": _S1_GSD, "VH": _S1_GSD, "VV/VH": _S1_GSD},
        mean=dict(_S1_MEAN),
        std=dict(_S1_STD),
        nodata=None,
        rgb=_RGB_S1,
        conversion="db",
        units="dB",
        derived=("VV/VH",),
        description="Sentinel-1 GRD IW dual-pol backscatter, files in dB",
    ),
    "SAR4": SensorSpec(
        name="SAR4",
        bands=("HH", "HV", "VH", "VV"),
        gsd={b: _SAR4_GSD for b in ("HH", "HV", "VH", "VV")},
        mean=dict(_SAR4_MEAN),
        std=dict(_SAR4_STD),
        nodata=0.0,
        rgb=_RGB_SAR4,
        conversion="linear_to_db",
        units="dB",
        description="quad-pol SAR (SpaceNet-6-like), files in linear intensity, converted to dB",
    ),
}
"""The sensor registry (full band sets). Use :func:`get_sensor` rather than indexing it."""


def sensor_names() -> tuple[str, ...]:
    """Names accepted by :func:`get_sensor`."""
    return tuple(SENSORS)


def get_sensor(name: str | SensorSpec, bands: Iterable[str] | None = None) -> SensorSpec:
    """Look a sensor up by name (case-insensitive), optionally restricted to ``bands``.

    Args:
        name: Sensor name, or a :class:`SensorSpec` (returned as is, then subset).
        bands: Optional band names in the wanted channel order (see :meth:`SensorSpec.subset`).

    Raises:
        KeyError: Unknown sensor; the message lists the valid names.
        ValueError: Unknown band (see :meth:`SensorSpec.subset`).
    """
    if isinstance(name, SensorSpec):
        spec = name
    elif STACK_SEPARATOR in str(name):
        spec = stack_sensors(*(get_sensor(n.strip()) for n in str(name).split(STACK_SEPARATOR)))
    else:
        key = {k.upper(): k for k in SENSORS}.get(str(name).upper())
        if key is None:
            raise KeyError(f"unknown sensor {name!r}; valid sensors: {', '.join(SENSORS)} (a stack of co-registered "
                           f"sensors joins names with {STACK_SEPARATOR!r}, e.g. 'S2L2A+S1')")
        spec = SENSORS[key]
    return spec.subset(bands) if bands is not None else spec


def stack_sensors(*specs: SensorSpec) -> SensorSpec:
    """The spec of co-registered sensors stacked along the channel axis, e.g. Sentinel-2 bands then Sentinel-1 bands.

    Every part keeps its conversion (S2 DN -> reflectance, S1 dB ...), nodata and statistics; the stack's ``bands``,
    ``mean`` and ``std`` are the parts' concatenated, its name and conversion the parts' joined with ``+``
    (``"S2L2A+S1"``, ``"dn_to_reflectance+db"``), its preview bands the first optical part's. Stacks given as parts
    are flattened.

    Raises:
        ValueError: fewer than two sensors, or two sensors that share band names (the stack names bands uniquely).
    """
    parts: list[SensorSpec] = []
    for s in specs:
        parts.extend(s.parts if s.parts else (s,))
    if len(parts) < 2:
        raise ValueError(f"a sensor stack needs at least two sensors, got {[p.name for p in parts]}")
    seen: dict[str, str] = {}
    for p in parts:
        for b in p.available_bands:
            if b in seen:
                raise ValueError(f"sensors {seen[b]} and {p.name} both have a band named {b}: a stack needs distinct "
                                 f"band names")
            seen[b] = p.name
    merged: dict[str, dict[str, float]] = {"gsd": {}, "mean": {}, "std": {}}
    for p in parts:
        for attr, d in merged.items():
            d.update(getattr(p, attr))
    nodata = {p.nodata for p in parts}
    preview = next((p for p in parts if not p.is_sar and all(b in p.bands for b in p.rgb)), parts[0])
    return SensorSpec(
        name=STACK_SEPARATOR.join(p.name for p in parts),
        bands=tuple(b for p in parts for b in p.bands),
        gsd=merged["gsd"],
        mean=merged["mean"],
        std=merged["std"],
        nodata=nodata.pop() if len(nodata) == 1 else None,
        rgb=preview.rgb,
        conversion=STACK_SEPARATOR.join(p.conversion for p in parts),
        units=STACK_SEPARATOR.join(p.units for p in parts),
        derived=tuple(d for p in parts for d in p.derived),
        description="stack of " + ", ".join(f"{p.name} ({len(p.bands)} bands)" for p in parts),
        parts=tuple(parts),
    )


def file_band_names(spec: SensorSpec) -> tuple[str, ...]:
    """Band names assumed for a multi-band file without band descriptions: the registry sensor's full band list in
    product order (a stack's: its sensors' lists one after the other, e.g. 12 S2L2A bands then VV, VH), or the spec's
    raw bands for a sensor outside the registry."""
    if spec.parts:
        return tuple(b for p in spec.parts for b in file_band_names(p))
    base = SENSORS.get(spec.name)
    return base.bands if base is not None else spec.raw_bands


# ---------------------------------------------------------------------- conversions
def dn_to_reflectance(dn: np.ndarray, offset: float = 0) -> np.ndarray:
    """Sentinel-2 digital numbers to reflectance, ``(dn + offset) / 10000``.

    Args:
        dn: Digital numbers (any shape, any numeric dtype).
        offset: Radiometric offset in DN; ``S2_BASELINE_0400_OFFSET`` (-1000) for processing baseline >= 04.00.

    Returns:
        float32 array of the same shape. No clipping: baseline >= 04.00 can give small negative reflectances.
    """
    out = np.asarray(dn, dtype=np.float32)
    if offset:
        out = out + np.float32(offset)
    return out / np.float32(S2_REFLECTANCE_SCALE)


def s2_offset_for_baseline(baseline: str | float | None) -> int:
    """Radiometric offset (DN) for a Sentinel-2 processing baseline such as ``"04.00"`` or ``"N0509"``.

    Returns:
        :data:`S2_BASELINE_0400_OFFSET` for baselines >= 04.00, else 0 (also for ``None``).
    """
    if baseline is None:
        return 0
    text = str(baseline).strip().upper().lstrip("N")
    if "." not in text and len(text) == 4 and text.isdigit():  # "0509" as in product names
        text = f"{text[:2]}.{text[2:]}"
    try:
        major, minor = (int(p) for p in text.split(".")[:2])
    except ValueError as exc:
        raise ValueError(f"cannot parse Sentinel-2 processing baseline {baseline!r}") from exc
    return S2_BASELINE_0400_OFFSET if (major, minor) >= S2_OFFSET_BASELINE else 0


def linear_to_db(x: np.ndarray, floor: float = DB_FLOOR) -> np.ndarray:
    """Linear power/intensity to decibels, ``10 * log10(max(x, floor))``; float32 out, NaN stays NaN."""
    x = np.asarray(x, dtype=np.float32)
    return (np.float32(10.0) * np.log10(np.maximum(x, np.float32(floor)))).astype(np.float32)


def complex_to_intensity(z: np.ndarray) -> np.ndarray:
    """Complex amplitude (e.g. SLC) to intensity ``|z|^2`` (float32)."""
    z = np.asarray(z)
    if np.iscomplexobj(z):
        return (z.real.astype(np.float32) ** 2 + z.imag.astype(np.float32) ** 2).astype(np.float32)
    return np.square(z.astype(np.float32))


def to_model_units(
    raw: np.ndarray,
    spec: SensorSpec,
    *,
    raw_bands: Sequence[str] | None = None,
    offset: float = 0,
    floor: float = DB_FLOOR,
) -> np.ndarray:
    """Apply ``spec.conversion`` to raw file values and compute derived bands.

    Args:
        raw: ``(C_raw, H, W)`` raw values, channels in the order of ``raw_bands``.
        spec: Sensor spec; the output channels follow ``spec.bands``.
        raw_bands: Names of ``raw``'s channels; defaults to ``spec.raw_bands``.
        offset: Sentinel-2 radiometric offset (see :func:`dn_to_reflectance`); ignored for SAR.
        floor: Linear floor for dB conversions (see :func:`linear_to_db`).

    Returns:
        float32 ``(len(spec.bands), H, W)`` in model units (not normalised). Invalid pixels are converted like
        any other; mask them with the sample's ``valid``.

    Raises:
        ValueError: Channel count does not match ``raw_bands``, or a needed band is missing from ``raw_bands``.
    """
    raw_bands = tuple(spec.raw_bands if raw_bands is None else raw_bands)
    raw = np.asarray(raw)
    if raw.ndim != 3 or raw.shape[0] != len(raw_bands):
        raise ValueError(f"expected raw array (C={len(raw_bands)}, H, W) for bands {raw_bands}, got {raw.shape}")
    if spec.parts:  # each sensor of a stack with its own conversion
        index = {b: i for i, b in enumerate(raw_bands)}
        out_parts = []
        for p in spec.parts:
            missing = [b for b in p.raw_bands if b not in index]
            if missing:
                raise ValueError(f"band(s) {missing} of sensor {p.name} are not among raw bands {raw_bands}")
            out_parts.append(to_model_units(raw[[index[b] for b in p.raw_bands]], p, raw_bands=p.raw_bands,
                                            offset=offset, floor=floor))
        return np.concatenate(out_parts, axis=0)
    conv = spec.conversion
    if conv == "dn_to_reflectance":
        phys = dn_to_reflectance(raw, offset)
    elif conv == "linear_to_db":
        phys = linear_to_db(raw, floor)
    elif conv == "complex_to_intensity_db":
        phys = linear_to_db(complex_to_intensity(raw), floor)
    else:  # "db" (files already in dB) and "none"
        phys = raw.astype(np.float32, copy=False)
    by_name = {b: phys[i] for i, b in enumerate(raw_bands)}
    out = np.empty((len(spec.bands),) + phys.shape[1:], dtype=np.float32)
    for i, b in enumerate(spec.bands):
        if b in by_name:
            out[i] = by_name[b]
        elif b in DERIVED_BANDS:
            d = DERIVED_BANDS[b]
            missing = [x for x in d.inputs if x not in by_name]
            if missing:
                raise ValueError(f"derived band {b} needs {missing}, not among raw bands {raw_bands}")
            out[i] = d.fn(*(by_name[x] for x in d.inputs))
        else:
            raise ValueError(f"band {b} of sensor {spec.name} is not among raw bands {raw_bands}")
    return out


# ---------------------------------------------------------------------- statistics files
@dataclass
class BandStats:
    """Per-band mean/std in model units, as written by ``python -m common.stats`` (``data.stats_file``).

    JSON layout::

        {"format": "eoseg-band-stats/1", "sensor": "S2L2A", "units": "reflectance",
         "bands": ["B02", ...], "mean": {"B02": 0.043, ...}, "std": {...},
         "count": {...}, "min": {...}, "max": {...}, "source": {...}}

    Attributes:
        mean: Mean per band name.
        std: Standard deviation per band name.
        sensor: Sensor name the statistics were computed for.
        count: Number of valid pixels per band (optional).
        minimum: Minimum per band (optional).
        maximum: Maximum per band (optional).
        source: Free-form provenance (root, glob, number of files ...).
        path: File it was loaded from (for error messages), if any.
    """

    mean: dict[str, float]
    std: dict[str, float]
    sensor: str | None = None
    count: dict[str, int] = field(default_factory=dict)
    minimum: dict[str, float] = field(default_factory=dict)
    maximum: dict[str, float] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def bands(self) -> tuple[str, ...]:
        """Band names with statistics, in file order."""
        return tuple(self.mean)

    @classmethod
    def from_spec(cls, spec: SensorSpec) -> "BandStats":
        """Reference statistics of a sensor spec."""
        return cls(
            mean={b: spec.mean[b] for b in spec.bands},
            std={b: spec.std[b] for b in spec.bands},
            sensor=spec.name,
            source={"reference": "common.bands"},
        )

    def arrays(self, bands: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` float32 arrays in the order of ``bands``.

        Raises:
            ValueError: A band has no statistics (the message names the stats file and lists what it has).
        """
        missing = [b for b in bands if b not in self.mean or b not in self.std]
        if missing:
            where = self.path or "band statistics"
            raise ValueError(f"{where}: no statistics for band(s) {missing}; it has {list(self.mean)}")
        std = np.array([self.std[b] for b in bands], dtype=np.float32)
        if np.any(~np.isfinite(std)) or np.any(std <= 0):
            raise ValueError(f"{self.path or 'band statistics'}: non-positive std for bands {list(bands)}: {std}")
        return np.array([self.mean[b] for b in bands], dtype=np.float32), std

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (the stats file layout)."""
        d: dict[str, Any] = {
            "format": STATS_FORMAT,
            "sensor": self.sensor,
            "units": SENSORS[self.sensor].units if self.sensor in SENSORS else "",
            "bands": list(self.mean),
            "mean": self.mean,
            "std": self.std,
        }
        for key, val in (("count", self.count), ("min", self.minimum), ("max", self.maximum)):
            if val:
                d[key] = val
        if self.source:
            d["source"] = self.source
        return d

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the stats file atomically (temp file + ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BandStats":
        """Load a stats file.

        Raises:
            ValueError: The file is not valid JSON, lacks ``mean``/``std``, or has non-finite values; the message
                names the file.
        """
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ValueError(f"{path}: band statistics file does not exist") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(d, dict) or not isinstance(d.get("mean"), dict) or not isinstance(d.get("std"), dict):
            raise ValueError(f"{path}: band statistics need 'mean' and 'std' objects keyed by band name")
        if set(d["mean"]) != set(d["std"]):
            raise ValueError(
                f"{path}: 'mean' and 'std' name different bands: {sorted(d['mean'])} vs {sorted(d['std'])}"
            )
        for key in ("mean", "std"):
            bad = [b for b, v in d[key].items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
            if bad:
                raise ValueError(f"{path}: non-finite or non-numeric {key} for bands {bad}")
        return cls(
            mean={k: float(v) for k, v in d["mean"].items()},
            std={k: float(v) for k, v in d["std"].items()},
            sensor=d.get("sensor"),
            count={k: int(v) for k, v in d.get("count", {}).items()},
            minimum={k: float(v) for k, v in d.get("min", {}).items()},
            maximum={k: float(v) for k, v in d.get("max", {}).items()},
            source=dict(d.get("source", {})),
            path=str(path),
        )


def resolve_sensors(sources: Sequence[tuple[str | SensorSpec, Iterable[str] | None, str | os.PathLike | None]]
                    ) -> SensorSpec:
    """The spec of a run's data: one ``(sensor, bands, stats_file)`` source (:func:`resolve_sensor`), or the stack
    (:func:`stack_sensors`) of several co-registered ones in channel order (``data.sensor`` then ``data.stack``)."""
    specs = [resolve_sensor(*src) for src in sources]
    return specs[0] if len(specs) == 1 else stack_sensors(*specs)


def resolve_sensor(sensor: str | SensorSpec, bands: Iterable[str] | None = None,
                   stats_file: str | os.PathLike | None = None) -> SensorSpec:
    """The spec a run uses: ``sensor`` restricted to ``bands`` (in that order) with the statistics of
    ``stats_file`` (written by ``python -m common.stats``) when given, else the registry's reference statistics.

    Raises:
        KeyError / ValueError: unknown sensor, unknown band, or a stats file lacking a band (messages name them).
    """
    spec = get_sensor(sensor, bands)
    if stats_file is not None:
        spec = spec.with_stats(BandStats.from_json(stats_file))
    return spec
