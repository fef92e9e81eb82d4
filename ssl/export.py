"""Export the DINO teacher backbone of a pretraining run as a timm-loadable checkpoint.

    python ssl/export.py --run runs/pretrain [--out backbone.safetensors] [--checkpoint last|best|latest]

Writes ``<out>.safetensors`` (the teacher backbone's ``state_dict``, without the DINO head: exactly the keys of
``timm.create_model(arch, in_chans=C, num_classes=0)``) and ``<out>.json``: architecture, in_chans, band names in
order, the normalisation from raw file values to model input (per band: units, scale, offset, dB step, mean, std,
and the nodata policy, enough to prepare inputs without this project: :mod:`common.weights`), the DINO settings,
epoch/step and a SHA-256 of the weights. Both files get the usual mode (``0666 & ~umask``). Load it with one call::

    timm.create_model(arch, in_chans=C, num_classes=0, checkpoint_path="backbone.safetensors")
    timm.create_model(arch, in_chans=C, num_classes=0, pretrained=True,
                      pretrained_cfg_overlay=dict(file="backbone.safetensors", first_conv=None))

or set ``model.weights: backbone.safetensors`` in a fine-tuning config (bands and normalisation are checked).
A run with ``model.stem_pool: false`` records ``"stem_pool": false``: the same keys, but the network it trained has
``model.maxpool = torch.nn.Identity()`` (fine-tuning builds it so; ``load_with`` spells it out).
Nothing is unpickled: run checkpoints are read with safetensors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Literal

import yaml

from common.checkpoint import CHECKPOINT_DIR, latest_checkpoint
from common.errors import MissingFileError, UserInputError, cli_entry
from common.config import build_config
from common.weights import ExportMeta, Normalisation, write_export

__all__ = ["export_run", "TEACHER_PREFIX"]

TEACHER_PREFIX = "teacher.backbone."


def _run_weights(run: Path, which: str) -> tuple[Path, int | None]:
    ckpt_dir = run / CHECKPOINT_DIR
    if which in ("last", "best"):
        path = ckpt_dir / f"{which}.safetensors"
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                step = (f.metadata() or {}).get("step")
            return path, int(step) if step is not None else None
        if which == "best":
            raise MissingFileError(f"{path} not found (a best checkpoint exists only for runs with a probe)")
    latest = latest_checkpoint(run)
    if latest is None:
        raise MissingFileError(f"{run}: no checkpoint to export (looked for {ckpt_dir}/last.safetensors and "
                                f"{ckpt_dir}/step_*)")
    state = json.loads((latest / "engine_state.json").read_text())
    return latest / "model.safetensors", int(state["step"])


def export_run(run: str | Path, out: str | Path | None = None,
               which: Literal["last", "best", "latest"] = "last") -> tuple[Path, Path]:
    """Export the teacher backbone of pretraining run ``run``; returns (weights, sidecar) paths.

    Args:
        run: the run directory (holds ``config.yaml`` and ``checkpoints/``).
        out: output path (default ``<run>/backbone.safetensors``).
        which: ``last`` (end of training; falls back to the latest step checkpoint of an interrupted run),
            ``best`` (best k-NN probe score) or ``latest`` (newest step checkpoint).
    """
    from safetensors.torch import load_file

    run = Path(run)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise MissingFileError(f"{run} is not a pretraining run directory ({cfg_path} not found)")
    cfg = yaml.safe_load(cfg_path.read_text())
    if "dino" not in cfg:
        raise UserInputError(f"{cfg_path} is not a DINO pretraining config (no 'dino' section)")
    weights, step = _run_weights(run, which)
    state = load_file(str(weights))
    backbone = {k[len(TEACHER_PREFIX):]: v.contiguous() for k, v in state.items() if k.startswith(TEACHER_PREFIX)}
    if not backbone:
        raise UserInputError(f"{weights} holds no '{TEACHER_PREFIX}*' tensors: not a DINO run checkpoint")
    data = cfg["data"]
    from eo_ssl.pretrain import PretrainDataConfig, resolve_data_sensor

    spec = resolve_data_sensor(build_config(PretrainDataConfig, data, source=f"{cfg_path} (section data)"))
    trainer = cfg["trainer"]
    meta = ExportMeta(
        architecture=cfg["model"]["arch"],
        in_chans=len(spec.bands),
        bands=list(spec.bands),
        sensor=spec.name,
        normalisation=Normalisation.from_spec(spec, float(data.get("offset", 0.0))),  # per-band formula + nodata
        num_features=_num_features(cfg["model"]["arch"]),
        stem_pool=bool(cfg["model"].get("stem_pool", True)),  # configs of runs before the key: the timm stem
        sensor_parts=[{"sensor": p.name, "bands": list(p.bands), "conversion": p.conversion, "units": p.units}
                      for p in spec.parts],
        sensor_def=spec.to_dict(),  # fine-tuning checks, or re-creates, a sensor defined in the config from it
        source={"method": "dino", "run": str(run.resolve()), "checkpoint": str(weights.name), "step": step,
                "epochs": trainer.get("epochs"), "max_steps": trainer.get("max_steps"), "dino": cfg["dino"],
                "augment": {k: cfg["augment"][k] for k in ("global_size", "local_size", "local_number")},
                "data": {"root": data["root"], "stats_file": data.get("stats_file"),
                         **({"stack": [{"root": x["root"], "sensor": x["sensor"], "stats_file": x.get("stats_file")}
                                       for x in data["stack"]]} if data.get("stack") else {})}},
    )
    return write_export(backbone, meta, Path(out) if out is not None else run / "backbone.safetensors")


def _num_features(arch: str) -> int:
    import timm
    import torch

    with torch.device("meta"):  # no memory, no init cost
        model = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=1)
    return int(model.num_features)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ssl/export.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="pretraining run directory")
    parser.add_argument("--out", default=None, help="output .safetensors (default: RUN/backbone.safetensors)")
    parser.add_argument("--checkpoint", default="last", choices=("last", "best", "latest"),
                        help="which weights: end of training, best probe score, newest step checkpoint")
    args = parser.parse_args(argv)
    weights, sidecar = export_run(args.run, args.out, args.checkpoint)
    meta = json.loads(sidecar.read_text())
    print(f"wrote {weights} and {sidecar}\nload with: {meta['load_with']}")


if __name__ == "__main__":
    main()
