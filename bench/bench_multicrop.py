"""Throughput of the DINO multi-crop data pipeline per CPU core: ours (``eo_ssl.multicrop``) vs the seed's.

The seed notes (``004_...txt``, "SSL code explain") build DINO's views with three Albumentations pipelines applied to
120 x 120 tiles of 10 Sentinel-2 bands in reflectance (``open_tif``: DN / 10000, ``(H, W, C)`` float32): two global
views of 120 px (area 0.4-1) and six local views of 56 px (area 0.05-0.4). ``seed_pipelines`` is that code as written,
run with the installed Albumentations 2.0.8. Call by call, what the seed wrote and what 2.0.8 does with it:

* ``Channelaug(always_apply=True)`` (the seed's own class, first global view) -> ``Channelaug(p=1.0)``: its
  ``super().__init__(always_apply, p)`` passes ``always_apply`` as 2.0.8's only parameter, ``p``, so as written it
  runs with ``p = True = 1.0`` (every time), as meant. It copies one random band into all 10 bands.
* ``A.HorizontalFlip(p=0.5)``: unchanged.
* ``A.ShiftScaleRotate(p=.5)``: **unchanged, and not an identity**. 2.0.8 keeps it as a deprecated subclass of
  ``Affine`` with the 1.x ranges (shift +-0.0625 of the side, scale 0.9-1.1, rotation +-45 degrees, linear
  interpolation); only its border default changed (1.x: reflect-101; 2.0.8: constant 0). Half of the views are
  therefore warped: the whole 120 x 120 x 10 tile, in chunks of at most 4 bands (``albucore``), before the crop.
  (``A.Affine()`` *without arguments* is the identity in 2.0.8 and is skipped, but the seed never calls it.)
* ``A.RandomResizedCrop(120, 120, scale=(0.4, 1.))`` -> ``RandomResizedCrop(size=(120, 120), scale=(0.4, 1.0))``
  and ``RandomResizedCrop(56, 56, scale=(0.05, 0.4), always_apply=True)`` -> ``size=(56, 56), p=1.0``: 2.0.8 takes
  one ``size`` tuple and refuses the positional height, width (a validation error). Linear interpolation, both.
* ``A.GaussianBlur(p=...)``: unchanged; 2.0.8's defaults ``blur_limit=0, sigma_limit=(0.5, 3.0)`` draw sigma in
  0.5-3 and a kernel of ``int(3.5 sigma) * 2 + 1`` taps, reflect-101 border, result clipped to [0, 1].
* ``A.Solarize(threshold=0.5, p=0.2)``: 2.0.8 ignores ``threshold`` with a warning and uses its default
  ``threshold_range=(0.5, 0.5)``, the same threshold; written here as ``Solarize(threshold_range=(0.5, 0.5))``.
* ``A.Normalize(mean=means, std=stds, max_pixel_value=1.0)`` and ``ToTensorV2()``: unchanged (the seed's band
  statistics / 10000; ``ToTensorV2`` returns a transposed, non-contiguous view).

Like for like: ours (``seed_equivalent_config``) makes the same views with the same probabilities: flips, an affine
with the same ranges on half of the views, blur with the same sigma range and kernel radius, channel augmentation on
the first global view, solarisation on the second, normalisation, one torch tensor per view; it also draws its
per-sample generator from (seed, epoch, index). Ours differs in how it does the work, not in how much work it is
asked to do: the affine, the crop and the resize are one warp of the crop (the seed warps the whole tile, then crops
and resizes), the channel-augmented view is processed as one band and broadcast at the end (the seed processes ten
copies), nothing is clipped, its views are contiguous ``(C, h, w)`` tensors, and its affine border is reflect-101
where the seed's is constant in 2.0.8 (which makes the seed's whole-tile warp ~10% cheaper than with reflect-101, the
1.x default this script used before; for our warp of the crop both cost the same). ``--geometry none`` removes the
warp from both sides (the seed without ``ShiftScaleRotate``, ours with ``affine_p = 0``), for comparison only.

Timing: one thread (``OMP_NUM_THREADS=1``, ``cv2.setNumThreads(1)``, ``torch.set_num_threads(1)``), the same
synthetic tiles, each pipeline in its own spawned process, as in a data-loader worker. (Sharing one process, the
seed's allocations made glibc hand freed memory back to the system and ours fault it in again: 0 to 555 page faults
per sample, up to 2x its time, depending on the heap's history. The seed's pipeline as the main process of a plain
script takes ~900 per sample. In these workers neither takes any, so both figures are computation.) The machine
this runs on is shared, so the two processes alternate in blocks of ``--block`` samples within every round (both
see the same load), and each block is timed in the worker's process CPU time (the per-core figure, without the time
other jobs hold the core) and in wall time; the medians over rounds, the ratio of the medians, the page faults per
sample and the load average before and after are reported.

Usage::

    OMP_NUM_THREADS=1 python bench/bench_multicrop.py                     # ~40 s on a loaded 2-core machine
    OMP_NUM_THREADS=1 python bench/bench_multicrop.py --geometry both --json bench/results/bench_multicrop.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network

import argparse
import json
import multiprocessing as mp
import random
import resource
import time
import warnings
from dataclasses import replace
from typing import Any, Callable

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


GEOMETRIES = ("as-written", "none")
"""``as-written``: the seed's ``ShiftScaleRotate(p=.5)`` and our affine on half of the views; ``none``: neither."""


def seed_pipelines(geometry: str = "as-written") -> list[Callable]:
    """The seed's eight per-view Albumentations pipelines (2 global + 6 local), as written, on Albumentations 2.0.8.

    The call-by-call mapping is in the module docstring. ``geometry="none"`` leaves out ``ShiftScaleRotate`` (not
    the seed: only for the like-for-like comparison without warps).
    """
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")

    class Channelaug(A.ImageOnlyTransform):
        """The seed's channel augmentation: every band replaced by one random band (10 bands hard-coded)."""

        def __init__(self, p: float = 0.5):
            super().__init__(p=p)

        def apply(self, img, **params):
            temp = img[:, :, random.randint(0, 9), np.newaxis]
            return np.repeat(temp, 10, axis=2)

    def shift_scale_rotate() -> list:
        if geometry == "none":
            return []
        with warnings.catch_warnings():  # "ShiftScaleRotate is a special case of Affine": the seed's call, kept
            warnings.simplefilter("ignore", UserWarning)
            return [A.ShiftScaleRotate(p=0.5)]

    normalize = dict(mean=MEANS, std=STDS, max_pixel_value=1.0)
    globalaug1 = A.Compose([
        Channelaug(p=1.0),
        A.HorizontalFlip(p=0.5),
        *shift_scale_rotate(),
        A.RandomResizedCrop(size=(120, 120), scale=(0.4, 1.0)),
        A.GaussianBlur(p=1.0),
        A.Normalize(**normalize),
        ToTensorV2(),
    ])
    globalaug2 = A.Compose([
        A.HorizontalFlip(p=0.5),
        *shift_scale_rotate(),
        A.RandomResizedCrop(size=(120, 120), scale=(0.4, 1.0)),
        A.GaussianBlur(p=0.1),
        A.Solarize(threshold_range=(0.5, 0.5), p=0.2),
        A.Normalize(**normalize),
        ToTensorV2(),
    ])
    locaaug = A.Compose([
        A.HorizontalFlip(p=0.5),
        *shift_scale_rotate(),
        A.RandomResizedCrop(size=(56, 56), scale=(0.05, 0.4), p=1.0),
        A.GaussianBlur(p=0.5),
        A.Normalize(**normalize),
        ToTensorV2(),
    ])
    return [globalaug1, globalaug2] + [locaaug] * 6


def seed_equivalent_config(geometry: str = "as-written") -> MultiCropConfig:
    """Our settings doing the seed's work: our defaults (the seed's views, flips, affine ranges and probabilities)
    with Albumentations 2.0.8's blur sigma range; ``geometry="none"``: no affine."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    cfg = MultiCropConfig(blur_sigma=(0.5, 3.0), blur_truncate=3.5)
    return cfg if geometry == "as-written" else replace(cfg, affine_p=(0.0, 0.0, 0.0))


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


def _pipeline(which: str, geometry: str, n_tiles: int, seed: int) -> Callable[[int], list]:
    """``sample(i) -> views`` of tile ``i % n_tiles``: the seed's pipelines (``which="seed"``) or ours."""
    tiles_chw = synthetic_tiles(n_tiles, len(SEED_BANDS), 120, seed)
    if which == "seed":
        tiles_hwc = [np.ascontiguousarray(t.transpose(1, 2, 0)) for t in tiles_chw]  # the seed's open_tif layout
        seed_views = seed_pipelines(geometry)
        random.seed(seed)

        def run_seed(i: int) -> list:
            img = tiles_hwc[i % n_tiles]
            return [aug(image=img)["image"] for aug in seed_views]

        return run_seed
    ours = MultiCropTransform(seed_equivalent_config(geometry), MEANS, STDS, units="reflectance", as_tensor=True)

    def run_ours(i: int) -> list:
        rng = np.random.default_rng([seed, 0, i])  # common.sampling.sample_rng(seed, epoch, index)
        return ours({"image": tiles_chw[i % n_tiles]}, rng)

    return run_ours


def _worker(conn: Any, which: str, geometry: str, n_tiles: int, seed: int) -> None:
    """One pipeline in its own process: sends its view shapes, then runs the blocks ``(start, n)`` it receives and
    answers (CPU seconds of this process, wall seconds, minor page faults) for each; ``None`` ends it."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    sample = _pipeline(which, geometry, n_tiles, seed)
    conn.send([list(x.shape) for x in sample(0)])
    while (msg := conn.recv()) is not None:
        start, n = msg
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(start, start + n):
            sample(i)
        conn.send((time.process_time() - c0, time.perf_counter() - w0,
                   resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
    conn.close()


def compare(geometry: str, n_tiles: int, rounds: int, samples: int, block: int, seed: int) -> dict:
    """Time the seed's pipelines and ours on the same tiles, alternating blocks of ``block`` samples.

    Each pipeline runs in its own (spawned) process, as in a data-loader worker: in one process the two share
    glibc's heap, and how much freed memory it hands back to the system, to be faulted in again, then depends on
    the other pipeline (measured: 0 to 555 page faults per sample for ours next to the seed's, 0 in its own worker).
    """
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    for which in ("seed", "ours"):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, which, geometry, n_tiles, seed), daemon=True)
        proc.start()
        conns.append(parent)
        procs.append(proc)
    try:
        shapes = [c.recv() for c in conns]
        assert shapes[0] == shapes[1], f"the two pipelines disagree on view shapes: {shapes}"

        def run(k: int, start: int, n: int) -> np.ndarray:
            conns[k].send((start, n))
            return np.array(conns[k].recv())

        for k in (0, 1):  # warm-up
            run(k, 0, 2 * block)
        per_round, faults = [], np.zeros(2)  # per round: samples/s of (seed cpu, seed wall, ours cpu, ours wall)
        for r in range(rounds):
            t = np.zeros(4)
            for start in range(r * samples, (r + 1) * samples, block):
                n = min(block, (r + 1) * samples - start)
                for k in (0, 1):
                    cpu, wall, fl = run(k, start, n)
                    t[2 * k:2 * k + 2] += (cpu, wall)
                    faults[k] += fl
            per_round.append(samples / t)
    finally:
        for c, proc in zip(conns, procs):
            c.send(None)
            proc.join(timeout=30)
    rates = np.array(per_round)  # (rounds, 4)
    med = np.median(rates, axis=0)
    ratio_cpu, ratio_wall = rates[:, 2] / rates[:, 0], rates[:, 3] / rates[:, 1]
    return {
        "geometry": geometry,
        "views": shapes[1],
        "seed_albumentations_samples_per_cpu_s": float(med[0]),
        "ours_samples_per_cpu_s": float(med[2]),
        "ratio_of_medians_cpu": float(med[2] / med[0]),
        "ratio_per_round_cpu": [round(float(x), 3) for x in ratio_cpu],
        "seed_albumentations_samples_per_wall_s": float(med[1]),
        "ours_samples_per_wall_s": float(med[3]),
        "ratio_of_medians_wall": float(med[3] / med[1]),
        "ratio_per_round_wall": [round(float(x), 3) for x in ratio_wall],
        "page_faults_per_sample": {"seed": float(faults[0] / (rounds * samples)),
                                   "ours": float(faults[1] / (rounds * samples))},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds (medians reported)")
    ap.add_argument("--samples", type=int, default=120, help="samples per round and pipeline")
    ap.add_argument("--block", type=int, default=10, help="samples per block; the pipelines alternate block by block")
    ap.add_argument("--tiles", type=int, default=32, help="distinct synthetic tiles cycled through")
    ap.add_argument("--geometry", choices=(*GEOMETRIES, "both"), default="as-written",
                    help="as-written: the seed's ShiftScaleRotate and our affine; none: no warp on either side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None, help="also write the figures to this JSON file")
    ap.add_argument("--note", type=str, default="", help="free text stored in the JSON (e.g. what else was running)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.samples < 1 or args.block < 1:
        ap.error("--rounds, --samples and --block must be >= 1")

    import albumentations

    bands, size = len(SEED_BANDS), 120
    geometries = GEOMETRIES if args.geometry == "both" else (args.geometry,)
    load_before = os.getloadavg()
    comparisons = [compare(g, args.tiles, args.rounds, args.samples, args.block, args.seed) for g in geometries]
    load_after = os.getloadavg()
    result = {
        "comparisons": comparisons,
        "rounds": args.rounds,
        "samples_per_round": args.samples,
        "block": args.block,
        "threads": 1,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "albumentations": albumentations.__version__,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
        "loadavg_1_5_15_after": [round(x, 2) for x in load_after],
        "note": args.note,
    }
    print(f"views per sample: 2 x {size} px + 6 x 56 px, {bands} bands; {args.rounds} rounds x {args.samples} samples "
          f"per pipeline, alternating blocks of {args.block}; load average {load_before[0]:.2f} -> {load_after[0]:.2f} "
          f"on {os.cpu_count()} cores")
    for c in comparisons:
        rc, rw = c["ratio_per_round_cpu"], c["ratio_per_round_wall"]
        print(f"geometry {c['geometry']}:")
        print(f"  seed pipeline (Albumentations {albumentations.__version__}): "
              f"{c['seed_albumentations_samples_per_cpu_s']:7.1f} samples per CPU second "
              f"({1e3 / c['seed_albumentations_samples_per_cpu_s']:.2f} ms), "
              f"{c['seed_albumentations_samples_per_wall_s']:7.1f} per wall second")
        print(f"  eo_ssl.multicrop                    : {c['ours_samples_per_cpu_s']:7.1f} samples per CPU second "
              f"({1e3 / c['ours_samples_per_cpu_s']:.2f} ms), {c['ours_samples_per_wall_s']:7.1f} per wall second")
        print(f"  ratio of medians: {c['ratio_of_medians_cpu']:.2f}x CPU time (rounds {min(rc):.2f}-{max(rc):.2f}x), "
              f"{c['ratio_of_medians_wall']:.2f}x wall time (rounds {min(rw):.2f}-{max(rw):.2f}x); page faults per "
              f"sample: seed {c['page_faults_per_sample']['seed']:.0f}, ours {c['page_faults_per_sample']['ours']:.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
