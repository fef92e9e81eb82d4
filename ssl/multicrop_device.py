"""DINO's multispectral multi-crop on the training device: the views of a whole batch at once, in torch.

The batched counterpart of :class:`eo_ssl.multicrop.MultiCropTransform` (``augment.device: cuda`` or ``cpu``; see
:mod:`common.device_aug` for where it runs, its random numbers and resume). It takes the decoded tiles of a batch
(``{"image": (B, C, H, W) float32 in model units, ...}``, what :func:`common.device_aug.collate_decoded` gives) and
returns what :func:`eo_ssl.multicrop.collate_multicrop` gives for the CPU pipeline: the list of ``2 + N`` views,
``(B, C, h, w)`` float32 each, globals first. Same :class:`~eo_ssl.multicrop.MultiCropConfig`, same per-view
probabilities (global 1, global 2, local), same operations in the same order, with the CPU path's definitions (its
module docstring has them):

==================================  ====================================================================================
CPU pipeline (per sample)           here (per batch: all views of one size in one pass, ``R = views x B`` rows)
==================================  ====================================================================================
crop box (``_crop_box``)            :func:`common.device_aug.sample_crop_boxes` (the same arithmetic, vectorised)
crop + affine + flips, one warp     one 2x3 map per row (``_affine_maps``: the formula of ``_crop_affine_matrix``),
(``cv2.warpAffine`` / ``resize``)   one ``grid_sample`` for all rows (:func:`common.device_aug.affine_resample`):
                                    reflect-101 border for affine views, crop edge replicated for plain crops
channel augmentation                every output band gathers band ``b`` after resampling (resampling is per band, so
                                    this equals resampling band ``b`` alone)
Gaussian blur, radius               separable per-row kernels, radius ``max(1, min(int(truncate sigma), h-1, w-1))``,
``int(truncate sigma)``             reflect-101 (:func:`common.device_aug.gaussian_blur`)
speckle on SAR bands                Gamma(L, 1/L) (:func:`common.device_aug.gamma_noise`); one plane per row under
                                    channel augmentation, as the CPU path (it speckles the one band it broadcasts)
jitter + normalisation              the same per-band ``(scale, shift)`` (float64, then float32), band means of the
                                    view after blur and speckle
Gaussian noise, solarisation,       the same, on normalised values; band dropout draws ``k`` uniformly in
band / sensor dropout               ``1..min(max(1, int(max n)), n - 1)`` and a random subset of ``k`` bands
==================================  ====================================================================================

Deviations (documented, small): the random numbers differ (one generator per step and rank, not per sample); bilinear
and bicubic ``grid_sample`` interpolate at exact positions where ``cv2.warpAffine`` quantises to 1/32 px for 2 or
>= 5 interleaved bands; ``interpolation: nearest`` takes the nearest pixel centre where ``cv2.resize``'s
``INTER_NEAREST`` floors the scaled index; float sums (blur, band means) are ordered differently (~1e-6).
``tests/test_device_aug.py`` compares the pixels with OpenCV given the same parameters, and the parameters'
distributions with the configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from common.device_aug import (
    N_CROP_DRAWS,
    DeviceTransform,
    affine_resample,
    gamma_noise,
    gaussian_blur,
    gaussian_kernels,
    sample_crop_boxes,
    uniform,
)
from eo_ssl.multicrop import MultiCropConfig, check_multicrop_inputs

__all__ = ["DeviceMultiCrop", "ViewParams"]

# Columns of the block of uniform draws of every row (then N_CROP_DRAWS for its crop box).
(_U_HFLIP, _U_VFLIP, _U_AFFINE, _U_ROT, _U_SCALE, _U_TX, _U_TY, _U_BLUR, _U_SIGMA, _U_SOLAR, _U_CHANNEL, _U_BAND,
 _U_JITTER, _U_GAIN, _U_CONTRAST, _U_NOISE, _U_BDROP, _U_BDROP_K, _U_SDROP, _U_SDROP_G) = range(20)
_N_U = 20
_GRID_MODE = {"nearest": "nearest", "linear": "bilinear", "cubic": "bicubic"}


@dataclass
class ViewParams:
    """The random parameters of ``R = V x B`` rows (views of one size, view-major: row ``v B + b`` is view ``v`` of
    sample ``b``), drawn by :meth:`DeviceMultiCrop.sample`. Booleans say whether an operation is applied."""

    box: torch.Tensor  # (R, 4) int64 top, left, height, width of the crop in the tile
    hflip: torch.Tensor  # (R,) bool
    vflip: torch.Tensor
    affine: torch.Tensor  # (R,) bool; then angle (degrees), zoom, shift (fraction of the side) below
    angle: torch.Tensor
    zoom: torch.Tensor
    shift: torch.Tensor  # (R, 2) x, y
    blur: torch.Tensor
    sigma: torch.Tensor  # (R,) float64, in output pixels
    radius: torch.Tensor  # (R,) int64 kernel radius (0 where no blur)
    channel: torch.Tensor  # (R,) bool: channel augmentation
    src_band: torch.Tensor  # (R, C) int64: the input band of every output band
    jitter: torch.Tensor
    gain: torch.Tensor  # (R, C) float64 per-band gain g_c
    contrast: torch.Tensor  # (R,) float64 contrast factor k
    noise: torch.Tensor  # (R,) bool: Gaussian noise or speckle (cfg.noise)
    solarize: torch.Tensor
    drop: torch.Tensor  # (R, C) bool: bands zeroed by band or sensor dropout


class DeviceMultiCrop(DeviceTransform):
    """``transform(batch, generator) -> [global_1, global_2, local_1, ...]``, each ``(B, C, h, w)`` float32.

    Args:
        cfg: crop and augmentation settings (``cfg.device`` is where it runs unless ``device`` is given).
        mean, std, units: per band, as :class:`eo_ssl.multicrop.MultiCropTransform`.
        device: ``"cpu"`` or ``"cuda"`` (default: ``cfg.device``).
    """

    def __init__(self, cfg: MultiCropConfig, mean: Sequence[float], std: Sequence[float],
                 units: str | Sequence[str] = "reflectance", device: str | None = None):
        device = device or cfg.device
        if device == "workers":
            raise ValueError("augment.device=workers runs eo_ssl.multicrop.MultiCropTransform in the loader workers")
        super().__init__(device)  # type: ignore[arg-type]
        self.cfg = cfg
        mean_a, std_a, units = check_multicrop_inputs(cfg, mean, std, units)
        n = mean_a.shape[0]
        self.num_bands = n
        self.units = units
        self.mean = torch.from_numpy(mean_a)
        self.std = torch.from_numpy(std_a)
        self.is_db = torch.tensor([u == "db" for u in units])
        self.is_sar = torch.tensor([u in ("db", "linear") for u in units])
        self.no_gain = torch.tensor([u == "other" for u in units])
        self.optical = torch.tensor([u == "reflectance" for u in units])
        groups = torch.zeros(max(len(cfg.sensor_groups), 1), n, dtype=torch.bool)
        for i, g in enumerate(cfg.sensor_groups):
            groups[i, list(g)] = True
        self.groups = groups
        # (kinds of the views, output size, scale range) of each size group: the two globals, then the locals
        self.view_groups: list[tuple[tuple[int, ...], tuple[int, int], tuple[float, float]]] = [
            ((0, 1), (cfg.global_size, cfg.global_size), cfg.global_scale)]
        if cfg.local_number:
            self.view_groups.append(((2,) * cfg.local_number, (cfg.local_size, cfg.local_size), cfg.local_scale))
        self._tables: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._kind_rows: dict[tuple, torch.Tensor] = {}

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Output ``(h, w)`` of every view, in order."""
        return [size for kinds, size, _ in self.view_groups for _ in kinds]

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The per-band tables on ``device`` (copied once per device)."""
        if device not in self._tables:
            self._tables[device] = {k: getattr(self, k).to(device) for k in (
                "mean", "std", "is_db", "is_sar", "no_gain", "optical", "groups")}
        return self._tables[device]

    def _kinds(self, kinds: tuple[int, ...], batch_size: int, device: torch.device) -> torch.Tensor:
        """The kind of every row, made once per (views, batch size, device): a tensor built from a Python list is a
        host-to-device copy, which would wait for the GPU's queued work (no overlap with the previous step)."""
        key = (kinds, batch_size, device)
        if key not in self._kind_rows:
            self._kind_rows[key] = torch.tensor(kinds, dtype=torch.long).repeat_interleave(batch_size).to(device)
        return self._kind_rows[key]

    # ------------------------------------------------------------------ the transform
    def __call__(self, batch: Any, generator: torch.Generator) -> list[torch.Tensor]:
        x = batch["image"] if isinstance(batch, dict) else batch
        if x.dim() != 4 or x.shape[1] != self.num_bands:
            raise ValueError(f"expected a (B, {self.num_bands}, H, W) batch, got {tuple(x.shape)}")
        x = x.to(device=generator.device, dtype=torch.float32)
        views: list[torch.Tensor] = []
        for kinds, size, scale in self.view_groups:
            params = self.sample(x.shape[0], x.shape[-2:], kinds, size, scale, generator)
            views += list(self.apply(x, params, size, generator).unbind(0))
        return views

    def sample(self, batch_size: int, tile_hw: Sequence[int], kinds: Sequence[int], size: tuple[int, int],
               scale: tuple[float, float], generator: torch.Generator) -> ViewParams:
        """Draw the parameters of ``len(kinds)`` views of every sample (``kinds``: 0 / 1 / 2 = global 1 / global 2 /
        local, the index into the config's probability triples)."""
        cfg, n, dev = self.cfg, self.num_bands, generator.device
        tables = self._on(dev)
        height, width = int(tile_hw[0]), int(tile_hw[1])
        h, w = size
        rows = len(kinds) * batch_size

        kind = self._kinds(tuple(kinds), batch_size, dev)  # (R,) 0 / 1 / 2 of every row

        u = uniform((rows, _N_U + N_CROP_DRAWS), generator)

        def prob(p3: tuple[float, float, float]) -> torch.Tensor:  # (R,) float64 probability of every row
            return torch.where(kind == 0, p3[0], torch.where(kind == 1, p3[1], torch.full_like(u[:, 0], p3[2])))

        u_band = uniform((rows, n), generator)  # per-band gain draws (jitter)
        u_perm = uniform((rows, n), generator)  # random order of the bands (band dropout)
        top, left, ch, cw = sample_crop_boxes(u[:, _N_U:], height, width, scale, cfg.ratio)

        def on(col: int, p3: tuple[float, float, float]) -> torch.Tensor:
            return u[:, col] < prob(p3)

        channel = on(_U_CHANNEL, cfg.channel_p)
        band = torch.floor(u[:, _U_BAND] * n).long().clamp_max(n - 1)
        src_band = torch.where(channel[:, None], band[:, None], torch.arange(n, device=dev)[None, :])
        blur = on(_U_BLUR, cfg.blur_p)
        sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u[:, _U_SIGMA]
        radius = torch.floor(cfg.blur_truncate * sigma).long().clamp(1, max(1, min(h - 1, w - 1)))
        radius = torch.where(blur, radius, torch.zeros_like(radius))
        gain = 1.0 + cfg.jitter_brightness * (2.0 * u[:, _U_GAIN] - 1.0)
        gain_c = gain[:, None] * (1.0 + cfg.jitter_band * (2.0 * u_band - 1.0))
        gain_c = torch.where(tables["no_gain"][src_band], torch.ones_like(gain_c), gain_c)
        drop = torch.zeros(rows, n, dtype=torch.bool, device=dev)
        if n > 1 and max(cfg.band_dropout_p) > 0:
            k_max = min(max(1, int(cfg.band_dropout_max * n)), n - 1)
            k = 1 + torch.floor(u[:, _U_BDROP_K] * k_max).long().clamp_max(k_max - 1)
            rank = u_perm.argsort(dim=1).argsort(dim=1)  # a uniformly random order of the bands
            drop |= on(_U_BDROP, cfg.band_dropout_p)[:, None] & (rank < k[:, None])
        if max(cfg.sensor_dropout_p) > 0:
            n_groups = len(cfg.sensor_groups)
            group = torch.floor(u[:, _U_SDROP_G] * n_groups).long().clamp_max(n_groups - 1)
            drop |= on(_U_SDROP, cfg.sensor_dropout_p)[:, None] & tables["groups"][group]
        return ViewParams(
            box=torch.stack([top, left, ch, cw], dim=1),
            hflip=on(_U_HFLIP, cfg.hflip_p), vflip=on(_U_VFLIP, cfg.vflip_p),
            affine=on(_U_AFFINE, cfg.affine_p),
            angle=cfg.affine_rotate * (2.0 * u[:, _U_ROT] - 1.0),
            zoom=cfg.affine_scale[0] + (cfg.affine_scale[1] - cfg.affine_scale[0]) * u[:, _U_SCALE],
            shift=cfg.affine_shift * (2.0 * u[:, _U_TX:_U_TY + 1] - 1.0),
            blur=blur, sigma=sigma, radius=radius,
            channel=channel, src_band=src_band,
            jitter=on(_U_JITTER, cfg.jitter_p), gain=gain_c,
            contrast=1.0 + cfg.jitter_contrast * (2.0 * u[:, _U_CONTRAST] - 1.0),
            noise=on(_U_NOISE, cfg.noise_p), solarize=on(_U_SOLAR, cfg.solarize_p), drop=drop,
        )

    def apply(self, x: torch.Tensor, p: ViewParams, size: tuple[int, int],
              generator: torch.Generator) -> torch.Tensor:
        """The views ``(V, B, C, h, w)`` of the tiles ``x`` ``(B, C, H, W)`` for parameters ``p`` (pixel noise is
        drawn from ``generator``)."""
        cfg, dev = self.cfg, x.device
        tables = self._on(dev)
        b, n, height, width = x.shape
        h, w = size
        rows = p.box.shape[0]
        n_views = rows // b

        # 1. geometry: crop (+ affine) + flips as one map per row, one resampling for all rows
        maps = _affine_maps(p, (h, w), (height, width))  # (R, 2, 3) float64
        top, left, ch, cw = p.box.to(torch.float64).unbind(1)
        boxes = torch.stack([left, top, left + cw - 1, top + ch - 1], dim=1)
        boxes = torch.where(p.affine[:, None], torch.full_like(boxes, float("nan")), boxes)
        y = affine_resample(x, maps.view(n_views, b, 2, 3), (h, w), _GRID_MODE[cfg.interpolation],
                            clamp_boxes=boxes.view(n_views, b, 4)).view(rows, n, h, w)

        # 2. channel augmentation: every output band holds the chosen band
        if max(cfg.channel_p) > 0:
            y = y[torch.arange(rows, device=dev)[:, None], p.src_band]  # (R, C, h, w), indexed by (R, C) only

        # 3. Gaussian blur (sigma in output pixels; rows without blur keep their values)
        if max(cfg.blur_p) > 0:
            r_max = max(1, min(int(cfg.blur_truncate * cfg.blur_sigma[1]), h - 1, w - 1))
            blurred = gaussian_blur(y, gaussian_kernels(p.sigma, p.radius, r_max))
            y = torch.where(p.blur[:, None, None, None], blurred, y)

        # 4. SAR speckle: Gamma(L, 1/L) x in linear units, + 10 log10(G) in dB; one plane per channel-aug row
        src = p.src_band
        if cfg.noise == "speckle" and max(cfg.noise_p) > 0 and bool(self.is_sar.any()):
            g = gamma_noise((rows, n, h, w), cfg.speckle_looks, generator)
            if max(cfg.channel_p) > 0:
                g = torch.where(p.channel[:, None, None, None], g[:, :1].expand(rows, n, h, w), g)
            sar = (p.noise[:, None] & tables["is_sar"][src])[:, :, None, None]
            db = tables["is_db"][src][:, :, None, None]
            speckled = torch.where(db, y + 10.0 * torch.log10(g.clamp_min(1e-12)), y * g)
            y = torch.where(sar, speckled, y)

        # 5. jitter and normalisation: z = scale_c x + shift_c (per row and band)
        if cfg.channel_mode == "normalized":
            mu = torch.where(p.channel[:, None], tables["mean"][src], tables["mean"][None, :])
            sd = torch.where(p.channel[:, None], tables["std"][src], tables["std"][None, :])
        else:
            mu, sd = tables["mean"][None, :].expand(rows, n), tables["std"][None, :].expand(rows, n)
        alpha = torch.ones(rows, n, dtype=torch.float64, device=dev)
        beta = torch.zeros(rows, n, dtype=torch.float64, device=dev)
        if max(cfg.jitter_p) > 0:
            k = p.contrast[:, None]
            m_c = y.to(torch.float64).mean(dim=(2, 3))  # (R, C) the view's band means
            db = tables["is_db"][src]
            a_j = torch.where(db, k.expand(rows, n), p.gain * k)
            b_j = torch.where(db, (1.0 - k) * m_c + 10.0 * torch.log10(p.gain), p.gain * (1.0 - k) * m_c)
            alpha = torch.where(p.jitter[:, None], a_j, alpha)
            beta = torch.where(p.jitter[:, None], b_j, beta)
        scale = (alpha / sd).to(torch.float32)[:, :, None, None]
        shift = ((beta - mu) / sd).to(torch.float32)[:, :, None, None]
        z = y * scale + shift

        # 6. on normalised values: Gaussian noise, solarisation of optical bands, band and sensor dropout
        if cfg.noise == "gaussian" and cfg.noise_std > 0 and max(cfg.noise_p) > 0:
            eps = torch.randn(rows, n, h, w, generator=generator, device=dev, dtype=torch.float32)
            z = torch.where(p.noise[:, None, None, None], z + eps * np.float32(cfg.noise_std), z)
        if max(cfg.solarize_p) > 0:
            t = float(np.float32(cfg.solarize_threshold))
            on = (p.solarize[:, None] & tables["optical"][src])[:, :, None, None]
            z = torch.where(on & (z > t), 2.0 * t - z, z)
        if max(cfg.band_dropout_p) > 0 or max(cfg.sensor_dropout_p) > 0:
            z = z.masked_fill(p.drop[:, :, None, None], 0.0)
        return z.view(n_views, b, n, h, w)


def _affine_maps(p: ViewParams, out_hw: tuple[int, int], src_hw: tuple[int, int]) -> torch.Tensor:
    """``(R, 2, 3)`` float64 maps output pixel -> source pixel: :func:`eo_ssl.multicrop._crop_affine_matrix`
    vectorised (rows without the affine use angle 0, zoom 1, no shift: the plain ``cv2.resize`` of the crop)."""
    top, left, ch, cw = p.box.to(torch.float64).unbind(1)
    h, w = out_hw
    src_h, src_w = src_hw
    sx, sy = cw / w, ch / h
    ex, ey = left + 0.5 * sx - 0.5, top + 0.5 * sy - 0.5
    angle = torch.where(p.affine, p.angle, torch.zeros_like(p.angle)) * (math.pi / 180.0)
    zoom = torch.where(p.affine, p.zoom, torch.ones_like(p.zoom))
    shift = torch.where(p.affine[:, None], p.shift, torch.zeros_like(p.shift))
    cos_a, sin_a = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    cx, cy = (src_w - 1) / 2.0, (src_h - 1) / 2.0
    qx, qy = ex - cx - shift[:, 0] * src_w, ey - cy - shift[:, 1] * src_h
    a00, a01, a02 = cos_a * sx, sin_a * sy, cos_a * qx + sin_a * qy + cx
    a10, a11, a12 = -sin_a * sx, cos_a * sy, -sin_a * qx + cos_a * qy + cy
    hf, vf = p.hflip, p.vflip  # u -> w - 1 - u, v -> h - 1 - v
    a02, a12 = torch.where(hf, a02 + a00 * (w - 1), a02), torch.where(hf, a12 + a10 * (w - 1), a12)
    a00, a10 = torch.where(hf, -a00, a00), torch.where(hf, -a10, a10)
    a02, a12 = torch.where(vf, a02 + a01 * (h - 1), a02), torch.where(vf, a12 + a11 * (h - 1), a12)
    a01, a11 = torch.where(vf, -a01, a01), torch.where(vf, -a11, a11)
    return torch.stack([torch.stack([a00, a01, a02], 1), torch.stack([a10, a11, a12], 1)], 1)
