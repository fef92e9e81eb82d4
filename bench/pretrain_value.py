"""Is DINO pretraining worth it on the demo data? The README's pretraining-value table: the DINO export against random
init, in a linear probe and after fine-tuning, at 1/32, 1/8 and all of the labels, over seeds.

    python bench/pretrain_value.py --data data/demo --pretrain runs/tables/pretrain_long --seeds 0 1 2 --parallel 2
        # pretrains with configs/pretrain/demo_long.yaml into DIR once (2 threads), then every evaluation run
    python bench/pretrain_value.py --export FILE --variant NAME ...          # evaluate an existing export
    python bench/pretrain_value.py --pretrain DIR --pretrain-override augment.channel_p=[0,0,0] --variant nochannel
        # an ablation of the pretraining recipe: bench/results/pretrain_value_nochannel.json
    python bench/pretrain_value.py --pretrain DIR --pretrain-data data/demo_pool --variant pool \
        --pretrain-override data.stats_file=$PWD/data/demo/s2/stats.json   # a larger unlabelled pool
    python bench/pretrain_value.py --pretrain DIR --variant stem --pretrain-override model.stem_pool=false \
        --eval-override model.stem_pool=false      # a variant whose evaluation changes for both rows (own random rows)
    python bench/pretrain_value.py --ablations    # every variant so far side by side: pretrain_value_ablations.json
    python bench/pretrain_value.py --quick --data /tmp/demo --seeds 0       # smoke test: a few steps per run
        # (demo data of at least 64 training tiles per domain: 1/32 of them must fill a batch of 2)

Evaluation runs are ``finetune/semisup.py`` with ``configs/finetune/demo.yaml`` (the semi-supervised table's
supervised recipe), on the source domain of the demo S2 data, labelled splits ``labelled_1_32`` (5 tiles),
``labelled_1_8`` (20) and ``train_all`` (160), validation mIoU of the last step (1/32: batches of 4 tiles instead of
16, :data:`FRACTION_OVERRIDES`):

* **linear probe** (``linear_probe``): DeepLab v2 head (four atrous 3x3 convolutions summed: linear in the
  features) on the *frozen* backbone (its BatchNorm statistics fixed too), :data:`LINEAR_PROBE` overrides;
* **fine-tuning** (``finetune``): DeepLab v3+ end to end, the recipe as shipped; ``--finetune-override`` adds
  overrides to the 'dino' fine-tuning runs only (e.g. ``model.backbone_lr_mult=0.1``, a lower backbone learning rate
  for pretrained weights) and names the variant.

Results: ``bench/results/pretrain_value.json`` (``pretrain_value_<variant>.json`` for ``--variant``):
``{"finetune"|"linear_probe": {"dino"|"random": {"1/32"|"1/8"|"all": {seed: mIoU}}}, "pretraining": {...}}`` where
``pretraining`` holds the pretraining run's config, overrides, wall time and curves (loss, teacher entropy,
teacher-student KL, k-NN top-1) when this script made or was given the run. Finished runs are reused from their
records under ``bench/results/records/pretrain_value/`` (keyed by config content, overrides and the export's
content; the random-init rows are shared by every variant), so an interrupted table resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from semisup_demo import REPO, RESULTS, _fmt, add_table_arguments, ensure_export, run_all, weights_digest

TASKS = ("linear_probe", "finetune")
FRACTIONS = {"1/32": "labelled_1_32", "1/8": "labelled_1_8", "all": "train_all"}
FRACTION_OVERRIDES = {"1/32": ["data.batch_size=4"]}
"""1/32 of the labels is 5 demo tiles: batches of 4 (incomplete batches are dropped; the recipe's 16 needs 16 tiles)."""
LINEAR_PROBE = ["model.version=v2", "model.freeze_backbone=true", "trainer.max_steps=300", "optim.lr=0.01"]
"""The linear probe: a linear head on frozen features, 300 steps at a higher learning rate (only the head learns)."""
QUICK = ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.checkpoint_every=4", "data.batch_size=2",
         "optim.warmup_steps=0"]
"""``--quick``: overrides appended to every evaluation run (after the task's own)."""
QUICK_PRETRAIN = ["trainer.max_steps=4", "data.batch_size=8", "optim.warmup_steps=0", "trainer.log_every=2",
                  "trainer.eval_every=null", "trainer.checkpoint_every=4", "probe.max_train=32"]
"""``--quick``: overrides appended to the pretraining run."""
CURVE_KEYS = {"train/loss": "loss", "train/teacher_entropy": "teacher_entropy",
              "train/teacher_student_kl": "teacher_student_kl", "val/knn_top1": "knn_top1"}


def _jobs(args, export: Path | None) -> list[dict]:
    config = str(REPO / "configs" / "finetune" / "demo.yaml")
    root = Path(args.data) / "s2" / "source"
    common = ["trainer.progress_bar=false"] + (QUICK if args.quick else [])
    inits = {"random": []}
    if export is not None:
        inits["dino"] = [f"model.weights={export}"]
    jobs = []
    for seed in args.seeds:  # seed-major: an interrupted table holds every row for its first seeds
        for task in args.methods:
            for frac, split in FRACTIONS.items():
                if frac not in args.fractions:
                    continue
                for init, init_over in inits.items():
                    task_over = LINEAR_PROBE if task == "linear_probe" else []
                    extra = list(args.finetune_override) if (task == "finetune" and init == "dino") else []
                    extra += args.eval_override  # both inits: the architecture both rows fine-tune
                    name = f"{task}_{split}_{init}_s{seed}"
                    # the random rows do not depend on the variant (one record for all of them) unless the variant
                    # changes the evaluation of both rows (--eval-override): then they are the variant's own
                    shared = "random" if not args.eval_override else f"random_{args.variant}"
                    group = args.variant if init == "dino" else shared
                    record = f"pretrain_value/{group}/{name}"
                    jobs.append({"name": task, "fraction": frac, "init": init, "seed": seed, "config": config,
                                 "out": str(Path(args.runs) / group / name),
                                 "record": record, "quick": args.quick,
                                 "overrides": [f"data.root={root}", "method=supervised", f"trainer.seed={seed}",
                                               f"data.labelled_split={split}", *FRACTION_OVERRIDES.get(frac, []),
                                               *task_over, *init_over, *extra, *common]})
    return jobs


def pretraining_summary(run: Path | None, config: str | None, overrides: list[str], data: str | None = None) -> dict:
    """The pretraining run's settings (``data``: the data root it pretrained on), wall time and curves (every logged
    step; k-NN where evaluated)."""
    if run is None or not (run / "metrics.jsonl").is_file():
        return {"run": str(run) if run else None, "curves": None}
    curves: dict[str, list] = {v: [] for v in CURVE_KEYS.values()}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, name in CURVE_KEYS.items():
            if key in row:
                curves[name].append([row["step"], row[key]])
    final = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    return {"run": str(run), "config": config, "data": data, "overrides": overrides, "steps": final.get("steps"),
            "train_time_s": final.get("train_time_s"), "log_k": _first(run, "train/log_k"), "curves": curves}


def _first(run: Path, key: str):
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            return row[key]
    return None


def _mean(values) -> float | None:
    values = list(values)
    return statistics.mean(values) if values else None


def ablation_summary(results: Path = RESULTS) -> dict:
    """Every variant's results JSON (``pretrain_value[_<variant>].json``) side by side: what the variant changed, its
    pretraining budget and last k-NN, and per task and label fraction the DINO and random means and their difference
    paired by seed (the seeds both have). Written to ``pretrain_value_ablations.json`` by ``--ablations``."""
    rows = {}
    for path in sorted(results.glob("pretrain_value*.json")):
        if path.name == "pretrain_value_ablations.json":
            continue
        table = json.loads(path.read_text())
        variant = table.get("variant", {})
        pre = table.get("pretraining") or {}
        knn = ((pre.get("curves") or {}).get("knn_top1") or [[None, None]])[-1][1]
        entry = {"file": path.name, "pretraining_data": pre.get("data"), "pretraining_run": pre.get("run"),
                 "pretraining_overrides": pre.get("overrides"), "finetune_overrides": variant.get("finetune_overrides"),
                 "eval_overrides": variant.get("eval_overrides") or [],
                 "steps": pre.get("steps"), "pretraining_minutes": (round(pre["train_time_s"] / 60, 1)
                                                                     if pre.get("train_time_s") else None),
                 "knn_top1_last": knn, "tasks": {}}
        for task in TASKS:
            dino, rand = table.get(task, {}).get("dino", {}), table.get(task, {}).get("random", {})
            for frac in FRACTIONS:
                d, r = dino.get(frac, {}), rand.get(frac, {})
                seeds = sorted(set(d) & set(r))
                if seeds:
                    entry["tasks"].setdefault(task, {})[frac] = {
                        "dino": _mean(d[k] for k in seeds), "random": _mean(r[k] for k in seeds),
                        "gain": _mean(d[k] - r[k] for k in seeds), "seeds": seeds}
        rows[variant.get("name", path.stem)] = entry
    return rows


def print_ablations(rows: dict) -> None:
    cols = [(t, f) for t in TASKS for f in FRACTIONS if any(f in r["tasks"].get(t, {}) for r in rows.values())]
    print("| variant | pretraining | steps | min | k-NN | " + " | ".join(f"{t} {f}: DINO (gain)" for t, f in cols)
          + " |\n" + "|---" * (5 + len(cols)) + "|")
    for name, r in rows.items():
        parts = []
        if r["pretraining_data"]:
            parts.append(f"data {r['pretraining_data']}")
        elif not r["pretraining_overrides"] and r["pretraining_run"]:  # an --export: the run it came from
            parts.append(f"export of {r['pretraining_run']}")
        parts += [*(r["pretraining_overrides"] or []), *(f"FT {o}" for o in r["finetune_overrides"] or []),
                  *(f"eval {o}" for o in r.get("eval_overrides") or [])]
        what = " ".join(parts)
        cells = []
        for t, f in cols:
            c = r["tasks"].get(t, {}).get(f)
            cells.append(f"{c['dino']:.2f} ({c['gain']:+.2f})" if c else "-")
        knn = f"{r['knn_top1_last']:.1f}" if r["knn_top1_last"] is not None else "-"
        n = max((len(c["seeds"]) for t in r["tasks"].values() for c in t.values()), default=0)
        label = f"{name} ({n} seeds)" if n > 1 else name
        print(f"| {label} | {what or 'as configured'} | {r['steps'] or '-'} | {r['pretraining_minutes'] or '-'} | "
              f"{knn} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--pretrain", default=None, metavar="DIR",
                    help="pretrain with --pretrain-config into DIR (once; 2 threads) and evaluate its export")
    ap.add_argument("--pretrain-config", default="configs/pretrain/demo_long.yaml")
    ap.add_argument("--pretrain-override", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of the pretraining run (an ablation: give --variant too)")
    ap.add_argument("--pretrain-threads", type=int, default=2, help="threads of the pretraining run (2)")
    ap.add_argument("--pretrain-data", default=None,
                    help="data root of the pretraining run (default --data), e.g. a demo dataset with a --pool-tiles "
                         "pool; evaluation stays on --data (give --pretrain-override data.stats_file=<--data's "
                         "s2/stats.json> so that the export's normalisation is the evaluation data's)")
    ap.add_argument("--export", default=None, help="evaluate this export instead of pretraining")
    ap.add_argument("--variant", default="default", help="name of the pretraining/evaluation variant (records, JSON)")
    ap.add_argument("--finetune-override", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of the 'dino' fine-tuning runs (e.g. model.backbone_lr_mult=0.1)")
    ap.add_argument("--eval-override", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of every evaluation run, DINO and random alike (e.g. model.stem_pool=false with "
                         "a --pretrain-override model.stem_pool=false export: random init gets the same stem); the "
                         "random rows are then the variant's own")
    ap.add_argument("--no-dino", action="store_true", help="the random-init rows only (no export needed)")
    ap.add_argument("--fractions", nargs="+", default=list(FRACTIONS), choices=list(FRACTIONS),
                    help="label fractions to run (a screening of a variant: --fractions 1/8 --seeds 0)")
    add_table_arguments(ap, TASKS, "runs/bench_pretrain_value", "bench/results/pretrain_value[_<variant>].json")
    ap.add_argument("--ablations", action="store_true",
                    help="run nothing: print every variant's results side by side and write "
                         "bench/results/pretrain_value_ablations.json")
    args = ap.parse_args(argv)
    if args.ablations:  # a summary of the variants run so far: nothing runs
        rows = ablation_summary()
        out = RESULTS / "pretrain_value_ablations.json"
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print_ablations(rows)
        print(f"wrote {out}")
        return 0
    if (args.pretrain_override or args.finetune_override or args.eval_override) and args.variant == "default":
        ap.error("--pretrain-override / --finetune-override / --eval-override make another variant: name it with "
                 "--variant")
    if not args.no_dino and not args.quick and (args.pretrain is None) == (args.export is None):
        ap.error("give one of --pretrain DIR and --export FILE (or --no-dino)")
    if args.quick:
        args.runs = str(Path(args.runs) / "quick")

    export, pre_run = None, None
    if args.quick and not args.no_dino:
        pre_run = Path(args.runs) / "pretrain"
        export = ensure_export(args.pretrain_config, pre_run, args.data, str(Path(args.data) / "s2" / "source"),
                               overrides=[*args.pretrain_override, *QUICK_PRETRAIN])
    elif args.pretrain:
        pre_run = Path(args.pretrain)
        export = ensure_export(args.pretrain_config, pre_run, args.pretrain_data or args.data,
                               str(Path(args.data) / "s2" / "source"), threads=args.pretrain_threads,
                               overrides=args.pretrain_override)
    elif args.export:
        export = Path(args.export)
        print(f"export {export}: content sha256 {weights_digest(export)}", flush=True)
        candidate = export.parent
        pre_run = candidate if (candidate / "metrics.jsonl").is_file() else None

    jobs = _jobs(args, export)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    print(f"{len(jobs)} runs, {args.parallel} at a time, {threads} thread(s) each", flush=True)
    done, failed = run_all(jobs, args.parallel, threads, args.recorded_only)

    table: dict = {}
    for r in done:
        table.setdefault(r["name"], {}).setdefault(r["init"], {}).setdefault(r["fraction"], {})[str(r["seed"])] = \
            r["last"]["mIoU"]
    table["pretraining"] = pretraining_summary(pre_run, args.pretrain_config if args.pretrain else None,
                                               list(args.pretrain_override),
                                               (args.pretrain_data or args.data) if args.pretrain else None)
    table["variant"] = {"name": args.variant, "finetune_overrides": list(args.finetune_override),
                        "eval_overrides": list(args.eval_override),
                        "export_sha256": weights_digest(export) if export is not None and export.is_file() else None}
    if not args.quick:
        default = RESULTS / ("pretrain_value.json" if args.variant == "default"
                             else f"pretrain_value_{args.variant}.json")
        out = Path(args.out or default)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {out}")

    print(f"\nvariant {args.variant}: validation mIoU (last step), mean ± std over seeds\n"
          f"| task | init | " + " | ".join(FRACTIONS) + " |\n" + "|---" * (2 + len(FRACTIONS)) + "|")
    for task in TASKS:
        for init in ("dino", "random"):
            row = table.get(task, {}).get(init)
            if row:
                print(f"| {task} | {init} | " + " | ".join(_fmt(list(row.get(f, {}).values())) for f in FRACTIONS)
                      + " |")
    for task in TASKS:
        rows = table.get(task, {})
        if "dino" in rows and "random" in rows:
            gains = []
            for f in FRACTIONS:
                d, r = rows["dino"].get(f, {}), rows["random"].get(f, {})
                seeds = sorted(set(d) & set(r))
                if seeds:
                    gains.append(f"{f} {statistics.mean(d[s] - r[s] for s in seeds):+.2f}")
            print(f"{task}: DINO - random (paired by seed): " + ", ".join(gains))
    if failed:
        print(f"\n{len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
