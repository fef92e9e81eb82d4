"""The one training engine every stage uses (DINO pretraining, supervised, semi-supervised, domain adaptation).

A *method* says what one step computes; the engine owns everything else:

* Accelerate set-up (CPU, one or many GPUs/nodes, bf16/fp16 mixed precision with a clean CPU fallback),
  seeding, deterministic DataLoaders (one or several zipped ones: labelled + unlabelled, source + target),
* gradient accumulation, ``accelerator.backward``, gradient clipping (global norm or per parameter),
  the lr / weight-decay schedules, the optimiser step,
* the finite-loss check, logging to TensorBoard and ``metrics.jsonl``, a progress bar on the main process,
* periodic evaluation with best/last bookkeeping, atomic checkpoints and exact resume.

The method contract (:class:`TrainingMethod`), an ``nn.Module`` that holds *all* of its state (student,
EMA teachers, DINO center, class banks, discriminators) so that one ``state_dict`` checkpoints everything:

* ``forward(batch, step, epoch) -> dict[str, Tensor]``: one micro-batch; the dict must hold ``"loss"`` (what is
  back-propagated); other entries are logged. It runs through the DDP wrapper so gradients are synchronised.
* ``param_groups() -> list[dict]``: optimiser parameter groups (``lr_scale``/``apply_wd`` keys honoured).
* optional hooks: ``on_train_start(ctx)``, ``on_after_backward(step, epoch)`` (e.g. DINO's last-layer freeze),
  ``after_optimizer_step(step, epoch)`` (EMA teachers, prototypes), ``log_values(step, epoch) -> dict``,
  ``log_images(batch, step) -> dict[str, HWC uint8]``.

Resume: ``checkpoints/step_XXXXXXXX`` holds Accelerate's full state (model incl. teachers and buffers, optimiser,
grad scaler, RNG states of every process) plus ``engine_state.json`` (step, batches consumed per loader, best
metric). We name checkpoint directories ourselves, so Accelerate's automatic checkpoint counter (which
``load_state`` does not restore) is never used. Data order is a pure function of (seed, loader, epoch) and
augmentations draw from ``np.random.default_rng((seed, epoch, index))`` (see :mod:`common.sampling`), so a resumed
run sees exactly the batches an uninterrupted run would have seen and ends with bit-identical weights on CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.checkpoint import (
    CHECKPOINT_DIR,
    atomic_save_safetensors,
    atomic_write_json,
    latest_checkpoint,
    prune_checkpoints,
    step_dir_name,
)
from common.config import config_to_dict, save_config
from common.optim import OptimConfig, build_optimizer, clip_gradients_per_parameter
from common.sampling import EpochSampler, seed_worker
from common.schedules import build_lr_schedule, cosine_schedule

__all__ = [
    "TrainerConfig",
    "LoaderSpec",
    "TrainContext",
    "TrainingMethod",
    "NonFiniteLossError",
    "Engine",
    "resolve_mixed_precision",
]

logger = logging.getLogger(__name__)


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
    num_workers: int = 0  # DataLoader worker processes per training process
    log_every: int = 10  # steps between scalar logs (metrics.jsonl, TensorBoard)
    image_log_every: int | None = None  # steps between image logs (None: first and last step only)
    eval_every: int | None = None  # steps between evaluations (None: only at the end)
    checkpoint_every: int = 500  # steps between checkpoints (a final one is always written)
    keep_checkpoints: int = 2  # step checkpoints kept on disk
    best_metric: str | None = None  # evaluation key that selects the best model (e.g. "mIoU")
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
    """A training data stream. The first spec given to the engine defines the epoch; others cycle."""

    dataset: Dataset
    batch_size: int
    collate_fn: Callable | None = None
    shuffle: bool = True
    drop_last: bool = True


@dataclass
class TrainContext:
    """What a method may want to know before training (passed to ``on_train_start``)."""

    accelerator: Any
    total_steps: int
    steps_per_epoch: int
    epochs: int
    num_processes: int
    global_batch_size: int
    device: torch.device
    run_dir: Path


class TrainingMethod(Protocol):
    def forward(self, batch: dict, step: int, epoch: int) -> dict[str, torch.Tensor]: ...

    def param_groups(self) -> list[dict]: ...


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


def clip_gradients(acc: Any, optimizer: Any, params: list, max_norm: float, mode: str) -> None:
    """Clip with the gradients unscaled exactly once (fp16's GradScaler refuses a second ``unscale_`` before the
    step): ``global_norm`` through ``Accelerator.clip_grad_norm_`` (which unscales), ``per_parameter`` after an
    explicit ``unscale_gradients`` (each parameter's norm stays on the device: no host sync)."""
    if mode == "global_norm":
        acc.clip_grad_norm_(params, max_norm)
    else:
        acc.unscale_gradients(optimizer)
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


class Engine:
    """Runs a :class:`TrainingMethod` with Accelerate. Create it first (it seeds), then build the model, then fit.

    Args:
        cfg: the ``trainer`` section.
        run_dir: the run directory (created); holds config.yaml, metrics.jsonl, metrics.json, tb/, checkpoints/.
        config: the full resolved config, saved as ``config.yaml``.
        resume: continue from the latest checkpoint in ``run_dir`` (error if there is none).
        cpu: force the CPU even where a GPU exists.
    """

    def __init__(self, cfg: TrainerConfig, run_dir: str | os.PathLike, config: Any = None, resume: bool = False,
                 cpu: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        cuda = torch.cuda.is_available() and not cpu
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(cfg.mixed_precision, cuda=cuda),
            cpu=cpu,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir)),
            # non_blocking: batches (pinned on CUDA, see _make_loader) are copied to the GPU without a host sync.
            dataloader_config=DataLoaderConfiguration(even_batches=True, non_blocking=cuda),
        )
        if resume and latest_checkpoint(self.run_dir) is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.run_dir / CHECKPOINT_DIR}")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if config is not None:
                save_config(config, self.run_dir / "config.yaml")
        self.accelerator.wait_for_everyone()
        set_seed(cfg.seed, device_specific=False)
        self.accelerator.init_trackers("tb", config=_flat_hparams(config) if config is not None else None)
        self._jsonl = None
        self.current_step = 0
        self.final_metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args)

    def _make_loader(self, name: str, spec: LoaderSpec, index: int) -> tuple[DataLoader, EpochSampler]:
        # Each loader gets its own seed so that zipped loaders do not share an order.
        # Datasets that take (epoch, index) get it from the sampler, so their workers can persist across epochs
        # (no re-spawn, caches kept); others learn the epoch from set_epoch and need fresh workers every epoch.
        persistent = self.cfg.num_workers > 0 and getattr(spec.dataset, "epoch_in_index", False)
        sampler = EpochSampler(len(spec.dataset), seed=self.cfg.seed + 1000 * index, shuffle=spec.shuffle,
                               with_epoch=persistent)
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
        if len(loader) == 0:
            raise ValueError(
                f"training loader {name!r} yields no batch: {len(spec.dataset)} samples, batch size {spec.batch_size}"
                f" with drop_last; lower the batch size or add data"
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

    # ------------------------------------------------------------------ checkpoints
    def _save(self, step: int, state: dict) -> None:
        acc = self.accelerator
        ckpt_root = self.run_dir / CHECKPOINT_DIR
        final = ckpt_root / step_dir_name(step)
        tmp = ckpt_root / f".tmp_{step_dir_name(step)}"
        if self.is_main:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if self.is_main:
            atomic_write_json(tmp / "engine_state.json", state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        acc.wait_for_everyone()

    def _save_weights(self, model: nn.Module, name: str, extra: dict | None = None) -> None:
        if self.is_main:
            unwrapped = self.accelerator.unwrap_model(model)
            atomic_save_safetensors(unwrapped.state_dict(), self.run_dir / CHECKPOINT_DIR / f"{name}.safetensors",
                                    metadata=extra)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ training
    def fit(
        self,
        method: nn.Module,
        loaders: dict[str, LoaderSpec],
        optim: OptimConfig,
        evaluate: Callable[[nn.Module, "Engine"], dict[str, float]] | None = None,
    ) -> dict[str, Any]:
        """Train ``method`` and return the final metrics (also written to ``metrics.json``).

        Args:
            method: the training method (see module docstring).
            loaders: named training streams; the first defines the epoch length.
            optim: optimiser and schedule settings.
            evaluate: ``evaluate(unwrapped_method, engine) -> {metric: value}`` run every ``eval_every`` steps
                and at the end, on every process (use :meth:`eval_loader` and reduce across processes).
        """
        cfg, acc = self.cfg, self.accelerator
        if not loaders:
            raise ValueError("fit() needs at least one training loader")
        built = {name: self._make_loader(name, spec, i) for i, (name, spec) in enumerate(loaders.items())}

        if cfg.compile:
            targets = getattr(method, "compile_modules", ())
            if acc.device.type != "cuda":
                acc.print("trainer.compile: skipped on CPU (torch.compile is used on CUDA only)")
            else:
                compile_in_place(method, targets)

        # On the training device before the optimiser is built, so that build_optimizer picks the implementation
        # (fused / foreach) for the device the parameters will live on (prepare would move them anyway).
        method.to(acc.device)
        optimizer = build_optimizer(optim, method.param_groups())
        model, optimizer = acc.prepare(method, optimizer)
        prepared = {name: acc.prepare_data_loader(dl) for name, (dl, _) in built.items()}
        samplers = {name: sampler for name, (_, sampler) in built.items()}
        n_batches = {name: len(dl) for name, dl in prepared.items()}
        for name, n in n_batches.items():
            if n == 0:
                raise ValueError(
                    f"training loader {name!r} yields no batch per process: {len(loaders[name].dataset)} samples "
                    f"shared by {acc.num_processes} processes at batch size {loaders[name].batch_size} (drop_last); "
                    f"lower the batch size, use fewer processes or add data")
        primary = next(iter(prepared))

        k = cfg.grad_accum_steps
        steps_per_epoch = max(n_batches[primary] // k, 1)
        total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
        epochs = math.ceil(total_steps / steps_per_epoch)
        global_batch = loaders[primary].batch_size * acc.num_processes * k
        base_lr = optim.lr * (global_batch / 256.0 if optim.scale_lr_with_batch else 1.0)
        warmup = optim.warmup_steps or int(round(optim.warmup_epochs * steps_per_epoch))
        lr_sched = build_lr_schedule(optim.schedule, base_lr, total_steps, warmup, final_value=optim.min_lr,
                                     power=optim.poly_power)
        wd_end = optim.weight_decay if optim.weight_decay_end is None else optim.weight_decay_end
        wd_sched = cosine_schedule(optim.weight_decay, wd_end, total_steps)

        unwrapped = acc.unwrap_model(model)
        ctx = TrainContext(acc, total_steps, steps_per_epoch, epochs, acc.num_processes, global_batch, acc.device,
                           self.run_dir)
        if hasattr(unwrapped, "on_train_start"):
            unwrapped.on_train_start(ctx)

        # ---- resume
        step = 0
        consumed = {name: 0 for name in prepared}
        best: dict[str, Any] = {}
        if self.resume:
            ckpt = latest_checkpoint(self.run_dir)
            acc.load_state(str(ckpt))
            state = json.loads((ckpt / "engine_state.json").read_text())
            step, consumed, best = state["step"], state["consumed"], state.get("best", {})
            acc.print(f"resumed from {ckpt} at step {step}/{total_steps}")
        if step >= total_steps and self.resume:
            acc.print("run already complete; re-running the final evaluation")

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

        streams = {name: stream(name) for name in prepared}
        clip_params = [p for g in optimizer.param_groups for p in g["params"]]
        sums: dict[str, torch.Tensor] = {}
        count = 0
        nonfinite = torch.zeros((), device=acc.device, dtype=torch.bool)
        last_logged: dict[str, float] = {}
        t0, t_log = time.perf_counter(), time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, disable=not (self.is_main and cfg.progress_bar), dynamic_ncols=True)
        batch = None
        while step < total_steps:
            epoch = step // steps_per_epoch
            # 1. schedules: lr and weight decay for this step, indexed by the global step
            for g in optimizer.param_groups:
                g["lr"] = float(lr_sched[step]) * g.get("lr_scale", 1.0)
                g["weight_decay"] = float(wd_sched[step]) if g.get("apply_wd", True) else 0.0
            # 2. forward/backward over k micro-batches, syncing gradients on the last one only
            for micro in range(k):
                batch = {name: next(s) for name, s in streams.items()}
                sync = micro == k - 1
                with (contextlib.nullcontext() if sync else acc.no_sync(model)), acc.autocast():
                    out = model(batch, step=step, epoch=epoch)
                loss = out["loss"]
                acc.backward(loss / k)
                nonfinite |= ~torch.isfinite(loss.detach())
                for key, v in out.items():
                    v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=acc.device)
                    sums[key] = sums.get(key, 0.0) + v / k
            count += 1
            # 3. hooks that edit gradients (e.g. DINO's last-layer freeze), then clipping
            if hasattr(unwrapped, "on_after_backward"):
                unwrapped.on_after_backward(step, epoch)
            if cfg.clip_grad is not None:
                clip_gradients(acc, optimizer, clip_params, cfg.clip_grad, cfg.clip_mode)
            # 4. optimiser step, then the method's post-step updates (EMA teachers, center, prototypes)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(unwrapped, "after_optimizer_step"):
                unwrapped.after_optimizer_step(step, epoch)
            step += 1
            bar.update(1)

            done = step >= total_steps
            if step % cfg.log_every == 0 or done:
                self._check_finite(nonfinite, step)
                stacked = torch.stack([sums[key] for key in sorted(sums)]) / count
                reduced = acc.reduce(stacked, reduction="mean")
                values = {f"train/{key}": float(v) for key, v in zip(sorted(sums), reduced.tolist())}
                values["train/lr"] = float(lr_sched[step - 1])
                values["train/wd"] = float(wd_sched[step - 1])
                values["train/epoch"] = step / steps_per_epoch
                if hasattr(unwrapped, "log_values"):
                    values.update({f"train/{key}": float(v) for key, v in unwrapped.log_values(step - 1, epoch).items()})
                dt = time.perf_counter() - t_log
                values["train/steps_per_s"] = count / dt if dt > 0 else 0.0
                self._log(values, step)
                last_logged = values
                bar.set_postfix(loss=f"{values.get('train/loss', float('nan')):.4f}")
                sums, count, t_log = {}, 0, time.perf_counter()
            if hasattr(unwrapped, "log_images") and self.is_main and (
                step == 1 or done or (cfg.image_log_every and step % cfg.image_log_every == 0)
            ):
                self.log_images(unwrapped.log_images(batch, step), step)
            if evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or done):
                best = self._evaluate(model, evaluate, step, best)
            if step % cfg.checkpoint_every == 0 or done:
                self._check_finite(nonfinite, step)
                self._save(step, {"step": step, "consumed": consumed, "best": best, "total_steps": total_steps})
        bar.close()
        if step > 0 and self.resume and evaluate is not None and not last_logged:
            best = self._evaluate(model, evaluate, step, best)

        self._save_weights(model, "last", {"step": step})
        final = {
            "steps": step,
            "epochs": step / steps_per_epoch,
            "train": {k.removeprefix("train/"): v for k, v in last_logged.items()},
            "train_time_s": time.perf_counter() - t0,
            "num_processes": acc.num_processes,
            "global_batch_size": global_batch,
        }
        if best:
            final["last"] = best.get("last", {})
            final["best"] = best.get("best", {})
            final["best_metric"] = cfg.best_metric
        self.model = model
        self.final_metrics = final
        return final

    def _check_finite(self, flag: torch.Tensor, step: int) -> None:
        flag = self.accelerator.reduce(flag.to(torch.float32), reduction="sum")
        if float(flag) > 0:
            last = latest_checkpoint(self.run_dir)
            raise NonFiniteLossError(
                f"non-finite loss detected before step {step}; training stopped. The last good checkpoint is "
                f"{last if last else '(none written yet)'}; lower the learning rate, enable trainer.clip_grad or "
                f"check the input data for NaNs, then resume with --resume."
            )

    def _evaluate(self, model: nn.Module, evaluate: Callable, step: int, best: dict) -> dict:
        self.current_step = step  # for evaluation functions that log images
        unwrapped = self.accelerator.unwrap_model(model)
        self._sync_buffers(unwrapped)
        was_training = unwrapped.training
        unwrapped.eval()
        with torch.no_grad():
            metrics = evaluate(unwrapped, self)
        unwrapped.train(was_training)
        metrics = {k: float(v) for k, v in metrics.items()}
        self._log({f"val/{k}": v for k, v in metrics.items()}, step)
        best = dict(best)
        best["last"] = {"step": step, **metrics}
        key = self.cfg.best_metric
        if key is not None:
            if key not in metrics:
                raise KeyError(f"trainer.best_metric={key!r} is not among the evaluation metrics: {sorted(metrics)}")
            prev = best.get("best", {}).get(key)
            better = prev is None or (metrics[key] > prev if self.cfg.best_mode == "max" else metrics[key] < prev)
            if better:
                best["best"] = {"step": step, **metrics}
                self._save_weights(model, "best", {"step": step, key: metrics[key]})
        return best

    def _sync_buffers(self, module: nn.Module) -> None:
        """Give every process rank 0's buffers (BatchNorm running statistics).

        DDP broadcasts buffers at the *start* of each forward, so after the last training step every process holds
        running statistics updated with its own batch; evaluation (and the saved weights, which are rank 0's) must
        use one set.
        """
        if self.accelerator.num_processes > 1 and torch.distributed.is_initialized():
            with torch.no_grad():
                for buf in module.buffers():
                    torch.distributed.broadcast(buf, src=0)

    def finish(self, extra: dict | None = None) -> dict:
        """Write ``metrics.json`` (final figures) and close the trackers. Returns what was written."""
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
