"""Fine-tune a DeepLab segmenter (supervised baseline; the semi-supervised methods plug into the same script).

    accelerate launch finetune/semisup.py --config configs/finetune/demo.yaml --output-dir runs/finetune \
        [method=supervised] [model.weights=runs/pretrain/backbone.safetensors] [key=value ...]

The top-level key ``method`` picks the training method; ``data``/``model``/``loss``/``augment``/``optim``/
``trainer``/``eval`` are shared by all methods and each method has its own section. The backbone comes from an
export of ``ssl/export.py`` (bands and normalisation checked against the data), a timm ``state_dict`` file, or
random init. Evaluation runs every ``trainer.eval_every`` steps and at the end; ``metrics.json`` reports the last
and the best evaluation (``trainer.best_metric``), ``checkpoints/last.safetensors`` and ``best.safetensors`` hold
the weights and ``model.json`` what ``finetune/predict.py`` needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from common.cli import parse_training_args, training_parser
from common.engine import Engine, LoaderSpec, TrainerConfig
from common.optim import OptimConfig
from finetune.common_setup import (
    EvalConfig,
    LossConfig,
    SegDataConfig,
    SegModelConfig,
    build_loss,
    build_model,
    default_optim,
    default_trainer,
    make_evaluate,
    resolve_inputs,
    segmentation_datasets,
    write_model_card,
)
from finetune.supervised import Supervised, SupervisedConfig
from finetune.transforms import SegAugConfig

__all__ = ["FinetuneConfig", "METHODS", "main"]

METHODS = ("supervised",)


@dataclass(frozen=True)
class FinetuneConfig:
    method: Literal["supervised"] = "supervised"
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: SegAugConfig = field(default_factory=SegAugConfig)
    optim: OptimConfig = field(default_factory=default_optim)
    trainer: TrainerConfig = field(default_factory=default_trainer)
    eval: EvalConfig = field(default_factory=EvalConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)

    def validate(self) -> None:
        if self.eval.building_f1 and not 0 <= self.eval.foreground_class < self.data.num_classes:
            raise ValueError(f"eval.foreground_class={self.eval.foreground_class} is not a class of "
                             f"data.num_classes={self.data.num_classes}")
        if self.loss.class_weights is not None and len(self.loss.class_weights) != self.data.num_classes:
            raise ValueError(f"loss.class_weights has {len(self.loss.class_weights)} values for data.num_classes="
                             f"{self.data.num_classes}")


def build_method(cfg: FinetuneConfig, model, criterion):
    if cfg.method == "supervised":
        return Supervised(model, criterion, cfg.supervised, cfg.model.backbone_lr_mult, cfg.model.freeze_backbone)
    raise ValueError(f"unknown method {cfg.method!r}; valid: {METHODS}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = training_parser(__doc__.split("\n\n")[0], prog="finetune/semisup.py")
    cfg, args = parse_training_args(FinetuneConfig, parser, argv)
    # Everything that can be wrong with the input is checked before the engine starts.
    inputs = resolve_inputs(cfg.data, cfg.model, source=args.config)
    spec = inputs.spec
    sets = segmentation_datasets(cfg.data, spec, cfg.augment, cfg.trainer.seed)

    engine = Engine(cfg.trainer, args.output_dir, config=cfg, resume=args.resume, cpu=args.cpu)
    for note in inputs.notes:
        engine.print(note)
    engine.print(f"{cfg.method}: DeepLab {cfg.model.version} on {cfg.model.arch} "
                 f"({'weights ' + inputs.weights if inputs.weights else 'random init'}), "
                 f"{len(sets['labelled'])} labelled / {len(sets['val'])} validation tiles, bands {', '.join(spec.bands)}")
    model = build_model(cfg.model, cfg.data.num_classes, inputs, len(spec.bands))
    method = build_method(cfg, model, build_loss(cfg.loss, cfg.data.num_classes))
    if engine.is_main:
        write_model_card(engine.run_dir, cfg.model, cfg.data, inputs, cfg.method, method.eval_prefix)

    loaders = {"labelled": LoaderSpec(sets["labelled"], cfg.data.batch_size)}
    final = engine.fit(method, loaders, cfg.optim, evaluate=make_evaluate(sets["val"], cfg.data, cfg.eval, spec))
    metric = cfg.trainer.best_metric
    if metric and "last" in final:
        engine.print(f"validation {metric}: last {final['last'].get(metric, float('nan')):.2f} "
                     f"(step {final['last']['step']}), best {final['best'].get(metric, float('nan')):.2f} "
                     f"(step {final['best']['step']})")
    return engine.finish({"method": cfg.method, "weights_init": inputs.weights})


if __name__ == "__main__":
    main()
