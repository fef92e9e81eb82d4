"""Multispectral multi-crop pipeline (``eo_ssl.multicrop``): shapes, determinism, fused normalisation, geometry,
channel augmentation, SAR safety, dropout, collate/preview, and why Albumentations is not used for it."""

from __future__ import annotations

import math
import os

import cv2
import numpy as np
import pytest
import torch

from common.bands import get_sensor
from eo_ssl.multicrop import (
    MultiCropConfig,
    MultiCropTransform,
    _crop_affine_matrix,
    band_units,
    collate_multicrop,
    render_multicrop_grid,
    sample_crop_box,
    sar_multicrop_config,
)

NONE3 = (0.0, 0.0, 0.0)
ALL3 = (1.0, 1.0, 1.0)
# Everything random switched off; a "crop" is then the whole tile, resized to the view size.
PLAIN = dict(hflip_p=NONE3, affine_p=NONE3, blur_p=NONE3, solarize_p=NONE3, channel_p=NONE3,
             global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), ratio=(1.0, 1.0))


def smooth_image(bands: int, size: int = 48, seed: int = 0, low: float = 0.0, high: float = 0.6) -> np.ndarray:
    """(C, H, W) float32 smooth random field in [low, high] (smooth, so interpolation differences stay tiny)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((bands, 6, 6)).astype(np.float32)
    img = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_CUBIC) for c in coarse])
    img = (img - img.min()) / (img.max() - img.min())
    return (low + (high - low) * img).astype(np.float32)


def stats(bands: int) -> tuple[np.ndarray, np.ndarray]:
    return np.linspace(0.1, 0.3, bands), np.linspace(0.05, 0.2, bands)


def make(bands: int, as_tensor: bool = False, units: str | list[str] = "reflectance", **kw) -> MultiCropTransform:
    cfg = MultiCropConfig(**{"global_size": 32, "local_size": 16, "local_number": 3, **kw})
    mean, std = stats(bands)
    return MultiCropTransform(cfg, mean, std, units=units, as_tensor=as_tensor)


@pytest.mark.parametrize("bands", [1, 2, 4, 12, 13])
def test_shapes_dtypes_and_contiguity(bands):
    t = make(bands, as_tensor=True, jitter_p=ALL3)
    crops = t({"image": smooth_image(bands)}, np.random.default_rng(0))
    assert [tuple(c.shape) for c in crops] == [(bands, 32, 32)] * 2 + [(bands, 16, 16)] * 3
    assert t.sizes == [(32, 32)] * 2 + [(16, 16)] * 3
    for c in crops:
        assert isinstance(c, torch.Tensor) and c.dtype == torch.float32 and c.is_contiguous()
        assert torch.isfinite(c).all()


def test_more_bands_than_opencv_interleaves_fall_back_to_planes():
    t = make(130, affine_p=ALL3, blur_p=ALL3, local_number=1)  # cv2's Python bindings take <= 128 channels
    crops = t(smooth_image(130, size=24), np.random.default_rng(0))
    assert [c.shape for c in crops] == [(130, 32, 32)] * 2 + [(130, 16, 16)]


def test_band_units_from_sensor_specs():
    s1 = get_sensor("S1", bands=["VV", "VH", "VV/VH"])
    assert band_units(s1) == ("db", "db", "other")
    assert set(band_units(get_sensor("S2L2A"))) == {"reflectance"}
    # a ratio band gets contrast jitter but no gain (and no speckle or solarisation)
    img = np.stack([smooth_image(1, 32, low=-20.0, high=-8.0)[0], smooth_image(1, 32, low=-25.0, high=-12.0)[0],
                    smooth_image(1, 32, low=0.5, high=0.9)[0]])
    kw = {**PLAIN, "jitter_p": ALL3, "jitter_brightness": 0.3, "jitter_contrast": 0.0, "solarize_p": ALL3}
    cfg = MultiCropConfig(global_size=32, local_number=0, **kw)
    out = MultiCropTransform(cfg, s1.mean_array(), s1.std_array(), units=band_units(s1), as_tensor=False)(
        img, np.random.default_rng(0))[0]
    x = out * s1.std_array()[:, None, None] + s1.mean_array()[:, None, None]
    np.testing.assert_allclose(x[2], img[2], atol=1e-5)
    assert abs((x[0] - img[0]).mean()) > 1e-3  # the dB bands received a gain (an offset in dB)


def test_accepts_torch_and_numpy_inputs_and_checks_band_count():
    t = make(3)
    img = smooth_image(3)
    a = t({"image": torch.from_numpy(img)}, np.random.default_rng(1))
    b = t(img, np.random.default_rng(1))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="bands"):
        t(smooth_image(4), np.random.default_rng(0))


def test_deterministic_per_generator_seed():
    t = make(5, jitter_p=ALL3, band_dropout_p=(0.5, 0.5, 0.5))
    img = smooth_image(5)
    a = t(img, np.random.default_rng([7, 1, 3]))
    b = t(img, np.random.default_rng([7, 1, 3]))
    c = t(img, np.random.default_rng([7, 2, 3]))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_normalisation_fused_into_the_copy():
    img = smooth_image(4, size=32)
    mean, std = stats(4)
    # identity geometry: the view is the tile itself
    out = make(4, **PLAIN)(img, np.random.default_rng(0))[0]
    np.testing.assert_allclose(out, (img - mean[:, None, None]) / std[:, None, None], rtol=1e-5, atol=1e-5)
    # a 2x view of the whole tile: per-band cv2.resize, then (x - mean) / std
    out = make(4, **{**PLAIN, "global_size": 64})(img, np.random.default_rng(0))[0]
    expected = np.stack([cv2.resize(b, (64, 64), interpolation=cv2.INTER_LINEAR) for b in img])
    np.testing.assert_allclose(out, (expected - mean[:, None, None]) / std[:, None, None], rtol=1e-5, atol=1e-5)


def test_crop_box_follows_torchvision_rules():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = sample_crop_box(rng, 40, 30, (0.05, 0.4), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 30
        assert 0.04 <= h * w / 1200 <= 0.42 and 0.7 <= w / h <= 1.4
    # impossible request (area larger than the tile): centre crop with an allowed aspect ratio
    assert sample_crop_box(rng, 40, 20, (2.0, 3.0), (1.0, 1.0)) == (10, 0, 20, 20)


def test_only_the_crop_is_resampled():
    """Views are crops of the tile: with scale < 1 and no affine, a view equals cv2.resize of the crop box."""
    img = smooth_image(3, size=40)
    t = make(3, **{**PLAIN, "global_scale": (0.2, 0.5), "ratio": (0.75, 1.33)})
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    out = t(img, rng)[0]
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = state
    rng2.random(20)  # the view's block of uniform draws comes first
    top, left, h, w = sample_crop_box(rng2, 40, 40, (0.2, 0.5), (0.75, 1.33))
    assert h * w < 40 * 40 * 0.55
    crop = img[:, top:top + h, left:left + w]
    expected = np.stack([cv2.resize(b, (32, 32), interpolation=cv2.INTER_LINEAR) for b in crop])
    mean, std = stats(3)
    np.testing.assert_allclose(out * std[:, None, None] + mean[:, None, None], expected, atol=1e-5)


def test_single_warp_equals_affine_then_crop_then_resize():
    """The composed map (affine of the tile, crop, resize) sampled once equals doing the three steps in turn."""
    img = smooth_image(1, size=64)[0]
    box, out_hw, angle, zoom, shift = (10, 14, 30, 36), (48, 48), 20.0, 1.05, (0.03, -0.05)
    m = _crop_affine_matrix(box, out_hw, (64, 64), angle, zoom, shift)
    one_pass = cv2.warpAffine(img, m, (48, 48), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REFLECT_101)
    a = math.radians(angle)
    lin = zoom * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c = np.array([31.5, 31.5])
    fwd = np.hstack([lin, (c - lin @ c + np.array(shift) * 64)[:, None]])
    tile = cv2.warpAffine(img, fwd, (64, 64), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    top, left, h, w = box
    two_pass = cv2.resize(tile[top:top + h, left:left + w], (48, 48), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(one_pass[4:-4, 4:-4], two_pass[4:-4, 4:-4], atol=5e-3)


@pytest.mark.parametrize("flip", ["hflip_p", "vflip_p"])
def test_flips_are_exact_mirror_images_on_every_path(flip):
    """Flips are folded into the warp (affine views) or applied after the resize: a flipped view is the mirror
    image of the same view unflipped (4 bands: the interleaved OpenCV paths are exact for 1, 3 and 4 channels)."""
    kw = dict(affine_p=(1.0, 0.0, 0.5), blur_p=(0.0, 1.0, 0.5), channel_p=NONE3, hflip_p=NONE3, vflip_p=NONE3)
    img = smooth_image(4, size=40)
    plain = make(4, **kw)(img, np.random.default_rng(3))
    flipped = make(4, **{**kw, flip: ALL3})(img, np.random.default_rng(3))
    axis = 2 if flip == "hflip_p" else 1
    for a, b in zip(plain, flipped):
        np.testing.assert_allclose(np.flip(a, axis=axis), b, atol=2e-4)


@pytest.mark.parametrize("bands,atol", [(4, 1e-5), (10, 0.05)])
def test_bands_are_processed_independently(bands, atol):
    """A C-band view equals the C single-band views drawn with the same generator (interleaved vs planar paths;
    10 interleaved bands: OpenCV's warp samples at 1/32-px positions, hence the tolerance in normalised units)."""
    kw = dict(affine_p=(1.0, 0.0, 0.5), blur_p=(1.0, 1.0, 0.5), channel_p=NONE3, hflip_p=(0.5, 0.5, 0.5))
    img = smooth_image(bands, size=40)
    mean, std = stats(bands)
    cfg = MultiCropConfig(global_size=32, local_size=16, local_number=3, **kw)
    full = MultiCropTransform(cfg, mean, std, as_tensor=False)(img, np.random.default_rng(11))
    for b in range(bands):
        single = MultiCropTransform(cfg, mean[b:b + 1], std[b:b + 1], as_tensor=False)(img[b:b + 1],
                                                                                     np.random.default_rng(11))
        for f, s in zip(full, single):
            np.testing.assert_allclose(f[b], s[0], atol=atol)


def reference_views(t: MultiCropTransform, img: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """The views of ``t`` written the straightforward way, one band at a time: the same draws (20 per view, then the
    crop box's), warp or crop + resize, numpy flips, blur, ``(x - mean) / std``, solarisation. Options covered: those
    of the seed (no jitter, noise or dropout), linear interpolation, channel_mode="raw", all bands in reflectance."""
    cfg = t.cfg
    n, height, width = img.shape
    views = []
    for kind, (h, w), scale in t.views:
        u = rng.random(20)
        box = sample_crop_box(rng, height, width, scale, cfg.ratio)
        # draw indices (eo_ssl.multicrop._U_*): hflip 0, vflip 1, affine 2, rotation 3, zoom 4, shift 5-6, blur 7,
        # sigma 8, solarise 9, channel 10, band 11
        band = int(u[11] * n) if u[10] < cfg.channel_p[kind] else None
        planes = []
        for b in range(n):
            x = img[b if band is None else band]
            if u[2] < cfg.affine_p[kind]:
                m = _crop_affine_matrix(
                    box, (h, w), (height, width), angle_deg=cfg.affine_rotate * (2 * u[3] - 1),
                    zoom=cfg.affine_scale[0] + (cfg.affine_scale[1] - cfg.affine_scale[0]) * u[4],
                    shift_xy=(cfg.affine_shift * (2 * u[5] - 1), cfg.affine_shift * (2 * u[6] - 1)))
                x = cv2.warpAffine(x, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                   borderMode=cv2.BORDER_REFLECT_101)
            else:
                top, left, ch, cw = box
                x = cv2.resize(x[top:top + ch, left:left + cw], (w, h), interpolation=cv2.INTER_LINEAR)
            if u[0] < cfg.hflip_p[kind]:
                x = x[:, ::-1]
            if u[1] < cfg.vflip_p[kind]:
                x = x[::-1]
            x = np.ascontiguousarray(x)
            if u[7] < cfg.blur_p[kind]:
                sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u[8]
                r = max(1, min(int(cfg.blur_truncate * sigma), h - 1, w - 1))
                x = cv2.GaussianBlur(x, (2 * r + 1, 2 * r + 1), sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
            z = (x - t.mean[b]) / t.std[b]
            if u[9] < cfg.solarize_p[kind]:
                z = np.where(z > cfg.solarize_threshold, 2 * cfg.solarize_threshold - z, z)
            planes.append(z)
        views.append(np.stack(planes))
    return views


@pytest.mark.parametrize("bands", [4, 10])
def test_views_match_a_straightforward_per_band_reference(bands):
    """The optimised layouts (interleaved warps and blurs, cv2.transpose back, flips of > 4 interleaved bands as two
    2-D flips, in-place normalisation with cached maps for small views) against :func:`reference_views`, on every
    path: affine or not, flips, blur, channel augmentation, solarisation, a global size above and a local size below
    the cached-map limit. Interpolation rounding only (per band vs interleaved), except 10-band warps: OpenCV samples
    >= 5 interleaved channels at 1/32-px positions (see test_bands_are_processed_independently)."""
    half = (0.5, 0.5, 0.5)
    cfg = MultiCropConfig(global_size=72, local_size=16, local_number=4, hflip_p=half, vflip_p=half, affine_p=half,
                          blur_p=half, solarize_p=half, channel_p=(0.3, 0.3, 0.3), blur_sigma=(0.5, 3.0))
    mean, std = stats(bands)
    t = MultiCropTransform(cfg, mean, std, as_tensor=False)
    img = smooth_image(bands, size=48)
    paths = set()
    for seed in range(12):
        ours = t(img, np.random.default_rng([seed, 0, 1]))
        reference = reference_views(t, img, np.random.default_rng([seed, 0, 1]))
        rng = np.random.default_rng([seed, 0, 1])
        for view, ref in zip(ours, reference):
            u = rng.random(42)
            affine, hflip, blur, channel = u[2] < 0.5, u[0] < 0.5, u[7] < 0.5, u[10] < 0.3
            paths.add((affine, hflip, blur, channel))
            atol = 0.05 if affine and not channel and bands > 4 else 2e-4
            np.testing.assert_allclose(view, ref, atol=atol, err_msg=f"seed {seed}, path {(affine, hflip, blur)}")
    assert len(paths) >= 14  # nearly all 16 (affine, hflip, blur, channel) combinations were compared


def test_cubic_interpolation_with_more_than_four_bands():
    """OpenCV warps more than 4 interleaved channels only with nearest or linear interpolation: cubic affine views of
    more bands run per plane (they used to fail with a cv2.error)."""
    cfg = MultiCropConfig(global_size=32, local_size=16, local_number=2, interpolation="cubic", affine_p=ALL3,
                          blur_p=(1.0, 0.0, 0.5), channel_p=NONE3)
    mean, std = stats(10)
    img = smooth_image(10, size=40)
    full = MultiCropTransform(cfg, mean, std, as_tensor=False)(img, np.random.default_rng(2))
    assert [v.shape for v in full] == [(10, 32, 32)] * 2 + [(10, 16, 16)] * 2
    for b in (0, 7):  # planes: each band as its own single-band view
        single = MultiCropTransform(cfg, mean[b:b + 1], std[b:b + 1], as_tensor=False)(img[b:b + 1],
                                                                                     np.random.default_rng(2))
        for f, s in zip(full, single):
            np.testing.assert_allclose(f[b], s[0], atol=1e-5)


def test_channel_augmentation_replaces_every_band_by_one_band():
    img = smooth_image(6, size=32)
    mean, std = stats(6)
    # raw mode (the seed's Channelaug): de-normalised, every output band is the same input band
    out = make(6, **{**PLAIN, "channel_p": ALL3})(img, np.random.default_rng(4))
    for view in out:
        x = view * std[:, None, None] + mean[:, None, None]
        np.testing.assert_allclose(x, np.broadcast_to(x[0], x.shape), atol=1e-5)
    source = out[0] * std[:, None, None] + mean[:, None, None]
    matches = [b for b in range(6) if np.allclose(source[0], img[b], atol=1e-5)]
    assert len(matches) == 1
    # normalized mode: every output band is band b normalised with band b's statistics
    out = make(6, **{**PLAIN, "channel_p": ALL3, "channel_mode": "normalized"})(img, np.random.default_rng(4))
    b = matches[0]
    np.testing.assert_allclose(out[0], np.broadcast_to((img[b] - mean[b]) / std[b], out[0].shape), atol=1e-5)
    # with the seed defaults only the first global view is single-band
    out = make(6)(img, np.random.default_rng(0))
    assert np.allclose(out[0] * std[:, None, None] + mean[:, None, None],
                       (out[0] * std[:, None, None] + mean[:, None, None])[:1], atol=1e-5)
    assert not np.allclose(out[1][0] * std[0] + mean[0], out[1][1] * std[1] + mean[1], atol=1e-3)


def test_solarize_reflects_above_threshold_in_normalised_units_without_clipping():
    img = smooth_image(3, size=32, low=0.0, high=1.6)  # reflectance above 1 (clouds) must survive
    base = make(3, **PLAIN)(img, np.random.default_rng(0))[0]
    for t in (0.0, 0.7):
        sol = make(3, **{**PLAIN, "solarize_p": ALL3, "solarize_threshold": t})(img, np.random.default_rng(0))[0]
        np.testing.assert_allclose(sol, np.where(base > t, 2 * t - base, base), atol=1e-6)
    assert base.max() > 3.0 and base.min() < -1.0  # values far outside [0, 1] pass through


def test_sar_db_values_are_not_clipped_and_not_solarised():
    img = smooth_image(2, size=32, low=-28.0, high=-4.0)  # backscatter in dB
    mean, std = np.array([-15.0, -20.0]), np.array([4.0, 5.0])
    cfg = MultiCropConfig(global_size=32, local_size=16, local_number=2, **{**PLAIN, "blur_p": ALL3})
    blurred = MultiCropTransform(cfg, mean, std, units="db", as_tensor=False)(img, np.random.default_rng(0))
    x = blurred[0] * std[:, None, None] + mean[:, None, None]
    assert x.max() < -3.9 and x.min() > -28.1 and x.std() > 1.0  # blurred, not clipped to [0, 1]
    cfg_sol = MultiCropConfig(global_size=32, local_size=16, local_number=2, **{**PLAIN, "solarize_p": ALL3})
    plain = MultiCropTransform(MultiCropConfig(global_size=32, local_size=16, local_number=2, **PLAIN), mean, std,
                               units="db", as_tensor=False)(img, np.random.default_rng(0))
    sol = MultiCropTransform(cfg_sol, mean, std, units="db", as_tensor=False)(img, np.random.default_rng(0))
    for a, b in zip(plain, sol):
        np.testing.assert_array_equal(a, b)
    # in an S2 + S1 stack only the optical bands are solarised
    stack = np.concatenate([smooth_image(2, size=32), img])
    mean4, std4 = np.array([0.2, 0.2, -15.0, -20.0]), np.array([0.1, 0.1, 4.0, 5.0])
    units = ["reflectance", "reflectance", "db", "db"]
    p = MultiCropTransform(MultiCropConfig(local_number=0, global_size=32, **PLAIN), mean4, std4, units=units,
                           as_tensor=False)(stack, np.random.default_rng(0))[0]
    s = MultiCropTransform(MultiCropConfig(local_number=0, global_size=32, **{**PLAIN, "solarize_p": ALL3}), mean4,
                           std4, units=units, as_tensor=False)(stack, np.random.default_rng(0))[0]
    np.testing.assert_array_equal(p[2:], s[2:])
    np.testing.assert_allclose(s[:2], np.where(p[:2] > 0, -p[:2], p[:2]), atol=1e-6)


@pytest.mark.parametrize("units", ["linear", "db"])
def test_speckle_is_gamma_multiplicative_in_linear_and_additive_in_db(units):
    looks = 4.0
    size = 64
    img = smooth_image(1, size=size, low=0.05, high=0.2) if units == "linear" else \
        smooth_image(1, size=size, low=-20.0, high=-8.0)
    cfg = sar_multicrop_config(global_size=size, local_number=0, noise_p=ALL3, speckle_looks=looks, jitter_p=NONE3,
                               **{k: v for k, v in PLAIN.items() if k not in ("solarize_p", "channel_p")})
    noisy = MultiCropTransform(cfg, [0.0], [1.0], units=units, as_tensor=False)(img, np.random.default_rng(0))[0][0]
    gain = noisy / img[0] if units == "linear" else 10.0 ** ((noisy - img[0]) / 10.0)
    assert abs(gain.mean() - 1.0) < 0.05 and abs(gain.var() - 1.0 / looks) < 0.05


@pytest.mark.parametrize("units", ["reflectance", "db"])
def test_brightness_is_a_gain_in_reflectance_and_an_offset_in_db(units):
    img = smooth_image(3, size=32, low=0.05, high=0.5) if units == "reflectance" else \
        smooth_image(3, size=32, low=-20.0, high=-5.0)
    kw = {**PLAIN, "jitter_p": ALL3, "jitter_brightness": 0.3, "jitter_band": 0.0, "jitter_contrast": 0.0}
    mean, std = stats(3)
    out = make(3, units=units, **kw)(img, np.random.default_rng(2))
    for view in out[:2]:  # the global views have the tile's size
        x = view * std[:, None, None] + mean[:, None, None]
        if units == "reflectance":
            g = x / img
            assert 0.7 <= g.min() and g.max() <= 1.3 and np.allclose(g, g.flat[0], atol=1e-4)
        else:
            d = x - img
            assert 10 * math.log10(0.7) - 1e-4 <= d.min() and d.max() <= 10 * math.log10(1.3) + 1e-4
            assert np.allclose(d, d.flat[0], atol=1e-4)


def test_contrast_keeps_the_view_mean():
    img = smooth_image(2, size=32)
    kw = {**PLAIN, "jitter_p": ALL3, "jitter_brightness": 0.0, "jitter_band": 0.0, "jitter_contrast": 0.5}
    mean, std = stats(2)
    x = make(2, **kw)(img, np.random.default_rng(9))[0] * std[:, None, None] + mean[:, None, None]
    np.testing.assert_allclose(x.mean(axis=(1, 2)), img.mean(axis=(1, 2)), atol=1e-5)
    assert not np.allclose(x.std(axis=(1, 2)), img.std(axis=(1, 2)), rtol=1e-3)


def test_band_and_sensor_dropout_zero_in_normalised_units():
    img = smooth_image(12, size=32) + 1.0  # far from the mean: no band is 0 by chance
    out = make(12, **{**PLAIN, "band_dropout_p": ALL3, "band_dropout_max": 0.5})(img, np.random.default_rng(0))
    for view in out:
        dropped = [c for c in range(12) if not view[c].any()]
        assert 1 <= len(dropped) <= 6
    groups = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (10, 11))
    t = make(12, **{**PLAIN, "sensor_dropout_p": ALL3, "sensor_groups": groups})
    seen = set()
    for seed in range(12):
        for view in t(img, np.random.default_rng(seed)):
            dropped = tuple(c for c in range(12) if not view[c].any())
            assert dropped in groups
            seen.add(dropped)
    assert seen == set(groups)


def test_gaussian_noise_in_normalised_units():
    img = smooth_image(2, size=64)
    base = make(2, **{**PLAIN, "global_size": 64})(img, np.random.default_rng(0))[0]
    noisy = make(2, **{**PLAIN, "global_size": 64, "noise_p": ALL3, "noise_std": 0.1})(img, np.random.default_rng(0))[0]
    assert abs((noisy - base).std() - 0.1) < 0.01


def test_config_validation():
    with pytest.raises(ValueError, match="three probabilities"):
        MultiCropConfig(blur_p=(1.0, 0.5)).validate()
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropConfig(global_scale=(0.5, 1.5)).validate()
    with pytest.raises(ValueError, match="sensor_groups"):
        MultiCropConfig(sensor_dropout_p=ALL3, sensor_groups=((0, 1),)).validate()
    MultiCropConfig(sensor_dropout_p=ALL3).validate()  # groups left to the data's sensor stack ...
    with pytest.raises(ValueError, match="sensor_groups"):  # ... and refused by a transform without them
        MultiCropTransform(MultiCropConfig(sensor_dropout_p=ALL3), [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="units"):
        MultiCropTransform(MultiCropConfig(), [0.0, 0.0], [1.0, 1.0], units=["db"])
    with pytest.raises(ValueError, match="std"):
        MultiCropTransform(MultiCropConfig(), [0.0], [0.0])


def test_collate_stacks_each_crop_position():
    t = make(3, as_tensor=True)
    samples = [t(smooth_image(3, seed=i), np.random.default_rng(i)) for i in range(4)]
    batch = collate_multicrop(samples)
    assert [tuple(b.shape) for b in batch] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert torch.equal(batch[2][1], samples[1][2])
    batch = collate_multicrop([{"crops": s, "index": i} for i, s in enumerate(samples)])
    assert batch["index"].tolist() == [0, 1, 2, 3] and len(batch["crops"]) == 5


def test_render_grid_is_uint8_hwc():
    t = make(4, as_tensor=True)
    batch = collate_multicrop([t(smooth_image(4, seed=i), np.random.default_rng(i)) for i in range(3)])
    grid = render_multicrop_grid(batch, rgb=(2, 1, 0), max_samples=2, pad=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * (32 + 2) + 2, 2 * 32 + 3 * 16 + 6 * 2, 3)
    assert grid.max() == 255 and grid.min() == 0
    single = render_multicrop_grid(t(smooth_image(4), np.random.default_rng(0)), rgb=(0, 1, 2))
    assert single.shape[0] == 32 + 4


# ---------------------------------------------------------------------------------------------- why not Albumentations
def test_albumentations_2_misbehaves_on_multispectral_and_db():
    """Documents why the pipeline is our own: on float images Albumentations 2.0.8 clips several pixel transforms
    to [0, 1] (dB backscatter becomes 0, bright reflectance is cut) and its colour transforms need 1 or 3 channels.
    If this test fails, Albumentations changed: update the module docstring of ``eo_ssl.multicrop``."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network
    A = pytest.importorskip("albumentations")
    rng = np.random.default_rng(0)
    db = rng.uniform(-25.0, -5.0, (32, 32, 2)).astype(np.float32)  # S1 VV/VH in dB
    refl = rng.uniform(0.0, 1.5, (32, 32, 12)).astype(np.float32)  # S2 L2A reflectance incl. bright clouds

    blurred = A.GaussianBlur(sigma_limit=(1.0, 1.0), p=1.0)(image=db)["image"]
    assert blurred.max() == 0.0  # every dB value clipped to 0
    assert A.GaussianBlur(sigma_limit=(1.0, 1.0), p=1.0)(image=refl)["image"].max() <= 1.0  # clouds cut at 1
    solarized = A.Solarize(threshold_range=(0.5, 0.5), p=1.0)(image=db)["image"]
    assert solarized.min() >= 0.0  # negative dB clipped
    assert A.RandomBrightnessContrast(p=1.0)(image=db)["image"].min() >= 0.0
    with pytest.raises(TypeError, match="channel"):
        A.ColorJitter(p=1.0)(image=refl)
    with pytest.raises(TypeError, match="channel"):
        A.ToGray(p=1.0)(image=refl)
    # Geometric transforms keep the values (and our pipeline uses OpenCV directly for them).
    flipped = A.HorizontalFlip(p=1.0)(image=db)["image"]
    np.testing.assert_array_equal(flipped, db[:, ::-1])


def test_seed_shift_scale_rotate_is_a_warp_in_albumentations_2():
    """The seed's ``A.ShiftScaleRotate(p=.5)`` still warps in Albumentations 2.0.8 (a deprecated ``Affine`` with the
    1.x ranges; only its border default became constant 0), so ``bench/bench_multicrop.py`` charges the seed's
    pipeline a warp on half of its views, as ours does. ``A.Affine()`` without arguments would be the identity. If this
    test fails, Albumentations changed: update the docstring of ``bench/bench_multicrop.py``."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    A = pytest.importorskip("albumentations")
    import warnings

    img = smooth_image(10, size=40).transpose(1, 2, 0).copy()  # (H, W, C) as the seed's open_tif
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "ShiftScaleRotate is a special case of Affine"
        ssr = A.ShiftScaleRotate(p=1.0)
    assert isinstance(ssr, A.Affine)
    assert ssr.rotate == (-45.0, 45.0) and ssr.scale == {"x": (0.9, 1.1), "y": (0.9, 1.1)}
    assert ssr.translate_percent == {"x": (-0.0625, 0.0625), "y": (-0.0625, 0.0625)}
    assert ssr.interpolation == cv2.INTER_LINEAR and ssr.border_mode == cv2.BORDER_CONSTANT
    ssr.set_random_seed(0)
    assert all(not np.array_equal(ssr(image=img)["image"], img) for _ in range(5))
    np.testing.assert_array_equal(A.Affine(p=1.0)(image=img)["image"], img)
