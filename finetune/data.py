"""Segmentation data by role: what each training stream and validation set of a fine-tuning run reads.

Roles (a method's ``streams`` name them; :func:`stream_dataset` builds one):

* ``labelled`` / ``source``: ``data.labelled_split`` of ``data.root``, images + masks (the source domain of an
  adaptation run is the labelled data);
* ``unlabelled``: ``data.unlabelled_split`` of ``data.root``, images only (no mask files needed);
* ``target``: ``data.target.train_split`` of ``data.target.root``, images only (the target domain).

Normalisation: every role reads with the run's sensor spec (``data.stats_file`` or the export's statistics), except
that with ``data.target.stats_file`` the target tiles (the ``target`` stream, its plain passes and ``target_val``) are
normalised with the target domain's own statistics (:func:`role_spec`): per-domain standardisation.

Validation sets (:func:`validation_sets`): ``val`` (``data.val_split``; its metrics are reported unprefixed, e.g.
``mIoU``) and, for adaptation runs with ``data.target.val_split``, ``target_val`` (metrics ``target_val/mIoU``): a
report of labels a real user lacks, so selecting a checkpoint on it is labelled ``"oracle"`` in ``metrics.json``.

A method that wants several views of a sample (``views = {"unlabelled": 2}``) gets a weak view and that many
strong views of one crop (:class:`finetune.transforms.MultiViewTransform`, in the loader workers; or
:class:`finetune.device_views.DeviceSegViews` on the GPU with ``augment.device: cuda``, :func:`stream_loader`).
Training streams are checked here, at start-up, file by file.
"""

from __future__ import annotations

from typing import Any

import torch

from common.bands import BandStats, SensorSpec
from common.datasets import stacked_segmentation_dataset
from common.device_aug import DecodedTiles, collate_decoded
from common.engine import LoaderSpec
from common.errors import UserInputError
from common.sampling import AugmentedDataset, CachedDataset
from common.store import store_segmentation
from finetune.device_views import DeviceSegViews
from finetune.transforms import MultiViewTransform, SegAugConfig, SegmentationTransform

__all__ = ["ROLES", "role_spec", "stream_dataset", "stream_loader", "plain_dataset", "validation_sets", "segmentation_datasets", "band_units_of", "EvalTransform",
           "TARGET_PREFIX"]

ROLES = ("labelled", "source", "unlabelled", "target")
TARGET_PREFIX = "target_val/"


def band_units_of(spec: SensorSpec) -> tuple[str, ...]:
    from eo_ssl.multicrop import band_units

    return band_units(spec)


class EvalTransform:
    """Normalisation only (validation / prediction)."""

    def __init__(self, spec: SensorSpec):
        self.tf = SegmentationTransform(spec.mean_array(), spec.std_array(), None, train=False)

    def __call__(self, sample: dict) -> dict:
        out = self.tf(sample, None)
        return {k: out[k] for k in ("image", "mask", "valid", "index") if k in out}


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


def _kw(data: Any) -> dict:
    return dict(image_dirs=[data.image_dir, *(x.image_dir for x in data.stack)],
                image_patterns=["{id}.tif", *(x.image_pattern for x in data.stack)], mask_dir=data.mask_dir,
                num_classes=data.num_classes, validate=data.checks, offset=data.offset,
                class_names=data.class_names)


def _source(data: Any, role: str) -> tuple[str, str, bool, tuple[str, str] | None]:
    """(root, split, labelled, (store, its config key) or None) of a role, or a UserInputError naming the missing
    key."""
    store = getattr(data, "store", None)
    if role in ("labelled", "source"):
        return data.root, data.labelled_split, True, (store, "data.store") if store else None
    if role == "unlabelled":
        if data.unlabelled_split is None:
            raise UserInputError("this method trains on unlabelled tiles: set data.unlabelled_split (a split file "
                                 "under data.root/splits/)")
        return data.root, data.unlabelled_split, False, (store, "data.store") if store else None
    if role == "target":
        if data.target is None:
            raise UserInputError("this method adapts to a target domain: set data.target.root (and "
                                 "data.target.train_split) to the unlabelled target tiles")
        store = getattr(data.target, "store", None)
        return data.target.root, data.target.train_split, False, (store, "data.target.store") if store else None
    raise ValueError(f"unknown data role {role!r}; roles: {ROLES}")


def role_spec(role: str, data: Any, spec: SensorSpec) -> SensorSpec:
    """The sensor spec a role's tiles are normalised with: for ``target`` / ``target_val`` with
    ``data.target.stats_file`` set, ``spec`` with the target domain's mean and std (per-domain standardisation);
    otherwise ``spec``. A stats file that is missing, unreadable or lacks a model band is a :class:`UserInputError`
    naming ``data.target.stats_file``."""
    target = getattr(data, "target", None)
    path = getattr(target, "stats_file", None) if role in ("target", "target_val") else None
    if path is None:
        return spec
    fix = ("write it with python -m common.stats --root <target root>/images --split <target train split file> "
           "--sensor <sensor> --out <file>, or set data.target.stats_file: null")
    try:
        return spec.with_stats(BandStats.from_json(path))
    except (ValueError, KeyError) as exc:  # DataError is a ValueError; a band the file lacks
        raise UserInputError(f"data.target.stats_file: {str(exc).rstrip('.')}; {fix}") from None


def _tiles(root: str, split: str, spec: SensorSpec, store: tuple[str, str] | None, **kw: Any) -> Any:
    """The tiles of ``split``: from the image/mask folders of ``root``, or from a tile store packed from them."""
    if store is None:
        return stacked_segmentation_dataset(root, split, spec, **kw)
    kw.pop("image_dirs"), kw.pop("image_patterns"), kw.pop("mask_dir")
    return store_segmentation(store[0], split, spec, key=store[1], **kw)


def stream_dataset(role: str, data: Any, spec: SensorSpec, augment: SegAugConfig, seed: int,
                   n_strong: int = 0, split: str | None = None) -> AugmentedDataset | DecodedTiles:
    """The augmented training dataset of ``role`` (see the module docstring); ``n_strong > 0`` adds strong views.
    With ``augment.device`` cpu / cuda the tiles are only decoded: :func:`stream_loader` adds the views on the
    device."""
    root, default_split, labelled, store = _source(data, role)
    spec = role_spec(role, data, spec)
    base = _tiles(root, split or default_split, spec, store, labelled=labelled, **_kw(data))
    base = _Strip(base)
    if data.cache:
        base = CachedDataset(base)
    if augment.device != "workers":
        return DecodedTiles(base)
    tf: Any = SegmentationTransform(spec.mean_array(), spec.std_array(), augment, train=True)
    if n_strong:
        tf = MultiViewTransform(tf, augment.strong, n_strong, band_units_of(spec))
    offset = {"labelled": 0, "source": 0, "unlabelled": 1, "target": 2}[role]
    return AugmentedDataset(base, tf, seed=seed + offset)


def stream_loader(dataset: Any, batch_size: int, spec: SensorSpec, augment: SegAugConfig, n_strong: int = 0,
                  batch_size_key: str = "data.batch_size") -> LoaderSpec:
    """The engine's stream of a :func:`stream_dataset` dataset: per-sample views from the loader workers
    (``augment.device: workers``), or decoded tiles (:func:`common.device_aug.collate_decoded`) whose weak and
    ``n_strong`` strong views the engine makes in batch on the device
    (:class:`finetune.device_views.DeviceSegViews`)."""
    if augment.device == "workers":
        return LoaderSpec(dataset, batch_size, batch_size_key=batch_size_key)
    transform = DeviceSegViews(spec.mean_array(), spec.std_array(), augment, n_strong, band_units_of(spec))
    return LoaderSpec(dataset, batch_size, collate_fn=collate_decoded, batch_size_key=batch_size_key,
                      device_transform=transform)


def plain_dataset(role: str, data: Any, spec: SensorSpec) -> Any:
    """The tiles of a training role without augmentation, normalised (masks for labelled roles): for passes over a
    stream's data in a method's hooks (prototype initialisation, class statistics for rare-class sampling). The
    engine hands them to methods as ``ctx.datasets["<role>_plain"]``, index for index the stream's tiles."""
    root, split, labelled, store = _source(data, role)
    spec = role_spec(role, data, spec)
    return _tiles(root, split, spec, store, labelled=labelled, transform=EvalTransform(spec), **_kw(data))


def validation_sets(data: Any, spec: SensorSpec) -> dict[str, Any]:
    """``{"val": ..., ["target_val": ...]}``, normalised, with masks."""
    kw = _kw(data)
    store = getattr(data, "store", None)
    out = {"val": _tiles(data.root, data.val_split, spec, (store, "data.store") if store else None,
                         transform=EvalTransform(spec), **kw)}
    target = getattr(data, "target", None)
    if target is not None and target.val_split is not None:
        store = getattr(target, "store", None)
        tspec = role_spec("target_val", data, spec)
        out["target_val"] = _tiles(target.root, target.val_split, tspec,
                                   (store, "data.target.store") if store else None, transform=EvalTransform(tspec),
                                   **kw)
    return out


def segmentation_datasets(data: Any, spec: SensorSpec, augment: SegAugConfig, seed: int,
                          labelled_split: str | None = None, with_unlabelled: bool = False) -> dict[str, Any]:
    """``{"labelled": ..., "val": ...[, "unlabelled": ...]}`` for scripts that build a run by hand (benchmarks)."""
    out = {"labelled": stream_dataset("labelled", data, spec, augment, seed, split=labelled_split),
           "val": validation_sets(data, spec)["val"]}
    if with_unlabelled:
        out["unlabelled"] = stream_dataset("unlabelled", data, spec, augment, seed)
    return out
