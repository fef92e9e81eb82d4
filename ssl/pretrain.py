"""DINO pretraining of a timm backbone on unlabelled multispectral / SAR tiles.

    accelerate launch ssl/pretrain.py --config configs/pretrain/demo.yaml --output-dir runs/pretrain [key=value ...]

One step (facebookresearch/dino ``train_one_epoch``, Caron et al. 2021), mapped onto the shared engine:

1. ``forward``: the teacher (no gradient) embeds the 2 global views, the student all ``2 + N`` views
   (:class:`~eo_ssl.dino.MultiCropWrapper`: one backbone pass per resolution group); the loss is Eq. (3) with the
   centred, sharpened teacher distribution; then the center is updated (Eq. 4, all-reduced over processes).
2. the engine back-propagates, ``on_after_backward`` drops the last layer's gradients during the first
   ``dino.freeze_last_layer`` epochs, the engine clips (``trainer.clip_mode: per_parameter`` as the reference) and
   steps with the lr (warm-up + cosine, scaled by global batch / 256) and weight-decay (cosine) schedules;
3. ``after_optimizer_step``: ``teacher <- m teacher + (1 - m) student`` with the cosine momentum schedule.

Augmentation: the views are made per sample in the DataLoader workers (:mod:`eo_ssl.multicrop`, ``augment.device:
workers``, the default) or in batch on the GPU (:mod:`eo_ssl.multicrop_device`, ``augment.device: cuda``; the
workers only decode), see :func:`tile_stream`.

At the end (and with ``python ssl/export.py --run DIR``) the teacher backbone is exported as
``DIR/backbone.safetensors`` + ``DIR/backbone.json`` (see :mod:`eo_ssl.export`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.backbones import create_embedding_backbone
from common.bands import InputUnits, SensorDef, SensorSpec, resolve_sensors
from common.cli import parse_training_args, training_parser
from common.device_aug import DecodedTiles, collate_decoded
from common.datasets import StackedDataset, UnlabelledTiles, stacked_segmentation_dataset
from common.engine import Engine, LoaderSpec, RunPlan, TrainerConfig
from common.optim import OptimConfig
from common.sampling import AugmentedDataset, CachedDataset
from common.store import store_tiles
from eo_ssl.dino import DINOConfig, DINOMethod
from eo_ssl.multicrop import MultiCropConfig, MultiCropTransform, band_units, collate_multicrop
from eo_ssl.multicrop_device import DeviceMultiCrop
from common.errors import MissingFileError, UserInputError, cli_entry

__all__ = ["PretrainConfig", "DINOMethod", "main", "knn_probe", "check_schedule", "build_method", "build_dataset",
           "resolve_augment", "tile_stream"]


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class StackSourceConfig:
    """A co-registered sensor whose bands are appended to the tiles' channels (an entry of ``data.stack``), e.g. the
    Sentinel-1 tiles of Sentinel-2 tiles. Its tiles are paired with the primary tiles by ``data.stack_match``."""

    root: str  # directory searched with `glob` (or BigEarthNet patch folders)
    sensor: str | SensorDef  # S1, S2L2A, ... (common/bands.py) or a mapping as data.sensor; band names must differ
    glob: str = "**/*.tif"
    layout: Literal["auto", "multiband", "band_files"] = "auto"
    bands: tuple[str, ...] | None = None  # default: all bands of the sensor
    stats_file: str | None = None  # this sensor's statistics (default: reference stats)
    input_units: InputUnits | None = None  # what this sensor's files hold (as data.input_units)


@dataclass(frozen=True)
class PretrainDataConfig:
    """Unlabelled tiles (section ``data``)."""

    root: str = "data/demo"  # directory searched with `glob` (or BigEarthNet patch folders)
    glob: str = "**/*.tif"  # file pattern under root
    layout: Literal["auto", "multiband", "band_files"] = "auto"  # band_files: one GeoTIFF per band (BigEarthNet)
    sensor: str | SensorDef = "S2L2A"  # S2L1C, S2L2A, S1, SAR4 (common/bands.py), or a mapping defining another
    #                                   sensor: {name, bands (file order), input_units, scale_factor, add_offset,
    #                                   model_units, nodata, gsd, mean, std, stats_file, rgb} or {base, name, bands}
    input_units: InputUnits | None = None  # what the files hold: dn, reflectance, linear_power, amplitude, db,
    #                                        complex (default: the sensor's; SAR4 linear_power, S1 db, S2 dn)
    bands: tuple[str, ...] | None = None  # band names in channel order (default: all bands of the sensor)
    stats_file: str | None = None  # per-band mean/std from `python -m common.stats` (default: reference stats)
    offset: float = 0.0  # S2 DN offset (-1000 for processing baseline >= 04.00)
    tile_size: int | None = None  # cut large scenes into tiles of this size
    batch_size: int = 32  # per process
    cache: bool = False  # keep decoded tiles in memory (datasets that fit in RAM; saves the GeoTIFF reads)
    exclude_ids_from: tuple[str, ...] = ()  # split files (one id per line): tiles with these ids are left out
    checks: Literal["full", "header", "none"] = "header"  # input checks at start-up (full: read every pixel)
    stack: tuple[StackSourceConfig, ...] = ()  # co-registered sensors appended as channels (S2 + S1 tiles)
    stack_match: Literal["path", "stem", "bigearthnet"] = "path"  # pairing: path under root / file stem / BigEarthNet
    stack_missing: Literal["error", "skip"] = "error"  # a tile without a partner: refuse, or leave it out
    store: str | None = None  # a tile store packed from this config (python -m common.store pack): read instead of
    #                           root/glob/layout and the stack roots (sensor, bands, tile_size must match the store)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class PretrainModelConfig:
    """The backbone (section ``model``)."""

    arch: str = "resnet18"  # any timm architecture (resnet50, vit_small_patch16_224, convnext_tiny ...)
    drop_path_rate: float = 0.0  # stochastic depth of the student (DINO ViT-S: 0.1)
    init_file: str | None = None  # continue from local weights (a previous export or timm file), strict
    stem_pool: bool = True  # false: a ResNet stem without its 3x3/2 max-pool (stride 2, not 4: small crops keep
    #                         more than 1x1 features); same weights, recorded in the export for fine-tuning
    output_stride: int | None = None  # 8 or 16: dilate the last stages (CNNs) so the last feature map has this
    #                                   stride, as DeepLab's backbone; for dino.dense_weight > 0 (more locations
    #                                   per crop). Same weights; null: the architecture's own (32)


@dataclass(frozen=True)
class ProbeConfig:
    """Optional k-NN probe of the teacher backbone on a labelled set (section ``probe``), run every
    ``trainer.eval_every`` steps and at the end. Each tile's label is the majority class of its mask."""

    root: str | None = None  # segmentation dataset root (images/, masks/, splits/); null: no probe
    train_split: str = "train_all"  # the k-NN memory bank
    val_split: str = "val"  # the evaluated tiles
    image_dir: str = "images"
    mask_dir: str = "masks"
    stack_image_dirs: tuple[str, ...] = ()  # with data.stack: the image directory of each stacked sensor, in order
    num_classes: int = 6
    k: int = 20  # neighbours (DINO: 20)
    temperature: float = 0.07  # vote weights exp(cos / T) (DINO: 0.07)
    max_train: int | None = None  # subsample the memory bank
    batch_size: int = 64

    def validate(self) -> None:
        if self.k < 1 or self.temperature <= 0 or self.num_classes < 2:
            raise ValueError("probe.k must be >= 1, probe.temperature > 0 and probe.num_classes >= 2")


def _default_optim() -> OptimConfig:
    # DINO's defaults: AdamW, lr 5e-4 x global batch / 256, 10 warm-up epochs, cosine to 1e-6, wd 0.04 -> 0.4.
    return OptimConfig(name="adamw", lr=5e-4, scale_lr_with_batch=True, min_lr=1e-6, schedule="cosine",
                       warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4)


def _default_trainer() -> TrainerConfig:
    return TrainerConfig(epochs=None, clip_grad=3.0, clip_mode="per_parameter", best_metric=None)


@dataclass(frozen=True)
class PretrainConfig:
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    augment: MultiCropConfig = field(default_factory=MultiCropConfig)
    optim: OptimConfig = field(default_factory=_default_optim)
    trainer: TrainerConfig = field(default_factory=_default_trainer)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> None:
        if self.model.output_stride not in (None, 8, 16, 32):
            raise ValueError(f"model.output_stride must be 8, 16, 32 or null, got {self.model.output_stride}")
        if self.probe.root is not None and self.trainer.best_metric not in (None, "knn_top1"):
            raise ValueError("trainer.best_metric of a pretraining run can only be knn_top1 (with a probe) or null")
        if self.probe.root is None and self.trainer.best_metric is not None:
            raise ValueError("trainer.best_metric needs a probe (probe.root)")


# ---------------------------------------------------------------------------------------------- k-NN probe
def majority_labels(masks: torch.Tensor, num_classes: int, ignore: int = 255) -> torch.Tensor:
    """Per-tile majority class of ``(B, H, W)`` masks (ignored pixels excluded; -1 when all are ignored)."""
    flat = masks.reshape(masks.shape[0], -1).long()
    counts = torch.zeros(masks.shape[0], num_classes + 1, dtype=torch.long)
    counts.scatter_add_(1, torch.where(flat == ignore, num_classes, flat.clamp(max=num_classes)),
                        torch.ones_like(flat))
    counts = counts[:, :num_classes]
    return torch.where(counts.sum(1) > 0, counts.argmax(1), torch.full_like(counts[:, 0], -1))


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int,
                 temperature: float, num_classes: int) -> torch.Tensor:
    """DINO's weighted k-NN (``eval_knn.knn_classifier``): cosine similarities of l2-normalised features, the
    ``k`` nearest vote with weight ``exp(sim / T)``. Returns predicted labels ``(N_test,)``."""
    train_feats = F.normalize(train_feats.float(), dim=1)
    test_feats = F.normalize(test_feats.float(), dim=1)
    k = min(k, train_feats.shape[0])
    sim, idx = (test_feats @ train_feats.T).topk(k, dim=1)
    votes = torch.zeros(test_feats.shape[0], num_classes)
    votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
    return votes.argmax(1)


class ProbeTransform:
    """A probe sample: the image normalised with the run's statistics (invalid pixels 0) and its mask as tensors."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean, self.std = mean[:, None, None], std[:, None, None]

    def __call__(self, sample: dict) -> dict:
        image = (np.asarray(sample["image"], np.float32) - self.mean) / self.std
        image[:, ~np.asarray(sample["valid"], bool)] = 0.0
        return {"image": torch.from_numpy(np.ascontiguousarray(image, np.float32)),
                "mask": torch.as_tensor(np.asarray(sample["mask"]), dtype=torch.long)}


def knn_probe(backbone: nn.Module, train_ds, val_ds, probe: ProbeConfig, device: torch.device) -> dict[str, float]:
    """k-NN top-1 accuracy of tile majority classes from pooled backbone features.

    Every process embeds the whole (small) probe set, so the result is identical on all processes.
    """
    def embed(ds) -> tuple[torch.Tensor, torch.Tensor]:
        loader = torch.utils.data.DataLoader(ds, batch_size=probe.batch_size, shuffle=False)
        feats, labels = [], []
        for b in loader:
            feats.append(backbone(b["image"].to(device)).float().cpu())
            labels.append(majority_labels(b["mask"], probe.num_classes))
        return torch.cat(feats), torch.cat(labels)

    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        f_train, y_train = embed(train_ds)
        f_val, y_val = embed(val_ds)
    backbone.train(was_training)
    keep = y_train >= 0
    f_train, y_train = f_train[keep], y_train[keep]
    pred = knn_classify(f_train, y_train, f_val, probe.k, probe.temperature, probe.num_classes)
    valid = y_val >= 0
    acc = (pred[valid] == y_val[valid]).float().mean().item() if valid.any() else float("nan")
    return {"knn_top1": 100.0 * acc}


def build_probe_sets(cfg: PretrainConfig, spec: SensorSpec):
    p = cfg.probe
    tf = ProbeTransform(spec.mean_array(), spec.std_array())
    if len(p.stack_image_dirs) != len(spec.parts[1:]):
        raise UserInputError(f"probe.stack_image_dirs: the {spec.name} data needs {len(spec.parts[1:])} stacked image "
                         f"director{'y' if len(spec.parts) == 2 else 'ies'} for the probe, got {list(p.stack_image_dirs)}")
    kw = dict(image_dirs=[p.image_dir, *p.stack_image_dirs], mask_dir=p.mask_dir, num_classes=p.num_classes,
              transform=tf, offset=cfg.data.offset)
    train = stacked_segmentation_dataset(p.root, p.train_split, spec, **kw)
    val = stacked_segmentation_dataset(p.root, p.val_split, spec, **kw)
    if p.max_train is not None and len(train) > p.max_train:
        idx = np.linspace(0, len(train) - 1, p.max_train).round().astype(int).tolist()
        train = torch.utils.data.Subset(train, idx)
    return train, val


# ---------------------------------------------------------------------------------------------- entry point
def resolve_data_sensor(d: PretrainDataConfig) -> SensorSpec:
    """The run's sensor spec: ``data.sensor`` (bands, statistics), stacked with the ``data.stack`` sensors."""
    return resolve_sensors([(d.sensor, d.bands, d.stats_file, d.input_units)]
                           + [(x.sensor, x.bands, x.stats_file, x.input_units) for x in d.stack])


def build_dataset(cfg: PretrainConfig, spec: SensorSpec) -> AugmentedDataset | DecodedTiles:
    """The training tiles of ``cfg.data``, with the multi-crop views made per sample (``augment.device: workers``) or
    decoded only (the device path, see :func:`tile_stream`). Every input is checked here, before any run starts."""
    d = cfg.data
    roots = [("data.root", d.root)] + [(f"data.stack[{i}].root", x.root) for i, x in enumerate(d.stack)]
    for key, root in roots if d.store is None else []:
        if not Path(root).exists():
            raise MissingFileError(f"{key}: {root} does not exist; set {key} to the folder of your tiles")
    excluded: set[str] = set()
    for split in d.exclude_ids_from:
        path = Path(split)
        if not path.is_file():
            raise MissingFileError(f"data.exclude_ids_from: split file {path} not found; fix the path or remove it "
                                   f"from data.exclude_ids_from")
        excluded |= {line.strip() for line in path.read_text().splitlines() if line.strip()}
    if excluded and d.store is None and not Path(d.root).is_dir():
        raise MissingFileError(f"data.root: {d.root} is not a directory; set data.root to the folder of your tiles")
    tiles: Any
    if d.store is not None:
        tiles = store_tiles(d.store, spec, tile_size=d.tile_size, offset=d.offset, validate=d.checks,
                            exclude_ids=excluded)
    elif d.stack:
        if len(spec.parts) != 1 + len(d.stack):
            raise UserInputError(f"data.stack: sensor {spec.name} has {len(spec.parts)} parts for {1 + len(d.stack)} "
                             f"sources")
        primary = UnlabelledTiles(d.root, sensor=spec.parts[0], glob=d.glob, layout=d.layout, tile_size=d.tile_size,
                                  validate=d.checks, offset=d.offset, fill_value=None, exclude_ids=excluded)
        others = [UnlabelledTiles(x.root, sensor=part, glob=x.glob, layout=x.layout, tile_size=d.tile_size,
                                  validate=d.checks, offset=d.offset, fill_value=None)
                  for x, part in zip(d.stack, spec.parts[1:])]
        tiles = StackedDataset.join([primary, *others], match=d.stack_match, missing=d.stack_missing,
                                    check_grids=d.checks != "none")
    else:
        tiles = UnlabelledTiles(d.root, sensor=spec, bands=spec.bands, glob=d.glob, layout=d.layout,
                                tile_size=d.tile_size, validate=d.checks, offset=d.offset, exclude_ids=excluded)
    aug = resolve_augment(cfg, spec)
    base = CachedDataset(tiles) if d.cache else tiles
    if aug.device != "workers":  # the loader only decodes; tile_stream's device transform makes the views
        return DecodedTiles(base)
    transform = MultiCropTransform(aug, spec.mean_array(), spec.std_array(), units=band_units(spec))
    return AugmentedDataset(base, transform, seed=cfg.trainer.seed)


def resolve_augment(cfg: PretrainConfig, spec: SensorSpec) -> MultiCropConfig:
    """``cfg.augment`` for the data's sensors: a stack's sensor groups filled in (sensor dropout), raw channel
    augmentation refused on stacks that mix units."""
    aug = cfg.augment
    if spec.is_stack:
        if not aug.sensor_groups:
            aug = replace(aug, sensor_groups=spec.sensor_groups())
        if max(aug.channel_p) > 0 and aug.channel_mode == "raw" and len(set(band_units(spec))) > 1:
            raise UserInputError(f"augment.channel_mode: raw copies one band's raw values into every band, but the "
                             f"{spec.name} stack mixes units ({', '.join(sorted(set(band_units(spec))))}); set "
                             f"augment.channel_mode: normalized (or augment.channel_p: [0, 0, 0])")
    return aug


def tile_stream(cfg: PretrainConfig, spec: SensorSpec, dataset: Any) -> LoaderSpec:
    """The training stream of :func:`build_dataset`'s dataset: views made in the loader workers and stacked by
    :func:`~eo_ssl.multicrop.collate_multicrop` (``augment.device: workers``), or decoded tiles stacked by
    :func:`~common.device_aug.collate_decoded` whose views the engine makes in batch on the device
    (:class:`~eo_ssl.multicrop_device.DeviceMultiCrop`; ``augment.device: cuda`` or ``cpu``)."""
    aug = resolve_augment(cfg, spec)
    if aug.device == "workers":
        return LoaderSpec(dataset, cfg.data.batch_size, collate_fn=collate_multicrop)
    transform = DeviceMultiCrop(aug, spec.mean_array(), spec.std_array(), units=band_units(spec))
    return LoaderSpec(dataset, cfg.data.batch_size, collate_fn=collate_decoded, device_transform=transform)


@cli_entry
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = training_parser(__doc__.split("\n\n")[0], prog="ssl/pretrain.py")
    cfg, args = parse_training_args(PretrainConfig, parser, argv)
    spec = resolve_data_sensor(cfg.data)
    # Build (and validate) the data before the engine starts anything: bad input fails here, naming the file.
    dataset = build_dataset(cfg, spec)
    probe_sets = build_probe_sets(cfg, spec) if cfg.probe.root is not None else None

    engine = Engine(cfg.trainer, args.output_dir, config=cfg, resume=args.resume, cpu=args.cpu,
                    overwrite=args.overwrite)
    loaders = {"tiles": tile_stream(cfg, spec, dataset)}
    plan = engine.plan(loaders)
    check_schedule(cfg, plan)  # before any model is built
    engine.print(f"DINO pretraining: {cfg.model.arch} on {len(dataset.base)} tiles of {spec.name} "
                 f"({len(spec.bands)} bands: {', '.join(spec.bands)}), {cfg.augment.num_crops} crops per tile, "
                 f"{plan.total_steps} steps")
    method = build_method(cfg, len(spec.bands), plan.epochs, plan.total_steps, rgb=spec.rgb_indices())

    evaluate = None
    if probe_sets is not None:
        def evaluate(method: DINOMethod, eng: Engine) -> dict[str, float]:
            return knn_probe(method.eval_model, probe_sets[0], probe_sets[1], cfg.probe, eng.device)

    engine.fit(method, loaders, cfg.optim, evaluate=evaluate)
    extra: dict[str, Any] = {}
    if engine.is_main:
        from eo_ssl.export import export_run

        weights, sidecar = export_run(engine.run_dir)
        extra["export"] = {"weights": str(weights), "metadata": str(sidecar)}
        engine.print(f"exported teacher backbone to {weights}")
    engine.accelerator.wait_for_everyone()
    return engine.finish(extra)


def build_method(cfg: PretrainConfig, in_chans: int, epochs: int | None = None, total_steps: int | None = None,
                 rgb: tuple[int, int, int] = (0, 1, 2)) -> DINOMethod:
    """The DINO method of a config: student and teacher backbones (``model.arch``, ``in_chans`` bands) and heads.
    ``epochs`` / ``total_steps``: the run's plan (default, outside a run: ``trainer.epochs``, one step each)."""
    epochs = epochs or cfg.trainer.epochs or max(cfg.dino.warmup_teacher_temp_epochs, 1)
    total_steps = total_steps or epochs
    m = cfg.model
    try:
        student = create_embedding_backbone(m.arch, in_chans, drop_path_rate=m.drop_path_rate,
                                            pretrained_file=m.init_file, stem_pool=m.stem_pool,
                                            output_stride=m.output_stride)
        teacher = create_embedding_backbone(m.arch, in_chans, stem_pool=m.stem_pool, output_stride=m.output_stride)
    except ValueError as exc:
        if m.output_stride is None or "output_stride" not in str(exc):
            raise
        raise UserInputError(f"model.output_stride: {exc}") from None
    return DINOMethod(cfg.dino, student, teacher, cfg.augment.num_crops, epochs, total_steps, rgb=rgb)


def check_schedule(cfg: PretrainConfig, plan: RunPlan) -> None:
    """Schedules that the run's length cannot hold, refused before any model is built."""
    d = cfg.dino
    if d.warmup_teacher_temp_epochs > plan.epochs:
        raise UserInputError(
            f"dino.warmup_teacher_temp_epochs={d.warmup_teacher_temp_epochs} exceeds the run's {plan.epochs} epochs "
            f"({plan.total_steps} steps of {plan.steps_per_epoch}); lower dino.warmup_teacher_temp_epochs or train "
            f"longer (trainer.epochs / trainer.max_steps)")



if __name__ == "__main__":
    main()
