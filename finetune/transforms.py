"""Joint image/mask augmentation for segmentation of multispectral and SAR tiles (numpy, any band count).

Every transform takes a sample dict (``image`` float32 ``(C, H, W)`` in model units, ``mask`` int64 ``(H, W)`` with
255 = ignore, ``valid`` bool ``(H, W)``) and an explicit ``np.random.Generator`` (see :mod:`common.sampling`), so
augmentation is deterministic per ``(seed, epoch, index)``.

Geometric transforms move image, mask and validity together; pixels created by padding are marked invalid and
ignored. Photometric transforms never clip: reflectance and dB have no [0, 1] range (Albumentations 2.x clips float
images and limits colour transforms to 1 or 3 channels, which is why these are written here). For SAR the
"strong" view uses multiplicative speckle (in the linear domain, applied as an additive term in dB) and per-band
calibration offsets instead of colour jitter.

These run per sample in the DataLoader workers (``augment.device: workers``, the default);
:mod:`finetune.device_views` makes the same views in batch on the GPU (``augment.device: cuda``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np
import torch

from common.bands import IGNORE_INDEX
from common.device_aug import AugmentDevice

__all__ = ["SegAugConfig", "StrongAugConfig", "SegmentationTransform", "MultiViewTransform", "strong_view", "normalise",
           "to_tensors"]


@dataclass(frozen=True)
class StrongAugConfig:
    """The *strong* views of semi-supervised and adaptation methods (section ``augment.strong``), applied to the
    normalised weak view of the same crop, so that every view lines up pixel for pixel with the weak one.

    Made for multispectral reflectance and SAR, not RGB photos (no colour jitter, no grayscale, nothing clipped):
    reflectance bands get a per-band gain and offset, dB bands a per-band offset (a calibration gain in linear power
    is an offset in dB) and multiplicative gamma speckle; all bands Gaussian noise, blur and band dropout."""

    gain: float = 0.2  # reflectance bands: x * U(1 - gain, 1 + gain), per band (normalised space)
    offset: float = 0.2  # per-band additive offset U(-offset, offset) in band std units (dB bands: calibration offset)
    noise_std: float = 0.05  # additive Gaussian noise in band std units
    speckle_looks: float | None = 4.0  # dB bands: gamma speckle with this many looks (null: none)
    blur_p: float = 0.3  # probability of a Gaussian blur of the view
    blur_sigma: tuple[float, float] = (0.3, 1.2)  # blur sigma range in pixels
    band_dropout_p: float = 0.1  # each band replaced by its mean (0) with this probability (at least one band kept)

    def validate(self) -> None:
        for key in ("gain", "offset", "noise_std"):
            if getattr(self, key) < 0:
                raise ValueError(f"augment.strong.{key} must be >= 0")
        if not 0 <= self.gain < 1:
            raise ValueError("augment.strong.gain must be in [0, 1)")
        for key in ("blur_p", "band_dropout_p"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"augment.strong.{key} must be in [0, 1]")
        if self.speckle_looks is not None and self.speckle_looks <= 0:
            raise ValueError("augment.strong.speckle_looks must be > 0 or null")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError("augment.strong.blur_sigma must satisfy 0 < low <= high")


@dataclass(frozen=True)
class SegAugConfig:
    """Augmentation settings of the segmentation stage (section ``augment``)."""

    crop_size: int | None = None  # random crop size in pixels (None: whole tile)
    scale_range: tuple[float, float] = (1.0, 1.0)  # random rescale before the crop (e.g. [0.75, 1.5])
    hflip: bool = True  # random horizontal flip
    vflip: bool = True  # random vertical flip (no canonical "up" in nadir imagery)
    rot90: bool = True  # random multiple-of-90-degree rotation
    brightness: float = 0.0  # per-band additive jitter, in units of the band's std (normalised space)
    contrast: float = 0.0  # per-band multiplicative jitter around 1
    noise_std: float = 0.0  # additive Gaussian noise in normalised units
    sar_speckle_looks: float | None = None  # strong SAR view: gamma speckle with this many looks (dB bands)
    strong: StrongAugConfig = field(default_factory=StrongAugConfig)  # strong views of multi-view methods
    device: AugmentDevice = "workers"  # where the views are made: workers (this module, per sample, in the loader
    #                                    workers), cuda (finetune.device_views, batched on the training device) or cpu

    def validate(self) -> None:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"augment.scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        if self.device != "workers" and hi > lo and self.crop_size is None:
            raise ValueError("augment.device: the batched views of a batch must have one size, but augment.scale_range "
                             "varies it; set augment.crop_size (or use augment.device: workers)")
        if self.crop_size is not None and self.crop_size < 8:
            raise ValueError(f"augment.crop_size must be >= 8 or null, got {self.crop_size}")
        for key in ("brightness", "contrast", "noise_std"):
            if getattr(self, key) < 0:
                raise ValueError(f"augment.{key} must be >= 0")
        if self.sar_speckle_looks is not None and self.sar_speckle_looks <= 0:
            raise ValueError("augment.sar_speckle_looks must be > 0 or null")


def normalise(image: np.ndarray, mean: np.ndarray, std: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """``(x - mean) / std`` per band; invalid pixels are set to 0 (the band mean) so nodata carries no signal."""
    out = np.subtract(image, mean[:, None, None], dtype=np.float32)
    np.divide(out, std[:, None, None], out=out, dtype=np.float32)  # in place: one output array, no temporaries
    if valid is not None:
        out[:, ~valid] = 0.0
    bad = ~np.isfinite(out)
    if bad.any():
        out[bad] = 0.0
    return out


def _resize_chw(image: np.ndarray, size: tuple[int, int], interp: int) -> np.ndarray:
    h, w = size
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
    # cv2 handles at most 512 channels in one call; split to stay safe for any band count.
    chunks = [cv2.resize(hwc[:, :, i:i + 4], (w, h), interpolation=interp) for i in range(0, hwc.shape[2], 4)]
    chunks = [c[:, :, None] if c.ndim == 2 else c for c in chunks]
    return np.concatenate(chunks, axis=2).transpose(2, 0, 1)


def to_tensors(sample: dict) -> dict:
    """numpy arrays -> torch tensors (image float32, mask int64, valid bool); other keys kept."""
    out = dict(sample)
    out["image"] = torch.from_numpy(np.ascontiguousarray(sample["image"], dtype=np.float32))
    if "mask" in sample:
        out["mask"] = torch.from_numpy(np.ascontiguousarray(sample["mask"]).astype(np.int64, copy=False))
    if "valid" in sample:
        out["valid"] = torch.from_numpy(np.ascontiguousarray(sample["valid"], dtype=bool))
    return out


class SegmentationTransform:
    """Normalise, then jointly augment image / mask / valid; returns tensors.

    Args:
        mean: per-band mean in model units, in the image's band order.
        std: per-band std in model units.
        cfg: augmentation settings; ``None`` (or ``train=False``) means normalisation only (validation).
        train: apply the random augmentations.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, cfg: SegAugConfig | None = None, train: bool = True):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        if np.any(self.std <= 0):
            raise ValueError(f"band std must be > 0, got {self.std.tolist()}")
        self.cfg = cfg or SegAugConfig()
        self.train = train and cfg is not None

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        image = np.asarray(sample["image"], dtype=np.float32)
        if image.shape[0] != len(self.mean):
            raise ValueError(f"image has {image.shape[0]} bands but the normalisation has {len(self.mean)}")
        valid = np.asarray(sample.get("valid", np.ones(image.shape[1:], bool)), dtype=bool)
        mask = sample.get("mask")
        out = dict(sample)
        if self.train and self.cfg.sar_speckle_looks is not None:
            image = self._speckle_db(image, rng)
        x = normalise(image, self.mean, self.std, valid)
        if mask is not None:
            mask = np.where(valid, mask, IGNORE_INDEX).astype(np.int64)
        if self.train:
            x, mask, valid = self._geometric(x, mask, valid, rng)
            x = self._photometric(x, valid, rng)
        out.update(image=x, valid=valid)
        if mask is not None:
            out["mask"] = mask
        return to_tensors(out)

    # -- geometric ---------------------------------------------------------------------------------------------
    def _geometric(self, x, mask, valid, rng):
        c = self.cfg
        lo, hi = c.scale_range
        if hi > lo or lo != 1.0:
            s = float(rng.uniform(lo, hi))
            h, w = x.shape[1:]
            size = (max(int(round(h * s)), 1), max(int(round(w * s)), 1))
            if size != (h, w):
                x = _resize_chw(x, size, cv2.INTER_LINEAR)
                valid = cv2.resize(valid.astype(np.uint8), size[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
                if mask is not None:
                    mask = cv2.resize(mask.astype(np.uint8), size[::-1], interpolation=cv2.INTER_NEAREST).astype(np.int64)
        if c.crop_size is not None:
            x, mask, valid = self._crop(x, mask, valid, c.crop_size, rng)
        if c.hflip and rng.random() < 0.5:
            x, valid = x[:, :, ::-1], valid[:, ::-1]
            mask = mask[:, ::-1] if mask is not None else None
        if c.vflip and rng.random() < 0.5:
            x, valid = x[:, ::-1, :], valid[::-1, :]
            mask = mask[::-1, :] if mask is not None else None
        if c.rot90:
            k = int(rng.integers(4))
            if k:
                x, valid = np.rot90(x, k, axes=(1, 2)), np.rot90(valid, k)
                mask = np.rot90(mask, k) if mask is not None else None
        x = np.ascontiguousarray(x)
        return x, (np.ascontiguousarray(mask) if mask is not None else None), np.ascontiguousarray(valid)

    @staticmethod
    def _crop(x, mask, valid, size, rng):
        c, h, w = x.shape
        ph, pw = max(size - h, 0), max(size - w, 0)
        if ph or pw:  # pad with invalid / ignored pixels
            x = np.pad(x, ((0, 0), (0, ph), (0, pw)))
            valid = np.pad(valid, ((0, ph), (0, pw)), constant_values=False)
            if mask is not None:
                mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
            h, w = h + ph, w + pw
        top = int(rng.integers(h - size + 1))
        left = int(rng.integers(w - size + 1))
        sl = (slice(top, top + size), slice(left, left + size))
        return x[:, sl[0], sl[1]], (mask[sl] if mask is not None else None), valid[sl]

    # -- photometric -------------------------------------------------------------------------------------------
    def _photometric(self, x, valid, rng):
        c = self.cfg
        nb = x.shape[0]
        if c.contrast > 0 or c.brightness > 0:
            gain = 1.0 + rng.uniform(-c.contrast, c.contrast, size=(nb, 1, 1)).astype(np.float32)
            bias = rng.uniform(-c.brightness, c.brightness, size=(nb, 1, 1)).astype(np.float32)
            x = x * gain + bias
        if c.noise_std > 0:
            x = x + rng.normal(0.0, c.noise_std, size=x.shape).astype(np.float32)
        x = x.astype(np.float32, copy=False)
        x[:, ~valid] = 0.0
        return x

    def _speckle_db(self, image, rng):
        # Multiplicative gamma speckle with L looks in linear power = additive 10*log10(G) in dB.
        looks = float(self.cfg.sar_speckle_looks)
        g = rng.gamma(looks, 1.0 / looks, size=image.shape).astype(np.float32)
        return image + 10.0 * np.log10(np.maximum(g, 1e-6))


def strong_view(x: np.ndarray, valid: np.ndarray, cfg: StrongAugConfig, units: Sequence[str], std: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """One strong view of a normalised ``(C, H, W)`` image (a new array; ``x`` is not modified).

    ``units[c]`` is ``"reflectance"``, ``"db"`` or anything else (gain/offset/noise only where meaningful) and
    ``std[c]`` the band's std in model units (speckle is drawn in dB and divided by it)."""
    nb = x.shape[0]
    units = np.asarray(units)
    refl = (units == "reflectance")[:, None, None]
    db = (units == "db")[:, None, None]
    out = x.astype(np.float32, copy=True)
    gain = np.where(refl, 1.0 + rng.uniform(-cfg.gain, cfg.gain, size=(nb, 1, 1)), 1.0).astype(np.float32)
    offset = rng.uniform(-cfg.offset, cfg.offset, size=(nb, 1, 1)).astype(np.float32)
    out = out * gain + offset
    if cfg.speckle_looks is not None and db.any():
        g = rng.gamma(cfg.speckle_looks, 1.0 / cfg.speckle_looks, size=out.shape).astype(np.float32)
        speckle = 10.0 * np.log10(np.maximum(g, 1e-6)) / np.asarray(std, np.float32)[:, None, None]
        out = out + np.where(db, speckle, 0.0).astype(np.float32)
    if cfg.noise_std > 0:
        out = out + rng.normal(0.0, cfg.noise_std, size=out.shape).astype(np.float32)
    if rng.random() < cfg.blur_p:
        sigma = float(rng.uniform(*cfg.blur_sigma))
        hwc = np.ascontiguousarray(out.transpose(1, 2, 0))
        chunks = [cv2.GaussianBlur(hwc[:, :, i:i + 4], (0, 0), sigma) for i in range(0, nb, 4)]
        out = np.concatenate([c[:, :, None] if c.ndim == 2 else c for c in chunks], axis=2).transpose(2, 0, 1)
    drop = rng.random(nb) < cfg.band_dropout_p
    if drop.all():
        drop[int(rng.integers(nb))] = False
    out[drop] = 0.0
    out = np.ascontiguousarray(out, dtype=np.float32)
    out[:, ~valid] = 0.0
    return out


class MultiViewTransform:
    """A weak view and ``n_strong`` strong views of one random crop (FixMatch / UniMatch / mean-teacher inputs).

    The weak view is :class:`SegmentationTransform` (normalisation, crop, flips, rotations, the weak photometric
    jitter); every strong view is :func:`strong_view` of it, so all views share the crop's geometry and line up
    pixel for pixel (mixing between samples, e.g. CutMix, is done by the method on the batch). Returns the weak
    sample's keys plus ``strong``: float32 ``(n_strong, C, H, W)``.
    """

    def __init__(self, weak: SegmentationTransform, strong: StrongAugConfig, n_strong: int, units: Sequence[str]):
        if n_strong < 1:
            raise ValueError("n_strong must be >= 1")
        if len(units) != len(weak.mean):
            raise ValueError(f"{len(units)} band units for {len(weak.mean)} bands")
        self.weak, self.strong, self.n_strong, self.units = weak, strong, n_strong, tuple(units)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        out = self.weak(sample, rng)
        x = out["image"].numpy()
        valid = out["valid"].numpy()
        views = [strong_view(x, valid, self.strong, self.units, self.weak.std, rng) for _ in range(self.n_strong)]
        out["strong"] = torch.from_numpy(np.stack(views))
        return out
