"""Segmentation throughput: the full framework training step vs the network's own compute, and sliding-window
prediction speed in megapixels per second.

*Full step*: what ``finetune/semisup.py::main`` runs with ``method=supervised``, i.e. :class:`common.engine.Engine`
``fit`` with :class:`finetune.methods.supervised.Supervised` built the same way as :func:`finetune.training.run`
(:func:`finetune.inputs.resolve_inputs`, ``build_model``, ``build_loss``, the run's
:class:`finetune.methods.base.SegSetup`, the ``labelled`` stream of :func:`finetune.data.stream_dataset`) on
generated demo tiles (64 px, 12-band S2, 6 classes, the real augmentation pipeline on the ``train_all`` split):
data loading, lr / wd schedules, DeepLab forward, the segmentation loss (:mod:`finetune.losses`), backward and the
engine's loss bookkeeping, optional clipping, the optimiser step, ``zero_grad`` and the periodic scalar logging
(metrics.jsonl and TensorBoard). The default setting
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
timestamps taken inside the run (marks around the method's ``training_step``, forward hooks on the network, a
gradient hook on the loss, post-accumulate-grad hooks on the parameters, the method's ``before_optimizer_step`` /
``after_optimizer_step`` hooks and global optimiser step hooks; on CUDA each mark synchronises the device):

* data wait: from the end of the previous step to the start of the method's ``training_step``, less the logging (the
  DataLoader / Accelerate batch hand-over with the augmentations when ``--workers 0``, the loader's restart at epoch
  boundaries, the lr/wd schedule update);
* logging: the engine's ``_log`` and ``_check_finite`` calls every ``trainer.log_every`` steps, averaged per step;
* method glue (batch unpacking), network forward, loss, engine glue (autocast exit, the finite flag, ``loss / k``
  and the ``backward`` call; after backward proper the running loss sums and the optimiser step's entry up to the
  ``before_optimizer_step`` hook), backward proper, clipping, optimiser step, ``zero_grad``.

Augmentation on the device (``--augment-device cuda``, ``augment.device``): the loader only decodes and the engine
makes the views of each batch on the GPU (:mod:`finetune.device_views`) before ``training_step``; that time is
reported as ``device_augment`` (taken out of the data wait; each call synchronised).

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
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steptiming import (  # noqa: E402,F401  (TARGET_RATIO: named in the docstring, kept as this module's)
    TARGET_RATIO, Marks, StepTimes, TimedDeviceTransform, TimedMethod, add_bare_options, device_views, fit_timed,
    make_demo_tiles, report_steps, sync, take_batches, time_full_and_bare,
)

REPO = Path(__file__).resolve().parents[1]

MEGAPIXEL = 1e6


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
        f"augment.device={args.augment_device}",
        *args.set,
    ]
    return load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo.yaml", overrides)


def _autocast(device: torch.device, precision: str):
    """What the engine's ``accelerator.autocast()`` amounts to for a resolved precision."""
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _instrumented_method_cls():
    from finetune.methods.supervised import Supervised

    class TimedSupervised(TimedMethod, Supervised):
        """Supervised plus timestamps (the computation is the parent's, unchanged; the parent has no
        ``before_optimizer_step`` / ``after_optimizer_step`` hooks, so these add only the marks and the bare
        step)."""

        def attach(self, marks: Marks, bare=None) -> None:
            self.attach_marks(marks, bare)
            self.model.register_forward_pre_hook(lambda *_: marks("net0"))
            self.model.register_forward_hook(lambda *_: marks("net1"))
            params = [p for p in self.model.parameters() if p.requires_grad]
            # The end of backward proper: the last parameter gradient accumulated (the stem's, in practice). On
            # CUDA only the first parameter is hooked (each mark synchronises the device).
            for p in params if marks.device.type != "cuda" else params[:1]:
                p.register_post_accumulate_grad_hook(lambda _p: marks("bwd_end"))

        def on_step_output(self, out) -> None:
            if out["loss"].requires_grad:
                out["loss"].register_hook(lambda _g: self.marks("bwd0"))

        def before_optimizer_step(self, name, step, epoch):
            self.marks("bwd1")

        def after_optimizer_step(self, step, epoch):
            self.marks("opt1")
            self.interleaved_bare_step(step)

    return TimedSupervised


def labelled_dataset(cfg, spec):
    """The ``labelled`` training stream as :func:`finetune.training.run` builds it for ``method=supervised``."""
    from finetune.data import stream_dataset
    from finetune.methods.supervised import Supervised

    return stream_dataset("labelled", cfg.data, spec, cfg.augment, cfg.trainer.seed,
                          n_strong=Supervised.views.get("labelled", 0))


def seg_setup(cfg, inputs):
    """The run's :class:`finetune.methods.base.SegSetup`, as :func:`finetune.training.run` makes it."""
    from finetune.data import band_units_of
    from finetune.inputs import build_loss, build_model
    from finetune.methods.base import SegSetup

    d, spec = cfg.data, inputs.spec
    return SegSetup(num_classes=d.num_classes, criterion=build_loss(cfg.loss, d.num_classes),
                    band_units=band_units_of(spec), band_std=spec.std_array(),
                    backbone_lr_mult=cfg.model.backbone_lr_mult, freeze_backbone=cfg.model.freeze_backbone,
                    make_model=lambda: build_model(cfg.model, d.num_classes, inputs, len(spec.bands)),
                    class_names=d.class_names)


def run_full(cfg, out_dir: Path, warmup: int, steps: int, bare=None) -> tuple[float, dict[str, float], dict, float]:
    """Train ``warmup + steps`` steps through the engine as ``finetune/semisup.py`` does; returns (s/step, breakdown
    s/step, final metrics, bare s/step). With ``bare = (model, batches, precision)`` one bare step runs after every
    full step (after its ``zero_grad``, before its logging) and is timed separately; its time is excluded from the
    full step's."""
    from common.engine import Engine
    from finetune.data import stream_loader
    from finetune.inputs import build_model, resolve_inputs

    inputs = resolve_inputs(cfg.data, cfg.model)
    spec = inputs.spec
    dataset = labelled_dataset(cfg, spec)
    engine = Engine(cfg.trainer, out_dir, config=cfg)
    stream = stream_loader(dataset, cfg.data.batch_size, spec, cfg.augment)  # as finetune/training.py
    timed_aug = None
    if stream.device_transform is not None:  # augment.device: cuda / cpu
        timed_aug = stream.device_transform = TimedDeviceTransform(stream.device_transform)
    loaders = {"labelled": stream}
    engine.plan(loaders)
    model = build_model(cfg.model, cfg.data.num_classes, inputs, len(spec.bands))
    method = _instrumented_method_cls()(cfg.supervised, model, seg_setup(cfg, inputs))
    marks = Marks(engine.device)
    one_bare = None
    if bare is not None:
        bare_model, batches, precision = bare

        def one_bare(step: int) -> None:
            bare_steps(bare_model, [batches[step % len(batches)]], 1, marks.device, precision)

    method.attach(marks, one_bare)
    final, log_time = fit_timed(engine, marks, lambda: engine.fit(method, loaders, cfg.optim))

    t = StepTimes(marks.by_step, log_time, warmup, steps, last="opt1", interleaved=bare is not None)
    full_s, breakdown, final, bare_s = t.run_result(final, {
        "method_glue": t.mean("fwd0", "net0"),
        "network_forward": t.mean("net0", "net1"),
        "loss": t.mean("net1", "fwd1"),
        "engine_glue": t.mean("fwd1", "bwd0") + t.mean("bwd_end", "bwd1"),
        "backward": t.mean("bwd0", "bwd_end"),
        "clip": t.mean("bwd1", "step0"),
        "optimizer_step": t.mean("step0", "step1"),
        "zero_grad": t.mean("step1", "opt1"),
    })
    if timed_aug is not None:  # the batched augmentation, out of the data wait
        breakdown = timed_aug.split(breakdown, warmup, steps)
    return full_s, breakdown, final, bare_s


def make_batches(cfg, n: int, device: torch.device) -> tuple[list[dict[str, torch.Tensor]], float]:
    """``n`` batches from the real dataset + default collate (epoch 0, in order); returns them and the s/batch it
    took."""
    from torch.utils.data import DataLoader

    from finetune.data import stream_loader
    from finetune.inputs import resolve_inputs

    spec = resolve_inputs(cfg.data, cfg.model).spec
    dataset = labelled_dataset(cfg, spec)
    dataset.set_epoch(0)
    stream = stream_loader(dataset, cfg.data.batch_size, spec, cfg.augment)
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=False, num_workers=0, drop_last=True,
                        collate_fn=stream.collate_fn)
    batches, per_batch = take_batches(loader, n)
    if stream.device_transform is not None:  # decoded tiles -> the views the method receives
        batches = device_views(stream.device_transform, batches, device, seed=cfg.trainer.seed)
    return [{k: batch[k].to(device) for k in ("image", "mask")} for batch in batches], per_batch


def bare_steps(model, batches, steps: int, device: torch.device, precision: str, optimizer=None) -> float:
    """s/step of ``model(x)`` + cross-entropy + backward (+ an optimiser step if given), then ``zero_grad``."""
    from common.bands import IGNORE_INDEX

    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        with _autocast(device, precision):
            logits = model(batch["image"]).logits
        F.cross_entropy(logits.float(), batch["mask"], ignore_index=IGNORE_INDEX).backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    sync(device)
    return (time.perf_counter() - t0) / steps


def bench_prediction(cfg, args: argparse.Namespace, device: torch.device, precision: str) -> dict[str, float]:
    """Megapixels/s of sliding-window inference of the configured architecture (random init, eval mode)."""
    from finetune.inference import sliding_window_inference
    from finetune.inputs import build_model, resolve_inputs

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
        sync(device)
        t0 = time.perf_counter()
        sliding_window_inference(model_fn, image, window=args.window, overlap=args.overlap, num_classes=k,
                                 blend="gaussian", batch_size=args.window_batch)
        sync(device)
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
    ap.add_argument("--augment-device", choices=("workers", "cpu", "cuda"), default="workers",
                    help="augment.device: views made per sample by the loader (workers; the default) or in batch in "
                         "torch on the training device (cuda) / the CPU (cpu)")
    ap.add_argument("--precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                    help="trainer.mixed_precision, also used by the bare step and prediction (auto: bf16/fp16 on "
                         "CUDA, fp32 on CPU)")
    ap.add_argument("--tiles", type=int, default=64, help="demo training tiles per domain to generate")
    ap.add_argument("--data", type=Path, default=None,
                    help="existing demo data directory (holds s2/source; skips generation)")
    ap.add_argument("--split", default="train_all", help="training split (data.labelled_split)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override on top of configs/finetune/demo.yaml (repeatable)")
    add_bare_options(ap)
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
    from finetune.inputs import build_model, resolve_inputs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_mixed_precision(args.precision, cuda=device.type == "cuda")
    res: dict = {"device": device.type, "threads": torch.get_num_threads(), "precision": precision,
                 "arch": args.arch, "version": args.version, "output_stride": args.output_stride,
                 "augment_device": args.augment_device}
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
              f"{torch.get_num_threads()}, workers {args.workers}, augment.device {args.augment_device}; "
              f"{args.warmup} warm-up + {args.steps} timed steps",
              flush=True)

        if not args.skip_train:
            # Bare: its own copy of the network (same init) on pre-made batches. With --workers 0 one bare step is
            # interleaved after every full step (same machine load for both: the fair comparison on a shared
            # machine); with workers it is timed in separate rounds before and after the run (interleaving would let
            # the workers prefetch during the bare step and hide the data wait).
            torch.manual_seed(cfg.trainer.seed)
            bare = build_model(cfg.model, cfg.data.num_classes, inputs, len(inputs.spec.bands)).to(device).train()
            batches, data_s_per_batch = make_batches(cfg, args.bare_batches, device)
            interleave = args.workers == 0 and not args.no_interleave
            full_s, breakdown, final, bare_rounds, bare_s = time_full_and_bare(
                lambda inter: run_full(cfg, tmp / "run", args.warmup, args.steps,
                                       (bare, batches, precision) if inter else None),
                lambda n: bare_steps(bare, batches, n, device, precision), args.warmup, args.steps, interleave)
            from finetune.methods.base import SegSetup
            from finetune.methods.supervised import Supervised, SupervisedConfig

            groups = Supervised(SupervisedConfig(), bare, SegSetup(2, torch.nn.Identity())).param_groups()
            opt = build_optimizer(cfg.optim, groups)
            bare_steps(bare, batches, 1, device, precision, opt)
            bare_opt_s = bare_steps(bare, batches, args.opt_steps, device, precision, opt)

            compute = breakdown["network_forward"] + breakdown["backward"]
            res.update(report_steps(
                bs=cfg.data.batch_size, workers=args.workers, steps=args.steps, full_s=full_s, bare_s=bare_s,
                bare_opt_s=bare_opt_s, bare_rounds=bare_rounds, interleave=interleave, breakdown=breakdown,
                final=final, compute=compute, data_s_per_batch=data_s_per_batch,
                bare_label="bare fwd+CE+bwd (no optimiser)", bare_opt_label="bare fwd+CE+bwd + AdamW step",
                compute_what="network forward + backward",
                breakdown_title="inside the engine run; evaluation excluded"))

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
