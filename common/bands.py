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

What the *files* hold is declared, not guessed (:data:`INPUT_UNITS`, config ``data.input_units`` or the
``input_units`` of a ``data.sensor`` mapping): ``dn`` (digital numbers scaled to reflectance), ``reflectance``,
``linear_power`` (intensity), ``amplitude``, ``db`` or ``complex`` (single-look complex, ``|z|^2`` then dB, or ``|z|``
when the sensor's model units are amplitude). :meth:`SensorSpec.with_input_units` picks the conversion that gives the
sensor's model units from them; :func:`check_raw_values` refuses values that contradict the declared units (negative
linear power, dB above 100, reflectance above 10, complex pixels for a real conversion ...) with a message naming the
file, the band and the config key. Sensors outside the registry come from the config as a :class:`SensorDef`
(band names in file order, units and scale/offset, nodata, gsd, statistics, preview bands).

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
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np

from common.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "CONVERSIONS",
    "S2_REFLECTANCE_SCALE",
    "S2_BASELINE_0400_OFFSET",
    "DB_FLOOR",
    "DERIVED_BANDS",
    "SensorSpec",
    "SensorDef",
    "INPUT_UNITS",
    "COMPLEX_CONVERSIONS",
    "check_raw_values",
    "check_dtypes",
    "UnknownSensorError",
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
    "resolve_sensor",
]


class UnknownSensorError(DataError, KeyError):
    """An unknown sensor name (a :class:`~common.errors.DataError`, and a ``KeyError`` as before)."""

    __str__ = BaseException.__str__  # no quotes around the message (KeyError's str adds them)

IGNORE_INDEX = 255
"""Mask value ignored by losses and metrics (invalid pixels, unlabelled pixels)."""

CONVERSIONS = ("dn_to_reflectance", "db", "linear_to_db", "complex_to_intensity_db", "none", "scale_offset",
               "amplitude_to_db", "complex_to_amplitude")
"""Allowed values of :attr:`SensorSpec.conversion` (a stack's is its parts' joined with ``+``): ``dn_to_reflectance``
(Sentinel-2 ``(DN + offset) / 10000``), ``db`` (files in dB, identity), ``linear_to_db`` (``10 log10`` of linear
power), ``complex_to_intensity_db`` (``10 log10 |z|^2``), ``none`` (identity), ``scale_offset`` (``raw *
scale_factor + add_offset`` of a custom sensor), ``amplitude_to_db`` (``10 log10 a^2``), ``complex_to_amplitude``
(``|z|``)."""

COMPLEX_CONVERSIONS = ("complex_to_intensity_db", "complex_to_amplitude")
"""Conversions that take complex (single-look complex) pixels; every other conversion refuses them."""

INPUT_UNITS = ("dn", "reflectance", "linear_power", "amplitude", "db", "complex")
"""What the files of a sensor hold (``data.input_units``): digital numbers scaled to reflectance, reflectance,
linear power (intensity, sigma0/beta0 in linear scale), linear amplitude, dB, or complex amplitude (SLC)."""

InputUnits = Literal["dn", "reflectance", "linear_power", "amplitude", "db", "complex"]
ModelUnits = Literal["reflectance", "dB", "amplitude", "other"]

_INPUT_UNITS_OF = {"dn_to_reflectance": "dn", "scale_offset": "dn", "db": "db", "linear_to_db": "linear_power",
                   "amplitude_to_db": "amplitude", "complex_to_intensity_db": "complex",
                   "complex_to_amplitude": "complex"}
# (model units, input units) -> conversion
_CONVERSION_FOR = {
    ("reflectance", "dn"): "dn_to_reflectance", ("reflectance", "reflectance"): "none",
    ("dB", "db"): "db", ("dB", "linear_power"): "linear_to_db", ("dB", "amplitude"): "amplitude_to_db",
    ("dB", "complex"): "complex_to_intensity_db",
    ("amplitude", "amplitude"): "none", ("amplitude", "complex"): "complex_to_amplitude",
}  # fmt: skip

UNITS_KEY = "data.input_units"
"""The config key declaring what the files hold (for a ``data.sensor`` mapping: its ``input_units``; for a stacked
sensor: the ``input_units`` of its ``data.stack`` entry)."""

MAX_DB = 100.0
"""Largest plausible backscatter in dB: larger values are linear power, amplitude or digital numbers."""

MAX_REFLECTANCE = 10.0
"""Largest plausible reflectance (bright clouds reach ~2): larger values are digital numbers."""

MIN_REFLECTANCE = -1.0
"""Smallest plausible reflectance (offset products give small negatives): smaller values are not reflectance."""

MAX_UNNAMED_LINEAR_DB = 20.0
"""For files whose bands are not named: a median linear power above this (in dB, i.e. 100 linear) contradicts
backscatter (optical digital numbers read as SAR)."""

MIN_CHECK_PIXELS = 16
"""Fewest valid pixels for the value-range checks of :func:`check_raw_values` (fewer: not checked)."""

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
        file_bands: Band names of a file without band descriptions, in file order: the registry sensor's full band
            list, a custom sensor's declared bands (:class:`SensorDef`), a stack's parts' one after the other.
            Default: the raw bands.
        scale_factor: ``scale_offset`` conversion: ``raw * scale_factor + add_offset``.
        add_offset: See ``scale_factor``.
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
    file_bands: tuple[str, ...] = ()
    scale_factor: float = 1.0
    add_offset: float = 0.0

    def __post_init__(self) -> None:
        if not self.file_bands:
            fb = tuple(b for p in self.parts for b in p.file_bands) if self.parts else self.raw_bands
            object.__setattr__(self, "file_bands", fb)
        if self.conversion != "scale_offset" and not self.parts and (self.scale_factor != 1.0 or self.add_offset):
            raise ValueError(f"sensor {self.name}: scale_factor/add_offset need the conversion 'scale_offset'")
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
        return self.conversion in ("db", "linear_to_db", "complex_to_intensity_db", "amplitude_to_db") or (
            self.conversion == "none" and self.units == "dB")

    @property
    def input_units(self) -> str:
        """What the files hold (one of :data:`INPUT_UNITS`, or ``"model"`` for identity in other units); a stack's
        are its parts' joined with ``+``."""
        if self.parts:
            return STACK_SEPARATOR.join(p.input_units for p in self.parts)
        if self.conversion == "none":
            return {"reflectance": "reflectance", "amplitude": "amplitude", "dB": "db"}.get(self.units, "model")
        return _INPUT_UNITS_OF[self.conversion]

    def with_input_units(self, units: str | None, key: str = UNITS_KEY) -> "SensorSpec":
        """The spec whose conversion takes files holding ``units`` (:data:`INPUT_UNITS`) to this sensor's model
        units (``None``: unchanged). E.g. ``SAR4`` with ``"db"``: conversion ``db`` instead of ``linear_to_db``;
        ``S2L2A`` with ``"reflectance"``: ``none``; a dB sensor with ``"complex"``: ``complex_to_intensity_db``.

        Raises:
            DataError: units unknown, or that cannot give the sensor's model units (names ``key``).
        """
        if units is None or units == self.input_units:
            return self
        if self.parts:
            raise DataError(f"{key}: sensor stack {self.name} takes input units per sensor (set them on each "
                            f"data.stack entry), not {units!r} for all")
        if units not in INPUT_UNITS:
            raise DataError(f"{key}: {units!r} is not one of {', '.join(INPUT_UNITS)}")
        if self.conversion == "scale_offset":
            raise DataError(f"{key}: sensor {self.name} declares its own scale_factor/add_offset; change its "
                            f"input_units in the data.sensor mapping instead")
        conversion = _CONVERSION_FOR.get((self.units, units))
        if conversion is None:
            valid = [u for (m, u) in _CONVERSION_FOR if m == self.units]
            raise DataError(f"{key}: {units!r} files cannot give sensor {self.name}'s model units {self.units!r}; "
                            f"valid input units: {', '.join(valid) or 'none'}")
        return replace(self, conversion=conversion)

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
            raise DataError(f"sensor {self.name}: empty band selection")
        if self.parts:
            return self._subset_stack(bands)
        valid = self.available_bands
        missing = [b for b in bands if b not in valid]
        if missing:
            raise DataError(
                f"sensor {self.name} has no band(s) {missing}; valid bands: {', '.join(valid)}"
            )
        if len(set(bands)) != len(bands):
            raise DataError(f"sensor {self.name}: duplicate bands in selection {list(bands)}")
        rgb = _preview_bands(self.name, bands, self.rgb)
        return replace(self, bands=bands, rgb=rgb)

    def _subset_stack(self, bands: tuple[str, ...]) -> "SensorSpec":
        owner = {}
        for i, p in enumerate(self.parts):
            for b in p.available_bands:
                owner.setdefault(b, i)
        missing = [b for b in bands if b not in owner]
        if missing:
            raise DataError(f"sensor stack {self.name} has no band(s) {missing}; valid bands: {', '.join(owner)}")
        if len(set(bands)) != len(bands):
            raise DataError(f"sensor stack {self.name}: duplicate bands in selection {list(bands)}")
        order = [owner[b] for b in bands]
        if order != sorted(order):
            want = [b for i in sorted(set(order)) for b in bands if owner[b] == i]
            raise DataError(
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
            "file_bands": list(self.file_bands),
            "scale_factor": self.scale_factor,
            "add_offset": self.add_offset,
            **({"parts": [p.to_dict() for p in self.parts]} if self.parts else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SensorSpec":
        """Rebuild a spec written by :meth:`to_dict` (e.g. from a checkpoint, an export or a model card); specs
        written before ``file_bands`` existed get the registry sensor's (or their raw bands).

        Raises:
            DataError: a key is missing or a value is invalid.
        """
        try:
            return cls._from_dict(d)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"invalid sensor definition {dict(d)!r}: {exc}") from None

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any]) -> "SensorSpec":
        if d.get("parts"):
            return stack_sensors(*(cls._from_dict(p) for p in d["parts"]))
        base = SENSORS.get(d["name"])
        file_bands = d.get("file_bands") or (base.file_bands if base is not None else ())
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
            file_bands=tuple(file_bands),
            scale_factor=float(d.get("scale_factor", 1.0)),
            add_offset=float(d.get("add_offset", 0.0)),
        )

    def describe(self) -> str:
        """Multi-line human-readable summary (band, GSD, mean, std)."""
        if self.parts:
            return "\n".join([f"{self.name}: {self.description}"] + [p.describe() for p in self.parts])
        lines = [
            f"{self.name}: {self.description}".rstrip(": "),
            f"  conversion={self.conversion} units={self.units} nodata={self.nodata} rgb={','.join(self.rgb)}"
            + (f" scale_factor={self.scale_factor:g} add_offset={self.add_offset:g}"
               if self.conversion == "scale_offset" else ""),
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
    elif isinstance(name, SensorDef):
        spec = name.to_spec()
    elif STACK_SEPARATOR in str(name):
        spec = stack_sensors(*(get_sensor(n.strip()) for n in str(name).split(STACK_SEPARATOR)))
    else:
        key = {k.upper(): k for k in SENSORS}.get(str(name).upper())
        if key is None:
            raise UnknownSensorError(
                f"unknown sensor {name!r}; valid sensors: {', '.join(SENSORS)} (a stack of co-registered sensors "
                f"joins names with {STACK_SEPARATOR!r}, e.g. 'S2L2A+S1'; another sensor is defined in the config as "
                f"a mapping: data.sensor: {{name, bands, input_units, ...}}, see README 'Your own data')")
        spec = SENSORS[key]
    return spec.subset(bands) if bands is not None else spec


_MODEL_UNITS_DEFAULT = {"dn": "reflectance", "reflectance": "reflectance", "linear_power": "dB", "amplitude": "dB",
                        "db": "dB", "complex": "dB"}


@dataclass(frozen=True)
class SensorDef:
    """A sensor defined in the config (``data.sensor`` as a mapping; also ``data.stack[].sensor``), for data outside
    the registry: HLS, Landsat, PlanetScope, complex SAR, or a registry sensor's band subset stored without band
    descriptions (``base``).

    Examples (YAML)::

        sensor: {name: HLS, bands: [B02, B03, B04, B8A, B11, B12], input_units: dn, scale_factor: 0.0001,
                 nodata: -9999, gsd: 30, stats_file: hls_stats.json}
        sensor: {base: S2L2A, name: S2-10, bands: [B02, B03, B04, B05, B06, B07, B08, B8A, B11, B12]}
        sensor: {name: SLC, bands: [HH, HV, VH, VV], input_units: complex, model_units: dB, gsd: 0.5,
                 mean: {...}, std: {...}}

    Attributes:
        name: Sensor name recorded in exports and model cards (not a registry name, unless ``base`` is that sensor).
        bands: Band names in *file order* (multi-band files without band descriptions are read with these names).
        base: A registry sensor whose conversion, nodata, gsd and statistics the bands (a subset of its bands)
            take; the fields below then stay unset, except ``input_units``, ``nodata``, ``stats_file`` and ``rgb``.
        input_units: What the files hold (:data:`INPUT_UNITS`); required without ``base``.
        model_units: Units the model sees: ``reflectance`` (``dn``/``reflectance`` input), ``dB`` (SAR; ``complex``:
            ``10 log10 |z|^2``), ``amplitude`` (``amplitude`` or ``complex`` input: ``|z|``) or ``other`` (``dn``
            input scaled to anything else); default: reflectance for optical inputs, dB for SAR inputs.
        scale_factor: ``dn`` input: ``model = raw * scale_factor + add_offset`` (e.g. HLS 0.0001; Landsat Collection
            2 Level-2 0.0000275 with add_offset -0.2). Required with ``dn``, refused otherwise.
        add_offset: See ``scale_factor``.
        nodata: Raw no-data value of files that declare none (``null``: only NaN/inf are invalid).
        gsd: Ground sampling distance in metres, one for all bands or per band.
        mean: Reference mean per band in model units (with ``std``); or give ``stats_file`` (here or as
            ``data.stats_file``) written by ``python -m common.stats --sensor <this config>``.
        std: Reference standard deviation per band in model units.
        stats_file: Statistics file (as ``data.stats_file``).
        rgb: Three band names for previews (default: the S2 red/green/blue names when present, else the first three).
        description: One line for datasheets.
    """

    name: str
    bands: tuple[str, ...]
    base: str | None = None
    input_units: InputUnits | None = None
    model_units: ModelUnits | None = None
    scale_factor: float | None = None
    add_offset: float | None = None
    nodata: float | None = None
    gsd: float | dict[str, float] | None = None
    mean: dict[str, float] | None = None
    std: dict[str, float] | None = None
    stats_file: str | None = None
    rgb: tuple[str, str, str] | None = None
    description: str = ""

    def validate(self) -> None:
        """Refuse an incomplete or contradictory definition (the message names the key)."""
        where = f"sensor {self.name!r}"
        if not self.name or STACK_SEPARATOR in self.name:
            raise DataError(f"sensor name {self.name!r} must be non-empty and without {STACK_SEPARATOR!r}")
        bands = tuple(self.bands)
        if not bands or len(set(bands)) != len(bands) or any(not b or STACK_SEPARATOR in b for b in bands):
            raise DataError(f"{where}: bands must be distinct non-empty names in file order, got {list(bands)}")
        derived = [b for b in bands if b in DERIVED_BANDS]
        if derived:
            raise DataError(f"{where}: {derived} are derived bands, computed rather than read; list the bands the "
                            f"files hold (select derived bands with data.bands)")
        if self.rgb is not None and any(b not in bands for b in self.rgb):
            raise DataError(f"{where}: rgb {list(self.rgb)} must name bands of {list(bands)}")
        if self.base is not None:
            base = get_sensor(self.base)
            if base.is_stack:
                raise DataError(f"{where}: base must be one registry sensor, not the stack {self.base!r}")
            unknown = [b for b in bands if b not in base.raw_bands and b not in base.gsd]
            if unknown:
                raise DataError(f"{where}: band(s) {unknown} are not bands of the base sensor {base.name} "
                                f"({', '.join(base.file_bands)})")
            extra = [k for k in ("model_units", "scale_factor", "add_offset", "gsd", "mean", "std")
                     if getattr(self, k) is not None]
            if extra:
                raise DataError(f"{where}: {', '.join(extra)} come from the base sensor {base.name}; leave them out "
                                f"(other statistics: stats_file)")
            if self.name.upper() in {k.upper() for k in SENSORS} and self.name.upper() != base.name.upper():
                raise DataError(f"{where}: the name of a registry sensor other than the base {base.name}")
            base.with_input_units(self.input_units, key=f"{where}: input_units")
            return
        if self.name.upper() in {k.upper() for k in SENSORS}:
            raise DataError(f"{where}: a registry sensor's name; give another name, or set base: {self.name} to read "
                            f"a band subset of it")
        if self.input_units is None:
            raise DataError(f"{where}: input_units is required (what the files hold: {', '.join(INPUT_UNITS)})")
        model = self.model_units or _MODEL_UNITS_DEFAULT[self.input_units]
        if self.input_units == "dn":
            if self.scale_factor is None or not math.isfinite(self.scale_factor) or self.scale_factor == 0:
                raise DataError(f"{where}: input_units dn needs scale_factor (model value = raw * scale_factor + "
                                f"add_offset, e.g. 0.0001 for HLS/PlanetScope reflectance)")
            if self.add_offset is not None and not math.isfinite(self.add_offset):
                raise DataError(f"{where}: add_offset must be finite")
            if model not in ("reflectance", "other"):
                raise DataError(f"{where}: input_units dn gives model_units reflectance or other, not {model!r}")
        else:
            if self.scale_factor is not None or self.add_offset is not None:
                raise DataError(f"{where}: scale_factor/add_offset apply to input_units dn only, not "
                                f"{self.input_units!r}")
            if (model, self.input_units) not in {(m, u) for (m, u) in _CONVERSION_FOR}:
                valid = [m for (m, u) in _CONVERSION_FOR if u == self.input_units]
                raise DataError(f"{where}: input_units {self.input_units!r} cannot give model_units {model!r}; "
                                f"choose {' or '.join(valid)}")
        if self.gsd is None:
            raise DataError(f"{where}: gsd is required (metres, one number or one per band)")
        gsd = self._gsd()
        bad = [b for b in bands if b not in gsd or not (math.isfinite(gsd[b]) and gsd[b] > 0)]
        if bad:
            raise DataError(f"{where}: gsd lacks bands or is not positive for {bad}")
        if (self.mean is None) != (self.std is None):
            raise DataError(f"{where}: give mean and std together (or stats_file)")
        if self.mean is not None and self.std is not None:
            for key, d in (("mean", self.mean), ("std", self.std)):
                if set(d) != set(bands):
                    raise DataError(f"{where}: {key} must have one value per band {list(bands)}, got {sorted(d)}")
                if not all(math.isfinite(v) for v in d.values()):
                    raise DataError(f"{where}: {key} holds non-finite values")
            if any(v <= 0 for v in self.std.values()):
                raise DataError(f"{where}: std must be positive")

    def _gsd(self) -> dict[str, float]:
        if isinstance(self.gsd, Mapping):
            return {str(k): float(v) for k, v in self.gsd.items()}
        return {b: float(self.gsd) for b in self.bands} if self.gsd is not None else {}

    def to_spec(self, require_stats: bool = True) -> "SensorSpec":
        """The :class:`SensorSpec` (all bands in file order; ``file_bands`` the declared bands).

        Args:
            require_stats: Refuse a definition without statistics (``mean``/``std`` or ``stats_file``); with False
                ``stats_file`` is not read and a spec without ``mean``/``std`` gets mean 0 / std 1 placeholders (only
                for computing statistics with :mod:`common.stats`, which works before normalisation).

        Raises:
            DataError: invalid definition, or no statistics (the message names the keys to set).
        """
        self.validate()
        bands = tuple(self.bands)
        if self.base is not None:
            spec = get_sensor(self.base).with_input_units(self.input_units, key=f"sensor {self.name!r}: input_units")
            spec = spec.subset(bands)
            spec = replace(spec, name=self.name, file_bands=bands,
                           nodata=self.nodata if self.nodata is not None else spec.nodata,
                           rgb=tuple(self.rgb) if self.rgb else spec.rgb,  # type: ignore[arg-type]
                           description=self.description or f"{spec.description} (bands {', '.join(bands)})")
        else:
            model = self.model_units or _MODEL_UNITS_DEFAULT[str(self.input_units)]
            if self.input_units == "dn":
                conversion = "scale_offset"
            else:
                conversion = _CONVERSION_FOR[(model, str(self.input_units))]
            if self.mean is not None and self.std is not None:
                mean, std = {b: float(self.mean[b]) for b in bands}, {b: float(self.std[b]) for b in bands}
            elif self.stats_file is None and require_stats:
                raise DataError(
                    f"sensor {self.name!r} has no statistics: give mean and std per band in the data.sensor mapping, "
                    f"or stats_file (data.stats_file), computed with `python -m common.stats --root <tiles> --sensor "
                    f"<this config.yaml> --out stats.json`")
            else:
                mean, std = dict.fromkeys(bands, 0.0), dict.fromkeys(bands, 1.0)
            spec = SensorSpec(
                name=self.name, bands=bands, gsd=self._gsd(), mean=mean, std=std, nodata=self.nodata,
                rgb=tuple(self.rgb) if self.rgb else _preview_bands(self.name, bands, _RGB_S2),  # type: ignore[arg-type]
                conversion=conversion, units=model, description=self.description or f"custom sensor {self.name}",
                file_bands=bands, scale_factor=float(self.scale_factor) if conversion == "scale_offset" else 1.0,
                add_offset=float(self.add_offset or 0.0) if conversion == "scale_offset" else 0.0,
            )  # fmt: skip
        if self.stats_file is not None and require_stats:  # (not yet written when common.stats computes it)
            spec = spec.with_stats(BandStats.from_json(self.stats_file))
        return spec


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
    """Band names assumed for a multi-band file without band descriptions (:attr:`SensorSpec.file_bands`): the
    registry sensor's full band list in product order (a stack's: its sensors' lists one after the other, e.g. 12
    S2L2A bands then VV, VH), a :class:`SensorDef`'s declared bands, or the spec's raw bands otherwise."""
    return spec.file_bands


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
        DataError: complex pixels for a conversion of real values, or real pixels for a complex conversion
            (:func:`check_dtypes`).
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
    check_dtypes(raw.dtype, spec, raw_bands, "raw array")
    if conv == "dn_to_reflectance":
        phys = dn_to_reflectance(raw, offset)
    elif conv == "scale_offset":
        phys = raw.astype(np.float32) * np.float32(spec.scale_factor)
        if spec.add_offset:
            phys += np.float32(spec.add_offset)
    elif conv == "linear_to_db":
        phys = linear_to_db(raw, floor)
    elif conv == "amplitude_to_db":
        phys = linear_to_db(np.square(raw.astype(np.float32)), floor)
    elif conv == "complex_to_intensity_db":
        phys = linear_to_db(complex_to_intensity(raw), floor)
    elif conv == "complex_to_amplitude":
        phys = np.sqrt(complex_to_intensity(raw))
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


# ---------------------------------------------------------------------- input checks
def _part_of(spec: SensorSpec, band: str) -> SensorSpec:
    """The part of a stack (or the sensor) a raw band belongs to."""
    for p in spec.parts or (spec,):
        if band in p.file_bands or band in p.raw_bands:
            return p
    return spec


def _units_hint(spec: SensorSpec, part: SensorSpec, units: str) -> str:
    if part.conversion == "scale_offset":
        return f"check input_units/scale_factor/add_offset of the data.sensor mapping {part.name!r}"
    if part.name.upper() not in {k.upper() for k in SENSORS}:
        return f"set input_units: {units} in the sensor mapping {part.name!r} (data.sensor or its data.stack entry)"
    if spec.parts and part is not spec.parts[0]:
        return f"set input_units: {units} on the data.stack entry of {part.name}"
    return f"set {UNITS_KEY}: {units}"


def check_dtypes(dtypes: Any, spec: SensorSpec, raw_bands: Sequence[str], where: str | os.PathLike) -> None:
    """Refuse complex pixels for a conversion of real values and real pixels for a complex conversion.

    Args:
        dtypes: One dtype for all bands, or one per band of ``raw_bands`` (numpy or rasterio names, e.g.
            ``"complex_int16"``).
        spec: The sensor (stack).
        raw_bands: Names of the bands.
        where: File named in the message.

    Raises:
        DataError: naming the file, band, dtype and the config key (``data.input_units``) to set.
    """
    if isinstance(dtypes, (str, np.dtype)) or not isinstance(dtypes, Sequence):
        dtypes = [dtypes] * len(raw_bands)
    for band, dt in zip(raw_bands, dtypes):
        is_complex = "complex" in str(dt)
        part = _part_of(spec, band)
        if is_complex and part.conversion not in COMPLEX_CONVERSIONS:
            model = "amplitude" if part.units == "amplitude" else "intensity |z|^2 in dB"
            fix = (_units_hint(spec, part, "complex") + f" (converted to {model})"
                   if (part.units, "complex") in _CONVERSION_FOR else
                   f"sensor {part.name} has model units {part.units!r}, which complex pixels cannot give; define the "
                   f"sensor as a data.sensor mapping with input_units: complex")
            raise DataError(f"{where}: band {band} holds complex pixels ({dt}: single-look complex SAR?) but sensor "
                            f"{part.name} reads {part.input_units} values with the conversion {part.conversion!r}, "
                            f"which would keep only the real part; {fix}")
        if not is_complex and part.conversion in COMPLEX_CONVERSIONS:
            raise DataError(f"{where}: band {band} holds real {dt} pixels but sensor {part.name} declares complex "
                            f"input (conversion {part.conversion!r}); set {UNITS_KEY} to what the file holds "
                            f"(linear_power, amplitude or db)")


def _band_ranges(raw: np.ndarray, valid: np.ndarray | None) -> list[np.ndarray | None]:
    """Valid, finite values of every band (None for a band with fewer than :data:`MIN_CHECK_PIXELS`)."""
    out: list[np.ndarray | None] = []
    for band in raw:
        x = band[valid] if valid is not None else band.ravel()
        if np.issubdtype(x.dtype, np.floating):
            x = x[np.isfinite(x)]
        out.append(x if x.size >= MIN_CHECK_PIXELS else None)
    return out


def check_raw_values(
    raw: np.ndarray,
    valid: np.ndarray | None,
    spec: SensorSpec,
    raw_bands: Sequence[str],
    where: str | os.PathLike,
    *,
    sampled: bool = False,
    unnamed: bool = False,
) -> None:
    """Refuse raw values that contradict the declared input units (cheap: min/max per band, a median on samples).

    Always (every read): negative linear power or amplitude (dB data?), dB values above :data:`MAX_DB` (linear or
    digital numbers?), negative Sentinel-2 digital numbers, reflectance outside [:data:`MIN_REFLECTANCE`,
    :data:`MAX_REFLECTANCE`] (digital numbers, or dB?), a ``scale_offset`` sensor whose reflectance falls outside that
    range. With ``sampled`` (construction-time samples): also float digital numbers that all lie in [0, 2] (already
    reflectance), and dB bands whose values all lie in [0, 2] (linear power or reflectance); a constant band (fill)
    passes these two. With ``unnamed`` (the
    file's bands were not named by descriptions): also linear power whose median is above
    :data:`MAX_UNNAMED_LINEAR_DB` dB (optical digital numbers read as SAR).

    Args:
        raw: ``(C, H, W)`` raw values in the order of ``raw_bands``.
        valid: ``(H, W)`` valid pixels (None: all); checks use valid finite pixels only, and skip a band with fewer
            than :data:`MIN_CHECK_PIXELS`.
        spec: The sensor (stack) the values are read for.
        raw_bands: Band names of ``raw``'s channels.
        where: File named in messages.

    Raises:
        DataError: naming the file, the band, the values seen and the config key to set.
    """
    check_dtypes([raw.dtype] * len(raw_bands), spec, raw_bands, where)
    if np.iscomplexobj(raw):
        return
    for band, x in zip(raw_bands, _band_ranges(np.asarray(raw), valid)):
        if x is None:
            continue
        part = _part_of(spec, band)
        units, conv = part.input_units, part.conversion
        lo, hi = float(x.min()), float(x.max())
        seen = f"values {lo:.6g}..{hi:.6g}"
        head = f"{where}: band {band} holds {seen}"
        if unnamed:
            head += " (its bands are not named by band descriptions; they were assumed to be in the sensor's order)"
        problem = fix = None
        if units in ("linear_power", "amplitude") and lo < 0:
            name = "linear power" if units == "linear_power" else "amplitude"
            problem, fix = f"negative values cannot be {name} (the file is probably in dB)", "db"
        elif units == "db" and hi > MAX_DB:
            problem, fix = f"values above {MAX_DB:g} dB are not backscatter (linear power, amplitude or digital " \
                           f"numbers?)", "linear_power (or amplitude)"
        elif conv == "dn_to_reflectance" and lo < 0:
            problem, fix = "Sentinel-2 digital numbers are never negative (dB or reflectance data?)", "reflectance"
        elif units == "reflectance" and (hi > MAX_REFLECTANCE or lo < MIN_REFLECTANCE):
            problem = (f"reflectance lies in [{MIN_REFLECTANCE:g}, {MAX_REFLECTANCE:g}] (digital numbers, or dB "
                       f"values?)")
            fix = "dn"
        elif conv == "scale_offset" and part.units == "reflectance":
            rlo, rhi = lo * part.scale_factor + part.add_offset, hi * part.scale_factor + part.add_offset
            rlo, rhi = min(rlo, rhi), max(rlo, rhi)
            if rhi > MAX_REFLECTANCE or rlo < MIN_REFLECTANCE:
                problem = (f"scaled with scale_factor {part.scale_factor:g} and add_offset {part.add_offset:g} they "
                           f"give reflectance {rlo:.4g}..{rhi:.4g}, outside [{MIN_REFLECTANCE:g}, "
                           f"{MAX_REFLECTANCE:g}]")
                fix = "reflectance"
        if problem is None and sampled:
            if units == "dn" and np.issubdtype(x.dtype, np.floating) and 0 <= lo < hi <= 2:
                problem = "digital numbers all in [0, 2]: the file already holds reflectance"
                fix = "reflectance"
            elif units == "db" and 0 <= lo < hi <= 2:
                problem = "dB backscatter all in [0, 2] dB: the file probably holds linear power"
                fix = "linear_power"
        if problem is None and unnamed and units == "linear_power":
            med = float(np.median(x))
            if med > 10 ** (MAX_UNNAMED_LINEAR_DB / 10):
                problem = (f"a median of {med:.6g} ({10 * math.log10(med):.1f} dB) is not plausible backscatter "
                           f"(optical digital numbers?)")
                fix = "the file's units"
        if problem is not None:
            hint = _units_hint(spec, part, fix) if fix != "the file's units" else (
                f"name the bands (band descriptions, or a data.sensor mapping listing them in file order) and check "
                f"data.sensor and {UNITS_KEY}")
            raise DataError(f"{head} but sensor {part.name} reads {units} values: {problem}; {hint}")


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
            raise DataError(f"{where}: no statistics for band(s) {missing}; it has {list(self.mean)}")
        std = np.array([self.std[b] for b in bands], dtype=np.float32)
        if np.any(~np.isfinite(std)) or np.any(std <= 0):
            raise DataError(f"{self.path or 'band statistics'}: non-positive std for bands {list(bands)}: {std}")
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
            raise DataError(f"{path}: band statistics file does not exist") from exc
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(d, dict) or not isinstance(d.get("mean"), dict) or not isinstance(d.get("std"), dict):
            raise DataError(f"{path}: band statistics need 'mean' and 'std' objects keyed by band name")
        if set(d["mean"]) != set(d["std"]):
            raise DataError(
                f"{path}: 'mean' and 'std' name different bands: {sorted(d['mean'])} vs {sorted(d['std'])}"
            )
        for key in ("mean", "std"):
            bad = [b for b, v in d[key].items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
            if bad:
                raise DataError(f"{path}: non-finite or non-numeric {key} for bands {bad}")
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


SensorSource = Sequence[Any]
"""``(sensor, bands, stats_file[, input_units])``: a sensor name, :class:`SensorSpec` or :class:`SensorDef`, the band
selection, a stats file and what the files hold (:data:`INPUT_UNITS`)."""


def resolve_sensors(sources: Sequence[SensorSource]) -> SensorSpec:
    """The spec of a run's data: one ``(sensor, bands, stats_file[, input_units])`` source (:func:`resolve_sensor`),
    or the stack (:func:`stack_sensors`) of several co-registered ones in channel order (``data.sensor`` then
    ``data.stack``)."""
    specs = [resolve_sensor(*src) for src in sources]
    return specs[0] if len(specs) == 1 else stack_sensors(*specs)


def resolve_sensor(sensor: "str | SensorSpec | SensorDef", bands: Iterable[str] | None = None,
                   stats_file: str | os.PathLike | None = None, input_units: str | None = None) -> SensorSpec:
    """The spec a run uses: ``sensor`` (a registry name, a spec, or a :class:`SensorDef` from the config) reading
    files that hold ``input_units`` (default: the sensor's), restricted to ``bands`` (in that order) with the
    statistics of ``stats_file`` (written by ``python -m common.stats``) when given, else the sensor's.

    Raises:
        DataError (``UnknownSensorError`` is also a KeyError): unknown sensor, unknown band, input units the sensor
            cannot convert, input units given twice, a custom sensor without statistics, or a stats file lacking a
            band (messages name them).
    """
    if isinstance(sensor, SensorDef):
        if input_units is not None and sensor.input_units is not None and input_units != sensor.input_units:
            raise DataError(f"{UNITS_KEY}={input_units!r} contradicts input_units {sensor.input_units!r} of the "
                            f"data.sensor mapping {sensor.name!r}; set it in one place")
        if sensor.stats_file is not None and stats_file is not None:
            raise DataError(f"sensor {sensor.name!r}: stats_file is set in the data.sensor mapping and as "
                            f"data.stats_file; set it in one place")
        spec = sensor.to_spec(require_stats=stats_file is None)
    else:
        spec = get_sensor(sensor)
    spec = spec.with_input_units(input_units)
    if bands is not None:
        spec = spec.subset(bands)
    if stats_file is not None:
        spec = spec.with_stats(BandStats.from_json(stats_file))
    return spec
