"""Segmentation training views on the device: the weak view (and the strong views) of a whole batch, in torch.

The batched counterpart of :class:`finetune.transforms.SegmentationTransform` (the weak view of every training stream)
and :class:`finetune.transforms.MultiViewTransform` (plus ``n_strong`` strong views for the semi-supervised
methods), used with ``augment.device: cuda`` (or ``cpu``; see :mod:`common.device_aug` for where it runs, its random
numbers and resume). Input: the decoded tiles of a batch (``image`` float32 ``(B, C, H, W)`` in model units,
``valid`` bool ``(B, H, W)``, ``mask`` int64 ``(B, H, W)`` for labelled streams, ``index``); output: what the CPU
transforms' collate gives (``image`` normalised, ``valid``, ``mask`` with 255 = ignore, ``strong`` float32
``(B, n_strong, C, h, w)``; other keys passed through). Same :class:`~finetune.transforms.SegAugConfig` /
:class:`~finetune.transforms.StrongAugConfig`, same operations in the same order, with the CPU definitions:

1. weak SAR speckle (``sar_speckle_looks``): ``x + 10 log10(G)``, ``G ~ Gamma(L, 1/L)``, every band, model units;
2. normalisation ``(x - mean) / std`` (float32); invalid and non-finite pixels -> 0, their mask -> 255;
3. geometry as one index map per sample: random rescale (``scale_range``: output side ``round(s H)``), random crop
   (``crop_size``; tiles smaller than the crop are padded at the bottom / right with 0, invalid, 255), horizontal
   flip, vertical flip, ``rot90`` (``k`` uniform in 0..3, as ``np.rot90``). The image is resampled bilinearly at
   ``cv2.resize``'s source positions (pixel centres aligned, edge replicated), ``valid`` and ``mask`` by nearest
   neighbour at ``cv2.resize``'s ``INTER_NEAREST`` index ``floor(y H / H_s)``: a mask and its image move together.
   Without a rescale the map is a permutation of whole pixels and the views equal the CPU path's exactly;
4. weak photometric jitter per band (``contrast``: gain ``1 + U(-c, c)``, ``brightness``: offset ``U(-b, b)``),
   Gaussian noise; invalid pixels -> 0;
5. each strong view of the weak one (``augment.strong``): per-band gain on reflectance bands and offset on all,
   speckle on dB bands (divided by the band's std), Gaussian noise, blur with probability ``blur_p`` (sigma
   ``U(blur_sigma)``, kernel size ``round(8 sigma + 1) | 1`` as ``cv2.GaussianBlur`` with ``ksize=(0, 0)`` on float
   images, reflect-101, radius capped at the side - 1), band dropout (each band with ``band_dropout_p``, at least one
   kept); invalid pixels -> 0. Strong views share the weak view's geometry, so they line up with it pixel for pixel.

Deviations: the random numbers (one generator per step and rank, not per sample); float sums in a different order
(~1e-6); the blur radius cap (OpenCV reflects a kernel longer than the crop again; crops are >= 8 px and the radius
of sigma 1.2 is 5). Output views of one batch must have one size: without ``crop_size`` the tiles must be of one
size and ``scale_range`` a single value (the CPU path's collate needs the same), and ``rot90`` needs square views.
``tests/test_device_views.py`` checks all of this on CPU torch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from common.bands import IGNORE_INDEX
from common.device_aug import (
    DeviceTransform,
    bilinear_gather,
    gamma_noise,
    gaussian_blur,
    gaussian_kernels,
    nearest_gather,
    uniform,
)
from finetune.transforms import SegAugConfig

__all__ = ["DeviceSegViews", "geometry_maps"]


class DeviceSegViews(DeviceTransform):
    """``transform(batch, generator) -> batch`` with the weak view (and ``n_strong`` strong views) of every sample.

    Args:
        mean, std: per-band statistics in model units (the normalisation; ``std`` also scales dB speckle).
        cfg: the ``augment`` section (``cfg.strong`` for the strong views).
        n_strong: strong views per sample (0: the weak view only, e.g. a labelled stream).
        units: per band ``"reflectance"``, ``"db"`` or anything else (needed when ``n_strong > 0``).
        device: ``"cpu"`` or ``"cuda"`` (default: ``cfg.device``).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], cfg: SegAugConfig, n_strong: int = 0,
                 units: Sequence[str] = (), device: str | None = None):
        device = device or cfg.device
        if device == "workers":
            raise ValueError("augment.device=workers runs finetune.transforms in the loader workers")
        super().__init__(device)  # type: ignore[arg-type]
        cfg.validate()
        cfg.strong.validate()
        self.mean = torch.tensor(np.asarray(mean, dtype=np.float32))
        self.std = torch.tensor(np.asarray(std, dtype=np.float32))
        if (self.std <= 0).any():
            raise ValueError(f"band std must be > 0, got {self.std.tolist()}")
        if n_strong < 0 or (n_strong and len(units) != len(self.mean)):
            raise ValueError(f"n_strong >= 0 with one unit per band, got {n_strong} and {len(units)} units for "
                             f"{len(self.mean)} bands")
        self.cfg, self.n_strong, self.units = cfg, n_strong, tuple(units)
        self.reflectance = torch.tensor([u == "reflectance" for u in self.units], dtype=torch.bool)
        self.db = torch.tensor([u == "db" for u in self.units], dtype=torch.bool)
        self._tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._tables:
            self._tables[device] = {k: getattr(self, k).to(device) for k in ("mean", "std", "reflectance", "db")}
        return self._tables[device]

    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        cfg, g = self.cfg, generator
        dev = g.device
        t = self._on(dev)
        x = batch["image"].to(device=dev, dtype=torch.float32)
        b, n, height, width = x.shape
        if n != len(self.mean):
            raise ValueError(f"image has {n} bands but the normalisation has {len(self.mean)}")
        valid = batch["valid"].to(dev).bool() if "valid" in batch else torch.ones(b, height, width, device=dev,
                                                                                   dtype=torch.bool)
        mask = batch.get("mask")
        # 1. weak SAR speckle, model units; 2. normalisation, nodata -> 0 (ignored in the mask)
        if cfg.sar_speckle_looks is not None:
            x = x + 10.0 * torch.log10(gamma_noise(x.shape, cfg.sar_speckle_looks, g).clamp_min(1e-6))
        z = (x - t["mean"][:, None, None]) / t["std"][:, None, None]
        z = torch.where(valid[:, None] & torch.isfinite(z), z, torch.zeros((), device=dev))
        if mask is not None:
            mask = torch.where(valid, mask.to(dev).long(), IGNORE_INDEX)
        # 3. geometry: rescale, crop (padding invalid), flips, rot90 as one map per sample
        ys, xs, yi, xi, inside = geometry_maps(cfg, b, height, width, g)
        z = torch.where(inside[:, None], bilinear_gather(z, ys, xs), torch.zeros((), device=dev))
        valid = nearest_gather(valid, yi, xi) & inside
        if mask is not None:
            mask = torch.where(inside, nearest_gather(mask, yi, xi), IGNORE_INDEX)
        # 4. weak photometric jitter and noise; nodata -> 0
        if cfg.contrast > 0 or cfg.brightness > 0:
            gain = 1.0 + (cfg.contrast * (2.0 * uniform((b, n), g) - 1.0)).float()
            bias = (cfg.brightness * (2.0 * uniform((b, n), g) - 1.0)).float()
            z = z * gain[:, :, None, None] + bias[:, :, None, None]
        if cfg.noise_std > 0:
            z = z + torch.randn(z.shape, generator=g, device=dev) * np.float32(cfg.noise_std)
        z = z.masked_fill(~valid[:, None], 0.0)
        out = {**batch, "image": z, "valid": valid}
        if mask is not None:
            out["mask"] = mask
        # 5. strong views of the weak one
        if self.n_strong:
            out["strong"] = self._strong(z, valid, g)
        return out

    def _strong(self, z: torch.Tensor, valid: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        s, t = self.cfg.strong, self._on(z.device)
        b, n, h, w = z.shape
        rows = b * self.n_strong  # sample-major: row i * n_strong + k is strong view k of sample i
        x = z[:, None].expand(b, self.n_strong, n, h, w).reshape(rows, n, h, w)
        v = valid[:, None].expand(b, self.n_strong, h, w).reshape(rows, 1, h, w)
        u = uniform((rows, 3), g)  # blur?, sigma, the band kept when all would be dropped
        gain = torch.where(t["reflectance"], 1.0 + s.gain * (2.0 * uniform((rows, n), g) - 1.0), 1.0).float()
        offset = (s.offset * (2.0 * uniform((rows, n), g) - 1.0)).float()
        drop = uniform((rows, n), g) < s.band_dropout_p
        x = x * gain[:, :, None, None] + offset[:, :, None, None]
        if s.speckle_looks is not None and bool(self.db.any()):
            speckle = 10.0 * torch.log10(gamma_noise(x.shape, s.speckle_looks, g).clamp_min(1e-6))
            x = x + torch.where(t["db"][:, None, None], speckle / t["std"][:, None, None], 0.0)
        if s.noise_std > 0:
            x = x + torch.randn(x.shape, generator=g, device=x.device) * np.float32(s.noise_std)
        if s.blur_p > 0:
            blur = u[:, 0] < s.blur_p
            sigma = s.blur_sigma[0] + (s.blur_sigma[1] - s.blur_sigma[0]) * u[:, 1]
            cap = max(1, min(h, w) - 1)
            ksize = torch.round(sigma * 8.0 + 1.0).long() | 1  # cv2.GaussianBlur's size for float images
            radius = torch.where(blur, ((ksize - 1) // 2).clamp(1, cap), torch.zeros_like(ksize))
            r_max = min(max(1, (int(round(s.blur_sigma[1] * 8.0 + 1.0)) | 1) // 2), cap)
            x = torch.where(blur[:, None, None, None], gaussian_blur(x, gaussian_kernels(sigma, radius, r_max)), x)
        keep = torch.floor(u[:, 2] * n).long().clamp_max(n - 1)
        all_dropped = drop.all(dim=1, keepdim=True)
        drop = drop & ~(all_dropped & (torch.arange(n, device=x.device) == keep[:, None]))
        x = x.masked_fill(drop[:, :, None, None] | ~v, 0.0)
        return x.view(b, self.n_strong, n, h, w)


def geometry_maps(cfg: SegAugConfig, b: int, height: int, width: int, g: torch.Generator):
    """The weak view's geometry of ``b`` tiles of ``height x width``: for every output pixel the bilinear source
    coordinates ``ys, xs`` (float64), the nearest source pixel ``yi, xi`` (int64) and whether it lies inside the
    (rescaled) tile rather than in the crop's padding, each ``(B, h, w)``."""
    dev = g.device
    u = uniform((b, 6), g)  # scale, top, left, hflip, vflip, rot90
    lo, hi = cfg.scale_range
    if hi > lo or lo != 1.0:
        s = lo + (hi - lo) * u[:, 0]
        hs = torch.round(height * s).clamp_min(1)
        ws = torch.round(width * s).clamp_min(1)
    else:
        hs = torch.full((b,), float(height), dtype=torch.float64, device=dev)
        ws = torch.full((b,), float(width), dtype=torch.float64, device=dev)
    if cfg.crop_size is not None:
        oh = ow = cfg.crop_size
        top = torch.floor(u[:, 1] * (torch.clamp_min(hs, oh) - oh + 1))
        left = torch.floor(u[:, 2] * (torch.clamp_min(ws, ow) - ow + 1))
    else:
        if hi > lo:
            raise ValueError("augment.scale_range varies the tile size: the batched views need augment.crop_size")
        oh, ow = int(hs[0]), int(ws[0])
        top = left = torch.zeros(b, dtype=torch.float64, device=dev)
    if cfg.rot90 and oh != ow:
        raise ValueError(f"augment.rot90 on {oh} x {ow} views: the batched views need square views (set "
                         f"augment.crop_size)")
    i = torch.arange(oh, device=dev, dtype=torch.float64)[None, :, None].expand(b, oh, ow)
    j = torch.arange(ow, device=dev, dtype=torch.float64)[None, None, :].expand(b, oh, ow)
    # inverse of rot90 (k quarter turns anticlockwise, np.rot90): output (i, j) <- flipped view (i1, j1)
    if cfg.rot90:
        k = torch.floor(u[:, 5] * 4).long().clamp_max(3)[:, None, None]
        last = oh - 1
        i1 = torch.where(k == 0, i, torch.where(k == 1, j, torch.where(k == 2, last - i, last - j)))
        j1 = torch.where(k == 0, j, torch.where(k == 1, last - i, torch.where(k == 2, last - j, i)))
        i, j = i1, j1
    if cfg.vflip:
        i = torch.where((u[:, 4] < 0.5)[:, None, None], oh - 1 - i, i)
    if cfg.hflip:
        j = torch.where((u[:, 3] < 0.5)[:, None, None], ow - 1 - j, j)
    yr = top[:, None, None] + i  # pixel of the rescaled (padded) tile
    xr = left[:, None, None] + j
    inside = (yr < hs[:, None, None]) & (xr < ws[:, None, None])
    # cv2.resize: linear at (y + 0.5) H / H_s - 0.5, nearest at floor(y H / H_s); scale = 1 / (H_s / H) as OpenCV
    sy = (1.0 / (hs / height))[:, None, None]
    sx = (1.0 / (ws / width))[:, None, None]
    ys = (yr + 0.5) * sy - 0.5
    xs = (xr + 0.5) * sx - 0.5
    yi = torch.floor(yr * sy).long().clamp(0, height - 1)
    xi = torch.floor(xr * sx).long().clamp(0, width - 1)
    return ys, xs, yi, xi, inside
