"""Segmentation throughput: full training step vs bare forward/backward, and sliding-window prediction speed.

Training: one *full step* is what the engine does per optimisation step: per-group lr/weight decay from the
schedule arrays, the autocast context, ``DeepLab.forward`` (output tuple), the loss (:mod:`finetune.losses`),
backward, optional gradient clipping, the optimiser step, ``zero_grad`` and the finite-loss check. The *bare* step
calls the timm feature model and the head modules directly and back-propagates the sum of the upsampled logits.
Their ratio is the framework's overhead over the network itself (target: at most ``TARGET_RATIO``).

Prediction: :func:`finetune.inference.sliding_window_inference` over a ``--image-size`` square image with
``--in-chans`` bands, reported in megapixels per second.

Defaults run in about a minute on a CPU; e.g. on a GPU::

    python bench/bench_segmentation.py --arch resnet50 --batch 16 --size 512 --steps 30 --image-size 2048
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from common.optim import OptimConfig, build_optimizer, param_groups_no_wd_for_norm_and_bias
from common.schedules import build_lr_schedule
from finetune.deeplab import DeepLab, create_segmenter
from finetune.inference import sliding_window_inference
from finetune.losses import build_segmentation_loss

TARGET_RATIO = 1.10
"""Full step time / bare forward-backward time the framework aims to stay under."""

MEGAPIXEL = 1e6


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    """The engine's autocast context: bf16/fp16 when asked, a disabled autocast context otherwise (CPU fallback)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return torch.autocast(device_type=device.type, dtype=dtype if precision != "no" else torch.bfloat16,
                          enabled=precision != "no")


def _bare_forward(model: DeepLab, x: torch.Tensor) -> torch.Tensor:
    """timm feature model + head modules called directly (no output tuple, no loss object)."""
    feats = model.backbone.model(x)
    high = feats[model.high_index]
    head = model.head
    if model.version == "v2":
        logits = head(high)
    elif model.version == "v3":
        logits = head.classifier(head.fuse(head.aspp(high)))
    else:
        low = feats[model.low_index]
        a = F.interpolate(head.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        logits = head.classifier(head.fuse(torch.cat([a, head.low_project(low)], dim=1)))
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def bench_training(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_segmenter(args.arch, args.version, args.num_classes, args.in_chans,
                             output_stride=args.output_stride).to(device).train()
    criterion = build_segmentation_loss(args.loss, args.num_classes).to(device)
    cfg = OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4)
    groups = param_groups_no_wd_for_norm_and_bias(model.named_parameters(), prefix_scales={"backbone.": 0.1})
    if args.fused_adamw:
        # torch's fused AdamW kernel (CPU and CUDA); build_optimizer uses the default foreach implementation.
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=0.0, fused=True)
    else:
        optimizer = build_optimizer(cfg, groups)
    total = args.warmup + args.steps
    lr_sched = build_lr_schedule("poly", cfg.lr, total_steps=2 * total + 1, warmup_steps=2)
    x = torch.randn(args.batch, args.in_chans, args.size, args.size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch, args.size, args.size), device=device)
    y[:, :2] = 255  # some ignored pixels, as real masks have
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    step = 0

    def full_step() -> None:
        nonlocal step
        for g in optimizer.param_groups:  # 1. schedules
            g["lr"] = float(lr_sched[step]) * g.get("lr_scale", 1.0)
            g["weight_decay"] = cfg.weight_decay if g.get("apply_wd", True) else 0.0
        with _autocast(device, args.precision):  # 2. forward and loss
            out = model(x)
            loss = criterion(out.logits, y)
        scaler.scale(loss).backward()  # 3. backward, clipping, step
        if args.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss.detach()):  # 4. the engine's finite-loss check (one host sync)
            raise RuntimeError("non-finite loss")
        step += 1

    def bare_step() -> None:
        _bare_forward(model, x).sum().backward()
        model.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        full_step()
        bare_step()
    full_t, bare_t = [], []
    for _ in range(args.steps):  # interleaved, so load changes on a shared machine hit both alike
        full_t.append(timed(full_step))
        bare_t.append(timed(bare_step))
    full_s, bare_s = statistics.median(full_t), statistics.median(bare_t)
    return {"full_img_s": args.batch / full_s, "bare_img_s": args.batch / bare_s, "ratio": full_s / bare_s,
            "full_ms": 1e3 * full_s, "bare_ms": 1e3 * bare_s}


def bench_prediction(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_segmenter(args.arch, args.version, args.num_classes, args.in_chans,
                             output_stride=args.output_stride).to(device).eval()
    image = torch.randn(1, args.in_chans, args.image_size, args.image_size, device=device)

    def model_fn(x: torch.Tensor) -> torch.Tensor:
        with _autocast(device, args.precision):
            return model(x).logits

    def run() -> float:
        _sync(device)
        t0 = time.perf_counter()
        sliding_window_inference(model_fn, image, window=args.window, overlap=args.overlap,
                                 num_classes=args.num_classes, blend="gaussian", batch_size=args.window_batch)
        _sync(device)
        return time.perf_counter() - t0

    run()  # warm-up
    seconds = statistics.median(run() for _ in range(args.predict_reps))
    return {"mpix_s": args.image_size ** 2 / MEGAPIXEL / seconds, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--version", default="v3+", choices=["v2", "v3", "v3+"])
    ap.add_argument("--output-stride", type=int, default=16)
    ap.add_argument("--in-chans", type=int, default=12)
    ap.add_argument("--num-classes", type=int, default=6)
    ap.add_argument("--loss", default="ce")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="training crop size")
    ap.add_argument("--steps", type=int, default=12, help="timed steps (each full and bare)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--fused-adamw", action="store_true",
                    help="use torch's fused AdamW instead of common.optim.build_optimizer's (foreach) AdamW")
    ap.add_argument("--clip-grad", type=float, default=0.0, help="global-norm clipping (0: off)")
    ap.add_argument("--precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                    help="autocast dtype; auto: bf16 on CUDA, none on CPU (autocast context still entered)")
    ap.add_argument("--image-size", type=int, default=512, help="prediction image side")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--window-batch", type=int, default=4)
    ap.add_argument("--predict-reps", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    ap.add_argument("--skip-predict", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" else "no"
    print(f"device={device} threads={torch.get_num_threads()} arch={args.arch} DeepLab {args.version} "
          f"OS{args.output_stride} bands={args.in_chans} precision={args.precision} "
          f"optimizer={'AdamW(fused)' if args.fused_adamw else 'build_optimizer AdamW(foreach)'}")

    r = bench_training(args, device)
    verdict = "OK" if r["ratio"] <= TARGET_RATIO else f"ABOVE TARGET {TARGET_RATIO:.2f}x"
    print(f"train  batch={args.batch} size={args.size}: full step {r['full_img_s']:.1f} img/s ({r['full_ms']:.1f} ms), "
          f"bare fwd/bwd {r['bare_img_s']:.1f} img/s ({r['bare_ms']:.1f} ms), ratio {r['ratio']:.3f}x [{verdict}]")
    if not args.skip_predict:
        p = bench_prediction(args, device)
        print(f"predict {args.image_size}x{args.image_size}x{args.in_chans} window={args.window} "
              f"overlap={args.overlap}: {p['mpix_s']:.3f} MP/s ({p['seconds']:.2f} s per image)")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
