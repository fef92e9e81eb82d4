"""The config sections every fine-tuning entry point shares: ``data`` (:class:`SegDataConfig`, with its stacked
sensors and the target domain of adaptation runs), ``model``, ``loss``, ``eval``, and the defaults of ``optim`` and
``trainer``. Each method adds its own typed section (see :mod:`finetune.training`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


from common.bands import (
    IGNORE_INDEX,
    InputUnits,
    SensorDef,
)
from common.engine import TrainerConfig
from common.optim import OptimConfig


__all__ = ["SegStackConfig", "SegTargetConfig", "SegDataConfig", "SegModelConfig", "LossConfig", "EvalConfig", "default_optim", "default_trainer"]


@dataclass(frozen=True)
class SegStackConfig:
    """A co-registered sensor whose tiles are appended to the images' channels (an entry of ``data.stack``): the
    tile of id ``X`` is ``<image_dir>/<image_pattern with X>`` and must lie on the grid of the first sensor's."""

    sensor: str | SensorDef  # S1, S2L2A, ... (common/bands.py) or a mapping as data.sensor; band names must differ
    image_dir: str  # relative to data.root, or absolute (e.g. ../../s1/source/images)
    image_pattern: str = "{id}.tif"
    bands: tuple[str, ...] | None = None  # default: the export's bands with model.weights, else the sensor's
    stats_file: str | None = None  # this sensor's statistics (default: the export's / reference stats)
    input_units: InputUnits | None = None  # what this sensor's files hold (as data.input_units)


@dataclass(frozen=True)
class SegTargetConfig:
    """The target domain of an adaptation run (section ``data.target``): tiles laid out like ``data.root``'s
    (``image_dir``, the stacked sensors' ``image_dir``s and ``mask_dir`` relative to this root). The training tiles
    need no masks; ``val_split`` (with masks) is reported as ``target_val/...``, never used to select a checkpoint
    unless ``trainer.best_metric`` names it (then ``metrics.json`` says ``"selection": "oracle"``)."""

    root: str  # holds images/ (and masks/ for val_split) and splits/
    train_split: str = "train"  # unlabelled target tiles the method adapts on
    val_split: str | None = None  # target tiles with masks, for the report (null: none)
    store: str | None = None  # a store packed from this root (python -m common.store pack --target), read
    #                           instead of its image folders; splits resolve in it
    stats_file: str | None = None  # the target domain's own band statistics (python -m common.stats --root
    #                                <root>/images --split <root>/splits/<train_split>.txt): target tiles are then
    #                                normalised with them instead of the source's (per-domain standardisation, an
    #                                input-level alignment for calibration, season or soil-moisture shifts); null: the
    #                                source normalisation. predict.py --domain target applies them.


@dataclass(frozen=True)
class SegDataConfig:
    """Image + mask tiles (section ``data``)."""

    root: str = "data/demo/s2/source"  # holds <image_dir>/, <mask_dir>/ and splits/
    num_classes: int = 6
    class_names: tuple[str, ...] | None = None  # names in metrics and TensorBoard (default "0", "1", ...)
    sensor: str | SensorDef = "S2L2A"  # S2L1C, S2L2A, S1, SAR4, or a mapping defining another sensor (as the
    #                                   pretraining data.sensor); with model.weights, the name of a sensor the
    #                                   export defines re-creates it from the export
    input_units: InputUnits | None = None  # what the files hold: dn, reflectance, linear_power, amplitude, db,
    #                                        complex (default: the sensor's)
    bands: tuple[str, ...] | None = None  # default: the export's bands with model.weights, else the sensor's
    stats_file: str | None = None  # default: the export's normalisation with model.weights, else reference stats
    offset: float = 0.0  # S2 DN offset (-1000 for processing baseline >= 04.00)
    image_dir: str = "images"
    mask_dir: str = "masks"
    labelled_split: str = "labelled_1_8"  # split file (root/splits/<name>.txt) of the labelled training tiles
    unlabelled_split: str | None = None  # split of the unlabelled tiles (semi-supervised methods)
    val_split: str = "val"
    batch_size: int = 8  # per process, labelled / source stream
    unlabelled_batch_size: int | None = None  # per process, unlabelled / target stream (null: data.batch_size)
    cache: bool = False  # keep decoded training tiles in memory (datasets that fit in RAM)
    checks: Literal["full", "header", "none"] = "full"  # input checks at start-up (full: reads every mask)
    stack: tuple[SegStackConfig, ...] = ()  # co-registered sensors appended as channels (S2 + S1 tiles), by id
    target: SegTargetConfig | None = None  # the unlabelled target domain of domain-adaptation methods
    store: str | None = None  # a store packed from data.root (python -m common.store pack): read instead of the
    #                           image/mask folders; splits resolve in it (sensor and bands must match the store)

    def validate(self) -> None:
        if not 1 <= self.num_classes < IGNORE_INDEX:
            raise ValueError(f"data.num_classes must be in [1, {IGNORE_INDEX}), got {self.num_classes}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"data.class_names has {len(self.class_names)} names for data.num_classes="
                             f"{self.num_classes}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.unlabelled_batch_size is not None and self.unlabelled_batch_size < 1:
            raise ValueError(f"data.unlabelled_batch_size must be >= 1 or null, got {self.unlabelled_batch_size}")


@dataclass(frozen=True)
class SegModelConfig:
    """Segmenter (section ``model``)."""

    arch: str = "resnet18"  # timm backbone
    version: Literal["v2", "v3", "v3+"] = "v3+"
    output_stride: int | None = 16  # 8 or 16 for dilated CNNs; null for backbones that cannot dilate
    aux: bool = False  # auxiliary head on the stage before the deepest
    aspp_channels: int = 256  # width of every ASPP branch (v3/v3+); 256 as published, smaller for small data/CPU
    decoder_channels: int = 256  # width of the fused decoder feature (v3/v3+)
    weights: str | None = None  # backbone weights: an export of ssl/export.py (.safetensors with .json) or a
    #                             timm state_dict file; null: random init
    band_mapping: bool = False  # map the first conv by band name when the weights were trained on other bands
    freeze_backbone: bool = False  # linear probing: train the head only
    drop_path_rate: float = 0.0
    stem_pool: bool | None = None  # false: a ResNet stem without its 3x3/2 max-pool (stride 2: all features at half
    #                                the stride); null: as the export in model.weights (or the model.init_from
    #                                run) says, true without one. A value contradicting the export is refused
    backbone_lr_mult: float = 1.0  # lr multiplier of the backbone (e.g. 0.1 for a pretrained one)
    init_from: str | None = None  # a previous fine-tuning run directory: start from its whole segmenter
    init_checkpoint: Literal["best", "last"] = "best"  # which of its weights (checkpoints/<name>.safetensors)

    def validate(self) -> None:
        if self.init_from is not None and self.weights is not None:
            raise ValueError("model.init_from (a whole segmenter) and model.weights (a backbone) exclude each other")
        if self.output_stride not in (None, 8, 16, 32):
            raise ValueError(f"model.output_stride must be 8, 16, 32 or null, got {self.output_stride}")
        if self.backbone_lr_mult < 0:
            raise ValueError("model.backbone_lr_mult must be >= 0")
        for key in ("aspp_channels", "decoder_channels"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class LossConfig:
    """Segmentation loss (section ``loss``)."""

    name: Literal["ce", "ohem", "dice", "ce_dice"] = "ce"  # ignore index 255 everywhere
    class_weights: tuple[float, ...] | None = None  # per-class weights (imbalanced classes)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation (section ``eval``)."""

    batch_size: int = 8
    window: int | None = None  # sliding-window size for tiles larger than the training crop (null: whole tile)
    overlap: float = 0.5  # window overlap fraction
    building_f1: bool = False  # SpaceNet instance F1 of the foreground class (polygons at IoU >= 0.5)
    foreground_class: int = 1  # class scored by building_f1
    num_images: int = 4  # validation tiles shown in TensorBoard (input / ground truth / prediction)

    def validate(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ValueError(f"eval.overlap must be in [0, 1), got {self.overlap}")
        if self.window is not None and self.window < 8:
            raise ValueError(f"eval.window must be >= 8 or null, got {self.window}")


def default_optim() -> OptimConfig:
    return OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, schedule="poly", poly_power=0.9)


def default_trainer() -> TrainerConfig:
    return TrainerConfig(epochs=None, best_metric="mIoU")
