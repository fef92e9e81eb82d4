"""The model card ``<run>/model.json`` of a fine-tuning run, written and read here: everything prediction (and a
later run's ``model.init_from``) needs to rebuild and feed the network without the run's config: architecture,
classes, the sensor (custom ones included), bands, the per-band formula from raw file values to model input and the
nodata policy, and which ``state_dict`` prefix of the checkpoints holds the evaluated network.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from common.errors import DataError, MissingFileError
from common.bands import (
    IGNORE_INDEX,
    SensorSpec,
)
from common.checkpoint import atomic_write_json


from common.bands import get_sensor
from finetune.inputs import ResolvedInputs
from finetune.config import SegDataConfig, SegModelConfig

__all__ = ["MODEL_CARD", "ModelCard", "write_model_card", "read_model_card"]


MODEL_CARD = "model.json"
"""File of a run directory describing the network."""

_CARD_KEYS = ("method", "arch", "version", "output_stride", "aux", "num_classes", "class_names", "sensor", "bands",
              "normalisation", "state_dict_prefix")
_NORMALISATION_KEYS = ("conversion", "mean", "std", "offset")


# ------------------------------------------------------------------------------------------------------------
# the run: model card and network
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    """The contents of ``<run>/model.json``.

    Attributes:
        path: the file it was read from (for messages).
        method / arch / version / output_stride / aux / aspp_channels / decoder_channels: how the network was
            trained and built (cards without the widths had the published 256).
        num_classes: K.
        class_names: one name per class (``"0"``, ``"1"``, ... when the run set none).
        sensor: sensor registry name (:func:`common.bands.get_sensor`).
        bands: band names in model channel order.
        conversion: raw-to-model-unit conversion (must equal the sensor's).
        mean / std: normalisation per band, in model units.
        offset: Sentinel-2 DN offset added before scaling.
        state_dict_prefix: prefix of the evaluated network's keys in the checkpoint (e.g. ``"model."``).
        weights_init: backbone weights the run started from (informative).
        sensor_def: the sensor as :meth:`common.bands.SensorSpec.to_dict` (conversion, file band order, scale and
            offset, nodata; custom sensors of the config too); cards written before it lack it and name a registry
            sensor.
        stem_pool: False when the backbone was built without its ResNet stem max-pool (``model.stem_pool``
            resolved); cards written before the key had the pool.
        target_mean / target_std: the target domain's normalisation of an adaptation run with
            ``data.target.stats_file`` (``predict.py --domain target``); None otherwise.
    """

    path: str
    method: str
    arch: str
    version: str
    output_stride: int | None
    aux: bool
    num_classes: int
    class_names: tuple[str, ...]
    sensor: str
    bands: tuple[str, ...]
    conversion: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    offset: float
    state_dict_prefix: str
    weights_init: str | None = None
    sensor_def: dict[str, Any] | None = None
    aspp_channels: int = 256
    decoder_channels: int = 256
    stem_pool: bool = True
    target_mean: tuple[float, ...] | None = None
    target_std: tuple[float, ...] | None = None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelCard":
        """Read and check a model card.

        Raises:
            FileNotFoundError: no such file. ValueError: not JSON, a key missing, or inconsistent values (the
                message names the file).
        """
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: model description not found (a run directory of finetune/semisup.py "
                                    f"holds {MODEL_CARD})")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{path}: expected a JSON object")
        missing = [k for k in _CARD_KEYS if k not in raw]
        norm = raw.get("normalisation")
        if isinstance(norm, dict):
            missing += [f"normalisation.{k}" for k in _NORMALISATION_KEYS if k not in norm]
        elif "normalisation" not in missing:
            raise DataError(f"{path}: normalisation must be an object with keys {list(_NORMALISATION_KEYS)}")
        if missing:
            raise DataError(f"{path}: missing key(s) {missing}")
        bands = tuple(str(b) for b in raw["bands"])
        num_classes = int(raw["num_classes"])
        names = raw["class_names"]
        target = raw.get("target_normalisation")
        if target is not None and not (isinstance(target, dict) and "mean" in target and "std" in target):
            raise DataError(f"{path}: target_normalisation must be null or an object with 'mean' and 'std'")
        class_names = tuple(str(n) for n in names) if names else tuple(str(i) for i in range(num_classes))
        card = cls(
            path=str(path), method=str(raw["method"]), arch=str(raw["arch"]), version=str(raw["version"]),
            output_stride=None if raw["output_stride"] is None else int(raw["output_stride"]), aux=bool(raw["aux"]),
            num_classes=num_classes, class_names=class_names, sensor=str(raw["sensor"]), bands=bands,
            conversion=str(norm["conversion"]), mean=tuple(float(v) for v in norm["mean"]),
            std=tuple(float(v) for v in norm["std"]), offset=float(norm["offset"]),
            state_dict_prefix=str(raw["state_dict_prefix"]), weights_init=raw.get("weights_init"),
            sensor_def=raw.get("sensor_def") if isinstance(raw.get("sensor_def"), dict) else None,
            aspp_channels=int(raw.get("aspp_channels", 256)), decoder_channels=int(raw.get("decoder_channels", 256)),
            stem_pool=bool(raw.get("stem_pool", True)),
            target_mean=tuple(float(v) for v in target["mean"]) if target else None,
            target_std=tuple(float(v) for v in target["std"]) if target else None,
        )  # fmt: skip
        card.validate()
        return card

    def validate(self) -> None:
        where = self.path
        if not 1 <= self.num_classes < IGNORE_INDEX:
            raise DataError(f"{where}: num_classes must be in [1, {IGNORE_INDEX}), got {self.num_classes}")
        if len(self.class_names) != self.num_classes:
            raise DataError(f"{where}: {len(self.class_names)} class_names for num_classes={self.num_classes}")
        if not self.bands:
            raise DataError(f"{where}: empty band list")
        for key, mean, std in (("normalisation", self.mean, self.std),
                               ("target_normalisation", self.target_mean, self.target_std)):
            if mean is None or std is None:
                continue
            if not len(mean) == len(std) == len(self.bands):
                raise DataError(f"{where}: {key} has {len(mean)} means and {len(std)} stds for {len(self.bands)} "
                                f"bands")
            if not all(math.isfinite(s) and s > 0 for s in std) or not all(math.isfinite(m) for m in mean):
                raise DataError(f"{where}: {key} needs finite means and positive stds, got mean={mean} std={std}")

    def sensor_spec(self) -> SensorSpec:
        """The sensor restricted to the model's bands (re-created from ``sensor_def`` when the card has one, else
        the registry's); its conversion must be the card's.

        Raises:
            ValueError: unknown sensor / band, or a conversion that differs from the sensor's.
        """
        try:
            spec = (SensorSpec.from_dict(self.sensor_def).subset(self.bands) if self.sensor_def is not None
                    else get_sensor(self.sensor, self.bands))
        except (KeyError, ValueError) as exc:
            raise DataError(f"{self.path}: {exc}") from None
        if spec.conversion != self.conversion:
            raise DataError(f"{self.path}: conversion {self.conversion!r} differs from sensor {spec.name}'s "
                             f"{spec.conversion!r}")
        return spec


def write_model_card(run_dir: Path, model: SegModelConfig, data: SegDataConfig, inputs: ResolvedInputs,
                     method: str, eval_prefix: str) -> None:
    """``<run>/model.json``: everything :mod:`finetune.predict` needs to rebuild and feed the model; its
    ``normalisation`` spells out per band how raw file values become model input (units, scale, offset, dB step, mean,
    std) and the nodata policy, as an export's (:meth:`common.weights.Normalisation.from_spec`)."""
    from dataclasses import asdict

    from common.weights import Normalisation

    from finetune.data import role_spec

    spec = inputs.spec
    target = None
    if getattr(getattr(data, "target", None), "stats_file", None) is not None:
        tspec = role_spec("target", data, spec)
        target = {"stats_file": data.target.stats_file, "mean": [float(v) for v in tspec.mean_array()],
                  "std": [float(v) for v in tspec.std_array()]}
    atomic_write_json(run_dir / "model.json", {
        "method": method,
        "arch": model.arch,
        "version": model.version,
        "output_stride": model.output_stride,
        "aux": model.aux,
        "aspp_channels": model.aspp_channels,
        "decoder_channels": model.decoder_channels,
        "stem_pool": inputs.stem_pool,  # model.stem_pool as resolved (null follows the export)
        "num_classes": data.num_classes,
        "class_names": list(data.class_names) if data.class_names else None,
        "sensor": spec.name,
        "bands": list(spec.bands),
        "sensor_parts": [{"sensor": p.name, "bands": list(p.bands), "conversion": p.conversion, "units": p.units}
                         for p in spec.parts],
        "sensor_def": spec.to_dict(),  # predict re-creates the sensor (custom ones too) from it
        "normalisation": asdict(Normalisation.from_spec(spec, float(data.offset))),
        "target_normalisation": target,  # data.target.stats_file's mean/std (predict.py --domain target)
        "state_dict_prefix": eval_prefix,
        "weights_init": inputs.weights,
    })


def read_model_card(run_dir: str | Path) -> ModelCard:
    """The model card of a fine-tuning run directory (checked; errors name the file)."""
    return ModelCard.from_json(Path(run_dir) / MODEL_CARD)
