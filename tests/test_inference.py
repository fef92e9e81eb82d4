"""Sliding-window inference: coverage, padding, and equality with whole-image inference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.deeplab import create_segmenter
from finetune.inference import blend_weights, sliding_window_inference, window_starts

torch.set_num_threads(1)
K = 3


def _pointwise_net(in_chans: int = 4) -> nn.Module:
    """A fully convolutional, translation-equivariant net with no spatial context (1x1 convs)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(in_chans, 8, 1), nn.ReLU(), nn.Conv2d(8, K, 1)).eval()


def test_window_starts_are_flush_with_the_edges():
    assert window_starts(40, 16, 8) == [0, 8, 16, 24]
    assert window_starts(41, 16, 8) == [0, 8, 16, 24, 25]
    assert window_starts(16, 16, 8) == [0]
    assert window_starts(10, 16, 8) == [0]


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("shape", [(40, 56), (33, 47)])
def test_equals_whole_image_for_a_pointwise_net(blend, shape):
    net = _pointwise_net()
    image = torch.randn(2, 4, *shape)
    with torch.no_grad():
        whole = net(image)
    out = sliding_window_inference(net, image, window=16, overlap=0.5, num_classes=K, blend=blend, batch_size=3)
    assert out.shape == whole.shape
    assert torch.allclose(out, whole, atol=1e-5)


def test_constant_blend_of_equal_logits_is_exact():
    # stride 8, window 16, 32 px: every pixel is covered by 1 or 2 windows, so (y + y) / 2 == y exactly
    net = _pointwise_net()
    image = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        whole = net(image)
    out = sliding_window_inference(net, image, window=16, overlap=0.5, num_classes=K, blend="constant")
    assert torch.equal(out, whole)


def test_window_covering_the_image_equals_the_forward_pass():
    model = create_segmenter("resnet10t", "v3+", K, 4).eval()
    image = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        whole = model(image).logits
    out = sliding_window_inference(lambda x: model(x).logits, image, window=32, overlap=0.25, num_classes=K)
    assert torch.equal(out, whole)


def test_image_smaller_than_window_is_padded_and_cropped():
    net = _pointwise_net()
    image = torch.randn(2, 4, 20, 24)
    with torch.no_grad():
        whole = net(image)
    out = sliding_window_inference(net, image, window=(32, 16), overlap=0.5, num_classes=K)
    assert out.shape == (2, K, 20, 24)
    assert torch.allclose(out, whole, atol=1e-5)


def test_probabilities_and_errors():
    net = _pointwise_net()
    image = torch.randn(1, 4, 40, 40)
    probs = sliding_window_inference(net, image, window=16, overlap=0.25, num_classes=K, probs=True)
    assert torch.allclose(probs.sum(1), torch.ones(1, 40, 40), atol=1e-5)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(net, image, window=16, overlap=1.0, num_classes=K)
    with pytest.raises(ValueError, match="returned"):
        sliding_window_inference(net, image, window=16, overlap=0.5, num_classes=K + 1)
    w = blend_weights((16, 16), "gaussian")
    assert w.max() == 1.0 and w.min() > 0 and w[0, 0] < w[8, 8]
