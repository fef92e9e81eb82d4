"""Sliding-window inference over images larger (or smaller) than the training crop.

Windows of size ``window`` step by ``stride = floor(window * (1 - overlap))`` (at least 1); the last window of each
row/column is moved back to end flush with the image edge, so every pixel is covered and no window reads padding
when the image is at least one window large. An image smaller than the window is padded at the bottom/right
(``pad_value``, default 0 = the band mean after normalisation) and the result cropped back.

Each window's output is multiplied by a weight map and accumulated; the result is ``sum_i w_i * y_i / sum_i w_i``:

* ``"constant"``: ``w = 1`` (plain average of overlapping predictions);
* ``"gaussian"``: a separable Gaussian centred on the window with ``sigma = window * GAUSSIAN_SIGMA_SCALE`` (as
  nnU-Net), floored at ``GAUSSIAN_FLOOR`` of its peak so that corners covered by a single window keep a usable
  weight. It down-weights window borders, where a convolutional network sees the least context.

A single window covering the whole image is returned as is (no weighting round-off), so inference equals the
whole-image forward pass when the window covers the image.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F

__all__ = ["sliding_window_inference", "window_starts", "blend_weights", "GAUSSIAN_SIGMA_SCALE", "GAUSSIAN_FLOOR"]

GAUSSIAN_SIGMA_SCALE = 1.0 / 8
"""Gaussian blend: sigma as a fraction of the window size (nnU-Net's value)."""

GAUSSIAN_FLOOR = 1e-3
"""Gaussian blend: smallest weight relative to the centre."""


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: ``0, stride, 2 stride, ...`` and a last one flush with the edge."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def blend_weights(window: tuple[int, int], blend: Literal["gaussian", "constant"], device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(h, w)`` weight map of one window (peak 1)."""
    h, w = window
    if blend == "constant":
        return torch.ones(h, w, device=device, dtype=dtype)
    if blend != "gaussian":
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")

    def axis(n: int) -> torch.Tensor:
        sigma = n * GAUSSIAN_SIGMA_SCALE
        x = torch.arange(n, device=device, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-0.5 * (x / sigma) ** 2)

    weights = axis(h)[:, None] * axis(w)[None, :]
    weights = weights / weights.max()
    return weights.clamp_min(GAUSSIAN_FLOOR).to(dtype)


@torch.no_grad()
def sliding_window_inference(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    window: int | tuple[int, int],
    overlap: float,
    num_classes: int,
    blend: Literal["gaussian", "constant"] = "gaussian",
    batch_size: int = 4,
    *,
    probs: bool = False,
    pad_value: float = 0.0,
    out_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Predict a whole image window by window and blend the overlaps.

    Args:
        model_fn: ``(N, C, h, w) -> (N, K, h, w)`` logits at window resolution (e.g. ``lambda x: model(x).logits``);
            called under ``torch.no_grad``; wrap it in autocast yourself if wanted.
        image: ``(B, C, H, W)``.
        window: window size ``h`` (square) or ``(h, w)``.
        overlap: fraction of the window shared by neighbouring windows, in ``[0, 1)``.
        num_classes: K.
        blend: ``"gaussian"`` or ``"constant"`` weights.
        batch_size: windows per model call (times B images; at least one window per call).
        probs: softmax each window's logits before blending (returns averaged probabilities).
        pad_value: fill value when the image is smaller than the window.
        out_device: where the ``(B, K, H, W)`` accumulator lives (default: the image's device).

    Returns:
        ``(B, K, H, W)`` float32 blended logits (or probabilities with ``probs=True``).
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got {tuple(image.shape)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wh, ww = _pair(window)
    b, _, h, w = image.shape
    pad_h, pad_w = max(wh - h, 0), max(ww - w, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=pad_value)
    H, W = image.shape[-2:]
    stride_h = max(1, int(math.floor(wh * (1 - overlap))))
    stride_w = max(1, int(math.floor(ww * (1 - overlap))))
    boxes = [(y, x) for y in window_starts(H, wh, stride_h) for x in window_starts(W, ww, stride_w)]
    device = torch.device(out_device) if out_device is not None else image.device

    def run(crops: torch.Tensor) -> torch.Tensor:
        out = model_fn(crops)
        if out.shape[1] != num_classes or out.shape[-2:] != crops.shape[-2:]:
            raise ValueError(f"model_fn returned {tuple(out.shape)} for windows {tuple(crops.shape)}; expected "
                             f"(N, {num_classes}, {wh}, {ww})")
        out = out.float()
        return out.softmax(dim=1) if probs else out

    if len(boxes) == 1:
        return run(image)[..., :h, :w].to(device)

    weight = blend_weights((wh, ww), blend, device=device)  # (wh, ww)
    acc = torch.zeros(b, num_classes, H, W, device=device, dtype=torch.float32)
    norm = torch.zeros(1, 1, H, W, device=device, dtype=torch.float32)
    per_call = max(1, batch_size // b)
    for i in range(0, len(boxes), per_call):
        chunk = boxes[i:i + per_call]
        crops = torch.cat([image[:, :, y:y + wh, x:x + ww] for y, x in chunk])  # (len(chunk) * B, C, wh, ww)
        out = run(crops).to(device)
        for j, (y, x) in enumerate(chunk):
            acc[:, :, y:y + wh, x:x + ww] += out[j * b:(j + 1) * b] * weight
            norm[:, :, y:y + wh, x:x + ww] += weight
    return (acc / norm)[..., :h, :w]
