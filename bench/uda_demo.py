"""The domain-adaptation results table of the README: every method on the two demo scenarios (S2 region shift,
S1 region + incidence-angle shift), from the DINO export and from random init, over seeds, beside source-only and the
target-supervised upper bound. Each run is ``finetune/uda.py`` with the scenario's demo config, as a user would run
it.

    python bench/uda_demo.py --data data/demo --export s2=runs/demo/pretrain/backbone.safetensors \
        --seeds 0 1 2 --parallel 2                         # bench/results/uda_demo.json
    python bench/uda_demo.py --quick ...                   # 8 steps, batch 2, tiny backbone: a smoke test

Rows: ``source_only`` (baseline), each method, ``<row>_tstats`` (:data:`TARGET_STATS_ROWS`: the method with
``data.target.stats_file``, the target tiles normalised with the target domain's own statistics, which the script
writes once per scenario with ``python -m common.stats --split`` over the target's training split into
``<runs>/<scenario>/target_stats.json``), ``<row>_jitter`` (:data:`JITTER_ROWS`: the recipe with per-band brightness
jitter of the training tiles, S1 only), ``target_supervised`` (``method=source_only`` trained on the target
domain's labelled tiles: the upper bound; ``target_supervised_jitter`` with the jitter). ``proda`` (its stage 1)
and ``selftrain`` start (``model.init_from``) from the ``source_only`` run of the same init and seed
(:data:`WARM_START`; ``selftrain_jitter`` from ``source_only_jitter``); ``adaptsegnet`` and ``advent`` run with
``model.aux=true`` (their multi-level default). Results: ``{scenario: {method: {"dino"|"random": {seed: mIoU}}}}``,
the target validation mIoU (``target_val/mIoU``, a report: never used for selection) of the last step; the figures
of the checkpoint selected on source validation go to ``uda_demo_best.json``. Finished runs are reused from their
records under ``bench/results/records/`` (committed), so an interrupted table resumes where it stopped, in another
session too. The script prints the README's table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from semisup_demo import _fmt, add_table_arguments, run_all

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
METHODS = ("source_only", "adaptsegnet", "advent", "proda", "selftrain", "source_only_tstats", "selftrain_tstats",
           "adaptsegnet_tstats", "source_only_jitter", "selftrain_jitter")
TARGET_STATS_ROWS = {"source_only_tstats": "source_only", "selftrain_tstats": "selftrain",
                     "adaptsegnet_tstats": "adaptsegnet"}
"""Rows that add per-domain standardisation (``data.target.stats_file``) to a method: source-only (the same training
as ``source_only``; only the target tiles' normalisation differs, no training on them), self-training and
AdaptSegNet."""
JITTER = ["augment.brightness=0.3"]
"""Per-band brightness jitter of every training tile, uniform in +-0.3 band std (``augment.brightness``): the shift of
the S1 band means between the two domains' training tiles, to one decimal, in units of the std the demo normalises
with (``python -m common.stats --compare <source stats> <target stats> data/demo/s1/stats.json``: VV -1.50 dB =
-0.33 std, VH -0.53 dB = -0.12 std), measured on unlabelled tiles only: no target label chose it."""
JITTER_ROWS = {"source_only_jitter": "source_only", "selftrain_jitter": "selftrain"}
"""Rows of the recipe with :data:`JITTER`; their upper bound is ``target_supervised_jitter`` (the same recipe trained
on the target)."""
VARIANT_ROWS = {**TARGET_STATS_ROWS, **JITTER_ROWS}
"""Every row that is a method with an option (row -> method)."""
ROW_SCENARIOS = {"adaptsegnet_tstats": ("s1",), "source_only_jitter": ("s1",), "selftrain_jitter": ("s1",)}
"""Rows made on some scenarios only: per-domain standardisation lowers source-only and self-training on S2 (rows
``*_tstats``, 3 seeds), so AdaptSegNet with it was run on S1, where it helps; the brightness jitter's amplitude is
the S1 domains' backscatter offset (not measured on S2)."""
SCENARIOS = {"s2": ("demo_uda.yaml", "s2"), "s1": ("demo_uda_s1.yaml", "s1")}
SENSORS = {"s2": "S2L2A", "s1": "S1"}
EXTRA = {"adaptsegnet": ["model.aux=true"], "advent": ["model.aux=true"]}  # multi-level by default
WARM_START = ("proda", "selftrain", "selftrain_tstats", "selftrain_jitter")
"""Methods that continue from the source-only run of the same init and seed (``model.init_from``): ProDA by its
recipe; self-training because in a 450-step run from the initial weights its teacher's pseudo-labels stay below the
confidence threshold for most of the run (quality 0.001-0.17 over the first 300 steps) while the mixed and masked
passes slow the source training. Seed 0, random init, target mIoU after 450 steps: source-only 56.5, self-training
from scratch 49.6 (57.6 without rare-class sampling), from the source-only model 64.3; trained on the target 69.1."""
WARM_FROM = {"selftrain_jitter": "source_only_jitter"}
"""The source-only row a warm-started row continues from, where it is not ``source_only`` (the same recipe)."""


def _jobs(args) -> tuple[list[dict], list[dict]]:
    """Two waves: everything that does not depend on another run, then the warm-started methods (they need their
    source-only run)."""
    quick = ["trainer.max_steps=8", "trainer.eval_every=4", "trainer.checkpoint_every=4", "data.batch_size=2",
             "data.unlabelled_batch_size=2", "model.arch=test_resnet"]
    common = ["trainer.progress_bar=false"] + (quick if args.quick else [])
    exports = dict(e.split("=", 1) for e in args.export)
    first, second = [], []
    for scenario in args.scenarios:
        config, sub = SCENARIOS[scenario]
        source = Path(args.data) / sub / "source"
        target = Path(args.data) / sub / "target"
        tstats = [f"data.target.stats_file={target_stats_path(args, scenario)}"]
        inits = {"random": []}
        if scenario in exports:
            inits["dino"] = [f"model.weights={exports[scenario]}"]
        for seed in args.seeds:  # seed-major order: an interrupted table holds every row for its first seeds
            for init, init_over in inits.items():
                def job(name, method, extra, root=source, scenario=scenario, config=config, init=init, seed=seed):
                    out = Path(args.runs) / scenario / f"{name}_{init}_s{seed}"
                    return {"scenario": scenario, "name": name, "init": init, "seed": seed, "out": str(out),
                            "record": f"uda/{scenario}/{out.name}", "quick": args.quick,
                            "config": str(REPO / "configs" / "finetune" / config), "script": "finetune/uda.py",
                            "overrides": [f"data.root={root}", f"method={method}", f"trainer.seed={seed}", *extra,
                                          *common]}

                bases = {"source_only": job("source_only", "source_only", init_over),
                         "source_only_jitter": job("source_only_jitter", "source_only", [*init_over, *JITTER])}
                rows = [m for m in args.methods if scenario in ROW_SCENARIOS.get(m, (scenario,))]
                if not rows:
                    continue  # no row of this scenario asked for: not even its upper bound
                for m in rows:
                    method = VARIANT_ROWS.get(m, m)
                    option = (tstats if m in TARGET_STATS_ROWS else []) + (JITTER if m in JITTER_ROWS else [])
                    if m in WARM_START:
                        base = bases[WARM_FROM.get(m, "source_only")]
                        warm = job(m, method, [f"model.init_from={base['out']}", f"data.target.root={target}",
                                               *EXTRA.get(method, []), *option])
                        second.append({**warm, "init_job": base})  # keyed by the source-only record
                    elif m in bases:
                        first.append(bases[m])
                    else:
                        first.append(job(m, method, [*init_over, *EXTRA.get(method, []), *option]))
                for name in sorted({WARM_FROM.get(m, "source_only") for m in rows if m in WARM_START} - set(rows)):
                    first.append(bases[name])  # a warm-started row alone brings its source-only run
                first.append(job("target_supervised", "source_only", [*init_over, f"data.target.root={target}"],
                                 root=target))
                if any(m in JITTER_ROWS for m in rows):
                    first.append(job("target_supervised_jitter", "source_only",
                                     [*init_over, f"data.target.root={target}", *JITTER], root=target))
    return first, second


def target_stats_path(args, scenario: str) -> Path:
    """Where the scenario's target statistics live (written by :func:`write_target_stats`)."""
    return Path(args.runs) / scenario / "target_stats.json"


def write_target_stats(args, scenario: str) -> Path:
    """The target domain's band statistics over its training split (``python -m common.stats --split``), as a user
    would write them for ``data.target.stats_file``; made once per runs directory."""
    out = target_stats_path(args, scenario)
    if not out.is_file():
        target = Path(args.data) / SCENARIOS[scenario][1] / "target"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "common.stats", "--root", str(target / "images"), "--glob", "*.tif",
               "--split", str(target / "splits" / "train_all.txt"), "--sensor", SENSORS[scenario], "--out", str(out)]
        subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--export", nargs="*", default=[], metavar="SCENARIO=PATH",
                    help="DINO export per scenario for the 'dino' rows (s2=..., s1=...)")
    ap.add_argument("--scenarios", nargs="+", choices=tuple(SCENARIOS), default=list(SCENARIOS))
    add_table_arguments(ap, METHODS, "runs/bench_uda", "bench/results/uda_demo.json")
    args = ap.parse_args(argv)
    for e in args.export:
        if "=" not in e or e.split("=", 1)[0] not in SCENARIOS:
            ap.error(f"--export takes SCENARIO=PATH with SCENARIO in {list(SCENARIOS)}, got {e!r}")
    if any(m in TARGET_STATS_ROWS for m in args.methods):
        for scenario in args.scenarios:
            write_target_stats(args, scenario)
    first, second = _jobs(args)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    print(f"{len(first) + len(second)} runs, {args.parallel} at a time, {threads} thread(s) each", flush=True)
    done, failed = run_all(first, args.parallel, threads, args.recorded_only)
    more, failed_too = run_all(second, args.parallel, threads, args.recorded_only)
    done, failed = done + more, failed + failed_too

    table: dict = {}
    best: dict = {}
    for r in done:
        on_target = r["name"].startswith("target_supervised")  # trained and validated on the target: its validation
        last = r["last"]["mIoU"] if on_target else r["last"].get("target_val/mIoU", r["last"].get("mIoU"))
        table.setdefault(r["scenario"], {}).setdefault(r["name"], {}).setdefault(r["init"], {})[str(r["seed"])] = last
        sel = r["best"]
        best.setdefault(r["scenario"], {}).setdefault(r["name"], {}).setdefault(r["init"], {})[str(r["seed"])] = {
            "step": sel.get("step"), "selection": r.get("selection"),
            "target_val/mIoU": sel["mIoU"] if on_target else sel.get("target_val/mIoU"),
            "source_val/mIoU": None if on_target else sel.get("mIoU")}
    if not args.quick:
        out = Path(args.out or RESULTS / "uda_demo.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=1) + "\n")
        out.with_name(out.stem + "_best.json").write_text(json.dumps(best, indent=1) + "\n")
        print(f"wrote {out} and {out.with_name(out.stem + '_best.json')}")

    for scenario, rows in table.items():
        inits = sorted({i for row in rows.values() for i in row}, key=lambda i: i != "dino")
        print(f"\n{scenario}: target mIoU (last step)\n| method | " + " | ".join(inits) + " |")
        print("|---" * (1 + len(inits)) + "|")
        order = [*METHODS, *[m for m in rows if m not in METHODS and m != "target_supervised"],
                 "target_supervised"]  # the methods' order (variant rows included), then other rows, the bound last
        for name in [n for n in order if n in rows]:
            print(f"| {name} | " + " | ".join(_fmt(list(rows[name].get(i, {}).values())) for i in inits) + " |")
    if failed:
        print(f"\n{len(failed)} run(s) failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
