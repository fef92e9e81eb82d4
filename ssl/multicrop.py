"""Multispectral / SAR multi-crop augmentation for DINO, in numpy + OpenCV (any number of bands).

DINO (Caron et al. 2021, facebookresearch/dino ``DataAugmentationDINO``) trains on two *global* views and N *local*
views of each image. The seed notes built them with three Albumentations pipelines (``Channelaug``, flip,
``ShiftScaleRotate``, ``RandomResizedCrop``, Gaussian blur, solarize, ``Normalize``). This module reproduces and
extends that pipeline for float32 images in model units (reflectance, dB, linear intensity) with 1..N bands,
because Albumentations 2.0.8 is the wrong tool here:

* several of its pixel transforms clip float images to [0, 1] (``GaussianBlur``, ``Solarize``,
  ``RandomBrightnessContrast``, ``GaussNoise``, ``Downscale``): a dB image (values around -20) becomes all zeros and
  bright reflectance (clouds, snow > 1) is cut; its colour transforms (``ColorJitter``, ``ToGray``) accept only
  1 or 3 channels (``tests/test_multicrop.py`` demonstrates both);
* it applies ``ShiftScaleRotate`` to the full tile and resizes after cropping in separate passes, and the seed's
  ``Channelaug`` copies one band to all of them before any geometry, so every band is warped and resized.

Per view, in this order (``u`` = uniform draws of the view's generator):

1. random-resized crop (torchvision's sampling: area fraction in ``scale``, log-uniform aspect ratio in ``ratio``,
   10 attempts then a centre crop), optionally composed with a small affine transform (rotation, scale, shift about
   the tile centre, reflect-101 border, as the seed's ``ShiftScaleRotate``): **the crop is taken first and only the
   crop is resized**; with the affine the whole chain is one ``cv2.warpAffine`` (one interpolation, not two);
2. channel augmentation (the seed's ``Channelaug``): one randomly chosen band replaces all bands; only that band is
   cropped/resized/blurred and it is broadcast to all bands in the final copy;
3. Gaussian blur (``sigma`` uniform in ``blur_sigma``, kernel radius ``int(blur_truncate * sigma)`` as PIL/
   Albumentations, reflect-101 border), never clipped;
4. SAR speckle on SAR bands (``noise="speckle"``): multiplicative Gamma(L, 1/L) noise of an L-look intensity image,
   i.e. ``x * G`` in linear units and ``x + 10 log10(G)`` in dB (the same noise, expressed in each unit);
5. brightness / contrast jitter per band, normalisation ``(x - mean) / std``, flips and the broadcast of step 2,
   all fused into a single pass that writes the contiguous float32 ``(C, h, w)`` output;
6. on normalised values ``z``: Gaussian noise (``noise="gaussian"``, std in normalised units), solarisation
   (optical bands only), band dropout and sensor-group dropout (dropped bands are set to 0 = the band mean).

Definitions (deviations from DINO's RGB pipeline, each a config value):

* **Solarisation** reflects normalised values above a threshold ``t``: ``z -> 2 t - z`` for ``z > t``, no clipping.
  For images in [0, 1] with ``t = 0.5`` this is exactly PIL's ``x -> 1 - x`` above 0.5; with the default ``t = 0``
  (the band mean) it inverts the brighter half of the distribution, as solarising at mid-grey does for RGB. Only
  bands in reflectance units are solarised (dB / linear SAR bands are left alone).
* **Brightness / contrast** (replaces DINO's ``ColorJitter``, whose hue/saturation have no meaning for N bands): a
  gain ``g_c = g * (1 + e_c)`` (``g`` shared by all bands within ``±jitter_brightness``, ``e_c`` per band within
  ``±jitter_band``) and a contrast factor ``k`` within ``±jitter_contrast`` around the view's band mean ``m_c``.
  Reflectance and linear bands: ``x' = g_c (m_c + k (x - m_c))`` (a gain on the radiance); dB bands: the same gain
  in linear power, ``x' = m_c + k (x - m_c) + 10 log10(g_c)``.
* **Channel augmentation** (``channel_mode``): ``"raw"`` (the seed) copies band ``b``'s values into every band
  *before* normalisation, so output band ``c`` is ``(x_b - mean_c) / std_c``; ``"normalized"`` broadcasts the
  normalised band ``(x_b - mean_b) / std_b`` (use it for stacks mixing units, e.g. S2 + S1).
* **Band / sensor dropout**: a random subset of at most ``band_dropout_max`` of the bands, or one whole sensor group
  (e.g. the S1 bands of an S2+S1 stack; never the only remaining group), is set to 0 in normalised units, the
  same value the datasets give no-data pixels.
* Determinism: every random decision comes from the ``np.random.Generator`` passed to the transform; use
  :func:`common.sampling.sample_rng` ``(seed, epoch, index)`` (or :class:`common.sampling.AugmentedDataset`).

Implementation notes (measured with OpenCV 5.0 and numpy 2.4 on one core): warps and blurs run on an interleaved
``(H, W, C)`` copy of the tile (made once per sample, only if needed), about 1.7x faster than C separate planes, and
the view comes back to ``(C, h, w)`` by ``cv2.transpose`` of its ``(h w, C)`` plane (half the cost of a transposing
read); plain resizes and single-band views run per plane on ``(C, H, W)``, straight into the output, which is then
normalised in place (small views with cached full-size scale/shift maps: numpy broadcasts ``(C, 1, 1)`` slowly over
small planes). ``cv2.flip`` copies pixels of more than 4 float32 channels one by one, so such views are flipped as two
2-D planes (exact copies). The Python bindings accept at most 128 interleaved channels (more bands fall back to
planes), ``warpAffine`` with cubic interpolation and ``INTER_AREA`` at most 4 (cubic warps of more bands use planes;
area is not used), and ``warpAffine`` samples at 1/32-px positions for 2 or >= 5 interleaved channels (exact for 1, 3
and 4): harmless for augmentation, and the reason a 10-band view differs from its 10 single-band views by ~0.02
(normalised units) on affine views. These layout choices do not change the values: the views are bit-identical to
those of the straightforward version this replaced (``cv2.merge``, a transposing read, per-pixel flips),
checked on 12,300 views over all options; ``tests/test_multicrop.py`` compares them with a per-band reference.
``bench/bench_multicrop.py`` compares throughput with the seed's pipeline.
The ``valid`` mask of a sample is not cropped: datasets fill invalid pixels with the band mean (0 once normalised).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import cv2
import numpy as np
import torch

from common.device_aug import AugmentDevice

__all__ = [
    "MultiCropConfig",
    "MultiCropTransform",
    "check_multicrop_inputs",
    "sar_multicrop_config",
    "band_units",
    "sample_crop_box",
    "collate_multicrop",
    "render_multicrop_grid",
    "UNITS",
]

UNITS = ("reflectance", "db", "linear", "other")
"""Model units of a band: optical reflectance, SAR backscatter in dB, SAR linear intensity, or anything else (ratios,
indices: contrast jitter only, no gain, speckle or solarisation)."""

_INTERPOLATION = {"nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}
_BORDER = cv2.BORDER_REFLECT_101  # Albumentations 1.x ShiftScaleRotate default, and cv2's blur default
_MAX_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
_CV_MAX_CHANNELS = 128  # most interleaved channels cv2's Python bindings accept (measured with OpenCV 4.x/5.x)
_FLIP_CODE = {(True, False): 1, (False, True): 0, (True, True): -1}  # cv2.flip code of (horizontal, vertical)

P3 = tuple[float, float, float]
"""A per-view probability: (first global view, second global view, every local view)."""

# Indices into the block of uniform draws each view takes from the generator (one call instead of ~20).
_U_HFLIP, _U_VFLIP, _U_AFFINE, _U_ROT, _U_SCALE, _U_TX, _U_TY, _U_BLUR, _U_SIGMA, _U_SOLAR = range(10)
_U_CHANNEL, _U_BAND, _U_JITTER, _U_GAIN, _U_CONTRAST, _U_NOISE, _U_BDROP, _U_SDROP, _U_CROP_I, _U_CROP_J = range(10, 20)
_N_U = 20
_FULL_MAP_MAX_PIXELS = 64 * 64  # views up to this size normalise with full (C, h, w) maps (see _normalisation)
_N_CROP = 2 * _MAX_CROP_ATTEMPTS + 2  # uniform draws of one crop box (sample_crop_box), after the view's _N_U


@dataclass(frozen=True)
class MultiCropConfig:
    """Multi-crop settings. Defaults: the seed's pipeline (2 x 120 px + 6 x 56 px, its flips, affine, channel
    augmentation and solarisation probabilities) with DINO's blur probabilities and sigma range."""

    global_size: int = 120  # side of the two global crops (seed: 120; DINO: 224)
    global_scale: tuple[float, float] = (0.4, 1.0)  # area fraction of a global crop (seed and DINO: 0.4-1)
    local_number: int = 6  # number of local crops (seed: 6; DINO: 8 or 10)
    local_size: int = 56  # side of the local crops (seed: 56; DINO: 96)
    local_scale: tuple[float, float] = (0.05, 0.4)  # area fraction of a local crop (seed and DINO: 0.05-0.4)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio range of a crop (torchvision default)
    interpolation: Literal["nearest", "linear", "cubic"] = "linear"  # resampling (seed: linear; DINO: bicubic)
    hflip_p: P3 = (0.5, 0.5, 0.5)  # horizontal flip (seed and DINO)
    vflip_p: P3 = (0.0, 0.0, 0.0)  # vertical flip (overhead imagery has no "up"; off in the seed)
    affine_p: P3 = (0.5, 0.5, 0.5)  # small affine before the crop (seed's ShiftScaleRotate p=0.5; DINO: none)
    affine_rotate: float = 45.0  # rotation range +-degrees (ShiftScaleRotate default)
    affine_scale: tuple[float, float] = (0.9, 1.1)  # zoom range (ShiftScaleRotate default)
    affine_shift: float = 0.0625  # shift range +- fraction of the side (ShiftScaleRotate default)
    blur_p: P3 = (1.0, 0.1, 0.5)  # Gaussian blur (seed and DINO)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # blur sigma range in output pixels (DINO; Albumentations 2: 0.5-3)
    blur_truncate: float = 3.5  # kernel radius = int(truncate * sigma) (PIL and Albumentations: 3.5)
    solarize_p: P3 = (0.0, 0.2, 0.0)  # solarisation, optical bands only (seed and DINO)
    solarize_threshold: float = 0.0  # threshold t in normalised units: z -> 2t - z above t
    channel_p: P3 = (1.0, 0.0, 0.0)  # seed's Channelaug: all bands <- one random band (seed: first global view)
    channel_mode: Literal["raw", "normalized"] = "raw"  # copy the band before ("raw", seed) or after normalising
    jitter_p: P3 = (0.0, 0.0, 0.0)  # brightness/contrast jitter (off in the seed; DINO's colour jitter: 0.8)
    jitter_brightness: float = 0.2  # common gain range +- (fraction)
    jitter_band: float = 0.05  # extra per-band gain range +- (fraction), changes the spectrum shape
    jitter_contrast: float = 0.2  # contrast factor range +- around the view's band mean
    noise_p: P3 = (0.0, 0.0, 0.0)  # noise
    noise: Literal["gaussian", "speckle"] = "gaussian"  # additive in normalised units / SAR speckle (SAR bands)
    noise_std: float = 0.05  # Gaussian noise std in normalised units (fraction of the band's std)
    speckle_looks: float = 4.0  # number of looks L of the Gamma(L, 1/L) speckle (higher = weaker)
    band_dropout_p: P3 = (0.0, 0.0, 0.0)  # zero a random subset of bands (normalised units)
    band_dropout_max: float = 0.5  # at most this fraction of the bands is dropped (at least one)
    sensor_dropout_p: P3 = (0.0, 0.0, 0.0)  # zero one whole sensor group (see sensor_groups)
    sensor_groups: tuple[tuple[int, ...], ...] = ()  # band indices of each sensor in a stack, e.g. ((0..9), (10, 11));
    #                                                  empty: pretraining takes them from the data's sensor stack
    device: AugmentDevice = "workers"  # where the views are made: workers (this module, per sample, in the loader
    #                                    workers), cuda (eo_ssl.multicrop_device, batched on the training device) or cpu

    def validate(self) -> None:
        """Raise ``ValueError`` on impossible values."""
        if self.global_size < 1 or self.local_size < 1 or self.local_number < 0:
            raise ValueError("global_size and local_size must be >= 1 and local_number >= 0")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {self.ratio}")
        for name in ("hflip_p", "vflip_p", "affine_p", "blur_p", "solarize_p", "channel_p", "jitter_p", "noise_p",
                     "band_dropout_p", "sensor_dropout_p"):
            p = getattr(self, name)
            if len(p) != 3 or not all(0.0 <= v <= 1.0 for v in p):
                raise ValueError(f"{name} must be three probabilities in [0, 1] (global 1, global 2, local), got {p}")
        if not 0.0 < self.affine_scale[0] <= self.affine_scale[1]:
            raise ValueError(f"affine_scale must satisfy 0 < low <= high, got {self.affine_scale}")
        if not 0.0 <= self.affine_shift < 1.0 or self.affine_rotate < 0:
            raise ValueError("affine_shift must be in [0, 1) and affine_rotate >= 0")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1] or self.blur_truncate <= 0:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high and blur_truncate > 0, got {self.blur_sigma}")
        for name in ("jitter_brightness", "jitter_band", "jitter_contrast"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.noise_std < 0 or self.speckle_looks <= 0:
            raise ValueError("noise_std must be >= 0 and speckle_looks > 0")
        if not 0.0 < self.band_dropout_max <= 1.0:
            raise ValueError(f"band_dropout_max must be in (0, 1], got {self.band_dropout_max}")
        if max(self.sensor_dropout_p) > 0 and len(self.sensor_groups) == 1:
            raise ValueError("sensor_dropout_p > 0 needs at least two sensor_groups (or none: pretraining fills them "
                             "from the data's sensor stack)")
        if any(len(g) == 0 for g in self.sensor_groups):
            raise ValueError("sensor_groups must not contain an empty group")

    @property
    def num_crops(self) -> int:
        """Number of views per sample (2 global + local_number)."""
        return 2 + self.local_number


def sar_multicrop_config(**overrides: Any) -> MultiCropConfig:
    """Settings suited to SAR (dB or linear intensity) tiles: no solarisation, no channel augmentation (two or four
    polarisations are not interchangeable), 4-look speckle on half of the views, brightness/contrast jitter on 80%
    (DINO's colour-jitter rate), blur as DINO. Keyword overrides win."""
    values: dict[str, Any] = dict(
        solarize_p=(0.0, 0.0, 0.0),
        channel_p=(0.0, 0.0, 0.0),
        noise="speckle",
        noise_p=(0.5, 0.5, 0.5),
        speckle_looks=4.0,
        jitter_p=(0.8, 0.8, 0.8),
    )
    values.update(overrides)
    cfg = MultiCropConfig(**values)
    cfg.validate()
    return cfg


def band_units(spec: Any) -> tuple[str, ...]:
    """Units of every band of a :class:`common.bands.SensorSpec` for :class:`MultiCropTransform`: ``"db"`` for SAR
    sensors (model units are dB), ``"reflectance"`` otherwise, ``"other"`` for derived bands (e.g. ``VV/VH``)."""
    if getattr(spec, "parts", ()):  # a sensor stack: each sensor's own units (S2 reflectance, then S1 dB ...)
        return tuple(u for p in spec.parts for u in band_units(p))
    derived = set(getattr(spec, "derived", ()))
    base = "db" if spec.is_sar else "reflectance"
    return tuple("other" if b in derived else base for b in spec.bands)


def sample_crop_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` on a numpy generator: returns ``(top, left, h, w)``.

    Up to 10 attempts draw an area fraction uniformly in ``scale`` and a log-uniform aspect ratio in ``ratio``; when
    none fits, the largest centre crop with an aspect ratio inside ``ratio``.
    """
    return _crop_box(rng.random(_N_CROP).tolist(), 0, height, width, scale, ratio)  # one call for all draws


def _crop_box(
    draws: list[float], at: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """:func:`sample_crop_box` on the ``_N_CROP`` uniform draws ``draws[at:at + _N_CROP]`` (the last two place the
    crop)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for k in range(at, at + 2 * _MAX_CROP_ATTEMPTS, 2):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[k])
        aspect = math.exp(log_lo + (log_hi - log_lo) * draws[k + 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(draws[at + _N_CROP - 2] * (height - h + 1))
            left = int(draws[at + _N_CROP - 1] * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _crop_affine_matrix(
    box: tuple[int, int, int, int], out_hw: tuple[int, int], src_hw: tuple[int, int],
    angle_deg: float, zoom: float, shift_xy: tuple[float, float], hflip: bool = False, vflip: bool = False,
) -> np.ndarray:
    """2x3 map from output pixel to source pixel (``WARP_INVERSE_MAP``) for "affine the tile, then resize a crop".

    Forward affine of the tile (pixel centres): ``A(p) = zoom * R(angle) (p - c) + c + t`` with ``c`` the tile centre
    and ``t`` the shift in pixels. The crop ``box`` is taken in the affined tile and resized to ``out_hw`` with the
    ``cv2.resize`` convention (pixel centres aligned), so an output pixel ``(u, v)`` samples the source at
    ``A^-1(left + (u + 0.5) cw / w - 0.5, top + (v + 0.5) ch / h - 0.5)``. ``hflip`` / ``vflip`` mirror the
    output: column ``u`` reads what column ``w - 1 - u`` would have read (row ``v``: ``h - 1 - v``).
    """
    top, left, ch, cw = box
    h, w = out_hw
    src_h, src_w = src_hw
    sx, sy = cw / w, ch / h
    # output -> crop coordinates in the affined tile: q = diag(sx, sy) u + e
    ex, ey = left + 0.5 * sx - 0.5, top + 0.5 * sy - 0.5
    # affined tile -> source: p = L^-1 (q - c - t) + c, with L = zoom * R(angle), L^-1 = R(-angle) / zoom
    a = math.radians(angle_deg)
    cos_a, sin_a = math.cos(a) / zoom, math.sin(a) / zoom
    cx, cy = (src_w - 1) / 2.0, (src_h - 1) / 2.0
    qx, qy = ex - cx - shift_xy[0] * src_w, ey - cy - shift_xy[1] * src_h
    a00, a01, a02 = cos_a * sx, sin_a * sy, cos_a * qx + sin_a * qy + cx
    a10, a11, a12 = -sin_a * sx, cos_a * sy, -sin_a * qx + cos_a * qy + cy
    if hflip:  # u -> w - 1 - u
        a02, a12, a00, a10 = a02 + a00 * (w - 1), a12 + a10 * (w - 1), -a00, -a10
    if vflip:  # v -> h - 1 - v
        a02, a12, a01, a11 = a02 + a01 * (h - 1), a12 + a11 * (h - 1), -a01, -a11
    return np.array([[a00, a01, a02], [a10, a11, a12]])


def _as_chw_float32(image: Any) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"expected an image of shape (C, H, W), got {image.shape}")
    return np.ascontiguousarray(image, dtype=np.float32)


def check_multicrop_inputs(cfg: MultiCropConfig, mean: Any, std: Any,
                           units: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Validate the settings and per-band statistics of a multi-crop pipeline (the worker and the device one):
    ``(mean, std, units)`` as float64 arrays and one unit per band; ``ValueError`` naming what is wrong."""
    cfg.validate()
    mean_a = np.asarray(mean, dtype=np.float64)
    std_a = np.asarray(std, dtype=np.float64)
    n = mean_a.shape[0] if mean_a.ndim else 0
    if mean_a.ndim != 1 or std_a.shape != (n,) or n < 1:
        raise ValueError(f"mean and std must be 1-D of equal length, got {mean_a.shape} and {std_a.shape}")
    if not np.all(std_a > 0):
        raise ValueError(f"std must be > 0 for every band, got {std_a.tolist()}")
    units = (units,) * n if isinstance(units, str) else tuple(units)
    if len(units) != n or any(u not in UNITS for u in units):
        raise ValueError(f"units must be one of {UNITS} per band ({n} bands), got {units}")
    for g in cfg.sensor_groups:
        if any(not 0 <= i < n for i in g):
            raise ValueError(f"sensor_groups index out of range for {n} bands: {g}")
    if max(cfg.sensor_dropout_p) > 0 and len(cfg.sensor_groups) < 2:
        raise ValueError("sensor_dropout_p > 0 needs at least two sensor_groups (a sensor stack, e.g. S2 + S1)")
    return mean_a, std_a, units


class MultiCropTransform:
    """``transform(sample, rng) -> [global_1, global_2, local_1, ...]``, each float32 ``(C, h, w)``, normalised.

    Args:
        cfg: crop and augmentation settings.
        mean: per-band mean in model units (length C; from the sensor spec or a stats file).
        std: per-band standard deviation in model units (length C).
        units: model units of every band (one of :data:`UNITS`), one string for all bands or one per band (e.g.
            10 x ``"reflectance"`` + 2 x ``"db"`` for an S2 + S1 stack; :func:`band_units` reads them from a
            sensor spec).
        as_tensor: return ``torch.Tensor`` crops (zero-copy views of the numpy arrays) instead of numpy arrays.

    Call with a sample dict (``{"image": (C, H, W), ...}``, numpy or torch) or an image array, and an explicit
    ``np.random.Generator``: the crops are a pure function of (image, generator state).
    """

    def __init__(
        self,
        cfg: MultiCropConfig,
        mean: Sequence[float],
        std: Sequence[float],
        units: str | Sequence[str] = "reflectance",
        as_tensor: bool = True,
    ):
        self.cfg = cfg
        self.mean, self.std, units = check_multicrop_inputs(cfg, mean, std, units)
        n = self.mean.shape[0]
        self.num_bands = n
        self.units = units
        self.is_db = np.array([u == "db" for u in units])
        self.is_sar = np.array([u in ("db", "linear") for u in units])
        self.no_gain = np.array([u == "other" for u in units])
        self.optical = np.flatnonzero([u == "reflectance" for u in units])  # the bands that may be solarised
        self.as_tensor = as_tensor
        self._interp = _INTERPOLATION[cfg.interpolation]
        # normalisation x -> x * scale + shift, per band (C, 1, 1) and, for channel_mode="normalized", as scalars
        self._scale = (1.0 / self.std).astype(np.float32)[:, None, None]
        self._shift = (-self.mean / self.std).astype(np.float32)[:, None, None]
        self._scale_n = [np.float32(v) for v in self._scale.ravel()]
        self._shift_n = [np.float32(v) for v in self._shift.ravel()]
        self._maps: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # full-size maps, see _normalisation
        # OpenCV warps more than 4 interleaved channels only with nearest or linear interpolation
        self._warp_interleaved = n <= 4 or self._interp != cv2.INTER_CUBIC
        # (kind index into the P3 probabilities, output size, scale range) of every view
        self.views: list[tuple[int, tuple[int, int], tuple[float, float]]] = [
            (0, (cfg.global_size, cfg.global_size), cfg.global_scale),
            (1, (cfg.global_size, cfg.global_size), cfg.global_scale),
        ] + [(2, (cfg.local_size, cfg.local_size), cfg.local_scale)] * cfg.local_number

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Output ``(h, w)`` of every view, in order."""
        return [size for _, size, _ in self.views]

    def __call__(self, sample: Any, rng: np.random.Generator) -> list[Any]:
        image = sample["image"] if isinstance(sample, dict) else sample
        src = _Source(_as_chw_float32(image))
        if src.chw.shape[0] != self.num_bands:
            raise ValueError(f"image has {src.chw.shape[0]} bands, the transform was built for {self.num_bands}")
        crops = [self._view(src, rng, kind, size, scale) for kind, size, scale in self.views]
        return [torch.from_numpy(c) for c in crops] if self.as_tensor else crops

    # ------------------------------------------------------------------ one view
    def _view(
        self, src: _Source, rng: np.random.Generator, kind: int, size: tuple[int, int], scale: tuple[float, float]
    ) -> np.ndarray:
        cfg = self.cfg
        n, src_h, src_w = src.chw.shape
        h, w = size
        # the view's draws, then its crop box's: one call (the same stream as two), Python floats (cheap to compare)
        u = rng.random(_N_U + _N_CROP).tolist()
        box = _crop_box(u, _N_U, src_h, src_w, scale, cfg.ratio)
        band = int(u[_U_BAND] * n) if u[_U_CHANNEL] < cfg.channel_p[kind] else None
        hflip, vflip = u[_U_HFLIP] < cfg.hflip_p[kind], u[_U_VFLIP] < cfg.vflip_p[kind]
        affine = u[_U_AFFINE] < cfg.affine_p[kind]
        blur = u[_U_BLUR] < cfg.blur_p[kind]
        # Layout: OpenCV warps and blurs interleaved (H, W, C) images about 1.7x faster than C separate planes (the
        # (C, h, w) output is then one cv2.transpose away); plain resizes are as fast per plane. Under channel
        # augmentation only the chosen band is resampled.
        interleaved = band is None and 2 <= n <= _CV_MAX_CHANNELS and (self._warp_interleaved if affine else blur)
        out = np.empty((n, h, w), np.float32)  # (C, h, w), the view returned
        # planar views of all bands are resampled straight into `out` and normalised in place
        y = None if interleaved or band is not None else out

        # 1. geometry: crop box (+ affine and flips folded into one warp), resampled to (h, w)
        if affine:
            m = _crop_affine_matrix(
                box, size, (src_h, src_w),
                angle_deg=cfg.affine_rotate * (2.0 * u[_U_ROT] - 1.0),
                zoom=cfg.affine_scale[0] + (cfg.affine_scale[1] - cfg.affine_scale[0]) * u[_U_SCALE],
                shift_xy=(cfg.affine_shift * (2.0 * u[_U_TX] - 1.0), cfg.affine_shift * (2.0 * u[_U_TY] - 1.0)),
                hflip=hflip, vflip=vflip,
            )
            flags = self._interp | cv2.WARP_INVERSE_MAP
            if interleaved:
                y = cv2.warpAffine(src.hwc, m, (w, h), flags=flags, borderMode=_BORDER)  # (h, w, C)
            else:
                planes = [band] if band is not None else range(n)
                if y is None:
                    y = np.empty((1, h, w), np.float32)  # (1, h, w): the channel-augmentation band
                for k, b in enumerate(planes):
                    cv2.warpAffine(src.chw[b], m, (w, h), dst=y[k], flags=flags, borderMode=_BORDER)
        else:
            top, left, ch, cw = box
            flip_code = _FLIP_CODE.get((hflip, vflip))
            if interleaved:
                y = cv2.resize(src.hwc[top:top + ch, left:left + cw], (w, h), interpolation=self._interp)
                if hflip and n > 4:
                    # cv2.flip copies pixels of more than 4 float32 channels one by one (~3x slower than this): flip
                    # the (h, w C) plane (pixel x <- w - 1 - x, but also band c <- C - 1 - c), then every pixel's
                    # C values back, as a (h w, C) plane. Two exact copies: bit-identical to cv2.flip.
                    flat, pixels = y.reshape(h, w * n), y.reshape(h * w, n)
                    cv2.flip(flat, flip_code, dst=flat)
                    cv2.flip(pixels, 1, dst=pixels)
                elif flip_code is not None:
                    cv2.flip(y, flip_code, dst=y)
            else:
                planes = [band] if band is not None else range(n)
                if y is None:
                    y = np.empty((1, h, w), np.float32)
                for k, b in enumerate(planes):
                    cv2.resize(src.chw[b, top:top + ch, left:left + cw], (w, h), dst=y[k], interpolation=self._interp)
                if flip_code == 1:  # horizontal only: all planes in one call, as one (C' h, w) plane
                    stack = y.reshape(-1, w)
                    cv2.flip(stack, 1, dst=stack)
                elif flip_code is not None:
                    for plane in y:
                        cv2.flip(plane, flip_code, dst=plane)
        chw = y.transpose(2, 0, 1) if interleaved else y  # (C', h, w) in model units (a view of y)

        # 2. Gaussian blur (sigma in output pixels), in place
        if blur:
            sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u[_U_SIGMA]
            radius = max(1, min(int(cfg.blur_truncate * sigma), h - 1, w - 1))
            ksize = (2 * radius + 1, 2 * radius + 1)
            for plane in [y] if interleaved else y:
                cv2.GaussianBlur(plane, ksize, sigma, dst=plane, sigmaY=sigma, borderType=_BORDER)

        # 3. SAR speckle: Gamma(L, 1/L) multiplicative noise in linear units, its log in dB
        noise_on = u[_U_NOISE] < cfg.noise_p[kind]
        if noise_on and cfg.noise == "speckle":
            looks = cfg.speckle_looks
            for k, b in enumerate([band] if band is not None else range(n)):
                if self.is_sar[b]:
                    g = rng.gamma(looks, 1.0 / looks, size=(h, w)).astype(np.float32)
                    if self.is_db[b]:
                        chw[k] += 10.0 * np.log10(np.maximum(g, np.float32(1e-12)))
                    else:
                        chw[k] *= g

        # 4. one pass: out = scale_c * x + shift_c (jitter and normalisation; broadcasts one band under channel aug)
        if u[_U_JITTER] < cfg.jitter_p[kind]:
            scale_c, shift_c = self._jitter_coefficients(chw, band, rng, u)
        elif band is not None and cfg.channel_mode == "normalized":
            scale_c, shift_c = self._scale_n[band], self._shift_n[band]  # scalars: band b's own statistics
        else:
            scale_c, shift_c = self._normalisation(h, w)
        if interleaved:  # (h, w, C) -> (C, h, w) by cv2.transpose of (h w, C): ~2x cheaper than a transposing read
            cv2.transpose(y.reshape(h * w, n), dst=out.reshape(n, h * w))
            np.multiply(out, scale_c, out=out)
        else:
            np.multiply(chw, scale_c, out=out)  # in place for planar views of all bands (chw is out)
        out += shift_c

        # 5. on normalised values: Gaussian noise, solarisation of optical bands, band and sensor dropout
        if noise_on and cfg.noise == "gaussian" and cfg.noise_std > 0:
            out += rng.standard_normal((n, h, w), dtype=np.float32) * np.float32(cfg.noise_std)
        if u[_U_SOLAR] < cfg.solarize_p[kind]:
            t = np.float32(cfg.solarize_threshold)
            if band is None:
                targets = [out] if len(self.optical) == n else [out[c] for c in self.optical]
            else:  # every output band holds band `band`: solarise all of them if it is optical
                targets = [out] if self.units[band] == "reflectance" else []
            for z in targets:
                np.subtract(2 * t, z, out=z, where=z > t)
        if n > 1 and u[_U_BDROP] < cfg.band_dropout_p[kind]:
            k_max = max(1, int(cfg.band_dropout_max * n))
            k = 1 + int(rng.integers(min(k_max, n - 1)))
            out[rng.permutation(n)[:k]] = 0.0
        if u[_U_SDROP] < cfg.sensor_dropout_p[kind]:
            group = cfg.sensor_groups[int(rng.integers(len(cfg.sensor_groups)))]
            out[list(group)] = 0.0
        return out

    def _normalisation(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, shift)`` of the normalisation for an ``(h, w)`` view: ``(C, 1, 1)``, or for views of at most
        ``_FULL_MAP_MAX_PIXELS`` pixels full ``(C, h, w)`` maps, cached (numpy's broadcast of ``(C, 1, 1)`` over
        ``(C, 56, 56)`` takes ~1.7x as long as a contiguous operand; the same products and sums)."""
        if h * w > _FULL_MAP_MAX_PIXELS:
            return self._scale, self._shift
        maps = self._maps.get((h, w))
        if maps is None:
            shape = (self.num_bands, h, w)
            maps = self._maps[(h, w)] = (np.broadcast_to(self._scale, shape).copy(),
                                         np.broadcast_to(self._shift, shape).copy())
        return maps

    def _jitter_coefficients(
        self, chw: np.ndarray, band: int | None, rng: np.random.Generator, u: list[float]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-band ``(scale, shift)`` of ``x -> (jitter(x) - mean) / std`` (definitions in the module docstring)."""
        cfg, n = self.cfg, self.num_bands
        src_band = np.full(n, band) if band is not None else np.arange(n)  # source band of each output band
        plane = np.zeros(n, dtype=np.int64) if band is not None else np.arange(n)
        if band is not None and cfg.channel_mode == "normalized":
            mu, sd = self.mean[src_band], self.std[src_band]
        else:
            mu, sd = self.mean, self.std
        gain = 1.0 + cfg.jitter_brightness * (2.0 * u[_U_GAIN] - 1.0)
        gain_c = gain * (1.0 + cfg.jitter_band * (2.0 * rng.random(n) - 1.0))
        gain_c[self.no_gain[src_band]] = 1.0
        k_c = 1.0 + cfg.jitter_contrast * (2.0 * u[_U_CONTRAST] - 1.0)
        m_c = chw.mean(axis=(1, 2), dtype=np.float64)[plane]  # the view's band means
        db = self.is_db[src_band]
        alpha = np.where(db, k_c, gain_c * k_c)
        beta = np.where(db, (1.0 - k_c) * m_c + 10.0 * np.log10(gain_c), gain_c * (1.0 - k_c) * m_c)
        scale_c = (alpha / sd).astype(np.float32)[:, None, None]
        shift_c = ((beta - mu) / sd).astype(np.float32)[:, None, None]
        return scale_c, shift_c


class _Source:
    """The input image as (C, H, W) planes, and lazily as an interleaved (H, W, C) copy for OpenCV."""

    __slots__ = ("chw", "_hwc")

    def __init__(self, chw: np.ndarray):
        self.chw = chw
        self._hwc: np.ndarray | None = None

    @property
    def hwc(self) -> np.ndarray:
        if self._hwc is None:
            c, h, w = self.chw.shape  # (C, H W) -> (H W, C): cv2.transpose, ~25% faster than cv2.merge
            self._hwc = cv2.transpose(self.chw.reshape(c, h * w)).reshape(h, w, c)
        return self._hwc


def collate_multicrop(batch: Sequence[Any]) -> Any:
    """Stack each crop position over the batch: a list of ``(B, C, h, w)`` tensors, one per crop.

    ``batch`` holds per-sample lists of crops (what :class:`MultiCropTransform` returns), or dicts with a
    ``"crops"`` list; in the latter case a dict is returned with ``"crops"`` stacked per position and the other
    keys collated by ``torch.utils.data.default_collate``.
    """
    if not batch:
        raise ValueError("empty batch")
    if isinstance(batch[0], dict):
        from torch.utils.data import default_collate

        crops = collate_multicrop([s["crops"] for s in batch])
        rest = default_collate([{k: v for k, v in s.items() if k != "crops"} for s in batch])
        return {"crops": crops, **rest}
    n = len(batch[0])
    if any(len(s) != n for s in batch):
        raise ValueError("every sample must have the same number of crops")
    return [torch.stack([torch.as_tensor(s[i]) for s in batch]) for i in range(n)]


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def render_multicrop_grid(
    crops: Sequence[Any],
    rgb: tuple[int, int, int] = (2, 1, 0),
    max_samples: int = 4,
    pad: int = 2,
    percentiles: tuple[float, float] = (2.0, 98.0),
) -> np.ndarray:
    """False-colour preview of multi-crop views: one row per sample, its crops left to right at native size.

    Args:
        crops: the views of a batch, a list of ``(B, C, h, w)`` tensors/arrays (what :func:`collate_multicrop`
            returns), or the views of one sample, a list of ``(C, h, w)``.
        rgb: band indices shown as red, green, blue (e.g. from the sensor spec's ``rgb`` band names).
        max_samples: rows shown at most.
        pad: pixels of black between crops and rows.
        percentiles: per-sample, per-channel stretch over all its crops (low/high percentile -> 0/255).

    Returns:
        ``(H, W, 3)`` uint8 image (HWC, as TensorBoard's ``add_image(..., dataformats="HWC")`` expects).
    """
    arrays = [_to_numpy(c) for c in crops]
    if not arrays:
        raise ValueError("no crops to render")
    if arrays[0].ndim == 3:
        arrays = [a[None] for a in arrays]
    n_samples = min(arrays[0].shape[0], max_samples)
    widths = [a.shape[-1] for a in arrays]
    row_h = max(a.shape[-2] for a in arrays)
    grid = np.zeros((n_samples * (row_h + pad) + pad, sum(widths) + pad * (len(arrays) + 1), 3), np.uint8)
    for r in range(n_samples):
        views = [a[r][list(rgb)] for a in arrays]  # (3, h, w) each
        flat = np.concatenate([v.reshape(3, -1) for v in views], axis=1)
        lo, hi = np.percentile(flat, percentiles, axis=1)  # (3,) each
        span = np.where(hi > lo, hi - lo, 1.0)[:, None, None]
        x0, y0 = pad, pad + r * (row_h + pad)
        for v in views:
            img = np.clip((v - lo[:, None, None]) / span * 255.0, 0, 255).astype(np.uint8).transpose(1, 2, 0)
            grid[y0:y0 + img.shape[0], x0:x0 + img.shape[1]] = img
            x0 += img.shape[1] + pad
    return grid
