"""What a fine-tuning run reads: its bands and normalisation, the sensor of its data, and its weights.

:func:`resolve_inputs` decides them from the config and a backbone export (checked against the data, or re-created
from it for sensors defined in a config); :func:`build_model` builds the DeepLab with those weights and
:func:`build_loss` the configured loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from common.bands import (
    SENSORS,
    BandStats,
    SensorDef,
    SensorSpec,
    resolve_sensor,
    resolve_sensors,
    stack_sensors,
)
from common.weights import EXPORT_FORMAT, ExportMeta, ExportMismatchError, check_compatible, read_export_meta
from finetune.deeplab import create_segmenter
from finetune.losses import build_segmentation_loss
from common.errors import MissingFileError

from finetune.config import LossConfig, SegDataConfig, SegModelConfig

__all__ = ["ResolvedInputs", "data_sensor", "export_sensors", "resolve_inputs", "build_model", "build_loss"]


@dataclass
class ResolvedInputs:
    spec: SensorSpec  # bands in model order with the statistics used for normalisation
    weights: str | None  # backbone weights file
    band_map: tuple[list[str], list[str]] | None  # (weights' bands, dataset bands) for the first conv
    export: ExportMeta | None  # metadata of an export, when the weights are one
    notes: list[str] = field(default_factory=list)
    stem_pool: bool = True  # keep the ResNet stem max-pool: model.stem_pool, or the export's when that is null


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


def _stem_pool(model: SegModelConfig, source: str, meta: ExportMeta | None = None, path: Path | None = None) -> bool:
    """``model.stem_pool``, or the export's (``meta``, read from ``path``) when it is null, True without an export;
    a value that contradicts the export is refused: the fine-tuned network would not be the pretrained one."""
    if meta is None or path is None:
        return True if model.stem_pool is None else bool(model.stem_pool)
    if model.stem_pool is not None and bool(model.stem_pool) != meta.stem_pool:
        theirs = str(meta.stem_pool).lower()
        raise ExportMismatchError(
            f"{source} sets model.stem_pool={str(model.stem_pool).lower()} but the backbone export "
            f"{path.with_suffix('.json')} was pretrained with stem_pool={theirs} "
            f"({'with' if meta.stem_pool else 'without'} the ResNet stem max-pool): leave model.stem_pool unset "
            f"(null) to follow the export, or set it to {theirs}")
    return meta.stem_pool


def resolve_inputs(data: SegDataConfig, model: SegModelConfig, source: str = "the config") -> ResolvedInputs:
    """Decide the bands, normalisation and weights of a run, refusing an export that does not fit the data.

    * ``model.weights`` an export and ``data.bands`` unset: the export's bands. ``data.stats_file`` unset: the
      export's normalisation (the statistics the backbone was pretrained with). A stats file or bands that differ
      from the export's are checked (:func:`common.weights.check_compatible`) and refused with a clear message,
      unless ``model.band_mapping`` maps the first convolution by band name (then the dataset's statistics apply).
    * otherwise: ``data.bands`` (or all the sensor's bands) with ``data.stats_file`` or the reference statistics.
    * ``model.stem_pool`` null: the export's ``stem_pool`` (True without an export); a contradicting value is refused.

    Raises:
        FileNotFoundError: the weights file does not exist. ExportMismatchError: bands / normalisation / stem_pool
            differ.
    """
    notes: list[str] = []
    if model.weights is None:
        return ResolvedInputs(data_sensor(data), None, None, None, notes, _stem_pool(model, source))
    path = Path(model.weights)
    if not path.is_file():
        raise MissingFileError(f"model.weights: {path} does not exist; point model.weights at an export of ssl/export.py "
                               f"(.safetensors next to its .json) or a timm state_dict file")
    meta = _export_meta(path)
    if meta is None:  # a plain timm state_dict: nothing to check against
        spec = data_sensor(data)
        notes.append(f"model.weights {path} has no export sidecar: bands and normalisation cannot be checked")
        return ResolvedInputs(spec, str(path), None, None, notes, _stem_pool(model, source))

    stem_pool = _stem_pool(model, source, meta, path)
    if not stem_pool:
        notes.append("ResNet stem without its max-pool (stem_pool false), as the export was pretrained")
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
        return ResolvedInputs(spec, str(path), None, meta, notes, stem_pool)
    notes.append(f"first convolution mapped by band name from {meta.bands} to {bands}")
    return ResolvedInputs(spec, str(path), (list(meta.bands), bands), meta, notes, stem_pool)


def head_widths(model: SegModelConfig) -> dict[str, int]:
    """The DeepLab head widths of ``model`` (v2 has a classifier per rate and no widths)."""
    if model.version == "v2":
        return {}
    return {"aspp_channels": int(model.aspp_channels), "decoder_channels": int(model.decoder_channels)}


def build_model(model: SegModelConfig, num_classes: int, inputs: ResolvedInputs | None, in_chans: int,
                load_weights: bool = True) -> nn.Module:
    """The configured DeepLab; ``inputs`` (:func:`resolve_inputs`) give its weights, band mapping and stem pool
    (without them ``model.stem_pool``, null meaning true)."""
    weights = inputs.weights if (inputs is not None and load_weights) else None
    band_map = inputs.band_map if (inputs is not None and load_weights) else None
    stem_pool = inputs.stem_pool if inputs is not None else model.stem_pool is not False
    return create_segmenter(model.arch, model.version, num_classes, in_chans, output_stride=model.output_stride,
                            aux=model.aux, pretrained_file=weights, band_map=band_map,
                            drop_path_rate=model.drop_path_rate, stem_pool=stem_pool, **head_widths(model))


def build_loss(loss: LossConfig, num_classes: int) -> nn.Module:
    return build_segmentation_loss(loss.name, num_classes, class_weights=loss.class_weights)
