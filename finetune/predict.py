"""Predict class maps for GeoTIFF scenes with a fine-tuned run.

    python finetune/predict.py --run runs/finetune --input 'scenes/*.tif' --output preds/ \
        [--checkpoint best|last] [--probabilities] [--window 512] [--overlap 0.5] [--batch-size 4] [--cpu]
        [--read-ahead N] [--io-threads N]

A run directory of ``finetune/semisup.py`` holds ``model.json`` (:func:`finetune.model_card.write_model_card`:
architecture, classes, sensor, bands in model order, normalisation, the ``state_dict`` prefix of the evaluated
network) and ``checkpoints/{best,last}.safetensors`` (the whole training method's ``state_dict``). The network is
rebuilt from ``model.json`` and loaded strictly from the prefixed weights (safetensors only, never a pickle).

Inputs take every layout training reads (:class:`common.datasets.UnlabelledTiles`): multi-band GeoTIFFs, and
BigEarthNet-style band folders ``<patch>/<patch>_B02.tif`` (one GeoTIFF per band, named ``*_<BAND>.tif``) whose
20 m / 60 m bands are resampled (bilinear, :func:`common.raster.read_band_files`) onto the grid of the finest band,
the 10 m grid, exactly as training reads them; a stacked model's other sensors come from files or band folders
(``--stack-input``). ``--input`` names a file, a band folder, a directory (its GeoTIFFs and the band folders in it)
or a glob (band files it matches stand for their folder).

Per input:
    1. check its bands up front (:class:`common.datasets.UnlabelledTiles`, header only): bands are found by band
       description; files without descriptions are taken to hold the sensor's bands in registry order and must
       have that many bands; a band folder needs a file per band. Every input is checked before the first is
       predicted.
    2. read one row of windows at a time (:func:`common.raster.read_raster`; a band folder is read whole, once, with
       :func:`common.raster.read_band_files`, and its rows taken from memory): on a background thread, up to
       ``--read-ahead`` (2 on a GPU, 0 on the CPU) window rows ahead of the one being predicted, GDAL decoding with
       ``--io-threads`` threads; the raw values (file dtype: uint16 DN are half the bytes of float32) are pinned and copied to the
       device, where they are converted to model units (the sensor's conversion and the S2 DN offset) and
       normalised with the run's mean/std (``--domain target``: the target domain's of an adaptation run trained
       with ``data.target.stats_file``) (:func:`finetune.model_input.model_input`, the torch twin of
       :func:`common.bands.to_model_units` and :func:`finetune.transforms.normalise`: bit-identical to them except
       the dB conversions, equal to float rounding); nodata / NaN / inf pixels are invalid and 0 after
       normalisation, as in training.
    3. logits: a scene no larger than the window is one forward pass. A larger one is covered by the window grid
       of :func:`finetune.inference.sliding_window_inference` (windows clamped to the scene size, stride
       ``floor(window * (1 - overlap))``, last window flush with the edge) and the overlaps blended with its
       Gaussian weights, ``sum_i w_i * y_i / sum_i w_i``. The scene is streamed: one row of windows is read and
       predicted at a time, and a row of pixels is finished (and its logits dropped) as soon as no later window
       covers it. Scenes wider than ``block_width`` are cut into column blocks, each extended to the windows that
       touch it; windows on a block border are computed twice. The result equals whole-scene sliding-window
       inference (the same windows, weights and summation order), with memory bounded by
       ``(C + K) * (window + stride) * min(width, block_width + window)`` floats instead of ``(C + K) * H * W``.
    4. class map = argmax of the blended logits, :data:`~common.bands.IGNORE_INDEX` (255, the declared nodata)
       where the input is invalid; probabilities (``--probabilities``) = softmax of the blended logits (so the
       class map is their argmax), NaN (declared nodata) where the input is invalid.
    5. write the outputs atomically (:func:`common.raster.write_geotiff`) on the input's grid (its CRS object as
       read by rasterio, transform, width and height; a band folder's: its finest band's): class map uint8, band
       description ``class``, class names as tags (``class_names`` JSON list and ``class_<i>``), a colour table from
       :data:`finetune.evaluation.PALETTE` (cycled for more classes; 255 transparent); probabilities float32,
       one band per class named after it.

Outputs: one input and an ``--output`` ending in ``.tif`` writes that file (probabilities next to it as
``<stem>_prob.tif``, ``_pred`` in the stem replaced); otherwise ``--output`` is a directory receiving
``<input stem>_pred.tif`` (and ``<input stem>_prob.tif``); a band folder's stem is its name.

Memory: the class map (1 byte per pixel) and the validity mask (1 byte per pixel) of the whole scene are held,
and with ``--probabilities`` the probability map (``4 K`` bytes per pixel): :func:`common.raster.write_geotiff`
writes whole arrays. A band folder is held whole in model units (``4 C`` bytes per pixel), as training holds a
sample. Read-ahead holds up to ``read_ahead + 1`` window rows of raw values besides the one being predicted.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import math
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from torch import nn

from common.bands import IGNORE_INDEX, SENSORS, SensorSpec, check_dtypes, file_band_names
from common.checkpoint import CHECKPOINT_DIR, load_safetensors
from common.datasets import UnlabelledTiles
from common.raster import (
    GEOTIFF_SUFFIXES,
    RasterError,
    find_band_files,
    raster_info,
    read_band_files,
    read_raster,
    transform_to_tuple,
    write_geotiff,
)
from finetune.config import SegModelConfig
from finetune.evaluation import PALETTE
from finetune.inference import blend_weights, window_starts
from finetune.inputs import build_model
from finetune.model_card import MODEL_CARD, ModelCard
from finetune.model_input import model_input

__all__ = [
    "MODEL_CARD",
    "CHECKPOINTS",
    "DEFAULT_WINDOW",
    "DEFAULT_OVERLAP",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BLOCK_WIDTH",
    "DEFAULT_READ_AHEAD",
    "resolve_read_ahead",
    "ModelCard",
    "RunModel",
    "Prediction",
    "load_run_model",
    "find_inputs",
    "output_paths",
    "probabilities_path",
    "predict_raster",
    "resolve_io_threads",
    "predict_file",
    "main",
]

CHECKPOINTS = ("best", "last")
"""Checkpoint names of a run (``checkpoints/<name>.safetensors``)."""
DOMAINS = ("source", "target")
"""Whose statistics normalise the inputs: the run's training tiles, or an adaptation run's target domain."""

DEFAULT_WINDOW = 512
"""Window side (px) for scenes larger than one window."""

DEFAULT_OVERLAP = 0.5
"""Fraction of the window shared by neighbouring windows."""

DEFAULT_BATCH_SIZE = 4
"""Windows per forward pass."""

DEFAULT_BLOCK_WIDTH = 8192
"""Widest column block (px) streamed at once; wider scenes are cut into blocks (border windows run twice)."""

DEFAULT_READ_AHEAD = 2
"""Window rows read and decoded ahead on a GPU, on a background thread, while the current one is predicted. On the
CPU the default is 0 (read, then predict): the network takes the cores there and read-ahead measured 1-2.5 % more CPU
time (``bench/results/bench_predict_cpu.json``)."""

MAX_IO_THREADS = 8
"""Most GDAL threads (de)compressing GeoTIFF blocks by default on a GPU (``--io-threads``)."""

_POLL_S = 0.05
"""How often a waiting reader or consumer looks whether the other side stopped."""

_JOIN_S = 10.0
"""How long closing waits for the read-ahead thread to finish the read in progress (it is a daemon thread)."""

MIN_WINDOW = 8
"""Smallest accepted window (as ``eval.window``)."""

PRED_SUFFIX = "_pred"
PROB_SUFFIX = "_prob"
CLASS_BAND = "class"
"""Band description of the class map."""

TRANSPARENT = (0, 0, 0, 0)
"""Colour-table entry of :data:`~common.bands.IGNORE_INDEX` (nodata)."""

@dataclass
class RunModel:
    """A run's network ready for prediction.

    Attributes:
        net: the segmenter in eval mode (CPU until moved).
        card: the model card.
        spec: the sensor restricted to the model's bands (conversion, nodata, raw bands to read).
        checkpoint: the weights file loaded.
        run_dir: the run directory.
        domain: ``"source"`` (the card's ``normalisation``) or ``"target"`` (its ``target_normalisation``: the
            target domain's statistics of an adaptation run with ``data.target.stats_file``).
    """

    net: nn.Module
    card: ModelCard
    spec: SensorSpec
    checkpoint: Path
    run_dir: Path
    domain: str = "source"

    @property
    def num_classes(self) -> int:
        return self.card.num_classes

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` float32 ``(C,)`` in model channel order, of :attr:`domain`."""
        if self.domain == "target":
            mean, std = self.card.target_mean, self.card.target_std
        else:
            mean, std = self.card.mean, self.card.std
        return np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)


def _checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
    path = run_dir / CHECKPOINT_DIR / f"{checkpoint}.safetensors"
    if path.is_file():
        return path
    if checkpoint == "best":
        last = run_dir / CHECKPOINT_DIR / "last.safetensors"
        if last.is_file():
            print(f"predict: {path} does not exist (no evaluation picked a best step); using {last}",
                  file=sys.stderr)
            return last
        raise FileNotFoundError(f"{path}: checkpoint not found, nor {last}")
    raise FileNotFoundError(f"{path}: checkpoint not found")


def load_run_model(run_dir: str | Path, checkpoint: str = "best", domain: str = "source") -> RunModel:
    """Rebuild a run's network from ``model.json`` and load its weights strictly.

    Args:
        run_dir: run directory (holds ``model.json`` and ``checkpoints/``).
        checkpoint: ``"best"`` (falls back to ``"last"``, with a message on stderr, when the run has no best) or
            ``"last"``.
        domain: ``"source"`` normalises inputs as the run's training tiles; ``"target"`` with the target domain's
            statistics of an adaptation run trained with ``data.target.stats_file`` (imagery of that domain).

    Returns:
        :class:`RunModel` with the network in eval mode on the CPU.

    Raises:
        FileNotFoundError: ``model.json`` or the checkpoint is missing (the message names the path).
        ValueError: the card is invalid, the weights do not fit the network it describes, or ``domain="target"``
            for a run without target statistics.
    """
    run_dir = Path(run_dir)
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    card = ModelCard.from_json(run_dir / MODEL_CARD)
    if domain == "target" and card.target_mean is None:
        raise ValueError(f"{card.path}: --domain target needs a run adapted with data.target.stats_file (its model "
                         f"card then holds target_normalisation); this run normalises every input with its training "
                         f"statistics: leave out --domain target")
    spec = card.sensor_spec()
    ckpt = _checkpoint_path(run_dir, checkpoint)
    model_cfg = SegModelConfig(arch=card.arch, version=card.version,  # type: ignore[arg-type]
                               output_stride=card.output_stride, aux=card.aux,
                               aspp_channels=card.aspp_channels, decoder_channels=card.decoder_channels,
                               stem_pool=card.stem_pool)
    net = build_model(model_cfg, card.num_classes, None, len(card.bands), load_weights=False)
    state = load_safetensors(ckpt)
    prefix = card.state_dict_prefix
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        heads = sorted({k.split(".")[0] + "." for k in state})
        raise ValueError(f"{ckpt}: no tensor starts with the prefix {prefix!r} of {card.path} "
                         f"(state_dict_prefix); prefixes present: {heads}")
    try:
        net.load_state_dict(own, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{ckpt}: the weights under {prefix!r} do not fit DeepLab {card.version} on {card.arch} "
                         f"({len(card.bands)} bands, {card.num_classes} classes) described by {card.path}: "
                         f"{exc}") from None
    return RunModel(net=net.eval(), card=card, spec=spec, checkpoint=ckpt, run_dir=run_dir, domain=domain)


# ------------------------------------------------------------------------------------------------------------
# inputs and outputs
# ------------------------------------------------------------------------------------------------------------


_BAND_SUFFIX = re.compile(r"_([A-Za-z0-9]+)$")


def _known_band_names() -> set[str]:
    return {b.upper() for spec in SENSORS.values() for b in spec.bands}


def _band_folder(directory: Path, bands: Sequence[str] | None) -> bool:
    """Whether ``directory`` is a band folder (one GeoTIFF per band, ``*_<BAND>.tif``): with ``bands``, it holds a
    file for each of them; without, each of its GeoTIFFs is named after a band of the registry.

    Raises:
        RasterError: the folder is named like a band folder but lacks some of ``bands`` (the message names them).
    """
    tifs = [p for p in directory.iterdir() if p.is_file() and p.suffix in GEOTIFF_SUFFIXES]
    if not tifs:
        return False
    known = _known_band_names() | {b.upper() for b in bands or ()}
    suffixes = [m.group(1).upper() if (m := _BAND_SUFFIX.search(p.stem)) else None for p in tifs]
    looks_like = all(x in known for x in suffixes)
    if bands is None:
        return looks_like
    have = set(suffixes)
    if all(b.upper() in have for b in bands):
        return True
    if looks_like:
        find_band_files(directory, bands)  # raises, naming the missing bands and those found
    return False


def _input_stem(path: Path) -> str:
    """A file's stem, a band folder's name."""
    return path.name if path.is_dir() else path.stem


def find_inputs(pattern: str | Path, bands: Sequence[str] | None = None) -> list[Path]:
    """Inputs: GeoTIFFs and band folders. ``pattern`` is one file, one band folder, a directory (every GeoTIFF and
    every band folder directly in it) or a glob (the files and band folders it matches, a band file standing for its
    folder); sorted, without duplicates.

    Args:
        pattern: the ``--input`` argument.
        bands: the raw bands an input must provide (default: a band folder is recognised by band names of the
            registry).

    Raises:
        FileNotFoundError: nothing matches (the message names the pattern). RasterError: a band folder lacks a band.
    """
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        if _band_folder(path, bands):
            return [path]
        files = sorted(p for p in path.iterdir() if (p.is_file() and p.suffix in GEOTIFF_SUFFIXES)
                       or (p.is_dir() and _band_folder(p, bands)))
        if not files:
            raise FileNotFoundError(f"{path}: no GeoTIFF ({', '.join(GEOTIFF_SUFFIXES)}) or band folder "
                                    f"(<patch>/<patch>_<BAND>.tif) in this directory")
        return files
    found: set[Path] = set()
    folder: dict[Path, bool] = {}  # each directory listed once
    for p in map(Path, glob.glob(str(pattern), recursive=True)):
        if p.is_dir():
            if folder.setdefault(p, _band_folder(p, bands)):
                found.add(p)
        elif p.is_file():
            if p.parent not in folder:
                folder[p.parent] = _band_folder(p.parent, bands)
            found.add(p.parent if folder[p.parent] else p)
    if not found:
        raise FileNotFoundError(f"no input file matches {str(pattern)!r} (GeoTIFFs, or band folders "
                                f"<patch>/<patch>_<BAND>.tif)")
    return sorted(found)


def probabilities_path(mask_path: str | Path) -> Path:
    """Where the probabilities of a class map go: ``<stem>_prob.tif`` (a ``_pred`` ending replaced)."""
    mask_path = Path(mask_path)
    stem = mask_path.stem
    stem = stem[: -len(PRED_SUFFIX)] if stem.endswith(PRED_SUFFIX) else stem
    return mask_path.with_name(f"{stem}{PROB_SUFFIX}{mask_path.suffix or '.tif'}")


def output_paths(inputs: Sequence[Path], output: str | Path) -> list[Path]:
    """Class-map path per input: ``output`` itself for one input and a ``.tif`` output, else
    ``output/<stem>_pred.tif``.

    Raises:
        ValueError: a ``.tif`` output for several inputs, two inputs with the same stem, or an output that would
            overwrite an input.
    """
    output = Path(output)
    if output.suffix in GEOTIFF_SUFFIXES and not output.is_dir():
        if len(inputs) != 1:
            raise ValueError(f"--output {output} names one file but {len(inputs)} inputs match; give a directory")
        outs = [output]
    else:
        outs = [output / f"{_input_stem(p)}{PRED_SUFFIX}.tif" for p in inputs]
        seen: dict[Path, Path] = {}
        for p, o in zip(inputs, outs):
            if o in seen:
                raise ValueError(f"{seen[o]} and {p} would both be written to {o}; predict them into different "
                                 f"directories")
            seen[o] = p
    sources = {p.resolve() for p in inputs}
    for o in outs:
        if o.resolve() in sources or probabilities_path(o).resolve() in sources:
            raise ValueError(f"{o}: an output would overwrite an input")
    return outs


def stack_paths(input_path: str | Path, templates: Sequence[str]) -> list[Path]:
    """The co-registered files (or band folders) of the other sensors of a stack for one input: each template
    formatted with the input's ``{stem}`` (a band folder's name), ``{name}`` and ``{dir}`` (e.g.
    ``"s1/images/{stem}.tif"``)."""
    p = Path(input_path)
    try:
        return [Path(t.format(stem=_input_stem(p), name=p.name, dir=str(p.parent))) for t in templates]
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"--stack-input templates {list(templates)} may only use {{stem}}, {{name}} and {{dir}} "
                         f"({exc!r})") from None


def _source_specs(run: RunModel, stack_inputs: Sequence[str]) -> list[SensorSpec]:
    """The sensor read from each file of an input: the model's (one file holding every band), or for a stack with
    ``stack_inputs`` one sensor per file."""
    spec = run.spec
    if not stack_inputs:
        return [spec]
    if not spec.parts:
        raise ValueError(f"--stack-input given, but the model of {run.card.path} takes one sensor ({spec.name})")
    if len(stack_inputs) != len(spec.parts) - 1:
        raise ValueError(f"the model takes the {spec.name} stack: give one --stack-input per sensor after "
                         f"{spec.parts[0].name} ({', '.join(p.name for p in spec.parts[1:])}), or none for inputs "
                         f"that hold all {len(spec.bands)} bands; got {len(stack_inputs)}")
    return list(spec.parts)


def _checked_grids(paths: Sequence[Path], spec: SensorSpec, offset: float) -> tuple[list, tuple[str, ...]]:
    """Check the bands of each input (files: multi-band layout; directories: band folders), header only, and return
    each input's pixel grid (a band folder's: its finest band's, the grid it is resampled onto) and the band names
    assumed for files without band descriptions."""
    grids: list = [None] * len(paths)
    file_bands = file_band_names(spec)
    for layout, keep in (("multiband", lambda q: not q.is_dir()), ("band_files", lambda q: q.is_dir())):
        idx = [i for i, q in enumerate(paths) if keep(q)]
        if idx:
            tiles = UnlabelledTiles([str(paths[i]) for i in idx], sensor=spec, layout=layout, validate="header",
                                    offset=offset)
            for j, i in enumerate(idx):
                grids[i] = tiles.sample_grid(j)
            if layout == "multiband":
                file_bands = tiles.file_bands
    return grids, file_bands


def check_inputs(run: RunModel, inputs: Sequence[Path], stack_inputs: Sequence[str] = ()) -> tuple[str, ...]:
    """Check every input's bands against the model (header only) and return the band names assumed for files
    without band descriptions.

    An input is a multi-band file or a band folder (a directory, one GeoTIFF per band). For a model of a sensor stack
    (e.g. ``S2L2A+S1``) an input either holds every band of the stack, or (with ``stack_inputs``, see
    :func:`stack_paths`) the first sensor's bands, the other sensors' bands coming from co-registered files or band
    folders that must lie on the input's pixel grid.

    Raises:
        FileNotFoundError: a stacked sensor's file is missing (the message names it and the input).
        RasterError: unreadable file, band count that does not fit a file without descriptions, a missing band (file
            or band folder), or a stacked file on another grid (the message names the file).
    """
    specs = _source_specs(run, stack_inputs)
    try:
        grids, file_bands = _checked_grids(inputs, specs[0], run.card.offset)
    except RasterError as exc:
        if run.spec.parts and not stack_inputs:
            raise RasterError(f"{exc} (the model takes the {run.spec.name} stack: inputs that hold only the "
                              f"{run.spec.parts[0].name} bands need --stack-input for "
                              f"{', '.join(p.name for p in run.spec.parts[1:])})") from None
        raise
    for k, spec in enumerate(specs[1:]):
        partners = [stack_paths(p, stack_inputs)[k] for p in inputs]
        for p, f in zip(inputs, partners):
            if not f.exists():
                raise FileNotFoundError(f"{f}: the {spec.name} file of {p} (--stack-input {stack_inputs[k]!r}) "
                                        f"does not exist")
        for ref, other in zip(grids, _checked_grids(partners, spec, 0.0)[0]):
            if not ref.same_as(other):
                raise RasterError(f"{other.describe()} is not on the pixel grid of {ref.describe()}: stacked sensors "
                                  f"must be co-registered")
    return file_bands


def _colormap(num_classes: int) -> dict[int, tuple[int, ...]]:
    cmap = {k: tuple(int(c) for c in PALETTE[k % len(PALETTE)]) + (255,) for k in range(num_classes)}
    cmap[IGNORE_INDEX] = TRANSPARENT
    return cmap


def _tags(run: RunModel) -> dict[str, str]:
    names = run.card.class_names
    tags = {"class_names": json.dumps(list(names)), "run": str(run.run_dir), "checkpoint": run.checkpoint.name,
            "model": f"DeepLab {run.card.version} {run.card.arch}"}
    tags.update({f"class_{k}": n for k, n in enumerate(names)})
    return tags


def _source_crs(path: Path) -> CRS | None:
    """The input's CRS object as rasterio reads it (a string round trip could reduce it to a near EPSG code)."""
    try:
        with rasterio.open(path) as src:
            return src.crs
    except (RasterioError, OSError) as exc:
        raise RasterError(f"{path}: cannot be opened as a raster ({exc})") from exc


# ------------------------------------------------------------------------------------------------------------
# prediction
# ------------------------------------------------------------------------------------------------------------


class Prediction(NamedTuple):
    """What :func:`predict_raster` wrote.

    Attributes:
        input: the input file. mask: the class map. probabilities: the probability map, or None.
        shape: ``(H, W)``. valid_fraction: share of valid input pixels. windows: forward passes of one window
        (block-border windows counted twice). seconds: wall time.
    """

    input: Path
    mask: Path
    probabilities: Path | None
    shape: tuple[int, int]
    valid_fraction: float
    windows: int
    seconds: float


class _InputReader:
    """Rows of one input as raw values and validity: a multi-band file is read window by window; a band folder is
    read whole once (:func:`common.raster.read_band_files`: every band resampled onto its finest band's grid, as
    training reads it) and its rows taken from memory."""

    def __init__(self, path: Path, part: SensorSpec, file_bands: Sequence[str]) -> None:
        self.path, self.part, self.file_bands = Path(path), part, tuple(file_bands)
        self.raw = list(part.raw_bands)
        self.whole = None
        if self.path.is_dir():
            files = find_band_files(self.path, self.raw)
            res = {b: raster_info(files[b], check_data=False).resolution[0] for b in self.raw}
            self.grid_file = files[min(self.raw, key=res.__getitem__)]  # the grid read_band_files resamples onto
            self.whole = read_band_files(self.path, self.raw, fallback_nodata=part.nodata)
            self.shape: tuple[int, int] = tuple(self.whole.array.shape[1:])  # type: ignore[assignment]
            self.transform = self.whole.transform
        else:
            info = raster_info(self.path, default_band_names=self.file_bands, check_data=False)
            self.grid_file, self.shape, self.transform = self.path, info.shape, info.transform

    def read(self, y0: int, rows: int, c0: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``(C_raw, rows, cols)`` and valid ``(rows, cols)`` of rows ``[y0, y0 + rows)``, columns
        ``[c0, c0 + cols)``."""
        if self.whole is not None:
            return (self.whole.array[:, y0:y0 + rows, c0:c0 + cols],
                    self.whole.valid[y0:y0 + rows, c0:c0 + cols])
        s = read_raster(self.path, bands=self.raw, window=(y0, c0, rows, cols), default_band_names=self.file_bands,
                        fallback_nodata=self.part.nodata)
        return s.array, s.valid


def _column_blocks(width: int, ww: int, stride: int, block_width: int) -> list[tuple[int, int, list[int]]]:
    """``(core_start, core_stop, window x starts touching the core)`` per column block."""
    starts = window_starts(width, ww, stride)
    block_width = max(block_width, ww)
    out = []
    for a in range(0, width, block_width):
        b = min(a + block_width, width)
        out.append((a, b, [s for s in starts if s < b and s + ww > a]))
    return out


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_read_ahead(read_ahead: int | None, device: torch.device) -> int:
    """Window rows read ahead: ``read_ahead``, or by default :data:`DEFAULT_READ_AHEAD` on a GPU and 0 on the CPU."""
    if read_ahead is not None:
        if read_ahead < 0:
            raise ValueError(f"read_ahead must be >= 0, got {read_ahead}")
        return int(read_ahead)
    return 0 if device.type == "cpu" else DEFAULT_READ_AHEAD


def resolve_io_threads(io_threads: int | None, device: torch.device) -> int:
    """GDAL threads decoding the input's blocks and compressing the outputs: ``io_threads``, or by default 1 on the
    CPU (the network takes the cores) and ``min(MAX_IO_THREADS, cores)`` on a GPU (decoding is then the bottleneck:
    a deflate-compressed 12-band uint16 scene decodes at about 10 MP/s per core, the network runs at 100+ MP/s)."""
    if io_threads is not None:
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads}")
        return int(io_threads)
    if device.type == "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_IO_THREADS, cores))


def _gdal_env(io_threads: int) -> dict[str, str]:
    """GDAL configuration of the reads and writes (``GDAL_NUM_THREADS``: multi-threaded block (de)compression of one
    request; per thread, set with ``rasterio.Env``). Left unset for 1 thread, so the environment's value holds."""
    return {"GDAL_NUM_THREADS": str(io_threads)} if io_threads > 1 else {}


_Request = TypeVar("_Request")
_Item = TypeVar("_Item")


class _ReadAhead(Generic[_Request, _Item]):
    """``load(r)`` for each request ``r``, handed out in order by :meth:`get`: computed up to ``depth`` items ahead on
    a background thread, or (``depth`` 0) in the caller's thread when asked for.

    The thread runs under its own ``rasterio.Env(**gdal_env)`` (GDAL configuration is per thread; no ``Env`` when
    ``gdal_env`` is empty) and opens its own dataset handles (:func:`common.raster.read_raster` opens the file at each
    call; rasterio dataset objects are not thread-safe, and a band folder is read once, before, and only sliced here).
    Raster reads and decoding run in GDAL without the GIL, so they overlap the caller's work. A ``load`` that raises
    ends the thread; :meth:`get` re-raises that exception object (same type and message as without read-ahead) when
    it reaches the failed item. :meth:`close` (also on an error or a KeyboardInterrupt in the caller) stops the
    thread after the load in progress; it is a daemon thread, so a load stuck in I/O cannot keep the process alive.
    """

    def __init__(self, load: Callable[[_Request], _Item], requests: Sequence[_Request], depth: int,
                 gdal_env: dict[str, str]) -> None:
        self._load, self._requests, self._env = load, list(requests), dict(gdal_env)
        self._next = 0  # inline: the next request to load
        self._thread: threading.Thread | None = None
        if depth > 0 and self._requests:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="predict-read-ahead", daemon=True)
            self._thread.start()

    def _gdal(self) -> contextlib.AbstractContextManager:
        return rasterio.Env(**self._env) if self._env else contextlib.nullcontext()

    def _run(self) -> None:
        try:
            with self._gdal():
                for request in self._requests:
                    if self._stop.is_set() or not self._put((True, self._load(request))):
                        return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which re-raises it
            self._put((False, exc))

    def _put(self, item: tuple[bool, Any]) -> bool:
        """Queue ``item``, waiting for room; False when the consumer closed meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> _Item:
        """The next item (blocks until it is loaded); re-raises the exception of a load that failed."""
        if self._thread is None:
            request = self._requests[self._next]
            self._next += 1
            with self._gdal():
                return self._load(request)
        while True:
            try:
                ok, item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():  # cannot happen: the thread always reports
                    raise RuntimeError("the read-ahead thread ended without a result") from None
        if not ok:
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (after the load in progress) and wait for it, at most :data:`_JOIN_S` seconds."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=_JOIN_S)

    def __enter__(self) -> _ReadAhead[_Request, _Item]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@torch.inference_mode()
def predict_raster(
    run: RunModel,
    input_path: str | Path,
    output_path: str | Path,
    window: int | None = None,
    overlap: float = DEFAULT_OVERLAP,
    probabilities: bool = False,
    device: str | torch.device | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    block_width: int = DEFAULT_BLOCK_WIDTH,
    file_bands: Sequence[str] | None = None,
    stack_inputs: Sequence[str] = (),
    read_ahead: int | None = None,
    io_threads: int | None = None,
) -> Prediction:
    """Predict one raster with a loaded run and write the class map (and probabilities).

    Args:
        run: from :func:`load_run_model`.
        input_path: GeoTIFF holding the model's bands, or a band folder (one GeoTIFF per band).
        output_path: class-map GeoTIFF to write; probabilities go to :func:`probabilities_path` of it.
        window: window side in px (default :data:`DEFAULT_WINDOW`); clamped to the scene size per axis.
        overlap: fraction of the window shared by neighbours, ``[0, 1)``.
        probabilities: also write the softmax probabilities.
        device: torch device (default: CUDA when available, else CPU).
        batch_size: windows per forward pass.
        block_width: widest column block streamed at once (see the module docstring).
        file_bands: band names of files without band descriptions (default: checked here, see
            :func:`check_inputs`).
        stack_inputs: for a model of a sensor stack whose input holds the first sensor only: one path template per
            other sensor (:func:`stack_paths`).
        read_ahead: window rows read and decoded ahead on a background thread while the current one is predicted
            (0: read in turn, in this thread; default :data:`DEFAULT_READ_AHEAD` on a GPU, 0 on the CPU). The outputs
            are the same either way.
        io_threads: GDAL threads decoding the input's compressed blocks and compressing the outputs (default 1 on the
            CPU, ``min(MAX_IO_THREADS, cores)`` on a GPU).

    Returns:
        :class:`Prediction`.

    Raises:
        RasterError: the input cannot be read or lacks a band (message names the file). ValueError: bad arguments.
    """
    t0 = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    window = DEFAULT_WINDOW if window is None else int(window)
    if window < MIN_WINDOW:
        raise ValueError(f"window must be >= {MIN_WINDOW}, got {window}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if read_ahead is not None and read_ahead < 0:
        raise ValueError(f"read_ahead must be >= 0, got {read_ahead}")
    if file_bands is None:
        file_bands = check_inputs(run, [input_path], stack_inputs)
    specs = _source_specs(run, stack_inputs)
    sources = list(zip([input_path, *stack_paths(input_path, stack_inputs)], specs,
                       [tuple(file_bands), *(file_band_names(p) for p in specs[1:])]))
    device = _resolve_device(device)
    read_ahead = resolve_read_ahead(read_ahead, device)
    gdal_env = _gdal_env(resolve_io_threads(io_threads, device))
    net = run.net.to(device).eval()
    k = run.num_classes
    mean, std = (torch.from_numpy(v).to(device) for v in run.mean_std())  # float32 (C,)
    readers = [_InputReader(path, part, names) for path, part, names in sources]
    h, w = readers[0].shape

    # the window grid of sliding_window_inference with the window clamped to the scene (no padding)
    wh, ww = min(window, h), min(window, w)
    stride_h = max(1, int(math.floor(wh * (1 - overlap))))
    stride_w = max(1, int(math.floor(ww * (1 - overlap))))
    ys = window_starts(h, wh, stride_h)
    blocks = _column_blocks(w, ww, stride_w, block_width)
    single = len(ys) == 1 and len(blocks) == 1 and len(blocks[0][2]) == 1  # one forward, no blending
    weight = blend_weights((wh, ww), "gaussian", device=device)  # (wh, ww)
    # the reads, in the order the loop below consumes them: per column block, per window row, the rows it does not
    # share with the previous window row (normalisation is per pixel: shared rows are reused on the device)
    shared_rows = [0] + [max(0, y0 + wh - y1) for y0, y1 in itertools.pairwise(ys)]
    requests = [(y + shared, wh - shared, xs[0], xs[-1] + ww - xs[0])
                for _, _, xs in blocks for y, shared in zip(ys, shared_rows)]

    classes = np.zeros((h, w), dtype=np.uint8)
    valid = np.zeros((h, w), dtype=bool)
    probs = np.zeros((k, h, w), dtype=np.float32) if probabilities else None
    n_windows = 0
    cuda = device.type == "cuda"

    def to_input(raws: list[torch.Tensor], raw_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw window rows -> network input on the device: (C, rows, cols) float32 and valid (rows, cols) bool."""
        raws = [r.to(device, non_blocking=True) for r in raws]  # from pinned memory on CUDA: asynchronous
        return model_input(raws, raw_ok.to(device, non_blocking=True), [r.part for r in readers], mean, std,
                           offset=run.card.offset)

    @torch.inference_mode()
    def load(request: tuple[int, int, int, int]) -> tuple:
        """Host side of a read, on the read-ahead thread: the raw rows as read (file dtype) and their validity
        (nodata, NaN/inf, dataset mask: common.raster), pinned for the copy to a GPU; on the CPU also converted."""
        y0, rows, c0, cols = request
        raws, raw_ok = [], np.ones((rows, cols), dtype=bool)
        for reader in readers:  # one file (or band folder) per sensor of a stack, else one
            raw, ok = reader.read(y0, rows, c0, cols)
            check_dtypes(raw.dtype, reader.part, reader.part.raw_bands, "raw array")
            raws.append(torch.from_numpy(np.ascontiguousarray(raw)))
            raw_ok &= ok
        ok_t = torch.from_numpy(raw_ok)
        if cuda:
            return [r.pin_memory() for r in raws], ok_t.pin_memory()
        return to_input(raws, ok_t)  # the CPU is the device: converted here, beside the network's thread

    def forward(x: torch.Tensor) -> torch.Tensor:  # (N, C, wh, ww) -> (N, K, wh, ww) float32
        logits = net(x).logits
        if logits.shape[1] != k or logits.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"the network returned {tuple(logits.shape)} for windows {tuple(x.shape)}; expected "
                             f"(N, {k}, {wh}, {ww})")
        return logits.float()

    def finish(logits: torch.Tensor, ok: torch.Tensor, rows: slice, cols: slice) -> None:
        """Finished pixels: logits (K, r, c) and valid (r, c) on the device -> class map (255 where invalid),
        probabilities (NaN where invalid) and validity on the host."""
        classes[rows, cols] = torch.where(ok, logits.argmax(0).to(torch.uint8), IGNORE_INDEX).cpu().numpy()
        valid[rows, cols] = ok.cpu().numpy()
        if probs is not None:
            probs[:, rows, cols] = torch.where(ok, logits.softmax(0), float("nan")).cpu().numpy()

    with _ReadAhead(load, requests, read_ahead, gdal_env) as reads:
        for a, b, xs in blocks:
            r0, r1 = xs[0], xs[-1] + ww  # columns of the windows touching the core [a, b)
            acc = torch.zeros(k, 0, r1 - r0, device=device)  # (K, rows, cols): pending rows [top, top + rows)
            norm = torch.zeros(0, r1 - r0, device=device)
            top = 0
            prev: tuple[torch.Tensor, torch.Tensor] | None = None  # the last window row (x, ok)
            for j, (y, shared) in enumerate(zip(ys, shared_rows)):
                # 1. the window row in model input: the rows it shares with the previous window row are reused, the
                #    new ones come from the read-ahead (read, decoded and pinned on its thread) and are converted on
                #    the device
                item = reads.get()
                x_new, ok_new = to_input(*item) if cuda else item
                if shared:
                    x = torch.cat([prev[0][:, wh - shared:], x_new], dim=1)  # (C, wh, cols)
                    ok = torch.cat([prev[1][wh - shared:], ok_new])  # (wh, cols)
                else:
                    x, ok = x_new, ok_new
                prev = (x, ok)
                # 2. forward the windows of the row in batches
                outs = []
                for i in range(0, len(xs), batch_size):
                    crops = torch.stack([x[:, :, s - r0:s - r0 + ww] for s in xs[i:i + batch_size]])
                    outs.append(forward(crops))
                out = torch.cat(outs)  # (len(xs), K, wh, ww)
                n_windows += len(xs)
                if single:
                    finish(out[0], ok, slice(0, h), slice(0, w))
                    break
                # 3. blend into the pending rows, in sliding_window_inference's order (row-major)
                grow = y + wh - top - acc.shape[1]
                if grow > 0:
                    acc = torch.cat([acc, torch.zeros(k, grow, r1 - r0, device=device)], dim=1)
                    norm = torch.cat([norm, torch.zeros(grow, r1 - r0, device=device)], dim=0)
                for i, s in enumerate(xs):
                    acc[:, y - top:y - top + wh, s - r0:s - r0 + ww] += out[i] * weight
                    norm[y - top:y - top + wh, s - r0:s - r0 + ww] += weight
                # 4. rows no later window covers are finished (they lie in this window row: top == y)
                done = (ys[j + 1] if j + 1 < len(ys) else h) - top
                finish((acc[:, :done] / norm[:done])[:, :, a - r0:b - r0], ok[top - y:top - y + done, a - r0:b - r0],
                       slice(top, top + done), slice(a, b))
                acc, norm, top = acc[:, done:], norm[done:], top + done

    crs, transform = _source_crs(readers[0].grid_file), transform_to_tuple(readers[0].transform)
    tags = _tags(run)
    with rasterio.Env(**gdal_env) if gdal_env else contextlib.nullcontext():  # threaded deflate with io_threads > 1
        write_geotiff(output_path, classes, crs, transform, nodata=IGNORE_INDEX, band_names=[CLASS_BAND],
                      dtype="uint8", colormap=_colormap(k), tags=tags)
        prob_path = None
        if probs is not None:
            prob_path = probabilities_path(output_path)
            write_geotiff(prob_path, probs, crs, transform, nodata=float("nan"),
                          band_names=list(run.card.class_names), dtype="float32", tags=tags)
    return Prediction(input_path, output_path, prob_path, (h, w), float(valid.mean()), n_windows,
                      time.perf_counter() - t0)


def predict_file(
    run_dir: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    checkpoint: str = "best",
    window: int | None = None,
    overlap: float = DEFAULT_OVERLAP,
    probabilities: bool = False,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> Prediction:
    """Load a run (:func:`load_run_model`; ``domain="target"`` in ``kwargs`` for the target normalisation) and
    predict one raster (:func:`predict_raster`; the other ``kwargs`` are its keyword-only options: ``batch_size``,
    ``block_width``, ``read_ahead``, ``io_threads``, ...)."""
    run = load_run_model(run_dir, checkpoint, kwargs.pop("domain", "source"))
    return predict_raster(run, input_path, output_path, window=window, overlap=overlap,
                          probabilities=probabilities, device=device, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune/predict.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Outputs: <stem>_pred.tif (uint8 classes, 255 = nodata) and with "
                                       "--probabilities <stem>_prob.tif (float32, one band per class), on the "
                                       "input's grid.")
    p.add_argument("--run", required=True, help=f"run directory (holds {MODEL_CARD} and {CHECKPOINT_DIR}/)")
    p.add_argument("--input", required=True,
                   help="a GeoTIFF, a band folder (<patch>/<patch>_B02.tif, one GeoTIFF per band), a directory (its "
                        "*.tif and band folders) or a quoted glob")
    p.add_argument("--output", required=True, help="output directory, or a .tif file for a single input")
    p.add_argument("--checkpoint", default="best", choices=CHECKPOINTS,
                   help="weights to use (best falls back to last when the run has no best; default best)")
    p.add_argument("--domain", default="source", choices=DOMAINS,
                   help="normalise inputs with the run's training statistics (source, default) or, for an adaptation "
                        "run trained with data.target.stats_file, with the target domain's (target)")
    p.add_argument("--probabilities", action="store_true", help="also write the per-class probabilities")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help=f"window side in px for scenes larger than one window (default {DEFAULT_WINDOW})")
    p.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP,
                   help=f"window overlap fraction in [0, 1) (default {DEFAULT_OVERLAP})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"windows per forward pass (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--stack-input", action="append", default=[], metavar="TEMPLATE",
                   help="for a model of a sensor stack (e.g. S2L2A+S1) whose inputs hold the first sensor's bands: "
                        "the co-registered file of the next sensor, a path with {stem}, {name} or {dir} of the input "
                        "(e.g. 's1/images/{stem}.tif'); once per further sensor")
    p.add_argument("--read-ahead", type=int, default=None, metavar="N",
                   help=f"window rows read and decoded ahead on a background thread while the current one is "
                        f"predicted; 0 reads in turn (same outputs; default {DEFAULT_READ_AHEAD} on a GPU, 0 on the "
                        f"CPU)")
    p.add_argument("--io-threads", type=int, default=None, metavar="N",
                   help=f"GDAL threads decoding the input's compressed blocks and compressing the outputs (default: 1 "
                        f"on the CPU, min({MAX_IO_THREADS}, cores) on a GPU)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU exists")
    return p


def main(argv: Sequence[str] | None = None) -> list[Prediction]:
    """Command line; returns the predictions. Input, run and argument errors exit with status 2 and one message."""
    args = _parser().parse_args(argv)
    try:
        run = load_run_model(args.run, args.checkpoint, args.domain)
        inputs = find_inputs(args.input, _source_specs(run, args.stack_input)[0].raw_bands)
        outputs = output_paths(inputs, args.output)
        if args.read_ahead is not None and args.read_ahead < 0:
            raise ValueError(f"--read-ahead must be >= 0, got {args.read_ahead}")
        if args.io_threads is not None and args.io_threads < 1:
            raise ValueError(f"--io-threads must be >= 1, got {args.io_threads}")
        file_bands = check_inputs(run, inputs, args.stack_input)  # every input checked before the first is predicted
    except (FileNotFoundError, ValueError) as exc:  # RasterError is a ValueError
        print(f"predict: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    device = torch.device("cpu") if args.cpu else _resolve_device(None)
    print(f"predict: {len(inputs)} file(s), DeepLab {run.card.version} on {run.card.arch} ({run.checkpoint}), "
          f"bands {', '.join(run.card.bands)}, window {args.window}, overlap {args.overlap}, device {device}, "
          f"read-ahead {resolve_read_ahead(args.read_ahead, device)}, io threads "
          f"{resolve_io_threads(args.io_threads, device)}")
    done = []
    for src, dst in zip(inputs, outputs):
        try:
            r = predict_raster(run, src, dst, window=args.window, overlap=args.overlap,
                               probabilities=args.probabilities, device=device, batch_size=args.batch_size,
                               file_bands=file_bands, stack_inputs=args.stack_input, read_ahead=args.read_ahead,
                               io_threads=args.io_threads)
        except ValueError as exc:
            print(f"predict: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        extra = f" + {r.probabilities}" if r.probabilities else ""
        print(f"{src} -> {r.mask}{extra} ({r.shape[0]}x{r.shape[1]} px, {100 * r.valid_fraction:.1f}% valid, "
              f"{r.windows} window(s), {r.seconds:.1f} s)")
        done.append(r)
    return done


if __name__ == "__main__":
    main()
