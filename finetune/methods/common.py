"""Building blocks several methods share: pseudo-labels from a teacher, CutMix boxes and mixing, ramp-ups.

Randomness comes from an explicit ``torch.Generator`` (``ctx.generator()`` in a step: seeded by seed, step and
process rank), so the boxes are independent across processes and identical after a resume.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from common.bands import IGNORE_INDEX
from common.errors import UserInputError

__all__ = ["bn_stats_frozen", "pseudo_labels", "cutmix_masks", "mix", "sigmoid_rampup", "masked_mean", "self_information",
           "normalised_entropy", "target_entropy", "export_backbone_copy"]


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor, threshold: float = 0.0, valid: torch.Tensor | None = None,
                  ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels of teacher logits ``(B, K, H, W)``.

    Returns ``(labels, confidence, keep)``: ``labels = argmax softmax`` (``ignore_index`` where not kept),
    ``confidence = max softmax`` (float32) and ``keep = confidence >= threshold`` (and ``valid`` where given).
    """
    prob = logits.float().softmax(dim=1)
    conf, labels = prob.max(dim=1)
    keep = conf >= threshold
    if valid is not None:
        keep &= valid.bool()
    return torch.where(keep, labels, torch.full_like(labels, ignore_index)), conf, keep


def cutmix_masks(batch: int, height: int, width: int, generator: torch.Generator, p: float = 0.5,
                 area: tuple[float, float] = (0.02, 0.4), ratio: tuple[float, float] = (0.3, 1 / 0.3),
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``(B, H, W)`` CutMix masks: with probability ``p`` one axis-aligned box per sample whose area is a
    fraction in ``area`` of the image and whose aspect ratio (h / w) lies in ``ratio`` (log-uniform), placed
    uniformly inside the image (UniMatch's ``obtain_cutmix_box``); all-False otherwise. ``True`` marks the pixels
    taken from the *other* image."""
    masks = torch.zeros(batch, height, width, dtype=torch.bool)
    u = torch.rand(batch, 5, generator=generator, dtype=torch.float64)
    for i in range(batch):
        if u[i, 0] >= p:
            continue
        frac = area[0] + (area[1] - area[0]) * float(u[i, 1])
        r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * float(u[i, 2]))
        h = min(height, max(1, int(round(math.sqrt(frac * height * width * r)))))
        w = min(width, max(1, int(round(math.sqrt(frac * height * width / r)))))
        top = int(float(u[i, 3]) * (height - h + 1))
        left = int(float(u[i, 4]) * (width - w + 1))
        masks[i, top:top + h, left:left + w] = True
    return masks.to(device)


def mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``b`` where ``mask`` else ``a``; ``mask`` is ``(B, H, W)`` and broadcasts over a channel dimension of
    ``(B, C, H, W)`` tensors (images, logits) or applies directly to ``(B, H, W)`` ones (labels, confidences)."""
    m = mask if a.dim() == mask.dim() else mask.unsqueeze(1)
    return torch.where(m, b, a)


def sigmoid_rampup(step: int, length: int) -> float:
    """Laine & Aila's ramp-up ``exp(-5 (1 - t)^2)`` with ``t = step / length`` clipped to [0, 1] (1.0 for
    ``length == 0``), the consistency-weight ramp of mean teacher."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


@contextlib.contextmanager
def bn_stats_frozen(module: torch.nn.Module, frozen: bool = True) -> Iterator[None]:
    """Forward passes inside leave the BatchNorm running statistics of ``module`` as they were (momentum 0 for the
    pass: training-mode BatchNorm still normalises with the batch's statistics, and gradients are unchanged), for
    inputs that are not samples of the data the model will see at evaluation (e.g. MIC's masked images, 70 % of their
    blocks zeroed). ``frozen=False``: a no-op."""
    layers = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] if frozen else []
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum


def check_rampup_fits(key: str, length: int, total_steps: int, weight_key: str) -> None:
    """Refuse a ramp-up (config key ``key``) longer than the run: the weight ``weight_key`` would never reach its
    configured value, which a user reading the config would not expect (one message, before the first step)."""
    if length > total_steps:
        raise UserInputError(f"{key}={length} is longer than the run ({total_steps} steps): {weight_key} would never "
                             f"be reached; lower {key} to at most {total_steps}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, denominator: str = "kept") -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (``denominator="kept"``) or over every element of ``values`` (``"all"``:
    pixels not kept count as zeros; to leave out padding/nodata as UniMatch does, pass only valid pixels' values);
    0 when nothing is kept."""
    m = mask.to(values.dtype)
    total = (values * m).sum()
    if denominator == "all":
        return total / max(values.numel(), 1)
    return total / m.sum().clamp_min(1.0)


def self_information(logits: torch.Tensor) -> torch.Tensor:
    """Weighted self-information map ``-p log p / log K`` (B, K, H, W) of logits (B, K, H, W), float32, K >= 2
    (ADVENT's discriminator input; its sum over classes is the normalised entropy)."""
    k = logits.shape[1]
    if k < 2:
        raise ValueError("entropy needs at least 2 classes")
    logp = logits.float().log_softmax(1)
    return -(logp.exp() * logp) / math.log(k)


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy of ``softmax(logits)`` over ``log K``: ``(B, H, W)`` in [0, 1] (1 uniform, 0 one-hot)."""
    return self_information(logits).sum(1)


@torch.no_grad()
def target_entropy(net: torch.nn.Module, dataset, engine, batch_size: int, max_tiles: int | None = None) -> float:
    """Mean normalised entropy of ``net``'s predictions over the valid pixels of ``dataset`` (the target training
    tiles without augmentation: an unsupervised selection criterion), each process on its shard, sums all-reduced."""
    if max_tiles is not None and max_tiles < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_tiles))
    device = engine.device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in engine.eval_loader(dataset, batch_size):
        x = batch["image"].to(device)
        valid = batch["valid"].to(device).bool()
        ent = normalised_entropy(net(x).logits)
        total[0] += ent[valid].double().sum()
        total[1] += valid.sum()
    total = engine.all_reduce(total, "sum")
    return float(total[0] / total[1].clamp_min(1))


def export_backbone_copy(setup) -> torch.nn.Module | None:
    """A fresh segmenter with the export's backbone (``setup.make_model()``) when the run starts from a backbone
    export (``model.weights``), else ``None`` (random init, or ``model.init_from``). Built under a forked RNG, so
    the run's random stream is the same with and without it."""
    if setup.make_model is None or setup.weights is None or setup.init_from is not None:
        return None
    with torch.random.fork_rng(devices=[]):
        return setup.make_model()
