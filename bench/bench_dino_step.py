"""DINO training-step throughput: the full framework step vs the networks' own compute, per CPU core.

*Full step*: what ``ssl/pretrain.py::main`` runs, i.e. :class:`common.engine.Engine` ``fit`` with
:class:`eo_ssl.pretrain.DINOMethod` on :func:`eo_ssl.pretrain.build_dataset` (the real multi-crop pipeline,
:class:`eo_ssl.multicrop.MultiCropTransform`, on generated demo tiles): data loading, lr / wd schedules, teacher and
student forward, DINO loss + collapse monitors + center update, backward, last-layer freeze, per-parameter clipping,
the optimiser step, ``zero_grad``, the EMA teacher update and the periodic scalar logging (metrics.jsonl and
TensorBoard). The demo setting (``configs/pretrain/demo.yaml``): resnet18 on 12 bands, batch 32, 2 global 48 px
+ 4 local 24 px crops, out_dim 4096 with a BatchNorm head, AdamW, clip_grad 3.0 per parameter. The k-NN probe,
evaluation and intermediate checkpoints are switched off (the final checkpoint is written after the timed steps).

*Bare step* (the issue's definition): student backbone + head forward and backward on all crops, teacher forward
on the 2 global crops, nothing else: no loss object (the student output's sum is back-propagated), **no optimiser
step** (``bare+opt`` adds a fused AdamW step on the same parameters for reference), timed in the same process on
batches made beforehand by the same dataset and collate function, on its own copy of the method. With ``--workers 0``
one bare step runs right after every full step (inside the run, excluded from the full step's time), so that both
see the same load on a shared machine; with workers (or ``--no-interleave``) it is timed in rounds before and after
the run.

The ratio full / bare is the framework's overhead (target: at most ``TARGET_RATIO``). The full step is split with
timestamps taken inside the run (forward hooks on teacher and student, the method's hooks and global optimiser
step hooks; on CUDA each mark synchronises the device):

* data wait: from the end of the previous step to the start of the method's forward, less the logging (the
  DataLoader / Accelerate batch hand-over, including the loader's restart at epoch boundaries, plus the lr/wd
  schedule update);
* logging: the engine's ``_log`` and ``_check_finite`` calls every ``trainer.log_every`` steps, averaged per step;
* teacher / student forward, loss + monitors + centering, backward (plus the engine's loss bookkeeping), clipping
  (incl. the last-layer freeze hook), optimiser step, ``zero_grad``, EMA.

Fairness: ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` unless ``--threads`` says otherwise. With
``--workers 0`` (the default) the augmentations run in the training process, so their cost is part of the full step
and shows as data wait; with ``--workers N`` they run in worker processes (overlapped on a machine with spare cores).

Usage::

    OMP_NUM_THREADS=1 python bench/bench_dino_step.py                       # ~2 minutes on one core
    OMP_NUM_THREADS=1 python bench/bench_dino_step.py --steps 30 --workers 1 --json out.json
    python bench/bench_dino_step.py --data data/demo                        # reuse generated demo tiles
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import copy
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

TARGET_RATIO = 1.10
"""Full step time / bare step time the framework aims to stay under."""


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
    from eo_ssl.pretrain import PretrainConfig

    overrides = [
        f"data.root={data_root}",
        f"data.batch_size={args.batch_size}",
        "probe.root=null",
        "trainer.epochs=null",
        f"trainer.max_steps={max_steps}",
        "trainer.eval_every=null",
        f"trainer.checkpoint_every={max_steps + 1}",
        "trainer.progress_bar=false",
        f"trainer.log_every={args.log_every}",
        f"trainer.num_workers={args.workers}",
    ]
    return load_config(PretrainConfig, REPO / "configs" / "pretrain" / "demo.yaml", overrides)


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
    from eo_ssl.pretrain import DINOMethod

    class TimedDINOMethod(DINOMethod):
        """DINOMethod plus timestamps (the computation is the parent's, unchanged)."""

        marks: _Marks

        def attach(self, marks: _Marks, bare=None) -> None:
            self.__dict__["marks"] = marks  # plain attributes, not submodules or buffers
            self.__dict__["bare"] = bare
            self.teacher.register_forward_pre_hook(lambda *_: marks("teacher0"))
            self.teacher.register_forward_hook(lambda *_: marks("teacher1"))
            self.student.register_forward_pre_hook(lambda *_: marks("student0"))
            self.student.register_forward_hook(lambda *_: marks("student1"))

        def forward(self, batch, step, epoch):
            self.marks.step = step
            self.marks("fwd0")
            out = super().forward(batch, step, epoch)
            self.marks("fwd1")
            return out

        def on_after_backward(self, step, epoch):
            self.marks("bwd1")
            super().on_after_backward(step, epoch)

        def after_optimizer_step(self, step, epoch):
            self.marks("opt1")
            super().after_optimizer_step(step, epoch)
            self.marks("ema1")
            if self.bare is not None:  # one interleaved bare step (own model, pre-made batch; not part of the step)
                bare_method, batches = self.bare
                bare_steps(bare_method, [batches[step % len(batches)]], 1, self.marks.device)
                self.marks("bare1")

    return TimedDINOMethod


def run_full(cfg, out_dir: Path, warmup: int, steps: int, bare=None) -> tuple[float, dict[str, float], dict, float]:
    """Train ``warmup + steps`` steps through the engine; returns (s/step, breakdown s/step, final metrics, bare
    s/step). With ``bare = (method, batches)`` one bare step runs after every full step (after its EMA, before its
    logging) and is timed separately, so that both see the same machine load; its time is excluded from the full
    step's."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from common.bands import resolve_sensor
    from common.engine import Engine, LoaderSpec
    from eo_ssl.multicrop import collate_multicrop
    from eo_ssl.pretrain import build_dataset

    spec = resolve_sensor(cfg.data.sensor, cfg.data.bands, cfg.data.stats_file)
    dataset = build_dataset(cfg, spec)
    engine = Engine(cfg.trainer, out_dir, config=cfg)
    method = _instrumented_method_cls()(cfg, in_chans=len(spec.bands), rgb=spec.rgb_indices())
    marks = _Marks(engine.device)
    method.attach(marks, bare)
    handles = [register_optimizer_step_pre_hook(lambda *_: marks("step0")),
               register_optimizer_step_post_hook(lambda *_: marks("step1"))]
    # The engine's scalar logging (finite-loss check + metrics.jsonl + TensorBoard), timed per call. It runs after a
    # step's EMA, i.e. in the gap before the next step's forward; logged step n follows 0-based step n - 1.
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
        engine.fit(method, {"tiles": LoaderSpec(dataset, cfg.data.batch_size, collate_fn=collate_multicrop)},
                   cfg.optim)
        final = engine.finish()
    finally:
        for h in handles:
            h.remove()

    m = marks.by_step
    timed = range(warmup, warmup + steps)

    def end(s: int) -> float:  # where the framework's work after step s resumes
        return m[s].get("bare1", m[s]["ema1"])

    full_steps = [m[s]["ema1"] - end(s - 1) for s in timed]
    bare_steps_ = [m[s]["bare1"] - m[s]["ema1"] for s in timed] if bare is not None else []
    per_step = statistics.fmean(full_steps)
    bare_s = statistics.fmean(bare_steps_) if bare_steps_ else float("nan")

    def mean(a: str, b: str, rows=timed) -> float:
        rows = list(rows)
        return statistics.fmean(m[s][b] - m[s][a] for s in rows) if rows else 0.0

    # The gap before step s holds the log of logged step s (after 0-based step s - 1), then the next batch.
    gaps = {s: m[s]["fwd0"] - end(s - 1) for s in timed}
    logging = statistics.fmean(log_time.get(s, 0.0) for s in timed)
    breakdown = {
        "data_wait": statistics.fmean(gaps.values()) - logging,
        "logging": logging,
        "teacher_forward": mean("teacher0", "teacher1"),
        "student_forward": mean("student0", "student1"),
        "loss_monitors_center": mean("student1", "fwd1"),
        "method_glue": mean("fwd0", "teacher0") + mean("teacher1", "student0"),
        "backward": mean("fwd1", "bwd1"),
        "clip_and_freeze": mean("bwd1", "step0"),
        "optimizer_step": mean("step0", "step1"),
        "zero_grad": mean("step1", "opt1"),
        "ema": mean("opt1", "ema1"),
    }
    final = {**final, "_full_steps": full_steps, "_bare_steps": bare_steps_}
    return per_step, breakdown, final, bare_s


def make_batches(cfg, n: int, device: torch.device) -> tuple[list[list[torch.Tensor]], float]:
    """``n`` batches from the real dataset + collate (epoch 0, in order); returns them and the s/batch it took."""
    from torch.utils.data import DataLoader

    from common.bands import resolve_sensor
    from eo_ssl.multicrop import collate_multicrop
    from eo_ssl.pretrain import build_dataset

    spec = resolve_sensor(cfg.data.sensor, cfg.data.bands, cfg.data.stats_file)
    dataset = build_dataset(cfg, spec)
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=False, num_workers=0,
                        collate_fn=collate_multicrop, drop_last=True)
    batches, t0 = [], time.perf_counter()
    for crops in loader:
        batches.append(crops)
        if len(batches) == n:
            break
    per_batch = (time.perf_counter() - t0) / len(batches)
    return [[c.to(device) for c in b] for b in batches], per_batch


def bare_steps(method, batches, steps: int, device: torch.device, optimizer=None) -> float:
    """s/step of student fwd+bwd on all crops + teacher fwd on the globals (+ an optimiser step if given)."""
    from eo_ssl.dino import N_GLOBAL_CROPS

    student, teacher = method.student, method.teacher
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        crops = batches[i % len(batches)]
        with torch.no_grad():
            teacher(crops[:N_GLOBAL_CROPS])
        student(crops).sum().backward()
        if optimizer is not None:
            optimizer.step()
        student.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed optimisation steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (trainer.num_workers)")
    ap.add_argument("--log-every", type=int, default=5, help="trainer.log_every (demo.yaml: 5)")
    ap.add_argument("--tiles", type=int, default=160,
                    help="demo training tiles per domain to generate (the demo's 160: 13 steps per epoch)")
    ap.add_argument("--data", type=Path, default=None, help="existing demo data directory (skips generation)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--bare-batches", type=int, default=4, help="pre-made batches cycled by the bare step")
    ap.add_argument("--opt-steps", type=int, default=5, help="steps of the (informative) bare + AdamW timing")
    ap.add_argument("--no-interleave", action="store_true",
                    help="time the bare step in separate rounds before/after the run even with --workers 0")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    torch.set_num_threads(args.threads)

    from eo_ssl.dino import N_GLOBAL_CROPS
    from eo_ssl.pretrain import DINOMethod
    from common.bands import resolve_sensor
    from common.optim import build_optimizer

    with tempfile.TemporaryDirectory(prefix="bench_dino_") as tmp:
        tmp = Path(tmp)
        data_root = args.data if args.data is not None else make_demo_tiles(tmp / "demo", args.tiles)
        total = args.warmup + args.steps
        cfg = build_cfg(data_root, args, total)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        spec = resolve_sensor(cfg.data.sensor, cfg.data.bands, cfg.data.stats_file)
        n_tiles = len(list(Path(data_root).glob(cfg.data.glob)))
        print(f"setting: {cfg.model.arch}, {len(spec.bands)} bands, batch {cfg.data.batch_size}, "
              f"{N_GLOBAL_CROPS} x {cfg.augment.global_size} px + {cfg.augment.local_number} x "
              f"{cfg.augment.local_size} px crops, "
              f"out_dim {cfg.dino.out_dim}, BN head {cfg.dino.use_bn_in_head}, {cfg.optim.name}, clip "
              f"{cfg.trainer.clip_grad} {cfg.trainer.clip_mode}; {n_tiles} tiles; device {device.type}, "
              f"threads {torch.get_num_threads()}, workers {args.workers}; {args.warmup} warm-up + {args.steps} "
              f"timed steps", flush=True)

        # Bare: its own copy of the method (same init) on pre-made batches. With --workers 0 one bare step is
        # interleaved after every full step (same machine load for both: the fair comparison on a shared machine);
        # with workers it is timed in separate rounds before and after the run (interleaving would let the workers
        # prefetch during the bare step and hide the data wait).
        torch.manual_seed(cfg.trainer.seed)
        bare = DINOMethod(cfg, in_chans=len(spec.bands), rgb=spec.rgb_indices()).to(device).train()
        batches, data_s_per_batch = make_batches(cfg, args.bare_batches, device)
        bare_steps(bare, batches, max(args.warmup, 1), device)
        interleave = args.workers == 0 and not args.no_interleave
        bare_rounds = [] if interleave else [bare_steps(bare, batches, args.steps, device)]

        full_s, breakdown, final, bare_in_run = run_full(cfg, tmp / "run", args.warmup, args.steps,
                                                         (bare, batches) if interleave else None)

        if interleave:
            bare_rounds.append(bare_in_run)
        else:
            bare_rounds.append(bare_steps(bare, batches, args.steps, device))
        bare_s = statistics.median(bare_rounds)
        fused_opt = build_optimizer(cfg.optim, bare.param_groups())
        bare_steps(bare, batches, 1, device, fused_opt)
        bare_opt_s = bare_steps(bare, batches, args.opt_steps, device, fused_opt)

    bs = cfg.data.batch_size
    ratio = full_s / bare_s
    compute = breakdown["teacher_forward"] + breakdown["student_forward"] + breakdown["backward"]
    paired = ([f / b for f, b in zip(final["_full_steps"], final["_bare_steps"])] if final["_bare_steps"] else [])
    res = {
        "device": device.type,
        "threads": torch.get_num_threads(),
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
    }
    print(f"full step (engine, real data)  : {bs / full_s:8.1f} images/s  ({1000 * full_s:7.1f} ms/step)")
    how = "interleaved with the full steps" if interleave else "rounds " + ", ".join(
        f"{1000 * r:.1f}" for r in bare_rounds) + " ms"
    print(f"bare fwd+bwd (no optimiser)    : {bs / bare_s:8.1f} images/s  ({1000 * bare_s:7.1f} ms/step; {how})")
    print(f"bare fwd+bwd + AdamW step      : {bs / bare_opt_s:8.1f} images/s  ({1000 * bare_opt_s:7.1f} ms/step)")
    print(f"ratio full / bare              : {ratio:.3f}x (target <= {TARGET_RATIO:.2f}x)"
          f"{'' if ratio <= TARGET_RATIO else '  ABOVE TARGET'}")
    if paired:
        print(f"ratio, median of paired steps  : {statistics.median(paired):.3f}x (each full step / the bare step "
              f"after it)")
    print(f"ratio full / in-run compute    : {full_s / compute:.3f}x (teacher + student forward + backward timed "
          f"inside the same full steps)")
    print(f"ratio full / (bare + optimiser): {full_s / bare_opt_s:.3f}x")
    print(f"data production on one process : {1000 * data_s_per_batch:.1f} ms/batch (workers=0 pays it in the step)")
    print("full step breakdown (ms/step, inside the engine run):")
    for key, v in breakdown.items():
        print(f"  {key:22s} {1000 * v:8.2f}")
    print(f"  {'sum':22s} {1000 * sum(breakdown.values()):8.2f}  (measured step {1000 * full_s:.2f})")
    print(f"  excess over network compute: {1000 * (full_s - compute):.2f} ms/step "
          f"({100 * (full_s / compute - 1):.1f} % of the in-run compute)")
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
