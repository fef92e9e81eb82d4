"""Is DINO pretraining worth it on the demo data? Export vs random init, 3 seeds, on a texture-dependent task.

    python bench/pretrain_value.py [--pretrain-run runs/pretrain_long] [--out runs/pretrain_value]
                                   [--seeds 0 1 2] [--parallel 2]
    python bench/pretrain_value.py --quick --data /tmp/demo --seeds 0 --tasks finetune_1_8   # smoke test, ~2 min

1. (unless ``--pretrain-run`` is given) DINO-pretrains resnet18 with ``configs/pretrain/demo_long.yaml`` on the
   demo S2 tiles of both domains, validation tiles left out (about one CPU hour on one core), and exports it;
2. for each seed and each initialisation (the export, random):
   * **linear probe**: DeepLab v2 head (four atrous 3x3 convolutions summed: linear in the features) on the
     *frozen* backbone, trained on all source training labels;
   * **low-label fine-tuning**: DeepLab v3+ trained end to end on 1/8 of the labels (20 tiles);
   * **all-label fine-tuning**: the same on all 160 labelled tiles;
3. prints mean +- std over seeds of validation mIoU and of IoU on cropland and grassland, the two classes that
   differ by texture (row stripes vs mottled grass) rather than by spectrum, and writes ``results.json``.

Every run is a normal ``finetune/semisup.py`` run (its run directory is kept under ``--out``), so any figure can be
inspected in TensorBoard. Runs are launched as separate processes, ``--parallel`` at a time, one thread each.

``--quick`` checks that the whole pipeline runs (pretraining, export, every fine-tuning, the table): every run is cut
to a few steps of tiny batches (:data:`QUICK_PRETRAIN`, :data:`QUICK_FINETUNE`), so its figures mean nothing;
it writes under ``runs/pretrain_value_quick`` unless ``--out`` says otherwise and ``results.json`` records
``"quick": true``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
LAUNCH = [PY, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]

TASKS = {
    # name: (overrides)
    "linear_probe_all": ["model.version=v2", "model.freeze_backbone=true", "data.labelled_split=train_all",
                         "trainer.max_steps=300", "optim.lr=0.01"],
    "finetune_1_8": ["data.labelled_split=labelled_1_8", "trainer.max_steps=300"],
    "finetune_all": ["data.labelled_split=train_all", "trainer.max_steps=300"],
}
KEYS = ("mIoU", "IoU/cropland", "IoU/grassland")

QUICK_PRETRAIN = ["trainer.max_steps=4", "data.batch_size=8", "optim.warmup_steps=0", "trainer.log_every=2",
                  "trainer.eval_every=null", "trainer.checkpoint_every=4", "probe.max_train=32"]
"""``--quick``: overrides appended to the pretraining run (4 steps of batch 8, the k-NN probe once at the end)."""
QUICK_FINETUNE = ["trainer.max_steps=4", "data.batch_size=2", "optim.warmup_steps=0", "trainer.log_every=2",
                  "trainer.checkpoint_every=4"]
"""``--quick``: overrides appended to every fine-tuning run (4 steps of batch 2, fitting the 1/8 split of even a
small demo dataset; evaluation once at the end)."""


def run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    with open(log, "w") as f:
        res = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--pretrain-run", default=None, help="reuse a finished pretraining run (skip step 1)")
    ap.add_argument("--checkpoint", default="last", choices=("last", "latest"),
                    help="which weights of the pretraining run to export")
    ap.add_argument("--out", default=None,
                    help="output directory (default: runs/pretrain_value, with --quick runs/pretrain_value_quick)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--inits", nargs="+", default=["dino", "random"], choices=["dino", "random"],
                    help="initialisations to run (random alone needs no pretraining run)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: every run cut to a few steps (meaningless figures; see the module docstring)")
    args = ap.parse_args()
    out = Path(args.out or ("runs/pretrain_value_quick" if args.quick else "runs/pretrain_value"))
    quick_pre, quick_ft = (QUICK_PRETRAIN, QUICK_FINETUNE) if args.quick else ([], [])
    if args.quick:
        print(f"QUICK MODE: every run is a few steps long; the figures below mean nothing (-> {out})", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    if not (data / "dataset.json").is_file():
        subprocess.run([PY, "-m", "common.demo_data", "--out", str(data), "--seed", "0"], cwd=REPO, check=True)

    t0 = time.time()
    export = out / "dino_backbone.safetensors"
    meta: dict = {"source": {"step": None}}
    if "dino" in args.inits:
        if args.pretrain_run is None:
            pre = out / "pretrain"
            print(f"pretraining -> {pre} (configs/pretrain/demo_long.yaml)", flush=True)
            run([*LAUNCH, "ssl/pretrain.py", "--config", "configs/pretrain/demo_long.yaml", "--output-dir",
                 str(pre), f"data.root={data}", "trainer.progress_bar=false", *quick_pre], out / "pretrain.log")
        else:
            pre = Path(args.pretrain_run)
        subprocess.run([PY, "ssl/export.py", "--run", str(pre), "--out", str(export), "--checkpoint",
                        args.checkpoint], cwd=REPO, check=True)
        meta = json.loads(export.with_suffix(".json").read_text())
        print(f"export of step {meta['source']['step']} ({time.time() - t0:.0f} s)", flush=True)
    else:
        pre = None

    jobs = []
    for task in args.tasks:
        for init in args.inits:
            for seed in args.seeds:
                run_dir = out / f"{task}_{init}_s{seed}"
                cmd = [*LAUNCH, "finetune/semisup.py", "--config", "configs/finetune/demo.yaml", "--output-dir",
                       str(run_dir), f"data.root={data / 's2' / 'source'}", f"trainer.seed={seed}",
                       "trainer.progress_bar=false", "trainer.eval_every=100", *TASKS[task], *quick_ft]
                if init == "dino":
                    cmd.append(f"model.weights={export}")
                jobs.append((task, init, seed, run_dir, cmd))

    def go(job):
        task, init, seed, run_dir, cmd = job
        if not (run_dir / "metrics.json").is_file():
            run(cmd, run_dir.with_suffix(".log"))
        final = json.loads((run_dir / "metrics.json").read_text())
        print(f"{task:18s} {init:6s} seed {seed}: mIoU last {final['last']['mIoU']:.2f}", flush=True)
        return task, init, seed, final["last"]

    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(go, jobs))

    table: dict = {}
    for task, init, seed, last in results:
        table.setdefault(task, {}).setdefault(init, []).append({k: last.get(k, float("nan")) for k in KEYS})
    summary = {"pretrain_run": str(pre) if pre else None, "export_step": meta["source"]["step"], "seeds": args.seeds,
               "quick": args.quick, "wall_s": time.time() - t0, "runs": table, "mean_std": {}}
    print(f"\n{'task':18s} {'init':7s} " + " ".join(f"{k:>16s}" for k in KEYS))
    for task, by_init in table.items():
        for init, rows in by_init.items():
            stats = {k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))) for k in KEYS}
            summary["mean_std"].setdefault(task, {})[init] = stats
            print(f"{task:18s} {init:7s} " + " ".join(f"{m:8.2f} +- {s:4.2f}" for m, s in stats.values()))
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out / 'results.json'} ({summary['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
