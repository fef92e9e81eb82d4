"""Segmentation views on the device (:mod:`finetune.device_views`, ``augment.device: cpu | cuda``) with CPU torch:
the weak view's geometry against the CPU transform run on the same decisions (masks and valid pixels moved with
their images, padding kept apart from the ignore label), the strong views' definitions and frequencies, and a
UniMatch run end to end with an exact resume. Frequency tolerances: 4.5 binomial standard deviations (see
``tests/test_device_aug.py``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.bands import IGNORE_INDEX
from common.device_aug import uniform
from finetune.device_views import DeviceSegViews, geometry_maps
from finetune.transforms import SegAugConfig, SegmentationTransform, StrongAugConfig

NO_STRONG = StrongAugConfig(gain=0.0, offset=0.0, noise_std=0.0, speckle_looks=None, blur_p=0.0, band_dropout_p=0.0)


def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def coordinate_batch(b: int = 8, size: int = 20, bands: int = 3, nodata: bool = True) -> dict:
    """Band 0 holds each pixel's flat index ``row * size + col`` (+ 1000 b for sample b), band 1 its row, band 2 its
    column; the mask is the flat index mod 250 (so a mask value names its pixel), nodata in a corner of every tile."""
    rows = torch.arange(size, dtype=torch.float32)[:, None].expand(size, size)
    cols = torch.arange(size, dtype=torch.float32)[None, :].expand(size, size)
    flat = rows * size + cols
    image = torch.stack([torch.stack([flat + 1000 * i, rows, cols] + [rows * 0] * (bands - 3)) for i in range(b)])
    mask = (flat.long() % 250)[None].repeat(b, 1, 1)
    valid = torch.ones(b, size, size, dtype=torch.bool)
    if nodata:
        valid[:, :3, :4] = False
    return {"image": image, "mask": mask, "valid": valid, "index": torch.arange(b)}


class Replay:
    """A stand-in for the ``np.random.Generator`` of :class:`SegmentationTransform` that replays the device path's
    decisions (its uniform draws), so that the CPU transform runs on the same scale, crop, flips and rotation."""

    def __init__(self, u: list[float], cfg: SegAugConfig):
        self.scale = u[0]
        self.ints = ([u[1], u[2]] if cfg.crop_size is not None else []) + [u[5]]  # crop top, left; rot90
        self.flips = [u[3]] * cfg.hflip + [u[4]] * cfg.vflip

    def uniform(self, lo, hi, size=None):
        assert size is None
        return lo + (hi - lo) * self.scale

    def integers(self, n):
        return int(math.floor(self.ints.pop(0) * n))

    def random(self):
        return self.flips.pop(0)


@pytest.mark.parametrize("cfg", [
    SegAugConfig(crop_size=16),
    SegAugConfig(crop_size=24),  # larger than the 20 px tiles: padding
    SegAugConfig(crop_size=None),
    SegAugConfig(crop_size=16, scale_range=(0.6, 1.7)),
    SegAugConfig(crop_size=12, scale_range=(1.0, 1.0), hflip=False, rot90=False),
], ids=["crop", "pad", "whole", "rescale", "hflip-off"])
def test_weak_view_is_the_cpu_transform_on_the_same_decisions(cfg):
    """Same scale / crop / flips / rot90 (replayed): image, mask and valid equal the CPU transform's (exactly when
    nothing is rescaled); padding is invalid with the ignore label and 0 in the image."""
    cfg = SegAugConfig(**{**cfg.__dict__, "device": "cpu", "strong": NO_STRONG})
    b, size = 8, 20
    batch = coordinate_batch(b, size)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = DeviceSegViews(mean, std, cfg)(batch, gen(1))
    u = uniform((b, 6), gen(1)).tolist()  # the device path's first draws: its geometry
    cpu = SegmentationTransform(mean, std, cfg)
    rescaled = cfg.scale_range != (1.0, 1.0)
    for i in range(b):
        ref = cpu({k: v[i].numpy() for k, v in batch.items() if k != "index"}, Replay(u[i], cfg))
        assert out["image"][i].shape == ref["image"].shape
        assert torch.equal(out["mask"][i], ref["mask"]) and torch.equal(out["valid"][i], ref["valid"])
        if rescaled:
            torch.testing.assert_close(out["image"][i], ref["image"], atol=2e-4, rtol=1e-6)
        else:
            assert torch.equal(out["image"][i], ref["image"])
    if cfg.crop_size == 24:  # padded pixels: invalid, ignored, 0
        pad = ~out["valid"] & (out["image"][:, 1] == 0) & (out["image"][:, 2] == 0)
        assert pad.any() and (out["mask"][pad] == IGNORE_INDEX).all()


def test_masks_and_valid_pixels_move_with_their_images():
    """On the coordinate image: wherever a pixel is valid, its mask value is the mask of the source pixel that the
    image says it came from (mask = flat index mod 250), and the nodata corner stays invalid wherever it lands."""
    cfg = SegAugConfig(crop_size=16, device="cpu", strong=NO_STRONG)
    batch = coordinate_batch(32, 20)
    out = DeviceSegViews(np.zeros(3), np.ones(3), cfg)(batch, gen(2))
    rows, cols = out["image"][:, 1].round().long(), out["image"][:, 2].round().long()
    v = out["valid"]
    assert torch.equal(out["mask"][v], ((rows * 20 + cols) % 250)[v])
    assert (out["mask"][~v] == IGNORE_INDEX).all()
    corner = (rows < 3) & (cols < 4)  # the source's nodata corner: never valid (its values were zeroed too)
    assert not (v & corner & ((rows > 0) | (cols > 0))).any()
    # the 8 flip / rotation combinations of a square crop (the source directions of the output's rows and columns)
    # occur with frequencies 1/8 each (flips and rotations overlap: 16 draws, 8 distinct geometries)
    n = 400
    out = DeviceSegViews(np.zeros(3), np.ones(3), cfg)(coordinate_batch(n, 20, nodata=False), gen(3))
    r, c = out["image"][:, 1], out["image"][:, 2]
    steps = torch.stack([r[:, 0, 1] - r[:, 0, 0], c[:, 0, 1] - c[:, 0, 0], r[:, 1, 0] - r[:, 0, 0],
                         c[:, 1, 0] - c[:, 0, 0]], 1).round().long()
    kinds, counts = steps.unique(dim=0, return_counts=True)
    assert len(kinds) == 8 and (kinds.abs().sum(1) == 2).all()
    assert ((counts / n - 1 / 8).abs() <= 4.5 * math.sqrt(7 / 64 / n)).all()


def test_weak_photometric_jitter_and_strong_views_follow_the_cpu_definitions():
    units = ("reflectance", "reflectance", "db")
    mean, std = np.array([0.2, 0.3, -12.0], np.float32), np.array([0.1, 0.1, 3.0], np.float32)
    batch = coordinate_batch(64, 16, nodata=True)
    batch["image"] = torch.rand(64, 3, 16, 16, generator=gen(3)) * torch.tensor([0.5, 0.5, 10.0])[:, None, None] \
        + torch.tensor([0.0, 0.0, -17.0])[:, None, None]
    strong = StrongAugConfig(gain=0.2, offset=0.1, noise_std=0.0, speckle_looks=None, blur_p=0.0, band_dropout_p=0.0)
    cfg = SegAugConfig(crop_size=None, hflip=False, vflip=False, rot90=False, contrast=0.1, brightness=0.2,
                       device="cpu", strong=strong)
    out = DeviceSegViews(mean, std, cfg, n_strong=2, units=units)(batch, gen(4))
    z = (batch["image"] - torch.from_numpy(mean)[:, None, None]) / torch.from_numpy(std)[:, None, None]
    v = out["valid"][:, None]
    assert torch.equal(out["valid"], batch["valid"]) and (out["image"].masked_select(~v) == 0).all()
    # weak: x * (1 + U(-c, c)) + U(-b, b) per band: fit (gain, bias) per sample and band on the valid pixels
    zz, yy = z.masked_select(v.expand_as(z)).view(64, 3, -1), out["image"].masked_select(v.expand_as(z)).view(64, 3, -1)
    gain = ((yy - yy.mean(2, keepdim=True)) * (zz - zz.mean(2, keepdim=True))).sum(2) / (
        (zz - zz.mean(2, keepdim=True)) ** 2).sum(2)
    bias = yy.mean(2) - gain * zz.mean(2)
    assert ((gain - 1).abs() <= 0.1 + 1e-4).all() and (bias.abs() <= 0.2 + 1e-4).all()
    assert float((gain - 1).abs().max()) > 0.08 and float(bias.abs().max()) > 0.15  # the ranges are used
    # strong: gain on reflectance bands only, offset on all, relative to the weak view
    s = out["strong"]
    assert s.shape == (64, 2, 3, 16, 16) and s.dtype == torch.float32
    weak = out["image"][:, None]
    m = v[:, None].expand_as(s)
    g_db = (s[:, :, 2] - weak[:, :, 2]).masked_select(m[:, :, 2]).view(64, 2, -1)
    assert torch.allclose(g_db, g_db[..., :1], atol=1e-5) and (g_db.abs() <= 0.1 + 1e-5).all()  # offset only
    assert (s.masked_select(~m) == 0).all()
    refl = (s[:, :, :2] - s[:, :, :2].mean((3, 4), keepdim=True)).flatten(3).norm(dim=3) / (
        weak[:, :, :2] - weak[:, :, :2].mean((3, 4), keepdim=True)).flatten(3).norm(dim=3)  # the gains
    assert ((refl - 1).abs() <= 0.2 + 1e-4).all() and float((refl - 1).abs().max()) > 0.15


def test_strong_view_frequencies_speckle_blur_and_band_dropout():
    units = ("reflectance",) * 3 + ("db",)
    mean, std = np.array([0.2] * 3 + [-12.0], np.float32), np.array([0.1] * 3 + [3.0], np.float32)
    n = 1000
    batch = {"image": torch.full((n, 4, 12, 12), 0.2).index_put_((torch.arange(n), torch.tensor(3)),
                                                                torch.tensor(-12.0)),
             "valid": torch.ones(n, 12, 12, dtype=torch.bool), "index": torch.arange(n)}
    batch["image"][:, :, 6, 6] += torch.tensor([0.1, 0.1, 0.1, 3.0])  # one bright pixel: blur spreads it
    strong = StrongAugConfig(gain=0.0, offset=0.0, noise_std=0.0, speckle_looks=4.0, blur_p=0.3,
                             band_dropout_p=0.4)
    cfg = SegAugConfig(crop_size=None, hflip=False, vflip=False, rot90=False, device="cpu", strong=strong)
    out = DeviceSegViews(mean, std, cfg, n_strong=1, units=units)(batch, gen(5))
    s = out["strong"][:, 0]
    dropped = (s == 0).flatten(2).all(2)  # (n, 4)
    assert (dropped.sum(1) < 4).all()  # at least one band kept
    p_drop = float(dropped[:, :3].double().mean())  # optical bands (a dB band is never exactly 0 with speckle)
    assert abs(p_drop - 0.4) <= 4.5 * math.sqrt(0.24 / (3 * n)) + 0.4 ** 4  # (+ the "keep one" correction)
    kept = ~dropped[:, 0]
    blurred = kept & (s[:, 0, 6, 7] > 1e-3)  # the bright pixel leaked into its neighbour
    assert abs(float(blurred.double().sum() / kept.sum()) - 0.3) <= 4.5 * math.sqrt(0.21 / float(kept.sum()))
    # speckle on the dB band only: 10 log10(G) / std added, G ~ Gamma(4, 1/4) (mean 1) away from the bright pixel
    keep_db = ~dropped[:, 3] & ~blurred
    g = 10 ** (s[keep_db, 3, :4, :4].double() * 3.0 / 10)
    assert abs(float(g.mean()) - 1) < 4.5 * 0.5 / math.sqrt(g.numel())
    assert torch.equal(s[kept & ~blurred, 0, :4, :4], torch.zeros_like(s[kept & ~blurred, 0, :4, :4]))


def test_same_generator_same_views_and_config_checks():
    cfg = SegAugConfig(crop_size=16, scale_range=(0.75, 1.5), contrast=0.1, noise_std=0.05, device="cpu")
    batch = coordinate_batch(4, 20)
    t = DeviceSegViews(np.zeros(3), np.ones(3), cfg, n_strong=2, units=("reflectance",) * 3)
    a, b = t(batch, gen(6)), t(batch, gen(6))
    assert all(torch.equal(a[k], b[k]) for k in ("image", "mask", "valid", "strong"))
    assert not torch.equal(a["image"], t(batch, gen(7))["image"])
    with pytest.raises(ValueError, match="crop_size"):
        SegAugConfig(scale_range=(0.5, 1.5), device="cuda").validate()
    with pytest.raises(ValueError, match="workers"):
        DeviceSegViews(np.zeros(3), np.ones(3), SegAugConfig())
    with pytest.raises(ValueError, match="square"):
        DeviceSegViews(np.zeros(3), np.ones(3), SegAugConfig(device="cpu"))(
            {**batch, "image": batch["image"][..., :18], "valid": batch["valid"][..., :18],
             "mask": batch["mask"][..., :18]}, gen(0))
    ys, xs, yi, xi, inside = geometry_maps(SegAugConfig(crop_size=8), 2, 20, 20, gen(0))
    assert ys.shape == yi.shape == inside.shape == (2, 8, 8) and inside.all()


# ------------------------------------------------------------------------------------------ end to end
def test_unimatch_with_device_views_trains_and_resumes_exactly(tiny_demo, tmp_path):
    """UniMatch (labelled weak view + unlabelled weak and two strong views) with ``augment.device: cpu``: 4 steps
    straight equal 2 steps + resume + 2 steps."""
    from conftest import assert_same_last_weights, cut_back, launch
    from test_method_unimatch import CONFIG, _check_run, _overrides

    over = [*_overrides(tiny_demo), "augment.device=cpu"]
    run = tmp_path / "run"
    launch("finetune/semisup.py", ["--config", CONFIG, "--output-dir", str(run), *over])
    _check_run(run, 4)
    assert "device: cpu" in (run / "config.yaml").read_text()
    cut = cut_back(run, tmp_path / "cut")
    res = launch("finetune/semisup.py", ["--config", CONFIG, "--output-dir", str(cut), "--resume", *over])
    assert "resumed from" in res.stdout + res.stderr
    assert_same_last_weights(run, cut)


def test_stream_loader_picks_the_path(tiny_demo):
    from common.bands import resolve_sensor
    from common.device_aug import DecodedTiles, collate_decoded
    from common.sampling import AugmentedDataset
    from finetune.config import SegDataConfig
    from finetune.data import stream_dataset, stream_loader

    data = SegDataConfig(root=str(tiny_demo / "s2" / "source"), labelled_split="labelled_1_8",
                         unlabelled_split="unlabelled_1_8")
    spec = resolve_sensor("S2L2A")
    aug = SegAugConfig(crop_size=16, device="cpu")
    ds = stream_dataset("unlabelled", data, spec, aug, seed=0, n_strong=2)
    loader = stream_loader(ds, 2, spec, aug, n_strong=2)
    assert isinstance(ds, DecodedTiles) and isinstance(loader.device_transform, DeviceSegViews)
    out = loader.device_transform(collate_decoded([ds[0], ds[1]]), gen())
    assert out["image"].shape == (2, 12, 16, 16) and out["strong"].shape == (2, 2, 12, 16, 16)
    assert "mask" not in out and out["valid"].dtype == torch.bool
    lab = stream_dataset("labelled", data, spec, aug, seed=0)
    out = stream_loader(lab, 2, spec, aug).device_transform(collate_decoded([lab[0], lab[1]]), gen())
    assert out["mask"].shape == (2, 16, 16) and out["mask"].dtype == torch.int64 and "strong" not in out
    workers = SegAugConfig(crop_size=16)
    assert isinstance(stream_dataset("labelled", data, spec, workers, seed=0), AugmentedDataset)
    assert stream_loader(None, 2, spec, workers).device_transform is None
