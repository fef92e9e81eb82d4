"""DINO training-step throughput: the full framework step vs the networks' own compute, per CPU core.

*Full step*: what ``ssl/pretrain.py::main`` runs, i.e. :class:`common.engine.Engine` ``fit`` with
:class:`eo_ssl.dino.DINOMethod` (built by :func:`eo_ssl.pretrain.build_method` for the engine's run plan) on
:func:`eo_ssl.pretrain.build_dataset` (the real multi-crop pipeline,
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
timestamps taken inside the run (marks around the method's ``training_step``, forward hooks on teacher and
student, the method's ``before_optimizer_step`` / ``after_optimizer_step`` hooks and global optimiser step hooks; on
CUDA each mark synchronises the device):

* data wait: from the end of the previous step to the start of the method's ``training_step``, less the logging (the
  DataLoader / Accelerate batch hand-over, including the loader's restart at epoch boundaries, plus the lr/wd
  schedule update);
* logging: the engine's ``_log`` and ``_check_finite`` calls every ``trainer.log_every`` steps, averaged per step;
* teacher / student forward, loss + monitors + centering, backward (plus the engine's loss bookkeeping), clipping
  (incl. the last-layer freeze of ``before_optimizer_step``), optimiser step, ``zero_grad``, EMA
  (``after_optimizer_step``).

Augmentation on the device (``--augment-device cuda``, ``augment.device``): the loader only decodes and the engine
makes the views of each batch on the GPU (:mod:`eo_ssl.multicrop_device`) before ``training_step``; that time is
reported as ``device_augment`` (taken out of the data wait; each call synchronised). ``--augment-device cpu`` runs
the same batched torch code on the CPU (for information: on a CPU the per-sample OpenCV pipeline is the faster one).

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
import json
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steptiming import (  # noqa: E402,F401  (TARGET_RATIO: named in the docstring, kept as this module's)
    TARGET_RATIO, Marks, StepTimes, TimedDeviceTransform, TimedMethod, add_bare_options, device_views, fit_timed,
    make_demo_tiles, report_steps, sync, take_batches, time_full_and_bare,
)

REPO = Path(__file__).resolve().parents[1]


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
        f"augment.device={args.augment_device}",
    ]
    return load_config(PretrainConfig, REPO / "configs" / "pretrain" / "demo.yaml", overrides)


def _instrumented_method_cls():
    from eo_ssl.dino import DINOMethod

    class TimedDINOMethod(TimedMethod, DINOMethod):
        """DINOMethod plus timestamps (the computation is the parent's, unchanged). No constructor of its own: a
        method made by :func:`eo_ssl.pretrain.build_method` is instrumented in place (:func:`instrument`)."""

        def attach(self, marks: Marks, bare=None) -> None:
            self.attach_marks(marks, bare)
            self.teacher.register_forward_pre_hook(lambda *_: marks("teacher0"))
            self.teacher.register_forward_hook(lambda *_: marks("teacher1"))
            self.student.register_forward_pre_hook(lambda *_: marks("student0"))
            self.student.register_forward_hook(lambda *_: marks("student1"))

        def before_optimizer_step(self, name, step, epoch):
            self.marks("bwd1")
            super().before_optimizer_step(name, step, epoch)

        def after_optimizer_step(self, step, epoch):
            self.marks("opt1")
            super().after_optimizer_step(step, epoch)
            self.marks("ema1")
            self.interleaved_bare_step(step)

    return TimedDINOMethod


def instrument(method):
    """Make the :class:`eo_ssl.dino.DINOMethod` that ``build_method`` returned a ``TimedDINOMethod`` (its class
    swapped for the timed subclass: the same object, modules, parameters and state; no step computation changes)."""
    from eo_ssl.dino import DINOMethod

    if type(method) is not DINOMethod:
        raise TypeError(f"expected the DINOMethod of build_method, got {type(method).__name__}")
    method.__class__ = _instrumented_method_cls()
    return method


def run_full(cfg, out_dir: Path, warmup: int, steps: int, bare=None) -> tuple[float, dict[str, float], dict, float]:
    """Train ``warmup + steps`` steps through the engine; returns (s/step, breakdown s/step, final metrics, bare
    s/step). With ``bare = (method, batches)`` one bare step runs after every full step (after its EMA, before its
    logging) and is timed separately, so that both see the same machine load; its time is excluded from the full
    step's."""
    from common.engine import Engine
    from eo_ssl.pretrain import build_dataset, build_method, check_schedule, resolve_data_sensor, tile_stream

    spec = resolve_data_sensor(cfg.data)
    dataset = build_dataset(cfg, spec)
    engine = Engine(cfg.trainer, out_dir, config=cfg)
    stream = tile_stream(cfg, spec, dataset)  # as ssl/pretrain.py (augment.device: workers, cpu or cuda)
    timed_aug = None
    if stream.device_transform is not None:
        timed_aug = stream.device_transform = TimedDeviceTransform(stream.device_transform)
    loaders = {"tiles": stream}
    plan = engine.plan(loaders)  # as ssl/pretrain.py: the schedules are sized by the run's plan
    check_schedule(cfg, plan)
    method = instrument(build_method(cfg, len(spec.bands), plan.epochs, plan.total_steps, rgb=spec.rgb_indices()))
    marks = Marks(engine.device)
    one_bare = None
    if bare is not None:
        bare_method, batches = bare

        def one_bare(step: int) -> None:
            bare_steps(bare_method, [batches[step % len(batches)]], 1, marks.device)

    method.attach(marks, one_bare)
    final, log_time = fit_timed(engine, marks, lambda: engine.fit(method, loaders, cfg.optim))

    t = StepTimes(marks.by_step, log_time, warmup, steps, last="ema1", interleaved=bare is not None)
    full_s, breakdown, final, bare_s = t.run_result(final, {
        "teacher_forward": t.mean("teacher0", "teacher1"),
        "student_forward": t.mean("student0", "student1"),
        "loss_monitors_center": t.mean("student1", "fwd1"),
        "method_glue": t.mean("fwd0", "teacher0") + t.mean("teacher1", "student0"),
        "backward": t.mean("fwd1", "bwd1"),
        "clip_and_freeze": t.mean("bwd1", "step0"),
        "optimizer_step": t.mean("step0", "step1"),
        "zero_grad": t.mean("step1", "opt1"),
        "ema": t.mean("opt1", "ema1"),
    })
    if timed_aug is not None:  # the batched augmentation, out of the data wait
        breakdown = timed_aug.split(breakdown, warmup, steps)
    return full_s, breakdown, final, bare_s


def make_batches(cfg, n: int, device: torch.device) -> tuple[list[list[torch.Tensor]], float]:
    """``n`` batches of views from the real dataset + collate (epoch 0, in order; with ``augment.device`` cpu / cuda
    decoded tiles through the stream's device transform); returns them and the s/batch the loader took."""
    from torch.utils.data import DataLoader

    from eo_ssl.pretrain import build_dataset, resolve_data_sensor, tile_stream

    spec = resolve_data_sensor(cfg.data)
    dataset = build_dataset(cfg, spec)
    stream = tile_stream(cfg, spec, dataset)
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=False, num_workers=0,
                        collate_fn=stream.collate_fn, drop_last=True)
    batches, per_batch = take_batches(loader, n)
    if stream.device_transform is not None:
        return device_views(stream.device_transform, batches, device, seed=cfg.trainer.seed), per_batch
    return [[c.to(device) for c in b] for b in batches], per_batch


def bare_steps(method, batches, steps: int, device: torch.device, optimizer=None) -> float:
    """s/step of student fwd+bwd on all crops + teacher fwd on the globals (+ an optimiser step if given)."""
    from eo_ssl.dino import N_GLOBAL_CROPS

    student, teacher = method.student, method.teacher
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        crops = batches[i % len(batches)]
        with torch.no_grad():
            teacher(crops[:N_GLOBAL_CROPS])
        student(crops).sum().backward()
        if optimizer is not None:
            optimizer.step()
        student.zero_grad(set_to_none=True)
    sync(device)
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed optimisation steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (trainer.num_workers)")
    ap.add_argument("--log-every", type=int, default=5, help="trainer.log_every (demo.yaml: 5)")
    ap.add_argument("--augment-device", choices=("workers", "cpu", "cuda"), default="workers",
                    help="augment.device: views made per sample by the loader (workers; the default) or in batch in "
                         "torch on the training device (cuda) / the CPU (cpu)")
    ap.add_argument("--tiles", type=int, default=160,
                    help="demo training tiles per domain to generate (the demo's 160: 13 steps per epoch)")
    ap.add_argument("--data", type=Path, default=None, help="existing demo data directory (skips generation)")
    add_bare_options(ap)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    torch.set_num_threads(args.threads)

    from common.optim import build_optimizer
    from eo_ssl.dino import N_GLOBAL_CROPS
    from eo_ssl.pretrain import build_method, resolve_data_sensor

    with tempfile.TemporaryDirectory(prefix="bench_dino_") as tmp:
        tmp = Path(tmp)
        data_root = args.data if args.data is not None else make_demo_tiles(tmp / "demo", args.tiles)
        total = args.warmup + args.steps
        cfg = build_cfg(data_root, args, total)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        spec = resolve_data_sensor(cfg.data)
        n_tiles = len(list(Path(data_root).glob(cfg.data.glob)))
        print(f"setting: {cfg.model.arch}, {len(spec.bands)} bands, batch {cfg.data.batch_size}, "
              f"{N_GLOBAL_CROPS} x {cfg.augment.global_size} px + {cfg.augment.local_number} x "
              f"{cfg.augment.local_size} px crops, "
              f"out_dim {cfg.dino.out_dim}, BN head {cfg.dino.use_bn_in_head}, {cfg.optim.name}, clip "
              f"{cfg.trainer.clip_grad} {cfg.trainer.clip_mode}; {n_tiles} tiles; device {device.type}, "
              f"threads {torch.get_num_threads()}, workers {args.workers}, augment.device {args.augment_device}; "
              f"{args.warmup} warm-up + {args.steps} timed steps", flush=True)

        # Bare: its own copy of the method (same init) on pre-made batches. With --workers 0 one bare step is
        # interleaved after every full step (same machine load for both: the fair comparison on a shared machine);
        # with workers it is timed in separate rounds before and after the run (interleaving would let the workers
        # prefetch during the bare step and hide the data wait). Same init as the engine's method (same seed, same
        # build_method); the bare step uses no schedule, so the default run length of build_method is enough.
        torch.manual_seed(cfg.trainer.seed)
        bare = build_method(cfg, len(spec.bands), rgb=spec.rgb_indices()).to(device).train()
        batches, data_s_per_batch = make_batches(cfg, args.bare_batches, device)
        interleave = args.workers == 0 and not args.no_interleave
        full_s, breakdown, final, bare_rounds, bare_s = time_full_and_bare(
            lambda inter: run_full(cfg, tmp / "run", args.warmup, args.steps, (bare, batches) if inter else None),
            lambda n: bare_steps(bare, batches, n, device), args.warmup, args.steps, interleave)
        fused_opt = build_optimizer(cfg.optim, bare.param_groups())
        bare_steps(bare, batches, 1, device, fused_opt)
        bare_opt_s = bare_steps(bare, batches, args.opt_steps, device, fused_opt)

    compute = breakdown["teacher_forward"] + breakdown["student_forward"] + breakdown["backward"]
    res = {
        "device": device.type,
        "threads": torch.get_num_threads(),
        "augment_device": args.augment_device,
        **report_steps(bs=cfg.data.batch_size, workers=args.workers, steps=args.steps, full_s=full_s, bare_s=bare_s,
                       bare_opt_s=bare_opt_s, bare_rounds=bare_rounds, interleave=interleave, breakdown=breakdown,
                       final=final, compute=compute, data_s_per_batch=data_s_per_batch,
                       bare_label="bare fwd+bwd (no optimiser)", bare_opt_label="bare fwd+bwd + AdamW step",
                       compute_what="teacher + student forward + backward", breakdown_title="inside the engine run"),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
