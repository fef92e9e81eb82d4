"""Raw raster values to normalised model input as torch ops, on the device that runs the network.

The torch twin of :func:`common.bands.to_model_units` followed by :func:`finetune.transforms.normalise`, for
prediction (:mod:`finetune.predict`): the raw integer (or float, or complex) window rows are copied to the device as
read, half the bytes of float32 for uint16 DN, and converted there, so that the CPU only reads and decodes.

Equation map (per pixel, band ``c``; ``x`` raw, ``u`` model units, ``z`` network input):
    dn_to_reflectance        u = (x + offset) / 10000                       (:func:`common.bands.dn_to_reflectance`)
    scale_offset             u = x * scale_factor [+ add_offset]
    linear_to_db             u = 10 log10(max(x, floor))                    (:func:`common.bands.linear_to_db`)
    amplitude_to_db          u = 10 log10(max(x^2, floor))
    complex_to_intensity_db  u = 10 log10(max(re^2 + im^2, floor))         (:func:`common.bands.complex_to_intensity`)
    complex_to_amplitude     u = sqrt(re^2 + im^2)
    db, none                 u = x
    VV/VH (derived)          u = u_VV / (sign(u_VH) max(|u_VH|, 1e-3))      (``common.bands._ratio``)
    valid                    ok = raw_ok & all_c isfinite(u_c)
    normalise                z = (u - mean) / std, 0 where not ok or not finite

Every operation is float32 with the numpy path's order of operations, and the scalars are float32 tensors on the
device (a Python scalar divisor is turned into a multiplication by its reciprocal on CUDA, one bit off). Nothing here
waits for the device: a window row's conversion is queued behind the previous row's forward passes. Additions,
multiplications, divisions, square roots, comparisons and float conversions are correctly rounded in IEEE float32 on
both sides, so the result is **bit-identical** to the numpy path for ``dn_to_reflectance`` (Sentinel-2),
``scale_offset``, ``db``, ``none``, ``complex_to_amplitude`` and the VV/VH ratio. ``log10`` is not correctly rounded in
either library: the dB conversions agree **to float rounding** (at most 2 units in the last place of ``u``; on the
CPU about half of the values differ by 1 to 2 ulp from numpy's).

Deviations: a derived band without a torch version here is computed by its numpy function on the CPU (a round trip
through host memory); none of the registry's needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from common.bands import (
    DB_FLOOR,
    DERIVED_BANDS,
    RATIO_DENOMINATOR_EPS,
    S2_REFLECTANCE_SCALE,
    SensorSpec,
)

__all__ = ["model_input", "normalise_torch", "to_model_units_torch"]


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d float32 tensor on ``like``'s device, rounded as ``np.float32(value)``. Filled on the device:
    ``torch.tensor(value, device="cuda")`` would copy from pageable memory and wait for the stream."""
    return torch.full((), value, dtype=torch.float32, device=like.device)


def _linear_to_db(x: torch.Tensor, floor: float) -> torch.Tensor:
    return _f32(10.0, x) * torch.log10(torch.maximum(x, _f32(floor, x)))


def _intensity(z: torch.Tensor) -> torch.Tensor:
    """``|z|^2`` float32 (real pixels: ``x^2``)."""
    if z.is_complex():
        re, im = z.real.to(torch.float32), z.imag.to(torch.float32)
        return re * re + im * im
    x = z.to(torch.float32)
    return x * x


def _ratio_torch(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``common.bands._ratio``: ``numerator / denominator`` with ``|denominator|`` clamped to 1e-3."""
    sign = torch.where(denominator < 0, _f32(-1.0, denominator), _f32(1.0, denominator))
    safe = sign * torch.maximum(denominator.abs(), _f32(RATIO_DENOMINATOR_EPS, denominator))
    return numerator / safe


_DERIVED_TORCH: dict[Callable, Callable[..., torch.Tensor]] = {DERIVED_BANDS["VV/VH"].fn: _ratio_torch}
"""Torch version of a derived band's numpy function, by that function."""


def to_model_units_torch(raw: torch.Tensor, spec: SensorSpec, *, offset: float = 0,
                         floor: float = DB_FLOOR) -> torch.Tensor:
    """:func:`common.bands.to_model_units` on a tensor: ``spec.conversion`` and the derived bands.

    Args:
        raw: ``(C_raw, H, W)`` raw values of ``spec.raw_bands`` in that order, any real or complex dtype, any device.
        spec: sensor (or stack); the output channels follow ``spec.bands``.
        offset: Sentinel-2 radiometric offset in DN (ignored by SAR conversions).
        floor: linear floor of the dB conversions.

    Returns:
        float32 ``(len(spec.bands), H, W)`` on ``raw``'s device, not normalised; ``raw`` itself for a float32 ``raw``
        read as is (``db``, ``none``).

    Raises:
        ValueError: the channel count does not match ``spec.raw_bands``. (Dtypes are checked on the host, where the
            file is named: :func:`common.bands.check_dtypes`.)
    """
    raw_bands = tuple(spec.raw_bands)
    if raw.ndim != 3 or raw.shape[0] != len(raw_bands):
        raise ValueError(f"expected raw tensor (C={len(raw_bands)}, H, W) for bands {raw_bands}, got "
                         f"{tuple(raw.shape)}")
    if spec.parts:  # each sensor of a stack with its own conversion
        index = {b: i for i, b in enumerate(raw_bands)}
        out_parts = []
        for p in spec.parts:
            idx = [index[b] for b in p.raw_bands]
            consecutive = idx == list(range(idx[0], idx[0] + len(idx)))  # as stacks lay them out: a view
            part_raw = raw[idx[0]:idx[0] + len(idx)] if consecutive else raw[idx]
            out_parts.append(to_model_units_torch(part_raw, p, offset=offset, floor=floor))
        return torch.cat(out_parts)
    conv = spec.conversion
    if conv == "dn_to_reflectance":
        phys = raw.to(torch.float32, copy=True)  # a copy of its own: the steps below work in place
        if offset:
            phys.add_(_f32(offset, raw))
        phys.div_(_f32(S2_REFLECTANCE_SCALE, raw))
    elif conv == "scale_offset":
        phys = raw.to(torch.float32, copy=True).mul_(_f32(spec.scale_factor, raw))
        if spec.add_offset:
            phys.add_(_f32(spec.add_offset, raw))
    elif conv == "linear_to_db":
        phys = _linear_to_db(raw.to(torch.float32), floor)
    elif conv in ("amplitude_to_db", "complex_to_intensity_db"):
        phys = _linear_to_db(_intensity(raw), floor)
    elif conv == "complex_to_amplitude":
        phys = torch.sqrt(_intensity(raw))
    else:  # "db" (files already in dB) and "none"
        phys = raw.to(torch.float32)
    if tuple(spec.bands) == raw_bands:  # no derived band, no reordering
        return phys
    by_name = {b: phys[i] for i, b in enumerate(raw_bands)}
    out = []
    for b in spec.bands:
        if b in by_name:
            out.append(by_name[b])
        elif b in DERIVED_BANDS:
            d = DERIVED_BANDS[b]
            missing = [x for x in d.inputs if x not in by_name]
            if missing:
                raise ValueError(f"derived band {b} needs {missing}, not among raw bands {raw_bands}")
            fn = _DERIVED_TORCH.get(d.fn)
            if fn is not None:
                out.append(fn(*(by_name[x] for x in d.inputs)))
            else:  # no torch version: the numpy function on the host
                host = d.fn(*(by_name[x].cpu().numpy() for x in d.inputs))
                out.append(torch.from_numpy(np.asarray(host, dtype=np.float32)).to(raw.device))
        else:
            raise ValueError(f"band {b} of sensor {spec.name} is not among raw bands {raw_bands}")
    return torch.stack(out)


def normalise_torch(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`finetune.transforms.normalise` on tensors: ``(x - mean) / std`` per band (``mean``, ``std`` float32
    ``(C,)`` on the device), 0 where ``valid`` (``(H, W)`` bool) is False or the result is not finite."""
    return _normalise_(image.to(torch.float32, copy=True), mean, std, valid)


def _normalise_(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """:func:`normalise_torch` in place on the float32 ``x``, which it returns (one pass per step, no temporary the
    size of ``x``)."""
    x.sub_(mean[:, None, None]).div_(std[:, None, None])
    x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # not finite -> 0 (+0.0, as numpy's assignment)
    if valid is not None:
        x.masked_fill_(~valid, 0.0)
    return x


def _all_finite(image: torch.Tensor) -> torch.Tensor:
    """``isfinite(image).all(dim=0)`` as ``sum_c 0 * image_c == 0``: exact (``0 * x`` is 0 for a finite ``x`` and NaN
    for inf or NaN, and a sum of zeros is 0). Band by band into ``(H, W)`` buffers: on the CPU 3 to 4x faster than
    ``isfinite().all()`` and than one product the size of ``image`` (whose fresh pages cost more than the sum)."""
    zero = torch.zeros_like(image[0])  # (H, W)
    term = torch.empty_like(zero)
    for band in image:
        zero.add_(torch.mul(band, 0, out=term))
    return zero == 0


def model_input(raws: Sequence[torch.Tensor], raw_ok: torch.Tensor, parts: Sequence[SensorSpec], mean: torch.Tensor,
                std: torch.Tensor, *, offset: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Network input of a window row read from one file per sensor (one file, or a stack's files).

    Args:
        raws: per file, ``(C_raw_i, H, W)`` raw values of ``parts[i].raw_bands``, on the device.
        raw_ok: ``(H, W)`` bool, False where a file reads no-data (declared nodata, NaN/inf, dataset mask).
        parts: the sensor read from each file.
        mean, std: float32 ``(C,)`` normalisation in model channel order, on the device.
        offset: Sentinel-2 radiometric offset in DN.

    Returns:
        ``(z, ok)``: z float32 ``(C, H, W)`` normalised (0 where not ok), ok ``(H, W)`` bool: ``raw_ok`` and every
        band finite in model units.
    """
    images = [to_model_units_torch(raw, part, offset=offset) for raw, part in zip(raws, parts)]
    if len(images) > 1:
        image = torch.cat(images)  # (C, H, W)
    else:
        image = images[0]
        if image.data_ptr() == raws[0].data_ptr():  # read as is: normalised in place below, so a copy
            image = image.clone()
    ok = raw_ok & _all_finite(image)
    return _normalise_(image, mean, std, ok), ok
