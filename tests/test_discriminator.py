"""finetune/discriminator.py: the fully-convolutional discriminator (released architecture, configurable widths and
slope, output shapes), the source 0 / target 1 label convention, and the nodata-weighted BCE on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from finetune.discriminator import (
    SOURCE_LABEL,
    TARGET_LABEL,
    DiscriminatorConfig,
    FCDiscriminator,
    bce_to_label,
    default_discriminator_optim,
    discriminator_output_size,
    masked_input,
    valid_fraction,
)


def test_released_architecture_and_output_shapes():
    d = FCDiscriminator(6)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) and c.bias is not None
               for c in convs)
    assert convs[0].in_channels == 6
    slopes = [m.negative_slope for m in d.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.2] * 4
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())  # no normalisation
    for size in ((64, 64), (32, 32), (96, 64), (50, 70)):
        out = d(torch.randn(2, 6, *size))
        assert out.shape == (2, 1, *discriminator_output_size(size)), size
    assert discriminator_output_size((64, 64)) == (2, 2) and discriminator_output_size((32, 32)) == (1, 1)


def test_configurable_widths_and_slope():
    cfg = DiscriminatorConfig(channels=(8, 16), negative_slope=0.1, kernel_size=3, stride=2, padding=1)
    d = FCDiscriminator(3, cfg)
    assert [c.out_channels for c in d.modules() if isinstance(c, nn.Conv2d)] == [8, 16, 1]
    assert [m.negative_slope for m in d.modules() if isinstance(m, nn.LeakyReLU)] == [0.1, 0.1]
    out = d(torch.randn(1, 3, 16, 16))
    assert out.shape == (1, 1, 2, 2) == (1, 1, *discriminator_output_size((16, 16), cfg))
    for bad in (dict(channels=()), dict(channels=(0,)), dict(negative_slope=-0.1), dict(stride=0)):
        with pytest.raises(ValueError, match="discriminator"):
            DiscriminatorConfig(**bad).validate()


def test_label_convention_and_bce_by_hand():
    assert SOURCE_LABEL == 0.0 and TARGET_LABEL == 1.0
    zero = torch.zeros(2, 1, 2, 2)
    assert math.isclose(float(bce_to_label(zero, SOURCE_LABEL)), math.log(2), rel_tol=1e-6)
    big = torch.full((1, 1, 1, 1), 20.0)  # a confident "target" verdict
    assert float(bce_to_label(big, TARGET_LABEL)) < 1e-8 and math.isclose(float(bce_to_label(big, SOURCE_LABEL)),
                                                                           20.0, rel_tol=1e-6)
    # weighted mean over cells: logits (0, 2) against label 1 with weights (1, 0) -> only the first cell, ln 2
    d = torch.tensor([0.0, 2.0]).view(2, 1, 1, 1)
    w = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
    assert math.isclose(float(bce_to_label(d, TARGET_LABEL, w)), math.log(2), rel_tol=1e-6)
    # weights (1, 3): (ln 2 + 3 ln(1 + e^-2)) / 4
    w = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    want = (math.log(2) + 3 * math.log(1 + math.exp(-2))) / 4
    assert math.isclose(float(bce_to_label(d, TARGET_LABEL, w)), want, rel_tol=1e-6)
    # nothing valid: 0, graph kept
    d = torch.zeros(1, 1, 1, 1, requires_grad=True)
    loss = bce_to_label(d, SOURCE_LABEL, torch.zeros(1, 1, 1, 1))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(d.grad.abs().sum()) == 0.0


def test_valid_fraction_and_masked_input_by_hand():
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, :2, :2] = False  # top-left quadrant nodata
    valid[0, 2, 2] = False  # one pixel of the bottom-right quadrant
    frac = valid_fraction(valid, (2, 2), 1)
    assert torch.equal(frac, torch.tensor([[[[0.0, 1.0], [1.0, 0.75]]]]))
    assert torch.equal(valid_fraction(None, (1, 3), 2), torch.ones(2, 1, 1, 3))
    x = torch.ones(1, 2, 4, 4)
    y = masked_input(x, valid)
    assert torch.equal(y[0, 0], valid[0].float()) and torch.equal(y[0, 1], valid[0].float())
    assert masked_input(x, None) is x


def test_default_optimiser_is_the_released_adam():
    o = default_discriminator_optim()
    assert (o.name, o.lr, o.betas, o.weight_decay, o.schedule, o.poly_power, o.warmup_steps) == (
        "adamw", 1e-4, (0.9, 0.99), 0.0, "poly", 0.9, 0)
