"""Per-band mean/std in model units, streamed over a dataset, written as the stats file configs refer to.

``python -m common.stats --root DIR [--glob '**/*.tif'] [--split FILE] --sensor S2L2A [--bands B02 B03 ...] --out stats.json``
``python -m common.stats --compare SOURCE.json TARGET.json [NORM.json]``: the shift of each band's mean between two
domains, in model units and in units of the std the model normalises with (``NORM``: the run's ``data.stats_file``;
default ``SOURCE``). That is the scale of ``augment.brightness`` (per-band additive jitter of the normalised tiles):
a jitter about as wide as the shift makes the source model see the target's band levels, with no target label
involved.

``--sensor`` also takes a YAML file: a config whose ``data.sensor`` (with ``data.input_units``) is used, e.g. a
sensor defined as a mapping (HLS, Landsat, ...) that has no statistics yet, or a file holding such a mapping alone.
``--input-units`` declares what the files hold (``data.input_units``).

Pixels are converted to model units exactly as the datasets do (S2 reflectance, SAR dB, derived bands computed),
invalid pixels (no-data, NaN, inf) are skipped, and every sample's per-band count/mean/sum of squared deviations are
merged with Chan et al.'s parallel update in float64, so memory stays constant and the result does not suffer from
the cancellation of naive ``sum(x^2) - n*mean^2``. The standard deviation is the population one (ddof=0).

The output (see :class:`common.bands.BandStats`) is what ``data.stats_file`` in configs points to.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.bands import INPUT_UNITS, BandStats, SensorDef, SensorSpec, get_sensor
from common.errors import DataError
from common.raster import RasterError

__all__ = ["RunningBandStats", "compute_band_stats", "sensor_from_argument", "mean_shift", "main"]


class RunningBandStats:
    """Streaming per-band count, mean, M2 (sum of squared deviations), min and max (Chan et al. merge).

    Args:
        bands: Band names, in channel order of the arrays passed to :meth:`update`.
    """

    def __init__(self, bands: Sequence[str]) -> None:
        self.bands = tuple(bands)
        c = len(self.bands)
        self.count = np.zeros(c, dtype=np.int64)
        self.mean = np.zeros(c, dtype=np.float64)
        self.m2 = np.zeros(c, dtype=np.float64)
        self.minimum = np.full(c, np.inf)
        self.maximum = np.full(c, -np.inf)

    def update(self, image: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add one ``(C, H, W)`` image; pixels where ``valid`` is False or a band is non-finite are skipped."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[0] != len(self.bands):
            raise ValueError(f"expected image (C={len(self.bands)}, H, W), got {image.shape}")
        valid = np.ones(image.shape[1:], dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        for c in range(image.shape[0]):
            x = image[c][valid].astype(np.float64)
            x = x[np.isfinite(x)]
            if x.size == 0:
                continue
            self._merge(c, x.size, float(x.mean()), float(((x - x.mean()) ** 2).sum()))
            self.minimum[c] = min(self.minimum[c], float(x.min()))
            self.maximum[c] = max(self.maximum[c], float(x.max()))

    def _merge(self, c: int, n_b: int, mean_b: float, m2_b: float) -> None:
        n_a = int(self.count[c])
        n = n_a + n_b
        delta = mean_b - self.mean[c]
        self.mean[c] += delta * n_b / n
        self.m2[c] += m2_b + delta * delta * n_a * n_b / n
        self.count[c] = n

    def result(self, sensor: str | None = None, source: dict[str, Any] | None = None) -> BandStats:
        """The statistics as :class:`~common.bands.BandStats`.

        Raises:
            ValueError: A band saw no valid pixel.
        """
        empty = [b for b, n in zip(self.bands, self.count) if n == 0]
        if empty:
            raise DataError(f"no valid pixels for band(s) {empty}")
        std = np.sqrt(self.m2 / self.count)
        return BandStats(
            mean=dict(zip(self.bands, map(float, self.mean))),
            std=dict(zip(self.bands, map(float, std))),
            sensor=sensor,
            count=dict(zip(self.bands, map(int, self.count))),
            minimum=dict(zip(self.bands, map(float, self.minimum))),
            maximum=dict(zip(self.bands, map(float, self.maximum))),
            source=source or {},
        )


def _numpy(x: Any) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def compute_band_stats(
    source: Any,
    sensor: str | SensorSpec = "S2L2A",
    bands: Sequence[str] | None = None,
    *,
    glob: str = "**/*.tif",
    layout: str = "auto",
    max_samples: int | None = None,
    offset: float = 0,
    input_units: str | None = None,
) -> BandStats:
    """Per-band statistics in model units over a dataset, a directory or a list of files.

    Args:
        source: A dataset whose samples are dicts with ``image`` ``(C,H,W)`` in model units and ``valid``
            (e.g. any dataset of :mod:`common.datasets`, without a normalising transform), a directory (searched
            with ``glob``) or a list of GeoTIFFs / BigEarthNet patch folders.
        sensor: Sensor name or spec (files / directory sources; also names the result).
        bands: Band names (default: the sensor's bands, or the dataset's ``bands`` attribute).
        glob: File pattern for directory sources.
        layout: ``"auto"``, ``"multiband"`` or ``"band_files"`` (see :class:`common.datasets.UnlabelledTiles`).
        max_samples: Use only the first ``max_samples`` samples (evenly spaced subsample when smaller than the
            dataset).
        offset: Sentinel-2 radiometric offset in DN (file sources).
        input_units: What the files hold (:data:`common.bands.INPUT_UNITS`; file sources; default: the sensor's).

    Returns:
        :class:`~common.bands.BandStats`.
    """
    from common.datasets import UnlabelledTiles

    info: dict[str, Any] = {}
    if hasattr(source, "__getitem__") and hasattr(source, "__len__") and not isinstance(source, (str, list, tuple)):
        dataset = source
        names = tuple(bands) if bands is not None else tuple(getattr(dataset, "bands", ()))
        if not names:
            raise ValueError("pass bands=... for a dataset without a 'bands' attribute")
        spec_name = getattr(getattr(dataset, "spec", None), "name", None) or get_sensor(sensor).name
        info["dataset"] = type(dataset).__name__
    else:
        dataset = UnlabelledTiles(
            source, sensor, bands, glob=glob, layout=layout, validate="header", fill_value=None, offset=offset,
            input_units=input_units,
        )
        names = dataset.bands
        spec_name = dataset.spec.name
        root = str(source) if isinstance(source, (str, Path)) else "file list"
        info.update(root=root, glob=glob, layout=dataset.layout)
    n = len(dataset)
    if n == 0:
        raise DataError("no samples to compute statistics on")
    if max_samples is None or max_samples >= n:
        indices = np.arange(n)
    else:
        indices = np.linspace(0, n - 1, max_samples).round().astype(int)
    running = RunningBandStats(names)
    for i in indices:
        s = dataset[int(i)]
        running.update(_numpy(s["image"]), _numpy(s["valid"]) if "valid" in s else None)
    info["samples"] = int(len(indices))
    return running.result(sensor=spec_name, source=info)


def sensor_from_argument(value: str, input_units: str | None = None) -> tuple[str | SensorSpec, str | None]:
    """``--sensor``: a registry name, or a YAML file holding a config (its ``data.sensor`` and ``data.input_units``)
    or a sensor mapping alone. A mapping becomes its spec without requiring statistics (they are computed here).

    Returns:
        ``(sensor, input_units)``.

    Raises:
        DataError / ConfigError: unreadable file, no sensor in it, or an invalid sensor mapping.
    """
    path = Path(value)
    if not (path.suffix.lower() in (".yaml", ".yml", ".json") and path.is_file()):
        return value, input_units
    import yaml

    from common.config import build_config

    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({exc})") from None
    data = doc.get("data", doc) if isinstance(doc, dict) else None
    sensor = data.get("sensor", data if "bands" in data else None) if isinstance(data, dict) else None
    if sensor is None:
        raise DataError(f"{path}: holds neither data.sensor nor a sensor mapping (name, bands, input_units, ...)")
    if isinstance(data, dict) and input_units is None and data is not sensor:
        input_units = data.get("input_units")
    if isinstance(sensor, str):
        return sensor, input_units
    sdef = build_config(SensorDef, sensor, source=f"{path} (data.sensor)")
    spec = sdef.to_spec(require_stats=False)
    return spec.with_input_units(input_units) if sdef.input_units is None else spec, None


def split_files(root: str | Path, glob: str, split: str | Path) -> list[Path]:
    """The GeoTIFFs under ``root`` (matching ``glob``) whose stems a split file lists, in the file's order.

    Raises:
        DataError: the split file is missing or empty, or lists an id without a file (the message names both).
    """
    split = Path(split)
    if not split.is_file():
        raise DataError(f"--split: {split} does not exist; give a split file of ids, one per line")
    ids = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"--split: {split} lists no ids")
    by_stem = {p.stem: p for p in sorted(Path(root).glob(glob)) if p.is_file()}
    missing = [i for i in ids if i not in by_stem]
    if missing:
        raise DataError(f"--split: {len(missing)} id(s) of {split} have no file matching {glob!r} under {root} "
                        f"(first: {missing[0]}); check --root / --glob")
    return [by_stem[i] for i in ids]


def mean_shift(source: BandStats, target: BandStats,
               norm: BandStats | None = None) -> dict[str, tuple[float, float]]:
    """Per band of ``source``: ``(target mean - source mean, that difference / std)``, the std of ``norm`` (the
    statistics the model normalises with; default ``source``).

    Raises:
        DataError: the files are of other sensors, or one lacks a band of ``source``.
    """
    norm = source if norm is None else norm
    for other in (target, norm):
        if source.sensor and other.sensor and source.sensor != other.sensor:
            raise DataError(f"the statistics files are of other sensors ({source.sensor} vs {other.sensor}): compare "
                            f"files of one sensor")
        missing = [b for b in source.bands if b not in other.mean]
        if missing:
            raise DataError(f"{other.path or 'a statistics file'} lacks band(s) {missing} of the source statistics")
    flat = [b for b in source.bands if not norm.std[b] > 0]
    if flat:
        raise DataError(f"{norm.path or 'the normalisation statistics'}: band(s) {flat} have std 0; a shift cannot be "
                        f"expressed in their std (recompute the statistics over more tiles)")
    return {b: (target.mean[b] - source.mean[b], (target.mean[b] - source.mean[b]) / norm.std[b])
            for b in source.bands}


def _compare(paths: Sequence[str]) -> int:
    try:
        stats = [BandStats.from_json(p) for p in paths]
        shift = mean_shift(*stats)
    except (ValueError, KeyError) as exc:
        print(f"error: --compare: {exc}", file=sys.stderr)
        return 2
    source, target = stats[0], stats[1]
    print(f"mean shift from {paths[0]} to {paths[1]} (model units, and in units of the std of {paths[-1]}):")
    for b, (delta, in_std) in shift.items():
        print(f"  {b:<7} {source.mean[b]:.6g} -> {target.mean[b]:.6g}: {delta:+.4g} = {in_std:+.3f} std")
    widest = max(abs(v) for _, v in shift.values())
    print(f"largest shift {widest:.3f} std: the scale of augment.brightness (per-band jitter, +-{widest:.2f} spans it)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--compare"]:
        if len(argv) not in (3, 4):
            print("usage: python -m common.stats --compare SOURCE.json TARGET.json [NORM.json]", file=sys.stderr)
            return 2
        return _compare(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m common.stats", description=__doc__.split("\n\n")[0],
                                 epilog="python -m common.stats --compare SOURCE.json TARGET.json [NORM.json]: each "
                                        "band's mean shift between two domains, in the std of NORM (default SOURCE)")
    ap.add_argument("--root", required=True, help="directory with GeoTIFFs or BigEarthNet patch folders")
    ap.add_argument("--glob", default="**/*.tif", help="file pattern inside --root (default: **/*.tif)")
    ap.add_argument("--sensor", default="S2L2A",
                    help="registry name (S2L2A, S1, SAR4, ...) or a YAML config whose data.sensor (e.g. a sensor "
                         "mapping) is used")
    ap.add_argument("--input-units", default=None, choices=INPUT_UNITS,
                    help="what the files hold (data.input_units; default: the sensor's)")
    ap.add_argument("--bands", nargs="+", default=None, help="band names (default: all bands of the sensor)")
    ap.add_argument("--out", required=True, help="output JSON (the data.stats_file of configs)")
    ap.add_argument("--layout", default="auto", choices=("auto", "multiband", "band_files"))
    ap.add_argument("--split", default=None, metavar="FILE",
                    help="only the tiles whose ids (file stems) a split file lists, one per line (e.g. a target "
                         "domain's training split for data.target.stats_file: its validation tiles left out)")
    ap.add_argument("--max-files", type=int, default=None, help="subsample this many files/patches")
    ap.add_argument("--offset", type=float, default=0, help="Sentinel-2 DN offset (-1000 for baseline >= 04.00)")
    args = ap.parse_args(argv)
    try:
        sensor, units = sensor_from_argument(args.sensor, args.input_units)
        source: Any = args.root if args.split is None else split_files(args.root, args.glob, args.split)
        stats = compute_band_stats(
            source, sensor, args.bands, glob=args.glob, layout=args.layout, max_samples=args.max_files,
            offset=args.offset, input_units=units,
        )  # fmt: skip
        stats.to_json(args.out)
    except (ValueError, KeyError, RasterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({stats.source.get('samples')} samples, sensor {stats.sensor})")
    for b in stats.bands:
        print(f"  {b:<7} mean={stats.mean[b]:.6g} std={stats.std[b]:.6g} n={stats.count[b]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
