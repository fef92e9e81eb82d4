"""Augmentation on the device (``augment.device: cpu | cuda``), run with CPU torch: the batched building blocks
(:mod:`common.device_aug`) and DINO's batched multi-crop (:mod:`eo_ssl.multicrop_device`) against OpenCV and the
CPU pipeline (:mod:`eo_ssl.multicrop`), the parameters' distributions, determinism, and pretraining end to end
(with an exact resume).

Frequency tolerances: an event of probability ``p`` counted over ``n`` independent draws has a binomial standard
deviation ``sqrt(p (1 - p) / n)``; the tests allow 4.5 of them (a two-sided miss chance below 1e-5 for a correct
sampler; the seeds are fixed, so a test never flickers).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.device_aug import (
    DecodedTiles,
    collate_decoded,
    gamma_noise,
    gaussian_blur,
    gaussian_kernels,
    sample_crop_boxes,
)
from common.errors import UserInputError
from eo_ssl.multicrop import MultiCropConfig, MultiCropTransform, _crop_affine_matrix, _crop_box, collate_multicrop
from eo_ssl.multicrop_device import DeviceMultiCrop
from test_multicrop import smooth_image

NONE3 = (0.0, 0.0, 0.0)
ALL3 = (1.0, 1.0, 1.0)
# photometric operations off: a view is then the resampled tile, normalised
GEOMETRY_ONLY = dict(blur_p=NONE3, solarize_p=NONE3, channel_p=NONE3, jitter_p=NONE3, noise_p=NONE3)


def binomial_tol(p: float, n: int) -> float:
    return 4.5 * math.sqrt(max(p * (1 - p), 1e-12) / n)


def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def make(bands: int, units="reflectance", mean=None, std=None, **kw) -> DeviceMultiCrop:
    cfg = MultiCropConfig(**{"global_size": 32, "local_size": 16, "local_number": 3, "device": "cpu", **kw})
    mean = np.linspace(0.1, 0.3, bands) if mean is None else mean
    std = np.linspace(0.05, 0.2, bands) if std is None else std
    return DeviceMultiCrop(cfg, mean, std, units=units)


def tiles(bands: int, n: int, size: int = 48, low: float = 0.0, high: float = 0.6) -> torch.Tensor:
    return torch.from_numpy(np.stack([smooth_image(bands, size, seed=s, low=low, high=high) for s in range(n)]))


# ------------------------------------------------------------------------------------------ building blocks
def test_crop_boxes_are_the_cpu_pipelines_on_the_same_draws():
    u = torch.rand(3000, 22, dtype=torch.float64, generator=gen(1))
    for (h, w), scale in [((48, 48), (0.4, 1.0)), ((48, 48), (0.05, 0.4)), ((20, 60), (0.9, 1.0)), ((7, 5), (1, 1))]:
        got = torch.stack(sample_crop_boxes(u, h, w, scale, (3 / 4, 4 / 3)), 1).tolist()
        assert got == [list(_crop_box(row, 0, h, w, scale, (3 / 4, 4 / 3))) for row in u.tolist()]


def test_blur_matches_opencv_per_sample_sigma_and_radius():
    y = torch.from_numpy(np.stack([smooth_image(2, 16, seed=s) for s in range(4)]))
    sigma = torch.tensor([0.1, 0.7, 1.5, 2.0], dtype=torch.float64)
    radius = torch.tensor([1, 2, 5, 7])
    out = gaussian_blur(y, gaussian_kernels(sigma, radius, 7))
    for i in range(4):
        r, s = int(radius[i]), float(sigma[i])
        ref = [cv2.GaussianBlur(y[i, c].numpy(), (2 * r + 1,) * 2, s, sigmaY=s, borderType=cv2.BORDER_REFLECT_101)
               for c in range(2)]
        np.testing.assert_allclose(out[i].numpy(), np.stack(ref), atol=1e-6)
    # radius 0: a unit impulse, the values come back unchanged
    same = gaussian_blur(y, gaussian_kernels(sigma, torch.zeros(4, dtype=torch.long), 7))
    assert torch.equal(same, y)


@pytest.mark.parametrize("looks", [4.0, 1.0, 2.5, 0.5])  # sums of exponentials; Marsaglia-Tsang
def test_gamma_speckle_has_mean_one_and_the_gamma_distribution(looks):
    from scipy import stats

    n = 200_000
    g = gamma_noise((n,), looks, gen(2)).double()
    assert g.dtype == torch.float64 and (g > 0).all()
    sd = math.sqrt(1 / looks)  # Gamma(L, 1/L): mean 1, variance 1/L
    assert abs(float(g.mean()) - 1.0) < 4.5 * sd / math.sqrt(n)
    assert abs(float(g.var()) - 1 / looks) < 0.05 / looks
    assert stats.kstest(g[:20_000].numpy(), "gamma", args=(looks, 0, 1 / looks)).pvalue > 1e-3
    assert torch.equal(gamma_noise((5, 7), looks, gen(3)), gamma_noise((5, 7), looks, gen(3)))


def test_decoded_tiles_and_collate():
    class Base(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            size = 8 if i < 2 else 9
            return {"image": np.ones((2, size, size), np.float32), "valid": np.ones((size, size), bool),
                    "id": f"t{i}", "index": i}

    ds = DecodedTiles(Base())
    s = ds[(5, 1)]  # (epoch, index) from the engine's sampler: the epoch is not used
    assert set(s) == {"image", "valid", "index"} and s["index"] == 1 and s["image"].dtype == torch.float32
    batch = collate_decoded([ds[0], ds[1]])
    assert batch["image"].shape == (2, 2, 8, 8) and batch["valid"].dtype == torch.bool
    with pytest.raises(UserInputError, match="data.tile_size"):
        collate_decoded([ds[0], ds[2]])


# ------------------------------------------------------------------------------------------ DINO multi-crop
@pytest.mark.parametrize("bands", [1, 2, 12])
def test_views_have_the_cpu_pipelines_shapes_and_dtypes(bands):
    kw = dict(jitter_p=ALL3, noise_p=(0.5, 0.5, 0.5), band_dropout_p=(0.3, 0.3, 0.3), vflip_p=(0.5, 0.5, 0.5))
    x = tiles(bands, 4)
    views = make(bands, **kw)({"image": x}, gen())
    cpu = MultiCropTransform(MultiCropConfig(global_size=32, local_size=16, local_number=3, **kw),
                             np.linspace(0.1, 0.3, bands), np.linspace(0.05, 0.2, bands))
    ref = collate_multicrop([cpu(x[i].numpy(), np.random.default_rng(i)) for i in range(4)])
    assert [(v.shape, v.dtype) for v in views] == [(r.shape, r.dtype) for r in ref]
    assert all(v.is_contiguous() and torch.isfinite(v).all() for v in views)
    assert make(bands).sizes == cpu.sizes


def test_geometry_matches_opencv_given_the_parameters():
    """Crop + resize (+ flips) against ``cv2.resize`` of the crop, crop + affine against ``cv2.warpAffine`` with the
    CPU pipeline's own matrix (reflect-101 border), on each row's drawn parameters."""
    bands = 3
    t = make(bands, mean=np.zeros(bands), std=np.ones(bands), vflip_p=(0.5, 0.5, 0.5), **GEOMETRY_ONLY)
    x = tiles(bands, 16)
    g = gen(1)
    for kinds, size, scale in t.view_groups:
        p = t.sample(16, (48, 48), kinds, size, scale, g)
        out = t.apply(x, p, size, g).reshape(len(kinds) * 16, bands, *size)
        for r in range(out.shape[0]):
            img = x[r % 16].numpy()
            top, left, ch, cw = p.box[r].tolist()
            if p.affine[r]:
                m = _crop_affine_matrix((top, left, ch, cw), size, (48, 48), float(p.angle[r]), float(p.zoom[r]),
                                        tuple(p.shift[r].tolist()), bool(p.hflip[r]), bool(p.vflip[r]))
                ref = np.stack([cv2.warpAffine(b, m, size[::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                               borderMode=cv2.BORDER_REFLECT_101) for b in img])
            else:
                ref = np.stack([cv2.resize(b[top:top + ch, left:left + cw], size[::-1]) for b in img])
                ref = ref[:, :, ::-1] if p.hflip[r] else ref
                ref = ref[:, ::-1] if p.vflip[r] else ref
            np.testing.assert_allclose(out[r].numpy(), ref, atol=2e-6)
        assert p.affine.any() and (~p.affine).any() and p.hflip.any() and p.vflip.any()


def test_parameter_distributions_follow_the_config():
    cfg_kw = dict(hflip_p=(0.5, 0.2, 0.7), vflip_p=(0.1, 0.3, 0.5), affine_p=(0.5, 0.5, 0.5), blur_p=(1.0, 0.1, 0.5),
                  solarize_p=(0.0, 0.2, 0.0), channel_p=(1.0, 0.0, 0.0), band_dropout_p=(0.2, 0.2, 0.4),
                  jitter_p=(0.8, 0.8, 0.8), noise_p=(0.5, 0.5, 0.5))
    t = make(12, **cfg_kw)
    b = 2000
    cfg = t.cfg
    for kinds, size, scale in t.view_groups:
        p = t.sample(b, (48, 48), kinds, size, scale, gen(7))
        area = (p.box[:, 2] * p.box[:, 3]).double() / (48 * 48)
        # rounding the crop's sides to whole pixels moves the area by at most ~ (h + w) / 2 + 1/4 pixels
        slack = (p.box[:, 2] + p.box[:, 3]).double() / 2 / (48 * 48) + 1e-9
        assert ((area >= scale[0] - slack) & (area <= scale[1] + slack)).all()
        ar = p.box[:, 3].double() / p.box[:, 2].double()
        assert float(ar.min()) > 0.6 and float(ar.max()) < 1.5  # ratio (3/4, 4/3) up to rounding
        for v, kind in enumerate(kinds[:2]):
            rows = slice(v * b, (v + 1) * b)
            for name, flag in [("hflip_p", p.hflip), ("vflip_p", p.vflip), ("affine_p", p.affine),
                               ("blur_p", p.blur), ("solarize_p", p.solarize), ("channel_p", p.channel),
                               ("jitter_p", p.jitter), ("noise_p", p.noise)]:
                prob = getattr(cfg, name)[kind]
                assert abs(float(flag[rows].double().mean()) - prob) <= binomial_tol(prob, b), (name, kind)
            dropped = p.drop[rows].sum(1)
            prob = cfg.band_dropout_p[kind]
            assert abs(float((dropped > 0).double().mean()) - prob) <= binomial_tol(prob, b)
            assert int(dropped.max()) <= int(cfg.band_dropout_max * 12)  # at most half of the 12 bands
        assert ((p.sigma >= cfg.blur_sigma[0]) & (p.sigma <= cfg.blur_sigma[1])).all()
        want = torch.clamp(torch.floor(cfg.blur_truncate * p.sigma).long(), 1, min(size) - 1)
        assert torch.equal(p.radius[p.blur], want[p.blur]) and (p.radius[~p.blur] == 0).all()
        assert ((p.angle.abs() <= cfg.affine_rotate) & (p.zoom >= 0.9) & (p.zoom <= 1.1)).all()
        assert (p.shift.abs() <= cfg.affine_shift).all()
        chosen = p.src_band[p.channel][:, 0]
        if chosen.numel():  # the replacing band is uniform over the 12 bands
            counts = torch.bincount(chosen, minlength=12).double() / chosen.numel()
            assert (counts - 1 / 12).abs().max() <= binomial_tol(1 / 12, chosen.numel())


@pytest.mark.parametrize("mode", ["raw", "normalized"])
def test_channel_augmentation_makes_every_band_one_input_band(mode):
    """Same generator seed, channel_p 1 vs 0: the draws (hence the geometry) are the same, so every band of a view
    with channel augmentation is band ``b`` of the view without it (normalised with its own statistics in
    ``normalized`` mode, with each output band's in ``raw`` mode)."""
    bands = 5
    mean, std = np.linspace(0.1, 0.3, bands), np.linspace(0.05, 0.2, bands)
    kw = dict(mean=mean, std=std, channel_mode=mode, blur_p=(1.0, 0.5, 0.5), **{
        k: v for k, v in GEOMETRY_ONLY.items() if k not in ("channel_p", "blur_p")})
    x = tiles(bands, 6)
    with_aug = make(bands, channel_p=ALL3, **kw)({"image": x}, gen(3))
    without = make(bands, channel_p=NONE3, **kw)({"image": x}, gen(3))
    p = make(bands, channel_p=ALL3, **kw).sample(6, (48, 48), (0, 1), (32, 32), (0.4, 1.0), gen(3))
    band = p.src_band[:, 0].view(2, 6)
    for v in range(2):
        for i in range(6):
            b = int(band[v, i])
            raw_b = without[v][i, b].double() * std[b] + mean[b]  # band b in model units
            for c in range(bands):
                if mode == "normalized":
                    assert torch.equal(with_aug[v][i, c], without[v][i, b])
                else:
                    torch.testing.assert_close(with_aug[v][i, c].double(), (raw_b - mean[c]) / std[c], atol=1e-5,
                                               rtol=0)


def test_solarisation_only_on_optical_bands():
    units = ["reflectance"] * 3 + ["db"] * 2
    x = tiles(5, 4)
    x[:, 3:] = -15.0 + 10.0 * x[:, 3:]
    kw = dict(units=units, mean=[0.2] * 3 + [-12.0] * 2, std=[0.1] * 3 + [3.0] * 2, **GEOMETRY_ONLY)
    on = make(5, **{**kw, "solarize_p": ALL3})({"image": x}, gen(4))
    off = make(5, **kw)({"image": x}, gen(4))
    for a, b in zip(on, off):
        assert torch.equal(a[:, 3:], b[:, 3:])  # dB bands untouched
        assert (a[:, :3] <= 0).all() and torch.equal(a[:, :3], torch.where(b[:, :3] > 0, -b[:, :3], b[:, :3]))


def test_jitter_speckle_noise_and_dropout_follow_the_cpu_definitions():
    """A full-tile, same-size view (identity geometry) of a dB + reflectance + ratio stack: the jitter's per-band
    gain / contrast act as the CPU pipeline defines them, given the drawn parameters."""
    units = ["reflectance", "db", "other"]
    mean, std = np.array([0.2, -12.0, 1.0]), np.array([0.1, 3.0, 0.5])
    x = tiles(3, 8, size=32)
    x[:, 1] = -15.0 + 10.0 * x[:, 1]
    kw = dict(units=units, mean=mean, std=std, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=NONE3,
              affine_p=NONE3, **{k: v for k, v in GEOMETRY_ONLY.items() if k not in ("jitter_p", "noise_p")})
    t = make(3, jitter_p=ALL3, local_number=0, **kw)
    p = t.sample(8, (32, 32), (0, 1), (32, 32), (1.0, 1.0), gen(5))
    out = t.apply(x, p, (32, 32), gen(5)).reshape(16, 3, 32, 32).double()
    for r in range(16):
        xi = x[r % 8].double()
        k, g = float(p.contrast[r]), p.gain[r]
        assert float(g[2]) == 1.0  # no gain on a ratio band
        m = xi.mean(dim=(1, 2))
        want = [g[0] * (m[0] + k * (xi[0] - m[0])), m[1] + k * (xi[1] - m[1]) + 10 * torch.log10(g[1]),
                g[2] * (m[2] + k * (xi[2] - m[2]))]
        for c in range(3):
            torch.testing.assert_close(out[r, c] * std[c] + mean[c], want[c], atol=1e-4 * abs(mean[c]) + 1e-5,
                                       rtol=1e-5)
    # speckle: multiplicative Gamma noise of mean 1 in linear power on the dB band only
    sar = make(3, noise="speckle", noise_p=ALL3, speckle_looks=4.0, local_number=0,
               **{**kw, "units": ["reflectance", "db", "db"]})
    plain = make(3, local_number=0, **{**kw, "units": ["reflectance", "db", "db"]})
    a, b = sar({"image": x}, gen(6))[0], plain({"image": x}, gen(6))[0]
    assert torch.equal(a[:, 0], b[:, 0])
    ratio = 10 ** ((a[:, 1].double() - b[:, 1].double()) * std[1] / 10)  # G, from the dB difference
    assert abs(float(ratio.mean()) - 1) < 4.5 * 0.5 / math.sqrt(ratio.numel())
    # Gaussian noise in normalised units, band dropout to 0
    noisy = make(3, noise_p=ALL3, noise_std=0.05, local_number=0, **kw)({"image": x}, gen(6))[0]
    assert abs(float((noisy - b).std()) - 0.05) < 0.005
    dropped = make(3, band_dropout_p=ALL3, band_dropout_max=1.0, local_number=0, **kw)({"image": x}, gen(6))[0]
    zero = (dropped == 0).flatten(2).all(2)  # (B, C) bands set to 0
    assert (zero.sum(1) >= 1).all() and (zero.sum(1) <= 2).all()  # 1..n-1 bands


def test_sensor_dropout_drops_one_whole_group():
    t = make(5, sensor_groups=((0, 1, 2), (3, 4)), sensor_dropout_p=ALL3, **GEOMETRY_ONLY)
    views = t({"image": tiles(5, 64)}, gen(8))
    for v in views:
        zero = (v == 0).flatten(2).all(2)
        assert (zero[:, :3].all(1) ^ zero[:, 3:].all(1)).all()
        assert zero[:, :3].all(1).any() and zero[:, 3:].all(1).any()


def test_same_generator_same_views_and_batch_statistics_like_the_cpu_pipeline():
    cfg_kw = dict(jitter_p=(0.8, 0.8, 0.8), channel_p=NONE3)  # (the channel choice alone dominates a batch mean)
    t = make(4, **cfg_kw)
    x = torch.rand(64, 4, 48, 48, generator=gen(11)) * 0.6  # i.i.d. pixels: a view's statistics barely depend on
    #                                                         where its crop lies, only on the augmentation
    a, b = t({"image": x}, gen(9)), t({"image": x}, gen(9))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], t({"image": x}, gen(10))[0])
    # the two paths draw from the same distributions: per-view means and spreads agree over 64 samples
    cpu = MultiCropTransform(MultiCropConfig(global_size=32, local_size=16, local_number=3, **cfg_kw),
                             np.linspace(0.1, 0.3, 4), np.linspace(0.05, 0.2, 4))
    ref = collate_multicrop([cpu(x[i].numpy(), np.random.default_rng(i)) for i in range(64)])
    for u, v in zip(a, ref):  # two-sample z-tests on the per-sample means and spreads of each view
        for stat in (lambda t: t.flatten(1).mean(1), lambda t: t.flatten(1).std(1)):
            su, sv = stat(u).double(), stat(v).double()
            se = math.sqrt(su.var() / len(su) + sv.var() / len(sv))
            assert abs(float(su.mean() - sv.mean())) <= 4.5 * se


def test_workers_is_not_a_device():
    with pytest.raises(ValueError, match="workers"):
        DeviceMultiCrop(MultiCropConfig(), [0.0], [1.0])


# ------------------------------------------------------------------------------------------ end to end
def test_pretraining_with_device_augmentation_resumes_exactly(tiny_demo, tmp_path):
    """``augment.device: cuda`` on a CPU-only run (the batched path on the CPU, with a note): 4 steps straight
    equal 2 steps + resume + 2 steps, bit for bit."""
    from conftest import assert_same_last_weights, cut_back, launch
    from test_pretrain import CONFIG, tiny_overrides

    over = [*tiny_overrides(tiny_demo), "augment.device=cuda", "probe.root=null", "trainer.eval_every=null"]
    run = tmp_path / "run"
    res = launch("ssl/pretrain.py", ["--config", CONFIG, "--output-dir", str(run), *over])
    assert "batched augmentation of stream 'tiles' runs on the cpu" in res.stdout + res.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    assert (run / "backbone.safetensors").is_file()
    cut = cut_back(run, tmp_path / "cut", drop=("backbone.safetensors", "backbone.json"))
    res = launch("ssl/pretrain.py", ["--config", CONFIG, "--output-dir", str(cut), "--resume", *over])
    assert "resumed from" in res.stdout + res.stderr
    assert_same_last_weights(run, cut)


def test_device_stream_of_a_pretraining_config(tiny_demo):
    """``augment.device`` picks the stream: decoded tiles + the device transform, or the worker pipeline."""
    from common.bands import resolve_sensor
    from common.config import load_config
    from common.sampling import AugmentedDataset
    from eo_ssl.pretrain import PretrainConfig, build_dataset, tile_stream
    from test_pretrain import CONFIG

    spec = resolve_sensor("S2L2A")
    base = [f"data.root={tiny_demo}", "data.glob=s2/source/images/*.tif", "data.batch_size=4"]
    cfg = load_config(PretrainConfig, CONFIG, base + ["augment.device=cpu"])
    ds = build_dataset(cfg, spec)
    stream = tile_stream(cfg, spec, ds)
    assert isinstance(ds, DecodedTiles) and isinstance(stream.device_transform, DeviceMultiCrop)
    batch = collate_decoded([ds[i] for i in range(4)])
    views = stream.device_transform(batch, gen())
    assert [tuple(v.shape) for v in views] == [(4, 12, *s) for s in stream.device_transform.sizes]
    cfg = load_config(PretrainConfig, CONFIG, base)
    assert isinstance(build_dataset(cfg, spec), AugmentedDataset)
    assert tile_stream(cfg, spec, build_dataset(cfg, spec)).device_transform is None
    with pytest.raises(Exception, match="augment.device"):
        load_config(PretrainConfig, CONFIG, base + ["augment.device=gpu"])


def test_engine_applies_a_streams_device_transform_with_the_step_generator(tmp_path):
    """``LoaderSpec.device_transform``: called once per micro-batch, before ``training_step``, without gradient,
    with the generator ``ctx.generator(device, DEVICE_TRANSFORM_STREAM + loader index)``; the method gets its
    output."""
    from torch import nn

    from common.device_aug import DeviceTransform
    from common.engine import DEVICE_TRANSFORM_STREAM, Engine, LoaderSpec, TrainerConfig
    from common.method import Method, StepContext
    from common.optim import OptimConfig
    from toy_train import ToyData

    calls: list[tuple[float, bool]] = []

    class AddNoise(DeviceTransform):
        def __call__(self, batch, generator):
            draw = torch.rand(1, generator=generator, device=generator.device)
            calls.append((float(draw), torch.is_grad_enabled()))
            return {**batch, "x": batch["x"] + draw, "draw": draw.expand(len(batch["x"]))}

    seen: list[tuple[int, int, float]] = []

    class Toy(Method):
        name, streams, trainable = "toy_dev", ("main",), ("net",)

        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 1)

        def param_groups(self):
            return [{"params": list(self.net.parameters())}]

        def training_step(self, batch, ctx):
            seen.append((ctx.step, ctx.micro, float(batch["main"]["draw"][0])))
            return {"loss": (self.net(batch["main"]["x"]).squeeze(1) - batch["main"]["y"]).pow(2).mean()}

    cfg = TrainerConfig(max_steps=3, grad_accum_steps=2, progress_bar=False, seed=5)
    engine = Engine(cfg, tmp_path / "run", cpu=True)
    engine.fit(Toy(), {"main": LoaderSpec(ToyData(), 4, device_transform=AddNoise("cuda"))},
               OptimConfig(name="sgd", lr=0.1))
    assert len(calls) == len(seen) == 6 and not any(grad for _, grad in calls)
    for (step, micro, draw), (called, _) in zip(seen, calls):
        g = StepContext(engine, step, 0, micro, 2).generator(torch.device("cpu"), DEVICE_TRANSFORM_STREAM)
        assert draw == called == float(torch.rand(1, generator=g))
    assert len({d for _, _, d in seen}) == 6  # a new draw every micro-batch
