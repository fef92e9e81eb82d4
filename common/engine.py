"""The one training engine every stage uses (DINO pretraining, supervised, semi-supervised, domain adaptation).

A *method* (:class:`common.method.Method`, its contract) says what one step computes; the engine owns the rest:

* Accelerate set-up (CPU, one or many GPUs/nodes, bf16/fp16 mixed precision with a clean CPU fallback),
  seeding, deterministic DataLoaders (the method's named streams: labelled + unlabelled, source + target), and a
  stream's batched augmentation on the device (``LoaderSpec.device_transform``, :mod:`common.device_aug`: the
  loader only decodes, the engine augments the batch on the GPU before ``training_step``),
* DDP around the method's ``trainable`` sub-modules only (teachers, banks, prototypes stay outside; their state is
  still checkpointed), SyncBatchNorm on multi-GPU runs,
* one optimiser per name of ``method.optimizers()``, each with its own settings, lr / weight-decay schedule and (fp16)
  GradScaler; automatic mode (one loss) or manual mode (the method calls ``ctx.backward`` / ``ctx.step``),
* gradient accumulation, gradient clipping (global norm or per parameter), the finite-loss check, logging to
  TensorBoard and ``metrics.jsonl``, a progress bar on the main process,
* periodic evaluation with best/last bookkeeping (oracle selection labelled as such), atomic checkpoints and exact
  resume.

Resume: ``checkpoints/step_XXXXXXXX`` holds ``model.safetensors`` (the method's whole ``state_dict``: students,
teachers, centers, banks), Accelerate's state (optimisers and GradScalers as registered objects, RNG states of every
process) and ``engine_state.json`` (step, batches consumed per loader, best metric). We name checkpoint directories
ourselves, so Accelerate's automatic checkpoint counter (which ``load_state`` does not restore) is never used. Data
order is a pure function of (seed, loader, epoch) and augmentations draw from ``np.random.default_rng((seed, epoch,
index))`` (see :mod:`common.sampling`) or, on the device, from a generator seeded by (seed, step, micro-batch, rank,
stream), so a resumed run sees exactly the batches an uninterrupted run would have seen and ends with bit-identical
weights on CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.checkpoint import (
    CHECKPOINT_DIR,
    apply_default_modes,
    atomic_save_safetensors,
    atomic_write_json,
    latest_checkpoint,
    load_safetensors,
    prune_checkpoints,
    step_dir_name,
)
from common.config import config_to_dict, save_config
from common.errors import RunDirError, UserInputError
from common.method import Method, StepContext, TrainContext, check_method
from common.optim import OptimConfig, build_optimizer, clip_gradients_per_parameter
from common.sampling import EpochSampler, seed_worker
from common.schedules import build_lr_schedule, cosine_schedule

__all__ = [
    "TrainerConfig",
    "LoaderSpec",
    "RunPlan",
    "TrainContext",
    "NonFiniteLossError",
    "Engine",
    "resolve_mixed_precision",
    "clip_gradients",
    "compile_in_place",
]

logger = logging.getLogger(__name__)

DEVICE_TRANSFORM_STREAM = 4096
"""``StepContext.generator`` stream of the first loader's device transform (the n-th loader's: + n); methods draw
from small stream numbers (0, 1, ...), so the augmentation never repeats a method's random numbers."""

# Files of a run directory that a new run would overwrite (refused without --overwrite / --resume).
RUN_OUTPUTS = ("metrics.jsonl", "metrics.json", CHECKPOINT_DIR, "tb")


@dataclass(frozen=True)
class TrainerConfig:
    """Engine settings shared by every stage (section ``trainer`` of every config)."""

    seed: int = 0  # seeds model init, data order and augmentations
    epochs: int | None = None  # length in epochs of the first loader (exclusive with max_steps)
    max_steps: int | None = None  # length in optimisation steps (exclusive with epochs)
    grad_accum_steps: int = 1  # micro-batches per optimisation step
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "no"  # auto: bf16/fp16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the method's compile_modules on CUDA (skipped with a note on CPU)
    clip_grad: float | None = None  # gradient clipping threshold (None: off)
    clip_mode: Literal["global_norm", "per_parameter"] = "global_norm"  # DINO clips each parameter separately
    sync_bn: bool = True  # SyncBatchNorm in the trained modules on multi-GPU runs (BN statistics over the global batch)
    num_workers: int = 0  # DataLoader worker processes per training process
    log_every: int = 10  # steps between scalar logs (metrics.jsonl, TensorBoard)
    image_log_every: int | None = None  # steps between image logs (None: first and last step only)
    eval_every: int | None = None  # steps between evaluations (None: only at the end)
    checkpoint_every: int = 500  # steps between checkpoints (a final one is always written)
    keep_checkpoints: int = 2  # step checkpoints kept on disk
    best_metric: str | None = None  # evaluation key that selects the best model (e.g. "mIoU", "source_val/mIoU")
    best_mode: Literal["max", "min"] = "max"
    progress_bar: bool = True

    def validate(self) -> None:
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("set exactly one of trainer.epochs and trainer.max_steps")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"trainer.epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"trainer.max_steps must be >= 1, got {self.max_steps}")
        for key in ("grad_accum_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"trainer.eval_every must be >= 1 or null, got {self.eval_every}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"trainer.clip_grad must be > 0 or null, got {self.clip_grad}")
        if self.num_workers < 0:
            raise ValueError("trainer.num_workers must be >= 0")


@dataclass
class LoaderSpec:
    """A training data stream. The method's first stream defines the epoch; the others cycle."""

    dataset: Dataset
    batch_size: int
    collate_fn: Callable | None = None
    shuffle: bool = True
    drop_last: bool = True
    batch_size_key: str = "data.batch_size"  # the config key that sets batch_size (named in errors)
    # Batched augmentation of this stream's batches (common.device_aug.DeviceTransform), applied by the engine after
    # the loader moved a batch to the training device and before training_step: the loader only decodes.
    device_transform: Any = None


@dataclass(frozen=True)
class RunPlan:
    """The run's length, known before any model is built (schedules are checked against it)."""

    steps_per_epoch: int
    total_steps: int
    epochs: int
    num_processes: int
    global_batch_size: int
    batches_per_epoch: dict[str, int]


class NonFiniteLossError(RuntimeError):
    """Raised when a loss becomes NaN/inf; the last checkpoint on disk is the last good one."""


def resolve_mixed_precision(requested: str, cuda: bool | None = None) -> str:
    """Map the configured precision onto what the device supports.

    ``auto`` -> bf16 on GPUs that support it, fp16 on older GPUs, ``no`` on CPU. ``fp16`` on CPU falls back to
    ``no`` (CPU autocast has no fp16 kernels worth using); ``bf16`` on CPU is kept (CPU autocast supports it).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if requested == "fp16" and not cuda:
        logger.warning("mixed_precision=fp16 needs a CUDA device; running in fp32 on CPU")
        return "no"
    return requested


def clip_gradients(scaler: Any, optimizer: torch.optim.Optimizer, params: list, max_norm: float, mode: str) -> None:
    """Clip one optimiser's gradients, unscaled exactly once by its own GradScaler (fp16; ``None`` otherwise: a
    GradScaler refuses a second ``unscale_`` before the step): one global norm over ``params`` or each parameter's
    norm separately (DINO; the norms stay on the device: no host sync)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if mode == "global_norm":
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        clip_gradients_per_parameter(params, max_norm)


def compile_in_place(method: nn.Module, targets: Sequence[str]) -> None:
    """``torch.compile`` the sub-modules named in ``targets`` *in place* (``nn.Module.compile``): unlike wrapping
    them with ``torch.compile(module)``, which prefixes every ``state_dict`` key with ``_orig_mod.``, the keys stay
    the same, so checkpoints of compiled and eager runs are interchangeable (resume, export)."""
    for attr in targets:
        module = getattr(method, attr, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"compile_modules names {attr!r}, which is not a sub-module of {type(method).__name__}")
        module.compile()


def check_run_dir(run_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a directory that holds a run unless resuming or overwriting; ``--resume`` needs one.

    Raises:
        RunDirError: naming the directory, what it holds and the flag that fixes it.
    """
    run_dir = Path(run_dir)
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise RunDirError(f"--resume: no checkpoint under {run_dir / CHECKPOINT_DIR}; start the run without "
                              f"--resume (or point --output-dir at the run to continue)")
        return
    held = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if held and not overwrite:
        raise RunDirError(f"--output-dir {run_dir} already holds a run ({', '.join(held)}); continue it with "
                          f"--resume, start over with --overwrite, or choose another --output-dir")


def clear_run_outputs(run_dir: str | os.PathLike) -> None:
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` with tensors that share storage cloned (safetensors refuses shared storage)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in module.state_dict().items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else None
        if ident is not None and ident in seen:
            value = value.clone()
        elif ident is not None:
            seen.add(ident)
        out[key] = value
    return out


class Engine:
    """Runs a :class:`~common.method.Method` with Accelerate. Create it first (it seeds), then plan, build the
    model, then fit.

    Args:
        cfg: the ``trainer`` section.
        run_dir: the run directory (created); holds config.yaml, metrics.jsonl, metrics.json, tb/, checkpoints/.
        config: the full resolved config, saved as ``config.yaml``.
        resume: continue from the latest checkpoint in ``run_dir`` (:class:`RunDirError` if there is none).
        overwrite: start over in a ``run_dir`` that holds a run (its metrics, checkpoints and logs are removed).
        cpu: force the CPU even where a GPU exists.
        grad_scaler: one GradScaler per optimiser (default: with fp16 mixed precision).
    """

    def __init__(self, cfg: TrainerConfig, run_dir: str | os.PathLike, config: Any = None, resume: bool = False,
                 cpu: bool = False, overwrite: bool = False, grad_scaler: bool | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        check_run_dir(self.run_dir, resume, overwrite)  # before any process group or file: one clear error
        cuda = torch.cuda.is_available() and not cpu
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(cfg.mixed_precision, cuda=cuda),
            cpu=cpu,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir)),
            # non_blocking: batches (pinned on CUDA, see _make_loader) are copied to the GPU without a host sync.
            dataloader_config=DataLoaderConfiguration(even_batches=True, non_blocking=cuda),
        )
        self._config, self._overwrite = config, overwrite
        set_seed(cfg.seed, device_specific=False)
        self._outputs_started = False
        self._jsonl = None
        self.current_step = 0
        self.final_metrics: dict[str, Any] = {}
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._scalers: dict[str, Any] = {}
        self._schedules: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._wrappers: dict[str, nn.Module] = {}
        self._nonfinite = torch.zeros((), dtype=torch.bool)
        self._method: Method | None = None
        # One GradScaler per optimiser with fp16 (None: automatic). True forces them on, e.g. to test the fp16 path
        # with real GradScalers on a CPU, where fp16 autocast itself falls back to fp32.
        self._use_grad_scaler = self.accelerator.mixed_precision == "fp16" if grad_scaler is None else grad_scaler

    def start_outputs(self) -> None:
        """Create the run directory's outputs (config.yaml, TensorBoard) once everything has been checked: an input
        error found while planning or building the model leaves nothing behind (a rerun is not refused)."""
        if self._outputs_started:
            return
        if self.is_main:
            if self._overwrite and not self.resume:
                clear_run_outputs(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self._config is not None:
                save_config(self._config, self.run_dir / "config.yaml")
        self.accelerator.wait_for_everyone()
        config = self._config
        self.accelerator.init_trackers("tb", config=_flat_hparams(config) if config is not None else None)
        self._outputs_started = True

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def print(self, *args: Any) -> None:
        """Print on the main process only. ``Accelerator.print`` prints once per *node* (local main process), so a
        multi-node run would repeat every line per node in a merged log (Slurm's default ``srun`` output); the
        progress bar and ``error:`` lines (:func:`common.errors.cli_entry`) are already global-main only."""
        if self.is_main:
            print(*args, flush=True)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """All-reduce over processes (``sum`` or ``mean``); returns a new tensor, identity with one process."""
        if op not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {op!r}")
        if self.accelerator.num_processes == 1:
            return tensor.clone()
        return self.accelerator.reduce(tensor.clone(), reduction=op)

    def _make_loader(self, name: str, spec: LoaderSpec, index: int,
                     weights_fn: Callable[[int], np.ndarray | None] | None) -> tuple[DataLoader, EpochSampler]:
        # Each loader gets its own seed so that zipped loaders do not share an order.
        # Datasets that take (epoch, index) get it from the sampler, so their workers can persist across epochs
        # (no re-spawn, caches kept); others learn the epoch from set_epoch and need fresh workers every epoch.
        persistent = self.cfg.num_workers > 0 and getattr(spec.dataset, "epoch_in_index", False)
        sampler = EpochSampler(len(spec.dataset), seed=self.cfg.seed + 1000 * index, shuffle=spec.shuffle,
                               with_epoch=persistent, weights_fn=weights_fn)
        if hasattr(spec.dataset, "set_epoch"):
            spec.dataset.set_epoch(0)
        g = torch.Generator()
        g.manual_seed(self.cfg.seed + index)
        loader = DataLoader(
            spec.dataset,
            batch_size=spec.batch_size,
            sampler=sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=spec.collate_fn,
            drop_last=spec.drop_last,
            worker_init_fn=seed_worker,
            generator=g,  # keeps the global torch RNG untouched by iterator creation (exact resume)
            pin_memory=self.device.type == "cuda",
            persistent_workers=persistent,
        )
        return loader, sampler

    def eval_loader(self, dataset: Dataset, batch_size: int, collate_fn: Callable | None = None) -> DataLoader:
        """A loader over this process's shard of ``dataset`` (indices ``rank::world``, no padding, no repeats).

        Metrics accumulated on each shard and summed across processes count every sample exactly once.
        """
        indices = list(range(self.accelerator.process_index, len(dataset), self.accelerator.num_processes))
        subset = torch.utils.data.Subset(dataset, indices)
        return DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                          num_workers=self.cfg.num_workers, worker_init_fn=seed_worker)

    def _log(self, values: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        self.accelerator.log(values, step=step)
        if self._jsonl is None:
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        """Log HWC uint8 images to TensorBoard (main process only)."""
        if not self.is_main or not images:
            return
        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        for tag, img in images.items():
            writer.add_image(tag, img, step, dataformats="HWC")

    # ------------------------------------------------------------------ planning
    def plan(self, loaders: dict[str, LoaderSpec]) -> RunPlan:
        """The run's length from the streams (first = epoch), before any model exists.

        Raises:
            UserInputError: a stream yields no batch per process (naming its batch-size key and the fix).
        """
        if not loaders:
            raise ValueError("a run needs at least one training stream")
        n_proc = self.accelerator.num_processes
        batches = {}
        for name, spec in loaders.items():
            n = len(spec.dataset) // spec.batch_size if spec.drop_last else math.ceil(len(spec.dataset) / spec.batch_size)
            per_process = n // n_proc if spec.drop_last or n_proc > 1 else n
            if per_process == 0:
                raise UserInputError(
                    f"training stream {name!r} yields no batch per process: {len(spec.dataset)} samples shared by "
                    f"{n_proc} process(es) at {spec.batch_size_key}={spec.batch_size} (incomplete batches are "
                    f"dropped); lower {spec.batch_size_key}, use fewer processes or add data")
            batches[name] = per_process
        primary = next(iter(loaders))
        k = self.cfg.grad_accum_steps
        steps_per_epoch = max(batches[primary] // k, 1)
        total = self.cfg.max_steps if self.cfg.max_steps is not None else self.cfg.epochs * steps_per_epoch
        return RunPlan(steps_per_epoch, total, math.ceil(total / steps_per_epoch), n_proc,
                       loaders[primary].batch_size * n_proc * k, batches)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, method: Method, step: int, state: dict) -> None:
        acc = self.accelerator
        ckpt_root = self.run_dir / CHECKPOINT_DIR
        final = ckpt_root / step_dir_name(step)
        tmp = ckpt_root / f".tmp_{step_dir_name(step)}"
        if self.is_main:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)  # optimisers, GradScalers, RNG states of every process
        acc.wait_for_everyone()
        if self.is_main:
            atomic_save_safetensors(_state_tensors(method), tmp / "model.safetensors")
            atomic_write_json(tmp / "engine_state.json", state)
            apply_default_modes(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        acc.wait_for_everyone()

    def _load(self, method: Method, ckpt: Path) -> dict:
        self.accelerator.load_state(str(ckpt))
        method.load_state_dict(load_safetensors(ckpt / "model.safetensors"), strict=True)
        return json.loads((ckpt / "engine_state.json").read_text())

    def _save_weights(self, method: nn.Module, name: str, extra: dict | None = None) -> None:
        if self.is_main:
            atomic_save_safetensors(_state_tensors(method), self.run_dir / CHECKPOINT_DIR / f"{name}.safetensors",
                                    metadata=extra)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ set-up of a method
    def _ddp(self, module: nn.Module, find_unused: bool = False) -> nn.Module | None:
        acc = self.accelerator
        if acc.num_processes == 1 or not any(p.requires_grad for p in module.parameters()):
            return None
        kwargs = acc.ddp_handler.to_kwargs() if getattr(acc, "ddp_handler", None) is not None else {}
        if find_unused:
            kwargs["find_unused_parameters"] = True
        ids = [acc.local_process_index] if acc.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, **kwargs)

    def _setup_method(self, method: Method, optim: OptimConfig, plan: RunPlan) -> None:
        cfg, acc = self.cfg, self.accelerator
        if not isinstance(method, Method):
            raise TypeError(f"{type(method).__name__} is not a common.method.Method")
        if cfg.sync_bn and acc.num_processes > 1 and acc.device.type == "cuda":
            for name in getattr(method, "sync_bn_modules", method.trainable):
                setattr(method, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(method, name)))
        if cfg.compile:
            if acc.device.type != "cuda":
                self.print("trainer.compile: skipped on CPU (torch.compile is used on CUDA only)")
            else:
                compile_in_place(method, method.compile_modules)
        # On the training device before the optimisers are built, so that build_optimizer picks the implementation
        # (fused / foreach) for the device the parameters will live on.
        method.to(acc.device)
        method.train()
        wrappers = {}
        for name, module in method.trainable_modules().items():
            ddp = self._ddp(module, method.find_unused_parameters)
            if ddp is not None:
                wrappers[name] = ddp
        method.attach_wrappers(wrappers)
        self._wrappers = wrappers

        specs = method.optimizers()
        if not specs:
            raise ValueError(f"{type(method).__name__}.optimizers() returned no optimiser")
        if not method.manual_optimization and len(specs) != 1:
            raise ValueError(f"{type(method).__name__} has {len(specs)} optimisers: set manual_optimization = True")
        fp16 = self._use_grad_scaler
        for name, spec in specs.items():
            o = spec.optim or optim
            opt = build_optimizer(o, spec.param_groups)
            self._optimizers[name] = opt
            base_lr = o.lr * (plan.global_batch_size / 256.0 if o.scale_lr_with_batch else 1.0)
            warmup = o.warmup_steps or int(round(o.warmup_epochs * plan.steps_per_epoch))
            lr = build_lr_schedule(o.schedule, base_lr, plan.total_steps, warmup, final_value=o.min_lr,
                                   power=o.poly_power)
            wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
            self._schedules[name] = (lr, cosine_schedule(o.weight_decay, wd_end, plan.total_steps))
            acc.register_for_checkpointing(opt)
            if fp16:
                scaler = torch.amp.GradScaler(acc.device.type)
                self._scalers[name] = scaler
                acc.register_for_checkpointing(scaler)

    def check(self, method: Method, loaders: dict[str, LoaderSpec]) -> None:
        """What can be wrong with a method on these streams, refused before any output is written (``fit`` calls it
        too): the streams it consumes exist and yield batches, and BatchNorm gets at least 2 samples per process.

        Raises:
            UserInputError: naming the config key and the fix.
        """
        check_method(method)
        missing = [s for s in method.streams if s not in loaders]
        if missing:
            raise ValueError(f"{type(method).__name__} consumes streams {tuple(method.streams)}; no loader for "
                             f"{missing}")
        self.plan({name: loaders[name] for name in method.streams})
        method.train()
        self._check_batch_norm(method, loaders)

    def _check_batch_norm(self, method: Method, loaders: dict[str, LoaderSpec]) -> None:
        """BatchNorm in training mode needs more than one value per channel: a per-process batch of 1 reaching
        ASPP's image-pooling branch (or a BN head on embeddings) fails inside torch mid-step; refuse it here."""
        bn = [f"{name}.{sub}" for name, module in method.trainable_modules().items()
              for sub, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        if not bn:
            return
        for stream, spec in loaders.items():
            if spec.batch_size < 2:
                raise UserInputError(
                    f"{spec.batch_size_key}={spec.batch_size} per process for stream {stream!r}: BatchNorm in "
                    f"training ({bn[0]}, ...) needs at least 2 samples per process (a pooled branch normalises one "
                    f"value per channel); set {spec.batch_size_key} to 2 or more (it is per process)")

    # ------------------------------------------------------------------ backward / step (manual and automatic)
    def _no_sync(self, active: bool):
        stack = contextlib.ExitStack()
        if active:
            for w in self._wrappers.values():
                stack.enter_context(w.no_sync())
        return stack

    def _backward(self, loss: torch.Tensor, optimizer: str, ctx: StepContext) -> None:
        if optimizer not in self._optimizers:
            raise KeyError(f"backward for unknown optimiser {optimizer!r}; the method has {list(self._optimizers)}")
        self._nonfinite = self._nonfinite | ~torch.isfinite(loss.detach()).to(self._nonfinite.device)
        loss = loss / ctx.num_micro
        scaler = self._scalers.get(optimizer)
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def _optimizer_step(self, name: str, step: int, epoch: int) -> None:
        opt = self._optimizers[name]
        method = self._method
        if hasattr(method, "before_optimizer_step"):
            method.before_optimizer_step(name, step, epoch)
        scaler = self._scalers.get(name)
        if self.cfg.clip_grad is not None:
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            clip_gradients(scaler, opt, params, self.cfg.clip_grad, self.cfg.clip_mode)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    # ------------------------------------------------------------------ training
    def fit(
        self,
        method: Method,
        loaders: dict[str, LoaderSpec],
        optim: OptimConfig,
        evaluate: Callable[[Method, "Engine"], dict[str, float]] | None = None,
        datasets: dict[str, Any] | None = None,
        oracle_prefixes: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Train ``method`` and return the final metrics (also written to ``metrics.json`` by :meth:`finish`).

        Args:
            method: the training method (see :mod:`common.method`).
            loaders: named training streams, at least the method's ``streams`` (the first defines the epoch).
            optim: the run's optimiser settings (an :class:`~common.method.OptimizerSpec` may bring its own).
            evaluate: ``evaluate(method, engine) -> {metric: value}`` run every ``eval_every`` steps and at the end
                on every process (use :meth:`eval_loader` and reduce across processes); the method's
                ``extra_metrics(engine)`` are added.
            datasets: named datasets the method's hooks may read (``ctx.datasets``), besides the streams'.
            oracle_prefixes: metric prefixes that use labels a real user lacks (target validation): selecting on
                them is reported as ``"oracle"`` in ``metrics.json``.
        """
        cfg, acc = self.cfg, self.accelerator
        self.check(method, loaders)
        streams = tuple(method.streams)
        loaders = {name: loaders[name] for name in streams}
        plan = self.plan(loaders)
        self._method = method
        self._setup_method(method, optim, plan)
        self.start_outputs()

        built = {}
        for i, (name, spec) in enumerate(loaders.items()):
            weights_fn = None
            if hasattr(method, "sampling_weights"):
                weights_fn = (lambda e, _n=name: method.sampling_weights(_n, e))
            built[name] = self._make_loader(name, spec, i, weights_fn)
        prepared = {name: acc.prepare_data_loader(dl) for name, (dl, _) in built.items()}
        samplers = {name: sampler for name, (_, sampler) in built.items()}
        n_batches = {name: len(dl) for name, dl in prepared.items()}
        k = cfg.grad_accum_steps
        steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps

        all_datasets = {**{name: spec.dataset for name, spec in loaders.items()}, **(datasets or {})}
        ctx = TrainContext(acc, total_steps, steps_per_epoch, plan.epochs, acc.num_processes, plan.global_batch_size,
                           acc.device, self.run_dir, all_datasets, self)
        if hasattr(method, "on_train_start"):
            method.on_train_start(ctx)

        # ---- resume
        step = 0
        consumed = {name: 0 for name in prepared}
        best: dict[str, Any] = {}
        if self.resume:
            ckpt = latest_checkpoint(self.run_dir)
            state = self._load(method, ckpt)
            step, consumed, best = state["step"], state["consumed"], state.get("best", {})
            self.print(f"resumed from {ckpt} at step {step}/{total_steps}")
            if step >= total_steps:
                self.print("run already complete; re-running the final evaluation")

        def stream(name: str) -> Iterator[Any]:
            while True:
                epoch, skip = divmod(consumed[name], n_batches[name])
                dl = prepared[name] if skip == 0 else acc.skip_first_batches(prepared[name], skip)
                # Accelerate's loaders re-apply their own epoch counter to the sampler and dataset at every
                # iteration start; set it explicitly so a resumed (or skipping) loader uses the right epoch.
                dl.set_epoch(epoch)
                samplers[name].set_epoch(epoch)
                ds = loaders[name].dataset
                if hasattr(ds, "set_epoch"):
                    ds.set_epoch(epoch)
                for batch in dl:
                    consumed[name] += 1
                    yield batch

        iters = {name: stream(name) for name in prepared}
        device_transforms = {name: (i, spec.device_transform) for i, (name, spec) in enumerate(loaders.items())
                             if spec.device_transform is not None}
        for name, (_, transform) in device_transforms.items():
            if transform.device == "cuda" and acc.device.type != "cuda":
                self.print(f"augment.device=cuda: no CUDA device in this run, the batched augmentation of stream "
                           f"{name!r} runs on the {acc.device.type}")
        sums: dict[str, torch.Tensor] = {}
        count = 0
        self._nonfinite = torch.zeros((), device=acc.device, dtype=torch.bool)
        last_logged: dict[str, float] = {}
        t0, t_log = time.perf_counter(), time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, disable=not (self.is_main and cfg.progress_bar), dynamic_ncols=True)
        batch = None
        while step < total_steps:
            epoch = step // steps_per_epoch
            # at each epoch's first step (a run resumed mid-epoch does not repeat it: its effects are checkpointed)
            if hasattr(method, "on_epoch_start") and step % steps_per_epoch == 0:
                method.on_epoch_start(epoch, ctx)
            # 1. schedules: lr and weight decay of every optimiser for this step, indexed by the global step
            for name, opt in self._optimizers.items():
                lr_sched, wd_sched = self._schedules[name]
                for g in opt.param_groups:
                    g["lr"] = float(lr_sched[step]) * g.get("lr_scale", 1.0)
                    g["weight_decay"] = float(wd_sched[step]) if g.get("apply_wd", True) else 0.0
            # 2. k micro-batches; gradients are synchronised on the last one only
            for micro in range(k):
                batch = {name: next(it) for name, it in iters.items()}
                sctx = StepContext(self, step, epoch, micro, k)
                if device_transforms:
                    batch = self._device_transform(batch, device_transforms, sctx)
                with self._no_sync(micro < k - 1):
                    with acc.autocast():
                        out = method.training_step(batch, sctx)
                    if not method.manual_optimization:
                        self._backward(out["loss"], "main", sctx)
                for key, v in out.items():
                    v = v.detach().float().to(acc.device) if torch.is_tensor(v) else torch.tensor(float(v),
                                                                                                 device=acc.device)
                    sums[key] = sums.get(key, 0.0) + v / k
            count += 1
            # 3. automatic mode: clip and step the one optimiser (manual methods stepped inside training_step)
            if not method.manual_optimization:
                self._optimizer_step("main", step, epoch)
            for opt in self._optimizers.values():
                opt.zero_grad(set_to_none=True)
            # 4. the method's post-step updates (EMA teachers, center, prototypes)
            if hasattr(method, "after_optimizer_step"):
                method.after_optimizer_step(step, epoch)
            step += 1
            bar.update(1)

            done = step >= total_steps
            if step % cfg.log_every == 0 or done:
                self._check_finite(step)
                keys = sorted(sums)
                stacked = torch.stack([sums[key] for key in keys]) / count
                reduced = acc.reduce(stacked, reduction="mean")
                values = {f"train/{key}": float(v) for key, v in zip(keys, reduced.tolist())}
                for name in self._optimizers:
                    suffix = "" if name == "main" else f"_{name}"
                    values[f"train/lr{suffix}"] = float(self._schedules[name][0][step - 1])
                    values[f"train/wd{suffix}"] = float(self._schedules[name][1][step - 1])
                values["train/epoch"] = step / steps_per_epoch
                if hasattr(method, "log_values"):
                    values.update({f"train/{key}": float(v) for key, v in method.log_values(step - 1, epoch).items()})
                dt = time.perf_counter() - t_log
                values["train/steps_per_s"] = count / dt if dt > 0 else 0.0
                self._log(values, step)
                last_logged = values
                bar.set_postfix(loss=f"{values.get('train/loss', float('nan')):.4f}")
                sums, count, t_log = {}, 0, time.perf_counter()
            if hasattr(method, "log_images") and self.is_main and (
                step == 1 or done or (cfg.image_log_every and step % cfg.image_log_every == 0)
            ):
                self.log_images(method.log_images(batch, step), step)
            if evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or done):
                best = self._evaluate(method, evaluate, step, best)
            if step % cfg.checkpoint_every == 0 or done:
                self._check_finite(step)
                self._save(method, step, {"step": step, "consumed": consumed, "best": best,
                                          "total_steps": total_steps})
        bar.close()
        if step > 0 and self.resume and evaluate is not None and not last_logged:
            best = self._evaluate(method, evaluate, step, best)

        self._save_weights(method, "last", {"step": step})
        final = {
            "steps": step,
            "epochs": step / steps_per_epoch,
            "train": {key.removeprefix("train/"): v for key, v in last_logged.items()},
            "train_time_s": time.perf_counter() - t0,
            "num_processes": acc.num_processes,
            "global_batch_size": plan.global_batch_size,
        }
        if best:
            final["last"] = best.get("last", {})
            final["best"] = best.get("best", {})
            final["best_metric"] = cfg.best_metric
            if cfg.best_metric is not None:
                oracle = any(cfg.best_metric.startswith(p) for p in oracle_prefixes)
                final["selection"] = "oracle" if oracle else "validation"
        self.model = method
        self.final_metrics = final
        return final

    def _device_transform(self, batch: dict[str, Any], transforms: dict[str, tuple[int, Any]],
                          ctx: StepContext) -> dict[str, Any]:
        """Each stream's :attr:`LoaderSpec.device_transform` applied to its batch (no gradient, outside autocast: the
        augmentation runs in float32), with a generator seeded by (seed, step, micro-batch, rank, stream): random
        choices independent across processes and identical after a resume (see :mod:`common.device_aug`)."""
        from accelerate.utils import send_to_device

        out = dict(batch)
        for name, (index, transform) in transforms.items():
            device = transform.run_device(self.device)
            g = ctx.generator(device, stream=DEVICE_TRANSFORM_STREAM + index)
            with torch.no_grad():
                views = transform(send_to_device(batch[name], device), g)
            out[name] = send_to_device(views, self.device, non_blocking=self.device.type == "cuda")
        return out

    def _check_finite(self, step: int) -> None:
        flag = self.accelerator.reduce(self._nonfinite.to(torch.float32), reduction="sum")
        if float(flag) > 0:
            last = latest_checkpoint(self.run_dir)
            raise NonFiniteLossError(
                f"non-finite loss detected before step {step}; training stopped. The last good checkpoint is "
                f"{last if last else '(none written yet)'}; lower the learning rate, enable trainer.clip_grad or "
                f"check the input data for NaNs, then resume with --resume."
            )

    def _evaluate(self, method: Method, evaluate: Callable, step: int, best: dict) -> dict:
        self.current_step = step  # for evaluation functions that log images
        self._sync_buffers(method)
        was_training = method.training
        method.eval()
        with torch.no_grad():
            metrics = dict(evaluate(method, self))
            if hasattr(method, "extra_metrics"):
                metrics.update(method.extra_metrics(self))
        method.train(was_training)
        metrics = {key: float(v) for key, v in metrics.items()}
        self._log({f"val/{key}": v for key, v in metrics.items()}, step)
        best = dict(best)
        best["last"] = {"step": step, **metrics}
        key = self.cfg.best_metric
        if key is not None:
            if key not in metrics:
                raise UserInputError(f"trainer.best_metric={key!r} is not among the evaluation metrics: "
                                     f"{', '.join(sorted(metrics))}; set trainer.best_metric to one of them")
            prev = best.get("best", {}).get(key)
            better = prev is None or (metrics[key] > prev if self.cfg.best_mode == "max" else metrics[key] < prev)
            if better:
                best["best"] = {"step": step, **metrics}
                self._save_weights(method, "best", {"step": step, key: metrics[key]})
        return best

    def _sync_buffers(self, module: nn.Module) -> None:
        """Give every process rank 0's buffers (BatchNorm running statistics, banks kept per process).

        DDP broadcasts the trained modules' buffers at the *start* of each forward, so after the last training step
        every process holds running statistics updated with its own batch; evaluation (and the saved weights, which
        are rank 0's) must use one set.
        """
        if self.accelerator.num_processes > 1 and torch.distributed.is_initialized():
            with torch.no_grad():
                for buf in module.buffers():
                    torch.distributed.broadcast(buf, src=0)

    def finish(self, extra: dict | None = None) -> dict:
        """Write ``metrics.json`` (final figures) and close the trackers. Returns what was written."""
        self.start_outputs()
        out = {**self.final_metrics, **(extra or {})}
        if self.is_main:
            atomic_write_json(self.run_dir / "metrics.json", out)
            if self._jsonl is not None:
                self._jsonl.close()
                self._jsonl = None
        self.accelerator.end_training()
        return out


def _flat_hparams(config: Any) -> dict:
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, (int, float, str, bool)):
            flat[prefix] = node
        elif node is None:
            flat[prefix] = "null"
        else:
            flat[prefix] = str(node)

    walk("", config_to_dict(config))
    return flat
