"""Reading throughput per CPU core: the tile store vs multi-band GeoTIFF folders vs BigEarthNet band folders.

One generated BigEarthNet-like archive in three layouts:

* ``bands/``: BigEarthNet-S2 patch folders, one uncompressed uint16 GeoTIFF per band (B02/B03/B04/B08 at 10 m,
  120 x 120; B05/B06/B07/B8A/B11/B12 at 20 m, 60 x 60; B01/B09 at 60 m, 20 x 20) and a labels metadata file, as
  BigEarthNet ships them (13 files per patch);
* ``geotiff/``: the same patches as one 12-band 120 x 120 uint16 GeoTIFF each (coarse bands repeated onto 10 m);
* ``store/``: the band folders packed by :func:`common.store.pack_dataset` (what ``python -m common.store pack`` does
  with a BigEarthNet config): float32 on the 10 m grid, as the reader resamples them.

Each layout is read through the dataset a run uses (``UnlabelledTiles`` for the folders, ``common.store.store_tiles``
for the store): decode, resampling of the 20/60 m bands (folders), validity, conversion to reflectance, checks,
fill. The same random sample of patches is read in each layout, in alternating rounds, on one thread
(``OMP_NUM_THREADS=1``, one process): samples/s per core, median over the rounds, and the ratio to the band folders.
The files were just written, so they sit in the page cache: this measures the CPU cost of reading, not the disk.

Usage::

    OMP_NUM_THREADS=1 python bench/bench_store.py                      # 20000 patches (generation + packing included)
    OMP_NUM_THREADS=1 python bench/bench_store.py --patches 200 --out /tmp/bench_store.json   # smoke test
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import multiprocessing as mp
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.bands import get_sensor
from common.datasets import UnlabelledTiles
from common.store import TileStore, pack_dataset, store_tiles

BANDS_10M = ("B02", "B03", "B04", "B08")
BANDS_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
BANDS_60M = ("B01", "B09")
ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")  # S2L2A file order
SIZE = 120
CRS = "EPSG:32633"


def _write(path: Path, array: np.ndarray, pixel: float, x0: float, y0: float, names=None) -> None:
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype="uint16", crs=CRS, transform=Affine(pixel, 0, x0, 0, -pixel, y0), nodata=0) as dst:
        dst.write(array)
        for i, name in enumerate(names or [], start=1):
            dst.set_band_description(i, name)


def _make_patches(job: tuple[int, int, str, int]) -> None:
    """Patches ``[start, stop)`` in both folder layouts."""
    start, stop, root, seed = job
    root_p = Path(root)
    for k in range(start, stop):
        rng = np.random.default_rng([seed, k])
        name = f"S2A_MSIL2A_20170613T101031_{k // 1000}_{k % 1000}"
        x0, y0 = 400000.0 + 1200.0 * (k % 500), 5300000.0 - 1200.0 * (k // 500)
        base = rng.integers(300, 3000, size=(len(ORDER), 1, 1))
        full = np.empty((len(ORDER), SIZE, SIZE), np.uint16)
        folder = root_p / "bands" / name
        folder.mkdir(parents=True, exist_ok=True)
        for b, band in enumerate(ORDER):
            factor = 1 if band in BANDS_10M else 2 if band in BANDS_20M else 6
            n = SIZE // factor
            arr = (base[b] + rng.integers(0, 600, size=(1, n, n))).astype(np.uint16)
            _write(folder / f"{name}_{band}.tif", arr, 10.0 * factor, x0, y0)
            full[b] = np.repeat(np.repeat(arr[0], factor, axis=0), factor, axis=1)
        (folder / f"{name}_labels_metadata.json").write_text(json.dumps(
            {"labels": ["Mixed forest"], "projection": CRS, "tile_source": name, "acquisition_date": "2017-06-13"}))
        _write(root_p / "geotiff" / f"{name}.tif", full, 10.0, x0, y0, names=ORDER)


def generate(root: Path, patches: int, workers: int, seed: int = 0) -> None:
    (root / "geotiff").mkdir(parents=True, exist_ok=True)
    (root / "bands").mkdir(parents=True, exist_ok=True)
    step = max(1, min(500, patches // (4 * workers) or 1))
    jobs = [(s, min(s + step, patches), str(root), seed) for s in range(0, patches, step)]
    with mp.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap_unordered(_make_patches, jobs):
            pass


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patches", type=int, default=20000, help="patches in the generated archive")
    ap.add_argument("--read-samples", type=int, default=2000, help="patches read per layout and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes generating and packing")
    ap.add_argument("--workdir", default=None, help="where the archive goes (default: a temporary directory, deleted)")
    ap.add_argument("--keep", action="store_true", help="keep the generated archive")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_store.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="eoseg_bench_store_"))
    result: dict = {"patches": args.patches, "workers": args.workers, "commit": _git_commit(),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()}}
    try:
        t0 = time.perf_counter()
        generate(work, args.patches, args.workers, args.seed)
        result["generate_s"] = round(time.perf_counter() - t0, 1)
        print(f"generated {args.patches} patches in {result['generate_s']} s under {work}", flush=True)

        spec = get_sensor("S2L2A")
        t0 = time.perf_counter()
        bands = UnlabelledTiles(work / "bands", spec, spec.bands, layout="band_files", validate="none")
        pack_dataset(bands, work / "store", spec, kind="tiles", workers=args.workers,
                     source={"root": str(work / "bands"), "layout": "band_files"})
        result["pack_s"] = round(time.perf_counter() - t0, 1)
        print(f"packed in {result['pack_s']} s ({args.workers} processes)", flush=True)
        result["bytes"] = {name: _du(work / name) for name in ("bands", "geotiff", "store")}
        result["files"] = {name: sum(1 for f in (work / name).rglob("*") if f.is_file())
                           for name in ("bands", "geotiff", "store")}

        datasets = {
            "band_folders": UnlabelledTiles(work / "bands", spec, spec.bands, layout="band_files", validate="none"),
            # header checks at construction: the per-read path then opens each file once, as in a run
            "geotiff": UnlabelledTiles(work / "geotiff", spec, spec.bands, glob="*.tif", layout="multiband",
                                       validate="header"),
            "store": store_tiles(work / "store", spec),
        }
        n = len(datasets["store"])
        assert all(len(d) == n for d in datasets.values())
        picks = np.random.default_rng(args.seed).permutation(n)[:min(args.read_samples, n)].tolist()
        for name, ds in datasets.items():  # same patch, same sample in every layout
            a, b = ds[picks[0]], datasets["band_folders"][picks[0]]
            assert a["id"] == b["id"] and a["image"].shape == b["image"].shape, name
        rates: dict[str, list[float]] = {name: [] for name in datasets}
        for r in range(args.rounds):
            for name, ds in datasets.items():
                t0 = time.perf_counter()
                for i in picks:
                    ds[i]
                rates[name].append(len(picks) / (time.perf_counter() - t0))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()), flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        result["read_samples"] = len(picks)
        result["samples_per_s_per_core"] = {k: round(v, 1) for k, v in med.items()}
        result["rounds"] = {k: [round(x, 1) for x in v] for k, v in rates.items()}
        result["ratio_vs_band_folders"] = {k: round(v / med["band_folders"], 2) for k, v in med.items()}
        result["shards"] = len(TileStore(work / "store").meta["shards"])
        result["note"] = ("one thread, warm page cache (files just written); reading = decode + resample + validity "
                          "+ conversion + checks + fill, as UnlabelledTiles / store_tiles return a sample")
        print(json.dumps({k: result[k] for k in ("samples_per_s_per_core", "ratio_vs_band_folders", "bytes")},
                         indent=1))
        print(f"store vs band folders: {result['ratio_vs_band_folders']['store']:.1f}x; "
              f"GeoTIFF vs band folders: {result['ratio_vs_band_folders']['geotiff']:.1f}x")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
