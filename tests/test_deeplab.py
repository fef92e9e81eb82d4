"""DeepLab v2/v3/v3+: shapes and strides over backbones x bands, one backward, head structure, method hooks."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from common.backbones import create_backbone
from finetune.deeplab import ASPP, ASPPv2, DeepLab, SegmenterOutput, create_segmenter

torch.set_num_threads(1)
K = 5


@pytest.mark.parametrize(
    "arch,version,output_stride,in_chans,size",
    [
        ("resnet18", "v3+", 16, 4, 64),
        ("resnet18", "v2", 8, 2, 32),
        ("resnet10t", "v3", 8, 12, 64),
        ("resnet10t", "v3+", 8, 2, 32),
        ("efficientnet_b0", "v3+", 8, 12, 32),
        ("mobilenetv3_small_100", "v3", 16, 4, 64),
        ("convnext_atto", "v3+", 16, 4, 64),
        ("convnext_atto", "v2", 8, 12, 32),
        ("regnetx_002", "v3", 16, 2, 32),
        ("vit_tiny_patch16_224", "v3", 16, 12, 64),
        ("vit_tiny_patch16_224", "v2", 16, 2, 32),
    ],
)
def test_shapes_strides_and_backward(arch, version, output_stride, in_chans, size):
    torch.manual_seed(0)
    model = create_segmenter(arch, version, K, in_chans, output_stride=output_stride, aux=True)
    x = torch.randn(2, in_chans, size, size)
    out = model(x, return_features=True)
    assert isinstance(out, SegmenterOutput)
    assert out.logits.shape == out.aux.shape == (2, K, size, size)
    deepest = out.features[-1]
    assert deepest.shape[-1] == size // output_stride == size // model.backbone.output_stride
    assert [f.shape[1] for f in out.features] == model.backbone.channels
    stride = 4 if version == "v3+" else output_stride
    assert out.decoder_input.shape[-2:] == (size // stride, size // stride)
    loss = out.logits.logsumexp(1).mean() + 0.4 * out.aux.logsumexp(1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.model.state_dict()  # backbone parameters live under "backbone."
    assert any(n.startswith("backbone.") for n, _ in model.named_parameters())


def test_vgg_dilated_deeplab_v2():
    model = create_segmenter("vgg11", "v2", K, 4, output_stride=8, backbone_kwargs={"mlp_ratio": 1 / 64})
    out = model(torch.randn(2, 4, 32, 32), return_features=True)
    assert out.logits.shape == (2, K, 32, 32) and out.features[-1].shape[-1] == 4


def test_eval_without_aux_and_without_features():
    model = create_segmenter("resnet10t", "v3+", K, 3, aux=True).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
        assert out.aux is None and out.features is None and out.decoder_input is None
        assert model(torch.randn(1, 3, 32, 32), return_aux=True).aux.shape == (1, K, 32, 32)


def test_rates_follow_output_stride():
    assert create_segmenter("resnet10t", "v3", K, 3, output_stride=16).atrous_rates == (6, 12, 18)
    assert create_segmenter("resnet10t", "v3", K, 3, output_stride=8).atrous_rates == (12, 24, 36)
    assert create_segmenter("resnet10t", "v2", K, 3, output_stride=8).atrous_rates == (6, 12, 18, 24)
    assert create_segmenter("resnet10t", "v2", K, 3, output_stride=16).atrous_rates == (3, 6, 9, 12)
    assert create_segmenter("resnet10t", "v2", K, 3, atrous_rates=(1, 2, 3, 4)).atrous_rates == (1, 2, 3, 4)


def test_aspp_branch_shapes():
    aspp = ASPP(8, rates=(1, 2, 3), out_channels=4, dropout=0.0)
    x = torch.randn(2, 8, 5, 7)
    branches = aspp.branch_outputs(x)
    assert len(branches) == 5  # 1x1, three atrous, image pooling
    assert all(b.shape == (2, 4, 5, 7) for b in branches)
    # image pooling is constant over space
    assert torch.allclose(branches[-1], branches[-1][..., :1, :1].expand_as(branches[-1]))
    assert aspp(x).shape == (2, 4, 5, 7)


def test_v2_sums_all_four_branches():
    torch.manual_seed(0)
    head = ASPPv2(6, 3, rates=(1, 2, 3, 4))
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        singles = [b(x) for b in head.branches]
        out = head(x)
        assert torch.allclose(out, sum(singles), atol=1e-6)
        for i, branch in enumerate(head.branches):  # every branch changes the output
            saved = branch.weight.clone()
            branch.weight.zero_()
            branch.bias.zero_()
            assert torch.allclose(head(x), out - singles[i], atol=1e-6), f"branch {i} not summed"
            assert not torch.allclose(head(x), out)
            branch.weight.copy_(saved)


def test_encode_decode_and_perturbation_hooks():
    torch.manual_seed(0)
    model = create_segmenter("resnet10t", "v3+", K, 3, aux=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model(x, return_features=True)
        feats = model.encode(x)
        again = model.decode(feats)
        assert torch.allclose(full.logits, again.logits) and torch.allclose(full.decoder_input, again.decoder_input)
        # PS-MT: perturb the fused decoder feature. A zeroed feature leaves only the classifier bias.
        seen = []
        zeroed = model.decode(feats, perturb=lambda z: seen.append(z.shape) or torch.zeros_like(z))
        assert seen == [full.decoder_input.shape]
        bias = model.head.classifier.bias.view(1, K, 1, 1).expand_as(zeroed.logits)
        assert torch.allclose(zeroed.logits, bias, atol=1e-6)
        # UniMatch: drop channels of the features the head reads, clean and perturbed copies in one batch.
        drop = torch.nn.Dropout2d(0.5).train()
        used = set(model.used_features)
        assert used == {1, 3, 4}  # layer1 (stride 4), layer3 (aux), layer4
        mixed = [torch.cat([f, drop(f)]) if i in used else torch.cat([f, f]) for i, f in enumerate(feats)]
        out = model.decode(mixed, size=x.shape[-2:])
        assert out.logits.shape == (4, K, 64, 64)
        assert torch.allclose(out.logits[:2], full.logits, atol=1e-5)


def test_decoder_widths_come_from_feature_info():
    backbone = create_backbone("efficientnet_b0", 3, features_only=True, output_stride=16)
    model = DeepLab("v3+", backbone, K)
    assert model.head.aspp.branches[0][0].in_channels == backbone.channels[-1] == 320
    assert model.head.low_project[0].in_channels == backbone.channels[1] == 24


def test_errors():
    with pytest.raises(ValueError, match="v3\\+.*stride"):
        create_segmenter("vit_tiny_patch16_224", "v3+", K, 3)
    with pytest.raises(ValueError, match="valid"):
        create_segmenter("resnet10t", "v4", K, 3)


@pytest.mark.parametrize("output_stride,deepest", [(16, 2), (8, 4)])
def test_v3plus_without_stem_pool_fuses_layer2(output_stride, deepest):
    """Without the stem max-pool the stride-4 feature is layer2 (index 2 of act1, layer1..4), not layer1."""
    model = create_segmenter("test_resnet", "v3+", K, 3, output_stride=output_stride, aux=True, stem_pool=False)
    assert model.backbone.reductions[model.low_index] == 4 and model.low_index == 2
    assert model.backbone.output_stride == output_stride
    out = model(torch.randn(2, 3, 32, 32), return_features=True)
    assert out.logits.shape == out.aux.shape == (2, K, 32, 32)
    assert out.features[-1].shape[-1] == deepest and out.decoder_input.shape[-2:] == (8, 8)


def test_pretrained_backbone_with_band_mapping(tmp_path):
    plain = timm.create_model("resnet10t", num_classes=0, in_chans=3)
    path = tmp_path / "export.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    model = create_segmenter("resnet10t", "v3", K, 4, pretrained_file=str(path),
                             band_map=(("B04", "B03", "B02"), ("B02", "B03", "B04", "B08")))
    loaded = model.backbone.model.layer4[0].conv1.weight
    assert torch.equal(loaded, plain.layer4[0].conv1.weight)
