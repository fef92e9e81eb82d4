"""One fine-tuning run, shared by ``finetune/semisup.py`` and ``finetune/uda.py``: parse, data, method, fit.

* :func:`finetune_config_class` builds the run's strict config class: the shared sections (``data``, ``model``,
  ``loss``, ``augment``, ``optim``, ``trainer``, ``eval``), ``method`` (one of the task's registered names) and one
  typed section per method (``<name>: {...}``), so unknown keys and unknown methods are refused before any work.
* :func:`run` resolves bands / normalisation / weights (an export, a previous run with ``model.init_from``),
  builds the training streams the method consumes (:mod:`finetune.data`), plans the run, builds the segmenter and
  the method, writes the model card and trains with the engine; evaluation covers every validation set.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from common.checkpoint import CHECKPOINT_DIR, load_safetensors
from common.cli import parse_training_args, training_parser
from common.engine import Engine
from common.errors import UserInputError
from common.optim import OptimConfig
from finetune.config import EvalConfig, LossConfig, SegDataConfig, SegModelConfig, default_optim, default_trainer
from finetune.evaluation import make_multi_evaluate
from finetune.inputs import ResolvedInputs, build_loss, build_model, resolve_inputs
from finetune.model_card import write_model_card
from finetune.data import (TARGET_PREFIX, band_units_of, plain_dataset, role_spec, stream_dataset, stream_loader,
                           validation_sets)
from finetune.methods import methods_for
from finetune.methods.base import SegSetup
from finetune.transforms import SegAugConfig

__all__ = ["finetune_config_class", "task_of_config", "run", "load_init_from", "BASELINES"]

_UNLABELLED_STREAMS = ("unlabelled", "target")


def _validate(self) -> None:
    if self.eval.building_f1 and not 0 <= self.eval.foreground_class < self.data.num_classes:
        raise ValueError(f"eval.foreground_class={self.eval.foreground_class} is not a class of "
                         f"data.num_classes={self.data.num_classes}")
    if self.loss.class_weights is not None and len(self.loss.class_weights) != self.data.num_classes:
        raise ValueError(f"loss.class_weights has {len(self.loss.class_weights)} values for data.num_classes="
                         f"{self.data.num_classes}")


BASELINES = {"semisup": "supervised", "uda": "source_only"}
"""The method an entry script runs when the config names none (listed first among the valid names)."""


def finetune_config_class(task: str) -> type:
    """The config dataclass of an entry script (``semisup`` or ``uda``): shared sections + one per method."""
    methods = methods_for(task)
    if not methods:
        raise ValueError(f"no method is registered for task {task!r}")
    baseline = BASELINES[task]
    names = (baseline, *sorted(n for n in methods if n != baseline))
    fields: list[tuple[str, Any, Any]] = [
        ("method", Literal[names], field(default=baseline)),  # type: ignore[valid-type]
        ("data", SegDataConfig, field(default_factory=SegDataConfig)),
        ("model", SegModelConfig, field(default_factory=SegModelConfig)),
        ("loss", LossConfig, field(default_factory=LossConfig)),
        ("augment", SegAugConfig, field(default_factory=SegAugConfig)),
        ("optim", OptimConfig, field(default_factory=default_optim)),
        ("trainer", Any, None),
        ("eval", EvalConfig, field(default_factory=EvalConfig)),
    ]
    from common.engine import TrainerConfig

    fields[6] = ("trainer", TrainerConfig, field(default_factory=default_trainer))
    fields += [(name, methods[name].Config, field(default_factory=methods[name].Config)) for name in names]
    return make_dataclass(f"FinetuneConfig_{task}", fields, frozen=True, namespace={"validate": _validate})


def task_of_config(path: str | Path) -> str:
    """``"semisup"`` or ``"uda"``: the entry script whose methods include the config file's ``method``."""
    import yaml

    method = (yaml.safe_load(Path(path).read_text()) or {}).get("method", BASELINES["semisup"])
    for task in BASELINES:
        if method in methods_for(task):
            return task
    raise UserInputError(f"{path}: method {method!r} is not a method of finetune/semisup.py or finetune/uda.py")


def load_init_from(model: torch.nn.Module, run_dir: str, checkpoint: str, arch: str, version: str,
                   num_classes: int, bands: list[str], *, stem_pool: bool) -> str:
    """Load the evaluated segmenter of a previous fine-tuning run into ``model`` (strict). Returns the file.

    ``stem_pool`` is whether ``model`` has its ResNet stem max-pool: a run built otherwise has the same keys but is
    another network, so it is refused like one of another architecture.

    Raises:
        UserInputError: no such run / weights, or a run of another architecture, class count, bands or stem pool.
    """
    card_path = Path(run_dir) / "model.json"
    if not card_path.is_file():
        raise UserInputError(f"model.init_from: {run_dir} is not a fine-tuning run (no model.json); point it at the "
                             f"--output-dir of a finished finetune/semisup.py or finetune/uda.py run")
    card = json.loads(card_path.read_text())
    for key, want in (("arch", arch), ("version", version), ("num_classes", num_classes), ("bands", bands)):
        if card.get(key) != want:
            raise UserInputError(f"model.init_from: the run {run_dir} has {key}={card.get(key)!r} but this run has "
                                 f"{want!r}; set model.{key if key != 'num_classes' else 'num_classes'} (or data.bands) "
                                 f"to match, or start from its backbone with model.weights instead")
    theirs = bool(card.get("stem_pool", True))  # cards written before the key: the timm stem
    if theirs != stem_pool:
        raise UserInputError(f"model.init_from: the run {run_dir} was built with stem_pool={str(theirs).lower()} "
                             f"({card_path}) but this run's network has stem_pool={str(stem_pool).lower()} "
                             f"(model.stem_pool, or the export in model.weights); set model.stem_pool="
                             f"{str(theirs).lower()}, or start from a run built like this one")
    path = Path(run_dir) / CHECKPOINT_DIR / f"{checkpoint}.safetensors"
    if not path.is_file():
        raise UserInputError(f"model.init_from: {path} does not exist; set model.init_checkpoint to "
                             f"{'last' if checkpoint == 'best' else 'best'} or finish that run")
    prefix = card.get("state_dict_prefix", "model.")
    state = {k[len(prefix):]: v for k, v in load_safetensors(path).items() if k.startswith(prefix)}
    fix = "match model.aux / model.output_stride / model.aspp_channels / model.decoder_channels to the run's model.json"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ (e.g. another head width)
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise UserInputError(f"model.init_from: {path} does not fit the configured segmenter ({first}); {fix} "
                             f"(it has aspp_channels={card.get('aspp_channels', 256)}, decoder_channels="
                             f"{card.get('decoder_channels', 256)})") from None
    if missing or unexpected:
        raise UserInputError(f"model.init_from: {path} does not fit the configured segmenter (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}); {fix}")
    return str(path)


def _resolve(cfg: Any, source: str) -> ResolvedInputs:
    if cfg.model.init_from is None:
        return resolve_inputs(cfg.data, cfg.model, source=source)
    card_path = Path(cfg.model.init_from) / "model.json"
    if not card_path.is_file():
        raise UserInputError(f"model.init_from: {cfg.model.init_from} is not a fine-tuning run (no model.json)")
    inputs = resolve_inputs(cfg.data, cfg.model, source=source)
    card = json.loads(card_path.read_text())
    if cfg.model.stem_pool is None:  # null follows the run's network (an explicit value is checked by load_init_from)
        inputs = dataclasses.replace(inputs, stem_pool=bool(card.get("stem_pool", True)))
    norm = card["normalisation"]
    if list(inputs.spec.bands) != card["bands"]:
        raise UserInputError(f"model.init_from: the run {cfg.model.init_from} reads bands {card['bands']} but "
                             f"{source} reads {list(inputs.spec.bands)}; set data.bands to the run's bands")
    mean, std = [float(v) for v in inputs.spec.mean_array()], [float(v) for v in inputs.spec.std_array()]
    if cfg.data.stats_file is None:
        from common.bands import BandStats

        spec = inputs.spec.with_stats(BandStats(mean=dict(zip(card["bands"], norm["mean"])),
                                                std=dict(zip(card["bands"], norm["std"]))))
        inputs = dataclasses.replace(inputs, spec=spec)
        inputs.notes.append(f"normalisation taken from {card_path}")
    elif not (torch.allclose(torch.tensor(mean), torch.tensor(norm["mean"]), rtol=1e-4)
              and torch.allclose(torch.tensor(std), torch.tensor(norm["std"]), rtol=1e-4)):
        raise UserInputError(f"model.init_from: data.stats_file {cfg.data.stats_file} normalises differently from "
                             f"the run {cfg.model.init_from}; leave data.stats_file unset to use the run's")
    return inputs


def run(task: str, argv: list[str] | None, description: str, prog: str) -> dict[str, Any]:
    """The whole fine-tuning run of an entry script; returns what ``metrics.json`` holds."""
    cls = finetune_config_class(task)
    cfg, args = parse_training_args(cls, training_parser(description, prog=prog), argv)
    method_cls = methods_for(task)[cfg.method]
    # Everything that can be wrong with the input is checked before the engine starts.
    inputs = _resolve(cfg, args.config)
    spec = inputs.spec
    d = cfg.data
    target_stats = getattr(getattr(d, "target", None), "stats_file", None)
    if target_stats is not None:
        tspec = role_spec("target", d, spec)  # checked here: a bad file stops the run before anything starts
        inputs.notes.append(f"target tiles normalised with {target_stats} (per-domain standardisation): "
                            + ", ".join(f"{b} {m:.4g} +- {s:.4g}" for b, m, s in
                                        zip(tspec.bands, tspec.mean_array(), tspec.std_array())))
    streams = {role: stream_dataset(role, d, spec, cfg.augment, cfg.trainer.seed,
                                    n_strong=method_cls.views.get(role, 0))
               for role in method_cls.streams}
    vals = validation_sets(d, spec)

    engine = Engine(cfg.trainer, args.output_dir, config=cfg, resume=args.resume, cpu=args.cpu,
                    overwrite=args.overwrite)
    for note in inputs.notes:
        engine.print(note)
    loaders = {}
    for role, ds in streams.items():
        unl = role in _UNLABELLED_STREAMS and d.unlabelled_batch_size is not None
        loaders[role] = stream_loader(ds, d.unlabelled_batch_size if unl else d.batch_size, role_spec(role, d, spec),
                                      cfg.augment, n_strong=method_cls.views.get(role, 0),
                                      batch_size_key="data.unlabelled_batch_size" if unl else "data.batch_size")
    plan = engine.plan(loaders)
    init = inputs.weights if inputs.weights else "random init"
    model = build_model(cfg.model, d.num_classes, inputs, len(spec.bands))
    if cfg.model.init_from is not None:
        init = load_init_from(model, cfg.model.init_from, cfg.model.init_checkpoint, cfg.model.arch,
                              cfg.model.version, d.num_classes, list(spec.bands), stem_pool=inputs.stem_pool)
    engine.print(f"{cfg.method}: DeepLab {cfg.model.version} on {cfg.model.arch} ({init}), "
                 + ", ".join(f"{len(ds)} {role}" for role, ds in streams.items())
                 + ", " + ", ".join(f"{len(ds)} {name}" for name, ds in vals.items())
                 + f" tiles, bands {', '.join(spec.bands)}, {plan.total_steps} steps")

    def make_model() -> torch.nn.Module:
        return build_model(cfg.model, d.num_classes, inputs, len(spec.bands))

    setup = SegSetup(num_classes=d.num_classes, criterion=build_loss(cfg.loss, d.num_classes),
                     band_units=band_units_of(spec), band_std=spec.std_array(),
                     backbone_lr_mult=cfg.model.backbone_lr_mult, freeze_backbone=cfg.model.freeze_backbone,
                     make_model=make_model, class_names=d.class_names, weights=inputs.weights,
                     init_from=cfg.model.init_from)
    method = method_cls(getattr(cfg, cfg.method), model, setup)
    engine.check(method, loaders)  # before the run directory gets any file
    engine.start_outputs()
    if engine.is_main:
        write_model_card(engine.run_dir, cfg.model, d, inputs, cfg.method, method.eval_prefix)

    plain = {f"{role}_plain": plain_dataset(role, d, spec) for role in streams}  # built lazily: files checked above
    final = engine.fit(method, loaders, cfg.optim, evaluate=make_multi_evaluate(vals, d, cfg.eval, spec),
                       datasets={**vals, **plain}, oracle_prefixes=(TARGET_PREFIX,))
    metric = cfg.trainer.best_metric
    if metric and "last" in final:
        engine.print(f"validation {metric}: last {final['last'].get(metric, float('nan')):.2f} "
                     f"(step {final['last']['step']}), best {final['best'].get(metric, float('nan')):.2f} "
                     f"(step {final['best']['step']})")
    return engine.finish({"method": cfg.method, "weights_init": init})
