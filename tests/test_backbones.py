"""timm backbone factories, weight loading with key mapping, first-conv band mapping. No hub downloads."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from common.backbones import (
    FeatureBackbone,
    ViTBackbone,
    WeightLoadError,
    adapt_first_conv,
    create_backbone,
    create_embedding_backbone,
    load_backbone_weights,
)
from common.errors import UserInputError

torch.set_num_threads(1)

TINY_VGG = {"mlp_ratio": 1 / 64}  # shrinks VGG's fc6/fc7 (unused by the feature model) so the test stays fast


def _save(state: dict, path) -> str:
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return str(path)


@pytest.mark.parametrize(
    "arch,output_stride,in_chans,kw",
    [
        ("resnet18", 16, 4, {}),
        ("resnet18", 8, 2, {}),
        ("resnet10t", 16, 12, {}),
        ("convnext_atto", 8, 4, {}),
        ("efficientnet_b0", 16, 2, {}),
        ("regnetx_002", 8, 12, {}),
        ("vgg11", 8, 4, TINY_VGG),
        ("vgg11", 16, 4, TINY_VGG),
    ],
)
def test_cnn_feature_shapes_match_feature_info(arch, output_stride, in_chans, kw):
    backbone = create_backbone(arch, in_chans, features_only=True, output_stride=output_stride, **kw)
    assert isinstance(backbone, FeatureBackbone)
    assert backbone.output_stride == output_stride
    with torch.no_grad():
        feats = backbone(torch.randn(2, in_chans, 64, 64))
    assert [f.shape[1] for f in feats] == backbone.channels
    assert [64 // f.shape[-1] for f in feats] == backbone.reductions
    assert max(backbone.reductions) == output_stride


def test_channels_last_features_are_permuted_to_nchw():
    backbone = create_backbone("mambaout_femto", 3, features_only=True)
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == backbone.channels
    assert [64 // f.shape[-1] for f in feats] == backbone.reductions


@pytest.mark.parametrize("size", [32, 64, 48])
def test_vit_single_stride_dynamic_size(size):
    backbone = create_backbone("vit_tiny_patch16_224", 12, features_only=True, out_indices=(7, 11))
    assert isinstance(backbone, ViTBackbone)
    assert backbone.reductions == [16, 16] and backbone.channels == [192, 192]
    with torch.no_grad():
        feats = backbone(torch.randn(2, 12, size, size))
    assert [tuple(f.shape) for f in feats] == [(2, 192, size // 16, size // 16)] * 2


def test_unsupported_output_stride_lists_families():
    with pytest.raises(ValueError, match="resnet.*convnext.*efficientnet"):
        create_backbone("efficientvit_b0", 3, features_only=True, output_stride=8)
    with pytest.raises(ValueError, match="patch size"):
        create_backbone("vit_tiny_patch16_224", 3, features_only=True, output_stride=8)
    with pytest.raises(ValueError, match="supported values"):
        create_backbone("resnet18", 3, features_only=True, output_stride=4)


def test_hub_and_unknown_names_refused():
    with pytest.raises(ValueError, match="pretrained_file"):
        create_backbone("resnet18", 3, features_only=True, pretrained=True)
    with pytest.raises(ValueError, match="unknown timm architecture.*resnet"):
        create_backbone("resnet_does_not_exist", 3)


def test_embedding_backbone_pools_any_size():
    cnn = create_embedding_backbone("resnet10t", 4)
    assert cnn.embed_dim == 512
    assert cnn(torch.randn(2, 4, 32, 32)).shape == (2, 512)
    assert create_backbone("resnet10t", 4)(torch.randn(2, 4, 32, 32)).shape == (2, 512)  # plain, num_classes=0
    vit = create_embedding_backbone("vit_tiny_patch16_224", 2)
    assert vit.embed_dim == 192
    with torch.no_grad():
        assert vit(torch.randn(2, 2, 32, 32)).shape == vit(torch.randn(2, 2, 64, 64)).shape == (2, 192)


@pytest.mark.parametrize(
    "output_stride,reductions",
    [(None, [2, 2, 4, 8, 16]), (16, [2, 2, 4, 8, 16]), (8, [2, 2, 4, 8, 8])],  # timm: [2, 4, 8, 16, 32 / 16 / 8]
)
def test_stem_pool_false_halves_every_stride_after_the_pool(output_stride, reductions):
    backbone = create_backbone("test_resnet", 3, features_only=True, output_stride=output_stride, stem_pool=False)
    assert isinstance(backbone.model.maxpool, torch.nn.Identity) and backbone.stem_pool is False
    assert backbone.reductions == reductions and backbone.output_stride == reductions[-1]
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 32, 32))
    assert [f.shape[-1] for f in feats] == [32 // r for r in reductions]  # e.g. 16, 16, 8, 4, 2
    assert [f.shape[1] for f in feats] == backbone.channels


def test_stem_pool_false_refuses_stride_32():
    with pytest.raises(UserInputError, match=r"output_stride=32 and model.stem_pool=false.*at most 16"):
        create_backbone("test_resnet", 3, features_only=True, output_stride=32, stem_pool=False)
    with pytest.raises(UserInputError, match=r"output_stride=32 and model.stem_pool=false"):
        create_backbone("test_resnet", 3, output_stride=32, stem_pool=False)


@pytest.mark.parametrize("arch,family", [("efficientnet_b0", "efficientnet"),
                                         ("vit_tiny_patch16_224", "vision_transformer")])
def test_stem_pool_false_refuses_models_without_the_pool(arch, family):
    message = (rf"model.stem_pool=false .* {arch} \(timm family '{family}'\) has none: set model.stem_pool=true, or "
               r"use a ResNet")
    with pytest.raises(UserInputError, match=message):
        create_backbone(arch, 3, features_only=True, output_stride=None, stem_pool=False)
    with pytest.raises(UserInputError, match=message):
        create_embedding_backbone(arch, 3, stem_pool=False)


def test_stem_pool_changes_no_parameter(tmp_path):
    """Same keys and shapes with and without the pool: weights load strictly both ways, exports included."""
    with_pool = create_backbone("test_resnet", 3, features_only=True)
    without = create_backbone("test_resnet", 3, features_only=True, stem_pool=False)
    a, b = with_pool.state_dict(), without.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    without.load_state_dict(a, strict=True)
    with_pool.load_state_dict(b, strict=True)
    plain = timm.create_model("test_resnet", num_classes=0, in_chans=3)
    path = _save(plain.state_dict(), tmp_path / "backbone.safetensors")
    report = load_backbone_weights(create_backbone("test_resnet", 3, features_only=True, stem_pool=False), path)
    assert report.loaded == len(b) and not report.missing and not report.unexpected
    assert create_embedding_backbone("test_resnet", 3, stem_pool=False).state_dict().keys() == plain.state_dict().keys()


def test_stem_pool_false_is_timm_with_an_identity_maxpool(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("test_resnet", num_classes=0, in_chans=4)
    path = _save(reference.state_dict(), tmp_path / "backbone.safetensors")
    reference.maxpool = torch.nn.Identity()  # what the export's load_with tells a timm user to do
    reference.eval()
    x = torch.randn(2, 4, 24, 24)  # a DINO local crop: 1x1 features with the pool, 2x2 without
    embedding = create_embedding_backbone("test_resnet", 4, pretrained_file=path, stem_pool=False).eval()
    plain = create_backbone("test_resnet", 4, pretrained_file=path, stem_pool=False).eval()
    features = create_backbone("test_resnet", 4, features_only=True, pretrained_file=path, stem_pool=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(embedding(x), reference(x))
        torch.testing.assert_close(plain(x), reference(x))
        torch.testing.assert_close(features(x)[-1], reference.forward_features(x))
        assert reference.forward_features(x).shape[-1] == 2


@pytest.mark.parametrize("arch", ["resnet10t", "convnext_atto"])  # names kept / flattened (stages.0 -> stages_0)
def test_plain_export_loads_strictly_into_feature_model(tmp_path, arch):
    torch.manual_seed(0)
    plain = timm.create_model(arch, num_classes=0, in_chans=4).eval()
    path = _save(plain.state_dict(), tmp_path / "backbone.safetensors")
    backbone = create_backbone(arch, 4, features_only=True, pretrained_file=path).eval()
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        assert torch.allclose(backbone(x)[-1], plain.forward_features(x), atol=1e-5)
    report = load_backbone_weights(backbone, path)
    assert report.loaded == len(backbone.state_dict()) and not report.missing and not report.unexpected
    if arch == "convnext_atto":
        assert set(report.pruned) == {"head.norm.weight", "head.norm.bias"}  # the final norm lives in the head


def test_vit_export_loads_into_vit_backbone(tmp_path):
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=3, dynamic_img_size=True).eval()
    path = _save(plain.state_dict(), tmp_path / "vit.safetensors")
    backbone = create_backbone("vit_tiny_patch16_224", 3, features_only=True, pretrained_file=path).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        expected = plain.forward_intermediates(x, indices=[11], norm=True, intermediates_only=True)[0]
        assert torch.allclose(backbone(x)[0], expected, atol=1e-5)


def test_mismatched_weights_raise_with_key_lists(tmp_path):
    backbone = create_backbone("resnet18", 3, features_only=True)
    other = _save(timm.create_model("resnet10t", num_classes=0).state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(WeightLoadError, match=r"missing keys \[.*layer1\.1\.conv1\.weight"):
        load_backbone_weights(backbone, other)

    good = timm.create_model("resnet18", num_classes=0).state_dict()
    extra = _save({**good, "foo.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(WeightLoadError, match=r"unexpected keys \[foo\.weight\]"):
        load_backbone_weights(backbone, extra)
    assert load_backbone_weights(backbone, extra, allow_unexpected=("foo",)).unexpected == ["foo.weight"]

    with_head = _save(timm.create_model("resnet18", num_classes=10).state_dict(), tmp_path / "head.safetensors")
    with pytest.raises(WeightLoadError, match=r"fc\.weight"):
        load_backbone_weights(backbone, with_head)
    assert set(load_backbone_weights(backbone, with_head, allow_unexpected=("classifier",)).unexpected) == {
        "fc.weight", "fc.bias"}

    partial = _save({k: v for k, v in good.items() if not k.startswith("layer4.")}, tmp_path / "partial.safetensors")
    with pytest.raises(WeightLoadError, match=r"missing keys"):
        load_backbone_weights(backbone, partial)
    with pytest.warns(UserWarning, match="non-strictly"):
        load_backbone_weights(backbone, partial, strict=False)


def test_pth_is_read_with_weights_only_and_bands_mapped(tmp_path):
    plain = timm.create_model("resnet10t", num_classes=0, in_chans=3)
    path = tmp_path / "rgb.pth"
    torch.save({"state_dict": plain.state_dict()}, path)
    backbone = create_backbone("resnet10t", 4, features_only=True)
    with pytest.raises(WeightLoadError, match="band_map"):
        load_backbone_weights(backbone, path)
    report = load_backbone_weights(backbone, path, band_map=(("B04", "B03", "B02"), ("B02", "B03", "B04", "B08")))
    assert report.bands.mapped == ("B02", "B03", "B04") and report.bands.initialised == ("B08",)
    w_src = plain.state_dict()["conv1.0.weight"]
    w_dst = backbone.state_dict()["model.conv1.0.weight"]
    assert torch.allclose(w_dst[:, 0], w_src[:, 2] * 3 / 4)  # B02 copied, scaled by 3/4
    assert torch.allclose(w_dst[:, 3], w_src.mean(1) * 3 / 4)  # B08 from the mean kernel


def test_adapt_first_conv_hand_values():
    w = torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)
    state = {"conv1.weight": w, "conv1.bias": torch.tensor([0.5])}

    # Reorder + two new bands: kernel [w_b, w_a, mean, mean] * 2/4, its sum (6) preserved.
    new, info = adapt_first_conv(state, ["a", "b"], ["b", "a", "c", "d"], "conv1")
    assert new["conv1.weight"].flatten().tolist() == [2.0, 1.0, 1.5, 1.5]
    assert info.mapped == ("b", "a") and info.initialised == ("c", "d") and info.dropped == () and info.scale == 0.5
    assert new["conv1.bias"] is state["conv1.bias"] and state["conv1.weight"] is w  # input untouched

    # Subset: one band kept, scaled by 2/1.
    new, info = adapt_first_conv(state, ["a", "b"], ["a"], "conv1.weight")
    assert new["conv1.weight"].flatten().tolist() == [4.0] and info.dropped == ("b",)

    # Same bands, same order: unchanged. Without rescale: plain copy and mean.
    new, _ = adapt_first_conv(state, ["a", "b"], ["a", "b"], "conv1")
    assert torch.equal(new["conv1.weight"], w)
    new, _ = adapt_first_conv(state, ["a", "b"], ["x", "b"], "conv1", rescale=False)
    assert new["conv1.weight"].flatten().tolist() == [3.0, 4.0]

    with pytest.raises(ValueError, match="duplicate"):
        adapt_first_conv(state, ["a", "a"], ["a"], "conv1")
    with pytest.raises(ValueError, match="shape"):
        adapt_first_conv(state, ["a", "b", "c"], ["a"], "conv1")
    with pytest.raises(KeyError, match="stem"):
        adapt_first_conv(state, ["a", "b"], ["a"], "stem.0")
