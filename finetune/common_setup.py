"""What every fine-tuning entry point shares: the config sections, resolving bands / normalisation / weights,
building the segmenter, the datasets and the evaluation loop.

The model description written to ``<run>/model.json`` (architecture, classes, bands, normalisation, which
``state_dict`` prefix holds the evaluated network) is what :mod:`finetune.predict` rebuilds the model from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from common.bands import (
    IGNORE_INDEX,
    SENSORS,
    BandStats,
    InputUnits,
    SensorDef,
    SensorSpec,
    resolve_sensor,
    resolve_sensors,
    stack_sensors,
)
from common.checkpoint import atomic_write_json
from common.datasets import stacked_segmentation_dataset
from common.engine import TrainerConfig
from common.optim import OptimConfig
from common.sampling import AugmentedDataset, CachedDataset
from common.weights import EXPORT_FORMAT, ExportMeta, ExportMismatchError, check_compatible, read_export_meta
from finetune.deeplab import create_segmenter
from finetune.losses import build_segmentation_loss
from finetune.metrics import BuildingF1, ConfusionMatrix
from finetune.inference import sliding_window_inference
from finetune.transforms import SegAugConfig, SegmentationTransform
from common.errors import MissingFileError, UserInputError

__all__ = [
    "SegDataConfig",
    "SegStackConfig",
    "data_sensor",
    "SegModelConfig",
    "LossConfig",
    "EvalConfig",
    "ResolvedInputs",
    "resolve_inputs",
    "build_model",
    "segmentation_datasets",
    "make_evaluate",
    "write_model_card",
    "PALETTE",
]

# Colours for class maps in TensorBoard (demo classes: water, forest, cropland, grassland, built-up, bare soil).
PALETTE = np.array([
    [31, 120, 180], [27, 94, 32], [240, 200, 40], [150, 220, 90], [200, 30, 30], [150, 110, 70],
    [128, 0, 128], [0, 200, 200], [255, 127, 0], [90, 90, 90], [255, 255, 255], [0, 0, 0],
], dtype=np.uint8)


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
    weights: str | None = None  # backbone weights: an export of ssl/export.py (.safetensors with .json) or a
    #                             timm state_dict file; null: random init
    band_mapping: bool = False  # map the first conv by band name when the weights were trained on other bands
    freeze_backbone: bool = False  # linear probing: train the head only
    drop_path_rate: float = 0.0
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


# ------------------------------------------------------------------------------------------------------------
# bands, normalisation and weights
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ResolvedInputs:
    spec: SensorSpec  # bands in model order with the statistics used for normalisation
    weights: str | None  # backbone weights file
    band_map: tuple[list[str], list[str]] | None  # (weights' bands, dataset bands) for the first conv
    export: ExportMeta | None  # metadata of an export, when the weights are one
    notes: list[str] = field(default_factory=list)


def _export_meta(path: Path) -> ExportMeta | None:
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        raw = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return None
    if raw.get("format") != EXPORT_FORMAT:
        return None
    return read_export_meta(path)


def _sensor_name(sensor: str | SensorDef) -> str:
    return sensor.name if isinstance(sensor, SensorDef) else str(sensor)


def _known_sensor(sensor: str | SensorDef, known: dict[str, SensorSpec]) -> str | SensorDef | SensorSpec:
    """A sensor name outside the registry that ``known`` (an export's sensors) defines becomes that definition; a
    sensor mapping without statistics takes the export's statistics of its bands."""
    if isinstance(sensor, str) and sensor.upper() not in {k.upper() for k in SENSORS} and sensor in known:
        return known[sensor]
    if isinstance(sensor, SensorDef) and sensor.mean is None and sensor.stats_file is None and sensor.name in known:
        ref = known[sensor.name]
        if all(b in ref.mean for b in sensor.bands):
            return replace(sensor, mean={b: ref.mean[b] for b in sensor.bands}, std={b: ref.std[b] for b in sensor.bands})
    return sensor


def data_sensor(data: SegDataConfig, bands: list[str] | tuple[str, ...] | None = None,
                known: dict[str, SensorSpec] | None = None) -> SensorSpec:
    """The sensor of ``data``: ``data.sensor`` stacked with the ``data.stack`` sensors (each reading the files' declared
    ``input_units``), restricted to ``bands`` (over the whole stack, e.g. an export's) or to each sensor's configured
    bands, with each sensor's stats file. A sensor named but not in the registry is taken from ``known`` (the sensors
    an export defines, :func:`export_sensors`).

    Raises:
        DataError (UnknownSensorError is also a KeyError): unknown sensor or band, a stats file lacking a band, or
            ``bands`` that leave out a stacked sensor entirely.
    """
    known = known or {}
    sources = [(_known_sensor(data.sensor, known), data.bands, data.stats_file, data.input_units)] + [
        (_known_sensor(x.sensor, known), x.bands, x.stats_file, x.input_units) for x in data.stack]
    if bands is None:
        return resolve_sensors(sources)
    if not data.stack:
        sensor, _, stats, units = sources[0]
        return resolve_sensor(sensor, bands, stats, units)
    full = [s.to_spec(require_stats=stats is None).with_input_units(u) if isinstance(s, SensorDef)
            else resolve_sensor(s, None, None, u) for s, _, stats, u in sources]
    spec = stack_sensors(*full).subset(bands)
    if len(spec.parts) != len(sources):
        raise ExportMismatchError(f"bands {list(bands)} leave out a sensor of the data's stack "
                                  f"{'+'.join(p.name for p in full)}; remove it from data.stack or select its bands")
    parts = [p.with_stats(BandStats.from_json(stats)) if stats else p for p, (_, _, stats, _) in zip(spec.parts, sources)]
    return stack_sensors(*parts)


def export_sensors(meta: ExportMeta) -> dict[str, SensorSpec]:
    """The sensors an export defines (from its ``sensor_def``), by name; empty for exports written before it."""
    if not meta.sensor_def:
        return {}
    spec = SensorSpec.from_dict(meta.sensor_def)
    return {p.name: p for p in (spec.parts or (spec,))}


_MODEL_UNITS = {"dn_to_reflectance": "reflectance", "db": "dB", "linear_to_db": "dB", "amplitude_to_db": "dB",
                "complex_to_intensity_db": "dB", "complex_to_amplitude": "amplitude"}


def _check_sensor_definitions(meta: ExportMeta, spec: SensorSpec, source: str) -> str:
    """The conversion to compare with the export's: the export's own when every sensor gives the same model units
    from differently declared input units (e.g. SAR4 pretrained on linear power, fine-tuned on dB files), else the
    data's. A custom sensor whose scale_factor/add_offset differ from the export's is refused."""
    exported = export_sensors(meta)
    for part in spec.parts or (spec,):
        other = exported.get(part.name)
        if other is not None and part.conversion == other.conversion == "scale_offset" and (
                (part.scale_factor, part.add_offset) != (other.scale_factor, other.add_offset)):
            raise ExportMismatchError(
                f"sensor {part.name} of {source} scales raw values with scale_factor {part.scale_factor:g} and "
                f"add_offset {part.add_offset:g}, the export's with {other.scale_factor:g} and {other.add_offset:g}: "
                f"set them as the export's (or give data.sensor: {part.name} to re-create the export's definition)")
    theirs = meta.normalisation.conversion.split("+")
    ours = [p.conversion for p in spec.parts or (spec,)]
    if len(theirs) == len(ours) and all(a == b or (_MODEL_UNITS.get(a) is not None and
                                                   _MODEL_UNITS.get(a) == _MODEL_UNITS.get(b))
                                        for a, b in zip(theirs, ours)):
        return meta.normalisation.conversion
    return spec.conversion


def resolve_inputs(data: SegDataConfig, model: SegModelConfig, source: str = "the config") -> ResolvedInputs:
    """Decide the bands, normalisation and weights of a run, refusing an export that does not fit the data.

    * ``model.weights`` an export and ``data.bands`` unset: the export's bands. ``data.stats_file`` unset: the
      export's normalisation (the statistics the backbone was pretrained with). A stats file or bands that differ
      from the export's are checked (:func:`common.weights.check_compatible`) and refused with a clear message,
      unless ``model.band_mapping`` maps the first convolution by band name (then the dataset's statistics apply).
    * otherwise: ``data.bands`` (or all the sensor's bands) with ``data.stats_file`` or the reference statistics.

    Raises:
        FileNotFoundError: the weights file does not exist. ExportMismatchError: bands / normalisation differ.
    """
    notes: list[str] = []
    if model.weights is None:
        return ResolvedInputs(data_sensor(data), None, None, None, notes)
    path = Path(model.weights)
    if not path.is_file():
        raise MissingFileError(f"model.weights: {path} does not exist; point model.weights at an export of ssl/export.py "
                               f"(.safetensors next to its .json) or a timm state_dict file")
    meta = _export_meta(path)
    if meta is None:  # a plain timm state_dict: nothing to check against
        spec = data_sensor(data)
        notes.append(f"model.weights {path} has no export sidecar: bands and normalisation cannot be checked")
        return ResolvedInputs(spec, str(path), None, None, notes)

    known = export_sensors(meta)
    explicit = data.bands is not None or any(x.bands is not None for x in data.stack)
    bands = list(data_sensor(data, known=known).bands) if explicit else list(meta.bands)
    same_bands = bands == list(meta.bands)
    if not same_bands and not model.band_mapping:
        # names the differing bands and the keys that fix it
        check_compatible(meta, bands, meta.normalisation.conversion, [0.0] * len(bands), [1.0] * len(bands), source)
    try:
        spec = data_sensor(data, bands, known=known)
    except ValueError as exc:
        sensors = "+".join([_sensor_name(data.sensor), *(_sensor_name(x.sensor) for x in data.stack)])
        raise ExportMismatchError(
            f"backbone export was trained on {meta.sensor} bands {meta.bands} but {source} reads {sensors}: {exc}. "
            f"Stack the missing sensor's tiles with data.stack (e.g. S1 tiles next to S2 tiles), or set data.bands "
            f"and model.band_mapping=true to map the first convolution by band name."
        ) from None
    conversion = _check_sensor_definitions(meta, spec, source)
    if conversion != meta.normalisation.conversion:
        check_compatible(meta, bands, conversion, spec.mean_array(), spec.std_array(), source)
    stats_given = data.stats_file is not None or any(x.stats_file is not None for x in data.stack)
    if same_bands:
        if not stats_given:
            spec = spec.with_stats(BandStats(mean=dict(zip(bands, meta.normalisation.mean)),
                                             std=dict(zip(bands, meta.normalisation.std))))
            notes.append("normalisation taken from the export")
        else:
            check_compatible(meta, bands, conversion, spec.mean_array(), spec.std_array(), source)
        if float(data.offset) != float(meta.normalisation.offset):
            raise ExportMismatchError(f"backbone export expects the S2 DN offset {meta.normalisation.offset} but "
                                      f"{source} sets data.offset={data.offset}")
        return ResolvedInputs(spec, str(path), None, meta, notes)
    notes.append(f"first convolution mapped by band name from {meta.bands} to {bands}")
    return ResolvedInputs(spec, str(path), (list(meta.bands), bands), meta, notes)


def build_model(model: SegModelConfig, num_classes: int, inputs: ResolvedInputs | None, in_chans: int,
                load_weights: bool = True) -> nn.Module:
    weights = inputs.weights if (inputs is not None and load_weights) else None
    band_map = inputs.band_map if (inputs is not None and load_weights) else None
    return create_segmenter(model.arch, model.version, num_classes, in_chans, output_stride=model.output_stride,
                            aux=model.aux, pretrained_file=weights, band_map=band_map,
                            drop_path_rate=model.drop_path_rate)


def build_loss(loss: LossConfig, num_classes: int) -> nn.Module:
    return build_segmentation_loss(loss.name, num_classes, class_weights=loss.class_weights)


class _EvalTransform:
    """Normalisation only (validation / prediction)."""

    def __init__(self, spec: SensorSpec):
        self.tf = SegmentationTransform(spec.mean_array(), spec.std_array(), None, train=False)

    def __call__(self, sample: dict) -> dict:
        out = self.tf(sample, None)
        return {k: out[k] for k in ("image", "mask", "valid", "index") if k in out}


def segmentation_datasets(data: SegDataConfig, spec: SensorSpec, augment: SegAugConfig, seed: int,
                          labelled_split: str | None = None, with_unlabelled: bool = False) -> dict[str, Any]:
    """``{"labelled": train set, "val": val set[, "unlabelled": ...]}``; every file is checked here, at start-up."""
    kw = dict(image_dirs=[data.image_dir, *(x.image_dir for x in data.stack)],
              image_patterns=["{id}.tif", *(x.image_pattern for x in data.stack)], mask_dir=data.mask_dir,
              num_classes=data.num_classes, validate=data.checks, offset=data.offset, class_names=data.class_names)
    train_tf = SegmentationTransform(spec.mean_array(), spec.std_array(), augment, train=True)
    out: dict[str, Any] = {
        "labelled": AugmentedDataset(_cached(_Strip(stacked_segmentation_dataset(
            data.root, labelled_split or data.labelled_split, spec, **kw)), data.cache), train_tf, seed=seed),
        "val": stacked_segmentation_dataset(data.root, data.val_split, spec, transform=_EvalTransform(spec), **kw),
    }
    if with_unlabelled:
        if data.unlabelled_split is None:
            raise UserInputError("this method trains on unlabelled tiles: set data.unlabelled_split")
        out["unlabelled"] = AugmentedDataset(
            _cached(_Strip(stacked_segmentation_dataset(data.root, data.unlabelled_split, spec, labelled=False,
                                                        **kw)), data.cache),
            train_tf, seed=seed + 1)
    return out


def _cached(ds, cache: bool):
    return CachedDataset(ds) if cache else ds


class _Strip(torch.utils.data.Dataset):
    """Keeps the keys training batches need (drops ids/georeferencing that do not collate)."""

    KEYS = ("image", "mask", "valid", "index")

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        s = self.base[i]
        return {k: s[k] for k in self.KEYS if k in s}


# ------------------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------------------


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


def write_model_card(run_dir: Path, model: SegModelConfig, data: SegDataConfig, inputs: ResolvedInputs,
                     method: str, eval_prefix: str) -> None:
    """``<run>/model.json``: everything :mod:`finetune.predict` needs to rebuild and feed the model; its
    ``normalisation`` spells out per band how raw file values become model input (units, scale, offset, dB step, mean,
    std) and the nodata policy, as an export's (:meth:`common.weights.Normalisation.from_spec`)."""
    from dataclasses import asdict

    from common.weights import Normalisation

    spec = inputs.spec
    atomic_write_json(run_dir / "model.json", {
        "method": method,
        "arch": model.arch,
        "version": model.version,
        "output_stride": model.output_stride,
        "aux": model.aux,
        "num_classes": data.num_classes,
        "class_names": list(data.class_names) if data.class_names else None,
        "sensor": spec.name,
        "bands": list(spec.bands),
        "sensor_parts": [{"sensor": p.name, "bands": list(p.bands), "conversion": p.conversion, "units": p.units}
                         for p in spec.parts],
        "sensor_def": spec.to_dict(),  # predict re-creates the sensor (custom ones too) from it
        "normalisation": asdict(Normalisation.from_spec(spec, float(data.offset))),
        "state_dict_prefix": eval_prefix,
        "weights_init": inputs.weights,
    })
