"""Fine-tune a DeepLab segmenter from a few labelled and many unlabelled tiles.

    accelerate launch finetune/semisup.py --config configs/finetune/demo.yaml --output-dir runs/finetune \
        [method=supervised] [model.weights=runs/pretrain/backbone.safetensors] [key=value ...]

The top-level key ``method`` picks the training method (``finetune/methods/``, one file each); ``data``/``model``/
``loss``/``augment``/``optim``/``trainer``/``eval`` are shared by all methods and each method has its own section.
The backbone comes from an export of ``ssl/export.py`` (bands and normalisation checked against the data), a timm
``state_dict`` file, a previous run (``model.init_from``) or random init. Evaluation runs every
``trainer.eval_every`` steps and at the end; ``metrics.json`` reports the last and the best evaluation
(``trainer.best_metric``), ``checkpoints/last.safetensors`` and ``best.safetensors`` hold the weights and
``model.json`` what ``finetune/predict.py`` needs.
"""

from __future__ import annotations

from typing import Any

from common.errors import cli_entry
from finetune.methods import methods_for
from finetune.training import finetune_config_class, run

__all__ = ["FinetuneConfig", "METHODS", "main"]

TASK = "semisup"
FinetuneConfig = finetune_config_class(TASK)
METHODS = tuple(methods_for(TASK))


@cli_entry
def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(TASK, argv, __doc__.split("\n\n")[0], prog="finetune/semisup.py")


if __name__ == "__main__":
    main()
