"""Raster I/O on top of rasterio: validated reads, per-band-file stacking, tiling and atomic GeoTIFF writes.

Conventions:

* Arrays are channel-first ``(C, H, W)``; masks ``(H, W)``.
* ``valid`` is a bool ``(H, W)`` array, False where *any* band is no-data (file nodata value, or a fallback value
  for files that declare none), NaN or infinite, or masked by an internal GDAL mask/alpha band.
* Georeferencing travels as plain, collate-friendly values: ``crs`` a string (``"EPSG:32633"`` when the CRS has an
  EPSG code, WKT otherwise) and ``transform`` a 6-tuple of floats in rasterio/affine order
  ``(a, b, c, d, e, f)``: ``x = a*col + b*row + c``, ``y = d*col + e*row + f`` (not GDAL's geotransform order).
* Band indexes given as ints are **1-based**, as in rasterio/GDAL. Band *names* come from the band descriptions,
  or from ``default_band_names`` for files that have none.
* Every failure is a :class:`RasterError` (a :class:`~common.errors.DataError`) whose message starts with the file
  name, then states the problem.
* Complex pixels (single-look complex SAR: ``complex64``, ``complex128``, GDAL ``CInt16``/``CInt32`` read as
  ``complex64``/``complex128``) are returned as complex arrays, never cast to their real part; they are not
  resampled (interpolating phase is meaningless): a complex file or band file must lie on the output grid.
* No dataset handle outlives a call, so these functions are safe in DataLoader workers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.warp import reproject
from rasterio.windows import Window

from common.errors import DataError

__all__ = [
    "RasterError",
    "RasterInfo",
    "RasterSample",
    "Tile",
    "GEOTIFF_SUFFIXES",
    "raster_info",
    "fill_band_names",
    "read_raster",
    "find_band_files",
    "read_band_files",
    "tile_windows",
    "write_geotiff",
    "crs_to_string",
    "transform_to_tuple",
    "to_affine",
    "to_crs",
    "unbatch_georef",
    "resampling_method",
]

GEOTIFF_SUFFIXES = (".tif", ".tiff", ".TIF", ".TIFF")
"""File name suffixes treated as GeoTIFFs."""

GRID_TOLERANCE = 0.5
"""Allowed misalignment between band-file footprints, as a fraction of the finest pixel size."""

TRANSFORM_RTOL = 1e-9
"""Relative tolerance when comparing affine transforms."""

TILED_BLOCK = 256
"""Block size of tiled GeoTIFFs written by :func:`write_geotiff` (used when both sides are at least this big)."""

DEFAULT_COMPRESSION = "deflate"
"""Compression of GeoTIFFs written by :func:`write_geotiff`."""


class RasterError(DataError):
    """A raster file cannot be used; the message names the file and the problem."""


_COMPLEX_INT = {"complex_int16": np.complex64, "complex_int32": np.complex128}


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype rasterio reads a band dtype as (GDAL's complex integers become complex floats)."""
    return np.dtype(_COMPLEX_INT.get(str(dtype), dtype))


def _err(path: str | os.PathLike, problem: str) -> RasterError:
    return RasterError(f"{path}: {problem}")


# ---------------------------------------------------------------------- georeferencing helpers
def crs_to_string(crs: CRS | str | None) -> str | None:
    """CRS as ``"EPSG:n"`` when it has an EPSG code, WKT otherwise, ``None`` for no CRS."""
    if crs is None or crs == "":
        return None
    crs = to_crs(crs)
    return crs.to_string() if crs is not None else None


def to_crs(crs: CRS | str | int | None) -> CRS | None:
    """Parse a CRS from a rasterio CRS, ``"EPSG:n"``, WKT, PROJ string or EPSG int (``None`` passes through)."""
    if crs is None or isinstance(crs, CRS):
        return crs
    if isinstance(crs, int):
        return CRS.from_epsg(crs)
    return CRS.from_user_input(crs)


def transform_to_tuple(transform: Affine | Sequence[float]) -> tuple[float, float, float, float, float, float]:
    """Affine transform as a 6-tuple of floats ``(a, b, c, d, e, f)``."""
    t = tuple(float(v) for v in tuple(transform)[:6])
    if len(t) != 6:
        raise ValueError(f"a transform needs 6 coefficients (a, b, c, d, e, f), got {transform!r}")
    return t  # type: ignore[return-value]


def to_affine(transform: Affine | Sequence[float]) -> Affine:
    """Affine from an ``Affine`` or a 6-sequence ``(a, b, c, d, e, f)`` (tensors and arrays work too)."""
    if isinstance(transform, Affine):
        return transform
    return Affine(*transform_to_tuple([float(v) for v in transform]))


def unbatch_georef(crs: Any, transform: Any) -> list[tuple[str | None, tuple[float, ...]]]:
    """Per-sample ``(crs, transform)`` from a batch collated by ``torch.utils.data.default_collate``.

    The default collate turns a list of 6-tuples into a list of 6 tensors of shape ``(B,)`` and a list of strings
    into a list; this undoes that. Also accepts a ``(B, 6)`` tensor/array, a list of 6-tuples, or one sample.

    Args:
        crs: Collated ``crs`` entry (list of str, or a single str).
        transform: Collated ``transform`` entry.

    Returns:
        List of ``(crs_string, transform_6_tuple)``, one per sample.
    """

    def _floats(x: Any) -> list[float]:
        x = x.tolist() if hasattr(x, "tolist") else x
        return [float(v) for v in (x if isinstance(x, (list, tuple)) else [x])]

    if isinstance(crs, str) or crs is None:
        return [(crs, transform_to_tuple(_floats(transform)))]
    crs_list = list(crs)
    n = len(crs_list)
    if hasattr(transform, "shape") and len(transform.shape) == 2:  # (B, 6)
        rows = [tuple(_floats(r)) for r in transform]
    else:
        cols = [_floats(c) for c in transform]
        if len(cols) == 6 and all(len(c) == n for c in cols):  # default_collate layout: 6 x (B,)
            rows = [tuple(c[i] for c in cols) for i in range(n)]
        else:  # list of 6-tuples
            rows = [tuple(r) for r in cols]
    if len(rows) != n:
        raise ValueError(f"batch has {n} CRS strings but {len(rows)} transforms")
    return [(c, transform_to_tuple(r)) for c, r in zip(crs_list, rows)]


def resampling_method(method: str | Resampling) -> Resampling:
    """Parse a resampling name (``"bilinear"``, ``"nearest"``, ``"cubic"``, ``"average"`` ...)."""
    if isinstance(method, Resampling):
        return method
    try:
        return Resampling[str(method).lower()]
    except KeyError:
        valid = ", ".join(r.name for r in Resampling if r.value <= Resampling.sum.value)
        raise DataError(f"unknown resampling {method!r}; valid: {valid}") from None


# ---------------------------------------------------------------------- headers
@dataclass(frozen=True)
class RasterInfo:
    """Header of a raster file (no pixel data).

    Attributes:
        path: File path.
        width: Columns.
        height: Rows.
        count: Number of bands.
        dtypes: Data type per band.
        crs: CRS string (see :func:`crs_to_string`) or None.
        transform: 6-tuple affine transform.
        nodata: No-data value per band (None where undeclared).
        band_names: Band names (descriptions, else ``default_band_names``, else ``None`` entries).
    """

    path: str
    width: int
    height: int
    count: int
    dtypes: tuple[str, ...]
    crs: str | None
    transform: tuple[float, ...]
    nodata: tuple[float | None, ...]
    band_names: tuple[str | None, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return (self.height, self.width)

    @property
    def resolution(self) -> tuple[float, float]:
        """Pixel size ``(x, y)`` in CRS units (positive)."""
        a, b, _, d, e, _ = self.transform
        return (float(np.hypot(a, d)), float(np.hypot(b, e)))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` of the footprint."""
        a, b, c0, d, e, f0 = self.transform
        corners = ((0, 0), (self.width, 0), (0, self.height), (self.width, self.height))
        xs = [a * c + b * r + c0 for c, r in corners]
        ys = [d * c + e * r + f0 for c, r in corners]
        return (min(xs), min(ys), max(xs), max(ys))


def fill_band_names(
    path: str | os.PathLike, descriptions: Sequence[str | None], default_band_names: Sequence[str] | None
) -> tuple[str | None, ...]:
    """Band names of a file: its band descriptions, the gaps filled from ``default_band_names`` (the names assumed
    in file order for files without descriptions).

    Raises:
        RasterError: a band-count mismatch with ``default_band_names`` (the message says how to name the bands
            from the config), or partial descriptions that contradict the assumed order.
    """
    desc = tuple(d if d else None for d in descriptions)
    count = len(desc)
    if all(d is not None for d in desc) or default_band_names is None:
        return desc
    if len(default_band_names) != count:
        raise _err(
            path,
            f"has {count} band(s) and no band descriptions, but {len(default_band_names)} bands were expected "
            f"({', '.join(default_band_names)}); name the file's bands in the config with a data.sensor mapping "
            f"(e.g. data.sensor: {{base: <sensor>, name: <name>, bands: [<the {count} band names in file order>]}}, "
            f"or name/input_units/gsd/... for another sensor; see README 'Your own data'), or write band "
            f"descriptions into the file",
        )
    clash = [(i, d, n) for i, (d, n) in enumerate(zip(desc, default_band_names), start=1) if d not in (None, n)]
    if clash:  # some bands described, and not as the assumed order says: filling the gaps would mislabel bands
        i, d, n = clash[0]
        raise _err(path, f"describes only some of its {count} bands, and band {i} is {d!r} where the assumed "
                         f"order ({', '.join(default_band_names)}) has {n!r}; describe every band, or none")
    return tuple(d if d is not None else n for d, n in zip(desc, default_band_names))


def _band_names(src: Any, default_band_names: Sequence[str] | None, path: Path) -> tuple[str | None, ...]:
    return fill_band_names(path, src.descriptions, default_band_names)


def _open_error(path: Path, exc: Exception) -> RasterError:
    if not path.exists():
        return _err(path, "file does not exist")
    return _err(path, f"cannot be opened as a raster ({exc})")


def raster_info(
    path: str | os.PathLike,
    *,
    default_band_names: Sequence[str] | None = None,
    check_data: bool = True,
) -> RasterInfo:
    """Open a raster, read its header and (optionally) check that its pixel data is readable.

    Args:
        path: Raster file.
        default_band_names: Names assumed for the bands when the file has no band descriptions; the band count
            must match.
        check_data: Also read the last row of every band, which fails for truncated or corrupt files.

    Raises:
        RasterError: Missing/unreadable/truncated file or a band-count mismatch; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise _err(path, "file does not exist" if not path.exists() else "is not a regular file")
    try:
        with rasterio.open(path) as src:
            names = _band_names(src, default_band_names, path)
            if check_data and src.height > 0:
                try:
                    src.read(window=Window(0, src.height - 1, src.width, 1))
                except RasterioError as exc:
                    raise _err(path, f"pixel data cannot be read (truncated or corrupt file?): {exc}") from exc
            return RasterInfo(
                path=str(path),
                width=src.width,
                height=src.height,
                count=src.count,
                dtypes=tuple(src.dtypes),
                crs=crs_to_string(src.crs),
                transform=transform_to_tuple(src.transform),
                nodata=tuple(src.nodatavals),
                band_names=names,
            )
    except RasterError:
        raise
    except (RasterioError, OSError) as exc:
        raise _open_error(path, exc) from exc


def _resolve_indexes(
    path: Path, names: Sequence[str | None], count: int, bands: Sequence[str | int] | None
) -> list[int]:
    """1-based band indexes for a selection by name or index."""
    if bands is None:
        return list(range(1, count + 1))
    bands = list(bands)
    if not bands:
        raise _err(path, "empty band selection")
    if all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in bands):
        bad = [b for b in bands if not 1 <= int(b) <= count]
        if bad:
            raise _err(path, f"band index(es) {bad} out of range 1..{count} (band indexes are 1-based)")
        return [int(b) for b in bands]
    if not all(isinstance(b, str) for b in bands):
        raise _err(path, f"select bands either all by name or all by 1-based index, got {bands}")
    if all(n is None for n in names):
        raise _err(
            path,
            f"bands {bands} requested by name but the file has no band descriptions; "
            "select by 1-based index or pass default_band_names",
        )
    present = [n for n in names if n is not None]
    missing = [b for b in bands if b not in present]
    if missing:
        raise _err(path, f"band(s) {missing} not found; bands present: {', '.join(present)}")
    return [list(names).index(b) + 1 for b in bands]


# ---------------------------------------------------------------------- reading
@dataclass
class RasterSample:
    """Pixels of a raster read plus their georeferencing.

    Attributes:
        array: ``(C, H, W)`` pixel values (file dtype for plain reads, float32 when resampled).
        valid: ``(H, W)`` bool, False where any band is no-data/NaN/inf or outside the file (boundless reads).
        crs: CRS string or None.
        transform: 6-tuple transform of the returned grid (window and resampling applied).
        band_names: Name per channel (None entries when the file has no names).
        path: Source file (or directory for band-file stacks).
    """

    array: np.ndarray
    valid: np.ndarray
    crs: str | None
    transform: tuple[float, ...]
    band_names: tuple[str | None, ...]
    path: str

    def georef(self) -> dict[str, Any]:
        """``{"crs": str, "transform": 6-tuple}``, ready to put in a sample dict."""
        return {"crs": self.crs, "transform": self.transform}

    def as_dict(self) -> dict[str, Any]:
        """All fields as a dict."""
        return {
            "array": self.array,
            "valid": self.valid,
            "crs": self.crs,
            "transform": self.transform,
            "band_names": self.band_names,
            "path": self.path,
        }


def _invalid_mask(data: np.ndarray, nodata: Sequence[float | None]) -> np.ndarray:
    """``(H, W)`` bool, True where any band equals its nodata value or is NaN/inf."""
    invalid = np.zeros(data.shape[1:], dtype=bool)
    floating = np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating)
    for band, nd in zip(data, nodata):
        if floating:
            invalid |= ~np.isfinite(band)
        if nd is not None and not (isinstance(nd, float) and np.isnan(nd)):
            invalid |= band == nd
    return invalid


def _as_window(window: Window | Sequence[int] | None, height: int, width: int) -> Window:
    if window is None:
        return Window(0, 0, width, height)
    if isinstance(window, Window):
        return window
    if isinstance(window, Tile):
        return window.window
    row_off, col_off, h, w = (int(v) for v in window)
    return Window(col_off, row_off, w, h)


def _resample(
    data: np.ndarray,
    invalid: np.ndarray,
    src_transform: Affine,
    dst_transform: Affine,
    dst_shape: tuple[int, int],
    crs: CRS | None,
    resampling: Resampling,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``data`` (C,H,W) and its invalid mask onto another grid of the same CRS.

    Invalid source pixels are zero-filled before resampling; every output pixel that any invalid or out-of-footprint
    source pixel contributes to is invalid (conservative).
    """
    crs = crs if crs is not None else CRS.from_epsg(3857)  # any CRS: source and destination share it
    src = np.where(invalid[None], 0, data).astype(np.float32)
    out = np.zeros((data.shape[0],) + tuple(dst_shape), dtype=np.float32)
    for i in range(data.shape[0]):
        reproject(
            src[i], out[i], src_transform=src_transform, src_crs=crs, dst_transform=dst_transform, dst_crs=crs,
            resampling=resampling, init_dest_nodata=False,
        )  # fmt: skip
    bad = np.ones(dst_shape, dtype=np.float32)  # 1 = invalid; pixels not reached stay invalid
    mask_method = Resampling.nearest if resampling == Resampling.nearest else Resampling.bilinear
    reproject(
        invalid.astype(np.float32), bad, src_transform=src_transform, src_crs=crs, dst_transform=dst_transform,
        dst_crs=crs, resampling=mask_method, init_dest_nodata=False,
    )  # fmt: skip
    return out, bad <= 0


def read_raster(
    path: str | os.PathLike,
    bands: Sequence[str] | Sequence[int] | None = None,
    window: Window | Sequence[int] | None = None,
    out_shape: tuple[int, int] | None = None,
    resampling: str | Resampling = "bilinear",
    *,
    default_band_names: Sequence[str] | None = None,
    fallback_nodata: float | None = None,
    boundless: bool = False,
) -> RasterSample:
    """Read (a window of) a multi-band raster with its validity mask and georeferencing.

    Args:
        path: Raster file.
        bands: ``None`` for all bands, band names (matched against descriptions / ``default_band_names``, output in
            the requested order), or 1-based band indexes.
        window: ``rasterio.windows.Window``, a :class:`Tile`, or ``(row_off, col_off, height, width)``.
        out_shape: ``(H, W)`` to resample the window to; ``None`` keeps the native grid.
        resampling: Resampling used with ``out_shape``.
        default_band_names: Band names assumed when the file has no descriptions (count must match).
        fallback_nodata: No-data value used for bands whose file declares none (e.g. 0 for Sentinel-2 DN).
        boundless: Allow windows that extend beyond the raster; outside pixels are 0 and invalid.

    Returns:
        :class:`RasterSample`.

    Raises:
        RasterError: Missing/unreadable/truncated file, unknown band name, bad index or window (message names the
            file).
    """
    path = Path(path)
    if not path.is_file():
        raise _err(path, "file does not exist" if not path.exists() else "is not a regular file")
    try:
        src_ctx = rasterio.open(path)
    except (RasterioError, OSError) as exc:
        raise _open_error(path, exc) from exc
    with src_ctx as src:
        names = _band_names(src, default_band_names, path)
        indexes = _resolve_indexes(path, names, src.count, bands)
        win = _as_window(window, src.height, src.width)
        if win.width <= 0 or win.height <= 0:
            raise _err(path, f"empty window {win}")
        full = Window(0, 0, src.width, src.height)
        inside = _intersection(win, full)
        if not boundless and (inside is None or inside != _round_window(win)):
            raise _err(path, f"window {win} extends beyond the raster ({src.height}x{src.width}); use boundless=True")
        win = _round_window(win)
        nodata = [src.nodatavals[i - 1] if src.nodatavals[i - 1] is not None else fallback_nodata for i in indexes]
        data = np.zeros((len(indexes), int(win.height), int(win.width)), dtype=numpy_dtype(src.dtypes[indexes[0] - 1]))
        invalid = np.ones(data.shape[1:], dtype=bool)
        if inside is not None:
            r0, c0 = int(inside.row_off - win.row_off), int(inside.col_off - win.col_off)
            sl = (slice(r0, r0 + int(inside.height)), slice(c0, c0 + int(inside.width)))
            try:
                part = src.read(indexes, window=inside)
                flags = [src.mask_flag_enums[i - 1] for i in indexes]
                if any(MaskFlags.per_dataset in f or MaskFlags.alpha in f for f in flags):
                    part_invalid = src.dataset_mask(window=inside) == 0
                else:
                    part_invalid = np.zeros(part.shape[1:], dtype=bool)
            except RasterioError as exc:
                raise _err(path, f"pixel data cannot be read (truncated or corrupt file?): {exc}") from exc
            data = data.astype(part.dtype, copy=False)
            data[(slice(None),) + sl] = part
            invalid[sl] = part_invalid | _invalid_mask(part, nodata)
        transform = _window_transform(src.transform, win)
        crs = src.crs
    if out_shape is not None and tuple(out_shape) != data.shape[1:]:
        if np.iscomplexobj(data):
            raise _err(path, f"holds complex pixels ({data.dtype}), which are not resampled (to {tuple(out_shape)}); "
                             f"read it on its own grid")
        h, w = (int(v) for v in out_shape)
        dst_transform = _scaled(transform, data.shape[2] / w, data.shape[1] / h)
        data, valid = _resample(data, invalid, transform, dst_transform, (h, w), crs, resampling_method(resampling))
        transform = dst_transform
    else:
        valid = ~invalid
    return RasterSample(
        array=data,
        valid=valid,
        crs=crs_to_string(crs),
        transform=transform_to_tuple(transform),
        band_names=tuple(names[i - 1] for i in indexes),
        path=str(path),
    )


def _window_transform(t: Affine, win: Window) -> Affine:
    """Transform of a window's grid (as ``rasterio.windows.transform``, without its operator deprecation)."""
    col, row = float(win.col_off), float(win.row_off)
    return Affine(t.a, t.b, t.c + t.a * col + t.b * row, t.d, t.e, t.f + t.d * col + t.e * row)


def _scaled(t: Affine, sx: float, sy: float) -> Affine:
    """``t`` followed by a pixel scaling (``t * Affine.scale(sx, sy)``, written out to avoid operator deprecations)."""
    return Affine(t.a * sx, t.b * sy, t.c, t.d * sx, t.e * sy, t.f)


def _round_window(win: Window) -> Window:
    return Window(int(round(win.col_off)), int(round(win.row_off)), int(round(win.width)), int(round(win.height)))


def _intersection(a: Window, b: Window) -> Window | None:
    a = _round_window(a)
    r0, c0 = max(a.row_off, b.row_off), max(a.col_off, b.col_off)
    r1 = min(a.row_off + a.height, b.row_off + b.height)
    c1 = min(a.col_off + a.width, b.col_off + b.width)
    if r1 <= r0 or c1 <= c0:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


# ---------------------------------------------------------------------- one file per band (BigEarthNet)
def find_band_files(directory: str | os.PathLike, bands: Iterable[str]) -> dict[str, Path]:
    """Map band names to files named ``*_<BAND>.tif`` in ``directory`` (BigEarthNet layout).

    Raises:
        RasterError: Directory missing, a band without file, or a band with several files; the message names the
            directory and lists the bands found.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise _err(directory, "band-file directory does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix in GEOTIFF_SUFFIXES and p.is_file())
    found: dict[str, list[Path]] = {}
    pattern = re.compile(r"_([A-Za-z0-9]+)$")
    for p in files:
        m = pattern.search(p.stem)
        if m:
            found.setdefault(m.group(1).upper(), []).append(p)
    out: dict[str, Path] = {}
    missing = []
    for band in bands:
        hits = found.get(band.upper(), [])
        if not hits:
            missing.append(band)
        elif len(hits) > 1:
            raise _err(directory, f"several files for band {band}: {[h.name for h in hits]}")
        else:
            out[band] = hits[0]
    if missing:
        raise _err(
            directory,
            f"no file for band(s) {missing} (expected names ending '_<BAND>.tif'); bands found: "
            f"{', '.join(sorted(found)) or 'none'}",
        )
    return out


def read_band_files(
    source: str | os.PathLike | Mapping[str, str | os.PathLike],
    bands: Sequence[str],
    *,
    resampling: str | Resampling = "bilinear",
    resolution: float | None = None,
    fallback_nodata: float | None = None,
    check_alignment: bool = True,
) -> RasterSample:
    """Stack single-band files of different resolutions onto one grid (BigEarthNet patches).

    Every band is resampled onto the grid of the finest selected band (10 m for Sentinel-2) or onto
    ``resolution``; the returned georeferencing is that grid's.

    Args:
        source: Patch directory (files ``*_<BAND>.tif``) or a mapping band name -> file.
        bands: Band names in output channel order.
        resampling: ``"bilinear"`` (default) or ``"nearest"`` (or any rasterio resampling name) for coarser bands.
        resolution: Target pixel size in CRS units; default: the finest selected band's.
        fallback_nodata: No-data value for files that declare none (e.g. 0 for Sentinel-2 DN).
        check_alignment: Check that all files share the CRS and footprint.

    Returns:
        :class:`RasterSample` with a float32 array ``(len(bands), H, W)`` (complex64/128 when a band file holds
        complex pixels; those are not resampled).

    Raises:
        RasterError: Missing band file, unreadable file, multi-band file, CRS or footprint mismatch.
    """
    bands = list(bands)
    if isinstance(source, Mapping):
        missing = [b for b in bands if b not in source]
        if missing:
            raise _err("band-file mapping", f"no file for band(s) {missing}; bands given: {list(source)}")
        files = {b: Path(source[b]) for b in bands}
        where = str(Path(files[bands[0]]).parent)
    else:
        files = find_band_files(source, bands)
        where = str(source)
    method = resampling_method(resampling)
    infos = {b: raster_info(files[b], check_data=False) for b in bands}
    for b, info in infos.items():
        if info.count != 1:
            raise _err(files[b], f"band file for {b} has {info.count} bands, expected 1")
    ref_band = min(bands, key=lambda b: infos[b].resolution[0])
    ref = infos[ref_band]
    ref_res = ref.resolution[0]
    if check_alignment:
        for b, info in infos.items():
            if info.crs != ref.crs:
                raise _err(files[b], f"CRS {info.crs} differs from {files[ref_band].name} ({ref.crs})")
            tol = GRID_TOLERANCE * ref_res
            if any(abs(x - y) > tol for x, y in zip(info.bounds, ref.bounds)):
                raise _err(
                    files[b], f"footprint {info.bounds} differs from {files[ref_band].name} ({ref.bounds})"
                )
    dst_transform = to_affine(ref.transform)
    dst_shape = ref.shape
    if resolution is not None and not np.isclose(resolution, ref_res):
        left, bottom, right, top = ref.bounds
        dst_shape = (int(round((top - bottom) / resolution)), int(round((right - left) / resolution)))
        dst_transform = Affine(resolution, 0.0, left, 0.0, -resolution, top)
    crs = to_crs(ref.crs)
    complex_bands = [b for b in bands if "complex" in infos[b].dtypes[0]]
    out_dtype = np.complex128 if any("128" in infos[b].dtypes[0] or "int32" in infos[b].dtypes[0]
                                     for b in complex_bands) else np.complex64 if complex_bands else np.float32
    out = np.empty((len(bands),) + tuple(dst_shape), dtype=out_dtype)
    valid = np.ones(dst_shape, dtype=bool)
    for i, b in enumerate(bands):
        s = read_raster(files[b], fallback_nodata=fallback_nodata)
        same_grid = s.array.shape[1:] == tuple(dst_shape) and np.allclose(
            s.transform, tuple(dst_transform)[:6], rtol=TRANSFORM_RTOL, atol=1e-6 * ref_res
        )
        if same_grid:
            out[i] = s.array[0]
            valid &= s.valid
        elif b in complex_bands:
            raise _err(files[b], f"band file for {b} holds complex pixels ({infos[b].dtypes[0]}) on another grid than "
                                 f"{files[ref_band].name}; complex pixels are not resampled")
        else:
            arr, ok = _resample(s.array, ~s.valid, to_affine(s.transform), dst_transform, dst_shape, crs, method)
            out[i] = arr[0]
            valid &= ok
    return RasterSample(
        array=out, valid=valid, crs=ref.crs, transform=transform_to_tuple(dst_transform),
        band_names=tuple(bands), path=where,
    )  # fmt: skip


# ---------------------------------------------------------------------- tiling
class Tile(NamedTuple):
    """A window of a large raster: ``(row_off, col_off, height, width)`` in pixels."""

    row_off: int
    col_off: int
    height: int
    width: int

    @property
    def window(self) -> Window:
        """As a ``rasterio.windows.Window``."""
        return Window(self.col_off, self.row_off, self.width, self.height)

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices into a full ``(H, W)`` array."""
        return (slice(self.row_off, self.row_off + self.height), slice(self.col_off, self.col_off + self.width))


def _offsets(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    offs = list(range(0, size - tile, stride))
    offs.append(size - tile)  # last tile flush with the edge
    return sorted(set(offs))


def tile_windows(
    height: int, width: int, tile: int | tuple[int, int], overlap: int | tuple[int, int] = 0
) -> list[Tile]:
    """Tiles covering a ``height x width`` image, row-major; the last row/column of tiles is flush with the edge.

    Args:
        height: Image rows.
        width: Image columns.
        tile: Tile size (int or ``(h, w)``). Images smaller than a tile give one tile clipped to the image size
            (read it with ``boundless=True`` and the tile size to pad).
        overlap: Pixels shared by neighbouring tiles (int or ``(h, w)``), ``0 <= overlap < tile``. The last tile
            may overlap its neighbour by more, so that it stays inside the image.

    Returns:
        List of :class:`Tile`.
    """
    th, tw = (tile, tile) if isinstance(tile, (int, np.integer)) else tile
    oh, ow = (overlap, overlap) if isinstance(overlap, (int, np.integer)) else overlap
    if height <= 0 or width <= 0:
        raise DataError(f"image size must be positive, got {height}x{width}")
    if th <= 0 or tw <= 0:
        raise DataError(f"tile size must be positive, got {tile}")
    if not (0 <= oh < th and 0 <= ow < tw):
        raise DataError(f"overlap {overlap} must be >= 0 and smaller than the tile {tile}")
    rows = _offsets(height, th, th - oh)
    cols = _offsets(width, tw, tw - ow)
    return [Tile(r, c, min(th, height), min(tw, width)) for r in rows for c in cols]


# ---------------------------------------------------------------------- writing
def write_geotiff(
    path: str | os.PathLike,
    array: np.ndarray,
    crs: CRS | str | int | None,
    transform: Affine | Sequence[float],
    nodata: float | None = None,
    band_names: Sequence[str] | None = None,
    dtype: str | np.dtype | None = None,
    *,
    compress: str | None = DEFAULT_COMPRESSION,
    colormap: Mapping[int, Sequence[int]] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Path:
    """Write a GeoTIFF atomically (temporary file in the same directory, then ``os.replace``).

    Args:
        path: Destination (parent directories are created).
        array: ``(C, H, W)`` or ``(H, W)``.
        crs: CRS (rasterio CRS, ``"EPSG:n"``, WKT, EPSG int) or None.
        transform: Affine or 6-tuple ``(a, b, c, d, e, f)``.
        nodata: No-data value to declare.
        band_names: One name per band, stored as band descriptions.
        dtype: Output dtype; default the array's (bool is written as uint8).
        compress: GDAL compression (``None`` for none).
        colormap: Optional palette ``{value: (r, g, b[, a])}`` for single-band uint8 class maps.
        tags: Optional dataset-level metadata tags.

    Returns:
        The written path.

    Raises:
        RasterError: Bad array shape or band-name count (message names the destination).
    """
    path = Path(path)
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or min(arr.shape) == 0:
        raise _err(path, f"expected array of shape (C, H, W) or (H, W), got {np.shape(array)}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    out_dtype = np.dtype(dtype) if dtype is not None else arr.dtype
    if band_names is not None and len(band_names) != arr.shape[0]:
        raise _err(path, f"{len(band_names)} band names for {arr.shape[0]} bands")
    count, height, width = arr.shape
    profile: dict[str, Any] = {
        "driver": "GTiff", "width": width, "height": height, "count": count, "dtype": out_dtype.name,
        "crs": to_crs(crs), "transform": to_affine(transform), "nodata": nodata,
    }  # fmt: skip
    if compress:
        profile["compress"] = compress
    if height >= TILED_BLOCK and width >= TILED_BLOCK:
        profile.update(tiled=True, blockxsize=TILED_BLOCK, blockysize=TILED_BLOCK)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix or '.tif'}")
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(arr.astype(out_dtype, copy=False))
            if band_names is not None:
                for i, name in enumerate(band_names, start=1):
                    dst.set_band_description(i, str(name))
            if colormap is not None:
                dst.write_colormap(1, {int(k): tuple(int(c) for c in v) for k, v in colormap.items()})
            if tags:
                dst.update_tags(**{str(k): str(v) for k, v in tags.items()})
        os.replace(tmp, path)
    except (RasterioError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise _err(path, f"cannot write GeoTIFF: {exc}") from exc
    return path
