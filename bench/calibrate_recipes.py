"""Calibration of the demo fine-tuning recipes: is there room for semi-supervised and adaptation methods?

Runs the shipped demo configs as a user would (``finetune/semisup.py`` / ``finetune/uda.py`` in a subprocess, the
config's own recipe, only the data paths, the split and ``trainer.seed`` overridden) and reads each run's
``metrics.json`` (the last step's validation metrics):

* ``semisup`` (``configs/finetune/demo.yaml``, supervised): ``1/8`` = ``data.labelled_split=labelled_1_8`` vs
  ``all`` = ``data.labelled_split=train_all``, ``mIoU`` on the source validation tiles;
* ``uda_s2`` (``configs/finetune/demo_uda.yaml``): ``source_only`` = ``method=source_only`` trained on the source
  domain, ``target_val/mIoU`` (the target validation tiles) vs ``target`` = the same recipe trained on the target
  domain's labelled tiles (``data.root`` on the target), ``mIoU`` on the same target validation tiles;
* ``uda_s1`` (``configs/finetune/demo_uda_s1.yaml``): the same pair on the Sentinel-1 tiles of the two domains.

Usage (CPU; one run at a time, ~2-3 minutes each on an idle 2-core machine)::

    OMP_NUM_THREADS=2 python bench/calibrate_recipes.py                      # everything, seeds 0 and 1
    OMP_NUM_THREADS=2 python bench/calibrate_recipes.py --only semisup --seeds 0
    python bench/calibrate_recipes.py --quick                                # smoke run: tiny data, 4 steps

The demo data are generated (``common.demo_data``, seed 0, default settings) under ``--data`` when absent. Results
go to ``--out`` (default ``bench/results/demo_calibration.json``; ``--quick``: ``demo_calibration_quick.json``),
rewritten after every run and merged with the runs already there, as::

    {"semisup": {"1/8": {"0": mIoU, "1": mIoU}, "all": {...}},
     "uda_s2": {"source_only": {...}, "target": {...}}, "uda_s1": {...},
     "runs": {"semisup/1/8/0": {"metric": ..., "value": ..., "train_time_s": ..., "wall_s": ..., "argv": [...]}},
     ...}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.demo_data import generate

CONFIGS = REPO / "configs" / "finetune"
RUN_RECORD = "calibration_run.json"
"""Written into each run directory: the command line (argv after the interpreter) and its wall time."""
QUICK_DATA = {"tiles": 16, "val_tiles": 8, "size": 32, "sar_scenes": 2, "sar_grid": 2, "sar_size": 32, "sar_overlap": 8}
QUICK_OVERRIDES = ("model.arch=resnet10t", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.checkpoint_every=2",
                   "optim.warmup_steps=1", "data.batch_size=2", "augment.crop_size=24", "eval.batch_size=4")


def experiments(data: Path) -> dict[str, dict[str, tuple[str, str, list[str], str]]]:
    """experiment -> arm -> (entry script, config, overrides, metric read from metrics.json["last"])."""
    s2, s1 = data / "s2", data / "s1"
    return {
        "semisup": {
            "1/8": ("finetune/semisup.py", "demo.yaml", [f"data.root={s2 / 'source'}",
                                                         "data.labelled_split=labelled_1_8"], "mIoU"),
            "all": ("finetune/semisup.py", "demo.yaml", [f"data.root={s2 / 'source'}",
                                                         "data.labelled_split=train_all"], "mIoU"),
        },
        "uda_s2": {
            "source_only": ("finetune/uda.py", "demo_uda.yaml", [f"data.root={s2 / 'source'}"], "target_val/mIoU"),
            "target": ("finetune/uda.py", "demo_uda.yaml", [f"data.root={s2 / 'target'}",
                                                            f"data.target.root={s2 / 'target'}"], "mIoU"),
        },
        "uda_s1": {
            "source_only": ("finetune/uda.py", "demo_uda_s1.yaml", [f"data.root={s1 / 'source'}"],
                            "target_val/mIoU"),
            "target": ("finetune/uda.py", "demo_uda_s1.yaml", [f"data.root={s1 / 'target'}",
                                                               f"data.target.root={s1 / 'target'}"], "mIoU"),
        },
    }


def run_one(script: str, config: str, overrides: list[str], seed: int, run_dir: Path, extra: list[str]) -> dict:
    argv = [sys.executable, script, "--config", str(CONFIGS / config), "--output-dir", str(run_dir), "--overwrite",
            *overrides, f"trainer.seed={seed}", "trainer.progress_bar=false", *extra]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run failed (exit {proc.returncode}): {' '.join(argv)}; log {run_dir.parent}/"
                           f"{run_dir.name}.log")
    record = {"wall_s": wall, "argv": [str(a) for a in argv[1:]], "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    (run_dir / RUN_RECORD).write_text(json.dumps(record) + "\n")
    return {"metrics": json.loads((run_dir / "metrics.json").read_text()), **record}


def reused(run_dir: Path) -> dict | None:
    """A finished run's metrics and record (``--reuse``), or None when the run did not finish."""
    if not ((run_dir / "metrics.json").is_file() and (run_dir / RUN_RECORD).is_file()):
        return None
    return {"metrics": json.loads((run_dir / "metrics.json").read_text()),
            **json.loads((run_dir / RUN_RECORD).read_text())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=None, help="demo data (generated when absent; default under --runs)")
    p.add_argument("--runs", type=Path, default=Path("/tmp/eoseg_recipe_calibration"), help="run directories")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", default="semisup,uda_s2,uda_s1", help="experiments (comma-separated)")
    p.add_argument("--arms", default=None, help="only these arms (comma-separated, e.g. 1/8,all)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (merged with its previous content)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, resnet10t, 4 steps, one seed")
    p.add_argument("--reuse", action="store_true",
                   help=f"read the runs this script finished ({RUN_RECORD} next to metrics.json) instead of rerunning")
    args = p.parse_args()
    runs = args.runs / ("quick" if args.quick else "full")
    data = args.data or runs / "demo"
    out = args.out or REPO / "bench" / "results" / ("demo_calibration_quick.json" if args.quick
                                                    else "demo_calibration.json")
    seeds = args.seeds[:1] if args.quick else args.seeds
    generate(data, seed=0, **(QUICK_DATA if args.quick else {}))
    extra = list(QUICK_OVERRIDES) if args.quick else []
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("runs", {})
    wanted = args.only.split(",")
    exps = experiments(data)
    unknown = sorted(set(wanted) - set(exps))
    if unknown:
        p.error(f"unknown experiments {unknown}; known: {sorted(exps)}")
    for seed in seeds:  # seed-major: one seed of everything first
        for name in wanted:
            for arm, (script, config, overrides, metric) in exps[name].items():
                if args.arms and arm not in args.arms.split(","):
                    continue
                run_dir = runs / name / arm.replace("/", "_") / f"seed{seed}"
                r = reused(run_dir) if args.reuse else None
                if r is None:
                    r = run_one(script, config, overrides, seed, run_dir, extra)
                value = float(r["metrics"]["last"][metric])
                results.setdefault(name, {}).setdefault(arm, {})[str(seed)] = round(value, 2)
                key = f"{name}/{arm}/{seed}"
                results["runs"][key] = {
                    "config": f"configs/finetune/{config}", "script": script, "metric": metric,
                    "value": round(value, 2), "steps": r["metrics"]["steps"],
                    "train_time_s": round(r["metrics"].get("train_time_s", float("nan")), 1),
                    "wall_s": round(r["wall_s"], 1), "argv": r["argv"],
                    "omp_num_threads": r.get("omp_num_threads", os.environ.get("OMP_NUM_THREADS")),
                }
                results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
                results["data"] = {"generator": "python -m common.demo_data", "seed": 0,
                                   "settings": QUICK_DATA if args.quick else "default"}
                results["quick"] = args.quick
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
                print(f"{key}: {metric} {value:.2f} ({r['metrics'].get('train_time_s', 0):.0f} s training)",
                      flush=True)
    print(f"results: {out}")
    for name in wanted:
        arms = results.get(name, {})
        print(name + ": " + "; ".join(f"{arm} " + ", ".join(f"seed {s}: {v:.1f}" for s, v in sorted(vals.items()))
                                      for arm, vals in arms.items()))


if __name__ == "__main__":
    main()
