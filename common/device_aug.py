"""Augmentation on the training device: batched torch building blocks shared by DINO's multi-crop
(:mod:`eo_ssl.multicrop_device`) and the segmentation views (:mod:`finetune.device_views`).

Why (issue #13, "Scale out"): on a GPU the per-sample numpy/OpenCV pipelines in the DataLoader workers are the
bottleneck (DINO at batch 128 with 8 workers on an H200: full step 5.86x the networks' own time). With
``augment.device: cuda`` the workers only decode and convert tiles (:class:`DecodedTiles`, :func:`collate_decoded`);
the engine moves each batch to the GPU and applies the stream's :class:`DeviceTransform` there, all samples of a
batch at once, before the method's ``training_step`` (:attr:`common.engine.LoaderSpec.device_transform`). The method
receives exactly what the CPU pipeline's collate gives it (DINO: the list of views; segmentation: ``image``,
``mask``, ``valid``, ``strong``), so no method changes.

``augment.device`` (:data:`AUGMENT_DEVICES`):

* ``workers`` (default): the per-sample CPU pipelines in the DataLoader workers, unchanged;
* ``cuda``: the batched path on the training device; on a run without CUDA it runs on the CPU (the engine prints a
  note), i.e. the same as ``cpu``;
* ``cpu``: the batched path on the CPU, in the training process (for tests and comparisons; on a GPU run the
  decoded batch is copied back to the CPU first, so prefer ``workers`` or ``cuda`` there).

Determinism and resume: every random number of a batch comes from one ``torch.Generator`` on the augmentation's
device that the engine seeds by ``(trainer.seed, step, micro-batch, rank, stream)``
(:meth:`common.method.StepContext.generator`, stream ``DEVICE_TRANSFORM_STREAM + loader index``). A resumed run
sees the same batches at the same steps (the data order is a pure function of seed and epoch), so it draws the same
augmentations and ends with the same weights. Unlike the worker path (one stream per ``(seed, epoch, index)``), a
sample's augmentation depends on its step and rank, not on its index, and CPU and CUDA generators give different
numbers: runs are reproducible per device, and the two paths draw from the same *distributions*, not the same
values (``tests/test_device_aug.py`` checks the distributions and, given the parameters, the pixels).

Library choice: Kornia 0.9 (``kornia.augmentation``) was checked op by op and not used. Its
``RandomResizedCrop`` crops and resizes but cannot fold the affine transform and the flips into the same
resampling, nor use reflect-101 borders for the affine only; ``gaussian_blur2d`` takes per-sample sigmas but one
kernel size for the batch (the CPU path's kernel radius is ``int(truncate * sigma)`` per view);
``RandomSolarize`` / ``kornia.enhance.solarize`` work on [0, 1] images (``x -> 1 - x``, thresholds and additions
clamped to [0, 1]), which is wrong for normalised reflectance; ``ColorJiggle`` / ``ColorJitter`` need 3 channels
(hue, saturation); there is no Gamma speckle. Everything here is plain torch (``grid_sample``, grouped
``conv2d``, gathers): ~250 lines, any band count, nothing clipped, and no extra package on the GPU machines.

GPU notes: the transforms make no host-device round trip per batch (per-band tables and per-view row tables are
copied to the device once; decisions are tensors, not Python branches on device values), so the CPU queues the
augmentation of the next batch while the GPU still runs the previous step. The exception is speckle with a
fractional number of looks (see :func:`gamma_noise`). Batches come from pinned memory (the engine's loaders pin on
CUDA) and are copied with ``non_blocking``; on a CPU run both are skipped.

Building blocks:

* :func:`sample_crop_boxes`: torchvision's ``RandomResizedCrop.get_params`` (10 attempts, centre-crop fallback),
  vectorised over the batch, on the same uniform draws as :func:`eo_ssl.multicrop.sample_crop_box`;
* :func:`affine_resample`: one ``grid_sample`` per batch from per-sample 2x3 maps "output pixel -> source pixel"
  (crop, resize, affine and flips in one interpolation), reflect-101 borders (``padding_mode="reflection"`` with
  ``align_corners=True`` reflects about the edge pixels' centres, as OpenCV's ``BORDER_REFLECT_101``); several views
  of the same size share one call (their grids stacked along the output height);
* :func:`gaussian_blur`: separable blur with a per-sample kernel (sigma and radius), zero taps beyond each sample's
  radius, reflect-101 padding to the largest radius;
* :func:`gamma_noise`: Gamma(L, 1/L) speckle drawn with a generator (Marsaglia-Tsang; ``torch.distributions.Gamma``
  takes no generator);
* :func:`bilinear_gather` / :func:`nearest_gather`: resampling at explicit source coordinates with OpenCV
  ``resize``'s conventions (edge replicated), exact when the coordinates are whole pixels (crops, flips, rot90).
"""

from __future__ import annotations

import abc
import math
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from common.errors import UserInputError

__all__ = [
    "AUGMENT_DEVICES",
    "AugmentDevice",
    "DeviceTransform",
    "DecodedTiles",
    "collate_decoded",
    "sample_crop_boxes",
    "affine_resample",
    "gaussian_kernels",
    "gaussian_blur",
    "gamma_noise",
    "bilinear_gather",
    "nearest_gather",
    "uniform",
]

AugmentDevice = Literal["workers", "cpu", "cuda"]
AUGMENT_DEVICES: tuple[str, ...] = ("workers", "cpu", "cuda")
"""Where training augmentations run (``augment.device``): DataLoader workers (per sample, numpy/OpenCV), or batched
in torch on the CPU / the training device (see the module docstring)."""

_MAX_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
N_CROP_DRAWS = 2 * _MAX_CROP_ATTEMPTS + 2  # uniform draws of one crop box (as eo_ssl.multicrop._N_CROP)


class DeviceTransform(abc.ABC):
    """Base of a batched augmentation the engine applies to a stream's batches: ``transform(batch, generator)``.

    Args:
        device: ``"cpu"`` (always on the CPU) or ``"cuda"`` (the training device: the CPU in a run without CUDA).
    """

    def __init__(self, device: Literal["cpu", "cuda"]):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"a device transform runs on 'cpu' or 'cuda', got {device!r}")
        self.device = device

    def run_device(self, training_device: torch.device) -> torch.device:
        """The device the transform computes on, given the run's training device."""
        return torch.device("cpu") if self.device == "cpu" else training_device

    @abc.abstractmethod
    def __call__(self, batch: Any, generator: torch.Generator) -> Any:
        """The augmented batch of a stream (on :meth:`run_device`), drawing every random choice from ``generator``."""


# ---------------------------------------------------------------------------------------------- loader side
class DecodedTiles(Dataset):
    """The loader's side of the device path: decoded tiles in model units, no augmentation.

    Keeps the keys a batch needs (``image`` float32 ``(C, H, W)``, ``valid`` bool ``(H, W)``, ``mask`` int64
    ``(H, W)`` when present, ``index``) as tensors. Items are addressed by ``index`` or by ``(epoch, index)`` (the
    engine's sampler sends the pair to datasets with :attr:`epoch_in_index`, which lets DataLoader workers persist
    across epochs, keeping a :class:`common.sampling.CachedDataset`'s tiles); the epoch is not used.
    """

    epoch_in_index = True
    KEYS = ("image", "valid", "mask", "index")

    def __init__(self, base: Dataset):
        self.base = base

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        index = index[1] if isinstance(index, tuple) else index
        s = self.base[index]
        out: dict[str, Any] = {"image": torch.as_tensor(np.ascontiguousarray(s["image"], dtype=np.float32))}
        image = out["image"]
        valid = s.get("valid")
        out["valid"] = (torch.ones(image.shape[1:], dtype=torch.bool) if valid is None
                        else torch.as_tensor(np.ascontiguousarray(valid, dtype=bool)))
        if s.get("mask") is not None:
            out["mask"] = torch.as_tensor(np.ascontiguousarray(s["mask"]).astype(np.int64, copy=False))
        out["index"] = int(s.get("index", index))
        return out


def collate_decoded(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` of :class:`DecodedTiles` samples; tiles of different sizes are refused with the fix."""
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        raise UserInputError(f"augment.device: the batched augmentation needs tiles of one size, got "
                             f"{sorted(shapes)} in one batch; set data.tile_size (or use augment.device: workers)")
    return default_collate(list(samples))


# ---------------------------------------------------------------------------------------------- random numbers
def uniform(shape: Sequence[int] | int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``U[0, 1)`` draws on the generator's device (float64 by default: the decisions compare them with
    probabilities and turn them into integer boxes, as the numpy pipelines do in float64)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype)


def gamma_noise(shape: Sequence[int], looks: float, generator: torch.Generator) -> torch.Tensor:
    """float32 ``Gamma(L, 1/L)`` draws (mean 1, variance ``1/L``: the intensity speckle of an L-look image).

    Whole ``L`` up to 16 (the usual 1, 4 looks): ``-sum_{i<L} log u_i / L``, a sum of ``L`` exponentials, exact and
    without a host sync. Otherwise Marsaglia & Tsang (2000) for shape ``a >= 1``: ``d = a - 1/3``, ``c = 1 / sqrt(9 d)``,
    ``v = (1 + c z)^3`` with ``z ~ N(0, 1)``, accepted when ``log u < z^2 / 2 + d - d v + d log v``; rejected elements
    are drawn again (a few %; each round reads the count back from the device); ``a < 1``: ``Gamma(a + 1) u^(1/a)``.
    Every draw comes from ``generator`` (deterministic)."""
    shape = tuple(shape)
    a = float(looks)
    if a.is_integer() and 1 <= a <= 16:
        u = torch.rand((int(a), *shape), generator=generator, device=generator.device, dtype=torch.float32)
        return -torch.log1p(-u).sum(dim=0) / a  # log(1 - u), u in [0, 1): never log(0)
    boost = a < 1.0
    d = (a + 1.0 if boost else a) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    dev = generator.device
    out = torch.empty(shape, device=dev, dtype=torch.float32).view(-1)
    todo = torch.arange(out.numel(), device=dev)
    while todo.numel():
        n = todo.numel()
        z = torch.randn(n, generator=generator, device=dev, dtype=torch.float32)
        u = torch.rand(n, generator=generator, device=dev, dtype=torch.float32)
        v = (1.0 + c * z) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        out[todo[ok]] = (d * v)[ok]
        todo = todo[~ok]
    if boost:
        u = torch.rand(out.numel(), generator=generator, device=dev, dtype=torch.float32)
        out = out * u.pow(1.0 / a)
    return (out / a).view(shape)


# ---------------------------------------------------------------------------------------------- geometry
def sample_crop_boxes(
    u: torch.Tensor, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's ``RandomResizedCrop.get_params`` for a batch, on uniform draws ``u`` of shape
    ``(N, N_CROP_DRAWS)`` (float64): attempt ``k`` uses ``u[:, 2k]`` (area fraction in ``scale``) and ``u[:, 2k + 1]``
    (log-uniform aspect ratio in ``ratio``), the last two place the crop; the first attempt that fits is kept, else
    the largest centre crop with an aspect ratio in ``ratio``. Same arithmetic as
    :func:`eo_ssl.multicrop.sample_crop_box` (float64, round half to even). Returns int64 ``(top, left, h, w)``, each
    ``(N,)``."""
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    n_try = 2 * _MAX_CROP_ATTEMPTS
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0:n_try:2])  # (N, 10)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1:n_try:2])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first attempt that fits (0 when none does)
    any_fit = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    top = torch.floor(u[:, n_try] * (height - h + 1))
    left = torch.floor(u[:, n_try + 1] * (width - w + 1))
    # the centre-crop fallback (the same for every sample of this tile size)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = height, int(round(height * ratio[1]))
    else:
        fw, fh = width, height
    top = torch.where(any_fit, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(any_fit, left, torch.full_like(left, (width - fw) // 2))
    h = torch.where(any_fit, h, torch.full_like(h, fh))
    w = torch.where(any_fit, w, torch.full_like(w, fw))
    return top.long(), left.long(), h.long(), w.long()


def affine_resample(
    x: torch.Tensor, matrices: torch.Tensor, out_hw: tuple[int, int], mode: str = "bilinear",
    clamp_boxes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Resample ``x`` ``(B, C, H, W)`` for ``V`` views of each sample in one ``grid_sample`` call.

    Args:
        x: the source tiles.
        matrices: ``(V, B, 2, 3)`` float64 maps from output pixel ``(u, v)`` (column, row; pixel centres at whole
            numbers) to source pixel ``(x, y)``: ``x = m00 u + m01 v + m02``, ``y = m10 u + m11 v + m12``
            (OpenCV's ``WARP_INVERSE_MAP`` convention).
        out_hw: ``(h, w)`` of every view.
        mode: ``"bilinear"``, ``"bicubic"`` or ``"nearest"`` (``grid_sample``'s).
        clamp_boxes: optional ``(V, B, 4)`` ``(x0, y0, x1, y1)``: source coordinates are clamped into the box
            (OpenCV ``resize`` of a crop replicates the crop's own edge); ``NaN`` rows are not clamped. Coordinates
            outside the tile are reflected about its edge pixels (reflect-101, as ``cv2.warpAffine`` with
            ``BORDER_REFLECT_101``).

    Returns:
        ``(V, B, C, h, w)`` float32, contiguous.
    """
    n_views, b = matrices.shape[:2]
    _, c, height, width = x.shape
    h, w = out_hw
    dev = x.device
    us = torch.arange(w, device=dev, dtype=torch.float64)
    vs = torch.arange(h, device=dev, dtype=torch.float64)
    m = matrices.to(device=dev, dtype=torch.float64)[..., None, None]  # (V, B, 2, 3, 1, 1)
    gx = m[:, :, 0, 0] * us + m[:, :, 0, 1] * vs[:, None] + m[:, :, 0, 2]  # (V, B, h, w)
    gy = m[:, :, 1, 0] * us + m[:, :, 1, 1] * vs[:, None] + m[:, :, 1, 2]
    if clamp_boxes is not None:
        box = clamp_boxes.to(device=dev, dtype=torch.float64)[..., None, None]  # (V, B, 4, 1, 1)
        on = ~torch.isnan(box[:, :, 0])
        gx = torch.where(on, torch.minimum(torch.maximum(gx, box[:, :, 0]), box[:, :, 2]), gx)
        gy = torch.where(on, torch.minimum(torch.maximum(gy, box[:, :, 1]), box[:, :, 3]), gy)
    # pixel -> grid_sample's [-1, 1] with align_corners=True (pixel centres of the edge pixels at -1 and 1)
    gx = gx * (2.0 / max(width - 1, 1)) - 1.0
    gy = gy * (2.0 / max(height - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1).to(torch.float32)  # (V, B, h, w, 2)
    grid = grid.permute(1, 0, 2, 3, 4).reshape(b, n_views * h, w, 2)  # views stacked along the output height
    y = F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=True)  # (B, C, V h, w)
    return y.view(b, c, n_views, h, w).permute(2, 0, 1, 3, 4).contiguous()


def _gather_planes(x: torch.Tensor, yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """``x[b, :, yi[b], xi[b]]`` for ``x`` ``(B, C, H, W)`` and int64 indices ``(B, h, w)`` -> ``(B, C, h, w)``."""
    b, c, height, width = x.shape
    flat = (yi * width + xi).view(b, 1, -1).expand(b, c, -1)
    return x.reshape(b, c, height * width).gather(2, flat).view(b, c, *yi.shape[1:])


def bilinear_gather(x: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``x`` ``(B, C, H, W)`` at source pixel coordinates ``ys``, ``xs`` ``(B, h, w)`` (float64),
    clamped to the tile (edge replicated, as ``cv2.resize``'s ``INTER_LINEAR``). Whole-pixel coordinates return the
    pixels exactly (weights 0 and 1)."""
    height, width = x.shape[-2:]
    ys = ys.clamp(0, height - 1)
    xs = xs.clamp(0, width - 1)
    y0, x0 = ys.floor(), xs.floor()
    wy = (ys - y0).to(x.dtype)[:, None]
    wx = (xs - x0).to(x.dtype)[:, None]
    y0, x0 = y0.long(), x0.long()
    y1, x1 = (y0 + 1).clamp_max(height - 1), (x0 + 1).clamp_max(width - 1)
    top = _gather_planes(x, y0, x0) * (1 - wx) + _gather_planes(x, y0, x1) * wx
    bottom = _gather_planes(x, y1, x0) * (1 - wx) + _gather_planes(x, y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def nearest_gather(x: torch.Tensor, yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """``x[b, ..., yi, xi]`` for ``x`` ``(B, H, W)`` or ``(B, C, H, W)`` (any dtype) at int64 ``(B, h, w)`` indices."""
    if x.dim() == 3:
        return _gather_planes(x[:, None], yi, xi)[:, 0]
    return _gather_planes(x, yi, xi)


# ---------------------------------------------------------------------------------------------- blur
def gaussian_kernels(sigma: torch.Tensor, radius: torch.Tensor, max_radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels ``(N, 2 max_radius + 1)`` (float32): ``exp(-k^2 / (2 sigma^2))`` for
    ``|k| <= radius`` (per sample), 0 beyond; computed in float64 as ``cv2.getGaussianKernel``."""
    k = torch.arange(-max_radius, max_radius + 1, device=sigma.device, dtype=torch.float64)
    s = sigma.to(torch.float64)[:, None]
    g = torch.exp(-(k * k) / (2.0 * s * s)) * (k.abs() <= radius.to(torch.float64)[:, None])
    return (g / g.sum(dim=1, keepdim=True)).to(torch.float32)


def gaussian_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable blur of ``x`` ``(N, C, h, w)`` with one kernel per sample (``(N, K)``, ``K = 2 R + 1``, ``R <
    min(h, w)``): rows then columns (as OpenCV), reflect-101 borders (``F.pad(mode="reflect")``), one grouped
    convolution per direction. A sample whose kernel is a unit impulse comes back unchanged."""
    n, c, h, w = x.shape
    k = kernels.shape[1]
    r = k // 2
    weight = kernels.to(x.dtype).repeat_interleave(c, dim=0)  # (N C, K): every band of a sample, its kernel
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, weight.view(n * c, 1, 1, k), groups=n * c)
    y = F.pad(y, (0, 0, r, r), mode="reflect")
    y = F.conv2d(y, weight.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, h, w)
