"""Direct checks of the GPU-only paths, used by ``bench/gpu_check.sh`` (one sub-command per check).

    python bench/gpu_check.py env [--require-cuda]
    python bench/gpu_check.py optim [--require-cuda]          # fused AdamW / SGD selected on CUDA, same update
    python bench/gpu_check.py engine [--require-cuda]         # bf16 / fp16 autocast, pinned + non-blocking, compile
    python bench/gpu_check.py dino-amp --data DIR             # DINOMethod through the engine in bf16: dtypes
    python bench/gpu_check.py check-pretrain RUN [--export]   # a finished pretraining run: loss finite, export loads
    python bench/gpu_check.py check-finetune RUN
    python bench/gpu_check.py check-predict --inputs DIR --pred DIR [--cpu-pred DIR]

Every check prints what it saw and ends with ``CHECK <name>: OK`` or raises (non-zero exit). It only uses the
project's public functions (nothing is patched in the project's files); on a machine without CUDA the checks run on
the CPU (the CUDA-specific assertions are skipped unless ``--require-cuda``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def _device(require_cuda: bool) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if require_cuda:
        raise SystemExit("CHECK FAILED: CUDA is not available (torch.cuda.is_available() is False)")
    print("NOTE: no CUDA device: running on the CPU (CUDA-specific assertions skipped)")
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ok(name: str) -> None:
    print(f"CHECK {name}: OK", flush=True)


# ------------------------------------------------------------------------------------------------------------ env
def cmd_env(args: argparse.Namespace) -> None:
    print(f"python {platform.python_version()} ({sys.executable}), platform {platform.platform()}")
    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
    cuda = torch.cuda.is_available()
    print(f"cuda available: {cuda}; device count {torch.cuda.device_count() if cuda else 0}")
    if cuda:
        p = torch.cuda.get_device_properties(0)
        print(f"GPU 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
              f"{p.multi_processor_count} SMs")
        print(f"bf16 supported: {torch.cuda.is_bf16_supported()}; TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
              f"cudnn {torch.backends.cudnn.allow_tf32}")
        x = torch.randn(256, 256, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = x @ x
        print(f"autocast bf16 matmul dtype: {y.dtype}")
        assert y.dtype == torch.bfloat16
    elif args.require_cuda:
        raise SystemExit("CHECK FAILED: CUDA is not available")
    from common.engine import resolve_mixed_precision

    print(f"resolve_mixed_precision('auto') -> {resolve_mixed_precision('auto')!r}")
    print(f"os.cpu_count() {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    for mod in ("torchvision", "timm", "accelerate", "safetensors", "numpy", "scipy", "cv2", "yaml", "tqdm",
                "tensorboard", "rasterio", "affine", "triton"):
        try:
            m = __import__(mod)
            extra = ""
            if mod == "rasterio":
                extra = f" (GDAL {m.__gdal_version__})"
            print(f"  {mod:12s} {getattr(m, '__version__', '?')}{extra}  {Path(m.__file__).parent}")
        except Exception as exc:  # noqa: BLE001 - report every missing package
            print(f"  {mod:12s} MISSING ({type(exc).__name__}: {exc})")
    for tool in ("gcc", "cc", "g++", "nvcc", "nvidia-smi"):
        print(f"  {tool:12s} {shutil.which(tool)}")
    import common
    import eo_ssl
    import finetune
    import ssl as stdlib_ssl

    print(f"imports: common {Path(common.__file__).parent}, eo_ssl {list(eo_ssl.__path__)}, "
          f"finetune {Path(finetune.__file__).parent}, ssl {stdlib_ssl.__file__}")
    assert hasattr(stdlib_ssl, "SSLContext"), "the standard library's ssl module is shadowed"
    _ok("env")


# ------------------------------------------------------------------------------------------------------------ optim
def _set_schedule(opt: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for g in opt.param_groups:  # what the engine does every step
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g["weight_decay"] = wd if g.get("apply_wd", True) else 0.0


def _optim_model(device: torch.device) -> nn.Module:
    import timm

    torch.manual_seed(0)
    # A DINO-sized student: resnet18 on 12 bands + a projection to 4096 (about 13 M parameters).
    return nn.Sequential(timm.create_model("resnet18", in_chans=12, num_classes=0),
                         nn.Linear(512, 512), nn.BatchNorm1d(512), nn.GELU(), nn.Linear(512, 4096)).to(device)


@torch.no_grad()
def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def cmd_optim(args: argparse.Namespace) -> None:
    from common.optim import (
        OptimConfig,
        build_optimizer,
        clip_gradients_per_parameter,
        optimizer_impl,
        param_groups_no_wd_for_norm_and_bias,
    )

    device = _device(args.require_cuda)
    base = _optim_model(device)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"model: resnet18(12 bands) + MLP head, {n_params / 1e6:.1f} M parameters on {device}")
    impl = optimizer_impl(list(base.parameters()))
    print(f"optimizer_impl(parameters on {device.type}) -> {impl!r}")
    if device.type == "cuda":
        assert impl == "fused", f"expected the fused implementation on CUDA, got {impl}"
    params = list(base.parameters())
    grads_by_step = []
    g = torch.Generator(device=device).manual_seed(1)
    for _ in range(4):
        grads_by_step.append([1e-2 * torch.randn(p.shape, device=device, generator=g) for p in params])

    def run(name: str, make) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = copy.deepcopy(base)
        opt = make(param_groups_no_wd_for_norm_and_bias(model.named_parameters()))
        ps = list(model.parameters())
        for i, grads in enumerate(grads_by_step):
            _set_schedule(opt, lr=1e-3 * (i + 1), wd=0.04 * (i + 1))
            opt.zero_grad(set_to_none=True)
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            if i == 1:
                ps[-1].grad = None  # a dropped gradient (DINO's last-layer freeze): the step skips it
            opt.step()
        _sync(device)
        return model, opt

    def time_steps(opt: torch.optim.Optimizer, model: nn.Module, n: int = 20 if device.type == "cuda" else 3) -> float:
        for p, gr in zip(model.parameters(), grads_by_step[0]):
            p.grad = gr.clone()
        opt.step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            opt.step()
        _sync(device)
        return (time.perf_counter() - t0) / n

    for name in ("adamw", "sgd"):
        cfg = OptimConfig(name=name, lr=1e-3, betas=(0.9, 0.99), momentum=0.9)
        ctor = torch.optim.AdamW if name == "adamw" else torch.optim.SGD
        kw = dict(lr=cfg.lr, betas=cfg.betas) if name == "adamw" else dict(lr=cfg.lr, momentum=cfg.momentum)
        m_fw, o_fw = run("framework", lambda gr: build_optimizer(cfg, gr))
        m_fe, o_fe = run("foreach", lambda gr: ctor(gr, weight_decay=0.0, foreach=True, **kw))
        m_ref, o_ref = run("single", lambda gr: ctor(gr, weight_decay=0.0, foreach=False, fused=False, **kw))
        print(f"{name}: build_optimizer -> {type(o_fw).__name__} fused={o_fw.defaults.get('fused')} "
              f"foreach={o_fw.defaults.get('foreach')}")
        if device.type == "cuda":
            assert o_fw.defaults.get("fused") is True, f"{name}: fused kernels not selected on CUDA"
        for label, m in (("framework", m_fw), ("foreach", m_fe)):
            print(f"  {label:9s} vs single-tensor reference after 4 steps: max |diff| {_max_diff(m, m_ref):.3e}")
            for p, q in zip(m.parameters(), m_ref.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert _max_diff(m_fw, base) > 0, "the optimiser did not step"
        times = {label: time_steps(o, m) for label, (m, o) in
                 (("framework", (m_fw, o_fw)), ("foreach", (m_fe, o_fe)), ("single", (m_ref, o_ref)))}
        print("  step time: " + ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in times.items()))

    # LARS (the reference's loop) runs on the device
    m = copy.deepcopy(base)
    lars = build_optimizer(OptimConfig(name="lars", lr=1e-3), param_groups_no_wd_for_norm_and_bias(m.named_parameters()))
    for p, gr in zip(m.parameters(), grads_by_step[0]):
        p.grad = gr.clone()
    lars.step()
    _sync(device)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    print("lars: one step on the device, parameters finite")

    # per-parameter clipping on the device: the same numbers as one clamp per parameter
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    for model in (m1, m2):
        for p, gr in zip(model.parameters(), grads_by_step[0]):
            p.grad = 50 * gr.clone()
    norms = clip_gradients_per_parameter(m1, 3.0)
    assert norms.device.type == device.type
    for p in m2.parameters():
        n = p.grad.norm()
        p.grad.mul_(torch.clamp(3.0 / (n + 1e-6), max=1.0))
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    print(f"clip_gradients_per_parameter on {device.type}: matches the per-parameter clamp "
          f"({int((norms > 3.0).sum())} of {len(norms)} clipped)")
    _ok("optim")


# ------------------------------------------------------------------------------------------------------------ engine
class _ToyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, dim: int = 16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}


def _toy_method(dim: int = 16):
    """A regression :class:`common.method.Method` (one stream ``main``, trained sub-module ``student``, automatic
    mode) that records, at every ``training_step``, the batch's device, the activation dtype and whether autocast
    is on. Built here, not at import, so that ``env`` still reports on a machine where the project fails to import."""
    from common.method import Method
    from common.optim import param_groups_no_wd_for_norm_and_bias

    class ToyMethod(Method):
        name = "gpu_check_toy"
        streams = ("main",)
        trainable = ("student",)

        def __init__(self) -> None:
            super().__init__()
            self.student = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, 1))
            self.compile_modules = ("student",)
            self.__dict__["seen"] = []

        def param_groups(self) -> list[dict]:
            return param_groups_no_wd_for_norm_and_bias(self.student.named_parameters())

        def training_step(self, batch: dict, ctx) -> dict:
            b = batch["main"]
            x = b["x"]
            # (a compiled module with trainer.compile on CUDA: no indexing into it)
            pred = self.wrapped("student")(x)
            try:
                autocast_on = torch.is_autocast_enabled(x.device.type)
            except TypeError:  # older torch: no device argument
                autocast_on = torch.is_autocast_enabled()
            self.seen.append({"x_device": str(x.device), "h_dtype": pred.dtype, "autocast": autocast_on})
            loss = ((pred.float() - b["y"]) ** 2).mean()
            return {"loss": loss}

    return ToyMethod()


def _reset_accelerate() -> None:
    try:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    except Exception as exc:  # noqa: BLE001
        print(f"  (could not reset Accelerate state: {exc})")


class _Captured(list):
    restore: object


def _capture_optimizers(engine_mod) -> _Captured:
    """Record the optimisers the engine builds (``common.engine.build_optimizer``, wrapped in this process only)."""
    captured = _Captured()
    original = engine_mod.build_optimizer

    def wrapped(*a, **k):
        opt = original(*a, **k)
        captured.append(opt)
        return opt

    engine_mod.build_optimizer = wrapped
    captured.restore = lambda: setattr(engine_mod, "build_optimizer", original)
    return captured


def _toy_run(precision: str, clip_mode: str, compile_: bool, device: torch.device, tmp: Path) -> dict:
    import common.engine as E
    from common.optim import OptimConfig
    from safetensors import safe_open

    _reset_accelerate()
    cfg = E.TrainerConfig(max_steps=12, log_every=4, checkpoint_every=100, progress_bar=False, clip_grad=1.0,
                          clip_mode=clip_mode, mixed_precision=precision, compile=compile_)
    run_dir = tmp / f"toy_{precision}_{clip_mode}_{int(compile_)}"
    engine = E.Engine(cfg, run_dir, config=cfg)
    acc = engine.accelerator
    loaders, prepared = [], []
    orig_make, orig_prep = engine._make_loader, acc.prepare_data_loader

    def make_loader(*a, **k):
        dl, sampler = orig_make(*a, **k)
        loaders.append(dl)
        return dl, sampler

    def prepare_data_loader(dl, *a, **k):
        out = orig_prep(dl, *a, **k)
        prepared.append(out)
        return out

    engine._make_loader = make_loader
    acc.prepare_data_loader = prepare_data_loader
    opts = _capture_optimizers(E)
    torch.manual_seed(0)
    method = _toy_method()
    t0 = time.perf_counter()
    try:
        final = engine.fit(method, {"main": E.LoaderSpec(_ToyData(), batch_size=8)}, OptimConfig(name="adamw", lr=1e-2))
    finally:
        opts.restore()
    engine.finish()
    dt = time.perf_counter() - t0
    seen = method.seen
    res = {
        "resolved_precision": acc.mixed_precision,
        "h_dtypes": sorted({str(s["h_dtype"]) for s in seen}),
        "optimizer_fused": opts[0].defaults.get("fused") if opts else None,
        "pin_memory": [dl.pin_memory for dl in loaders],
        "non_blocking": [getattr(dl, "_non_blocking", "?") for dl in prepared],
        "grad_scalers": sorted(engine._scalers),  # the engine's own GradScaler per optimiser (fp16 only)
        "student_type": type(method.student).__name__,
        "student_compiled": getattr(method.student, "_compiled_call_impl", None) is not None,
        "x_devices": sorted({s["x_device"] for s in seen}),
        "loss": final["train"].get("loss"),
        "seconds": round(dt, 2),
        "autocast": sorted({s["autocast"] for s in seen}),
        "param_dtypes": sorted({str(p.dtype) for p in method.parameters()}),
        "device": str(acc.device),
    }
    last = run_dir / "checkpoints" / "last.safetensors"
    with safe_open(str(last), "pt") as f:
        keys = list(f.keys())
    res["orig_mod_keys"] = [k for k in keys if "_orig_mod" in k][:3]
    return res


def cmd_engine(args: argparse.Namespace) -> None:
    from common.engine import resolve_mixed_precision

    device = _device(args.require_cuda)
    cuda = device.type == "cuda"
    failures = []
    cases = [("bf16", "per_parameter", False), ("fp16", "global_norm", False), ("no", "global_norm", False)]
    if not args.skip_compile:
        cases.append(("bf16", "per_parameter", True))
    with tempfile.TemporaryDirectory(prefix="gpu_check_engine_") as tmp:
        for precision, clip_mode, compile_ in cases:
            label = f"precision={precision} clip={clip_mode} compile={compile_}"
            try:
                r = _toy_run(precision, clip_mode, compile_, device, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - report every case
                import traceback

                traceback.print_exc()
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
                print(f"{label}: FAILED ({type(exc).__name__}: {exc})")
                continue
            print(f"{label}: {json.dumps(r, default=str)}")
            resolved = resolve_mixed_precision(precision, cuda=cuda)
            expect = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}.get(resolved, "torch.float32")
            problems = []
            if r["h_dtypes"] != [expect]:
                problems.append(f"activation dtype {r['h_dtypes']} != [{expect}] (autocast not active?)")
            if r["param_dtypes"] != ["torch.float32"]:
                problems.append(f"parameters not fp32: {r['param_dtypes']}")
            if r["loss"] is None or not math.isfinite(r["loss"]):
                problems.append(f"loss {r['loss']}")
            if cuda:
                if not all(d.startswith("cuda") for d in r["x_devices"]):
                    problems.append(f"batches not on CUDA: {r['x_devices']}")
                if r["optimizer_fused"] is not True:
                    problems.append(f"engine optimiser not fused: {r['optimizer_fused']}")
                if r["pin_memory"] != [True]:
                    problems.append(f"training loader pin_memory {r['pin_memory']}")
                if r["non_blocking"] not in ([True], ["?"]):
                    problems.append(f"prepared loader non_blocking {r['non_blocking']}")
                if resolved == "fp16" and r["grad_scalers"] != ["main"]:
                    problems.append(f"fp16 without the engine's GradScaler of its optimiser: {r['grad_scalers']}")
                if compile_ and not r["student_compiled"]:
                    problems.append(f"compile=True but the student ({r['student_type']}) was not compiled in place")
            if compile_ and r["orig_mod_keys"]:
                problems.append(f"trainer.compile renamed checkpoint keys ('_orig_mod.'), e.g. {r['orig_mod_keys']}")
            if problems:
                failures.append(f"{label}: " + "; ".join(problems))
                print(f"  PROBLEMS: {problems}")
    if failures:
        raise SystemExit("CHECK engine FAILED:\n  " + "\n  ".join(failures))
    _ok("engine")


# ------------------------------------------------------------------------------------------------------------ dino-amp
def cmd_dino_amp(args: argparse.Namespace) -> None:
    import common.engine as E
    from common.config import load_config
    from eo_ssl.multicrop import collate_multicrop
    from eo_ssl.pretrain import PretrainConfig, build_dataset, build_method, check_schedule, resolve_data_sensor

    device = _device(args.require_cuda)
    _reset_accelerate()
    overrides = [f"data.root={args.data}", "probe.root=null", "trainer.epochs=null", f"trainer.max_steps={args.steps}",
                 "trainer.eval_every=null", "trainer.checkpoint_every=1000", "trainer.progress_bar=false",
                 "trainer.log_every=1", f"trainer.mixed_precision='{args.precision}'",
                 f"data.batch_size={args.batch_size}", f"trainer.num_workers={args.workers}"]
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "demo.yaml", overrides)
    spec = resolve_data_sensor(cfg.data)
    dataset = build_dataset(cfg, spec)
    with tempfile.TemporaryDirectory(prefix="gpu_check_dino_") as tmp:
        engine = E.Engine(cfg.trainer, Path(tmp) / "run", config=cfg)
        loaders = {"tiles": E.LoaderSpec(dataset, cfg.data.batch_size, collate_fn=collate_multicrop)}
        plan = engine.plan(loaders)  # as ssl/pretrain.py: schedules sized by the run's plan
        check_schedule(cfg, plan)
        torch.manual_seed(0)
        method = build_method(cfg, len(spec.bands), plan.epochs, plan.total_steps, rgb=spec.rgb_indices())
        seen: dict[str, set] = {}

        def hook(name):
            def fn(_m, _inp, out):
                o = out[0] if isinstance(out, (tuple, list)) else out
                seen.setdefault(name, set()).add(str(o.dtype))
            return fn

        method.student.backbone.register_forward_hook(hook("student.backbone"))
        method.student.head.register_forward_hook(hook("student.head"))
        method.teacher.backbone.register_forward_hook(hook("teacher.backbone"))
        method.teacher.head.register_forward_hook(hook("teacher.head"))
        opts = _capture_optimizers(E)
        t0 = time.perf_counter()
        try:
            final = engine.fit(method, loaders, cfg.optim)
        finally:
            opts.restore()
        engine.finish()
        dt = time.perf_counter() - t0
        center = method.loss_fn.center
    print(f"DINO {cfg.model.arch}, batch {cfg.data.batch_size}, {args.steps} steps, precision "
          f"{engine.accelerator.mixed_precision} on {engine.device}: {dt:.1f} s")
    print(f"activation dtypes: { {k: sorted(v) for k, v in seen.items()} }")
    print(f"final train values: {json.dumps(final['train'])}")
    print(f"center dtype {center.dtype} device {center.device}; optimiser fused={opts[0].defaults.get('fused')}")
    problems = []
    resolved = engine.accelerator.mixed_precision
    if resolved == "bf16" and seen.get("student.backbone") != {"torch.bfloat16"}:
        problems.append(f"student backbone output {seen.get('student.backbone')} (expected bf16 under autocast)")
    if center.dtype != torch.float32:
        problems.append(f"center dtype {center.dtype}")
    loss = final["train"].get("loss")
    if loss is None or not math.isfinite(loss):
        problems.append(f"loss {loss}")
    if device.type == "cuda" and opts[0].defaults.get("fused") is not True:
        problems.append("engine optimiser not fused on CUDA")
    if any(p.dtype != torch.float32 for p in method.parameters()):
        problems.append("parameters not fp32")
    if problems:
        raise SystemExit(f"CHECK dino-amp FAILED: {problems}")
    _ok("dino-amp")


# ------------------------------------------------------------------------------------------------------------ runs
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _steps_per_s(rows: list[dict]) -> str:
    v = [r["train/steps_per_s"] for r in rows if "train/steps_per_s" in r]
    if not v:
        return "n/a"
    later = v[1:] if len(v) > 1 else v
    return f"first log {v[0]:.2f}, median of later logs {statistics.median(later):.2f} (max {max(later):.2f})"


def _weight_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def cmd_check_pretrain(args: argparse.Namespace) -> None:
    import yaml

    run = Path(args.run)
    problems = []
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    print(f"run {run}: trainer.mixed_precision={cfg['trainer']['mixed_precision']!r} "
          f"compile={cfg['trainer'].get('compile')} num_workers={cfg['trainer']['num_workers']} "
          f"batch {cfg['data']['batch_size']}")
    if args.expect_precision and cfg["trainer"]["mixed_precision"] != args.expect_precision:
        problems.append(f"config mixed_precision {cfg['trainer']['mixed_precision']} != {args.expect_precision}")
    rows = _jsonl(run / "metrics.jsonl")
    train = [r for r in rows if "train/loss" in r]
    if not train:
        raise SystemExit(f"CHECK check-pretrain FAILED: no training log in {run}/metrics.jsonl")
    losses = [r["train/loss"] for r in train]
    if not all(math.isfinite(v) for v in losses):
        problems.append("non-finite loss in metrics.jsonl")
    t0, t1 = train[0], train[-1]
    print(f"steps logged {t0['step']}..{t1['step']}: loss {t0['train/loss']:.3f} -> {t1['train/loss']:.3f}; "
          f"teacher entropy {t0.get('train/teacher_entropy', float('nan')):.3f} -> "
          f"{t1.get('train/teacher_entropy', float('nan')):.3f} (ln K {t0.get('train/log_k', float('nan')):.3f})")
    knn = [r["val/knn_top1"] for r in rows if "val/knn_top1" in r]
    if knn:
        print(f"k-NN probe: {', '.join(f'{v:.1f}' for v in knn)} %")
    print(f"steps/s: {_steps_per_s(rows)}")
    last = run / "checkpoints" / "last.safetensors"
    if last.is_file():
        orig = [k for k in _weight_keys(last) if "_orig_mod" in k]
        if orig:
            print(f"NOTE: {last} holds {len(orig)} '_orig_mod.' keys (compiled modules), e.g. {orig[:2]}")
    else:
        problems.append(f"{last} missing")
    metrics = run / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        print(f"metrics.json: steps {m.get('steps')}, train_time_s {m.get('train_time_s', float('nan')):.1f}, "
              f"export {m.get('export')}")
    else:
        problems.append("metrics.json missing (the run did not finish)")
    if args.export:
        weights = run / "backbone.safetensors"
        meta_path = run / "backbone.json"
        if not (weights.is_file() and meta_path.is_file()):
            problems.append("export backbone.safetensors / backbone.json missing")
        else:
            import timm

            meta = json.loads(meta_path.read_text())
            model = timm.create_model(meta["architecture"], in_chans=meta["in_chans"], num_classes=0,
                                      checkpoint_path=str(weights))
            if not meta.get("stem_pool", True):  # pretrained without the ResNet stem max-pool (the sidecar's load_with)
                model.maxpool = torch.nn.Identity()
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model = model.to(device).eval()
            with torch.no_grad():
                y = model(torch.randn(2, meta["in_chans"], 64, 64, device=device))
            print(f"export {weights.name}: {meta['architecture']} in_chans {meta['in_chans']} loads strict with timm; "
                  f"features {tuple(y.shape)} finite {bool(torch.isfinite(y).all())}")
            if not torch.isfinite(y).all():
                problems.append("export features not finite")
    if problems:
        raise SystemExit(f"CHECK check-pretrain FAILED: {problems}")
    _ok("check-pretrain")


def cmd_check_finetune(args: argparse.Namespace) -> None:
    import yaml

    run = Path(args.run)
    problems = []
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    print(f"run {run}: trainer.mixed_precision={cfg['trainer']['mixed_precision']!r} weights "
          f"{cfg['model'].get('weights')}")
    if args.expect_precision and cfg["trainer"]["mixed_precision"] != args.expect_precision:
        problems.append(f"config mixed_precision {cfg['trainer']['mixed_precision']} != {args.expect_precision}")
    rows = _jsonl(run / "metrics.jsonl")
    train = [r for r in rows if "train/loss" in r]
    losses = [r["train/loss"] for r in train]
    if not losses or not all(math.isfinite(v) for v in losses):
        problems.append("no or non-finite training loss")
    else:
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over steps {train[0]['step']}..{train[-1]['step']}")
    print(f"steps/s: {_steps_per_s(rows)}")
    m = json.loads((run / "metrics.json").read_text())
    if "last" in m:
        print(f"validation mIoU last {m['last'].get('mIoU', float('nan')):.2f} (step {m['last'].get('step')}), best "
              f"{m.get('best', {}).get('mIoU', float('nan')):.2f} (step {m.get('best', {}).get('step')}); "
              f"train_time_s {m.get('train_time_s', float('nan')):.1f}")
        if not math.isfinite(m["last"].get("mIoU", float("nan"))):
            problems.append("mIoU not finite")
    else:
        problems.append("no evaluation in metrics.json")
    for f in ("model.json", "checkpoints/last.safetensors"):
        if not (run / f).is_file():
            problems.append(f"{f} missing")
    if problems:
        raise SystemExit(f"CHECK check-finetune FAILED: {problems}")
    _ok("check-finetune")


def cmd_check_predict(args: argparse.Namespace) -> None:
    import rasterio

    inputs = sorted(p for p in Path(args.inputs).iterdir() if p.suffix == ".tif")
    problems = []
    agree = []
    for src in inputs:
        pred = Path(args.pred) / f"{src.stem}_pred.tif"
        if not pred.is_file():
            problems.append(f"{pred} missing")
            continue
        with rasterio.open(src) as a, rasterio.open(pred) as b:
            arr = b.read(1)
            if a.crs != b.crs or a.transform != b.transform or (a.height, a.width) != (b.height, b.width):
                problems.append(f"{pred.name}: grid differs from the input")
            vals = set(np.unique(arr).tolist())
            if not vals <= set(range(args.num_classes)) | {255}:
                problems.append(f"{pred.name}: values {sorted(vals)}")
        if args.cpu_pred:
            with rasterio.open(Path(args.cpu_pred) / pred.name) as c:
                agree.append(float((c.read(1) == arr).mean()))
    print(f"{len(inputs)} predictions checked (grid, CRS, class values)")
    if agree:
        print(f"CUDA vs CPU prediction agreement per tile: min {min(agree):.4f}, mean {statistics.fmean(agree):.4f}")
        if min(agree) < 0.98:
            problems.append(f"CUDA and CPU predictions differ (min agreement {min(agree):.4f})")
    if problems:
        raise SystemExit(f"CHECK check-predict FAILED: {problems}")
    _ok("check-predict")


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("env", "optim", "engine", "dino-amp"):
        p = sub.add_parser(name)
        p.add_argument("--require-cuda", action="store_true")
        if name == "engine":
            p.add_argument("--skip-compile", action="store_true")
        if name == "dino-amp":
            p.add_argument("--data", required=True)
            p.add_argument("--steps", type=int, default=3)
            p.add_argument("--batch-size", type=int, default=32)
            p.add_argument("--workers", type=int, default=0)
            p.add_argument("--precision", default="bf16")
    p = sub.add_parser("check-pretrain")
    p.add_argument("run")
    p.add_argument("--export", action="store_true")
    p.add_argument("--expect-precision", default=None)
    p = sub.add_parser("check-finetune")
    p.add_argument("run")
    p.add_argument("--expect-precision", default=None)
    p = sub.add_parser("check-predict")
    p.add_argument("--inputs", required=True)
    p.add_argument("--pred", required=True)
    p.add_argument("--cpu-pred", default=None)
    p.add_argument("--num-classes", type=int, default=6)
    args = ap.parse_args(argv)
    {"env": cmd_env, "optim": cmd_optim, "engine": cmd_engine, "dino-amp": cmd_dino_amp,
     "check-pretrain": cmd_check_pretrain, "check-finetune": cmd_check_finetune,
     "check-predict": cmd_check_predict}[args.cmd](args)


if __name__ == "__main__":
    main()
