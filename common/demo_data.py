"""Built-in demo data: a synthetic, deterministic Earth-observation dataset generated in seconds.

Datasheet
---------
``python -m common.demo_data --out DIR --seed N`` writes three co-designed datasets (layout: ``docs/CONTRACTS.md``):

**Land cover, Sentinel-2 L2A-like** (``DIR/s2/<domain>/``), sensor ``S2L2A`` of :mod:`common.bands`.
    12 bands B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12 as uint16 digital numbers, ``DN = reflectance *
    10000`` (no baseline-04.00 offset), nodata 0. All bands lie on one 10 m grid; the 20 m bands (B05 B06 B07 B8A
    B11 B12) are 2x2 block means and the 60 m bands (B01 B09) 6x6 block means of the 10 m scene, with the sensor
    noise drawn at their native resolution. GeoTIFFs in UTM (EPSG:32633 for ``source``, EPSG:32630 for
    ``target``), 10 m pixels, band descriptions set to the band names.
    Masks: uint8 class index, :data:`IGNORE_INDEX` (255) where the image is nodata (a few tiles carry a nodata
    corner or strip). Classes (palette of ESA WorldCover): 0 water, 1 forest, 2 cropland, 3 grassland,
    4 built-up (roads included), 5 bare soil.

**Land cover, Sentinel-1-like** (``DIR/s1/<domain>/``), sensor ``S1``: VV, VH backscatter as float32 dB,
    co-registered with the S2 tile of the same id (same grid, same labels), nodata NaN declared (none present).
    ``masks/`` and ``splits/`` repeat the S2 domain's, so each S1 domain is a segmentation dataset of its own
    (``data.root: DIR/s1/source`` with ``data.target.root`` on ``DIR/s1/target``).

**Buildings, SpaceNet-6-like quad-pol SAR** (``DIR/sar/``), sensor ``SAR4``: HH, HV, VH, VV float32 linear
    intensity, 0.5 m pixels, EPSG:32631, nodata 0 (a swath edge cuts some scenes). Masks: uint8 0/1 building
    footprints. GeoJSON: FeatureCollection of footprint Polygons in tile CRS coordinates with a ``crs`` member.
    Tiles are overlapping windows of a few larger scenes (as in SpaceNet-6); ``dataset.json`` records each tile's
    scene and pixel offsets, and the splits keep whole scenes apart.

Two domains: ``source`` (temperate region, early summer) and ``target`` (drier region, late summer, another sensor
calibration): class frequencies shifted (less forest, more bare soil and built-up), larger parcels, wider crop
rows, vegetation darker in the NIR and brighter in the visible, drier phenology, lower sun, more haze, per-band
gains; its Sentinel-1 products come from another relative orbit (incidence angles ~10 degrees steeper, so smooth
surfaces such as water, asphalt and bare soil are darker), without thermal-noise removal (a noise floor lifts the
darkest VH and VV backscatter) and with another radiometric calibration offset (the S2 data do not depend on these). ``--shift`` scales the whole shift (1.0 = the full shift of the feasibility study; default 0.7, which leaves a
gap of about half the study's between source-trained and target-trained models on the target).

Splits (``splits/*.txt``, one id per line): per S2 (and S1) domain ``train_all``, ``labelled_1_8`` (a deterministic
eighth of ``train_all``), ``unlabelled_1_8`` (the rest), ``labelled_1_32`` / ``unlabelled_1_32`` (a thirty-second,
within ``labelled_1_8``), ``val``, and with ``--pool-tiles N`` ``pool`` (N more unlabelled tiles per domain, images
only, for pretraining: a larger unlabelled pool than the 320 training tiles); for SAR ``train_all`` and ``val`` (whole
scenes), and ``labelled_1_8`` (an eighth of the ``train_all`` tiles: whole scenes, then a compact block of tiles from
a corner of one scene) with ``unlabelled_1_8`` (the other training tiles, less those that overlap a labelled tile;
``dataset.json`` ``sar.semisup_split`` lists them).

Statistics (``s2/stats.json``, ``s1/stats.json``, ``sar/stats.json``): per-band mean/std in model units computed with
:mod:`common.stats` over every image tile of the sensor (both domains, all splits); the demo configs point
``data.stats_file`` at them, so demo inputs are normalised to mean ~0 and std ~1 per band (the registry's
BigEarthNet reference statistics do not fit the synthetic spectra: demo B09 came out at mean -0.9).

How it is generated
-------------------
Land cover (per tile, independently): warped Voronoi parcels whose class prior is tilted by smooth "urban" and
"forest" fields; lakes, meandering rivers and 1-2 px roads drawn on top. Each pixel is a mixture of 18
endmember spectra (water types, canopies, crops, grasses, soils, roofs, asphalt, plastic, char). Texture carries
class information: crop row stripes (period 3-6 px, random angle, Beta-distributed canopy cover), mottled grass
that is spectrally close to crops, forest crowns and gaps, block grids with streets for built-up. Rare confusing
sub-types (flooded rice ~ water, wetland grass, sparse and burnt forest, industrial blocks, greenhouses ~ bright
soil, algae water, ploughed soil) are concentrated in a few "hotspot" tiles, so a small labelled subset may miss
them. Per-parcel brightness/spectral tilt, per-tile phenology, illumination, topographic shading, haze
(wavelength-dependent path radiance), water-vapour absorption in B09, calibration jitter; 10 m MTF blur, block
means for 20/60 m bands, signal-dependent noise. S1 backscatter is mixed in linear power from per-endmember
VV/VH values at the tile's incidence angle (each endmember falls off with its own dB-per-degree slope, steepest for
specular water and smooth soils; water very dark, roofs bright, plus double-bounce points in built-up), the domain's
calibration offset and thermal-noise floor, with gamma speckle (4.4 looks) applied in linear power before
conversion to dB.

SAR buildings (per scene): ground, tree and road background; rotated rectangular buildings in a jittered block
layout; for a sensor looking east (sensor on the west side) each building gets a radar shadow behind it, a layover
of its wall and roof towards the sensor, and a bright double-bounce line along its sensor-facing walls; PSF blur,
single-channel gamma speckle (3 looks).

Everything is a pure function of ``(seed, settings)``: files are bit-identical for the same seed and settings.
Generation of the default size takes a few seconds on one core.

Licence: generated data, no third-party content; free to use, modify and redistribute without restriction.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import rasterio
from rasterio.features import rasterize
from rasterio.transform import Affine
from scipy import ndimage
from scipy.spatial import ConvexHull, cKDTree

from common.bands import IGNORE_INDEX, get_sensor

__all__ = [
    "IGNORE_INDEX",
    "CLASS_NAMES",
    "PALETTE",
    "SUBTYPE_NAMES",
    "S2_BANDS",
    "S1_BANDS",
    "SAR_BANDS",
    "DOMAINS",
    "DemoSettings",
    "DomainSpec",
    "domain_specs",
    "generate",
    "main",
]

FORMAT = "eoseg-demo/3"  # 3: labelled_1_32 / unlabelled_1_32 splits (the tiles' pixels are those of 2)
"""Value of ``dataset.json``'s ``format`` key; bump when the generator's output changes."""

# ---------------------------------------------------------------------------------------------------- classes
CLASS_NAMES = ("water", "forest", "cropland", "grassland", "built-up", "bare soil")
"""Land-cover classes; the index in this tuple is the mask value."""
WATER, FOREST, CROPLAND, GRASSLAND, BUILT_UP, BARE_SOIL = range(len(CLASS_NAMES))
PALETTE = ((0, 100, 200), (0, 100, 0), (240, 150, 255), (255, 255, 76), (250, 0, 0), (180, 180, 180))
"""RGB colour per class (ESA WorldCover legend)."""

SUBTYPE_NAMES = (
    "typical", "algae water", "sparse forest", "burnt forest", "flooded rice", "wetland grass",
    "industrial", "greenhouses", "ploughed soil",
)  # fmt: skip
"""Rare, confusing sub-types (not in the masks; their frequencies are reported in ``dataset.json``)."""
(SUB_TYPICAL, SUB_ALGAE, SUB_SPARSE_FOREST, SUB_BURNT_FOREST, SUB_RICE, SUB_WETLAND, SUB_INDUSTRIAL,
 SUB_GREENHOUSE, SUB_PLOUGHED) = range(len(SUBTYPE_NAMES))  # fmt: skip
SUBTYPE_CLASS = {
    SUB_ALGAE: WATER, SUB_SPARSE_FOREST: FOREST, SUB_BURNT_FOREST: FOREST, SUB_RICE: CROPLAND,
    SUB_WETLAND: GRASSLAND, SUB_INDUSTRIAL: BUILT_UP, SUB_GREENHOUSE: BUILT_UP, SUB_PLOUGHED: BARE_SOIL,
}  # fmt: skip
"""Class each sub-type belongs to."""
SUBTYPE_HOTSPOT_TILE_P = 0.12
"""Probability that a tile is a hotspot of a given sub-type."""
SUBTYPE_PARCEL_P = (0.01, 0.75)
"""Probability that a parcel of the sub-type's class is of the sub-type (ordinary tile, hotspot tile)."""

# ---------------------------------------------------------------------------------------------------- sensors
S2_BANDS: tuple[str, ...] = get_sensor("S2L2A").bands
S1_BANDS: tuple[str, ...] = get_sensor("S1").bands
SAR_BANDS: tuple[str, ...] = get_sensor("SAR4").bands
S2_WAVELENGTH_NM = np.array([443, 490, 560, 665, 705, 740, 783, 842, 865, 945, 1610, 2190], dtype=np.float64)
"""Central wavelength of each band of :data:`S2_BANDS`."""
S2_GSD_M = get_sensor("S2L2A").gsd
S2_PIXEL_M = 10.0
S2_NODATA = 0
S2_SCALE = 10000.0
S2_BLOCK_60M = 6
"""Tiles are generated on a canvas that is a multiple of this (then cropped), so 60 m blocks are whole."""
S2_VISIBLE = np.flatnonzero(S2_WAVELENGTH_NM < 700)
S2_NIR = np.flatnonzero((S2_WAVELENGTH_NM > 720) & (S2_WAVELENGTH_NM < 1000))
S2_B09 = S2_BANDS.index("B09")
S1_LOOKS = 4.4
"""Equivalent number of looks of Sentinel-1 IW GRD."""
S1_BLUR_PX = 0.8
"""Gaussian PSF (pixels at 10 m) standing in for the ~20 m resolution of IW GRD."""
S1_REFERENCE_INCIDENCE_DEG = 37.0
"""Incidence angle at which the endmembers' S1 backscatter (:data:`ENDMEMBER_S1_DB`) is given (mid-swath of IW)."""
S1_INCIDENCE_SPREAD_DEG = 2.5
"""Per-tile spread (uniform +-) of the incidence angle around the domain's mean (position in the swath)."""
S1_VH_SLOPE_RATIO = 0.7
"""Incidence-angle slope of VH relative to VV (cross-pol, more volume scattering, falls off less)."""
SAR_PIXEL_M = get_sensor("SAR4").gsd["HH"]
SAR_LOOKS = 3.0
SAR_NODATA = 0.0
SAR_CRS_EPSG = 32631
SAR_ORIGIN = (594_000.0, 5_753_000.0)
SAR_SCENE_SPACING_M = 1000.0

# ---------------------------------------------------------------------------------------------------- endmembers
# Reflectance spectra at the 12 band centres (B01 ... B12), and Sentinel-1 (VV, VH) backscatter in dB.
_ENDMEMBERS: tuple[tuple[str, tuple[float, ...], tuple[float, float]], ...] = (
    ("water_clear",     (.060, .050, .040, .020, .015, .010, .008, .006, .005, .004, .002, .001), (-24.0, -31.0)),
    ("water_turbid",    (.080, .085, .095, .075, .055, .035, .025, .018, .015, .012, .005, .003), (-22.0, -29.0)),
    ("water_algae",     (.050, .050, .075, .035, .050, .080, .090, .090, .085, .060, .015, .008), (-21.0, -28.0)),
    ("canopy_broadleaf", (.020, .030, .060, .030, .085, .250, .330, .370, .380, .360, .180, .080), (-7.0, -12.5)),
    ("canopy_conifer",  (.015, .020, .040, .020, .050, .160, .220, .240, .250, .240, .110, .050), (-7.5, -13.0)),
    ("canopy_shade",    (.010, .010, .015, .010, .020, .050, .060, .070, .070, .060, .030, .015), (-9.0, -15.0)),
    ("crop_green",      (.030, .040, .085, .040, .115, .300, .400, .440, .450, .420, .220, .110), (-9.5, -15.5)),
    ("crop_senescent",  (.060, .080, .120, .150, .180, .210, .230, .250, .260, .250, .330, .250), (-11.0, -19.0)),
    ("grass_green",     (.030, .042, .088, .044, .118, .290, .385, .420, .430, .405, .230, .120), (-11.0, -18.0)),
    ("grass_dry",       (.058, .076, .116, .140, .175, .215, .240, .260, .270, .260, .320, .240), (-13.0, -21.0)),
    ("soil_dry",        (.070, .090, .130, .190, .220, .240, .260, .280, .290, .290, .370, .320), (-15.0, -24.0)),
    ("soil_wet",        (.040, .050, .070, .100, .120, .130, .140, .150, .160, .150, .200, .170), (-10.0, -18.0)),
    ("soil_bright",     (.120, .150, .210, .280, .310, .330, .350, .360, .370, .370, .450, .400), (-17.0, -26.0)),
    ("roof_tile",       (.080, .090, .110, .190, .220, .240, .250, .260, .270, .260, .300, .250), (-4.0, -11.0)),
    ("roof_concrete",   (.140, .160, .190, .210, .220, .230, .240, .250, .250, .240, .280, .250), (-5.0, -12.0)),
    ("asphalt",         (.060, .070, .080, .090, .090, .100, .100, .110, .110, .110, .120, .110), (-19.0, -27.0)),
    ("greenhouse",      (.200, .230, .270, .300, .320, .340, .350, .360, .370, .360, .420, .360), (-3.0, -10.0)),
    ("char",            (.030, .030, .035, .040, .045, .050, .055, .060, .062, .060, .080, .075), (-13.0, -21.0)),
)  # fmt: skip
ENDMEMBER_NAMES = tuple(e[0] for e in _ENDMEMBERS)
_E = {name: i for i, name in enumerate(ENDMEMBER_NAMES)}
ENDMEMBER_REFLECTANCE = np.array([e[1] for e in _ENDMEMBERS], dtype=np.float64)  # (K, 12)
ENDMEMBER_S1_DB = np.array([e[2] for e in _ENDMEMBERS], dtype=np.float64)  # (K, 2)
_S1_SLOPE_DB_PER_DEG = {  # C-band VV backscatter change per degree of incidence (smooth surfaces fall fastest)
    "water_clear": -0.5, "water_turbid": -0.45, "water_algae": -0.4, "canopy_broadleaf": -0.08,
    "canopy_conifer": -0.08, "canopy_shade": -0.08, "crop_green": -0.15, "crop_senescent": -0.22,
    "grass_green": -0.18, "grass_dry": -0.22, "soil_dry": -0.25, "soil_wet": -0.2, "soil_bright": -0.28,
    "roof_tile": -0.05, "roof_concrete": -0.05, "asphalt": -0.35, "greenhouse": -0.1, "char": -0.2,
}  # fmt: skip
ENDMEMBER_S1_SLOPE = np.array([[_S1_SLOPE_DB_PER_DEG[n], S1_VH_SLOPE_RATIO * _S1_SLOPE_DB_PER_DEG[n]]
                               for n in ENDMEMBER_NAMES])  # (K, 2) dB per degree of incidence, VV and VH
VEGETATION_ENDMEMBERS = tuple(_E[n] for n in ("canopy_broadleaf", "canopy_conifer", "crop_green", "grass_green"))
"""Endmembers whose NIR/visible reflectance the target domain changes."""
SOIL_LIKE_ENDMEMBERS = tuple(_E[n] for n in ("grass_dry", "soil_dry", "soil_wet", "soil_bright", "crop_senescent"))
"""Endmembers whose S1 backscatter the target domain's drier soils lower."""

# ---------------------------------------------------------------------------------------------------- layout
PARCEL_MARGIN_PX = 8
PARCEL_WARP_PX = 2.5
PARCEL_WARP_SIGMA_PX = 6.0
CONTEXT_FIELD_SIGMA_PX = 16.0
CONTEXT_TILT = 1.3
"""Logit added per unit of the urban/forest fields to the built-up/forest prior."""
TILE_PHENOLOGY_SD = 0.18
"""Per-tile spread of the senescent/dry fraction of crops and grass around the domain's mean."""
TILE_ENDMEMBER_SD = 0.06
"""Per-tile, per-endmember spread of spectral gain and slope (regional variation of materials)."""
PARCEL_BRIGHTNESS_SD = 0.1
PARCEL_TILT_SD = 0.06
"""Per-parcel spread of brightness and of spectral slope (within-class variation)."""
LAKE_TILE_P = 0.25
RIVER_TILE_P = 0.2
ROADS_PER_TILE = 0.7


@dataclass(frozen=True)
class DomainSpec:
    """Parameters of one land-cover domain.

    Attributes:
        name: ``"source"`` or ``"target"``.
        crs_epsg: UTM zone of the tiles.
        origin: Upper-left corner (easting, northing) of the tile grid, metres.
        class_prior: Parcel-level class prior in :data:`CLASS_NAMES` order (before the context tilt).
        parcel_area_px: Mean Voronoi parcel area, pixels.
        stripe_period_px: Range of crop-row periods, pixels.
        veg_visible_gain: Factor on the visible bands of the vegetation endmembers.
        veg_nir_gain: Factor on the red-edge/NIR bands of the vegetation endmembers.
        phenology: Mean senescent/dry fraction of crops and grass.
        sun: Mean illumination factor.
        haze: Mean haze amount (path radiance scale).
        soil_db: Offset (dB) of S1 backscatter of soils and dry vegetation (drier soils are darker).
        s1_incidence_deg: Mean S1 incidence angle of the region's tiles (another relative orbit / swath position).
        s1_noise_power: Thermal-noise power (linear) left in the S1 backscatter (0: noise removed, as ESA's
            processing does; > 0: a product without thermal-noise removal, which lifts the dark surfaces).
        s1_calibration_db: Offset (dB) of the S1 radiometric calibration of the region's products.
        band_gain: Per-band calibration gain (12 values).
    """

    name: str
    crs_epsg: int
    origin: tuple[float, float]
    class_prior: tuple[float, ...]
    parcel_area_px: float
    stripe_period_px: tuple[float, float]
    veg_visible_gain: float
    veg_nir_gain: float
    phenology: float
    sun: float
    haze: float
    soil_db: float
    s1_incidence_deg: float
    s1_noise_power: float
    s1_calibration_db: float
    band_gain: tuple[float, ...]


DOMAINS = ("source", "target")
_SOURCE = DomainSpec(
    name="source", crs_epsg=32633, origin=(400_000.0, 5_400_000.0),
    class_prior=(0.035, 0.23, 0.42, 0.20, 0.085, 0.10), parcel_area_px=180.0, stripe_period_px=(3.0, 6.0),
    veg_visible_gain=1.0, veg_nir_gain=1.0, phenology=0.25, sun=1.0, haze=0.3, soil_db=0.0,
    s1_incidence_deg=33.5, s1_noise_power=0.0, s1_calibration_db=0.0,
    band_gain=(1.0,) * len(S2_BANDS),
)  # fmt: skip
_TARGET_FULL = DomainSpec(
    name="target", crs_epsg=32630, origin=(250_000.0, 4_150_000.0),
    class_prior=(0.023, 0.081, 0.43, 0.21, 0.14, 0.21), parcel_area_px=1.6 * 180.0, stripe_period_px=(4.5, 9.0),
    veg_visible_gain=1.35, veg_nir_gain=0.85, phenology=0.55, sun=0.88, haze=0.75, soil_db=-2.0,
    s1_incidence_deg=43.5, s1_noise_power=10 ** (-25.0 / 10), s1_calibration_db=0.5,
    band_gain=(1.0,) * len(S2_BANDS),
)  # fmt: skip
TARGET_BAND_GAIN_RANGE = (0.92, 1.07)
"""Range of the target's per-band calibration gains at full shift (drawn once per seed)."""


def domain_specs(seed: int, shift: float) -> dict[str, DomainSpec]:
    """The source domain and the target domain at ``shift`` (0 = same as source, 1 = full study shift).

    Numeric parameters of the target are interpolated linearly between source and the full shift (the class prior
    in log space); the per-band gains are drawn from :data:`TARGET_BAND_GAIN_RANGE` with a seed-derived stream.
    """
    rng = np.random.default_rng([seed, _STREAM_DOMAIN])
    gain_full = rng.uniform(*TARGET_BAND_GAIN_RANGE, len(S2_BANDS))

    def lerp(a: float, b: float) -> float:
        return float(a + shift * (b - a))

    prior = np.exp((1 - shift) * np.log(_SOURCE.class_prior) + shift * np.log(_TARGET_FULL.class_prior))
    target = DomainSpec(
        name="target",
        crs_epsg=_TARGET_FULL.crs_epsg,
        origin=_TARGET_FULL.origin,
        class_prior=tuple(float(p) for p in prior / prior.sum()),
        parcel_area_px=lerp(_SOURCE.parcel_area_px, _TARGET_FULL.parcel_area_px),
        stripe_period_px=(
            lerp(_SOURCE.stripe_period_px[0], _TARGET_FULL.stripe_period_px[0]),
            lerp(_SOURCE.stripe_period_px[1], _TARGET_FULL.stripe_period_px[1]),
        ),
        **{
            k: lerp(getattr(_SOURCE, k), getattr(_TARGET_FULL, k))
            for k in ("veg_visible_gain", "veg_nir_gain", "phenology", "sun", "haze", "soil_db",
                      "s1_incidence_deg", "s1_noise_power", "s1_calibration_db")
        },
        band_gain=tuple(float(1 + shift * (g - 1)) for g in gain_full),
    )
    return {"source": _SOURCE, "target": target}


# ---------------------------------------------------------------------------------------------------- settings
# Random streams: every tile/scene draws from ``default_rng([seed, stream, ...])`` so files do not depend on the
# order in which they are generated.
_STREAM_S2, _STREAM_S1, _STREAM_SAR, _STREAM_DOMAIN, _STREAM_SPLIT = range(5)
LABEL_FRACTION = 8
"""``labelled_1_8`` holds ``round(len(train_all) / LABEL_FRACTION)`` tiles (at least one)."""
LABEL_FRACTIONS = (LABEL_FRACTION, 32)
"""Land cover: ``labelled_1_<n>`` / ``unlabelled_1_<n>`` for each ``n`` (``round(len(train_all) / n)`` tiles, at
least one; the smaller labelled sets lie within the larger ones)."""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo dataset (all exposed on the command line).

    Attributes:
        tiles: Training tiles per land-cover domain.
        val_tiles: Validation tiles per land-cover domain.
        size: Land-cover tile size, pixels (10 m).
        sar_scenes: Number of SAR scenes (at least 2: whole scenes go to val).
        sar_grid: SAR tiles per scene side (``sar_scenes * sar_grid**2`` tiles).
        sar_size: SAR tile size, pixels (0.5 m).
        sar_overlap: Overlap of neighbouring SAR tiles, pixels.
        sar_val_scenes: Number of SAR scenes in ``val`` (the last ones).
        shift: Strength of the source -> target domain shift (0..1).
        pool_tiles: Extra unlabelled tiles per land-cover domain, for pretraining: S2 and S1 images only (no
            masks), listed in ``splits/pool.txt``, drawn like the other tiles (tile ``i`` is the same tile whatever
            the pool size, so a pool never changes the labelled, unlabelled or validation tiles).
    """

    tiles: int = 160
    val_tiles: int = 48
    size: int = 64
    sar_scenes: int = 5  # 4 training scenes: an eighth of their 64 tiles (8) fills one batch of demo_sar.yaml
    sar_grid: int = 4
    sar_size: int = 64
    sar_overlap: int = 16
    sar_val_scenes: int = 1
    shift: float = 0.7
    pool_tiles: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` for impossible settings."""
        if self.tiles < 1 or self.val_tiles < 1:
            raise ValueError(f"tiles and val_tiles must be >= 1, got {self.tiles}, {self.val_tiles}")
        if self.size < 16 or self.sar_size < 16:
            raise ValueError(f"size and sar_size must be >= 16 px, got {self.size}, {self.sar_size}")
        if self.sar_grid < 1:
            raise ValueError(f"sar_grid must be >= 1, got {self.sar_grid}")
        if not 0 <= self.sar_overlap < self.sar_size:
            raise ValueError(f"sar_overlap must be in [0, sar_size), got {self.sar_overlap}")
        if not 1 <= self.sar_val_scenes < self.sar_scenes:
            raise ValueError(
                f"need 1 <= sar_val_scenes < sar_scenes (whole scenes are split), got {self.sar_val_scenes}, "
                f"{self.sar_scenes}"
            )
        if not 0.0 <= self.shift <= 1.0:
            raise ValueError(f"shift must be in [0, 1], got {self.shift}")
        if self.pool_tiles < 0:
            raise ValueError(f"pool_tiles must be >= 0, got {self.pool_tiles}")

    @property
    def sar_stride(self) -> int:
        return self.sar_size - self.sar_overlap

    @property
    def sar_scene_size(self) -> int:
        return self.sar_size + (self.sar_grid - 1) * self.sar_stride


# ---------------------------------------------------------------------------------------------------- fields
def _gaussian_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Periodic Gaussian random field (white noise low-passed by a Gaussian of ``sigma`` px), mean 0, std 1."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    spectrum = np.fft.rfft2(noise) * np.exp(-2.0 * (math.pi * sigma) ** 2 * (fx**2 + fy**2))
    field = np.fft.irfft2(spectrum, s=shape)
    field -= field.mean()
    return field / (field.std() + 1e-12)


def _block_mean(x: np.ndarray, block: int) -> np.ndarray:
    """Mean over non-overlapping ``block x block`` windows of the last two axes (sizes divisible by ``block``)."""
    c, h, w = x.shape
    return x.reshape(c, h // block, block, w // block, block).mean(axis=(2, 4))


def _upsample(x: np.ndarray, block: int) -> np.ndarray:
    return np.repeat(np.repeat(x, block, axis=1), block, axis=2)


def _rotated(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates ``(along, across)`` of a frame rotated by ``angle`` (radians)."""
    c, s = math.cos(angle), math.sin(angle)
    return x * c + y * s, -x * s + y * c


def _hash01(*keys: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random number in [0, 1) per element of integer arrays (for per-block choices)."""
    h = np.uint64(1469598103934665603)
    for k in keys:
        h = (h ^ np.asarray(k).astype(np.int64).astype(np.uint64)) * np.uint64(1099511628211)
        h ^= h >> np.uint64(29)
    return (h % np.uint64(1 << 20)).astype(np.float64) / float(1 << 20)


# ---------------------------------------------------------------------------------------------------- land cover
def _layout(
    rng: np.random.Generator, canvas: int, dom: DomainSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Parcels, classes and sub-types, lakes, rivers and roads of one tile."""
    shape = (canvas, canvas)
    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float64) + 0.5
    tile_urban, tile_forest = rng.normal(0.0, 0.9, 2)
    urban = _gaussian_field(rng, shape, CONTEXT_FIELD_SIGMA_PX) + tile_urban
    forest = _gaussian_field(rng, shape, CONTEXT_FIELD_SIGMA_PX) + tile_forest

    # Warped Voronoi parcels.
    span = canvas + 2 * PARCEL_MARGIN_PX
    n_parcels = max(3, int(rng.poisson(span * span / dom.parcel_area_px)))
    seeds = rng.uniform(-PARCEL_MARGIN_PX, canvas + PARCEL_MARGIN_PX, (n_parcels, 2))
    wy = yy + PARCEL_WARP_PX * _gaussian_field(rng, shape, PARCEL_WARP_SIGMA_PX)
    wx = xx + PARCEL_WARP_PX * _gaussian_field(rng, shape, PARCEL_WARP_SIGMA_PX)
    _, parcel = cKDTree(seeds).query(np.column_stack([wy.ravel(), wx.ravel()]))
    parcel = parcel.reshape(shape)

    # Class per parcel: prior tilted by the context fields at the parcel seed (Gumbel-max sampling).
    iy, ix = (np.clip(seeds[:, k].astype(int), 0, canvas - 1) for k in (0, 1))
    logits = np.tile(np.log(dom.class_prior), (n_parcels, 1))
    logits[:, BUILT_UP] += CONTEXT_TILT * urban[iy, ix]
    logits[:, FOREST] += CONTEXT_TILT * forest[iy, ix] - 0.5 * urban[iy, ix]
    logits[:, CROPLAND] += 0.3 * urban[iy, ix].clip(max=0)
    parcel_class = np.argmax(logits - np.log(-np.log(rng.uniform(1e-12, 1.0, logits.shape))), axis=1)

    # Rare sub-types, concentrated in hotspot tiles.
    parcel_sub = np.zeros(n_parcels, dtype=np.int64)
    u = rng.uniform(size=(len(SUBTYPE_CLASS), n_parcels))
    hot = rng.uniform(size=len(SUBTYPE_CLASS)) < SUBTYPE_HOTSPOT_TILE_P
    for j, (sub, cls) in enumerate(SUBTYPE_CLASS.items()):
        take = (parcel_class == cls) & (parcel_sub == SUB_TYPICAL) & (u[j] < SUBTYPE_PARCEL_P[int(hot[j])])
        parcel_sub[take] = sub
    label = parcel_class[parcel]
    subtype = parcel_sub[parcel]
    algae_tile = bool(hot[list(SUBTYPE_CLASS).index(SUB_ALGAE)])

    # Lakes.
    if rng.uniform() < LAKE_TILE_P:
        lake = _gaussian_field(rng, shape, 7.0) > rng.uniform(0.9, 1.8)
        label[lake] = WATER
        subtype[lake] = SUB_ALGAE if algae_tile else SUB_TYPICAL
    # Meandering river.
    if rng.uniform() < RIVER_TILE_P:
        angle, phase = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
        along, across = _rotated(xx - canvas / 2, yy - canvas / 2, angle)
        centre = rng.uniform(-0.3, 0.3) * canvas
        meander = rng.uniform(2, 8) * np.sin(2 * math.pi * along / rng.uniform(25, 60) + phase)
        river = np.abs(across - centre - meander) < rng.uniform(1.0, 2.5)
        label[river] = WATER
        subtype[river] = SUB_TYPICAL
    # Roads (labelled built-up), more of them in urban tiles.
    road = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.poisson(ROADS_PER_TILE * (1 + max(tile_urban, 0.0))))):
        angle = rng.uniform(0, math.pi)
        along, across = _rotated(xx - canvas / 2, yy - canvas / 2, angle)
        offset = rng.uniform(-0.45, 0.45) * canvas
        wobble = rng.uniform(0, 3) * np.sin(2 * math.pi * along / rng.uniform(40, 120) + rng.uniform(0, 6.3))
        road |= np.abs(across - offset - wobble) < rng.uniform(0.5, 1.0)
    label[road] = BUILT_UP
    subtype[road] = SUB_TYPICAL
    return label, subtype, parcel, road, n_parcels


def _abundances(
    rng: np.random.Generator,
    label: np.ndarray,
    subtype: np.ndarray,
    parcel: np.ndarray,
    road: np.ndarray,
    n_parcels: int,
    dom: DomainSpec,
) -> np.ndarray:
    """Endmember fractions ``(K, P, P)`` with class-specific texture."""
    canvas = label.shape[0]
    shape = label.shape
    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float64)
    A = np.zeros((len(ENDMEMBER_NAMES),) + shape)
    phen_tile = float(np.clip(dom.phenology + rng.normal(0, TILE_PHENOLOGY_SD), 0.0, 0.95))

    # Per-parcel attributes (drawn for every parcel; each class uses its own).
    theta = rng.uniform(0, math.pi, n_parcels)[parcel]
    period = rng.uniform(*dom.stripe_period_px, n_parcels)[parcel]
    phase = rng.uniform(0, 2 * math.pi, n_parcels)[parcel]
    cover = rng.beta(3.0, 2.5, n_parcels)[parcel]
    amp = rng.uniform(0.45, 1.0, n_parcels)[parcel]
    phen = np.clip(phen_tile + rng.normal(0, 0.15, n_parcels), 0, 1)[parcel]
    wet = rng.beta(1.5, 3.0, n_parcels)[parcel]
    green = rng.beta(3.0, 2.0, n_parcels)[parcel]
    conifer = rng.beta(1.2, 2.0, n_parcels)[parcel]
    closure = rng.uniform(0.72, 0.95, n_parcels)[parcel]
    bright_soil = rng.beta(1.5, 3.0, n_parcels)[parcel]
    block = rng.uniform(5.0, 9.0, n_parcels)[parcel]
    street = rng.uniform(1.0, 1.8, n_parcels)[parcel]
    block_angle = (rng.uniform(0, math.pi / 2) + rng.normal(0, 0.25, n_parcels))[parcel]

    fine = _gaussian_field(rng, shape, 0.9)  # forest crowns
    mottle = _gaussian_field(rng, shape, 1.6)  # grass mottle
    mottle2 = _gaussian_field(rng, shape, 3.0)
    smooth = _gaussian_field(rng, shape, 5.0)
    rows = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)

    def put(where: np.ndarray, name: str, frac: np.ndarray | float) -> None:
        A[_E[name]][where] += np.broadcast_to(frac, shape)[where]

    # Water: clear/turbid mix, algae blooms.
    m = label == WATER
    turb = np.clip(rng.uniform(0.0, 0.6) + 0.15 * smooth, 0, 1)
    algae = np.where(subtype == SUB_ALGAE, np.clip(0.55 + 0.3 * mottle2, 0.1, 0.95), 0.0)
    put(m, "water_clear", (1 - turb) * (1 - algae))
    put(m, "water_turbid", turb * (1 - algae))
    put(m, "water_algae", algae)

    # Forest: crowns with shade, gaps showing understorey; sparse and burnt variants.
    m = label == FOREST
    closure = np.where(subtype == SUB_SPARSE_FOREST, closure * 0.5, closure)
    closure = np.where(subtype == SUB_BURNT_FOREST, closure * 0.25, closure)
    canopy = np.clip(closure + 0.3 * fine, 0, 1)
    shade = np.clip(0.25 - 0.2 * fine, 0.0, 0.5)
    lit = canopy * (1 - shade)
    put(m, "canopy_broadleaf", lit * (1 - conifer))
    put(m, "canopy_conifer", lit * conifer)
    put(m, "canopy_shade", canopy * shade)
    burnt = subtype == SUB_BURNT_FOREST
    gap = 1 - canopy
    put(m & ~burnt, "grass_green", gap * green)
    put(m & ~burnt, "soil_dry", gap * (1 - green))
    put(m & burnt, "char", gap * 0.7)
    put(m & burnt, "soil_dry", gap * 0.3)

    # Cropland: row stripes of canopy over soil; flooded rice has water between sparse rows.
    m = label == CROPLAND
    rice = subtype == SUB_RICE
    crop_cover = np.where(rice, 0.12 + 0.2 * cover, cover)
    canopy = np.clip(crop_cover * (1 + amp * (2 * rows - 1)), 0, 1)
    put(m, "crop_green", canopy * (1 - phen))
    put(m, "crop_senescent", canopy * phen)
    put(m & ~rice, "soil_wet", (1 - canopy) * wet)
    put(m & ~rice, "soil_dry", (1 - canopy) * (1 - wet))
    put(m & rice, "water_turbid", (1 - canopy) * 0.6)
    put(m & rice, "water_clear", (1 - canopy) * 0.4)

    # Grassland: mottled green/dry grass over patchy bare soil; wetland grass has water patches. The mixture
    # statistics match cropland's on purpose: only the spatial pattern (mottle vs rows) tells them apart.
    m = label == GRASSLAND
    g_cover = np.clip(0.35 + 0.55 * green + 0.3 * mottle, 0.05, 1.0)
    dry = np.clip(phen + 0.25 * mottle2, 0, 1)
    water_frac = np.where(subtype == SUB_WETLAND, np.clip(0.35 + 0.35 * mottle2, 0, 0.85), 0.0)
    veg = g_cover * (1 - water_frac)
    put(m, "grass_green", veg * (1 - dry))
    put(m, "grass_dry", veg * dry)
    put(m, "soil_wet", (1 - g_cover) * (1 - water_frac) * wet)
    put(m, "soil_dry", (1 - g_cover) * (1 - water_frac) * (1 - wet))
    put(m, "water_turbid", water_frac)

    # Built-up: a grid of streets; each block holds one house (roof) in a garden of grass and trees, so many
    # built-up pixels look like grass or forest and only the grid tells; industrial estates have big roofs.
    m = label == BUILT_UP
    industrial = subtype == SUB_INDUSTRIAL
    greenhouse = subtype == SUB_GREENHOUSE
    blk = np.where(industrial, block * 2.0, block)
    u = xx * np.cos(block_angle) + yy * np.sin(block_angle)
    v = -xx * np.sin(block_angle) + yy * np.cos(block_angle)
    bu, bv = np.floor(u / blk), np.floor(v / blk)
    fu, fv = np.mod(u, blk), np.mod(v, blk)  # position inside the block, px
    is_street = (fu < street) | (fv < street)
    h = _hash01(bu, bv, parcel)
    house_share = np.where(industrial, 0.95, 0.25 + 0.6 * _hash01(bv, bu, parcel + 7))
    half = 0.5 * (blk - street) * np.sqrt(house_share)
    centre = street + 0.5 * (blk - street)
    house = (np.abs(fu - centre) < half) & (np.abs(fv - centre) < half)
    roofs = ~is_street & ~road & ~greenhouse & house
    gardens = ~is_street & ~road & ~greenhouse & ~house
    tile_roof = np.where(industrial, 0.0, (h < 0.5).astype(float))
    flat_dark = ((h > 0.85) & ~industrial).astype(float)
    put(m & roofs, "roof_tile", tile_roof * (1 - flat_dark))
    put(m & roofs, "roof_concrete", (1 - tile_roof) * (1 - flat_dark))
    put(m & roofs, "asphalt", flat_dark)
    trees = np.clip(0.35 + 0.4 * fine, 0, 1)
    put(m & gardens, "canopy_broadleaf", trees)
    put(m & gardens, "grass_green", (1 - trees) * (1 - dry))
    put(m & gardens, "grass_dry", (1 - trees) * dry)
    put(m & (is_street | road) & ~greenhouse, "asphalt", 0.85)
    put(m & (is_street | road) & ~greenhouse, "soil_dry", 0.15)
    gh = np.clip(0.5 + 0.7 * (2 * rows - 1), 0, 1)
    put(m & greenhouse, "greenhouse", gh * 0.85)
    put(m & greenhouse, "soil_dry", 1 - gh * 0.85)

    # Bare soil: smooth dry/bright/wet mixture; ploughed soil has furrows.
    m = label == BARE_SOIL
    furrows = np.where(subtype == SUB_PLOUGHED, 0.35 * (2 * rows - 1), 0.0)
    w = np.clip(0.3 * wet + 0.15 * smooth + furrows, 0, 1)
    b = np.clip(bright_soil + 0.15 * mottle2, 0, 1) * (1 - w)
    put(m, "soil_wet", w)
    put(m, "soil_bright", b * 0.9)
    put(m, "soil_dry", (1 - w - b * 0.9) * 0.93)
    put(m, "grass_dry", (1 - w - b * 0.9) * 0.07)

    total = A.sum(axis=0, keepdims=True)
    return A / np.maximum(total, 1e-9)


def _domain_endmembers(dom: DomainSpec) -> np.ndarray:
    """Endmember reflectances ``(K, 12)`` with the domain's vegetation changes."""
    E = ENDMEMBER_REFLECTANCE.copy()
    veg = np.array(VEGETATION_ENDMEMBERS)
    E[np.ix_(veg, S2_VISIBLE)] *= dom.veg_visible_gain
    E[np.ix_(veg, S2_NIR)] *= dom.veg_nir_gain
    return E


def _render_s2(
    rng: np.random.Generator, A: np.ndarray, parcel: np.ndarray, n_parcels: int, label: np.ndarray, dom: DomainSpec
) -> np.ndarray:
    """Sentinel-2 L2A-like reflectance ``(12, P, P)`` from abundances, with illumination, haze and sensor effects."""
    shape = parcel.shape
    lam = S2_WAVELENGTH_NM[:, None, None]
    # Regional variation of the materials themselves (crop varieties, soil types): each endmember's spectrum
    # gets a per-tile gain and spectral slope.
    E = _domain_endmembers(dom)
    offset, slope = rng.normal(0.0, TILE_ENDMEMBER_SD, (2, len(E), 1))
    E = E * (1 + offset + slope * (S2_WAVELENGTH_NM[None, :] - 1000.0) / 1000.0).clip(0.5, 1.5)
    refl = np.einsum("kb,kyx->byx", E, A)

    # Within-class variation: per-parcel brightness and spectral tilt (not on water, which is not parcelled).
    bright = rng.normal(1.0, PARCEL_BRIGHTNESS_SD, n_parcels)[parcel]
    tilt = rng.normal(0.0, PARCEL_TILT_SD, n_parcels)[parcel]
    land = label != WATER
    refl *= np.where(land, bright * (1 + tilt * (lam - 1000.0) / 1000.0), 1.0)

    # Illumination and topographic shading.
    sun = dom.sun * rng.uniform(0.93, 1.07)
    relief = rng.uniform(0.0, 1.0)
    dem = _gaussian_field(rng, shape, 8.0)
    az = rng.uniform(0, 2 * math.pi)
    gy, gx = np.gradient(dem)
    shading = 1 + 0.6 * relief * (gx * math.cos(az) + gy * math.sin(az))
    refl *= sun * np.clip(shading, 0.6, 1.4)

    # Haze: wavelength-dependent path radiance, partly attenuating the surface signal.
    haze = dom.haze * rng.gamma(2.0, 0.5) * np.clip(1 + 0.35 * _gaussian_field(rng, shape, 12.0), 0.2, 2.0)
    path = 0.03 * haze * (lam / 443.0) ** -1.8
    refl = refl * (1 - 0.5 * path) + path
    # Water-vapour absorption in B09.
    refl[S2_B09] *= rng.uniform(0.35, 0.6)

    # Calibration: per-domain gain times per-tile jitter.
    refl *= (np.asarray(dom.band_gain) * rng.normal(1.0, 0.015, len(S2_BANDS)))[:, None, None]

    # 10 m optics (MTF), then sampling at the native resolution of each band with signal-dependent noise.
    refl = ndimage.gaussian_filter(refl, sigma=(0, 0.45, 0.45), mode="nearest")
    out = np.empty_like(refl)
    for band in range(len(S2_BANDS)):
        block = int(S2_GSD_M[S2_BANDS[band]] / S2_PIXEL_M)
        native = _block_mean(refl[band : band + 1], block) if block > 1 else refl[band : band + 1]
        sigma = np.sqrt(0.0012**2 + 2.0e-5 * np.clip(native, 0, None))
        native = native + sigma * rng.standard_normal(native.shape)
        out[band] = _upsample(native, block)[0] if block > 1 else native[0]
    return out


def _render_s1(rng: np.random.Generator, A: np.ndarray, label: np.ndarray, parcel: np.ndarray, n_parcels: int,
               dom: DomainSpec) -> np.ndarray:  # fmt: skip
    """Sentinel-1-like VV/VH backscatter in dB ``(2, P, P)``: linear mixing at the tile's incidence angle, double
    bounce, the domain's calibration and thermal-noise floor, speckle."""
    incidence = dom.s1_incidence_deg + rng.uniform(-S1_INCIDENCE_SPREAD_DEG, S1_INCIDENCE_SPREAD_DEG)
    db = ENDMEMBER_S1_DB + ENDMEMBER_S1_SLOPE * (incidence - S1_REFERENCE_INCIDENCE_DEG)
    db[list(SOIL_LIKE_ENDMEMBERS)] += dom.soil_db
    lin = np.einsum("kp,kyx->pyx", 10.0 ** (db / 10.0), A)
    jitter = rng.normal(0.0, 1.0, n_parcels)[parcel]
    gain_db = dom.s1_calibration_db + np.where(label == WATER, 0.0, jitter)
    bright_points = (label == BUILT_UP) & (rng.uniform(size=label.shape) < 0.12)
    gain_db = gain_db + 8.0 * bright_points
    lin = lin * 10.0 ** (gain_db / 10.0)
    lin = ndimage.gaussian_filter(lin, sigma=(0, S1_BLUR_PX, S1_BLUR_PX), mode="nearest")
    lin = lin + dom.s1_noise_power  # thermal noise (speckled like the signal)
    lin = lin * rng.gamma(S1_LOOKS, 1.0 / S1_LOOKS, lin.shape)
    return 10.0 * np.log10(np.maximum(lin, 1e-6))


def _nodata_region(rng: np.random.Generator, size: int) -> np.ndarray | None:
    """A nodata corner or edge strip (swath edge) for a few tiles, else ``None``."""
    if rng.uniform() >= 0.06:
        return None
    yy, xx = np.mgrid[0:size, 0:size]
    if rng.uniform() < 0.5:
        corner = rng.integers(4)
        xs = xx if corner % 2 == 0 else size - 1 - xx
        ys = yy if corner < 2 else size - 1 - yy
        return xs + ys < rng.uniform(0.15, 0.5) * size
    width = int(rng.integers(2, max(3, size // 5)))
    side = rng.integers(4)
    coord = (xx, yy, size - 1 - xx, size - 1 - yy)[side]
    return coord < width


def _land_cover_tile(seed: int, domain_index: int, index: int, size: int, dom: DomainSpec) -> dict[str, np.ndarray]:
    """All arrays of one land-cover tile: S2 DN, S1 dB, mask, sub-types."""
    rng = np.random.default_rng([seed, _STREAM_S2, domain_index, index])
    canvas = -(-size // S2_BLOCK_60M) * S2_BLOCK_60M
    label, subtype, parcel, road, n_parcels = _layout(rng, canvas, dom)
    A = _abundances(rng, label, subtype, parcel, road, n_parcels, dom)
    refl = _render_s2(rng, A, parcel, n_parcels, label, dom)
    rng_s1 = np.random.default_rng([seed, _STREAM_S1, domain_index, index])
    s1 = _render_s1(rng_s1, A, label, parcel, n_parcels, dom)

    crop = (slice(None), slice(0, size), slice(0, size))
    dn = np.clip(np.rint(refl[crop] * S2_SCALE), 1, np.iinfo(np.uint16).max).astype(np.uint16)
    mask = label[:size, :size].astype(np.uint8)
    nodata = _nodata_region(rng, size)
    if nodata is not None:
        dn[:, nodata] = S2_NODATA
        mask[nodata] = IGNORE_INDEX
    return {"s2": dn, "s1": s1[crop].astype(np.float32), "mask": mask, "subtype": subtype[:size, :size]}


# ---------------------------------------------------------------------------------------------------- SAR buildings
SAR_CELL_PX = 24
"""Buildings are placed one per cell of this size (at most), so they never overlap."""
SAR_BUILDING_P = (0.35, 0.9)
"""Range of the per-cell building probability (driven by a smooth density field)."""
SAR_BUILDING_SIDE_PX = (7.0, 18.0)
SAR_BUILDING_HEIGHT_M = (2.0, 4.5)
SAR_INCIDENCE_DEG = (40.0, 55.0)
SAR_LOOK = "east"
"""Range direction: the sensor is on the west side, so west-facing walls face it."""
# Clean linear intensities (HH, HV, VV) of the background materials.
SAR_GROUND = (0.040, 0.007, 0.050)
SAR_TREES = (0.100, 0.035, 0.090)
SAR_ROAD = (0.004, 0.0006, 0.005)
SAR_SHADOW = (0.0015, 0.0003, 0.0015)
SAR_WALL = (0.12, 0.02, 0.10)


@dataclass(frozen=True)
class _Building:
    polygon: np.ndarray  # (4, 2) corners, pixel (x, y) of the scene
    height_m: float


def _rectangle(cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    local = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    return local @ np.array([[c, s], [-s, c]]) + np.array([cx, cy])


def _geom(poly: np.ndarray) -> dict[str, Any]:
    ring = [tuple(map(float, p)) for p in poly] + [tuple(map(float, poly[0]))]
    return {"type": "Polygon", "coordinates": [ring]}


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull vertices of 2-D points, counter-clockwise."""
    return points[ConvexHull(points).vertices]


def _burn(shapes: list[tuple[dict, float]], shape: tuple[int, int], all_touched: bool = False) -> np.ndarray:
    if not shapes:
        return np.zeros(shape, dtype=np.float32)
    return rasterize(shapes, out_shape=shape, transform=Affine.identity(), fill=0, all_touched=all_touched,
                     dtype="float32")  # fmt: skip


def _sar_scene(seed: int, scene: int, settings: DemoSettings) -> tuple[np.ndarray, np.ndarray, list[_Building], dict]:
    """One SAR scene: image ``(4, S, S)`` linear intensity, building mask ``(S, S)``, buildings, scene metadata."""
    rng = np.random.default_rng([seed, _STREAM_SAR, scene])
    n = settings.sar_scene_size
    shape = (n, n)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    incidence = math.radians(rng.uniform(*SAR_INCIDENCE_DEG))

    # Background: ground with trees, roads along some cell borders.
    clean = np.empty((3, n, n))
    trees = _gaussian_field(rng, shape, 6.0) > 0.9
    texture = np.exp(0.3 * _gaussian_field(rng, shape, 2.0))
    for c in range(3):
        clean[c] = np.where(trees, SAR_TREES[c], SAR_GROUND[c]) * texture
    road = np.zeros(shape, dtype=bool)
    for k in range(0, n + 1, SAR_CELL_PX):
        if rng.uniform() < 0.4:
            road |= np.abs(yy - k) < 2.0
        if rng.uniform() < 0.4:
            road |= np.abs(xx - k) < 2.0
    for c in range(3):
        clean[c][road] = SAR_ROAD[c]

    # Swath edge: nodata beyond a slanted line near one border of some scenes.
    nodata = np.zeros(shape, dtype=bool)
    if rng.uniform() < 0.5:
        depth = rng.uniform(0.08, 0.2) * n
        nodata = xx + 0.2 * (yy - n / 2) > n - depth

    # Buildings, at most one per cell, circumscribed circle inside the cell.
    density = _gaussian_field(rng, shape, 30.0)
    buildings: list[_Building] = []
    half = SAR_CELL_PX / 2
    for cy0 in range(0, n - SAR_CELL_PX + 1, SAR_CELL_PX):
        for cx0 in range(0, n - SAR_CELL_PX + 1, SAR_CELL_PX):
            p = np.interp(density[cy0 + int(half), cx0 + int(half)], [-1.5, 1.5], SAR_BUILDING_P)
            if rng.uniform() >= p:
                continue
            w, h = rng.uniform(*SAR_BUILDING_SIDE_PX, 2)
            radius = math.hypot(w, h) / 2
            scale = min(1.0, (half - 1.5) / radius)
            w, h, radius = w * scale, h * scale, radius * scale
            free = max(0.0, half - 1.5 - radius)
            cx = cx0 + half + rng.uniform(-free, free)
            cy = cy0 + half + rng.uniform(-free, free)
            angle = rng.uniform(0, math.pi) if rng.uniform() < 0.3 else rng.normal(0, 0.15)
            poly = _rectangle(cx, cy, w, h, angle)
            height = float(rng.uniform(*SAR_BUILDING_HEIGHT_M))
            inside_nodata = nodata[np.clip(poly[:, 1].astype(int), 0, n - 1), np.clip(poly[:, 0].astype(int), 0, n - 1)]
            if inside_nodata.any():
                continue
            buildings.append(_Building(poly, height))

    # Radar geometry per building: shadow behind, wall layover and roof shifted towards the sensor (west).
    shadow, wall, roof, bounce = [], [], [], []
    roof_gain, bounce_gain = [], []
    for b in buildings:
        layover = b.height_m / math.tan(incidence) / SAR_PIXEL_M
        shadow_len = b.height_m * math.tan(incidence) / SAR_PIXEL_M
        far = b.polygon + np.array([shadow_len, 0.0])
        near = b.polygon - np.array([layover, 0.0])
        shadow.append((_geom(_hull(np.vstack([b.polygon, far]))), 1.0))
        wall.append((_geom(_hull(np.vstack([b.polygon, near]))), 1.0))
        roof.append((_geom(near), float(len(roof) + 1)))
        roof_gain.append(rng.uniform(0.05, 0.3))
        centroid = b.polygon.mean(axis=0)
        for i in range(4):
            p, q = b.polygon[i], b.polygon[(i + 1) % 4]
            normal = np.array([q[1] - p[1], -(q[0] - p[0])])
            if normal @ ((p + q) / 2 - centroid) < 0:
                normal = -normal
            if normal[0] / (np.linalg.norm(normal) + 1e-12) < -0.3:  # faces the sensor (west)
                line = {"type": "LineString", "coordinates": [tuple(map(float, p)), tuple(map(float, q))]}
                bounce.append((line, float(len(bounce_gain) + 1)))
                bounce_gain.append(rng.uniform(1.0, 5.0))
    shadow_m = _burn(shadow, shape) > 0
    wall_m = _burn(wall, shape) > 0
    roof_id = _burn(roof, shape).astype(np.int64)
    bounce_id = _burn(bounce, shape, all_touched=True).astype(np.int64)
    for c in range(3):
        clean[c][shadow_m] = SAR_SHADOW[c]
        clean[c][wall_m] += SAR_WALL[c]
    roof_gain_a = np.concatenate([[0.0], roof_gain])
    bounce_gain_a = np.concatenate([[0.0], bounce_gain])
    pol_roof = (1.0, 0.18, 0.9)
    pol_bounce = (1.0, 0.025, 0.45)
    for c in range(3):
        clean[c] = np.where(roof_id > 0, roof_gain_a[roof_id] * pol_roof[c], clean[c])
        clean[c] = np.where(bounce_id > 0, bounce_gain_a[bounce_id] * pol_bounce[c], clean[c])

    # Sensor: PSF blur, independent speckle per channel (HV and VH share the clean cross-pol intensity).
    clean = ndimage.gaussian_filter(clean, sigma=(0, 0.6, 0.6), mode="nearest")
    hh, hv, vv = clean
    image = np.stack([hh, hv, hv, vv]) * rng.gamma(SAR_LOOKS, 1.0 / SAR_LOOKS, (4,) + shape)
    image[:, nodata] = SAR_NODATA
    mask = _burn([(_geom(b.polygon), 1.0) for b in buildings], shape).astype(np.uint8)
    meta = {"incidence_deg": round(math.degrees(incidence), 3), "look": SAR_LOOK, "buildings": len(buildings),
            "nodata_fraction": round(float(nodata.mean()), 4)}  # fmt: skip
    return image.astype(np.float32), mask, buildings, meta


def _clip_polygon(poly: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a convex or simple polygon ``(N, 2)`` to an axis-aligned box."""
    pts = [tuple(p) for p in poly]
    for axis, bound, keep_above in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        out: list[tuple[float, float]] = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            cin = cur[axis] >= bound if keep_above else cur[axis] <= bound
            pin = prev[axis] >= bound if keep_above else prev[axis] <= bound
            if cin != pin:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
            if cin:
                out.append(cur)
        pts = out
        if not pts:
            break
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _footprints_geojson(buildings: list[_Building], scene: int, row: int, col: int, size: int,
                        transform: Affine) -> dict:  # fmt: skip
    """FeatureCollection of the footprints inside a tile window, in map coordinates of the tile CRS."""
    features = []
    for k, b in enumerate(buildings):
        clipped = _clip_polygon(b.polygon - np.array([col, row]), 0, 0, size, size)
        if len(clipped) < 3 or abs(_polygon_area(clipped)) < 1e-3:
            continue
        xs, ys = transform @ (clipped[:, 0], clipped[:, 1])
        ring = np.round(np.column_stack([xs, ys]), 3)
        if _polygon_area(ring) < 0:  # exterior rings counter-clockwise in map coordinates (RFC 7946)
            ring = ring[::-1]
        coords = [[float(x), float(y)] for x, y in ring]
        coords.append(coords[0])
        features.append({
            "type": "Feature",
            "properties": {"building_id": f"s{scene:02d}_b{k:04d}", "height_m": round(b.height_m, 2)},
            "geometry": {"type": "Polygon", "coordinates": [coords]},
        })  # fmt: skip
    return {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{SAR_CRS_EPSG}"}},
        "features": features,
    }


# ---------------------------------------------------------------------------------------------------- writing
def _write_tif(path: Path, data: np.ndarray, *, epsg: int, transform: Affine, nodata: float | None,
               descriptions: Sequence[str], tags: dict[str, str]) -> None:  # fmt: skip
    """Write a ``(C, H, W)`` array as a deflate-compressed GeoTIFF with band descriptions and tags."""
    c, h, w = data.shape
    predictor = 3 if np.issubdtype(data.dtype, np.floating) else 2
    profile = dict(driver="GTiff", width=w, height=h, count=c, dtype=data.dtype.name, crs=f"EPSG:{epsg}",
                   transform=transform, nodata=nodata, compress="deflate", predictor=predictor, zlevel=3,
                   interleave="pixel")  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = tuple(descriptions)
        dst.update_tags(**tags)


def _write_lines(path: Path, ids: Sequence[str]) -> None:
    path.write_text("".join(f"{i}\n" for i in ids))


def _tile_transform(dom: DomainSpec, index: int, size: int) -> Affine:
    """Tiles of a domain sit on a grid with one tile of space between them (they do not overlap)."""
    per_row = 40
    step = 2 * size * S2_PIXEL_M
    x0 = dom.origin[0] + (index % per_row) * step
    y0 = dom.origin[1] - (index // per_row) * step
    return Affine(S2_PIXEL_M, 0.0, x0, 0.0, -S2_PIXEL_M, y0)


def _land_cover(out: Path, seed: int, settings: DemoSettings, domain_index: int, dom: DomainSpec) -> dict:
    """Write one land-cover domain (S2, S1, masks, splits); return its ``dataset.json`` entry."""
    s2_dir, s1_dir = out / "s2" / dom.name, out / "s1" / dom.name
    for d in (s2_dir / "images", s2_dir / "masks", s2_dir / "splits", s1_dir / "images", s1_dir / "masks",
              s1_dir / "splits"):
        d.mkdir(parents=True, exist_ok=True)
    n_total = settings.tiles + settings.val_tiles
    ids = [f"{dom.name}_{i:05d}" for i in range(n_total + settings.pool_tiles)]  # train, val, then the pool
    class_counts = np.zeros((2, len(CLASS_NAMES) + 1), dtype=np.int64)  # train, val; last = ignore
    sub_counts = np.zeros(len(SUBTYPE_NAMES), dtype=np.int64)
    nodata_tiles = []
    for i, tile_id in enumerate(ids):
        t = _land_cover_tile(seed, domain_index, i, settings.size, dom)
        transform = _tile_transform(dom, i, settings.size)
        tags = {"DOMAIN": dom.name, "TILE_ID": tile_id, "GENERATOR": FORMAT, "SEED": str(seed)}
        _write_tif(s2_dir / "images" / f"{tile_id}.tif", t["s2"], epsg=dom.crs_epsg, transform=transform,
                   nodata=S2_NODATA, descriptions=S2_BANDS, tags={**tags, "SENSOR": "S2L2A"})  # fmt: skip
        if i >= n_total:  # the unlabelled pool: images only
            _write_tif(s1_dir / "images" / f"{tile_id}.tif", t["s1"], epsg=dom.crs_epsg, transform=transform,
                       nodata=float("nan"), descriptions=S1_BANDS,
                       tags={**tags, "SENSOR": "S1", "UNITS": "dB"})  # fmt: skip
            continue
        for sensor_dir in (s2_dir, s1_dir):  # the S1 folder is a segmentation dataset of its own (same labels)
            _write_tif(sensor_dir / "masks" / f"{tile_id}.tif", t["mask"][None], epsg=dom.crs_epsg,
                       transform=transform, nodata=IGNORE_INDEX, descriptions=("class",),
                       tags={**tags, "CLASSES": ",".join(CLASS_NAMES)})  # fmt: skip
        _write_tif(s1_dir / "images" / f"{tile_id}.tif", t["s1"], epsg=dom.crs_epsg, transform=transform,
                   nodata=float("nan"), descriptions=S1_BANDS,
                   tags={**tags, "SENSOR": "S1", "UNITS": "dB"})  # fmt: skip
        counts = np.bincount(np.minimum(t["mask"].ravel(), len(CLASS_NAMES)), minlength=len(CLASS_NAMES) + 1)
        class_counts[int(i >= settings.tiles)] += counts
        valid = t["mask"] != IGNORE_INDEX
        sub_counts += np.bincount(t["subtype"][valid].ravel(), minlength=len(SUBTYPE_NAMES))
        if not valid.all():
            nodata_tiles.append(tile_id)

    train, val, pool = ids[: settings.tiles], ids[settings.tiles : n_total], ids[n_total:]
    order = np.random.default_rng([seed, _STREAM_SPLIT, domain_index]).permutation(len(train))
    splits = {"train_all": train}
    for fraction in LABEL_FRACTIONS:  # the first tiles of one permutation: 1/32 of the labels lie within 1/8
        pick = order[: max(1, round(len(train) / fraction))]
        labelled = [train[i] for i in sorted(pick)]
        splits[f"labelled_1_{fraction}"] = labelled
        splits[f"unlabelled_1_{fraction}"] = [t for t in train if t not in set(labelled)]
    splits["val"] = val
    if pool:
        splits["pool"] = pool
    for name, split_ids in splits.items():
        for sensor_dir in (s2_dir, s1_dir):
            _write_lines(sensor_dir / "splits" / f"{name}.txt", split_ids)

    def freq(row: np.ndarray) -> dict[str, float]:
        return {c: round(float(row[k]) / max(1, int(row[:-1].sum())), 4) for k, c in enumerate(CLASS_NAMES)}

    entry = asdict(dom)
    entry.update({
        "crs": f"EPSG:{dom.crs_epsg}",
        "tiles": {k: len(v) for k, v in splits.items()},
        "class_frequency": {"train_all": freq(class_counts[0]), "val": freq(class_counts[1])},
        "subtype_frequency": {s: round(float(c) / max(1, int(sub_counts.sum())), 5)
                              for s, c in zip(SUBTYPE_NAMES, sub_counts)},
        "nodata_tiles": nodata_tiles,
    })  # fmt: skip
    return entry


SAR_SPLIT_KEY = 100
"""Key of the SAR semi-supervised split's random stream (the S2 domains use their index, 0 and 1)."""


def _sar_semisup_split(seed: int, settings: DemoSettings, scene_tiles: dict[str, list[tuple[str, int, int]]]) -> dict:
    """``labelled_1_8`` / ``unlabelled_1_8`` of the SAR training scenes, spatially apart.

    ``scene_tiles``: training scene id -> its tiles ``(id, row_off, col_off)`` in row-major order. The labelled
    tiles are whole scenes while at least a scene's worth is still to be labelled, then one compact block of
    tiles from a random corner of the next scene (scenes in a seed-derived random order); tiles that overlap a
    labelled tile are left out of ``unlabelled_1_8``, so no pixel is both labelled and unlabelled, unless that
    would leave ``unlabelled_1_8`` empty (tiny settings): then every other training tile is unlabelled and the
    overlapping ones are listed under ``overlapping_labelled``.
    """
    g, size = settings.sar_grid, settings.sar_size
    train = [t for tiles in scene_tiles.values() for t in tiles]
    n_lab = max(1, round(len(train) / LABEL_FRACTION))
    rng = np.random.default_rng([seed, _STREAM_SPLIT, SAR_SPLIT_KEY])
    order = [list(scene_tiles)[k] for k in rng.permutation(len(scene_tiles))]
    labelled: list[tuple[str, int, int]] = []
    whole: list[str] = []
    for scene in order:
        left = n_lab - len(labelled)
        if left <= 0:
            break
        tiles = scene_tiles[scene]
        if left >= len(tiles):
            labelled += tiles
            whole.append(scene)
            continue
        width = min(g, math.ceil(math.sqrt(left)))
        flip_r, flip_c = (bool(b) for b in rng.integers(0, 2, 2))  # which corner the block starts from
        cells = [(k // width, k % width) for k in range(left)]
        cells = [(g - 1 - r if flip_r else r, g - 1 - c if flip_c else c) for r, c in cells]
        labelled += [tiles[r * g + c] for r, c in cells]
    lab_ids = {t[0] for t in labelled}
    lab_scene = {t[0]: s for s, tiles in scene_tiles.items() for t in tiles}

    def overlaps(a: tuple[str, int, int], b: tuple[str, int, int]) -> bool:
        return lab_scene[a[0]] == lab_scene[b[0]] and abs(a[1] - b[1]) < size and abs(a[2] - b[2]) < size

    rest = [t for t in train if t[0] not in lab_ids]
    near = [t for t in rest if any(overlaps(t, lab) for lab in labelled)]
    far = [t for t in rest if t not in near]
    unlabelled, left_out, straddling = (far, near, []) if far else (rest, [], near)
    return {
        "labelled_1_8": [t[0] for t in train if t[0] in lab_ids],  # in train_all order
        "unlabelled_1_8": [t[0] for t in unlabelled],
        "info": {
            "labelled_whole_scenes": whole,
            "labelled_partial_scene": sorted({lab_scene[t[0]] for t in labelled} - set(whole)),
            "left_out_overlapping_labelled": [t[0] for t in left_out],
            "overlapping_labelled": [t[0] for t in straddling],
            "rule": "labelled: whole training scenes, then a compact block of tiles from a corner of one more scene, "
                    "round(train_all / 8) tiles (at least 1); unlabelled: the other training tiles except those "
                    "overlapping a labelled tile (left out), unless none would remain (then listed as "
                    "overlapping_labelled)",
        },
    }


def _sar(out: Path, seed: int, settings: DemoSettings) -> dict:
    """Write the SAR building dataset; return its ``dataset.json`` entry."""
    for d in ("images", "masks", "geojson", "splits"):
        (out / "sar" / d).mkdir(parents=True, exist_ok=True)
    size, stride = settings.sar_size, settings.sar_stride
    scenes, tiles = [], {}
    split_ids: dict[str, list[str]] = {"train_all": [], "val": []}
    scene_tiles: dict[str, list[tuple[str, int, int]]] = {}
    for s in range(settings.sar_scenes):
        image, mask, buildings, meta = _sar_scene(seed, s, settings)
        x0 = SAR_ORIGIN[0] + s * SAR_SCENE_SPACING_M
        scene_transform = Affine(SAR_PIXEL_M, 0.0, x0, 0.0, -SAR_PIXEL_M, SAR_ORIGIN[1])
        scene_id = f"scene{s:02d}"
        split = "val" if s >= settings.sar_scenes - settings.sar_val_scenes else "train_all"
        scenes.append({"id": scene_id, "split": split, "width": settings.sar_scene_size,
                       "height": settings.sar_scene_size, "transform": list(scene_transform)[:6], **meta})  # fmt: skip
        for r in range(settings.sar_grid):
            for c in range(settings.sar_grid):
                row, col = r * stride, c * stride
                tile_id = f"sar_s{s:02d}_r{row:04d}_c{col:04d}"
                transform = scene_transform @ Affine.translation(col, row)
                window = (slice(row, row + size), slice(col, col + size))
                tags = {"SCENE": scene_id, "ROW_OFF": str(row), "COL_OFF": str(col), "GENERATOR": FORMAT,
                        "SEED": str(seed)}  # fmt: skip
                _write_tif(out / "sar" / "images" / f"{tile_id}.tif", image[(slice(None),) + window],
                           epsg=SAR_CRS_EPSG, transform=transform, nodata=SAR_NODATA, descriptions=SAR_BANDS,
                           tags={**tags, "SENSOR": "SAR4", "UNITS": "linear intensity"})  # fmt: skip
                _write_tif(out / "sar" / "masks" / f"{tile_id}.tif", mask[window][None], epsg=SAR_CRS_EPSG,
                           transform=transform, nodata=None, descriptions=("building",), tags=tags)  # fmt: skip
                gj = _footprints_geojson(buildings, s, row, col, size, transform)
                (out / "sar" / "geojson" / f"{tile_id}.geojson").write_text(json.dumps(gj, separators=(",", ":")))
                tiles[tile_id] = {"scene": scene_id, "row_off": row, "col_off": col,
                                  "buildings": len(gj["features"])}  # fmt: skip
                split_ids[split].append(tile_id)
                if split == "train_all":
                    scene_tiles.setdefault(scene_id, []).append((tile_id, row, col))
    semisup = _sar_semisup_split(seed, settings, scene_tiles)
    split_ids["labelled_1_8"] = semisup["labelled_1_8"]
    split_ids["unlabelled_1_8"] = semisup["unlabelled_1_8"]
    for name, ids in split_ids.items():
        _write_lines(out / "sar" / "splits" / f"{name}.txt", ids)
    return {
        "sensor": "SAR4", "bands": list(SAR_BANDS), "dtype": "float32", "units": "linear intensity",
        "nodata": SAR_NODATA, "pixel_m": SAR_PIXEL_M, "crs": f"EPSG:{SAR_CRS_EPSG}",
        "classes": ["background", "building"], "look": SAR_LOOK, "tile_size": size,
        "tile_overlap": settings.sar_overlap,
        "scenes": scenes, "tiles": tiles, "splits": {k: len(v) for k, v in split_ids.items()},
        "split_rule": "val: whole scenes: tiles of one scene overlap, so they never straddle train_all and val",
        "semisup_split": semisup["info"],
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------- entry points
_OWNED = ("s2", "s1", "sar", "dataset.json")
"""What :func:`generate` writes under ``out`` (and removes first when overwriting)."""


STATS_FILES = {"s2": "s2/stats.json", "s1": "s1/stats.json", "sar": "sar/stats.json"}
"""Per-sensor band statistics written by :func:`generate` (relative to its ``out``), for ``data.stats_file``."""

_STATS_SOURCES = {"s2": ("S2L2A", "*/images/*.tif"), "s1": ("S1", "*/images/*.tif"), "sar": ("SAR4", "images/*.tif")}
"""Sensor and image glob (under ``out/<name>``) of each statistics file: every image tile of both domains."""


def write_stats(out: str | Path) -> dict[str, Path]:
    """Compute the per-band statistics of each demo sensor with :func:`common.stats.compute_band_stats` (model units,
    invalid pixels skipped, over every image tile of both domains, training and validation) and write them to
    :data:`STATS_FILES` under ``out``, so that the demo configs normalise with the statistics of the data they
    train on (``data.stats_file``). Returns the written paths by sensor folder."""
    from common.stats import compute_band_stats

    out = Path(out)
    written = {}
    for name, rel in STATS_FILES.items():
        sensor, pattern = _STATS_SOURCES[name]
        stats = compute_band_stats(out / name, sensor, glob=pattern, layout="multiband")
        stats.source = {**stats.source, "root": name, "generator": "python -m common.demo_data"}
        stats.to_json(out / rel)
        written[name] = out / rel
    return written


def generate(out: str | Path, seed: int = 0, *, overwrite: bool = False, **sizes: Any) -> dict:
    """Generate the demo dataset under ``out``.

    Args:
        out: Output directory (created).
        seed: Random seed; the output is a pure function of ``(seed, sizes)``.
        overwrite: Regenerate even if ``out`` already holds a dataset. Without it, an existing dataset with the
            same format, seed and settings is kept as is (and its ``dataset.json`` returned), one of an older
            format with the same seed and settings is regenerated, and one with other settings raises.
        **sizes: Fields of :class:`DemoSettings` (``tiles``, ``val_tiles``, ``size``, ``sar_scenes``, ``sar_grid``,
            ``sar_size``, ``sar_overlap``, ``sar_val_scenes``, ``shift``, ``pool_tiles``).

    Also writes the per-sensor band statistics :data:`STATS_FILES` (:func:`write_stats`; added to a kept dataset
    that lacks them).

    Returns:
        The content of ``dataset.json``.

    Raises:
        ValueError: Unknown or impossible settings.
        FileExistsError: ``out`` holds a dataset with other settings and ``overwrite`` is False.
    """
    known = {f.name for f in fields(DemoSettings)}
    unknown = sorted(set(sizes) - known)
    if unknown:
        raise ValueError(f"unknown demo-data settings {unknown}; valid: {sorted(known)}")
    settings = DemoSettings(**sizes)
    settings.validate()
    out = Path(out)
    meta_path = out / "dataset.json"
    if meta_path.exists() and not overwrite:
        old = json.loads(meta_path.read_text())
        # settings added since the dataset was written take their defaults
        same_settings = old.get("seed") == seed and {**asdict(DemoSettings()), **old.get("settings", {})} == asdict(
            settings)
        if old.get("format") == FORMAT and same_settings:
            if not all((out / f).is_file() for f in STATS_FILES.values()):  # a dataset from before the stats files
                write_stats(out)
            return old
        if not same_settings:
            raise FileExistsError(f"{out} already holds a demo dataset with another seed or settings; pass "
                                  "overwrite=True (--overwrite) to replace it")  # fmt: skip
        # the same seed and settings written by an older generator version: regenerated in place
    for name in _OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    specs = domain_specs(seed, settings.shift)
    domains = {name: _land_cover(out, seed, settings, k, specs[name]) for k, name in enumerate(DOMAINS)}
    sar = _sar(out, seed, settings)
    write_stats(out)
    meta = {
        "format": FORMAT,
        "name": "eoseg built-in demo data",
        "licence": "generated data, free to use, modify and redistribute without restriction",
        "seed": seed,
        "settings": asdict(settings),
        "generator": "python -m common.demo_data",
        "ignore_index": IGNORE_INDEX,
        "classes": list(CLASS_NAMES),
        "palette": [list(c) for c in PALETTE],
        "subtypes": list(SUBTYPE_NAMES),
        "sensors": {
            "s2": {"sensor": "S2L2A", "bands": list(S2_BANDS), "dtype": "uint16", "nodata": S2_NODATA,
                   "scale": 1.0 / S2_SCALE, "offset": 0, "pixel_m": S2_PIXEL_M,
                   "gsd": {b: S2_GSD_M[b] for b in S2_BANDS}, "units": "DN = reflectance * 10000"},
            "s1": {"sensor": "S1", "bands": list(S1_BANDS), "dtype": "float32", "nodata": "nan", "units": "dB",
                   "pixel_m": S2_PIXEL_M, "looks": S1_LOOKS, "co_registered_with": "s2"},
            "sar": {"sensor": "SAR4", "bands": list(SAR_BANDS), "dtype": "float32", "nodata": SAR_NODATA,
                    "units": "linear intensity", "pixel_m": SAR_PIXEL_M, "looks": SAR_LOOKS},
        },  # fmt: skip
        "domains": domains,
        "sar": sar,
        "stats_files": dict(STATS_FILES),
    }
    text = json.dumps(meta, indent=1, sort_keys=True)
    meta_path.write_text(text + "\n")
    return json.loads(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m common.demo_data --out DIR --seed N [--tiles N --size PX ...]``."""
    d = DemoSettings()
    p = argparse.ArgumentParser(prog="python -m common.demo_data", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--tiles", type=int, default=d.tiles, help=f"training tiles per domain ({d.tiles})")
    p.add_argument("--val-tiles", type=int, default=d.val_tiles, help=f"validation tiles per domain ({d.val_tiles})")
    p.add_argument("--size", type=int, default=d.size, help=f"land-cover tile size, px at 10 m ({d.size})")
    p.add_argument("--sar-scenes", type=int, default=d.sar_scenes, help=f"SAR scenes ({d.sar_scenes})")
    p.add_argument("--sar-grid", type=int, default=d.sar_grid, help=f"SAR tiles per scene side ({d.sar_grid})")
    p.add_argument("--sar-size", type=int, default=d.sar_size, help=f"SAR tile size, px at 0.5 m ({d.sar_size})")
    p.add_argument("--sar-overlap", type=int, default=d.sar_overlap, help=f"SAR tile overlap, px ({d.sar_overlap})")
    p.add_argument("--sar-val-scenes", type=int, default=d.sar_val_scenes,
                   help=f"SAR scenes held out for val ({d.sar_val_scenes})")  # fmt: skip
    p.add_argument("--shift", type=float, default=d.shift, help=f"domain shift strength 0..1 ({d.shift})")
    p.add_argument("--pool-tiles", type=int, default=d.pool_tiles,
                   help=f"extra unlabelled tiles per land-cover domain for pretraining, images only ({d.pool_tiles})")
    p.add_argument("--overwrite", action="store_true", help="regenerate even if DIR already holds a dataset")
    args = p.parse_args(argv)
    sizes = {f.name: getattr(args, f.name) for f in fields(DemoSettings)}
    start = time.perf_counter()
    existed = (Path(args.out) / "dataset.json").exists() and not args.overwrite
    try:
        meta = generate(args.out, args.seed, overwrite=args.overwrite, **sizes)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_s2 = {k: v["tiles"] for k, v in meta["domains"].items()}
    print(f"demo data in {args.out} (seed {args.seed}): s2/s1 tiles {n_s2}, sar tiles {meta['sar']['splits']} "
          + ("[already there, kept]" if existed else f"[{time.perf_counter() - start:.1f} s]"))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
