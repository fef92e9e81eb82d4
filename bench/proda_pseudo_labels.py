"""How good are ProDA's stage-1 pseudo-labels on the demo? Pixel accuracy (and coverage) of the warm-up model's
pseudo-labels on the labelled target validation tiles: plain ``argmax p0`` against the prototype-rectified
``argmax omega * p0`` at several temperatures and confidence thresholds, and the nearest prototype alone.

Prototypes are computed as ``ProDA.on_train_start`` does (``initial_prototypes``: the warm-up model's class-mean
decoder features over the target training tiles, at 1 / ``proda.label_stride`` of the input, with ProDA's default
settings). The data are those of the run's own ``config.yaml``. The target masks are read
here as a report only, as in the adaptation runs. A diagnostic for the README's adaptation table: a warm start whose
pseudo-labels are wrong on a third of the pixels teaches the student those mistakes.

    python bench/proda_pseudo_labels.py --run runs/bench_uda/s2/source_only_random_s0     # -> bench/results/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.bands import IGNORE_INDEX  # noqa: E402
from common.config import load_config  # noqa: E402
from finetune.data import plain_dataset, validation_sets  # noqa: E402
from finetune.methods.proda import (  # noqa: E402
    ProDAConfig,
    feature_dim,
    initial_prototypes,
    prototype_distances,
    prototype_weights,
    rectified_pseudo_labels,
    resize,
    valid_cells,
)
from finetune.predict import load_run_model  # noqa: E402
from finetune.training import finetune_config_class  # noqa: E402

TEMPERATURES = (1.0, 3.0, 10.0, 100.0)
THRESHOLDS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)


@torch.no_grad()
def measure(run: str, overrides: list[str] = ()) -> dict:
    rm = load_run_model(run, "last")
    cfg = load_config(finetune_config_class("uda"), Path(run) / "config.yaml", list(overrides))
    net, k = rm.net, rm.card.num_classes
    label_stride, min_pixels = ProDAConfig.label_stride, ProDAConfig.proto_min_pixels
    loader = torch.utils.data.DataLoader(plain_dataset("target", cfg.data, rm.spec), batch_size=16)
    protos, counts = initial_prototypes(net, loader, k, feature_dim(net), label_stride, min_pixels,
                                        lambda t, op: t, torch.device("cpu"))
    tally: dict[str, list[int]] = {}

    def count(name: str, labels: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> None:
        kept = valid & (labels != IGNORE_INDEX)
        t = tally.setdefault(name, [0, 0, 0])
        t[0] += int(((labels == truth) & kept).sum())
        t[1] += int(kept.sum())
        t[2] += int(valid.sum())

    val = torch.utils.data.DataLoader(validation_sets(cfg.data, rm.spec)["target_val"], batch_size=16)
    for b in val:
        x = b["image"]
        size = (max(1, x.shape[-2] // label_stride), max(1, x.shape[-1] // label_stride))
        out = net(x, return_features=True, return_aux=False)
        p0 = resize(out.logits.float(), size).softmax(1)
        d = prototype_distances(resize(out.decoder_input.float(), size), protos)
        truth = torch.nn.functional.interpolate(b["mask"].unsqueeze(1).float(), size=size, mode="nearest")[:, 0]
        truth = truth.long()
        valid = valid_cells(b["valid"].bool(), size) & (truth != IGNORE_INDEX)
        for th in THRESHOLDS:
            count(f"plain/threshold {th}", rectified_pseudo_labels(p0, torch.ones_like(p0), valid, th)[0], truth,
                  valid)
            for tau in TEMPERATURES:
                count(f"rectified tau {tau}/threshold {th}",
                      rectified_pseudo_labels(p0, prototype_weights(d, tau), valid, th)[0], truth, valid)
        count("nearest prototype", torch.where(valid, d.argmin(1), torch.full_like(truth, IGNORE_INDEX)), truth, valid)
    return {"run": run, "prototype_images_per_class": counts.tolist(),
            "pseudo_labels": {name: {"accuracy": round(100 * c / max(n, 1), 2), "coverage": round(100 * n / v, 1)}
                              for name, (c, n, v) in tally.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the warm-up (source-only) run directory")
    ap.add_argument("overrides", nargs="*", help="overrides of the run's config (e.g. data.target.root=...)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "proda_pseudo_labels.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(args.run, args.overrides)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("| pseudo-labels | accuracy % | coverage % |\n|---|---|---|")
    for name, r in result["pseudo_labels"].items():
        print(f"| {name} | {r['accuracy']} | {r['coverage']} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
