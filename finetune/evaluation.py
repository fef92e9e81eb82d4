"""Evaluation of a segmenter during fine-tuning: the confusion matrix (mIoU, per-class IoU/F1, OA) over every process's
shard of each named validation set, SpaceNet building F1, and the input / ground truth / prediction images logged to
TensorBoard.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from common.bands import (
    IGNORE_INDEX,
    SensorSpec,
)
from finetune.metrics import BuildingF1, ConfusionMatrix
from finetune.inference import sliding_window_inference

from finetune.config import EvalConfig, SegDataConfig

__all__ = ["PALETTE", "colorize", "false_colour", "predict_logits", "make_evaluate", "make_multi_evaluate"]


# Colours for class maps in TensorBoard (demo classes: water, forest, cropland, grassland, built-up, bare soil).
PALETTE = np.array([
    [31, 120, 180], [27, 94, 32], [240, 200, 40], [150, 220, 90], [200, 30, 30], [150, 110, 70],
    [128, 0, 128], [0, 200, 200], [255, 127, 0], [90, 90, 90], [255, 255, 255], [0, 0, 0],
], dtype=np.uint8)


def colorize(mask: np.ndarray) -> np.ndarray:
    out = PALETTE[np.asarray(mask, np.int64) % len(PALETTE)]  # cycles for more classes than colours
    out[mask == IGNORE_INDEX] = 0
    return out


def false_colour(image: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """(C, H, W) normalised -> (H, W, 3) uint8 with a 2-98 % stretch per channel."""
    x = image[list(rgb)].astype(np.float32)
    lo, hi = np.percentile(x.reshape(3, -1), (2, 98), axis=1)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.clip((x - lo[:, None, None]) / span[:, None, None] * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def predict_logits(net: nn.Module, x: torch.Tensor, ev: EvalConfig, num_classes: int) -> torch.Tensor:
    if ev.window is not None and max(x.shape[-2:]) > ev.window:
        return sliding_window_inference(lambda t: net(t).logits, x, ev.window, ev.overlap, num_classes,
                                        batch_size=ev.batch_size)
    return net(x).logits.float()


def make_evaluate(val_ds, data: SegDataConfig, ev: EvalConfig, spec: SensorSpec):
    """``evaluate(method, engine) -> metrics``: confusion matrix over this process's shard of the validation set,
    summed over processes (every tile counted once), plus the instance F1 of buildings when configured."""
    names = list(data.class_names) if data.class_names else None

    def evaluate(method: nn.Module, engine) -> dict[str, float]:
        net = method.eval_model
        device = engine.device
        cm = ConfusionMatrix(data.num_classes, class_names=names, device=device)
        bf1 = BuildingF1() if ev.building_f1 else None
        shown: list[np.ndarray] = []
        for batch in engine.eval_loader(val_ds, ev.batch_size):
            x = batch["image"].to(device)
            y = batch["mask"].to(device)
            with engine.accelerator.autocast():
                logits = predict_logits(net, x, ev, data.num_classes)
            pred = logits.argmax(1)
            cm.update(pred, y, batch["valid"].to(device))
            if bf1 is not None:
                for p, t in zip(pred.cpu().numpy(), y.cpu().numpy()):
                    bf1.update(p == ev.foreground_class, t == ev.foreground_class)
            if engine.is_main and len(shown) < ev.num_images:
                for i in range(min(x.shape[0], ev.num_images - len(shown))):
                    row = [false_colour(x[i].cpu().numpy(), spec.rgb_indices()), colorize(y[i].cpu().numpy()),
                           colorize(pred[i].cpu().numpy())]
                    shown.append(np.concatenate(row, axis=1))
        metrics = cm.reduce(engine.accelerator).compute()
        metrics = {k: (100.0 * v if k.split("/")[0] in ("mIoU", "mF1", "OA", "IoU", "F1") else v)
                   for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
        if bf1 is not None:
            counts = bf1.reduce(engine.accelerator).as_dict()
            metrics.update({f"building_{k}": 100.0 * v if k in ("precision", "recall", "f1") else float(v)
                            for k, v in counts.items()})
        if shown:
            engine.log_images({"val/input_gt_pred": np.concatenate(shown, axis=0)},
                              getattr(engine, "current_step", 0))
        return metrics

    return evaluate


def make_multi_evaluate(sets: dict[str, Any], data: SegDataConfig, ev: EvalConfig, spec: SensorSpec):
    """Evaluate every named validation set: ``val`` unprefixed (``mIoU``), others as ``<name>/mIoU`` (only ``val``
    logs images)."""
    fns = {name: make_evaluate(ds, data, ev if name == "val" else replace(ev, num_images=0), spec)
           for name, ds in sets.items()}

    def evaluate(method: nn.Module, engine) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, fn in fns.items():
            metrics = fn(method, engine)
            out.update(metrics if name == "val" else {f"{name}/{k}": v for k, v in metrics.items()})
        return out

    return evaluate
