"""PyTorch datasets over GeoTIFFs: unlabelled tiles, segmentation tiles, BigEarthNet patches, SpaceNet-6 SAR tiles.

Common behaviour (the sample contract of ``docs/CONTRACTS.md``):

* A sample is a dict with ``image`` float32 ``(C, H, W)`` in model units (reflectance / dB, *not* normalised),
  ``valid`` bool ``(H, W)`` (False where any band is no-data/NaN/inf), ``index`` int, ``id`` str, and for labelled
  segmentation ``mask`` int64 ``(H, W)`` with :data:`~common.bands.IGNORE_INDEX` (255) wherever the label is
  ignored *or* the image is invalid. With ``return_georef=True`` also ``crs`` (str) and ``transform``
  (6-tuple, see :mod:`common.raster`); use :func:`common.raster.unbatch_georef` on collated batches.
* Invalid image pixels are filled (``fill_value="mean"``: the sensor's reference mean of the band, which becomes 0
  after normalisation with the reference statistics; a float: that value; ``None``: left as converted).
* ``transform`` (optional callable) receives the sample dict with **numpy** arrays (``image`` float32 CHW,
  ``mask`` int64 HW, ``valid`` bool HW) and must return a dict. Afterwards every numpy array in the dict is
  converted to a ``torch.Tensor``; values that already are tensors, and other values, are left alone.
* Files are opened lazily in ``__getitem__`` and closed before it returns: no handle is held by the dataset, so it
  is safe with any number of DataLoader workers (fork or spawn).
* Construction validates the inputs up front, with one error per problem naming the file (``validate="full"``:
  every file opens, has the expected bands and readable pixel data (truncation), masks match image size/CRS and
  carry no label outside the class list; ``"header"``: skip the pixel-data read; ``"none"``: only file existence).
  Errors a user causes and fixes are :class:`~common.errors.DataError` (``RasterError`` is one).
* Units (``"header"`` and ``"full"``): the band dtypes must fit the sensor's declared input units (complex pixels only
  for ``input_units: complex``, and then only complex pixels), and a small centre window of a few files (the first
  file without band descriptions among them) must hold values those units allow
  (:func:`common.bands.check_raw_values` with ``sampled``). Every read checks the hard limits again (negative linear
  power, dB above 100, ...): no value is converted silently in the wrong units.
* Files without band descriptions hold the sensor's file bands in order (:attr:`SensorSpec.file_bands`: a registry
  sensor's full list, a ``data.sensor`` mapping's ``bands``); a file with exactly as many bands as the selection's raw
  bands (``data.bands``) holds those, in that order. Either way the dataset says so once in the log (a warning naming
  a file and the names assumed), and such files also get the stricter value checks of ``unnamed``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from common.bands import (
    IGNORE_INDEX,
    SensorDef,
    SensorSpec,
    check_dtypes,
    check_raw_values,
    file_band_names,
    get_sensor,
    stack_sensors,
    to_model_units,
)
from common.errors import DataError
from common.raster import (
    GEOTIFF_SUFFIXES,
    RasterError,
    RasterInfo,
    Tile,
    fill_band_names,
    find_band_files,
    raster_info,
    read_band_files,
    read_raster,
    tile_windows,
    to_affine,
    to_crs,
)
from common.splits import read_ids

logger = logging.getLogger(__name__)

__all__ = [
    "VALIDATE_MODES",
    "BIGEARTHNET_CLASSES",
    "SPACENET6_CLASSES",
    "Transform",
    "UnlabelledTiles",
    "SegmentationDataset",
    "SpaceNet6Tiles",
    "BigEarthNetPatches",
    "StackedDataset",
    "stacked_segmentation_dataset",
    "MATCH_MODES",
    "RasterGrid",
]

Transform = Callable[[dict[str, Any]], dict[str, Any]]
"""Sample transform: dict with numpy arrays in, dict out."""

VALIDATE_MODES = ("full", "header", "none")
"""Construction-time validation levels."""

LABEL_CHECK_MODES = ("auto", "construction", "access")
"""When :class:`SegmentationDataset` checks mask values: ``auto`` reads all masks at construction when their total
size is at most :data:`LABEL_CHECK_PIXEL_BUDGET` pixels, else checks each mask when it is first loaded."""

LABEL_CHECK_PIXEL_BUDGET = 2**27
"""Total mask pixels up to which ``label_check="auto"`` reads every mask at construction (~134 Mpx)."""

SPLITS_DIR = "splits"
"""Sub-directory of a dataset root holding split files."""

SPLIT_SUFFIX = ".txt"
"""Suffix of split files."""

VALUE_CHECK_FILES = 4
"""Files (evenly spaced, plus the first file without band descriptions) whose values are checked at construction."""

VALUE_CHECK_WINDOW = 64
"""Side of the centre window read from each of them."""

BIGEARTHNET_METADATA_SUFFIX = "_labels_metadata.json"
"""Suffix of the per-patch BigEarthNet label file."""

BIGEARTHNET_CLASSES: tuple[str, ...] = (
    "Agro-forestry areas", "Airports", "Annual crops associated with permanent crops", "Bare rock",
    "Beaches, dunes, sands", "Broad-leaved forest", "Burnt areas", "Coastal lagoons", "Complex cultivation patterns",
    "Coniferous forest", "Construction sites", "Continuous urban fabric", "Discontinuous urban fabric", "Dump sites",
    "Estuaries", "Fruit trees and berry plantations", "Green urban areas", "Industrial or commercial units",
    "Inland marshes", "Intertidal flats",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Mineral extraction sites", "Mixed forest", "Moors and heathland", "Natural grassland",
    "Non-irrigated arable land", "Olive groves", "Pastures", "Peatbogs", "Permanently irrigated land", "Port areas",
    "Rice fields", "Road and rail networks and associated land", "Salines", "Salt marshes",
    "Sclerophyllous vegetation", "Sea and ocean", "Sparsely vegetated areas", "Sport and leisure facilities",
    "Transitional woodland/shrub", "Vineyards", "Water bodies", "Water courses",
)  # fmt: skip
"""The 43 BigEarthNet (CORINE level-3) class names, in the usual alphabetical order (multi-hot index order)."""

LABEL_SEPARATOR = "|"
"""Separator of the ``label_names`` string of :class:`BigEarthNetPatches` samples."""

SPACENET6_CLASSES: tuple[str, ...] = ("background", "building")
"""Classes of :class:`SpaceNet6Tiles` masks."""

_DEFAULT_IMAGE_PATTERN = "{id}.tif"

MATCH_MODES = ("path", "stem", "bigearthnet")
"""How :meth:`StackedDataset.join` pairs the samples of co-registered sensors: ``path``: the file's path relative to
its dataset root without the suffix (``source/images/t1`` under ``s2/`` and under ``s1/``; a band folder's relative
path); ``stem``: the file stem or band-folder name alone; ``bigearthnet``: the BigEarthNet patch name, with a
Sentinel-1 patch standing for the Sentinel-2 patch its ``corresponding_s2_patch`` metadata names. Labelled
segmentation tiles are always paired by id."""


class RasterGrid(NamedTuple):
    """The pixel grid of a sample: CRS string, 6-tuple transform, height and width, and the file it comes from."""

    crs: str | None
    transform: tuple[float, ...]
    height: int
    width: int
    path: str

    def same_as(self, other: "RasterGrid") -> bool:
        """Same size, CRS and transform (to 1e-6 of a pixel)."""
        if (self.height, self.width) != (other.height, other.width):
            return False
        if self.crs != other.crs and (self.crs is None or other.crs is None or to_crs(self.crs) != to_crs(other.crs)):
            return False  # (the same string is the same CRS; different strings may still name one CRS)
        res = max(abs(self.transform[0]), abs(self.transform[4]), 1e-12)
        return bool(np.allclose(self.transform[:6], other.transform[:6], rtol=1e-9, atol=1e-6 * res))

    def describe(self) -> str:
        return f"{self.path} ({self.height}x{self.width} px, CRS {self.crs}, transform {tuple(self.transform[:6])})"


def _centre_window(info: RasterInfo) -> tuple[int, int, int, int]:
    """``(row_off, col_off, height, width)`` of the centre :data:`VALUE_CHECK_WINDOW` square of a file."""
    h, w = min(VALUE_CHECK_WINDOW, info.height), min(VALUE_CHECK_WINDOW, info.width)
    return ((info.height - h) // 2, (info.width - w) // 2, h, w)


def _grid_of(info: RasterInfo, tile: Tile | None = None, tile_size: int | None = None) -> RasterGrid:
    if tile is None:
        return RasterGrid(info.crs, tuple(info.transform), info.height, info.width, info.path)
    a, b, c, d, e, f = info.transform[:6]
    c2, f2 = a * tile.col_off + b * tile.row_off + c, d * tile.col_off + e * tile.row_off + f
    size = tile_size or tile.height
    return RasterGrid(info.crs, (a, b, c2, d, e, f2), size, size, f"{info.path} window {tuple(tile)}")


def _band_folder_grid(folder: Path, spec: SensorSpec) -> RasterGrid:
    """Grid of a band folder: its finest selected band's file (the grid :func:`read_band_files` resamples onto)."""
    raw = spec.raw_bands
    files = find_band_files(folder, raw)
    finest = min(raw, key=lambda b: spec.gsd.get(b, 0.0))
    return _grid_of(raster_info(files[finest], check_data=False))


def _bigearthnet_pair_name(folder: Path) -> str:
    """A BigEarthNet patch's name, or for a Sentinel-1 patch the Sentinel-2 patch its metadata pairs it with."""
    meta_path = folder / f"{folder.name}{BIGEARTHNET_METADATA_SUFFIX}"
    if not meta_path.is_file():
        return folder.name
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path}: cannot read labels metadata ({exc})") from exc
    partner = meta.get("corresponding_s2_patch") if isinstance(meta, dict) else None
    return str(partner) if partner else folder.name


# ---------------------------------------------------------------------- helpers
def _check_mode(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {tuple(allowed)}")


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    if pattern.count("{id}") != 1:
        raise DataError(f"file pattern {pattern!r} must contain '{{id}}' exactly once")
    head, tail = pattern.split("{id}")
    return re.compile(re.escape(head) + r"(?P<id>.+)" + re.escape(tail) + r"$")


def _ids_in_dir(directory: Path, pattern: str) -> list[str]:
    rx = _pattern_regex(pattern)
    if not directory.is_dir():
        raise DataError(f"{directory}: directory does not exist")
    return sorted(m.group("id") for p in directory.iterdir() if p.is_file() and (m := rx.match(p.name)))


def _resolve_split(
    root: Path, split: str | os.PathLike | Sequence[str] | None, splits_dir: str
) -> tuple[list[str] | None, str]:
    """Ids of a split (or None for 'all') and a description of where they came from."""
    if split is None:
        return None, "all files"
    if not isinstance(split, (str, os.PathLike)):
        ids = [str(i) for i in split]
        if len(set(ids)) != len(ids):
            raise DataError("split list repeats ids")
        if not ids:
            raise DataError("the split list holds no tile ids; give at least one id")
        return ids, "split list"
    candidates = [Path(split), root / splits_dir / str(split), root / splits_dir / f"{split}{SPLIT_SUFFIX}"]
    for c in candidates:
        if c.is_file():
            return _read_split_file(c), str(c)
    raise DataError(f"split {str(split)!r} not found; tried {', '.join(str(c) for c in candidates)}")


def _read_split_file(path: Path) -> list[str]:
    """Ids of a split file, refusing an empty one (naming it)."""
    ids = read_ids(path)
    if not ids:
        raise DataError(
            f"{path}: split file holds no tile ids (one id per line; blank lines and '#' comments are skipped); list "
            f"the tiles of this split in it, or point the config's split key (data.labelled_split, "
            f"data.unlabelled_split, data.val_split, probe.train_split, probe.val_split) at a split file that lists some")
    return ids


def _to_tensors(sample: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in sample.items():
        if isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(np.ascontiguousarray(v))
        else:
            out[k] = v
    return out


def _check_label_values(mask: np.ndarray, num_classes: int, where: str | Path) -> None:
    """Raise ValueError naming ``where`` if ``mask`` holds labels outside ``0..num_classes-1`` and 255."""
    if mask.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    else:
        if np.issubdtype(mask.dtype, np.floating):
            finite = mask[np.isfinite(mask)]
            if np.any(finite != np.round(finite)):
                raise DataError(f"{where}: mask holds non-integer label values")
        present = np.unique(mask[np.isfinite(mask)] if np.issubdtype(mask.dtype, np.floating) else mask)
    bad = [int(v) for v in present if not (0 <= v < num_classes or v == IGNORE_INDEX)]
    if bad:
        raise DataError(
            f"{where}: label value(s) {bad[:10]} outside the class list 0..{num_classes - 1} "
            f"(ignore value {IGNORE_INDEX})"
        )


# ---------------------------------------------------------------------- base
class _RasterDataset(Dataset):
    """Sensor handling, sample assembly and transform application shared by all datasets."""

    def __init__(
        self,
        sensor: str | SensorSpec,
        bands: Sequence[str] | None,
        transform: Transform | None,
        return_georef: bool,
        fill_value: str | float | None,
        offset: float,
        validate: str,
        input_units: str | None = None,
    ) -> None:
        _check_mode("validate", validate, VALIDATE_MODES)
        if isinstance(fill_value, str) and fill_value != "mean":
            raise ValueError(f"fill_value must be 'mean', a number or None, got {fill_value!r}")
        spec = get_sensor(sensor).with_input_units(input_units)
        self.spec: SensorSpec = spec.subset(bands) if bands is not None else spec
        # Names assumed for multi-band files without band descriptions: the sensor's file bands (registry: its full
        # band list; a data.sensor mapping: its bands), or the selection's raw bands for a file with that many bands.
        self.file_bands: tuple[str, ...] = file_band_names(self.spec)
        self._file_names: dict[str, tuple[str, ...]] = {}  # names assumed for files without descriptions
        self._unnamed_warned = False
        self.transform = transform
        self.return_georef = return_georef
        self.fill_value = fill_value
        self.offset = offset
        self.validate = validate

    @property
    def bands(self) -> tuple[str, ...]:
        """Channel names of ``image``."""
        return self.spec.bands

    # -- band names and units
    def _defaults_for(self, count: int) -> tuple[str, ...]:
        """Names assumed for a file of ``count`` bands without descriptions."""
        raw = tuple(self.spec.raw_bands)
        if count != len(self.file_bands) and count == len(raw):
            return raw
        return self.file_bands

    def _header(self, path: str | os.PathLike, check_data: bool = False) -> RasterInfo:
        """The header of a multi-band file with its band names (descriptions, else the assumed names)."""
        info = raster_info(path, check_data=check_data)
        if any(n is None for n in info.band_names):
            defaults = self._defaults_for(info.count)
            info = dataclasses.replace(info, band_names=fill_band_names(path, info.band_names, defaults))
            self._file_names[str(path)] = defaults
            self._warn_unnamed(path, defaults)
        return info

    def _names_for(self, path: str | os.PathLike) -> tuple[str, ...]:
        """``default_band_names`` for reading ``path`` (the header is read once for a file not seen yet)."""
        key = str(path)
        if key not in self._file_names and self.validate == "none":
            self._header(path)
        return self._file_names.get(key, self.file_bands)

    def _warn_unnamed(self, path: str | os.PathLike, names: Sequence[str]) -> None:
        if self._unnamed_warned:
            return
        self._unnamed_warned = True
        logger.warning(
            "%s: no band descriptions; its bands (and those of every such file of this %s dataset) are taken to be "
            "%s in this order. Write band descriptions, or list the bands in file order with a data.sensor mapping "
            "(README 'Your own data'), if that is not what the files hold.",
            path, self.spec.name, ", ".join(names))

    def _check_header(self, path: str | os.PathLike, info: RasterInfo) -> None:
        """The raw bands are present and their dtypes fit the declared units (complex or not)."""
        raw = list(self.spec.raw_bands)
        present = [n for n in info.band_names if n is not None]
        missing = [b for b in raw if b not in present]
        if missing:
            raise RasterError(f"{path}: band(s) {missing} not found; bands present: {', '.join(present)}")
        names = list(info.band_names)
        check_dtypes([info.dtypes[names.index(b)] for b in raw], self.spec, raw, path)

    def _check_values(self, sources: Sequence[Path], band_folders: bool = False) -> None:
        """Value-range check (:func:`common.bands.check_raw_values`, ``sampled``) of the centre window of a few
        sources: evenly spaced ones and the first file without band descriptions."""
        if self.validate == "none" or not sources:
            return
        picks = [sources[int(i)] for i in np.linspace(0, len(sources) - 1, min(len(sources), VALUE_CHECK_FILES))]
        unnamed = [p for p in sources if str(p) in self._file_names][:1]
        for src in dict.fromkeys(unnamed + picks):
            if band_folders:
                for band, f in find_band_files(src, self.spec.raw_bands).items():
                    r = read_raster(f, window=_centre_window(raster_info(f, check_data=False)),
                                    fallback_nodata=self.spec.nodata)
                    check_raw_values(r.array, r.valid, self.spec, [band], f, sampled=True)
            else:
                raw = list(self.spec.raw_bands)
                r = read_raster(src, bands=raw, window=_centre_window(raster_info(src, check_data=False)),
                                default_band_names=self._names_for(src), fallback_nodata=self.spec.nodata)
                check_raw_values(r.array, r.valid, self.spec, raw, src, sampled=True,
                                 unnamed=str(src) in self._file_names)

    def _model_image(
        self, raw: np.ndarray, raw_bands: Sequence[str], valid: np.ndarray, where: str | os.PathLike = "input"
    ) -> tuple[np.ndarray, np.ndarray]:
        check_raw_values(raw, valid, self.spec, raw_bands, where)
        image = to_model_units(raw, self.spec, raw_bands=raw_bands, offset=self.offset)
        valid = valid & np.isfinite(image).all(axis=0)
        if self.fill_value is not None and not valid.all():
            if self.fill_value == "mean":
                fill = self.spec.mean_array()
            else:
                fill = np.full(len(self.spec.bands), self.fill_value, np.float32)
            image = np.where(valid[None], image, fill[:, None, None]).astype(np.float32)
        return image, valid

    def _finish(self, sample: dict[str, Any], georef: Mapping[str, Any]) -> dict[str, Any]:
        if self.return_georef:
            sample["crs"] = georef["crs"]
            sample["transform"] = tuple(georef["transform"])
        if self.transform is not None:
            sample = self.transform(sample)
            if not isinstance(sample, dict):
                raise TypeError(f"transform {self.transform!r} must return a dict, got {type(sample).__name__}")
        return _to_tensors(sample)

    def _index(self, index: int) -> int:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        return index


# ---------------------------------------------------------------------- unlabelled
class UnlabelledTiles(_RasterDataset):
    """Unlabelled image tiles for self-supervised pretraining (and tiled inference).

    Datasheet:
        Sources: multi-band GeoTIFFs (``layout="multiband"``; band names from the band descriptions, or the
            sensor's full band list, e.g. the 12 S2L2A bands, for files without descriptions) or folders with one
            GeoTIFF per band named ``*_<BAND>.tif`` as in BigEarthNet (``layout="band_files"``; bands resampled to
            the finest selected band's grid). ``layout="auto"`` picks band folders when every file found lies in a
            folder holding all needed band files.
        Samples: ``image``, ``valid``, ``index``, ``id`` (file stem or folder name), plus ``tile``
            (int64 ``[row_off, col_off, height, width]``) when ``tile_size`` is set and ``crs``/``transform`` when
            ``return_georef``.
        Tiling: ``tile_size`` splits every multi-band file into windows (:func:`common.raster.tile_windows`, last
            tile flush with the edge); files smaller than a tile are padded with invalid pixels.
        Units: model units of the sensor (S2 reflectance, SAR dB), not normalised.

    Args:
        root: Directory (searched with ``glob``) or a list of files / band folders.
        sensor: Sensor name or spec.
        bands: Band names in channel order (default: the sensor's bands).
        transform: Sample transform (numpy in, dict out).
        glob: Pattern for ``root`` directories.
        layout: ``"auto"``, ``"multiband"`` or ``"band_files"``.
        tile_size: Optional tile size for large scenes (multi-band layout only).
        overlap: Tile overlap in pixels.
        return_georef: Add ``crs`` and ``transform``.
        validate: ``"full"``, ``"header"`` or ``"none"``.
        fill_value: Fill of invalid pixels (``"mean"``, a float or None).
        offset: Sentinel-2 radiometric offset in DN (-1000 for baseline >= 04.00).
        resampling: Resampling of coarser band files (band-folder layout).
        exclude_ids: Ids (file stems or band-folder names) left out, e.g. the validation tiles of a split file.
        input_units: What the files hold (:data:`common.bands.INPUT_UNITS`; default: the sensor's).

    Raises:
        ValueError / RasterError: No inputs, or an invalid input (the message names the file and the problem).
    """

    LAYOUTS = ("auto", "multiband", "band_files")

    def __init__(
        self,
        root: str | os.PathLike | Sequence[str | os.PathLike],
        sensor: str | SensorSpec | SensorDef = "S2L2A",
        bands: Sequence[str] | None = None,
        transform: Transform | None = None,
        *,
        glob: str = "**/*.tif",
        layout: str = "auto",
        tile_size: int | None = None,
        overlap: int = 0,
        return_georef: bool = False,
        validate: str = "full",
        fill_value: str | float | None = "mean",
        offset: float = 0,
        resampling: str = "bilinear",
        exclude_ids: Collection[str] = (),
        input_units: str | None = None,
    ) -> None:
        super().__init__(sensor, bands, transform, return_georef, fill_value, offset, validate, input_units)
        _check_mode("layout", layout, self.LAYOUTS)
        self.resampling = resampling
        self.tile_size = tile_size
        self.overlap = overlap
        self.root: Path | None = Path(root) if isinstance(root, (str, os.PathLike)) and Path(root).is_dir() else None
        sources, self.layout = self._discover(root, glob, layout)
        if not sources:
            raise DataError(f"{root}: no input rasters found (glob {glob!r}, layout {layout!r})")
        if exclude_ids:
            excluded = set(exclude_ids)
            sources = [p for p in sources if self._source_id(p) not in excluded]
            if not sources:
                raise DataError(f"{root}: every input raster (glob {glob!r}) is among the excluded ids")
        self.sources: list[Path] = sources
        if self.layout == "band_files" and tile_size is not None:
            raise DataError("tile_size is only supported for multi-band files, not band folders")
        infos = self._validate_sources()
        self.items: list[tuple[int, Tile | None]] = []
        for si, src in enumerate(self.sources):
            if tile_size is None:
                self.items.append((si, None))
                continue
            info = infos[si] if infos[si] is not None else raster_info(src, check_data=False)
            for t in tile_windows(info.height, info.width, tile_size, overlap):
                self.items.append((si, t))

    def _discover(self, root: Any, glob: str, layout: str) -> tuple[list[Path], str]:
        if isinstance(root, (str, os.PathLike)):
            root = Path(root)
            if root.is_file():
                files = [root]
            elif root.is_dir():
                files = sorted(p for p in root.glob(glob) if p.is_file() and p.suffix in GEOTIFF_SUFFIXES)
            else:
                raise DataError(f"{root}: input path does not exist")
            entries: list[Path] = files
        else:
            entries = [Path(p) for p in root]
            missing = [str(p) for p in entries if not p.exists()]
            if missing:
                raise DataError(f"input path(s) do not exist: {missing[:5]}")
            files = [p for p in entries if p.is_file()]
        dirs_given = [p for p in entries if p.is_dir()]
        if layout == "multiband":
            if dirs_given:
                raise DataError(f"{dirs_given[0]}: a directory given with layout='multiband'")
            return files, layout
        if layout == "band_files" or dirs_given:
            folders = sorted(set(dirs_given) | {p.parent for p in files})
            return folders, "band_files"
        # auto: band folders when every file sits in a folder that holds a file for every needed band
        raw = self.spec.raw_bands
        folders = sorted({p.parent for p in files})
        suffixes = {f"_{b.upper()}" for b in raw}

        def is_band_folder(d: Path) -> bool:
            stems = {p.stem.upper() for p in files if p.parent == d}
            return all(any(s.endswith(suf) for s in stems) for suf in suffixes)

        if folders and all(is_band_folder(d) for d in folders):
            return folders, "band_files"
        return files, "multiband"

    def _validate_sources(self) -> list[RasterInfo | None]:
        infos: list[RasterInfo | None] = [None] * len(self.sources)
        if self.validate == "none":
            for s in self.sources:
                if not s.exists():
                    raise RasterError(f"{s}: does not exist")
            return infos
        check = self.validate == "full"
        raw = list(self.spec.raw_bands)
        for i, src in enumerate(self.sources):
            if self.layout == "band_files":
                for b, f in find_band_files(src, raw).items():
                    info = raster_info(f, check_data=check)
                    if info.count != 1:
                        raise RasterError(f"{f}: band file for {b} has {info.count} bands, expected 1")
                    check_dtypes(info.dtypes, self.spec, [b], f)
            else:
                info = self._header(src, check_data=check)
                self._check_header(src, info)
                infos[i] = info
        self._check_values(self.sources, band_folders=self.layout == "band_files")
        return infos

    def _source_id(self, src: Path) -> str:
        return src.name if self.layout == "band_files" else src.stem

    def sample_key(self, index: int, match: str = "path") -> str:
        """The key pairing this sample with a co-registered sensor's (see :data:`MATCH_MODES`); tiles of a scene
        add ``@row_col``."""
        _check_mode("match", match, MATCH_MODES)
        si, tile = self.items[self._index(index)]
        src = self.sources[si]
        if match == "bigearthnet":
            key = _bigearthnet_pair_name(src) if self.layout == "band_files" else src.stem
        elif match == "stem" or self.root is None:
            key = self._source_id(src)
        else:
            try:
                rel = src.relative_to(self.root)
            except ValueError:
                rel = Path(src.name)
            key = (rel if self.layout == "band_files" else rel.with_suffix("")).as_posix()
        return key if tile is None else f"{key}@{tile.row_off}_{tile.col_off}"

    def sample_grid(self, index: int) -> RasterGrid:
        """The pixel grid of a sample, from the file headers."""
        si, tile = self.items[self._index(index)]
        src = self.sources[si]
        if self.layout == "band_files":
            return _band_folder_grid(src, self.spec)
        return _grid_of(self._header(src), tile, self.tile_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._index(index)
        si, tile = self.items[index]
        src = self.sources[si]
        raw = list(self.spec.raw_bands)
        if self.layout == "band_files":
            r = read_band_files(src, raw, resampling=self.resampling, fallback_nodata=self.spec.nodata)
            sample_id = src.name
        else:
            window = None if tile is None else Tile(tile.row_off, tile.col_off, self.tile_size, self.tile_size)
            r = read_raster(
                src, bands=raw, window=window, default_band_names=self._names_for(src),
                fallback_nodata=self.spec.nodata, boundless=tile is not None,
            )  # fmt: skip
            sample_id = src.stem
        image, valid = self._model_image(r.array, raw, r.valid, src)
        sample: dict[str, Any] = {"image": image, "valid": valid, "index": index, "id": sample_id}
        if tile is not None:
            sample["tile"] = np.array([tile.row_off, tile.col_off, tile.height, tile.width], dtype=np.int64)
        return self._finish(sample, r.georef())


# ---------------------------------------------------------------------- segmentation
class SegmentationDataset(_RasterDataset):
    """Multi-band image tiles with class-index masks (or without, for the unlabelled part of semi-supervised runs).

    Datasheet:
        Layout: ``root/<image_dir>/<image_pattern>`` (default ``images/{id}.tif``), masks
            ``root/<mask_dir>/<mask_pattern>`` (single band, class index, 255 ignore, optional nodata), split files
            ``root/splits/<name>.txt`` with one id per line (``train_all``, ``labelled_1_8``, ``unlabelled_1_8``,
            ``val`` in the demo data).
        Samples: ``image``, ``valid``, ``index``, ``id``; ``mask`` (int64, 255 where ignored, where the mask file is
            no-data and where the image is invalid) when ``labelled``; ``crs``/``transform`` when ``return_georef``.
        Validation (construction): missing split ids, unreadable/truncated images and masks, missing band names or
            wrong band counts, mask/image size, CRS or transform mismatch (a mask without CRS is taken as
            pixel-aligned), and label values outside ``0..num_classes-1`` (at construction, or at first load for
            datasets above :data:`LABEL_CHECK_PIXEL_BUDGET` mask pixels; see ``label_check``).
        Units: model units of the sensor, not normalised.

    Args:
        root: Dataset root.
        split: Split file name (looked up as a path, then under ``root/splits`` with and without ``.txt``), a list
            of ids, or None for every image.
        image_dir: Image sub-directory of ``root`` (an absolute path is used as is).
        mask_dir: Mask sub-directory of ``root`` (an absolute path is used as is: e.g. S1 tiles co-registered with
            S2 tiles share the S2 masks and split files).
        bands: Band names in channel order (default: the sensor's bands).
        sensor: Sensor name or spec.
        num_classes: Number of classes (required when ``labelled``).
        transform: Sample transform (numpy in, dict out).
        labelled: Load masks; False gives image-only samples (unlabelled split).
        return_georef: Add ``crs`` and ``transform``.
        image_pattern: Image file name pattern with ``{id}``.
        mask_pattern: Mask file name pattern with ``{id}``.
        validate: ``"full"``, ``"header"`` or ``"none"``.
        label_check: ``"auto"``, ``"construction"`` or ``"access"``.
        fill_value: Fill of invalid pixels (``"mean"``, a float or None).
        offset: Sentinel-2 radiometric offset in DN.
        class_names: Optional class names (length ``num_classes``).
        input_units: What the image files hold (:data:`common.bands.INPUT_UNITS`; default: the sensor's).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | os.PathLike | Sequence[str] | None = None,
        image_dir: str = "images",
        mask_dir: str = "masks",
        bands: Sequence[str] | None = None,
        sensor: str | SensorSpec | SensorDef = "S2L2A",
        num_classes: int | None = None,
        transform: Transform | None = None,
        *,
        labelled: bool = True,
        return_georef: bool = False,
        image_pattern: str = _DEFAULT_IMAGE_PATTERN,
        mask_pattern: str = _DEFAULT_IMAGE_PATTERN,
        validate: str = "full",
        label_check: str = "auto",
        fill_value: str | float | None = "mean",
        offset: float = 0,
        class_names: Sequence[str] | None = None,
        input_units: str | None = None,
    ) -> None:
        super().__init__(sensor, bands, transform, return_georef, fill_value, offset, validate, input_units)
        _check_mode("label_check", label_check, LABEL_CHECK_MODES)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset root does not exist")
        if labelled and (num_classes is None or num_classes < 1):
            raise DataError(f"{self.root}: num_classes is required for a labelled segmentation dataset")
        if num_classes is not None and num_classes > IGNORE_INDEX:
            raise DataError(f"num_classes={num_classes} collides with the ignore value {IGNORE_INDEX}")
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise DataError(f"{len(class_names)} class names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.class_names = tuple(class_names) if class_names is not None else None
        self.labelled = labelled
        self.image_dir = self.root / image_dir
        self.mask_dir = self.root / mask_dir
        self.image_pattern = image_pattern
        self.mask_pattern = mask_pattern
        _pattern_regex(image_pattern), _pattern_regex(mask_pattern)
        ids, self.split_source = _resolve_split(self.root, split, SPLITS_DIR)
        if ids is None:
            ids = _ids_in_dir(self.image_dir, image_pattern)
            if not ids:
                raise DataError(f"{self.image_dir}: no images matching {image_pattern!r}")
        self.ids: list[str] = ids
        missing = [i for i in ids if not self.image_path(i).is_file()]
        if missing:
            raise DataError(
                f"{self.split_source}: {len(missing)} id(s) have no image in {self.image_dir} "
                f"(pattern {image_pattern!r}), e.g. {missing[:5]}"
            )
        self._check_labels_on_access = False
        self._validate_items(label_check)

    # -- paths
    def image_path(self, sample_id: str) -> Path:
        """Image file of an id."""
        return self.image_dir / self.image_pattern.format(id=sample_id)

    def mask_path(self, sample_id: str) -> Path:
        """Mask file of an id."""
        return self.mask_dir / self.mask_pattern.format(id=sample_id)

    # -- validation
    def _label_sources_missing(self, sample_id: str) -> str | None:
        """Description of the missing label source of an id, or None if present."""
        p = self.mask_path(sample_id)
        return None if p.is_file() else f"{p}: mask file does not exist"

    def _validate_items(self, label_check: str) -> None:
        if self.labelled:
            for i in self.ids:
                problem = self._label_sources_missing(i)
                if problem:
                    raise DataError(problem)
        if self.validate == "none":
            self._check_labels_on_access = self.labelled
            return
        check = self.validate == "full"
        total_mask_pixels = 0
        for i in self.ids:
            info = self._header(self.image_path(i), check_data=check)
            self._check_header(self.image_path(i), info)
            if self.labelled:
                total_mask_pixels += self._validate_label_header(i, info, check)
        self._check_values([self.image_path(i) for i in self.ids])
        if not self.labelled:
            return
        read_now = label_check == "construction" or (
            label_check == "auto" and check and total_mask_pixels <= LABEL_CHECK_PIXEL_BUDGET
        )
        if read_now:
            for i in self.ids:
                self._load_mask(i, check_values=True)
        else:
            self._check_labels_on_access = True

    def _validate_label_header(self, sample_id: str, image: RasterInfo, check_data: bool) -> int:
        """Check the mask header against the image; returns the mask's pixel count."""
        mp = self.mask_path(sample_id)
        m = raster_info(mp, check_data=check_data)
        if m.count != 1:
            raise RasterError(f"{mp}: mask has {m.count} bands, expected 1")
        if m.shape != image.shape:
            raise RasterError(
                f"{mp}: mask size {m.height}x{m.width} differs from image {image.path} ({image.height}x{image.width})"
            )
        if m.crs is not None and image.crs is not None:
            if to_crs(m.crs) != to_crs(image.crs):
                raise RasterError(f"{mp}: mask CRS {m.crs} differs from image {image.path} CRS {image.crs}")
            if not np.allclose(m.transform, image.transform, rtol=1e-9, atol=1e-6 * image.resolution[0]):
                raise RasterError(
                    f"{mp}: mask transform {m.transform} differs from image {image.path} {image.transform}"
                )
        return m.width * m.height

    # -- loading
    def _load_mask(
        self,
        sample_id: str,
        check_values: bool,
        image_shape: tuple[int, int] | None = None,
        georef: Mapping[str, Any] | None = None,
    ) -> np.ndarray:
        """Mask of an id as int64 (H, W) with IGNORE_INDEX where the mask file is no-data."""
        mp = self.mask_path(sample_id)
        s = read_raster(mp, bands=[1])
        if check_values:
            _check_label_values(s.array[0][s.valid], self.num_classes, mp)  # type: ignore[arg-type]
        mask = s.array[0].astype(np.int64)
        mask[~s.valid] = IGNORE_INDEX
        if image_shape is not None and mask.shape != tuple(image_shape):
            raise RasterError(f"{mp}: mask size {mask.shape} differs from image size {tuple(image_shape)}")
        return mask

    def sample_key(self, index: int, match: str = "path") -> str:
        """The sample's id (co-registered segmentation tiles are paired by id, whatever ``match``)."""
        return self.ids[self._index(index)]

    def sample_grid(self, index: int) -> RasterGrid:
        """The pixel grid of a sample, from the image header."""
        return _grid_of(self._header(self.image_path(self.ids[self._index(index)])))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._index(index)
        sample_id = self.ids[index]
        raw = list(self.spec.raw_bands)
        path = self.image_path(sample_id)
        r = read_raster(path, bands=raw, default_band_names=self._names_for(path), fallback_nodata=self.spec.nodata)
        image, valid = self._model_image(r.array, raw, r.valid, path)
        sample: dict[str, Any] = {"image": image, "valid": valid, "index": index, "id": sample_id}
        if self.labelled:
            mask = self._load_mask(sample_id, self._check_labels_on_access, image.shape[1:], r.georef())
            mask[~valid] = IGNORE_INDEX
            sample["mask"] = mask
        return self._finish(sample, r.georef())


class SpaceNet6Tiles(SegmentationDataset):
    """SpaceNet-6-like quad-pol SAR tiles with building footprints (binary segmentation: background, building).

    Datasheet:
        Layout: images ``root/<image_dir>/<image_pattern>`` (4-band HH, HV, VH, VV linear intensity, converted to
            dB; nodata 0), footprints ``root/<geojson_dir>/<geojson_pattern>`` (GeoJSON FeatureCollection of
            (Multi)Polygons), optional masks ``root/<mask_dir>/<mask_pattern>`` (uint8 0/1, 255 ignore). For the
            real SpaceNet-6 release use e.g. ``image_dir="SAR-Intensity"``,
            ``image_pattern="SN6_Train_AOI_11_Rotterdam_SAR-Intensity_{id}.tif"``,
            ``geojson_dir="geojson_buildings"``,
            ``geojson_pattern="SN6_Train_AOI_11_Rotterdam_Buildings_{id}.geojson"``.
        Labels: footprints are burnt with :func:`rasterio.features.rasterize` onto the image grid (value 1,
            ``all_touched`` option); when an id has no GeoJSON the mask raster is used instead. Pixels where the
            SAR image is invalid become 255.
        GeoJSON CRS: the file's ``crs`` member if present, else ``geojson_crs`` if given, else EPSG:4326 (RFC 7946)
            when the image CRS is projected, all coordinates lie within longitude/latitude range and they do not
            overlap the tile in image coordinates; else the image CRS. Geometries are reprojected to the image CRS
            when needed.
        Samples: as :class:`SegmentationDataset` (``mask`` only when ``labelled``).
        Tiles overlap in SpaceNet-6: build folds with ``python -m common.splits --group-by ...``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | os.PathLike | Sequence[str] | None = None,
        image_dir: str = "images",
        geojson_dir: str = "geojson",
        mask_dir: str = "masks",
        bands: Sequence[str] | None = None,
        sensor: str | SensorSpec | SensorDef = "SAR4",
        transform: Transform | None = None,
        *,
        labelled: bool = True,
        return_georef: bool = False,
        image_pattern: str = _DEFAULT_IMAGE_PATTERN,
        geojson_pattern: str = "{id}.geojson",
        mask_pattern: str = _DEFAULT_IMAGE_PATTERN,
        geojson_crs: str | None = None,
        all_touched: bool = False,
        validate: str = "full",
        label_check: str = "auto",
        fill_value: str | float | None = "mean",
        input_units: str | None = None,
    ) -> None:
        self.geojson_dir = Path(root) / geojson_dir
        self.geojson_pattern = geojson_pattern
        _pattern_regex(geojson_pattern)
        self.geojson_crs = geojson_crs
        self.all_touched = all_touched
        super().__init__(
            root, split, image_dir=image_dir, mask_dir=mask_dir, bands=bands, sensor=sensor,
            num_classes=len(SPACENET6_CLASSES), transform=transform, labelled=labelled,
            return_georef=return_georef, image_pattern=image_pattern, mask_pattern=mask_pattern, validate=validate,
            label_check=label_check, fill_value=fill_value, class_names=SPACENET6_CLASSES, input_units=input_units,
        )  # fmt: skip

    def geojson_path(self, sample_id: str) -> Path:
        """GeoJSON file of an id."""
        return self.geojson_dir / self.geojson_pattern.format(id=sample_id)

    def _label_sources_missing(self, sample_id: str) -> str | None:
        if self.geojson_path(sample_id).is_file() or self.mask_path(sample_id).is_file():
            return None
        return f"{self.geojson_path(sample_id)}: no building footprints (and no mask {self.mask_path(sample_id)})"

    def _validate_label_header(self, sample_id: str, image: RasterInfo, check_data: bool) -> int:
        gp = self.geojson_path(sample_id)
        if gp.is_file():
            self._read_geojson(gp)  # parse errors surface at construction
            return 0
        return super()._validate_label_header(sample_id, image, check_data)

    @staticmethod
    def _read_geojson(path: Path) -> dict[str, Any]:
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not valid GeoJSON ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("type") not in ("FeatureCollection", "Feature"):
            raise DataError(f"{path}: expected a GeoJSON FeatureCollection or Feature")
        feats = doc.get("features", []) if doc["type"] == "FeatureCollection" else [doc]
        for k, f in enumerate(feats):
            geom = (f or {}).get("geometry")
            if geom is not None and geom.get("type") not in ("Polygon", "MultiPolygon"):
                raise DataError(f"{path}: feature {k} has geometry type {geom.get('type')}, expected (Multi)Polygon")
        return doc

    def _geojson_crs(
        self, doc: Mapping[str, Any], geoms: list[dict[str, Any]], georef: Mapping[str, Any], shape: tuple[int, int]
    ) -> Any:
        """CRS of the footprints: ``crs`` member, else ``geojson_crs``, else guessed (see the class docstring)."""
        member = doc.get("crs")
        if isinstance(member, dict):
            name = (member.get("properties") or {}).get("name")
            if name:
                return to_crs(name)
        if self.geojson_crs is not None:
            return to_crs(self.geojson_crs)
        img = to_crs(georef["crs"])
        if img is None or not img.is_projected or not geoms:
            return img
        coords = np.concatenate(
            [np.asarray(_flatten_coords(g["coordinates"]), dtype=float).reshape(-1, 2) for g in geoms]
        )
        a, b, c, d, e, f = georef["transform"]
        h, w = shape
        xs = [c, c + a * w + b * h, c + a * w, c + b * h]
        ys = [f, f + d * w + e * h, f + d * w, f + e * h]
        overlaps_tile = (
            coords[:, 0].max() >= min(xs) and coords[:, 0].min() <= max(xs)
            and coords[:, 1].max() >= min(ys) and coords[:, 1].min() <= max(ys)
        )  # fmt: skip
        lonlat = np.all(np.abs(coords[:, 0]) <= 180) and np.all(np.abs(coords[:, 1]) <= 90)
        return to_crs("EPSG:4326") if lonlat and not overlaps_tile else img

    def _load_mask(
        self,
        sample_id: str,
        check_values: bool,
        image_shape: tuple[int, int] | None = None,
        georef: Mapping[str, Any] | None = None,
    ) -> np.ndarray:
        gp = self.geojson_path(sample_id)
        if not gp.is_file():
            return super()._load_mask(sample_id, check_values, image_shape, georef)
        if image_shape is None or georef is None:  # construction-time check: footprints give only 0/1
            return np.zeros((0, 0), dtype=np.int64)
        from rasterio.features import rasterize
        from rasterio.warp import transform_geom

        doc = self._read_geojson(gp)
        feats = doc.get("features", []) if doc["type"] == "FeatureCollection" else [doc]
        geoms = [f["geometry"] for f in feats if f and f.get("geometry")]
        mask = np.zeros(tuple(image_shape), dtype=np.uint8)
        if geoms:
            src_crs = self._geojson_crs(doc, geoms, georef, tuple(image_shape))
            dst_crs = to_crs(georef["crs"])
            if src_crs is not None and dst_crs is not None and src_crs != dst_crs:
                geoms = [transform_geom(src_crs, dst_crs, g) for g in geoms]
            mask = rasterize(
                [(g, 1) for g in geoms], out_shape=tuple(image_shape), transform=to_affine(georef["transform"]),
                fill=0, all_touched=self.all_touched, dtype="uint8",
            )  # fmt: skip
        return mask.astype(np.int64)


def _flatten_coords(coords: Any) -> list[tuple[float, float]]:
    if isinstance(coords, (list, tuple)) and coords and isinstance(coords[0], (int, float)):
        return [(float(coords[0]), float(coords[1]))]
    out: list[tuple[float, float]] = []
    for c in coords:
        out.extend(_flatten_coords(c))
    return out


# ---------------------------------------------------------------------- BigEarthNet
class BigEarthNetPatches(_RasterDataset):
    """BigEarthNet-S2 (L2A, 12 bands, one GeoTIFF per band at 10/20/60 m) or BigEarthNet-S1 (VV, VH in dB) patches.

    Datasheet:
        Layout: ``root/<patch>/<patch>_<BAND>.tif`` and ``root/<patch>/<patch>_labels_metadata.json``
            (``labels``: CORINE class names; ``coordinates``; ``projection``; acquisition date).
        Resampling: all bands are resampled (``resampling``, default bilinear) onto the 10 m grid (120x120) and
            carry its georeferencing.
        Samples: ``image``, ``valid``, ``index``, ``id`` (patch name), ``labels`` (float32 multi-hot over
            ``classes``, by default the 43 :data:`BIGEARTHNET_CLASSES`), ``label_names`` (the patch's class names
            joined with ``"|"``: a string, so batches collate), plus ``crs``/``transform`` when ``return_georef``.
        Units: S2 reflectance (DN / 10000; BigEarthNet predates the baseline-04.00 offset), S1 dB; the optional
            ``"VV/VH"`` band is derived.
        Licence: BigEarthNet data is CDLA-Permissive-1.0.

    Args:
        root: Folder holding the patch folders.
        sensor: ``"S2L2A"`` or ``"S1"``.
        bands: Band names in channel order (default: all bands of the sensor).
        transform: Sample transform (numpy in, dict out).
        patches: Optional patch names (list, or a split file with one name per line).
        classes: Class list of the multi-hot vector.
        return_georef: Add ``crs`` and ``transform``.
        resampling: ``"bilinear"`` or ``"nearest"`` for the 20/60 m bands.
        validate: ``"full"``, ``"header"`` or ``"none"``.
        fill_value: Fill of invalid pixels.
    """

    SENSORS = ("S2L2A", "S1")

    def __init__(
        self,
        root: str | os.PathLike,
        sensor: str | SensorSpec = "S2L2A",
        bands: Sequence[str] | None = None,
        transform: Transform | None = None,
        *,
        patches: Sequence[str] | str | os.PathLike | None = None,
        classes: Sequence[str] = BIGEARTHNET_CLASSES,
        return_georef: bool = False,
        resampling: str = "bilinear",
        validate: str = "full",
        fill_value: str | float | None = "mean",
    ) -> None:
        name = sensor.name if isinstance(sensor, SensorSpec) else str(sensor)
        if name.upper() not in self.SENSORS:
            raise ValueError(f"BigEarthNetPatches sensor must be one of {self.SENSORS}, got {name!r}")
        super().__init__(sensor, bands, transform, return_georef, fill_value, 0, validate)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: BigEarthNet root does not exist")
        self.resampling = resampling
        self.classes = tuple(classes)
        self._class_index = {c: i for i, c in enumerate(self.classes)}
        found = sorted(
            p for p in self.root.iterdir() if p.is_dir() and (p / f"{p.name}{BIGEARTHNET_METADATA_SUFFIX}").is_file()
        )
        if patches is None:
            if not found:
                raise DataError(f"{self.root}: no BigEarthNet patch folders (with *{BIGEARTHNET_METADATA_SUFFIX})")
            self.patches = found
        else:
            names = _read_split_file(Path(patches)) if isinstance(patches, (str, os.PathLike)) else list(patches)
            if not names:
                raise DataError(f"{self.root}: the patch list holds no patch names")
            missing = [n for n in names if not (self.root / n / f"{n}{BIGEARTHNET_METADATA_SUFFIX}").is_file()]
            if missing:
                raise DataError(
                    f"{self.root}: {len(missing)} patch(es) not found (no labels metadata), e.g. {missing[:5]}"
                )
            self.patches = [self.root / n for n in names]
        self.label_lists: list[tuple[str, ...]] = [self._read_labels(p) for p in self.patches]
        if validate != "none":
            raw = list(self.spec.raw_bands)
            for p in self.patches:
                files = find_band_files(p, raw)
                for b, f in files.items():
                    info = raster_info(f, check_data=validate == "full")
                    if info.count != 1:
                        raise RasterError(f"{f}: band file for {b} has {info.count} bands, expected 1")
                    check_dtypes(info.dtypes, self.spec, [b], f)
            self._check_values(self.patches, band_folders=True)

    def _read_labels(self, patch: Path) -> tuple[str, ...]:
        path = patch / f"{patch.name}{BIGEARTHNET_METADATA_SUFFIX}"
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read labels metadata ({exc})") from exc
        labels = meta.get("labels") if isinstance(meta, dict) else None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise DataError(f"{path}: 'labels' must be a list of class names")
        unknown = [x for x in labels if x not in self._class_index]
        if unknown:
            raise DataError(f"{path}: label(s) {unknown} not in the class list ({len(self.classes)} classes)")
        return tuple(labels)

    def label_names(self, index: int) -> tuple[str, ...]:
        """Class names of a patch."""
        return self.label_lists[self._index(index)]

    def sample_key(self, index: int, match: str = "bigearthnet") -> str:
        """The patch name; with ``match="bigearthnet"`` a Sentinel-1 patch gives its Sentinel-2 partner's name."""
        _check_mode("match", match, MATCH_MODES)
        patch = self.patches[self._index(index)]
        return _bigearthnet_pair_name(patch) if match == "bigearthnet" else patch.name

    def sample_grid(self, index: int) -> RasterGrid:
        """The 10 m grid of a patch, from the band files' headers."""
        return _band_folder_grid(self.patches[self._index(index)], self.spec)

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._index(index)
        patch = self.patches[index]
        raw = list(self.spec.raw_bands)
        r = read_band_files(patch, raw, resampling=self.resampling, fallback_nodata=self.spec.nodata)
        image, valid = self._model_image(r.array, raw, r.valid, patch)
        labels = np.zeros(len(self.classes), dtype=np.float32)
        labels[[self._class_index[c] for c in self.label_lists[index]]] = 1.0
        sample: dict[str, Any] = {
            "image": image, "valid": valid, "index": index, "id": patch.name,
            "labels": labels, "label_names": LABEL_SEPARATOR.join(self.label_lists[index]),
        }  # fmt: skip
        return self._finish(sample, r.georef())


# ---------------------------------------------------------------------- sensor stacks
class StackedDataset(Dataset):
    """Co-registered samples of several sensors stacked along the channel axis (Sentinel-2 + Sentinel-1 ...).

    Datasheet:
        Parts: one dataset per sensor (any of this module's), in channel order, each built with ``transform=None``;
            the first is the *primary*: the stacked sample keeps its ``id``, ``mask``, ``labels``, ``tile``,
            and georeferencing. The parts are paired by :meth:`join` (by key, see :data:`MATCH_MODES`) or given
            aligned (sample ``i`` of every part).
        Samples: ``image`` float32 ``(C_1 + C_2 + ..., H, W)`` in each sensor's model units (S2 reflectance, S1
            dB), ``valid`` = the parts' valid masks combined with AND (a pixel is valid when every band is), ``mask``
            set to :data:`~common.bands.IGNORE_INDEX` where the stack is invalid, invalid pixels filled after
            stacking (``fill_value``). The sensor spec :attr:`spec` is :func:`common.bands.stack_sensors` of the
            parts' specs (conversion per part, e.g. ``"dn_to_reflectance+db"``).
        Checks: the paired samples must lie on the same pixel grid (size, CRS, transform): checked from the file
            headers of every pair at construction (``check_grids``) and again on the arrays at every access; a
            mismatch names both files. Resample one sensor onto the other's grid first (e.g. ``gdalwarp``).

    Args:
        parts: Datasets, one per sensor, in channel order.
        index: Rows ``(i_0, i_1, ...)``: the sample of each part making stacked sample ``k``; default: sample ``k``
            of every part (all parts of one length).
        transform: Sample transform applied to the stacked sample (numpy in, dict out).
        return_georef: Add ``crs`` and ``transform`` (the primary's).
        fill_value: Fill of invalid pixels (``"mean"``: the stack spec's band means, a float, or None).
        check_grids: Compare the grids of every pair from the headers now.
    """

    def __init__(
        self,
        parts: Sequence[Any],
        index: Sequence[Sequence[int]] | None = None,
        transform: Transform | None = None,
        *,
        return_georef: bool = False,
        fill_value: str | float | None = "mean",
        check_grids: bool = True,
    ) -> None:
        parts = list(parts)
        if len(parts) < 2:
            raise ValueError(f"a stack needs at least two datasets, got {len(parts)}")
        for p in parts:
            if getattr(p, "transform", None) is not None:
                raise ValueError(f"{type(p).__name__} of sensor {p.spec.name}: give the stack the transform, not its "
                                 f"parts (they must return samples in model units)")
            p.return_georef = True  # the stack compares the parts' georeferencing at every access
        if isinstance(fill_value, str) and fill_value != "mean":
            raise ValueError(f"fill_value must be 'mean', a number or None, got {fill_value!r}")
        self.parts = parts
        self.spec: SensorSpec = stack_sensors(*(p.spec for p in parts))
        if index is None:
            lengths = {len(p) for p in parts}
            if len(lengths) != 1:
                raise ValueError(f"parts of different lengths {[len(p) for p in parts]}; pair them with "
                                 f"StackedDataset.join")
            index = [(i,) * len(parts) for i in range(len(parts[0]))]
        self.index: list[tuple[int, ...]] = [tuple(int(j) for j in row) for row in index]
        if any(len(row) != len(parts) for row in self.index):
            raise ValueError(f"every index row needs one entry per part ({len(parts)})")
        if not self.index:
            raise DataError("empty stack: no sample pairs")
        self.transform = transform
        self.return_georef = return_georef
        self.fill_value = fill_value
        self.skipped: list[str] = []  # primary keys left out by join(missing="skip")
        if check_grids:
            for row in self.index:
                ref = parts[0].sample_grid(row[0])
                for p, j in zip(parts[1:], row[1:]):
                    other = p.sample_grid(j)
                    if not ref.same_as(other):
                        raise RasterError(f"{other.describe()} is not on the pixel grid of {ref.describe()}: stacked "
                                          f"sensors must be co-registered (resample one onto the other first)")

    @classmethod
    def join(
        cls, parts: Sequence[Any], match: str = "path", missing: str = "error", **kwargs: Any
    ) -> "StackedDataset":
        """Pair the samples of ``parts`` by key (:data:`MATCH_MODES`) in the primary's order.

        Args:
            parts: Datasets, one per sensor, in channel order (the first is the primary).
            match: ``"path"``, ``"stem"`` or ``"bigearthnet"``.
            missing: ``"error"``: every primary sample needs a partner in every other part; ``"skip"``: primary
                samples without one are left out (listed in :attr:`skipped`). Unpaired samples of the other parts
                are never used.
            kwargs: :class:`StackedDataset` options.

        Raises:
            ValueError: duplicate keys in a part, primary samples without partners (``missing="error"``, the message
                counts them and names some), or no pair at all.
        """
        _check_mode("match", match, MATCH_MODES)
        _check_mode("missing", missing, ("error", "skip"))
        parts = list(parts)
        lookups = []
        for p in parts[1:]:
            keys: dict[str, int] = {}
            for i in range(len(p)):
                k = p.sample_key(i, match)
                if k in keys:
                    raise DataError(f"sensor {p.spec.name}: two samples share the key {k!r} (match={match!r}); "
                                     f"use match='path' or give distinct file names")
                keys[k] = i
            lookups.append(keys)
        rows, lost = [], []
        for i in range(len(parts[0])):
            k = parts[0].sample_key(i, match)
            partners = [d.get(k) for d in lookups]
            if any(j is None for j in partners):
                lost.append(k)
            else:
                rows.append((i, *partners))
        names = " and ".join(p.spec.name for p in parts[1:])
        if lost and (missing == "error" or not rows):
            raise DataError(
                f"{len(lost)} of {len(parts[0])} {parts[0].spec.name} samples have no {names} partner (paired by "
                f"{match}), e.g. {lost[:3]}" + ("; set missing='skip' (config: data.stack_missing: skip) to leave "
                                                "them out" if rows else ""))
        out = cls(parts, rows, **kwargs)
        out.skipped = lost
        return out

    @property
    def bands(self) -> tuple[str, ...]:
        """Channel names of ``image``."""
        return self.spec.bands

    def __len__(self) -> int:
        return len(self.index)

    def sample_key(self, index: int, match: str = "path") -> str:
        """The primary's key of a stacked sample."""
        return self.parts[0].sample_key(self.index[index][0], match)

    def sample_grid(self, index: int) -> RasterGrid:
        """The primary's pixel grid of a stacked sample."""
        return self.parts[0].sample_grid(self.index[index][0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for StackedDataset of length {n}")
        row = self.index[index]
        samples = [p[j] for p, j in zip(self.parts, row)]
        first = samples[0]
        images, valid, ref = [], None, None
        for p, smp in zip(self.parts, samples):
            img = np.asarray(smp["image"], dtype=np.float32)
            ok = np.asarray(smp["valid"], dtype=bool)
            grid = RasterGrid(smp["crs"], tuple(smp["transform"]), img.shape[1], img.shape[2],
                              f"sample {smp['id']!r} of {p.spec.name}")
            if ref is None:
                ref = grid
            elif not grid.same_as(ref):
                raise RasterError(f"{grid.describe()} is not on the grid of {ref.describe()}")
            images.append(img)
            valid = ok if valid is None else valid & ok
        image = np.concatenate(images, axis=0)
        assert valid is not None
        valid = valid & np.isfinite(image).all(axis=0)
        if self.fill_value is not None and not valid.all():
            fill = (self.spec.mean_array() if self.fill_value == "mean"
                    else np.full(len(self.spec.bands), self.fill_value, np.float32))
            image = np.where(valid[None], image, fill[:, None, None]).astype(np.float32)
        sample: dict[str, Any] = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in first.items()}
        sample.update(image=image, valid=valid, index=index)
        if "mask" in sample:
            mask = np.array(sample["mask"], dtype=np.int64)
            mask[~valid] = IGNORE_INDEX
            sample["mask"] = mask
        if not self.return_georef:
            sample.pop("crs", None)
            sample.pop("transform", None)
        if self.transform is not None:
            sample = self.transform(sample)
            if not isinstance(sample, dict):
                raise TypeError(f"transform {self.transform!r} must return a dict, got {type(sample).__name__}")
        return _to_tensors(sample)


def stacked_segmentation_dataset(
    root: str | os.PathLike,
    split: str | os.PathLike | Sequence[str] | None,
    spec: SensorSpec,
    image_dirs: Sequence[str],
    image_patterns: Sequence[str] | None = None,
    transform: Transform | None = None,
    *,
    labelled: bool = True,
    return_georef: bool = False,
    fill_value: str | float | None = "mean",
    **kwargs: Any,
) -> SegmentationDataset | StackedDataset:
    """A :class:`SegmentationDataset`, or for a sensor stack the :class:`StackedDataset` of one per sensor.

    Args:
        root: Dataset root (masks and split files are the first sensor's).
        split: Split of the ids (see :class:`SegmentationDataset`).
        spec: The sensor, or a stack (:func:`common.bands.stack_sensors`).
        image_dirs: One image directory per sensor of ``spec`` (relative to ``root`` or absolute); the tiles of an
            id must be co-registered.
        image_patterns: One file-name pattern per sensor (default ``{id}.tif`` for each).
        transform, labelled, return_georef, fill_value: as :class:`SegmentationDataset`.
        kwargs: further :class:`SegmentationDataset` options (``mask_dir``, ``num_classes``, ``validate``, ...).

    Raises:
        ValueError: the number of image directories differs from the number of sensors; any dataset error (a
            missing partner tile names the directory and the ids).
    """
    parts = spec.parts or (spec,)
    if len(image_dirs) != len(parts):
        raise DataError(f"sensor {spec.name} needs {len(parts)} image director{'ies' if len(parts) > 1 else 'y'} "
                         f"(one per sensor), got {list(image_dirs)}")
    patterns = list(image_patterns) if image_patterns is not None else [_DEFAULT_IMAGE_PATTERN] * len(parts)
    if len(patterns) != len(parts):
        raise DataError(f"sensor {spec.name} needs {len(parts)} image patterns, got {patterns}")
    if not spec.parts:
        return SegmentationDataset(root, split, image_dir=image_dirs[0], image_pattern=patterns[0], sensor=spec,
                                   bands=spec.bands, transform=transform, labelled=labelled,
                                   return_georef=return_georef, fill_value=fill_value, **kwargs)
    primary = SegmentationDataset(root, split, image_dir=image_dirs[0], image_pattern=patterns[0], sensor=parts[0],
                                  bands=parts[0].bands, labelled=labelled, fill_value=None, **kwargs)
    other_kw = {k: v for k, v in kwargs.items() if k not in ("mask_dir", "mask_pattern", "label_check", "class_names")}
    others = [SegmentationDataset(root, list(primary.ids), image_dir=d, image_pattern=pat, sensor=p, bands=p.bands,
                                  labelled=False, fill_value=None, **other_kw)
              for d, pat, p in zip(image_dirs[1:], patterns[1:], parts[1:])]
    return StackedDataset([primary, *others], transform=transform, return_georef=return_georef,
                          fill_value=fill_value, check_grids=kwargs.get("validate", "full") != "none")
