"""Prediction throughput of finetune/predict.py against the bare network on the same windows.

*Prediction* is :func:`finetune.predict.predict_raster` on a generated demo scene (``--size`` square, 12-band
Sentinel-2 L2A-like uint16 deflate-compressed GeoTIFF from :func:`common.demo_data.generate`): windowed reads and
decoding, conversion to reflectance and normalisation (on the device), the forward passes, Gaussian blending,
argmax and the atomic GeoTIFF write (``--probabilities`` adds the softmax and the float32 write). It runs twice per
repetition, with read-ahead (the next window rows read and decoded on a background thread, ``--read-ahead``,
default 2) and without (``read_ahead=0``: read, then predict, in turn); the class maps of the two are compared
byte for byte. The *bare* baseline (the network alone) calls the network on the same windows, in the same
batches, cut from a tensor prepared beforehand, and does nothing else. All three are reported in megapixels of
scene per second; the ratio prediction / bare is the cost of everything around the network. The three are
interleaved, so that load changes on a shared machine hit them alike. On the CPU the process CPU time is reported
beside the wall time: on a shared machine it is the steadier of the two (it leaves out the time spent waiting for a
core; it adds up the threads, the read-ahead thread's included).

The figures go to ``--json`` (default ``bench/results/bench_predict_<device>.json``) with the setting, the load
average before and after, and ``--note``.

The run directory is made as finetune/semisup.py makes it (``write_model_card`` and the ``Supervised`` method's
``state_dict``) around a random-init DeepLab (weights do not change the speed). Defaults (resnet18 DeepLab v3+,
1024 px scene, 512 px windows, overlap 0.5: 9 windows) take two to three minutes on one CPU core (the
scene is generated once, about 20 s, and kept with ``--data DIR``); e.g. on a GPU::

    python bench/bench_predict.py --size 4096 --batch-size 16 --reps 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch

from common.bands import to_model_units
from common.checkpoint import CHECKPOINT_DIR, atomic_save_safetensors
from common.demo_data import generate
from common.raster import read_raster
from finetune.config import LossConfig, SegDataConfig, SegModelConfig
from finetune.inference import window_starts
from finetune.inputs import build_loss, build_model, resolve_inputs
from finetune.methods.base import SegSetup
from finetune.methods.supervised import Supervised, SupervisedConfig
from finetune.model_card import write_model_card
from finetune.predict import DEFAULT_READ_AHEAD, check_inputs, load_run_model, predict_raster, resolve_io_threads
from finetune.transforms import normalise

MEGAPIXEL = 1e6
NUM_CLASSES = 6  # the demo land-cover classes
REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_scene(out: Path, size: int) -> Path:
    """One ``size`` x ``size`` demo S2 scene (generated once per directory, kept for later runs)."""
    generate(out, seed=0, tiles=1, val_tiles=1, size=size, sar_scenes=2, sar_grid=1, sar_size=32, sar_val_scenes=1)
    return sorted((out / "s2" / "source" / "images").glob("*.tif"))[0]


def make_run(out: Path, arch: str, version: str, output_stride: int) -> Path:
    """A run directory as finetune/semisup.py writes it, around a random-init segmenter."""
    data = SegDataConfig(num_classes=NUM_CLASSES, sensor="S2L2A")
    model = SegModelConfig(arch=arch, version=version, output_stride=output_stride)  # type: ignore[arg-type]
    inputs = resolve_inputs(data, model)
    torch.manual_seed(0)
    net = build_model(model, NUM_CLASSES, inputs, len(inputs.spec.bands), load_weights=False)
    method = Supervised(SupervisedConfig(), net, SegSetup(NUM_CLASSES, build_loss(LossConfig(), NUM_CLASSES)))
    write_model_card(out, model, data, inputs, "supervised", method.eval_prefix)
    atomic_save_safetensors(method.state_dict(), out / CHECKPOINT_DIR / "last.safetensors")
    return out


def bare_windows(run, scene: Path, window: int, overlap: float, batch_size: int,
                 device: torch.device) -> list[torch.Tensor]:
    """The batches of windows :func:`predict_raster` feeds the network (one window row at a time), prepared."""
    spec = run.spec
    sample = read_raster(scene, bands=list(spec.raw_bands), fallback_nodata=spec.nodata)
    image = to_model_units(sample.array, spec, raw_bands=spec.raw_bands, offset=run.card.offset)
    mean, std = run.mean_std()
    x = torch.from_numpy(normalise(image, mean, std, sample.valid)).to(device)  # (C, H, W)
    h, w = x.shape[-2:]
    wh, ww = min(window, h), min(window, w)
    ys = window_starts(h, wh, max(1, int(math.floor(wh * (1 - overlap)))))
    xs = window_starts(w, ww, max(1, int(math.floor(ww * (1 - overlap)))))
    batches = []
    for y in ys:
        for i in range(0, len(xs), batch_size):
            batches.append(torch.stack([x[:, y:y + wh, s:s + ww] for s in xs[i:i + batch_size]]).contiguous())
    return batches


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--version", default="v3+", choices=["v2", "v3", "v3+"])
    ap.add_argument("--output-stride", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024, help="scene side in px")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    ap.add_argument("--probabilities", action="store_true", help="also write the probability map")
    ap.add_argument("--read-ahead", type=int, default=DEFAULT_READ_AHEAD,
                    help=f"window rows read ahead in the read-ahead runs (default {DEFAULT_READ_AHEAD}; the other "
                         f"runs use 0)")
    ap.add_argument("--io-threads", type=int, default=None,
                    help="GDAL decoding/compression threads (default: predict_raster's, 1 on the CPU)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each (median reported)")
    ap.add_argument("--data", default=None, help="directory for the generated scene (kept; default: a temporary one)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    ap.add_argument("--json", type=Path, default=None,
                    help="where the figures go (default bench/results/bench_predict_<device>.json)")
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. what else ran on the machine)")
    args = ap.parse_args(argv)
    if args.read_ahead < 1:
        ap.error("--read-ahead must be >= 1 (the runs without read-ahead are made anyway)")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        scene = make_scene(Path(args.data) if args.data else tmp / "demo", args.size)
        gen_s = time.perf_counter() - t0
        run = load_run_model(make_run(tmp / "run", args.arch, args.version, args.output_stride), "last")
        net = run.net.to(device).eval()
        file_bands = check_inputs(run, [scene])
        batches = bare_windows(run, scene, args.window, args.overlap, args.batch_size, device)
        n_windows = sum(b.shape[0] for b in batches)
        mpix = args.size ** 2 / MEGAPIXEL
        io_threads = resolve_io_threads(args.io_threads, device)
        print(f"device={device} threads={torch.get_num_threads()} arch={args.arch} DeepLab {args.version} "
              f"OS{args.output_stride} scene={args.size}x{args.size}x12 uint16 ({scene.name}, generated/found in "
              f"{gen_s:.1f} s) window={args.window} overlap={args.overlap} windows={n_windows} "
              f"batch={args.batch_size} read-ahead={args.read_ahead} io-threads={io_threads}")

        def predict(read_ahead: int) -> tuple[float, float]:
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            r = predict_raster(run, scene, tmp / f"pred_ra{read_ahead}.tif", window=args.window,
                               overlap=args.overlap, probabilities=args.probabilities, device=device,
                               batch_size=args.batch_size, file_bands=file_bands, read_ahead=read_ahead,
                               io_threads=args.io_threads)
            _sync(device)
            assert r.windows == n_windows, (r.windows, n_windows)
            return time.perf_counter() - t, time.process_time() - c

        @torch.inference_mode()
        def bare() -> tuple[float, float]:
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            for b in batches:
                net(b).logits
            _sync(device)
            return time.perf_counter() - t, time.process_time() - c

        kinds = {"read_ahead": lambda: predict(args.read_ahead), "no_read_ahead": lambda: predict(0), "bare": bare}
        for fn in kinds.values():  # warm-up
            fn()
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        for _ in range(args.reps):  # interleaved, so load changes on a shared machine hit all alike
            for k, fn in kinds.items():
                times[k].append(fn())
        with rasterio.open(tmp / f"pred_ra{args.read_ahead}.tif") as a, rasterio.open(tmp / "pred_ra0.tif") as b:
            identical = bool(np.array_equal(a.read(), b.read()))

    res: dict = {
        "meta": {"bench": "bench_predict", "device": device.type, "device_name": (torch.cuda.get_device_name(device)
                 if device.type == "cuda" else platform.processor() or platform.machine()),
                 "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "arch": args.arch, "version": args.version,
                 "output_stride": args.output_stride, "scene_px": args.size, "bands": 12, "window": args.window,
                 "overlap": args.overlap, "windows": n_windows, "batch_size": args.batch_size,
                 "probabilities": args.probabilities, "read_ahead": args.read_ahead, "io_threads": io_threads,
                 "reps": args.reps, "load_avg_1m_before": round(load_before[0], 2),
                 "load_avg_1m_after": round(os.getloadavg()[0], 2), "note": args.note},
        "outputs_identical_with_and_without_read_ahead": identical,
    }
    for i, clock in enumerate(("wall", "cpu")):
        if clock == "cpu" and device.type != "cpu":
            break  # process CPU time says nothing about GPU work
        med = {k: statistics.median(t[i] for t in v) for k, v in times.items()}
        on, off, b = med["read_ahead"], med["no_read_ahead"], med["bare"]
        res[clock] = {
            "s_per_scene": {k: round(v, 4) for k, v in med.items()},
            "mpix_per_s": {k: round(mpix / v, 4) for k, v in med.items()},
            "ratio_predict_over_bare": {"read_ahead": round(on / b, 4), "no_read_ahead": round(off / b, 4)},
            "ratio_read_ahead_over_none": round(on / off, 4),
            "runs_s": {k: [round(t[i], 3) for t in v] for k, v in times.items()},
        }
        with_prob = ", with probabilities" if args.probabilities else ""
        print(f"[{clock} time, median of {args.reps}] predict_raster read-ahead {args.read_ahead}: "
              f"{mpix / on:.3f} MP/s ({on:.2f} s per scene{with_prob}), ratio predict/bare {on / b:.3f}x; "
              f"read-ahead 0: {mpix / off:.3f} MP/s ({off:.2f} s), ratio {off / b:.3f}x; read-ahead / none "
              f"{on / off:.3f}; bare forward (network only) {mpix / b:.3f} MP/s ({b:.2f} s); runs "
              + "; ".join(f"{k} {', '.join(f'{t[i]:.2f}' for t in v)} s" for k, v in times.items()))
    print(f"class maps with and without read-ahead identical: {identical}")
    out = args.json or REPO / "bench" / "results" / f"bench_predict_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    if not identical:
        raise SystemExit("FAILED: the class maps with and without read-ahead differ")
    return res


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
