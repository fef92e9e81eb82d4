"""Adapt a DeepLab segmenter trained on a labelled source domain to an unlabelled target domain.

    accelerate launch finetune/uda.py --config configs/finetune/demo_uda.yaml --output-dir runs/uda \
        [method=source_only] [model.weights=runs/pretrain/backbone.safetensors] [key=value ...]

The source domain is ``data.root`` (``data.labelled_split`` with masks, ``data.val_split`` for checkpoint
selection); the target domain is ``data.target.root`` (``data.target.train_split`` without masks; with
``data.target.val_split`` its masks are evaluated as a report, ``target_val/mIoU``). The checkpoint is chosen on
``trainer.best_metric`` (source validation by default, or an unsupervised criterion a method reports); choosing it
on target labels is possible only by naming a ``target_val/`` key, and ``metrics.json`` then says
``"selection": "oracle"``. Methods live in ``finetune/methods/`` (``tasks = ("uda",)``), one file each.
"""

from __future__ import annotations

from typing import Any

from common.errors import cli_entry
from finetune.methods import methods_for
from finetune.training import finetune_config_class, run

__all__ = ["UDAConfig", "METHODS", "main"]

TASK = "uda"
UDAConfig = finetune_config_class(TASK)
METHODS = tuple(methods_for(TASK))


@cli_entry
def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(TASK, argv, __doc__.split("\n\n")[0], prog="finetune/uda.py")


if __name__ == "__main__":
    main()
