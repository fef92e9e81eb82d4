"""timm backbones shared by DINO pretraining (pooled embeddings) and fine-tuning (multi-scale features).

Two factories, one weight loader and one band mapper:

* :func:`create_backbone` builds a :class:`FeatureBackbone`: a list of NCHW feature maps with their channels and
  reductions (read from timm's ``feature_info``). CNNs go through
  ``timm.create_model(arch, features_only=True, out_indices=..., output_stride=..., in_chans=C)``; models with
  channels-last features (Swin and other ``output_fmt == "NHWC"`` models) are permuted to NCHW; plain ViTs (which
  have no ``output_stride``) get :class:`ViTBackbone`: the tokens of selected blocks, after the final norm, reshaped
  to ``(B, D, H / p, W / p)`` with ``dynamic_img_size=True`` (one stride, the patch size ``p``); VGG (which timm only
  builds at stride 32) is dilated here, as DeepLab-LargeFOV does (pools turned to 3x3/1 and later convs dilated).
  ``stem_pool=False`` removes a ResNet stem's 3x3/2 max-pool (stem stride 2 instead of 4, for small tiles); the
  parameters are unchanged, so weights load either way (see :func:`create_backbone`).
* :func:`create_embedding_backbone` builds the plain ``num_classes=0`` model DINO trains; its ``state_dict`` is the
  export format (:mod:`common.weights`).
* :func:`load_backbone_weights` reads such an export (safetensors; ``.pth``/``.pt`` only with
  ``torch.load(weights_only=True)``) into either kind of model. For a feature backbone it maps the plain model's key
  names onto the feature model's (timm's ``FeatureListNet`` keeps names such as ``layer1.0.conv1.weight`` but
  flattens the first ``nn.Sequential`` level of others: ``stages.0.x`` -> ``stages_0.x``, ``stem.0`` -> ``stem_0``).
  Keys of modules that the feature model dropped (classifier-side layers such as ``conv_head``/``head.norm``, stages
  after the last requested feature) are accepted and reported; anything else that does not match raises
  :class:`WeightLoadError` with the key lists, unless the caller names the keys it allows.
* :func:`adapt_first_conv` maps the first convolution from the export's bands to the dataset's by band name.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import timm
import torch
from timm.models import FeatureInfo
from torch import nn

from common.errors import MissingFileError, UserInputError

__all__ = [
    "SUPPORTED_OUTPUT_STRIDES",
    "DILATED_FAMILIES",
    "PLAIN_VIT_FAMILIES",
    "FeatureBackbone",
    "ViTBackbone",
    "BandMapping",
    "LoadReport",
    "WeightLoadError",
    "create_backbone",
    "create_embedding_backbone",
    "load_backbone_weights",
    "read_state_dict",
    "adapt_first_conv",
    "timm_family",
    "is_plain_vit",
    "vit_depth",
]

SUPPORTED_OUTPUT_STRIDES = (8, 16, 32)
"""Output strides a dilated CNN backbone can be built with (32 = no dilation)."""

NATURAL_OUTPUT_STRIDE = 32
"""Stride of the last feature of an undilated CNN; passed to timm only when it differs."""

DILATED_FAMILIES = ("resnet", "resnetv2", "convnext", "efficientnet", "mobilenetv3", "regnet", "vgg")
"""timm modules (model families) checked to honour ``output_stride`` 8 and 16 (``vgg`` through our dilation)."""

PLAIN_VIT_FAMILIES = ("vision_transformer", "vision_transformer_hybrid", "deit", "eva")
"""timm modules whose models take the :class:`ViTBackbone` path (``forward_intermediates``, ``dynamic_img_size``)."""

MANUALLY_DILATED_FAMILIES = ("vgg",)
"""Families timm builds only at stride 32 whose plain conv/pool stack we dilate ourselves."""

ALWAYS_ALLOWED_MISSING_SUFFIXES = ("num_batches_tracked",)
"""BatchNorm step counters: unused in training mode with momentum set, absent from some exports; never an error."""

CLASSIFIER_ALIAS = "classifier"
"""Entry of ``allow_unexpected`` standing for the architecture's classifier keys (timm's ``pretrained_cfg``)."""

MAX_KEYS_IN_MESSAGE = 20
"""How many keys an error message lists before summarising the rest as a count."""


# --------------------------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------------------------


def timm_family(arch: str) -> str:
    """The timm module an architecture is defined in (``"resnet"``, ``"convnext"``, ``"vision_transformer"``).

    Raises:
        ValueError: ``arch`` is not a timm model name (the message lists close names).
    """
    if not timm.is_model(arch):
        stem = arch.split("_")[0]
        close = timm.list_models(f"*{stem}*")[:12]
        raise UserInputError(f"unknown timm architecture {arch!r} (model.arch); similar names: {close}")
    return timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1]


def is_plain_vit(arch: str) -> bool:
    """True for non-hierarchical ViTs (one token grid at the patch stride), which take the :class:`ViTBackbone` path."""
    return timm_family(arch) in PLAIN_VIT_FAMILIES


def vit_depth(arch: str, **kw: Any) -> int:
    """Number of transformer blocks of a plain ViT, read from a parameter-free (meta device) instance."""
    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=0, **kw)
    return len(model.blocks)


def _check_no_hub(kw: Mapping[str, Any]) -> None:
    if kw.get("pretrained"):
        raise ValueError("pretrained=True would download weights from a hub; pass pretrained_file=<local file> instead")
    for key in ("pretrained_cfg_overlay", "checkpoint_path"):
        if key in kw:
            raise ValueError(f"{key} is not accepted here; pass pretrained_file=<local file> (loaded strictly)")


def _output_stride_error(arch: str, output_stride: int, reason: str) -> ValueError:
    return ValueError(
        f"{arch} (timm family {timm_family(arch)!r}) cannot be built with output_stride={output_stride}: {reason}. "
        f"Families with dilated output strides {SUPPORTED_OUTPUT_STRIDES}: {', '.join(DILATED_FAMILIES)}. "
        f"Plain ViTs ({', '.join(PLAIN_VIT_FAMILIES)}) have one stride equal to their patch size (pass "
        f"output_stride=None or the patch size). Other hierarchical models (e.g. swin) only give stride 32 "
        f"(output_stride=None)."
    )


def _is_stem_pool(module: Any) -> bool:
    """A timm ResNet stem max-pool: a plain ``nn.MaxPool2d`` of stride 2 (not an anti-aliased or conv replacement)."""
    if type(module) is not nn.MaxPool2d:
        return False
    stride = module.stride if isinstance(module.stride, int) else module.stride[0]
    return stride == 2


def _check_stem_pool(arch: str, source_kwargs: Mapping[str, Any]) -> None:
    """Refuse ``stem_pool=False`` for a model without a timm ResNet stem max-pool (read from a meta-device
    instance, so that feature models whose pool was cut away are judged by their architecture)."""
    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=0, **source_kwargs)
    if not _is_stem_pool(getattr(model, "maxpool", None)):
        raise UserInputError(
            f"model.stem_pool=false removes the stride-2 stem max-pool of a timm ResNet (its 'maxpool' module), "
            f"but {arch} (timm family {timm_family(arch)!r}) has none: set model.stem_pool=true, or use a ResNet "
            f"(model.arch=resnet18, resnet50, resnet10t, resnext50_32x4d, ...)")


def _stem_pool_stride_error(arch: str) -> UserInputError:
    return UserInputError(
        f"{arch} (timm family {timm_family(arch)!r}) cannot be built with output_stride=32 and model.stem_pool=false: "
        f"without the stem max-pool every feature has half its usual stride, so the deepest is at most 16. Set "
        f"model.output_stride to 16 or 8 (or null: 16), or model.stem_pool=true")


def _remove_stem_pool(model: nn.Module) -> None:
    """Replace the ``maxpool`` child of a plain timm ResNet or of its ``FeatureListNet`` by ``nn.Identity`` and halve
    the ``feature_info`` reduction of every feature taken after it (a feature model that stops before the pool
    keeps its strides)."""
    names = list(model._modules)  # execution order; a FeatureListNet joins nested names with "_"
    if "maxpool" not in names:
        return
    model.maxpool = nn.Identity()
    after = set(names[names.index("maxpool") + 1:])
    info = getattr(model, "feature_info", None)
    for entry in info.info if isinstance(info, FeatureInfo) else info or ():
        if entry["module"].replace(".", "_") in after:
            entry["reduction"] //= 2


# --------------------------------------------------------------------------------------------------------------
# Feature backbones
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SourceSpec:
    """How to build the plain ``num_classes=0`` timm model whose ``state_dict`` an export holds."""

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # parameter-shaping kwargs (in_chans, img_size, ...)

    def state_shapes(self) -> dict[str, torch.Size]:
        # Built on the meta device: no memory, no initialisation cost, only names and shapes.
        with torch.device("meta"):
            model = timm.create_model(self.arch, num_classes=0, **self.kwargs)
        return {k: v.shape for k, v in model.state_dict().items()}

    @property
    def first_conv(self) -> str:
        return str(timm.models.get_pretrained_cfg_value(self.arch, "first_conv") or "")

    @property
    def classifier(self) -> tuple[str, ...]:
        value = timm.models.get_pretrained_cfg_value(self.arch, "classifier") or ()
        return (value,) if isinstance(value, str) else tuple(value)


class FeatureBackbone(nn.Module):
    """Multi-scale NCHW features of a timm ``features_only`` model.

    Attributes:
        model: the timm feature model (``FeatureListNet``, ``EfficientNetFeatures``, ...).
        feature_info: timm's :class:`~timm.models.FeatureInfo` of the returned features.
        arch: timm architecture name.
        in_chans: number of input bands.
        stem_pool: False when :func:`create_backbone` removed the ResNet stem max-pool (``stem_pool=False``).
    """

    stem_pool: bool = True

    def __init__(self, model: nn.Module, feature_info: FeatureInfo, arch: str, in_chans: int,
                 source: _SourceSpec, channels_last_output: bool = False):
        super().__init__()
        self.model = model
        self.feature_info = feature_info
        self.arch = arch
        self.in_chans = in_chans
        self._source = source
        self._channels_last_output = channels_last_output  # NHWC features (swin & co) are permuted to NCHW

    @property
    def channels(self) -> list[int]:
        """Channels of each returned feature (``feature_info.channels()``)."""
        return list(self.feature_info.channels())

    @property
    def reductions(self) -> list[int]:
        """Stride of each returned feature relative to the input (``feature_info.reduction()``)."""
        return list(self.feature_info.reduction())

    @property
    def output_stride(self) -> int:
        """Stride of the deepest returned feature."""
        return self.reductions[-1]

    @property
    def first_conv(self) -> str:
        """Key prefix of the first convolution in the *plain* model's naming (e.g. ``conv1``, ``stem.0``)."""
        return self._source.first_conv

    def describe(self) -> str:
        """One line per feature: index, channels, reduction."""
        rows = [f"{self.arch} in_chans={self.in_chans}"]
        rows += [f"  [{i}] channels={c} reduction={r}" for i, (c, r) in enumerate(zip(self.channels, self.reductions))]
        return "\n".join(rows)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.model(x)
        if isinstance(feats, dict):
            feats = list(feats.values())
        if self._channels_last_output:
            # A permuted view is a channels_last NCHW tensor, which convolutions accept without a copy.
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return list(feats)

    def source_key_map(self) -> tuple[dict[str, str], dict[str, torch.Size]]:
        """Map this module's ``state_dict`` keys to the plain timm model's keys.

        Returns:
            ``(target_to_source, source_shapes)``: for every key of ``self.state_dict()`` the key it has in the plain
            ``num_classes=0`` model, and the plain model's key -> shape table.

        Raises:
            RuntimeError: a key has no counterpart (an unsupported feature wrapper; the message names it).
        """
        source_shapes = self._source.state_shapes()
        mapping: dict[str, str] = {}
        unmatched = []
        for key in self.state_dict():
            src = _match_source_key(key, source_shapes)
            if src is None:
                unmatched.append(key)
            else:
                mapping[key] = src
        if unmatched:
            raise RuntimeError(f"{self.arch}: cannot map feature-model keys to the plain model: {_fmt_keys(unmatched)}")
        return mapping, source_shapes


class ViTBackbone(FeatureBackbone):
    """Plain ViT as a single-stride feature backbone (Dosovitskiy et al. 2021).

    Returns the tokens of the blocks in ``out_indices`` after the final norm (as DINO's features are used), prefix
    tokens dropped, reshaped to ``(B, D, H / p, W / p)``. ``dynamic_img_size=True`` interpolates the position
    embedding to any input size; ``H`` and ``W`` should be multiples of ``p`` (otherwise the patch embedding drops
    the remainder; pass ``dynamic_img_pad=True`` to pad instead).
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[int], arch: str, in_chans: int, source: _SourceSpec):
        depth = len(model.blocks)
        indices = [i + depth if i < 0 else i for i in out_indices]
        if any(not 0 <= i < depth for i in indices) or sorted(set(indices)) != indices:
            raise ValueError(f"{arch}: out_indices must be increasing block indices in [-{depth}, {depth}), got "
                             f"{tuple(out_indices)}")
        # Drop the blocks after the last requested one and the head; keep the final norm (applied to every output).
        model.prune_intermediate_layers(indices, prune_norm=False, prune_head=True)
        info = FeatureInfo(list(model.feature_info), tuple(indices))
        super().__init__(model, info, arch, in_chans, source)
        self.out_indices = tuple(indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model.forward_intermediates(x, indices=list(self.out_indices), norm=True,
                                                     output_fmt="NCHW", intermediates_only=True))


def _match_source_key(key: str, source: Mapping[str, Any]) -> str | None:
    """The plain-model key of a feature-model key (``model.`` prefix removed, flattened names re-split)."""
    if not key.startswith("model."):
        return None
    key = key[len("model."):]
    if key in source:
        return key
    head, _, tail = key.partition(".")
    # timm flattens the first nn.Sequential level: "stages.0" -> "stages_0"; try each "_" of the first component.
    for i, ch in enumerate(head):
        if ch == "_":
            cand = f"{head[:i]}.{head[i + 1:]}" + (f".{tail}" if tail else "")
            if cand in source:
                return cand
    return None


def _dilate_plain_cnn(features: nn.Module, output_stride: int, arch: str) -> None:
    """Turn the stride-2 pools of a flat conv/pool stack into 3x3/1 pools past ``output_stride`` and dilate later convs.

    This is DeepLab-LargeFOV's VGG surgery (pool4/pool5 stride 1, conv5 dilation 2 at output stride 8). The feature
    model's ``feature_info`` reductions are updated to the new strides.
    """
    stride, dilation = 1, 1
    reduction_at: dict[str, int] = {}
    for name, module in list(features.named_children()):
        if isinstance(module, nn.Conv2d):
            if module.stride != (1, 1):
                raise ValueError(f"{arch}: strided convolution {name} not supported by the dilation surgery")
            if dilation > 1 and module.kernel_size != (1, 1):
                module.dilation = (dilation, dilation)
                module.padding = tuple(dilation * (k - 1) // 2 for k in module.kernel_size)
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            s = module.stride if isinstance(module.stride, int) else module.stride[0]
            if s > 1:
                if stride * s > output_stride:
                    features[name] = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
                    dilation *= s
                else:
                    stride *= s
        elif any(True for _ in module.parameters()) and not isinstance(module, (nn.BatchNorm2d,)):
            raise ValueError(f"{arch}: module {name} ({type(module).__name__}) not supported by the dilation "
                                      f"surgery (flat conv/pool stacks only)")
        reduction_at[name] = stride
    for info in features.feature_info.info:
        flat = info["module"].replace(".", "_")
        if flat in reduction_at:
            info["reduction"] = reduction_at[flat]


def _source_kwargs(in_chans: int, kw: Mapping[str, Any]) -> dict[str, Any]:
    # Everything the caller passes may shape parameters (img_size, patch_size, mlp_ratio...) except these.
    runtime_only = {"drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate", "output_stride",
                    "features_only", "out_indices", "feature_cls", "global_pool", "num_classes"}
    return {"in_chans": in_chans, **{k: v for k, v in kw.items() if k not in runtime_only}}


def create_backbone(
    arch: str,
    in_chans: int,
    *,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    output_stride: int | None = None,
    pretrained_file: str | Path | None = None,
    drop_path_rate: float = 0.0,
    band_map: tuple[Sequence[str], Sequence[str]] | None = None,
    stem_pool: bool = True,
    **kw: Any,
) -> nn.Module:
    """Build a timm backbone, optionally as a multi-scale feature extractor, and load local weights.

    Args:
        arch: timm architecture name (``resnet50``, ``convnext_tiny``, ``vit_small_patch16_224``, ...).
        in_chans: number of input bands.
        features_only: return a :class:`FeatureBackbone` (list of NCHW maps) instead of the plain timm model.
        out_indices: which features to return: timm feature indices for CNNs (default: all), block indices for
            plain ViTs (default: the last block). Negative indices count from the end.
        output_stride: stride of the deepest feature (8, 16 or 32) for dilated CNNs; for plain ViTs ``None`` or
            the patch size. ``None`` keeps the model's natural stride. It is the true stride: without the stem pool
            timm is asked for twice it, and 32 is impossible.
        pretrained_file: local weights (the ``state_dict`` of ``timm.create_model(arch, num_classes=0,
            in_chans=...)`` as safetensors), loaded strictly by :func:`load_backbone_weights`. Never downloaded.
        drop_path_rate: stochastic depth rate (passed to timm only when > 0: not every family accepts it).
        band_map: ``(file_bands, dataset_bands)`` to map the first convolution by band name (see
            :func:`adapt_first_conv`).
        stem_pool: keep the stride-2 max-pool of a timm ResNet stem. ``False`` replaces it by ``nn.Identity``
            (stem stride 2: every later feature at half its usual stride, e.g. reductions 2, 2, 4, 8, 16), for tiles
            too small for a stride-4 stem. No parameter changes, so the same weights load either way; a plain
            timm model gets the same network with ``model.maxpool = torch.nn.Identity()``.
        **kw: further timm kwargs (``img_size``, ``dynamic_img_pad``...). ``pretrained=True`` is refused.

    Returns:
        A :class:`FeatureBackbone` (``features_only=True``) or the plain timm model (``num_classes`` defaults to 0).

    Raises:
        ValueError: unknown architecture, or an output stride the family does not support (the message lists the
            families that do).
        UserInputError: ``stem_pool=False`` for a model without a ResNet stem max-pool, or with output stride 32.
        WeightLoadError: ``pretrained_file`` does not match the architecture.
    """
    _check_no_hub(kw)
    family = timm_family(arch)
    if output_stride is not None and output_stride not in SUPPORTED_OUTPUT_STRIDES:
        raise _output_stride_error(arch, output_stride, f"supported values are {SUPPORTED_OUTPUT_STRIDES}")
    extra = dict(kw)
    if drop_path_rate > 0:
        extra["drop_path_rate"] = drop_path_rate
    source = _SourceSpec(arch, _source_kwargs(in_chans, kw))
    vit = family in PLAIN_VIT_FAMILIES
    if vit:
        extra.setdefault("dynamic_img_size", True)
        source = _SourceSpec(arch, _source_kwargs(in_chans, extra))
    timm_stride = output_stride  # the stride timm builds the deepest feature at, before the stem pool is removed
    if not stem_pool:
        _check_stem_pool(arch, source.kwargs)
        if output_stride == NATURAL_OUTPUT_STRIDE:
            raise _stem_pool_stride_error(arch)
        timm_stride = None if output_stride is None else 2 * output_stride

    if not features_only:
        if timm_stride not in (None, NATURAL_OUTPUT_STRIDE) and not vit:
            extra["output_stride"] = timm_stride
        extra.setdefault("num_classes", 0)
        model = timm.create_model(arch, in_chans=in_chans, **extra)
        if not stem_pool:
            _remove_stem_pool(model)
        patch = model.patch_embed.patch_size[0] if vit else None
        if vit and output_stride not in (None, patch):
            raise _output_stride_error(arch, output_stride, f"a plain ViT has one stride, its patch size {patch}")
        if pretrained_file is not None:
            load_backbone_weights(model, pretrained_file, band_map=band_map)
        return model

    if vit:
        model = timm.create_model(arch, in_chans=in_chans, num_classes=0, **extra)
        backbone: FeatureBackbone = ViTBackbone(model, tuple(out_indices) if out_indices is not None else (-1,),
                                                arch, in_chans, source)
        if output_stride not in (None, backbone.output_stride):
            raise _output_stride_error(arch, output_stride, f"a plain ViT has one stride, its patch size "
                                                            f"{backbone.output_stride}")
    else:
        feat_kw = dict(extra, features_only=True)
        if out_indices is not None:
            feat_kw["out_indices"] = tuple(out_indices)
        manual = family in MANUALLY_DILATED_FAMILIES
        if timm_stride not in (None, NATURAL_OUTPUT_STRIDE) and not manual:
            feat_kw["output_stride"] = timm_stride
        try:
            model = timm.create_model(arch, in_chans=in_chans, **feat_kw)
        except (TypeError, AssertionError, ValueError) as exc:
            if "output_stride" in feat_kw:
                raise _output_stride_error(arch, output_stride, f"timm refused it ({type(exc).__name__}: {exc})") from exc
            raise
        if manual and output_stride not in (None, NATURAL_OUTPUT_STRIDE):
            _dilate_plain_cnn(model, output_stride, arch)
        if not stem_pool:
            _remove_stem_pool(model)
        nhwc = str(getattr(model, "output_fmt", "NCHW")).upper().endswith("NHWC")
        backbone = FeatureBackbone(model, model.feature_info, arch, in_chans, source, channels_last_output=nhwc)
        backbone.stem_pool = stem_pool
        if output_stride is not None and backbone.output_stride != output_stride:
            raise _output_stride_error(arch, output_stride, f"the deepest feature has stride {backbone.output_stride}")
    if pretrained_file is not None:
        load_backbone_weights(backbone, pretrained_file, band_map=band_map)
    return backbone


def create_embedding_backbone(
    arch: str,
    in_chans: int,
    *,
    drop_path_rate: float = 0.0,
    pretrained_file: str | Path | None = None,
    band_map: tuple[Sequence[str], Sequence[str]] | None = None,
    stem_pool: bool = True,
    output_stride: int | None = None,
    **kw: Any,
) -> nn.Module:
    """The plain timm model DINO trains: ``timm.create_model(arch, num_classes=0, in_chans=C)`` -> pooled ``(B, D)``.

    Plain ViTs get ``dynamic_img_size=True`` so global and local crops of different sizes share one model. The model
    gets an ``embed_dim`` attribute (its ``num_features``). Its ``state_dict`` is the backbone export format.

    Args:
        arch: timm architecture name.
        in_chans: number of input bands.
        drop_path_rate: stochastic depth rate (only passed when > 0).
        pretrained_file: local weights to continue from (strict).
        band_map: ``(file_bands, model_bands)`` for the first convolution.
        stem_pool: keep a timm ResNet's stem max-pool; ``False`` replaces it by ``nn.Identity`` (as
            :func:`create_backbone`; the ``state_dict`` keys stay those of the plain timm model).
        output_stride: stride of the last feature map (``forward_features``), 8 or 16 by dilating the last stages
            of a CNN of :data:`DILATED_FAMILIES` (vgg excluded), as the DeepLab backbone is (a dense pretraining
            objective then sees the map fine-tuning uses); ``None``: the architecture's own (32; 16 without the
            stem pool). The weights and ``state_dict`` are the same at every stride.
        **kw: further timm kwargs. ``pretrained=True`` is refused.
    """
    _check_no_hub(kw)
    extra = dict(kw)
    if drop_path_rate > 0:
        extra["drop_path_rate"] = drop_path_rate
    if is_plain_vit(arch):
        extra.setdefault("dynamic_img_size", True)
    if not stem_pool:
        _check_stem_pool(arch, _source_kwargs(in_chans, extra))
    if output_stride is not None:
        if output_stride not in SUPPORTED_OUTPUT_STRIDES:
            raise _output_stride_error(arch, output_stride, f"supported values are {SUPPORTED_OUTPUT_STRIDES}")
        if timm_family(arch) not in DILATED_FAMILIES or timm_family(arch) == "vgg":
            raise _output_stride_error(arch, output_stride, "only CNNs timm dilates take it here (vgg excluded)")
        if not stem_pool and output_stride == NATURAL_OUTPUT_STRIDE:
            raise _stem_pool_stride_error(arch)
        timm_stride = output_stride if stem_pool else 2 * output_stride  # timm's stride before the pool goes
        if timm_stride != NATURAL_OUTPUT_STRIDE:
            extra["output_stride"] = timm_stride
    model = timm.create_model(arch, num_classes=0, in_chans=in_chans, **extra)
    if not stem_pool:
        _remove_stem_pool(model)
    model.embed_dim = int(model.num_features)
    if pretrained_file is not None:
        load_backbone_weights(model, pretrained_file, band_map=band_map)
    return model


# --------------------------------------------------------------------------------------------------------------
# First-convolution band mapping
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BandMapping:
    """What :func:`adapt_first_conv` did.

    Attributes:
        mapped: destination bands whose kernel slice was copied from the source band of the same name.
        initialised: destination bands absent from the source, initialised with the mean source kernel.
        dropped: source bands absent from the destination.
        scale: factor applied to the whole kernel afterwards (``len(src) / len(dst)``, or 1 when not rescaled).
    """

    mapped: tuple[str, ...]
    initialised: tuple[str, ...]
    dropped: tuple[str, ...]
    scale: float


def adapt_first_conv(
    state_dict: Mapping[str, torch.Tensor],
    src_bands: Sequence[str],
    dst_bands: Sequence[str],
    conv_key: str,
    *,
    rescale: bool = True,
) -> tuple[dict[str, torch.Tensor], BandMapping]:
    """Re-map the input channels of the first convolution from ``src_bands`` to ``dst_bands`` by band name.

    For every destination band present in the source, its kernel slice ``W[:, c_src]`` is copied. Every other
    destination band gets the mean source kernel ``mean_c W[:, c]`` (the response of a band whose normalised values
    move with the others; timm's ``adapt_input_conv`` uses the same idea). Then, with ``rescale``, the whole kernel is
    multiplied by ``len(src_bands) / len(dst_bands)``: with normalised, strongly correlated bands (the usual case for
    spectral bands) the response is about ``x * sum_c W[:, c]``, and this keeps that sum, so activations stay
    comparable. It is exact when bands are only added (the new slices are the mean) and holds in expectation when
    bands are dropped. The bias is untouched.

    Args:
        state_dict: weights in the source layout (not modified).
        src_bands: band names of the weights' input channels, in order.
        dst_bands: band names of the new model's input channels, in order.
        conv_key: the convolution's key, with or without ``.weight`` (``conv1``, ``patch_embed.proj``).
        rescale: apply the ``len(src) / len(dst)`` factor.

    Returns:
        ``(new_state_dict, mapping)``.

    Raises:
        KeyError: ``conv_key`` is not in ``state_dict``.
        ValueError: band lists with duplicates, or a kernel whose input channels differ from ``len(src_bands)``.
    """
    key = conv_key if conv_key.endswith(".weight") else f"{conv_key}.weight"
    if key not in state_dict:
        raise KeyError(f"first convolution {key!r} not in the weights (keys start with {list(state_dict)[:5]})")
    src, dst = list(src_bands), list(dst_bands)
    for name, bands in (("src_bands", src), ("dst_bands", dst)):
        if len(set(bands)) != len(bands):
            raise ValueError(f"{name} has duplicate band names: {bands}")
    w = state_dict[key]
    if w.ndim != 4 or w.shape[1] != len(src):
        raise ValueError(f"{key} has shape {tuple(w.shape)}; expected (out, {len(src)}, kh, kw) for bands {src}")
    w32 = w.float()
    mean_kernel = w32.mean(dim=1)  # (O, kh, kw)
    out = torch.empty(w.shape[0], len(dst), *w.shape[2:], dtype=torch.float32)
    mapped, initialised = [], []
    for j, band in enumerate(dst):
        if band in src:
            out[:, j] = w32[:, src.index(band)]
            mapped.append(band)
        else:
            out[:, j] = mean_kernel
            initialised.append(band)
    scale = len(src) / len(dst) if rescale else 1.0
    if scale != 1.0:
        out.mul_(scale)
    new_state = dict(state_dict)
    new_state[key] = out.to(w.dtype)
    report = BandMapping(tuple(mapped), tuple(initialised), tuple(b for b in src if b not in dst), scale)
    return new_state, report


# --------------------------------------------------------------------------------------------------------------
# Weight loading
# --------------------------------------------------------------------------------------------------------------


class WeightLoadError(UserInputError, RuntimeError):
    """Weights do not fit the model: missing, unexpected or wrongly shaped keys (listed in the message)."""


@dataclass
class LoadReport:
    """Outcome of :func:`load_backbone_weights`.

    Attributes:
        loaded: number of model tensors filled from the file.
        missing: model keys the file lacks (allowed ones only; others raise).
        unexpected: file keys the model has no use for (allowed ones only).
        pruned: file keys of modules the feature model dropped (classifier side, unused stages): expected.
        bands: the first-convolution band mapping, when one was requested.
    """

    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    bands: BandMapping | None = None


def _fmt_keys(keys: Sequence[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:MAX_KEYS_IN_MESSAGE])
    more = f" ... (+{len(keys) - MAX_KEYS_IN_MESSAGE} more)" if len(keys) > MAX_KEYS_IN_MESSAGE else ""
    return f"[{shown}{more}]"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat tensor dict from safetensors, or from ``.pth``/``.pt``/``.bin`` with ``weights_only=True``.

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped and a DDP ``module.`` prefix (on every key)
    removed. Nothing is unpickled beyond what ``weights_only`` allows.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    elif path.suffix in (".pth", ".pt", ".bin"):
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    else:
        raise UserInputError(f"{path}: unknown weights format {path.suffix!r} (use .safetensors, .pth, .pt or .bin)")
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"{path}: not a flat dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _allowed(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in patterns)


def load_backbone_weights(
    model: nn.Module,
    path: str | Path | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    band_map: tuple[Sequence[str], Sequence[str]] | None = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    first_conv: str | None = None,
) -> LoadReport:
    """Load a plain timm ``state_dict`` into a plain model or a :class:`FeatureBackbone`, refusing silent mismatches.

    Args:
        model: a :class:`FeatureBackbone` (keys are mapped from the plain model's names) or a plain timm model.
        path: a weights file (see :func:`read_state_dict`) or an in-memory state dict.
        strict: raise on missing/unexpected keys that are not allowed. With ``strict=False`` they are reported in a
            warning (never silently) and the model keeps its own values for missing keys. Shape mismatches always
            raise.
        band_map: ``(file_bands, model_bands)``: map the first convolution by band name (:func:`adapt_first_conv`).
        allow_missing: model keys (exact names, or module prefixes) the file may lack, in the plain model's naming.
        allow_unexpected: file keys the model may ignore (names or prefixes); ``"classifier"`` stands for the
            architecture's classifier keys (e.g. ``fc`` for ResNets), for files saved with a head.
        first_conv: key of the first convolution for ``band_map`` (default: from timm's ``pretrained_cfg``).

    Returns:
        A :class:`LoadReport`.

    Raises:
        WeightLoadError: missing, unexpected or wrongly shaped keys, listed.
    """
    state = dict(path) if isinstance(path, Mapping) else read_state_dict(path)
    source_name = "<state dict>" if isinstance(path, Mapping) else str(path)
    arch = getattr(model, "arch", None) or (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "model")
    if isinstance(model, FeatureBackbone):
        mapping, source_shapes = model.source_key_map()
        conv = first_conv or model.first_conv
        classifier = model._source.classifier
    else:
        model_state = model.state_dict()
        mapping = {k: k for k in model_state}
        source_shapes = {k: v.shape for k, v in model_state.items()}
        cfg = getattr(model, "pretrained_cfg", None) or {}
        conv = first_conv or str(cfg.get("first_conv") or "")
        cls = cfg.get("classifier") or ()
        classifier = (cls,) if isinstance(cls, str) else tuple(cls)

    report = LoadReport()
    if band_map is not None:
        if not conv:
            raise ValueError(f"{arch}: first convolution unknown; pass first_conv=")
        state, report.bands = adapt_first_conv(state, band_map[0], band_map[1], conv)

    allow_unexpected = [p for a in allow_unexpected for p in (classifier if a == CLASSIFIER_ALIAS else (a,))]
    allow_missing = list(allow_missing)
    used_sources = set(mapping.values())

    missing = [src for src in mapping.values() if src not in state]
    bad_missing = [k for k in missing if not (k.endswith(ALWAYS_ALLOWED_MISSING_SUFFIXES) or _allowed(k, allow_missing))]
    unexpected = [k for k in state if k not in source_shapes]
    bad_unexpected = [k for k in unexpected if not _allowed(k, allow_unexpected)]
    report.pruned = [k for k in state if k in source_shapes and k not in used_sources]
    shape_errors = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(source_shapes[k])}"
                    for k in state if k in used_sources and tuple(state[k].shape) != tuple(source_shapes[k])]
    if shape_errors or ((bad_missing or bad_unexpected) and strict):
        # One message with every kind of problem: a wrong architecture shows up as all three at once.
        parts = []
        if bad_missing:
            parts.append(f"{len(bad_missing)} missing keys {_fmt_keys(bad_missing)}")
        if bad_unexpected:
            parts.append(f"{len(bad_unexpected)} unexpected keys {_fmt_keys(bad_unexpected)}")
        if shape_errors:
            parts.append(f"{len(shape_errors)} shape mismatches {_fmt_keys(shape_errors)}")
        conv_mismatch = bool(conv) and any(e.startswith(conv + ".") for e in shape_errors)
        hint = ("The first convolution's input channels differ: pass band_map=(file_bands, dataset_bands) to map "
                "it by band name. " if conv_mismatch else "")
        raise WeightLoadError(
            f"{source_name} does not match {arch}: " + "; ".join(parts) + ". " + hint +
            "Is it the state_dict of timm.create_model(arch, num_classes=0, in_chans=...) for this architecture? "
            "Allow named keys with allow_missing=/allow_unexpected= (e.g. allow_unexpected=('classifier',) for a "
            "checkpoint saved with its head)."
        )
    if bad_missing or bad_unexpected:
        warnings.warn(f"{source_name} -> {arch}: loading non-strictly; missing {_fmt_keys(bad_missing)}, unexpected "
                      f"{_fmt_keys(bad_unexpected)}", stacklevel=2)
    report.missing = missing
    report.unexpected = unexpected

    own = model.state_dict()
    new_state = {tgt: (state[src] if src in state else own[tgt]) for tgt, src in mapping.items()}
    model.load_state_dict(new_state, strict=True)
    report.loaded = sum(1 for src in mapping.values() if src in state)
    return report
