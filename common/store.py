"""A sharded tile store: the decoded raw pixels of a dataset packed into a few large files, read by random access.

    python -m common.store pack --config configs/pretrain/bigearthnet_s2_resnet50.yaml --out /data/ben_s2.store \
        [data.root=/data/BigEarthNet-S2] [--workers 8] [--samples-per-shard 1024]
    python -m common.store pack --config configs/finetune/demo.yaml --out data/demo_s2_source.store
    python -m common.store info /data/ben_s2.store        # what it holds
    python -m common.store verify /data/ben_s2.store      # SHA-256 of every shard

then the same config with ``data.store=/data/ben_s2.store`` (pretraining, fine-tuning; ``data.target.store`` for the
target domain of adaptation runs). Why this format and not WebDataset / LitData / Zarr / MDS / LMDB:
``docs/STORE.md``.

What a sample keeps (the reader datasets of :mod:`common.datasets` return exactly the same sample from it):

* per sensor of the stack (one for a plain sensor): the raw pixel array that the reader passes to its conversion, in
  the raw band order of the sensor (file dtype for multi-band GeoTIFFs, float32 for BigEarthNet band folders whose
  20/60 m bands the reader resamples onto the 10 m grid), and the reader's validity mask (no-data, NaN, GDAL masks,
  outside a boundless tile) before conversion. Conversion to model units (DN -> reflectance with ``data.offset``,
  linear -> dB ...), the value checks and the fill of invalid pixels run at read time with the config's sensor, as
  the reader does; so the normalisation and offset of the run apply unchanged;
* the label mask (uint8, 255 ignored) of segmentation tiles that have one;
* the sample id (file stem, band-folder name or segmentation id), CRS and transform, the tile window of a cut scene.

Once per store (``store.json``): the sensor definition with the raw bands and units per sensor part, the packing
source (config, root, layout, tile size), the split files of a segmentation root, the label values present, and
every shard's size and SHA-256.

Layout of a store directory::

    store.json             metadata (above), written last: a store without it is incomplete
    index.npz              per sample: shard, byte offset, height, width, dtype per part, mask flag, CRS, transform,
                           tile window, id
    shards/shard-000000.bin
                           samples back to back; per sample and part: raw (C, H, W) C-order bytes, then the validity
                           mask as packed bits (numpy.packbits), the label mask (H, W) uint8 after the first part's;
                           every segment starts on an 8-byte boundary

A dataset over a store is map-style (``__getitem__`` reads one byte range with ``os.pread``; no handle outlives a call,
so any number of DataLoader workers, fork or spawn): the engine's :class:`~common.sampling.EpochSampler`, the
per-sample augmentation seeds of :class:`~common.sampling.AugmentedDataset`, Accelerate's batch sharding over ranks and
exact resume apply unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from common.bands import IGNORE_INDEX, SensorSpec
from common.datasets import RasterGrid, StackedDataset, _RasterDataset
from common.errors import DataError, MissingFileError, UserInputError, cli_entry

__all__ = [
    "STORE_FORMAT",
    "STORE_VERSION",
    "StoreError",
    "StorePart",
    "TileStore",
    "main",
    "pack_dataset",
    "store_segmentation",
    "store_tiles",
]

STORE_FORMAT = "eoseg-tile-store"
"""``format`` of ``store.json``."""

STORE_VERSION = 1
"""Layout version written by this module; a store of another version is refused (pack it again)."""

META_FILE = "store.json"
INDEX_FILE = "index.npz"
SHARD_DIR = "shards"
SHARD_NAME = "shard-{:06d}.bin"

ALIGN = 8
"""Every segment of a sample starts on a multiple of this many bytes."""

DEFAULT_SAMPLES_PER_SHARD = 1024
"""Samples per shard file (BigEarthNet-S2: ~700 MB shards; demo 32 px tiles: ~30 MB)."""

KINDS = ("tiles", "segmentation")
"""``tiles``: unlabelled tiles of a pretraining config; ``segmentation``: image (+ mask) tiles of a fine-tuning root."""

_PACK_HINT = "python -m common.store pack --config <your config> --out {path}"


class StoreError(DataError):
    """A tile store is missing, incomplete, corrupt or does not fit the config; the message names it and the fix."""


# ---------------------------------------------------------------------------------------------- byte layout
def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def sample_layout(channels: Sequence[int], itemsizes: Sequence[int], height: int, width: int,
                  has_mask: bool) -> tuple[list[tuple[int, int, int, int]], tuple[int, int], int]:
    """Byte layout of one sample relative to its offset.

    Returns:
        ``[(raw_start, raw_bytes, valid_start, valid_bytes)]`` per part, ``(mask_start, mask_bytes)`` (0 bytes without
        a mask) and the sample's total (aligned) size.
    """
    pos, parts, mask = 0, [], (0, 0)
    pixels = height * width
    for k, (c, size) in enumerate(zip(channels, itemsizes)):
        raw = (pos, c * pixels * size)
        pos += _aligned(raw[1])
        valid = (pos, (pixels + 7) // 8)
        pos += _aligned(valid[1])
        parts.append((*raw, *valid))
        if k == 0 and has_mask:
            mask = (pos, pixels)
            pos += _aligned(pixels)
    return parts, mask, pos


# ---------------------------------------------------------------------------------------------- reading
class TileStore:
    """An opened store: its metadata and index (small, in memory) and positioned reads of sample bytes.

    Opening checks that the metadata and index parse, the layout version, and that every shard exists with the size
    ``store.json`` records (a truncated or replaced shard is named). ``python -m common.store verify`` also checks the
    SHA-256 of every shard.

    Args:
        path: The store directory.
        key: The config key that named it (in error messages).
    """

    def __init__(self, path: str | os.PathLike, key: str = "data.store") -> None:
        self.path = Path(path)
        self.key = key
        hint = _PACK_HINT.format(path=self.path)
        if not self.path.exists():
            raise MissingFileError(f"{key}: {self.path} does not exist; pack the tiles into it with `{hint}` or fix "
                                   f"the path")
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise StoreError(f"{key}: {self.path} is not a tile store or its packing did not finish (no {META_FILE}); "
                             f"pack it again with `{hint} --overwrite`")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{key}: {meta_path} cannot be read ({exc}); the store is corrupt: pack it again with "
                             f"`{hint} --overwrite`") from None
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            raise StoreError(f"{key}: {meta_path} is not the metadata of a tile store (format "
                             f"{meta.get('format') if isinstance(meta, dict) else None!r}); pack one with `{hint}`")
        if meta.get("version") != STORE_VERSION:
            raise StoreError(f"{key}: {self.path} has store layout version {meta.get('version')!r}, this code reads "
                             f"version {STORE_VERSION}; pack it again with `{hint} --overwrite`")
        self.meta: dict[str, Any] = meta
        try:
            with np.load(self.path / INDEX_FILE, allow_pickle=False) as z:
                idx = {k: z[k] for k in z.files}
            n = int(meta["num_samples"])
            self.shard = idx["shard"].astype(np.int64)
            self.offset = idx["offset"].astype(np.int64)
            self.height = idx["height"].astype(np.int64)
            self.width = idx["width"].astype(np.int64)
            self.dtype_code = idx["dtype"].astype(np.int64)
            self.has_mask = idx["has_mask"].astype(bool)
            self.crs_code = idx["crs"].astype(np.int64)
            self.transform = idx["transform"].astype(np.float64)
            self.tile = idx["tile"].astype(np.int64)
            self._id_bytes = idx["id_bytes"].astype(np.uint8).tobytes()
            self._id_end = idx["id_end"].astype(np.int64)
            lengths = {len(a) for a in (self.shard, self.offset, self.height, self.width, self.dtype_code,
                                        self.has_mask, self.crs_code, self.transform, self.tile, self._id_end)}
            if lengths != {n}:
                raise ValueError(f"index arrays of lengths {sorted(lengths)} for {n} samples")
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise StoreError(f"{key}: {self.path / INDEX_FILE} is missing or corrupt ({exc}); pack the store again "
                             f"with `{hint} --overwrite`") from None
        self.parts: list[dict[str, Any]] = list(meta["parts"])
        self.dtypes = [np.dtype(d) for d in meta["dtypes"]]
        self.crs_table: list[str] = list(meta["crs"])
        self.shard_files = [self.path / s["file"] for s in meta["shards"]]
        for s, f in zip(meta["shards"], self.shard_files):
            if not f.is_file():
                raise StoreError(f"{key}: shard {f} is missing; copy the whole store directory, or pack it again with "
                                 f"`{hint} --overwrite`")
            size = f.stat().st_size
            if size != int(s["bytes"]):
                raise StoreError(f"{key}: shard {f} holds {size} bytes but {META_FILE} records {s['bytes']} "
                                 f"(truncated or replaced); pack the store again with `{hint} --overwrite`")

    # -- metadata
    def __len__(self) -> int:
        return len(self.shard)

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def tile_size(self) -> int | None:
        return self.meta.get("tile_size")

    def sample_id(self, row: int) -> str:
        start = int(self._id_end[row - 1]) if row > 0 else 0
        return self._id_bytes[start:int(self._id_end[row])].decode("utf-8")

    def ids(self) -> list[str]:
        return [self.sample_id(i) for i in range(len(self))]

    def georef(self, row: int) -> dict[str, Any]:
        code = int(self.crs_code[row])
        return {"crs": self.crs_table[code] if code >= 0 else None,
                "transform": tuple(float(v) for v in self.transform[row])}

    def grid(self, row: int) -> RasterGrid:
        g = self.georef(row)
        return RasterGrid(g["crs"], g["transform"], int(self.height[row]), int(self.width[row]),
                          f"{self.path} sample {self.sample_id(row)!r}")

    # -- pixels
    def _pread(self, row: int, start: int, nbytes: int) -> bytearray:
        buf = bytearray(nbytes)
        if nbytes == 0:
            return buf
        path = self.shard_files[int(self.shard[row])]
        fd = os.open(path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [buf], int(self.offset[row]) + start)
        finally:
            os.close(fd)
        if got != nbytes:
            raise StoreError(f"{path}: sample {self.sample_id(row)!r} ends past the end of the shard (read {got} of "
                             f"{nbytes} bytes); the store is corrupt: pack it again")
        return buf

    def read(self, row: int, part: int, with_mask: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(raw (C, H, W), valid (H, W) bool, mask (H, W) uint8 or None)`` of one sensor part of a sample (the mask
        only for part 0 with ``with_mask``)."""
        h, w = int(self.height[row]), int(self.width[row])
        dtypes = [self.dtypes[int(c)] for c in self.dtype_code[row]]
        channels = [len(p["raw_bands"]) for p in self.parts]
        segs, (m_start, m_bytes), _ = sample_layout(channels, [d.itemsize for d in dtypes], h, w,
                                                    bool(self.has_mask[row]))
        r_start, _, v_start, v_bytes = segs[part]
        end = v_start + v_bytes
        want_mask = with_mask and part == 0 and m_bytes > 0
        if want_mask:
            end = m_start + m_bytes
        buf = self._pread(row, r_start, end - r_start)
        raw = np.frombuffer(buf, dtype=dtypes[part], count=channels[part] * h * w).reshape(channels[part], h, w)
        bits = np.frombuffer(buf, dtype=np.uint8, count=v_bytes, offset=v_start - r_start)
        valid = np.unpackbits(bits, count=h * w).reshape(h, w).view(bool)
        mask = None
        if want_mask:
            mask = np.frombuffer(buf, dtype=np.uint8, count=m_bytes, offset=m_start - r_start).reshape(h, w)
        return raw, valid, mask

    # -- checks against a config
    def require(self, kind: str, spec: SensorSpec, tile_size: int | None = None) -> None:
        """The store holds ``kind`` samples of ``spec``'s raw bands, units and conversion (and ``tile_size``).

        Raises:
            StoreError: naming what differs and the keys or command that fix it.
        """
        hint = _PACK_HINT.format(path=self.path)
        if self.kind != kind:
            use = {"tiles": "pretraining (ssl/pretrain.py)", "segmentation": "fine-tuning (finetune/*.py)"}
            raise StoreError(f"{self.key}: {self.path} holds {self.kind} packed from a {use[self.kind].split()[0]} "
                             f"config; this run needs {kind} for {use[kind]}: pack them with `{hint}` from this "
                             f"run's config")
        if kind == "tiles" and self.tile_size != tile_size:
            raise StoreError(f"{self.key}: {self.path} was packed with data.tile_size={self.tile_size} but the config "
                             f"sets data.tile_size={tile_size}; set data.tile_size: {self.tile_size}, or pack again "
                             f"with this config")
        ours = [_part_record(p) for p in (spec.parts or (spec,))]
        theirs = [{k: p[k] for k in _PART_KEYS} for p in self.parts]
        if ours != theirs:
            def show(parts: list[dict[str, Any]]) -> str:
                return " + ".join(f"{p['name']} [{', '.join(p['raw_bands'])}] ({p['input_units']} -> "
                                  f"{p['conversion']}, nodata {p['nodata']})" for p in parts)
            raise StoreError(f"{self.key}: {self.path} holds {show(theirs)} but the config reads {show(ours)}; set "
                             f"data.sensor / data.bands / data.input_units (and data.stack) to the store's, or pack "
                             f"the store again with this config (`{hint} --overwrite`)")


_PART_KEYS = ("name", "raw_bands", "input_units", "conversion", "nodata", "scale_factor", "add_offset")


def _part_record(spec: SensorSpec) -> dict[str, Any]:
    """What the stored raw pixels of one sensor part depend on (statistics and derived bands do not)."""
    nodata = spec.nodata
    return {"name": spec.name, "raw_bands": list(spec.raw_bands), "input_units": spec.input_units,
            "conversion": spec.conversion, "nodata": None if nodata is None else float(nodata),
            "scale_factor": float(spec.scale_factor), "add_offset": float(spec.add_offset)}


class StorePart(_RasterDataset):
    """Samples of one sensor part of a :class:`TileStore`, as the reader dataset that packed them returns them.

    Datasheet:
        Source: a store packed by ``python -m common.store pack`` (see the module docstring).
        Samples: ``image`` float32 ``(C, H, W)`` in model units, ``valid``, ``index`` (position in this dataset),
            ``id``; ``tile`` for scenes cut into tiles; ``mask`` (int64, 255 ignored and where invalid) with
            ``labelled``; ``crs``/``transform`` with ``return_georef``. Identical to the reader's sample of the
            packed file (the conversion, checks and fill run here, with this run's sensor and offset).

    Args:
        store: The opened store.
        part: Index of the sensor part (0 for a plain sensor).
        rows: Store rows making this dataset, in order.
        sensor: The run's spec of this part (raw bands checked against the store by :meth:`TileStore.require`).
        transform, return_georef, fill_value, offset, validate: as the reader datasets.
        labelled: Return the label mask (every row must have one).
    """

    def __init__(self, store: TileStore, part: int, rows: Sequence[int], sensor: SensorSpec,
                 transform: Any = None, *, return_georef: bool = False, fill_value: str | float | None = "mean",
                 offset: float = 0.0, validate: str = "header", labelled: bool = False) -> None:
        super().__init__(sensor, sensor.bands, transform, return_georef, fill_value, offset, validate)
        self.store, self.part, self.rows, self.labelled = store, part, np.asarray(rows, dtype=np.int64), labelled
        self.tile_size = store.tile_size

    def __len__(self) -> int:
        return len(self.rows)

    def sample_key(self, index: int, match: str = "path") -> str:
        return self.store.sample_id(int(self.rows[self._index(index)]))

    def sample_grid(self, index: int) -> RasterGrid:
        return self.store.grid(int(self.rows[self._index(index)]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._index(index)
        row = int(self.rows[index])
        raw, valid, mask = self.store.read(row, self.part, with_mask=self.labelled)
        sample_id = self.store.sample_id(row)
        image, valid = self._model_image(raw, list(self.spec.raw_bands), valid,
                                         f"{self.store.path} sample {sample_id!r}")
        sample: dict[str, Any] = {"image": image, "valid": valid, "index": index, "id": sample_id}
        if self.tile_size is not None:
            sample["tile"] = self.store.tile[row].copy()
        if self.labelled:
            if mask is None:
                raise StoreError(f"{self.store.path}: sample {sample_id!r} has no label mask")
            mask = mask.astype(np.int64)
            mask[~valid] = IGNORE_INDEX
            sample["mask"] = mask
        return self._finish(sample, self.store.georef(row))


def _assemble(store: TileStore, rows: Sequence[int], spec: SensorSpec, transform: Any, *, labelled: bool,
              return_georef: bool, fill_value: str | float | None, offset: float, validate: str) -> Any:
    """A :class:`StorePart` for a plain sensor, the :class:`StackedDataset` of one per part for a stack (as the
    readers stack them: parts unfilled, valid pixels combined, the stack's fill)."""
    if not spec.parts:
        return StorePart(store, 0, rows, spec, transform, return_georef=return_georef, fill_value=fill_value,
                         offset=offset, validate=validate, labelled=labelled)
    parts = [StorePart(store, k, rows, p, None, fill_value=None, offset=offset, validate=validate,
                       labelled=labelled and k == 0) for k, p in enumerate(spec.parts)]
    return StackedDataset(parts, transform=transform, return_georef=return_georef, fill_value=fill_value,
                          check_grids=False)


def store_tiles(path: str | os.PathLike, spec: SensorSpec, *, tile_size: int | None = None, offset: float = 0.0,
                validate: str = "header", exclude_ids: Collection[str] = (), transform: Any = None,
                fill_value: str | float | None = "mean", return_georef: bool = False,
                key: str = "data.store") -> Any:
    """The unlabelled tiles of a pretraining store: the same samples, in the same order, as the pretraining config
    that packed it reads from its folders (``exclude_ids`` applied here)."""
    store = TileStore(path, key)
    store.require("tiles", spec, tile_size)
    excluded = set(exclude_ids)
    rows = [i for i in range(len(store)) if not excluded or store.sample_id(i) not in excluded]
    if not rows:
        raise StoreError(f"{key}: every tile of {store.path} is among the excluded ids (data.exclude_ids_from)")
    return _assemble(store, rows, spec, transform, labelled=False, return_georef=return_georef,
                     fill_value=fill_value, offset=offset, validate=validate)


def store_segmentation(path: str | os.PathLike, split: str | os.PathLike | Sequence[str] | None, spec: SensorSpec,
                       transform: Any = None, *, labelled: bool = True, num_classes: int | None = None,
                       offset: float = 0.0, validate: str = "full", return_georef: bool = False,
                       fill_value: str | float | None = "mean", key: str = "data.store", **_: Any) -> Any:
    """The tiles of ``split`` from a segmentation store, as :func:`common.datasets.stacked_segmentation_dataset`
    reads them from the root that was packed. ``split``: a split file path, the name of a split file of the packed
    root (``splits/<name>.txt``, kept in the store), a list of ids, or None for every tile."""
    store = TileStore(path, key)
    store.require("segmentation", spec)
    splits: dict[str, list[str]] = store.meta.get("splits", {})
    if split is None:
        ids, where = store.ids(), "all tiles"
    elif not isinstance(split, (str, os.PathLike)):
        ids, where = [str(i) for i in split], "split list"
    elif Path(split).is_file():
        from common.splits import read_ids

        ids, where = read_ids(split), str(split)
    elif str(split) in splits or f"{split}.txt" in splits:
        name = str(split) if str(split) in splits else f"{split}.txt"
        ids, where = list(splits[name]), f"{store.path} split {name}"
    else:
        raise StoreError(f"{key}: split {str(split)!r} is neither a file nor a split of {store.path} (it has "
                         f"{', '.join(sorted(splits)) or 'none'}); fix the split key or pack the root with its "
                         f"splits/ folder")
    if not ids:
        raise StoreError(f"{where}: the split holds no tile ids")
    row_of = {store.sample_id(i): i for i in range(len(store))}
    missing = [i for i in ids if i not in row_of]
    if missing:
        raise StoreError(f"{where}: {len(missing)} id(s) are not in the store {store.path}, e.g. {missing[:5]}; pack "
                         f"the store again from the root that holds them")
    rows = [row_of[i] for i in ids]
    if labelled:
        unlabelled = [i for i, r in zip(ids, rows) if not store.has_mask[r]]
        if unlabelled:
            raise StoreError(f"{where}: {len(unlabelled)} tile(s) had no mask file when {store.path} was packed, "
                             f"e.g. {unlabelled[:5]}; add their masks and pack again, or use them as unlabelled tiles")
        bad = [v for v in store.meta.get("label_values", []) if num_classes is not None
               and not (0 <= v < num_classes or v == IGNORE_INDEX)]
        if bad:
            raise StoreError(f"{key}: the masks in {store.path} hold label value(s) {bad[:10]} outside the class list "
                             f"0..{(num_classes or 0) - 1} (ignore value {IGNORE_INDEX}); set data.num_classes")
    return _assemble(store, rows, spec, transform, labelled=labelled, return_georef=return_georef,
                     fill_value=fill_value, offset=offset, validate=validate)


# ---------------------------------------------------------------------------------------------- packing
def _capture_raw(part: Any) -> None:
    """Make a reader dataset keep the raw pixels and validity it converts (the inputs of ``_model_image``)."""
    original = part._model_image

    def capture(raw: np.ndarray, raw_bands: Sequence[str], valid: np.ndarray, where: Any = "input"):
        part._store_capture = (np.array(raw, copy=True), np.array(valid, dtype=bool, copy=True), tuple(raw_bands))
        return original(raw, raw_bands, valid, where)

    part._model_image = capture


_PACK_STATE: dict[str, Any] = {}  # the dataset being packed, inherited by forked packing workers


def _pack_shard(job: tuple[int, int, int, str]) -> dict[str, Any]:
    """Write samples ``[start, stop)`` of the dataset being packed to shard ``number``; their index records."""
    number, start, stop, out = job
    ds, parts = _PACK_STATE["dataset"], _PACK_STATE["parts"]
    name = f"{SHARD_DIR}/{SHARD_NAME.format(number)}"
    sha, pos, records, labels = hashlib.sha256(), 0, [], set()
    tmp = Path(out) / (name + ".tmp")
    with open(tmp, "wb") as f:
        for i in range(start, stop):
            sample = ds[i]
            raws, valids = [], []
            for p in parts:
                raw, valid, raw_bands = p._store_capture
                if tuple(raw_bands) != tuple(p.spec.raw_bands):
                    raise RuntimeError(f"captured bands {raw_bands} differ from {p.spec.raw_bands}")
                raws.append(np.ascontiguousarray(raw))
                valids.append(valid)
            h, w = raws[0].shape[1:]
            mask = sample.get("mask")
            if mask is not None:
                mask = np.asarray(mask)
                if mask.min() < 0 or mask.max() > 255:
                    raise DataError(f"sample {sample['id']!r}: label values outside 0..255 cannot be stored")
                mask = mask.astype(np.uint8)
                labels.update(int(v) for v in np.flatnonzero(np.bincount(mask.ravel(), minlength=256)))
            segs, (m_start, m_bytes), total = sample_layout([r.shape[0] for r in raws],
                                                            [r.dtype.itemsize for r in raws], h, w, mask is not None)
            block = bytearray(total)
            for (r_start, r_bytes, v_start, v_bytes), raw, valid in zip(segs, raws, valids):
                if raw.shape[1:] != (h, w) or valid.shape != (h, w):
                    raise DataError(f"sample {sample['id']!r}: sensor parts of different sizes")
                block[r_start:r_start + r_bytes] = raw.tobytes()
                block[v_start:v_start + v_bytes] = np.packbits(valid.ravel()).tobytes()
            if mask is not None:
                block[m_start:m_start + m_bytes] = mask.tobytes()
            f.write(block)
            sha.update(block)
            tile = sample.get("tile")
            records.append({
                "offset": pos, "height": h, "width": w, "dtypes": [r.dtype.str for r in raws],
                "has_mask": mask is not None, "crs": sample.get("crs"),
                "transform": [float(v) for v in np.asarray(sample["transform"], dtype=np.float64)],
                "tile": [int(v) for v in np.asarray(tile)] if tile is not None else [-1, -1, -1, -1],
                "id": str(sample["id"]),
            })
            pos += total
    os.replace(tmp, Path(out) / name)
    return {"file": name, "samples": stop - start, "bytes": pos, "sha256": sha.hexdigest(), "records": records,
            "labels": sorted(labels)}


def pack_dataset(dataset: Any, out: str | os.PathLike, spec: SensorSpec, *, kind: str,
                 tile_size: int | None = None, splits: dict[str, list[str]] | None = None,
                 source: dict[str, Any] | None = None, samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
                 workers: int = 1, overwrite: bool = False, progress: bool = False) -> Path:
    """Pack a reader dataset of :mod:`common.datasets` (or a :class:`StackedDataset` of them), built with
    ``transform=None``, into a store at ``out``: sample ``i`` of the store is sample ``i`` of ``dataset``.

    Args:
        dataset: The reader dataset (its samples need ``crs``/``transform``: ``return_georef`` is switched on).
        out: The store directory (must not exist, or be empty, unless ``overwrite``).
        spec: Its sensor spec (the stack for a :class:`StackedDataset`).
        kind: ``"tiles"`` or ``"segmentation"``.
        tile_size: The tile size scenes were cut with (pretraining ``data.tile_size``).
        splits: Split files of a segmentation root, ``{file name: ids}``.
        source: Where the samples came from (recorded for humans).
        samples_per_shard: Samples per shard file.
        workers: Packing processes (forked; each writes whole shards).
        overwrite: Replace an existing store at ``out``.
        progress: Print one line per finished shard.

    Returns:
        The store directory.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if samples_per_shard < 1 or workers < 1:
        raise UserInputError("--samples-per-shard and --workers must be >= 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserInputError(f"--out {out} exists and is not empty; choose another directory or add --overwrite "
                                 f"to replace it")
        if out.is_dir() and not (out / META_FILE).exists() and not (out / SHARD_DIR).exists():
            raise UserInputError(f"--out {out} holds files that are not a tile store; refusing to delete them")
        shutil.rmtree(out)
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    if hasattr(dataset, "install_capture"):
        parts = dataset.install_capture()
    else:
        parts = list(dataset.parts) if isinstance(dataset, StackedDataset) else [dataset]
        for p in parts:
            _capture_raw(p)
    if len(parts) != len(spec.parts or (spec,)):
        raise ValueError(f"dataset has {len(parts)} sensor parts, spec {spec.name} {len(spec.parts or (spec,))}")
    dataset.return_georef = True
    n = len(dataset)
    jobs = [(k, s, min(s + samples_per_shard, n), str(out)) for k, s in enumerate(range(0, n, samples_per_shard))]
    _PACK_STATE.update(dataset=dataset, parts=parts)
    t0 = time.perf_counter()
    try:
        if workers == 1 or len(jobs) == 1:
            results = []
            for job in jobs:
                results.append(_pack_shard(job))
                if progress:
                    print(f"shard {job[0] + 1}/{len(jobs)} ({job[2]}/{n} samples, {time.perf_counter() - t0:.0f} s)",
                          flush=True)
        else:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
                results = []
                for res in pool.imap(_pack_shard, jobs):
                    results.append(res)
                    if progress:
                        print(f"shard {len(results)}/{len(jobs)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        _PACK_STATE.clear()
    _write_index(out, results, spec, kind, tile_size, splits or {}, source or {})
    return out


def _write_index(out: Path, results: list[dict[str, Any]], spec: SensorSpec, kind: str, tile_size: int | None,
                 splits: dict[str, list[str]], source: dict[str, Any]) -> None:
    records = [(k, r) for k, res in enumerate(results) for r in res["records"]]
    dtypes: list[str] = []
    crs_table: list[str] = []
    for _, r in records:
        for d in r["dtypes"]:
            if d not in dtypes:
                dtypes.append(d)
        if r["crs"] is not None and r["crs"] not in crs_table:
            crs_table.append(r["crs"])
    ids = [r["id"].encode("utf-8") for _, r in records]
    np.savez(out / INDEX_FILE,
             shard=np.array([k for k, _ in records], dtype=np.int32),
             offset=np.array([r["offset"] for _, r in records], dtype=np.int64),
             height=np.array([r["height"] for _, r in records], dtype=np.int32),
             width=np.array([r["width"] for _, r in records], dtype=np.int32),
             dtype=np.array([[dtypes.index(d) for d in r["dtypes"]] for _, r in records], dtype=np.uint8),
             has_mask=np.array([r["has_mask"] for _, r in records], dtype=bool),
             crs=np.array([crs_table.index(r["crs"]) if r["crs"] is not None else -1 for _, r in records],
                          dtype=np.int32),
             transform=np.array([r["transform"] for _, r in records], dtype=np.float64).reshape(-1, 6),
             tile=np.array([r["tile"] for _, r in records], dtype=np.int64).reshape(-1, 4),
             id_bytes=np.frombuffer(b"".join(ids), dtype=np.uint8),
             id_end=np.cumsum([len(i) for i in ids], dtype=np.int64))
    parts = spec.parts or (spec,)
    meta = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "kind": kind,
        "num_samples": len(records),
        "sensor": spec.to_dict(),
        "parts": [{**_part_record(p), "bands": list(p.bands)} for p in parts],
        "dtypes": [np.dtype(d).name for d in dtypes],
        "tile_size": tile_size,
        "crs": crs_table,
        "label_values": sorted({v for res in results for v in res["labels"]}),
        "splits": splits,
        "shards": [{k: res[k] for k in ("file", "samples", "bytes", "sha256")} for res in results],
        "source": source,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / META_FILE)  # written last: a store without store.json is incomplete


# ---------------------------------------------------------------------------------------------- configs -> datasets
def _load_any_config(path: str, overrides: list[str], kind: str) -> tuple[str, Any]:
    """``("pretrain" | "finetune", config)`` of a training config file."""
    from common.config import ConfigError, load_config

    errors = []
    if kind in ("auto", "pretrain"):
        from eo_ssl.pretrain import PretrainConfig

        try:
            return "pretrain", load_config(PretrainConfig, path, overrides)
        except ConfigError as exc:
            errors.append(f"as a pretraining config: {exc}")
    if kind in ("auto", "finetune"):
        from finetune.training import finetune_config_class, task_of_config

        try:
            return "finetune", load_config(finetune_config_class(task_of_config(path)), path, overrides)
        except ConfigError as exc:
            errors.append(f"as a fine-tuning config: {exc}")
    raise UserInputError(f"{path}: cannot be read " + "; ".join(errors))


def pretrain_source(cfg: Any) -> tuple[Any, SensorSpec, dict[str, Any]]:
    """The reader dataset a pretraining config reads (every tile: ``data.exclude_ids_from`` applies at read time),
    its spec and a description."""
    from eo_ssl.pretrain import build_dataset, resolve_data_sensor

    data = replace(cfg.data, cache=False, store=None, exclude_ids_from=())
    cfg = replace(cfg, data=data)
    spec = resolve_data_sensor(data)
    tiles = build_dataset(cfg, spec).base
    source = {"root": data.root, "glob": data.glob, "layout": data.layout, "tile_size": data.tile_size,
              "stack": [{"root": x.root, "glob": x.glob, "layout": x.layout} for x in data.stack],
              "stack_match": data.stack_match, "stack_missing": data.stack_missing,
              "skipped": list(getattr(tiles, "skipped", []))[:100]}
    return tiles, spec, source


def finetune_source(cfg: Any, target: bool = False) -> tuple[Any, SensorSpec, dict[str, list[str]], dict[str, Any]]:
    """Every image tile of a fine-tuning config's ``data.root`` (or ``data.target.root``), with its mask where the
    mask file exists, in id order; its spec, the root's split files and a description."""
    from common.datasets import StackedDataset as _Stacked
    from common.datasets import _ids_in_dir, stacked_segmentation_dataset
    from common.splits import read_ids
    from finetune.data import _kw
    from finetune.inputs import resolve_inputs

    data = cfg.data
    if target and data.target is None:
        raise UserInputError("--target: the config has no data.target")
    root = Path(data.target.root if target else data.root)
    spec = resolve_inputs(replace(data, store=None), cfg.model).spec
    if not root.is_dir():
        raise MissingFileError(f"{'data.target.root' if target else 'data.root'}: {root} does not exist")
    kw = _kw(data)
    ids = _ids_in_dir(root / data.image_dir, "{id}.tif")
    if not ids:
        raise DataError(f"{root / data.image_dir}: no images matching '{{id}}.tif'")
    with_mask = [i for i in ids if (root / data.mask_dir / f"{i}.tif").is_file()]
    without = [i for i in ids if i not in set(with_mask)]
    groups = []
    if with_mask:
        groups.append(stacked_segmentation_dataset(root, with_mask, spec, labelled=True, **kw))
    if without:
        groups.append(stacked_segmentation_dataset(root, without, spec, labelled=False,
                                                   **{k: v for k, v in kw.items() if k != "class_names"}))
    splits = {p.name: read_ids(p) for p in sorted((root / "splits").glob("*.txt"))} \
        if (root / "splits").is_dir() else {}
    dataset = _Concat(groups, ids, _Stacked)
    source = {"root": str(root), "image_dirs": kw["image_dirs"], "mask_dir": data.mask_dir,
              "with_mask": len(with_mask), "without_mask": len(without)}
    return dataset, spec, splits, source


class _Concat:
    """Samples of several reader datasets (the labelled and the unlabelled tiles of a root) in id order, looking like
    one reader dataset to :func:`pack_dataset`."""

    def __init__(self, groups: list[Any], ids: list[str], stacked_cls: type) -> None:
        self.groups = groups
        where = {}
        for g, ds in enumerate(groups):
            keys = ds.parts[0].ids if isinstance(ds, stacked_cls) else ds.ids
            for j, i in enumerate(keys):
                where[i] = (g, j)
        self.order = [where[i] for i in ids]
        self.stacked = isinstance(groups[0], stacked_cls)

    def install_capture(self) -> list[_PartGroup]:
        """Capture the raw pixels of every part of every group; one :class:`_PartGroup` per part position."""
        n_parts = len(self.groups[0].parts) if self.stacked else 1
        groups = [_PartGroup([ds.parts[k] if self.stacked else ds for ds in self.groups]) for k in range(n_parts)]
        for group in groups:
            for member in group.members:
                _capture_raw(member)
        self.part_groups = groups
        return groups

    @property
    def return_georef(self) -> bool:
        return self.groups[0].return_georef

    @return_georef.setter
    def return_georef(self, value: bool) -> None:
        for ds in self.groups:
            ds.return_georef = value

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, Any]:
        g, j = self.order[i]
        sample = self.groups[g][j]
        for group in getattr(self, "part_groups", []):
            group.current = group.members[g]
        return sample


class _PartGroup:
    """The same sensor part of several datasets: capturing sets up each, ``_store_capture`` reads the current one."""

    def __init__(self, members: list[Any]) -> None:
        self.members, self.current = members, members[0]

    @property
    def spec(self) -> SensorSpec:
        return self.current.spec

    @property
    def _store_capture(self) -> Any:
        return self.current._store_capture


# ---------------------------------------------------------------------------------------------- command line
def _describe(store: TileStore) -> str:
    m = store.meta
    size = sum(int(s["bytes"]) for s in m["shards"])
    parts = " + ".join(f"{p['name']} [{', '.join(p['raw_bands'])}] {p['input_units']}" for p in m["parts"])
    lines = [(f"{store.path}: {m['kind']}, {m['num_samples']} samples in {len(m['shards'])} shard(s), "
              f"{size / 2**20:.1f} MiB"), f"  sensor: {parts}; dtypes {', '.join(m['dtypes'])}",
             f"  tile_size: {m['tile_size']}; created {m['created']}; source {json.dumps(m['source'])}"]
    if m.get("splits"):
        lines.append("  splits: " + ", ".join(f"{k} ({len(v)})" for k, v in m["splits"].items()))
    if m.get("label_values"):
        lines.append(f"  label values: {m['label_values']}")
    return "\n".join(lines)


def verify(path: str | os.PathLike) -> None:
    """Check the SHA-256 of every shard of a store against ``store.json``."""
    store = TileStore(path, key="store")
    for s, f in zip(store.meta["shards"], store.shard_files):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
        if h.hexdigest() != s["sha256"]:
            raise StoreError(f"{f}: SHA-256 differs from {META_FILE} (the shard is corrupt); pack the store again")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.store", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack the tiles a training config reads into a store")
    p.add_argument("--config", required=True, help="a pretraining or fine-tuning YAML config")
    p.add_argument("--out", required=True, help="the store directory to create")
    p.add_argument("--kind", choices=("auto", "pretrain", "finetune"), default="auto",
                   help="which entry point's config (default: whichever reads it)")
    p.add_argument("--target", action="store_true", help="fine-tuning: pack data.target.root instead of data.root")
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    p.add_argument("--workers", type=int, default=1, help="packing processes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (as the training scripts)")
    for name, text in (("info", "describe a store"), ("verify", "check every shard's SHA-256")):
        q = sub.add_parser(name, help=text)
        q.add_argument("store")
        q.add_argument("--debug", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "pack":  # overrides may stand before or after the flags
        args = p.parse_intermixed_args(argv[1:])
        args.command = "pack"
    else:
        args = parser.parse_args(argv)
    if args.command == "info":
        print(_describe(TileStore(args.store, key="store")))
        return 0
    if args.command == "verify":
        verify(args.store)
        print(f"{args.store}: every shard matches its SHA-256")
        return 0
    which, cfg = _load_any_config(args.config, list(args.overrides), args.kind)
    t0 = time.perf_counter()
    if which == "pretrain":
        if args.target:
            raise UserInputError("--target is for fine-tuning configs (data.target)")
        dataset, spec, source = pretrain_source(cfg)
        splits, kind, tile_size = {}, "tiles", cfg.data.tile_size
    else:
        dataset, spec, splits, source = finetune_source(cfg, target=args.target)
        kind, tile_size = "segmentation", None
    source = {"config": str(args.config), "overrides": list(args.overrides), **source}
    print(f"packing {len(dataset)} samples ({kind}) of {spec.name} ({', '.join(spec.bands)}) into {args.out}",
          flush=True)
    out = pack_dataset(dataset, args.out, spec, kind=kind, tile_size=tile_size, splits=splits, source=source,
                       samples_per_shard=args.samples_per_shard, workers=args.workers, overwrite=args.overwrite,
                       progress=True)
    print(_describe(TileStore(out, key="--out")))
    print(f"packed in {time.perf_counter() - t0:.1f} s; use it with "
          f"{'data.target.store' if args.target else 'data.store'}={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
