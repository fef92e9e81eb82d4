"""The contract between a training method and the engine (:mod:`common.engine`).

A method is an ``nn.Module`` holding *all* of its state (student, EMA teachers, DINO center, class banks,
prototypes, discriminators), so one ``state_dict`` checkpoints everything. It declares:

* ``name`` and ``Config`` (its typed config section, ``method=<name>`` selects it from :data:`registry`);
* ``streams``: the named training loaders one step consumes (``batch[stream]``; the first defines the epoch);
* ``trainable``: the sub-modules that receive gradients; only these are wrapped in DDP (call them through
  :meth:`Method.wrapped` so gradients are synchronised). Teachers, banks and prototypes stay outside DDP;
* ``optimizers()``: named :class:`OptimizerSpec` (parameter groups + own optimiser settings and lr/wd schedules);
* ``training_step(batch, ctx) -> {name: tensor}`` (the same keys at every step and on every process: they are
  averaged over the log window and across processes). *Automatic* mode returns ``"loss"`` and the engine does
  backward / clip / step. *Manual* mode (``manual_optimization = True``) calls ``ctx.backward(loss, "disc")``,
  ``ctx.optimizer_step("disc")`` and ``ctx.zero_grad("disc")`` itself (``ctx.step`` / ``ctx.epoch`` are the
  position); precision (one GradScaler per optimiser),
  accumulation, clipping, the finite-loss check and logging stay the engine's.
* hooks (all optional): ``on_train_start(ctx)`` (runs before a resumed run loads its checkpoint, which then
  overwrites the method's state), ``on_epoch_start(epoch, ctx)`` (ctx: named datasets, an evaluation-style loader,
  reductions across processes; not repeated when a run resumes mid-epoch), ``before_optimizer_step(name, step, epoch)``,
  ``after_optimizer_step(step, epoch)``, ``log_values(step, epoch)``, ``log_images(batch, step)``,
  ``extra_metrics(engine)`` (unsupervised selection criteria), ``sampling_weights(stream, epoch)``.

Example::

    class MeanSquare(Method):
        name, Config, streams, trainable = "toy", ToyConfig, ("main",), ("net",)
        def training_step(self, batch, ctx):
            loss = (self.wrapped("net")(batch["main"]["x"]) - batch["main"]["y"]).pow(2).mean()
            return {"loss": loss}
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from common.optim import OptimConfig

__all__ = ["Method", "OptimizerSpec", "TrainContext", "StepContext", "MethodRegistry", "frozen", "check_method"]


@dataclass
class OptimizerSpec:
    """One named optimiser of a method: its parameter groups (``lr_scale`` / ``apply_wd`` keys honoured) and its
    settings (``None``: the run's ``optim`` section). Each gets its own lr / weight-decay schedule."""

    param_groups: list[dict]
    optim: "OptimConfig | None" = None


@dataclass
class TrainContext:
    """What a method may use outside a step (``on_train_start``, ``on_epoch_start``)."""

    accelerator: Any
    total_steps: int
    steps_per_epoch: int
    epochs: int
    num_processes: int
    global_batch_size: int
    device: torch.device
    run_dir: Path
    datasets: dict[str, Any] = field(default_factory=dict)  # named datasets of the run (train streams and more)
    _engine: Any = None

    def eval_loader(self, dataset: str | Any, batch_size: int, collate_fn: Callable | None = None):
        """A loader over this process's shard of a named dataset (or a dataset); every sample once over all ranks."""
        ds = self.datasets[dataset] if isinstance(dataset, str) else dataset
        return self._engine.eval_loader(ds, batch_size, collate_fn)

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """All-reduce ``tensor`` over processes (``sum`` or ``mean``); identity with one process."""
        return self._engine.all_reduce(tensor, op)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate ``tensor`` (same shape on every process) over processes along dim 0, in rank order."""
        return self.accelerator.gather(tensor.contiguous())

    def print(self, *args: Any) -> None:
        """Print once per run (the global main process), also on several nodes (``Accelerator.print`` prints once
        per node)."""
        if self._engine is not None:
            self._engine.print(*args)
        elif self.accelerator.is_main_process:
            print(*args, flush=True)


class StepContext:
    """Passed to ``training_step``: the step's position (``step``, ``epoch``, ``micro``) and, in manual mode,
    ``backward`` / ``optimizer_step`` / ``zero_grad``.

    With gradient accumulation (``trainer.grad_accum_steps = k``) ``training_step`` runs once per micro-batch;
    ``backward`` divides the loss by ``k``; ``optimizer_step`` and ``zero_grad`` act on the last micro-batch only
    (they return whether they did)."""

    def __init__(self, engine: Any, step: int, epoch: int, micro: int, num_micro: int):
        self._engine, self.step, self.epoch, self.micro, self.num_micro = engine, step, epoch, micro, num_micro

    def generator(self, device: torch.device | str = "cpu", stream: int = 0) -> torch.Generator:
        """A torch generator seeded by ``(trainer.seed, step, micro-batch, process rank, stream)``: random choices of
        a method (CutMix boxes, copy-paste picks) that are independent across processes and exactly the same when a
        run is resumed (they do not depend on the global RNG stream). Calls with the same ``stream`` in one step
        return the same numbers: use one generator per step, or distinct ``stream`` values."""
        g = torch.Generator(device=device)
        g.manual_seed((((self.seed * 1_000_003 + self.step) * 131 + self.micro) * 1009 + self.rank) * 7919 + stream)
        return g

    @property
    def seed(self) -> int:
        return self._engine.cfg.seed if self._engine is not None else 0

    @property
    def rank(self) -> int:
        """This process's index (0 outside the engine)."""
        return self._engine.accelerator.process_index if self._engine is not None else 0

    @property
    def world_size(self) -> int:
        return self._engine.accelerator.num_processes if self._engine is not None else 1

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate ``tensor`` (same shape on every process) over processes along dim 0, in rank order."""
        return self._engine.accelerator.gather(tensor.contiguous()) if self._engine is not None else tensor.clone()

    @property
    def last_micro(self) -> bool:
        return self.micro == self.num_micro - 1

    def backward(self, loss: torch.Tensor, optimizer: str = "main") -> None:
        self._engine._backward(loss, optimizer, self)

    def optimizer_step(self, optimizer: str = "main") -> bool:
        """Clip, step (with the optimiser's GradScaler) on the last micro-batch; ``False`` on the others."""
        if not self.last_micro:
            return False
        self._engine._optimizer_step(optimizer, self.step, self.epoch)
        return True

    def zero_grad(self, optimizer: str = "main") -> bool:
        if not self.last_micro:
            return False
        self._engine._optimizers[optimizer].zero_grad(set_to_none=True)
        return True

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """All-reduce over processes (``sum`` or ``mean``); a copy outside the engine (one process)."""
        return self._engine.all_reduce(tensor, op) if self._engine is not None else tensor.clone()


class Method(nn.Module):
    """Base class of every training method (DINO, supervised, semi-supervised, domain adaptation)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type | None] = None  # the method's typed config section (``<name>:`` in the YAML)
    streams: ClassVar[tuple[str, ...]] = ("labelled",)
    trainable: ClassVar[tuple[str, ...]] = ("model",)
    manual_optimization: ClassVar[bool] = False
    eval_prefix: str = "model."  # state_dict prefix of the evaluated network (an instance may set its own)
    compile_modules: tuple[str, ...] = ()  # sub-modules torch.compile'd on CUDA with trainer.compile
    # DDP's find_unused_parameters for the trainable modules: True when a step may leave some of their parameters
    # out of a backward (e.g. an auxiliary head that some forwards skip); costs a graph traversal per backward.
    find_unused_parameters: bool = False

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_wrappers", {})

    # ---- the engine calls these
    def attach_wrappers(self, wrappers: dict[str, nn.Module]) -> None:
        object.__setattr__(self, "_wrappers", dict(wrappers))

    def wrapped(self, name: str) -> nn.Module:
        """The sub-module ``name`` as trained: its DDP wrapper in a multi-process run, else the module itself."""
        return self._wrappers.get(name) or getattr(self, name)

    def optimizers(self) -> dict[str, OptimizerSpec]:
        """Default: one optimiser ``main`` over ``self.param_groups()`` with the run's ``optim`` settings."""
        groups = getattr(self, "param_groups", None)
        if groups is None:
            raise TypeError(f"{type(self).__name__} must define optimizers() or param_groups()")
        return {"main": OptimizerSpec(groups())}

    def forward(self, batch: dict[str, Any], step: int = 0, epoch: int = 0) -> dict[str, torch.Tensor]:
        """One ``training_step`` outside the engine (automatic mode only): the losses of a batch, e.g. in tests and
        benchmarks. The engine itself calls ``training_step`` with its context."""
        if self.manual_optimization:
            raise RuntimeError(f"{type(self).__name__} optimises manually: run it through the engine")
        check_method(self)
        return self.training_step(batch, StepContext(None, step, epoch, 0, 1))

    @property
    def eval_model(self) -> nn.Module:
        """The network evaluated and exported for prediction (default: ``self.model``)."""
        return getattr(self, "model")

    def trainable_modules(self) -> dict[str, nn.Module]:
        out = {}
        for name in self.trainable:
            module = getattr(self, name, None)
            if not isinstance(module, nn.Module):
                raise TypeError(f"{type(self).__name__}.trainable names {name!r}, which is not a sub-module")
            out[name] = module
        return out


def check_method(method: "Method") -> None:
    """A method must define ``training_step`` (the engine calls it; there is no default)."""
    if not callable(getattr(method, "training_step", None)):
        raise TypeError(f"{type(method).__name__} defines no training_step(batch, ctx)")


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Switch off ``requires_grad`` of every parameter of ``modules`` inside the block (e.g. a discriminator while
    the generator's adversarial loss flows through it: its parameters get no gradient), restoring it after."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


class MethodRegistry:
    """name -> Method class; ``method=<name>`` in a config picks one, unknown names list the valid ones."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Method]] = {}

    def register(self, cls: type[Method]) -> type[Method]:
        if not cls.name:
            raise ValueError(f"{cls.__name__} has no name")
        if cls.name in self._classes and self._classes[cls.name] is not cls:
            raise ValueError(f"method name {cls.name!r} registered twice")
        self._classes[cls.name] = cls
        return cls

    def names(self) -> tuple[str, ...]:
        return tuple(self._classes)

    def get(self, name: str) -> type[Method]:
        from common.errors import UserInputError

        if name not in self._classes:
            raise UserInputError(f"method={name!r} is not a method; valid: {', '.join(self._classes)}")
        return self._classes[name]

    def items(self):
        return self._classes.items()
