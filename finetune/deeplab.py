"""DeepLab v2, v3 and v3+ heads on timm feature backbones.

Papers:
    v2:  Chen, Papandreou, Kokkinos, Murphy, Yuille, "DeepLab: Semantic Image Segmentation with Deep Convolutional
         Nets, Atrous Convolution, and Fully Connected CRFs", TPAMI 2017 (arXiv:1606.00915).
    v3:  Chen, Papandreou, Schroff, Adam, "Rethinking Atrous Convolution for Semantic Image Segmentation",
         arXiv:1706.05587, 2017.
    v3+: Chen, Zhu, Papandreou, Schroff, Adam, "Encoder-Decoder with Atrous Separable Convolution for Semantic
         Image Segmentation", ECCV 2018.
Reference code: tensorflow/models ``research/deeplab``; torchvision ``models/segmentation/deeplabv3.py``;
AdaptSegNet (wasidennis/AdaptSegNet) ``model/deeplab.py`` for the v2 classifier used by the adaptation methods.

Structure map:
    v2   ASPP-L (paper Fig. 4): four 3x3 atrous convs, rates {6, 12, 18, 24} at output stride 8, each straight to
         K class scores, summed                                                     -> ``ASPPv2``
    v3   ASPP (paper Sec. 3.3): 1x1 conv + three 3x3 atrous convs (rates {6, 12, 18} at output stride 16, doubled
         at 8) + image pooling, each 256 ch + BN + ReLU, concatenated, 1x1 projection (BN, ReLU, dropout)
                                                                                    -> ``ASPP``
         then a 3x3 conv (BN, ReLU) and the 1x1 classifier                          -> ``DeepLabV3Head``
    v3+  v3's ASPP output upsampled to stride 4, concatenated with the stride-4 feature projected to 48 ch,
         two 3x3 convs (256 ch), classifier (paper Fig. 2)                          -> ``DeepLabV3PlusHead``
    aux  optional auxiliary head on the stage before the last (training only): a v2 classifier for v2 (AdaptSegNet's
         multi-level ``layer5`` on ResNet ``layer3``), an FCN head (3x3 conv, BN, ReLU, dropout, 1x1) otherwise
                                                                                    -> ``DeepLab.aux_head``

Notation: ``K`` classes, ``B`` batch, features ``f_i`` of shape ``(B, C_i, H / r_i, W / r_i)`` with ``C_i`` and
``r_i`` from timm's ``feature_info``; ``decoder_input`` is the feature just before the 1x1 classifier.

Deviations from the papers / reference code:
    * v2 sums all four branches. AdaptSegNet's released ``Classifier_Module.forward`` returns inside its loop and so
      sums only the first two branches; we follow the paper.
    * v2 rates are defined at output stride 8 (the paper's setting) and scaled by ``8 / output_stride`` otherwise
      (3/6/9/12 at 16), keeping the field of view in input pixels; v3 rates likewise from stride 16. Pass
      ``atrous_rates`` to set them explicitly.
    * v3+ uses plain (not depthwise-separable) 3x3 convolutions in ASPP and decoder, as torchvision and most
      re-implementations on ResNet backbones; the decoder widths follow the paper (48 and 256).
    * Upsampling is bilinear with ``align_corners=False`` (the TF code uses ``True``).
    * No CRF post-processing (v2).
    * Plain ViT backbones give one stride-16 feature map: v2 and v3 work on it; v3+ needs a stride-4 feature and
      refuses them.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.backbones import FeatureBackbone, create_backbone, is_plain_vit, vit_depth

__all__ = [
    "VERSIONS",
    "SegmenterOutput",
    "ASPPv2",
    "ASPP",
    "DeepLabV3Head",
    "DeepLabV3PlusHead",
    "FCNHead",
    "DeepLab",
    "create_segmenter",
    "scaled_rates",
]

VERSIONS = ("v2", "v3", "v3+")
"""DeepLab versions :class:`DeepLab` builds."""

V2_RATES = (6, 12, 18, 24)
"""DeepLab v2 ASPP-L rates at :data:`V2_RATES_STRIDE`."""
V2_RATES_STRIDE = 8

V3_RATES = (6, 12, 18)
"""DeepLab v3 ASPP rates at :data:`V3_RATES_STRIDE` (doubled at output stride 8)."""
V3_RATES_STRIDE = 16

ASPP_CHANNELS = 256
"""Width of every ASPP branch and of its projection (v3/v3+)."""

DECODER_CHANNELS = 256
"""Width of the 3x3 convs after ASPP (v3) and of the v3+ decoder."""

LOW_LEVEL_CHANNELS = 48
"""v3+: channels the stride-4 feature is projected to."""

LOW_LEVEL_REDUCTION = 4
"""v3+: stride of the low-level feature fused by the decoder."""

ASPP_DROPOUT = 0.5
"""Dropout after the ASPP projection (torchvision's value)."""

AUX_DROPOUT = 0.1
"""Dropout in the FCN auxiliary head (torchvision's value)."""

AUX_WIDTH_DIVISOR = 4
"""FCN auxiliary head: hidden width = input channels / this (torchvision's FCNHead)."""

V2_INIT_STD = 0.01
"""Std of the normal init of the v2 classifier convolutions (DeepLab v2 / AdaptSegNet)."""

VIT_AUX_DEPTH_FRACTION = 2 / 3
"""ViT backbones: the auxiliary head reads the block at this fraction of the depth (block 8 of 12)."""


def scaled_rates(rates: Sequence[int], reference_stride: int, output_stride: int) -> tuple[int, ...]:
    """Rates defined at ``reference_stride`` converted to ``output_stride`` (same field of view in input pixels)."""
    return tuple(max(1, round(r * reference_stride / output_stride)) for r in rates)


class SegmenterOutput(NamedTuple):
    """What :meth:`DeepLab.forward` and :meth:`DeepLab.decode` return.

    Attributes:
        logits: ``(B, K, H, W)`` class scores at input resolution.
        aux: ``(B, K, H, W)`` auxiliary-head scores at input resolution (training, or when requested), else None.
        features: the encoder features ``[(B, C_i, H / r_i, W / r_i)]`` (with ``return_features``), else None.
        decoder_input: ``(B, D, h, w)`` the fused feature fed to the 1x1 classifier (with ``return_features``;
            for v2, the deepest encoder feature fed to the atrous classifier), else None.
        perturbed: ``(B, K, H, W)`` scores decoded from channel-dropped encoder features (``forward`` with
            ``feature_dropout``: UniMatch's feature perturbation), else None.
    """

    logits: torch.Tensor
    aux: torch.Tensor | None = None
    features: list[torch.Tensor] | None = None
    decoder_input: torch.Tensor | None = None
    perturbed: torch.Tensor | None = None


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ASPPv2(nn.Module):
    """DeepLab v2 ASPP-L classifier: ``sum_r conv3x3_r(x)``, each branch mapping to K scores directly.

    Args:
        in_channels: channels of the input feature.
        num_classes: K.
        rates: one atrous rate per branch.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int]):
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in self.rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, V2_INIT_STD)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # All branches are summed (AdaptSegNet's loop returns after the second; see the module docstring).
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class _ImagePooling(nn.Module):
    """ASPP image-level branch: global average pool, 1x1 conv, BN, ReLU, broadcast back to the input size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.project = _conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.project(x.mean(dim=(2, 3), keepdim=True))  # (B, C, 1, 1); BN needs B > 1 in training
        # Bilinear upsampling of a 1x1 map is a broadcast: expand it (exact, no interpolation cost).
        return pooled.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """DeepLab v3 atrous spatial pyramid pooling.

    Branches: 1x1 conv; one 3x3 atrous conv per rate; image pooling. Each has ``out_channels`` channels with BN and
    ReLU; they are concatenated and projected by a 1x1 conv (BN, ReLU, dropout).

    Args:
        in_channels: channels of the input feature.
        rates: atrous rates of the 3x3 branches.
        out_channels: width of every branch and of the projection.
        dropout: dropout rate after the projection.
    """

    def __init__(self, in_channels: int, rates: Sequence[int], out_channels: int = ASPP_CHANNELS,
                 dropout: float = ASPP_DROPOUT):
        super().__init__()
        self.rates = tuple(rates)
        branches: list[nn.Module] = [_conv_bn_relu(in_channels, out_channels, 1)]
        branches += [_conv_bn_relu(in_channels, out_channels, 3, dilation=r) for r in self.rates]
        branches.append(_ImagePooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(_conv_bn_relu(len(branches) * out_channels, out_channels, 1), nn.Dropout(dropout))

    def branch_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each branch's ``(B, out_channels, h, w)`` output, in order (1x1, atrous..., pooling)."""
        return [branch(x) for branch in self.branches]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat(self.branch_outputs(x), dim=1))


class DeepLabV3Head(nn.Module):
    """ASPP, then a 3x3 conv (BN, ReLU) whose output is the decoder input, then the 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int], aspp_channels: int = ASPP_CHANNELS,
                 decoder_channels: int = DECODER_CHANNELS, dropout: float = ASPP_DROPOUT):
        super().__init__()
        self.aspp = ASPP(in_channels, rates, aspp_channels, dropout)
        self.fuse = _conv_bn_relu(aspp_channels, decoder_channels, 3)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def fused(self, high: torch.Tensor) -> torch.Tensor:
        """``(B, decoder_channels, h, w)`` feature before the classifier."""
        return self.fuse(self.aspp(high))


class DeepLabV3PlusHead(nn.Module):
    """v3's ASPP plus the v3+ decoder fusing the stride-4 feature."""

    def __init__(self, in_channels: int, low_channels: int, num_classes: int, rates: Sequence[int],
                 aspp_channels: int = ASPP_CHANNELS, decoder_channels: int = DECODER_CHANNELS,
                 low_level_channels: int = LOW_LEVEL_CHANNELS, dropout: float = ASPP_DROPOUT):
        super().__init__()
        self.aspp = ASPP(in_channels, rates, aspp_channels, dropout)
        self.low_project = _conv_bn_relu(low_channels, low_level_channels, 1)
        self.fuse = nn.Sequential(
            _conv_bn_relu(aspp_channels + low_level_channels, decoder_channels, 3),
            _conv_bn_relu(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def fused(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """``(B, decoder_channels, H / 4, W / 4)`` feature before the classifier."""
        a = _upsample(self.aspp(high), low.shape[-2:])
        return self.fuse(torch.cat([a, self.low_project(low)], dim=1))


class FCNHead(nn.Module):
    """Auxiliary head: 3x3 conv (BN, ReLU), dropout, 1x1 classifier (torchvision's ``FCNHead``)."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = AUX_DROPOUT):
        super().__init__()
        hidden = max(in_channels // AUX_WIDTH_DIVISOR, 1)
        self.body = nn.Sequential(_conv_bn_relu(in_channels, hidden, 3), nn.Dropout(dropout),
                                  nn.Conv2d(hidden, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _init_head(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DeepLab(nn.Module):
    """DeepLab v2 / v3 / v3+ (Chen et al. 2017, 2017, 2018) on a :class:`~common.backbones.FeatureBackbone`.

    The head reads the deepest feature (and the last stride-4 feature for v3+, the one before the deepest for the
    auxiliary head), with widths from ``backbone.channels`` (timm's ``feature_info.channels()``).

    Methods hooks: :meth:`encode` gives the encoder features; :meth:`decode` runs the head on (possibly perturbed)
    features and can perturb the fused decoder feature (PS-MT) through ``perturb``; :meth:`decode_dropped` (and
    ``forward(x, feature_dropout=p)``, the path a DDP wrapper exposes) also decodes channel-dropped copies of the
    features the head reads (UniMatch's feature perturbation).

    Args:
        version: ``"v2"``, ``"v3"`` or ``"v3+"``.
        backbone: feature extractor returning a list of NCHW maps.
        num_classes: K.
        atrous_rates: override of the (stride-scaled) default rates.
        aux: add the auxiliary head (training-time deep supervision / AdaptSegNet multi-level).
        aspp_channels: ASPP width (v3, v3+).
        decoder_channels: width of the convs before the classifier (v3, v3+).
        low_level_channels: v3+ low-level projection width.
        dropout: dropout after the ASPP projection.
    """

    def __init__(self, version: Literal["v2", "v3", "v3+"], backbone: FeatureBackbone, num_classes: int, *,
                 atrous_rates: Sequence[int] | None = None, aux: bool = False, aspp_channels: int = ASPP_CHANNELS,
                 decoder_channels: int = DECODER_CHANNELS, low_level_channels: int = LOW_LEVEL_CHANNELS,
                 dropout: float = ASPP_DROPOUT):
        super().__init__()
        if version not in VERSIONS:
            raise ValueError(f"unknown DeepLab version {version!r}; valid: {VERSIONS}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.version = version
        self.num_classes = num_classes
        self.backbone = backbone
        channels, reductions = list(backbone.channels), list(backbone.reductions)
        output_stride = reductions[-1]
        self.high_index = len(channels) - 1
        self.low_index: int | None = None
        self.aux_index: int | None = None

        if version == "v2":
            rates = tuple(atrous_rates) if atrous_rates else scaled_rates(V2_RATES, V2_RATES_STRIDE, output_stride)
            self.head: nn.Module = ASPPv2(channels[-1], num_classes, rates)
        else:
            rates = tuple(atrous_rates) if atrous_rates else scaled_rates(V3_RATES, V3_RATES_STRIDE, output_stride)
            if version == "v3":
                self.head = DeepLabV3Head(channels[-1], num_classes, rates, aspp_channels, decoder_channels, dropout)
            else:
                low = [i for i, r in enumerate(reductions) if r == LOW_LEVEL_REDUCTION]
                if not low:
                    raise ValueError(
                        f"DeepLab v3+ needs a stride-{LOW_LEVEL_REDUCTION} feature but {getattr(backbone, 'arch', '')} "
                        f"gives strides {reductions} (plain ViTs have one stride); use version='v3' or another "
                        f"backbone")
                self.low_index = low[-1]
                self.head = DeepLabV3PlusHead(channels[-1], channels[self.low_index], num_classes, rates,
                                              aspp_channels, decoder_channels, low_level_channels, dropout)
            _init_head(self.head)
        self.atrous_rates = rates

        self.aux_head: nn.Module | None = None
        if aux:
            if len(channels) < 2:
                raise ValueError("the auxiliary head reads the feature before the deepest one; the backbone returns "
                                 "only one (for ViTs pass two out_indices, as create_segmenter does)")
            self.aux_index = len(channels) - 2
            if version == "v2":
                self.aux_head = ASPPv2(channels[self.aux_index], num_classes,
                                       scaled_rates(V2_RATES, V2_RATES_STRIDE, reductions[self.aux_index])
                                       if not atrous_rates else rates)
            else:
                self.aux_head = FCNHead(channels[self.aux_index], num_classes)
                _init_head(self.aux_head)

    @property
    def used_features(self) -> tuple[int, ...]:
        """Indices of the encoder features the heads read (deepest, plus low-level and auxiliary when present)."""
        return tuple(sorted({i for i in (self.low_index, self.aux_index, self.high_index) if i is not None}))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features ``[(B, C_i, H / r_i, W / r_i)]`` for ``x`` of shape ``(B, C, H, W)``."""
        return self.backbone(x)

    def decode(self, features: Sequence[torch.Tensor], perturb: Callable[[torch.Tensor], torch.Tensor] | None = None,
               *, size: Sequence[int] | None = None, return_aux: bool | None = None) -> SegmenterOutput:
        """Run the head on encoder features.

        Args:
            features: the list :meth:`encode` returned (possibly perturbed; batch size may differ from the input's).
            perturb: applied to the fused decoder feature just before the classifier (PS-MT's feature
                perturbations); for v2, to the deepest feature before the atrous classifier.
            size: output ``(H, W)``; default: first feature's size times its reduction (pass it for inputs that are
                not multiples of the deepest stride).
            return_aux: compute the auxiliary logits (default: in training mode, when there is an aux head).

        Returns:
            :class:`SegmenterOutput` with ``features`` and ``decoder_input`` filled.
        """
        features = list(features)
        if size is None:
            r0 = self.backbone.reductions[0]
            size = (features[0].shape[-2] * r0, features[0].shape[-1] * r0)
        high = features[self.high_index]
        if self.version == "v2":
            decoder_input = high
            z = perturb(decoder_input) if perturb is not None else decoder_input
            logits = self.head(z)
        else:
            if self.version == "v3":
                decoder_input = self.head.fused(high)
            else:
                decoder_input = self.head.fused(high, features[self.low_index])
            z = perturb(decoder_input) if perturb is not None else decoder_input
            logits = self.head.classifier(z)
        return SegmenterOutput(_upsample(logits, size), self._aux(features, size, return_aux), features, decoder_input)

    def _aux(self, features: Sequence[torch.Tensor], size: Sequence[int],
             return_aux: bool | None) -> torch.Tensor | None:
        if return_aux is None:
            return_aux = self.training
        if not return_aux or self.aux_head is None:
            return None
        return _upsample(self.aux_head(features[self.aux_index]), size)

    def decode_dropped(self, features: Sequence[torch.Tensor], p: float, *, size: Sequence[int],
                       return_aux: bool | None = None, generator: torch.Generator | None = None) -> SegmenterOutput:
        """Decode ``features`` and channel-dropped copies of them in one head pass (UniMatch's ``need_fp``).

        The features the main head reads (deepest, and stride-4 for v3+) are concatenated along the batch with a
        copy whose channels are zeroed with probability ``p`` per sample and channel and the rest scaled by
        ``1 / (1 - p)`` (``nn.Dropout2d`` in training mode, whatever the module's mode); the head's BatchNorm sees
        both halves, as in UniMatch's reference. The auxiliary head (when asked) reads the clean feature only.

        Args:
            features: the list :meth:`encode` returned, batch ``B``.
            p: dropout probability in (0, 1).
            size: output ``(H, W)``.
            return_aux: compute the auxiliary logits (default: in training mode, when there is an aux head).
            generator: draws the dropout masks (default: the global RNG); on the features' device.

        Returns:
            :class:`SegmenterOutput` of batch ``B``: ``logits`` clean, ``perturbed`` from the dropped features,
            ``features`` and ``decoder_input`` of the clean pass.
        """
        if not 0.0 < p < 1.0:
            raise ValueError(f"feature dropout must be in (0, 1), got {p}")
        features = list(features)
        b = features[self.high_index].shape[0]
        both = list(features)
        for i in sorted({self.high_index, self.low_index} - {None}):
            f = features[i]
            keep = torch.empty(f.shape[:2] + (1, 1), device=f.device, dtype=torch.float32)
            keep.bernoulli_(1.0 - p, generator=generator)
            both[i] = torch.cat([f, f * (keep / (1.0 - p)).to(f.dtype)])
        out = self.decode(both, size=size, return_aux=False)
        clean, dropped = out.logits.split([b, b])
        return SegmenterOutput(clean, self._aux(features, size, return_aux), features, out.decoder_input[:b], dropped)

    def forward(self, x: torch.Tensor, return_features: bool = False, return_aux: bool | None = None,
                feature_dropout: float = 0.0, generator: torch.Generator | None = None) -> SegmenterOutput:
        """Segment ``x`` of shape ``(B, C, H, W)``.

        Args:
            x: input images.
            return_features: also return the encoder features and the decoder input.
            return_aux: compute the auxiliary logits (default: in training mode, when there is an aux head).
            feature_dropout: > 0 also returns ``perturbed``, the scores of channel-dropped encoder features
                (:meth:`decode_dropped`).
            generator: draws the feature-dropout masks (default: the global RNG).
        """
        features = self.encode(x)
        if feature_dropout > 0:
            out = self.decode_dropped(features, feature_dropout, size=x.shape[-2:], return_aux=return_aux,
                                      generator=generator)
        else:
            out = self.decode(features, size=x.shape[-2:], return_aux=return_aux)
        if not return_features:
            out = out._replace(features=None, decoder_input=None)
        return out


def create_segmenter(
    arch: str,
    version: Literal["v2", "v3", "v3+"],
    num_classes: int,
    in_chans: int,
    output_stride: int | None = 16,
    aux: bool = False,
    pretrained_file: str | None = None,
    *,
    band_map: tuple[Sequence[str], Sequence[str]] | None = None,
    drop_path_rate: float = 0.0,
    stem_pool: bool = True,
    backbone_kwargs: dict[str, Any] | None = None,
    **head_kwargs: Any,
) -> DeepLab:
    """Build a DeepLab on a timm backbone.

    Args:
        arch: timm architecture (``resnet50``, ``convnext_tiny``, ``efficientnet_b3``, ``regnety_016``, ``vgg16``,
            ``vit_small_patch16_224``, ...).
        version: ``"v2"``, ``"v3"`` or ``"v3+"``.
        num_classes: K.
        in_chans: number of input bands.
        output_stride: 8 or 16 for dilated CNNs (32: none); plain ViTs have their patch size (16 for ``*_patch16_*``;
            pass None for other patch sizes).
        aux: add the auxiliary head on the stage before the deepest (for ViTs: the block at 2/3 of the depth).
        pretrained_file: local backbone weights (export of ``timm.create_model(arch, num_classes=0, in_chans=...)``).
        band_map: ``(file_bands, dataset_bands)`` to map the first convolution by band name.
        drop_path_rate: backbone stochastic depth.
        stem_pool: keep a ResNet's stem max-pool; ``False`` removes it (every feature at half its stride: v3+ then
            fuses ``layer2``, the stride-4 feature, and ``output_stride`` stays the true stride, 8 or 16).
        backbone_kwargs: further timm kwargs for the backbone.
        **head_kwargs: :class:`DeepLab` options (``atrous_rates``, ``aspp_channels``, ``decoder_channels``, ...).
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown DeepLab version {version!r}; valid: {VERSIONS}")
    backbone_kwargs = dict(backbone_kwargs or {})
    out_indices = None
    if is_plain_vit(arch):
        if version == "v3+":
            raise ValueError(f"DeepLab v3+ needs a stride-{LOW_LEVEL_REDUCTION} feature; plain ViT {arch} has one "
                             f"stride (its patch size): use version='v3' or 'v2'")
        depth = vit_depth(arch, in_chans=in_chans, **backbone_kwargs)
        aux_block = max(0, round(depth * VIT_AUX_DEPTH_FRACTION) - 1)
        out_indices = (aux_block, depth - 1) if aux and aux_block < depth - 1 else (depth - 1,)
    backbone = create_backbone(arch, in_chans, features_only=True, out_indices=out_indices,
                               output_stride=output_stride, pretrained_file=pretrained_file,
                               drop_path_rate=drop_path_rate, band_map=band_map, stem_pool=stem_pool,
                               **backbone_kwargs)
    return DeepLab(version, backbone, num_classes, aux=aux, **head_kwargs)
