"""Throughput of the DINO multi-crop data pipeline per CPU core: ours (``eo_ssl.multicrop``) vs the seed's.

The seed notes built DINO's views with three Albumentations pipelines (``Channelaug`` on the first global view,
``HorizontalFlip``, ``ShiftScaleRotate``, ``RandomResizedCrop``, ``GaussianBlur``, ``Solarize`` on the second global
view, ``Normalize``, ``ToTensorV2``), applied to 120 x 120 tiles of 10 Sentinel-2 bands in reflectance: two global
views of 120 px (area 0.4-1) and six local views of 56 px (area 0.05-0.4). ``seed_pipelines`` reproduces them with
the Albumentations 2.0.8 API:

* ``RandomResizedCrop(120, 120, ...)`` -> ``RandomResizedCrop(size=(120, 120), ...)``;
* ``ShiftScaleRotate(p=.5)`` (deprecated) -> the ``Affine`` it wraps, with the 1.x defaults the seed ran with
  (shift +-0.0625, scale 0.9-1.1, rotation +-45 degrees, linear, reflect-101 border);
* ``GaussianBlur(p=...)`` and ``Solarize(threshold=0.5)`` -> 2.0.8's ``GaussianBlur`` defaults (sigma 0.5-3, kernel
  ``int(3.5 sigma) * 2 + 1``; the 1.x sigma=0 "from the kernel size" mode divides by zero in 2.0.8) and
  ``Solarize(threshold_range=(0.5, 0.5))``;
* ``Channelaug(always_apply=True)`` -> ``Channelaug(p=1.0)`` (``always_apply`` was removed).

Ours runs the same work (same views, probabilities, affine ranges, blur sigma range and kernel radius, solarisation
and normalisation, one torch tensor per view) plus drawing its per-sample generator from (seed, epoch, index).
The two are timed in alternating rounds on one thread (``OMP_NUM_THREADS=1``, ``cv2.setNumThreads(1)``,
``torch.set_num_threads(1)``) on the same synthetic tiles; the medians and their ratio are printed.

Usage::

    OMP_NUM_THREADS=1 python bench/bench_multicrop.py            # ~30 s
    OMP_NUM_THREADS=1 python bench/bench_multicrop.py --rounds 9 --samples 300 --json out.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network

import argparse
import json
import random
import statistics
import time
from typing import Callable

import cv2
import numpy as np
import torch

from eo_ssl.multicrop import MultiCropConfig, MultiCropTransform

SEED_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B11", "B08", "B8A", "B12")
"""The seed's 10-band subset, in its order."""
SEED_MEAN_DN = {"B02": 429.9430203, "B03": 614.21682446, "B04": 590.23569706, "B05": 950.68368468,
                "B06": 1792.46290469, "B07": 2075.46795189, "B08": 2218.94553375, "B8A": 2266.46036911,
                "B11": 1594.42694882, "B12": 1009.32729131}
SEED_STD_DN = {"B02": 572.41639287, "B03": 582.87945694, "B04": 675.88746967, "B05": 729.89827633,
               "B06": 1096.01480586, "B07": 1273.45393088, "B08": 1365.45589904, "B8A": 1356.13789355,
               "B11": 1079.19066363, "B12": 818.86747235}
MEANS = [SEED_MEAN_DN[b] / 10000 for b in SEED_BANDS]
STDS = [SEED_STD_DN[b] / 10000 for b in SEED_BANDS]


def seed_pipelines() -> list[Callable]:
    """The seed's eight per-view Albumentations pipelines (2 global + 6 local), in the 2.0.8 API."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    class Channelaug(A.ImageOnlyTransform):
        """The seed's channel augmentation: every band replaced by one random band (10 bands hard-coded)."""

        def __init__(self, p: float = 0.5):
            super().__init__(p=p)

        def apply(self, img, **params):
            temp = img[:, :, random.randint(0, 9), np.newaxis]
            return np.repeat(temp, 10, axis=2)

    def shift_scale_rotate() -> A.Affine:
        # ShiftScaleRotate(p=.5) with its 1.x defaults, through the Affine it is a special case of in 2.0.8.
        return A.Affine(scale=(0.9, 1.1), translate_percent={"x": (-0.0625, 0.0625), "y": (-0.0625, 0.0625)},
                        rotate=(-45, 45), shear=0, interpolation=cv2.INTER_LINEAR,
                        border_mode=cv2.BORDER_REFLECT_101, p=0.5)

    normalize = dict(mean=MEANS, std=STDS, max_pixel_value=1.0)
    globalaug1 = A.Compose([
        Channelaug(p=1.0),
        A.HorizontalFlip(p=0.5),
        shift_scale_rotate(),
        A.RandomResizedCrop(size=(120, 120), scale=(0.4, 1.0)),
        A.GaussianBlur(p=1.0),
        A.Normalize(**normalize),
        ToTensorV2(),
    ])
    globalaug2 = A.Compose([
        A.HorizontalFlip(p=0.5),
        shift_scale_rotate(),
        A.RandomResizedCrop(size=(120, 120), scale=(0.4, 1.0)),
        A.GaussianBlur(p=0.1),
        A.Solarize(threshold_range=(0.5, 0.5), p=0.2),
        A.Normalize(**normalize),
        ToTensorV2(),
    ])
    locaaug = A.Compose([
        A.HorizontalFlip(p=0.5),
        shift_scale_rotate(),
        A.RandomResizedCrop(size=(56, 56), scale=(0.05, 0.4), p=1.0),
        A.GaussianBlur(p=0.5),
        A.Normalize(**normalize),
        ToTensorV2(),
    ])
    return [globalaug1, globalaug2] + [locaaug] * 6


def seed_equivalent_config() -> MultiCropConfig:
    """Our settings doing the seed's work: its defaults plus Albumentations 2.0.8's blur sigma range."""
    return MultiCropConfig(blur_sigma=(0.5, 3.0), blur_truncate=3.5)


def synthetic_tiles(n: int, bands: int, size: int, seed: int) -> list[np.ndarray]:
    """Smooth reflectance-like (C, H, W) float32 tiles around the seed's band means."""
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(n):
        coarse = rng.standard_normal((bands, size // 8, size // 8)).astype(np.float32)
        field = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_CUBIC) for c in coarse])
        tile = np.asarray(MEANS[:bands] if bands <= len(MEANS) else [0.1] * bands, np.float32)[:, None, None]
        tiles.append(np.clip(tile + 0.5 * tile * field, 0.0, 1.5).astype(np.float32))
    return tiles


def _time(fn: Callable[[int], object], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="alternating timing rounds (median reported)")
    ap.add_argument("--samples", type=int, default=200, help="samples per round and pipeline")
    ap.add_argument("--tiles", type=int, default=32, help="distinct synthetic tiles cycled through")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    random.seed(args.seed)
    bands, size = len(SEED_BANDS), 120
    tiles_chw = synthetic_tiles(args.tiles, bands, size, args.seed)
    tiles_hwc = [np.ascontiguousarray(t.transpose(1, 2, 0)) for t in tiles_chw]  # the seed's open_tif layout

    seed_views = seed_pipelines()
    ours = MultiCropTransform(seed_equivalent_config(), MEANS, STDS, units="reflectance", as_tensor=True)

    def run_seed(i: int) -> list:
        img = tiles_hwc[i % len(tiles_hwc)]
        return [aug(image=img)["image"] for aug in seed_views]

    def run_ours(i: int) -> list:
        rng = np.random.default_rng([args.seed, 0, i])  # common.sampling.sample_rng(seed, epoch, index)
        return ours({"image": tiles_chw[i % len(tiles_chw)]}, rng)

    a, b = run_seed(0), run_ours(0)
    assert [tuple(x.shape) for x in a] == [tuple(x.shape) for x in b], "the two pipelines disagree on view shapes"
    for fn in (run_seed, run_ours):  # warm-up
        _time(fn, 20)
    seed_rates, our_rates = [], []
    for _ in range(args.rounds):
        seed_rates.append(_time(run_seed, args.samples))
        our_rates.append(_time(run_ours, args.samples))
    seed_med, our_med = statistics.median(seed_rates), statistics.median(our_rates)
    ratios = [o / s for o, s in zip(our_rates, seed_rates)]
    result = {
        "views": [list(x.shape) for x in b],
        "seed_albumentations_samples_per_s": seed_med,
        "ours_samples_per_s": our_med,
        "ratio_of_medians": our_med / seed_med,
        "ratio_per_round": ratios,
        "rounds": args.rounds,
        "samples_per_round": args.samples,
        "threads": 1,
    }
    print(f"views per sample: 2 x {size} px + 6 x 56 px, {bands} bands, {args.rounds} rounds x {args.samples} samples")
    print(f"seed pipeline (Albumentations 2.0.8): {seed_med:8.1f} samples/s per core ({1e3 / seed_med:.2f} ms/sample)")
    print(f"eo_ssl.multicrop                    : {our_med:8.1f} samples/s per core ({1e3 / our_med:.2f} ms/sample)")
    print(f"ratio (median rates): {our_med / seed_med:.2f}x  (per round: min {min(ratios):.2f}x, "
          f"max {max(ratios):.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
