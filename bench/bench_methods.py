"""Step time and peak memory of every fine-tuning method, as a ratio to its baseline on the same data and batch.

    python bench/bench_methods.py --data data/demo --task semisup      # ratio to supervised
    python bench/bench_methods.py --data data/demo --task uda          # ratio to source_only

Each method runs its entry script (``finetune/semisup.py`` / ``finetune/uda.py``) with the demo config in its own
process for ``--steps`` steps (batch ``data.batch_size`` labelled/source + ``data.unlabelled_batch_size``
unlabelled/target, the same for every method), no evaluation until the end. The step time is the median of the
engine's logged ``train/steps_per_s`` over the log windows after the first (warm-up: first reads, allocator);
the peak memory is the process's maximum resident set (``ru_maxrss``), which includes the data pipeline and the
evaluation at the end. Results: ``bench/results/bench_methods_<task>.json`` and a printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEMISUP = ("supervised", "mean_teacher", "psmt", "ael", "unimatch")
UDA = ("source_only", "adaptsegnet", "advent", "proda", "selftrain")
# What a method needs beyond the shared config (its documented requirements).
EXTRA = {"adaptsegnet": ["model.aux=true"], "advent": ["model.aux=true"],  # multi-level by default
         # time the semi-supervised step, not the demo recipe's supervised warm-up / ramp-ups
         "psmt": ["psmt.warmup_steps=0"], "mean_teacher": ["mean_teacher.rampup_steps=0"],
         "ael": ["ael.rampup_steps=0"]}


def _run(script: str, config: str, out: Path, overrides: list[str], threads: int) -> tuple[float, float]:
    cmd = [sys.executable, str(REPO / script), "--config", config, "--output-dir", str(out), "--overwrite",
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {out.with_suffix('.log')}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/steps_per_s"] for r in rows if "train/steps_per_s" in r][1:]
    if not rates:
        raise RuntimeError(f"{out}: too few log windows; raise --steps")
    return 1.0 / statistics.median(rates), usage.ru_maxrss / 1024.0  # s/step, MiB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("semisup", "uda"), default="semisup")
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--log-every", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    methods = args.methods or list(SEMISUP if args.task == "semisup" else UDA)
    baseline = "supervised" if args.task == "semisup" else "source_only"
    if baseline not in methods:
        methods = [baseline, *methods]
    script = f"finetune/{args.task}.py"
    config = str(REPO / "configs" / "finetune" / ("demo.yaml" if args.task == "semisup" else "demo_uda.yaml"))
    common = [f"data.root={Path(args.data) / 's2' / 'source'}", f"model.arch={args.arch}",
              f"data.batch_size={args.batch_size}", f"data.unlabelled_batch_size={args.batch_size}",
              f"trainer.max_steps={args.steps}", f"trainer.log_every={args.log_every}", "trainer.eval_every=null",
              f"trainer.checkpoint_every={args.steps}", "trainer.progress_bar=false", "eval.num_images=0"]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = None
        for name in methods:
            extra = list(EXTRA.get(name, []))
            if name == "proda":  # stage 1 starts from a warm-up run: the baseline's
                extra.append(f"model.init_from={warm}")
            t, mem = _run(script, config, Path(tmp) / name, [*common, f"method={name}", *extra], args.threads)
            if name == baseline:
                warm = Path(tmp) / name
            results[name] = {"s_per_step": t, "peak_rss_mib": mem}
            print(f"  {name}: {t * 1000:.0f} ms/step, peak RSS {mem:.0f} MiB", flush=True)
    base = results[baseline]
    for r in results.values():
        r["ratio"] = r["s_per_step"] / base["s_per_step"]
        r["memory_ratio"] = r["peak_rss_mib"] / base["peak_rss_mib"]
    out = Path(args.json or REPO / "bench" / "results" / f"bench_methods_{args.task}.json")
    meta = {"task": args.task, "baseline": baseline, "arch": args.arch, "batch_size": args.batch_size,
            "steps": args.steps, "threads": args.threads, "machine": platform.machine(),
            "cpus": os.cpu_count(), "device": "cpu"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "methods": results}, indent=1) + "\n")
    print(f"\n| method | ms / step | ratio to {baseline} | peak RSS (MiB) | memory ratio |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['s_per_step'] * 1000:.0f} | {r['ratio']:.2f}x | {r['peak_rss_mib']:.0f} | "
              f"{r['memory_ratio']:.2f}x |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
