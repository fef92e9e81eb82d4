"""Segmentation throughput: the full framework training step vs the network's own compute, and sliding-window
prediction speed in megapixels per second.

*Full step*: what ``finetune/semisup.py::main`` runs with ``method=supervised``, i.e. :class:`common.engine.Engine`
``fit`` with :class:`finetune.supervised.Supervised` built the same way (:func:`finetune.common_setup.resolve_inputs`,
``build_model``, ``build_loss``, ``segmentation_datasets``) on generated demo tiles (64 px, 12-band S2, 6 classes,
the real augmentation pipeline on the ``train_all`` split): data loading, lr / wd schedules, DeepLab forward, the
segmentation loss (:mod:`finetune.losses`), backward and the engine's loss bookkeeping, optional clipping, the
optimiser step, ``zero_grad`` and the periodic scalar logging (metrics.jsonl and TensorBoard). The default setting
is ``configs/finetune/demo.yaml`` (resnet18, DeepLab v3+ OS16, AdamW) at batch 16. Evaluation and intermediate
checkpoints are switched off (the final checkpoint is written after the timed steps).

*Bare step* (the issue's definition): backbone + head forward (``model(x)``), pixel-wise cross-entropy
(``F.cross_entropy`` with ignore index 255) and backward on the same batch, nothing else: **no optimiser step**
(``bare+opt`` adds the framework's AdamW step on the same parameters for reference). It runs on its own copy of the
network (same init), on batches made beforehand by the same dataset and collate function. With ``--workers 0`` one
bare step runs right after every full step (inside the run, excluded from the full step's time), so that both see
the same load on a shared machine; with workers (or ``--no-interleave``) it is timed in rounds before and after the
run.

The ratio full / bare is the framework's overhead (target: at most ``TARGET_RATIO``). The full step is split with
timestamps taken inside the run (forward hooks on the network, a gradient hook on the loss, post-accumulate-grad
hooks on the parameters, the method's hooks and global optimiser step hooks; on CUDA each mark synchronises the
device):

* data wait: from the end of the previous step to the start of the method's forward, less the logging (the
  DataLoader / Accelerate batch hand-over with the augmentations when ``--workers 0``, the loader's restart at epoch
  boundaries, the lr/wd schedule update);
* logging: the engine's ``_log`` and ``_check_finite`` calls every ``trainer.log_every`` steps, averaged per step;
* method glue (batch unpacking), network forward, loss, engine glue (autocast exit, ``loss / k``,
  ``accelerator.backward`` entry, the finite flag and the running loss sums), backward proper, clipping,
  optimiser step, ``zero_grad``.

Prediction: :func:`finetune.inference.sliding_window_inference` (Gaussian blending) of the same architecture over a
random ``--image-size`` square image with the data's bands, in megapixels per second (median of
``--predict-reps`` runs after one warm-up).

Fairness: ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` unless ``--threads`` says otherwise. With
``--workers 0`` (the default) the augmentations run in the training process, so their cost is part of the full step
and shows as data wait; with ``--workers N`` they run in worker processes (overlapped on a machine with spare cores).

Usage::

    OMP_NUM_THREADS=1 python bench/bench_segmentation.py                     # a few minutes on one core
    OMP_NUM_THREADS=1 python bench/bench_segmentation.py --steps 30 --workers 1 --json out.json
    python bench/bench_segmentation.py --data data/demo --arch resnet50 --version v3 --batch-size 8
    python bench/bench_segmentation.py --set trainer.clip_grad=1.0 --set loss.name=ohem   # any config override
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import contextlib
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

TARGET_RATIO = 1.10
"""Full step time / bare forward-backward time the framework aims to stay under."""

MEGAPIXEL = 1e6


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_demo_tiles(out: Path, tiles: int, seed: int = 0) -> Path:
    """Generate the built-in demo data (S2 source + target domains) with ``tiles`` training tiles per domain."""
    cmd = [sys.executable, "-m", "common.demo_data", "--out", str(out), "--seed", str(seed), "--tiles", str(tiles),
           "--val-tiles", "8", "--sar-scenes", "2", "--sar-val-scenes", "1"]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


def build_cfg(data_root: Path, args: argparse.Namespace, max_steps: int):
    from common.config import load_config
    from finetune.semisup import FinetuneConfig

    overrides = [
        "method=supervised",
        f"data.root={data_root / 's2' / 'source'}",
        f"data.labelled_split={args.split}",
        f"data.batch_size={args.batch_size}",
        f"model.arch={args.arch}",
        f"model.version='{args.version}'",
        f"model.output_stride={args.output_stride}",
        "model.weights=null",
        "trainer.epochs=null",
        f"trainer.max_steps={max_steps}",
        "trainer.eval_every=null",
        "trainer.best_metric=null",
        f"trainer.checkpoint_every={max_steps + 1}",
        "trainer.progress_bar=false",
        f"trainer.log_every={args.log_every}",
        f"trainer.num_workers={args.workers}",
        f"trainer.mixed_precision='{args.precision}'",  # quoted: YAML reads a bare no as false
        *args.set,
    ]
    return load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo.yaml", overrides)


def _autocast(device: torch.device, precision: str):
    """What the engine's ``accelerator.autocast()`` amounts to for a resolved precision."""
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Marks:
    """Per-step timestamps taken inside the engine run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.step = -1
        self.by_step: dict[int, dict[str, float]] = {}

    def __call__(self, name: str) -> None:
        _sync(self.device)
        self.by_step.setdefault(self.step, {})[name] = time.perf_counter()


def _instrumented_method_cls():
    from finetune.supervised import Supervised

    class TimedSupervised(Supervised):
        """Supervised plus timestamps (the computation is the parent's, unchanged; the parent has no
        ``on_after_backward`` / ``after_optimizer_step`` hooks, so these add only the marks and the bare step)."""

        def attach(self, marks: _Marks, bare=None) -> None:
            self.__dict__["marks"] = marks  # plain attributes, not submodules or buffers
            self.__dict__["bare"] = bare
            self.model.register_forward_pre_hook(lambda *_: marks("net0"))
            self.model.register_forward_hook(lambda *_: marks("net1"))
            params = [p for p in self.model.parameters() if p.requires_grad]
            # The end of backward proper: the last parameter gradient accumulated (the stem's, in practice). On
            # CUDA only the first parameter is hooked (each mark synchronises the device).
            for p in params if marks.device.type != "cuda" else params[:1]:
                p.register_post_accumulate_grad_hook(lambda _p: marks("bwd_end"))

        def forward(self, batch, step, epoch):
            self.marks.step = step
            self.marks("fwd0")
            out = super().forward(batch, step, epoch)
            if out["loss"].requires_grad:
                out["loss"].register_hook(lambda _g: self.marks("bwd0"))
            self.marks("fwd1")
            return out

        def on_after_backward(self, step, epoch):
            self.marks("bwd1")

        def after_optimizer_step(self, step, epoch):
            self.marks("opt1")
            if self.bare is not None:  # one interleaved bare step (own model, pre-made batch; not part of the step)
                model, batches, precision = self.bare
                bare_steps(model, [batches[step % len(batches)]], 1, self.marks.device, precision)
                self.marks("bare1")

    return TimedSupervised


def run_full(cfg, out_dir: Path, warmup: int, steps: int, bare=None) -> tuple[float, dict[str, float], dict, float]:
    """Train ``warmup + steps`` steps through the engine as ``finetune/semisup.py`` does; returns (s/step, breakdown
    s/step, final metrics, bare s/step). With ``bare = (model, batches, precision)`` one bare step runs after every
    full step (after its ``zero_grad``, before its logging) and is timed separately; its time is excluded from the
    full step's."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from common.engine import Engine, LoaderSpec
    from finetune.common_setup import build_loss, build_model, resolve_inputs, segmentation_datasets

    inputs = resolve_inputs(cfg.data, cfg.model)
    spec = inputs.spec
    sets = segmentation_datasets(cfg.data, spec, cfg.augment, cfg.trainer.seed)
    engine = Engine(cfg.trainer, out_dir, config=cfg)
    model = build_model(cfg.model, cfg.data.num_classes, inputs, len(spec.bands))
    method = _instrumented_method_cls()(model, build_loss(cfg.loss, cfg.data.num_classes), cfg.supervised,
                                        cfg.model.backbone_lr_mult, cfg.model.freeze_backbone)
    marks = _Marks(engine.device)
    method.attach(marks, bare)
    handles = [register_optimizer_step_pre_hook(lambda *_: marks("step0")),
               register_optimizer_step_post_hook(lambda *_: marks("step1"))]
    # The engine's scalar logging (finite-loss check + metrics.jsonl + TensorBoard), timed per call. It runs after a
    # step's zero_grad, i.e. in the gap before the next step's forward; logged step n follows 0-based step n - 1.
    log_time: dict[int, float] = {}

    def timed_call(fn):
        def wrapper(*a):
            t0 = time.perf_counter()
            fn(*a)
            step = a[-1]
            log_time[step] = log_time.get(step, 0.0) + time.perf_counter() - t0
        return wrapper

    engine._log = timed_call(engine._log)
    engine._check_finite = timed_call(engine._check_finite)
    try:
        engine.fit(method, {"labelled": LoaderSpec(sets["labelled"], cfg.data.batch_size)}, cfg.optim)
        final = engine.finish()
    finally:
        for h in handles:
            h.remove()

    m = marks.by_step
    timed = range(warmup, warmup + steps)

    def end(s: int) -> float:  # where the framework's work after step s resumes
        return m[s].get("bare1", m[s]["opt1"])

    full_steps = [m[s]["opt1"] - end(s - 1) for s in timed]
    bare_steps_ = [m[s]["bare1"] - m[s]["opt1"] for s in timed] if bare is not None else []
    per_step = statistics.fmean(full_steps)
    bare_s = statistics.fmean(bare_steps_) if bare_steps_ else float("nan")

    def mean(a: str, b: str) -> float:
        return statistics.fmean(m[s][b] - m[s][a] for s in timed)

    # The gap before step s holds the log of logged step s (after 0-based step s - 1), then the next batch.
    gaps = {s: m[s]["fwd0"] - end(s - 1) for s in timed}
    logging = statistics.fmean(log_time.get(s, 0.0) for s in timed)
    breakdown = {
        "data_wait": statistics.fmean(gaps.values()) - logging,
        "logging": logging,
        "method_glue": mean("fwd0", "net0"),
        "network_forward": mean("net0", "net1"),
        "loss": mean("net1", "fwd1"),
        "engine_glue": mean("fwd1", "bwd0") + mean("bwd_end", "bwd1"),
        "backward": mean("bwd0", "bwd_end"),
        "clip": mean("bwd1", "step0"),
        "optimizer_step": mean("step0", "step1"),
        "zero_grad": mean("step1", "opt1"),
    }
    final = {**final, "_full_steps": full_steps, "_bare_steps": bare_steps_}
    return per_step, breakdown, final, bare_s


def make_batches(cfg, n: int, device: torch.device) -> tuple[list[dict[str, torch.Tensor]], float]:
    """``n`` batches from the real dataset + default collate (epoch 0, in order); returns them and the s/batch it
    took."""
    from torch.utils.data import DataLoader

    from finetune.common_setup import resolve_inputs, segmentation_datasets

    spec = resolve_inputs(cfg.data, cfg.model).spec
    dataset = segmentation_datasets(cfg.data, spec, cfg.augment, cfg.trainer.seed)["labelled"]
    dataset.set_epoch(0)
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=False, num_workers=0, drop_last=True)
    batches, t0 = [], time.perf_counter()
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    per_batch = (time.perf_counter() - t0) / len(batches)
    return [{k: batch[k].to(device) for k in ("image", "mask")} for batch in batches], per_batch


def bare_steps(model, batches, steps: int, device: torch.device, precision: str, optimizer=None) -> float:
    """s/step of ``model(x)`` + cross-entropy + backward (+ an optimiser step if given), then ``zero_grad``."""
    from common.bands import IGNORE_INDEX

    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        with _autocast(device, precision):
            logits = model(batch["image"]).logits
        F.cross_entropy(logits.float(), batch["mask"], ignore_index=IGNORE_INDEX).backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def bench_prediction(cfg, args: argparse.Namespace, device: torch.device, precision: str) -> dict[str, float]:
    """Megapixels/s of sliding-window inference of the configured architecture (random init, eval mode)."""
    from finetune.common_setup import build_model, resolve_inputs
    from finetune.inference import sliding_window_inference

    inputs = resolve_inputs(cfg.data, cfg.model)
    n_bands, k = len(inputs.spec.bands), cfg.data.num_classes
    torch.manual_seed(0)
    model = build_model(cfg.model, k, inputs, n_bands).to(device).eval()
    image = torch.randn(1, n_bands, args.image_size, args.image_size, device=device)

    def model_fn(x: torch.Tensor) -> torch.Tensor:
        with _autocast(device, precision):
            return model(x).logits

    @torch.no_grad()
    def run() -> float:
        _sync(device)
        t0 = time.perf_counter()
        sliding_window_inference(model_fn, image, window=args.window, overlap=args.overlap, num_classes=k,
                                 blend="gaussian", batch_size=args.window_batch)
        _sync(device)
        return time.perf_counter() - t0

    run()  # warm-up
    seconds = statistics.median(run() for _ in range(args.predict_reps))
    return {"mpix_per_s": args.image_size ** 2 / MEGAPIXEL / seconds, "s_per_image": seconds,
            "image_size": args.image_size, "bands": n_bands, "window": args.window, "overlap": args.overlap,
            "window_batch": args.window_batch}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18", help="timm backbone (model.arch)")
    ap.add_argument("--version", default="v3+", choices=["v2", "v3", "v3+"], help="DeepLab version (model.version)")
    ap.add_argument("--output-stride", default="16", help="model.output_stride (8, 16, 32 or null)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed optimisation steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (trainer.num_workers)")
    ap.add_argument("--log-every", type=int, default=10, help="trainer.log_every (demo.yaml: 10)")
    ap.add_argument("--precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                    help="trainer.mixed_precision, also used by the bare step and prediction (auto: bf16/fp16 on "
                         "CUDA, fp32 on CPU)")
    ap.add_argument("--tiles", type=int, default=64, help="demo training tiles per domain to generate")
    ap.add_argument("--data", type=Path, default=None,
                    help="existing demo data directory (holds s2/source; skips generation)")
    ap.add_argument("--split", default="train_all", help="training split (data.labelled_split)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override on top of configs/finetune/demo.yaml (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--bare-batches", type=int, default=4, help="pre-made batches cycled by the bare step")
    ap.add_argument("--opt-steps", type=int, default=5, help="steps of the (informative) bare + AdamW timing")
    ap.add_argument("--no-interleave", action="store_true",
                    help="time the bare step in separate rounds before/after the run even with --workers 0")
    ap.add_argument("--image-size", type=int, default=512, help="prediction image side")
    ap.add_argument("--window", type=int, default=256, help="prediction window")
    ap.add_argument("--overlap", type=float, default=0.25, help="prediction window overlap")
    ap.add_argument("--window-batch", type=int, default=4, help="windows per forward in prediction")
    ap.add_argument("--predict-reps", type=int, default=2, help="timed prediction runs (after one warm-up)")
    ap.add_argument("--skip-predict", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    torch.set_num_threads(args.threads)

    from common.engine import resolve_mixed_precision
    from common.optim import build_optimizer
    from finetune.common_setup import build_model, resolve_inputs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_mixed_precision(args.precision, cuda=device.type == "cuda")
    res: dict = {"device": device.type, "threads": torch.get_num_threads(), "precision": precision,
                 "arch": args.arch, "version": args.version, "output_stride": args.output_stride}
    with tempfile.TemporaryDirectory(prefix="bench_seg_") as tmp:
        tmp = Path(tmp)
        data_root = args.data if args.data is not None else make_demo_tiles(tmp / "demo", args.tiles)
        total = args.warmup + args.steps
        cfg = build_cfg(data_root, args, total)
        inputs = resolve_inputs(cfg.data, cfg.model)
        n_tiles = len((Path(cfg.data.root) / "splits" / f"{cfg.data.labelled_split}.txt").read_text().split())
        print(f"setting: {cfg.model.arch} DeepLab {cfg.model.version} OS{cfg.model.output_stride}, "
              f"{len(inputs.spec.bands)} bands, {cfg.data.num_classes} classes, batch {cfg.data.batch_size}, "
              f"loss {cfg.loss.name}, {cfg.optim.name}, clip {cfg.trainer.clip_grad}; {n_tiles} tiles "
              f"({cfg.data.labelled_split}); device {device.type}, precision {precision}, threads "
              f"{torch.get_num_threads()}, workers {args.workers}; {args.warmup} warm-up + {args.steps} timed steps",
              flush=True)

        if not args.skip_train:
            # Bare: its own copy of the network (same init) on pre-made batches. With --workers 0 one bare step is
            # interleaved after every full step (same machine load for both: the fair comparison on a shared
            # machine); with workers it is timed in separate rounds before and after the run (interleaving would let
            # the workers prefetch during the bare step and hide the data wait).
            torch.manual_seed(cfg.trainer.seed)
            bare = build_model(cfg.model, cfg.data.num_classes, inputs, len(inputs.spec.bands)).to(device).train()
            batches, data_s_per_batch = make_batches(cfg, args.bare_batches, device)
            bare_steps(bare, batches, max(args.warmup, 1), device, precision)
            interleave = args.workers == 0 and not args.no_interleave
            bare_rounds = [] if interleave else [bare_steps(bare, batches, args.steps, device, precision)]

            full_s, breakdown, final, bare_in_run = run_full(cfg, tmp / "run", args.warmup, args.steps,
                                                             (bare, batches, precision) if interleave else None)

            if interleave:
                bare_rounds.append(bare_in_run)
            else:
                bare_rounds.append(bare_steps(bare, batches, args.steps, device, precision))
            bare_s = statistics.median(bare_rounds)
            from finetune.supervised import Supervised, SupervisedConfig

            groups = Supervised(bare, torch.nn.Identity(), SupervisedConfig()).param_groups()
            opt = build_optimizer(cfg.optim, groups)
            bare_steps(bare, batches, 1, device, precision, opt)
            bare_opt_s = bare_steps(bare, batches, args.opt_steps, device, precision, opt)

            bs = cfg.data.batch_size
            ratio = full_s / bare_s
            compute = breakdown["network_forward"] + breakdown["backward"]
            paired = [f / b for f, b in zip(final["_full_steps"], final["_bare_steps"])]
            res.update({
                "workers": args.workers,
                "batch_size": bs,
                "steps": args.steps,
                "full_images_per_s": bs / full_s,
                "bare_images_per_s": bs / bare_s,
                "bare_plus_opt_images_per_s": bs / bare_opt_s,
                "full_s_per_step": full_s,
                "bare_s_per_step": bare_s,
                "bare_rounds_s_per_step": bare_rounds,
                "bare_interleaved": interleave,
                "bare_plus_opt_s_per_step": bare_opt_s,
                "ratio_full_over_bare": ratio,
                "ratio_full_over_bare_plus_opt": full_s / bare_opt_s,
                "ratio_median_paired_steps": statistics.median(paired) if paired else None,
                "ratio_full_over_in_run_compute": full_s / compute,
                "full_steps_s": final["_full_steps"],
                "bare_steps_s": final["_bare_steps"],
                "target_ratio": TARGET_RATIO,
                "breakdown_s_per_step": breakdown,
                "data_production_s_per_batch_one_process": data_s_per_batch,
                "engine_steps_per_s_last_log": final.get("train", {}).get("steps_per_s"),
            })
            print(f"full step (engine, real data)  : {bs / full_s:8.1f} images/s  ({1000 * full_s:7.1f} ms/step)")
            how = "interleaved with the full steps" if interleave else "rounds " + ", ".join(
                f"{1000 * r:.1f}" for r in bare_rounds) + " ms"
            print(f"bare fwd+CE+bwd (no optimiser) : {bs / bare_s:8.1f} images/s  ({1000 * bare_s:7.1f} ms/step; "
                  f"{how})")
            print(f"bare fwd+CE+bwd + AdamW step   : {bs / bare_opt_s:8.1f} images/s  ({1000 * bare_opt_s:7.1f} "
                  f"ms/step)")
            print(f"ratio full / bare              : {ratio:.3f}x (target <= {TARGET_RATIO:.2f}x)"
                  f"{'' if ratio <= TARGET_RATIO else '  ABOVE TARGET'}")
            if paired:
                print(f"ratio, median of paired steps  : {statistics.median(paired):.3f}x (each full step / the bare "
                      f"step after it)")
            print(f"ratio full / in-run compute    : {full_s / compute:.3f}x (network forward + backward timed "
                  f"inside the same full steps)")
            print(f"ratio full / (bare + optimiser): {full_s / bare_opt_s:.3f}x")
            print(f"data production on one process : {1000 * data_s_per_batch:.1f} ms/batch (workers=0 pays it in "
                  f"the step)")
            print("full step breakdown (ms/step, inside the engine run; evaluation excluded):")
            for key, v in breakdown.items():
                print(f"  {key:22s} {1000 * v:8.2f}")
            print(f"  {'sum':22s} {1000 * sum(breakdown.values()):8.2f}  (measured step {1000 * full_s:.2f})")
            print(f"  excess over network compute: {1000 * (full_s - compute):.2f} ms/step "
                  f"({100 * (full_s / compute - 1):.1f} % of the in-run compute)")

        if not args.skip_predict:
            p = bench_prediction(cfg, args, device, precision)
            res["predict"] = p
            print(f"prediction {p['image_size']}x{p['image_size']}x{p['bands']}, window {p['window']}, overlap "
                  f"{p['overlap']}, {p['window_batch']} windows/forward: {p['mpix_per_s']:.3f} MP/s "
                  f"({p['s_per_image']:.2f} s per image)", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    with contextlib.suppress(KeyboardInterrupt):
        main()
