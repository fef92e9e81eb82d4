"""The semi-supervised results table of the README: every method on the demo data at 1/8 of the labels, from the DINO
export and from random init, over seeds, beside supervised at 1/8 and on all labels; and the SAR building task
(supervised vs AEL). Each run is ``finetune/semisup.py`` with the demo config, as a user would run it.

    python bench/semisup_demo.py --data data/demo --pretrain runs/tables/pretrain \
        --seeds 0 1 2 --parallel 2                      # S2 land cover: bench/results/semisup_demo.json
    (--pretrain DIR makes the DINO export once, 2 threads; --export FILE takes an existing one instead)
    python bench/semisup_demo.py --suite sar --data data/demo --seeds 0 1 2    # bench/results/semisup_sar.json
    python bench/semisup_demo.py --quick ...            # 8 steps, batch 2, tiny backbone: a smoke test of the script

Results: ``{method: {"dino"|"random": {seed: mIoU}}}`` (methods named as in ``method=``; ``supervised_all`` is
supervised on all labelled tiles), the mIoU of the last step on the validation split; the best-on-validation figures
go to ``*_best.json`` beside it (SAR: building F1 and mIoU). Finished runs are reused from their records under
``bench/results/records/`` (committed), so an interrupted table resumes where it stopped, in another session too. The
script prints the README's table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
METHODS = ("supervised", "unimatch", "ael", "mean_teacher", "psmt")


def _record_path(job: dict) -> Path:
    """Where a finished run's final metrics are kept under ``bench/results/records/`` (committed with the tables)."""
    return RESULTS / "records" / f"{job['record']}.json"


def config_digest(text: str, method: str | None = None) -> str:
    """SHA-256 of a YAML config's content: the parsed mapping as sorted JSON, so that editing a comment or the layout
    of a config does not invalidate the runs recorded from it, while any changed value does. With ``method``, the
    sections of the *other* methods (``psmt:`` for a ``method=unimatch`` run) are left out: the run never reads them,
    so tuning one method's section keeps the other methods' records."""
    content = yaml.safe_load(text)
    if method is not None and isinstance(content, dict):
        content = {k: v for k, v in content.items() if k == method or k not in _method_names()}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _method_names() -> set[str]:
    from finetune.methods import REGISTRY

    return {name for name, _ in REGISTRY.items()}


def _job_method(job: dict) -> str | None:
    methods = [o.split("=", 1)[1] for o in job["overrides"] if o.startswith("method=")]
    return methods[-1] if methods else None


def weights_digest(path: Path) -> str:
    """SHA-256 of a safetensors file's content: its header with sorted keys, then its tensor bytes. The file's own
    SHA-256 is not reproducible: safetensors writes the metadata entries in a per-process random order (a hash map),
    so the same weights saved twice differ in the header's byte order."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8:8 + n])
    except (ValueError, UnicodeDecodeError):  # not a safetensors file: its bytes
        return hashlib.sha256(raw).hexdigest()
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    digest.update(raw[8 + n:])
    return digest.hexdigest()


def _record_key(job: dict) -> dict:
    """What makes a run the same run: the config's content (its values, less other methods' sections:
    :func:`config_digest`), the overrides other than paths, and the content of the weights it starts from (an
    export, or the model of an ``init_from`` run: :func:`weights_digest`)."""
    paths = ("data.root=", "data.target.root=", "model.weights=", "model.init_from=")
    content = config_digest(Path(job["config"]).read_text(), _job_method(job))
    key = {"config": Path(job["config"]).name, "config_content_sha256": content,
           "overrides": [o for o in job["overrides"] if not o.startswith(paths)]}
    for o in job["overrides"]:
        if o.startswith("model.weights="):
            key["weights_sha256"] = weights_digest(Path(o.split("=", 1)[1]))
        elif o.startswith("model.init_from=") and "init_job" not in job:
            key["init_from_sha256"] = weights_digest(Path(o.split("=", 1)[1]) / "checkpoints" / "best.safetensors")
    if "init_job" in job:  # started from a table run: that run's record identifies it (its files may be gone)
        key["init_from_record_sha256"] = _sha256_file(_record_path(job["init_job"]))
    return key


def _sha256_file(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _run_script(job: dict, threads: int, force: bool = False) -> dict:
    """Run ``job["script"]`` (default ``finetune/semisup.py``) unless it already finished; its final metrics.

    A finished run is one whose record (``bench/results/records/<record>.json``: the run's ``metrics.json`` and what
    made it, :func:`_record_key`) exists with the same key; a record is written after every run, so a table
    interrupted in one session resumes in the next from the committed records. A record made from another config
    content, other overrides or other starting weights is not reused: the run is made again."""
    out = Path(job["out"])
    metrics = out / "metrics.json"
    record = _record_path(job)
    init = job.get("init_job")
    if init is not None and not _has_record(job) and not (Path(init["out"]) / "checkpoints"
                                                          / "best.safetensors").is_file():
        # the run this one starts from was recorded (in another session) but its weights are gone: make it again,
        # which renews its record, so that this run's record names the run it really started from
        _run_script(init, threads, force=True)
    cmd = [sys.executable, str(REPO / job.get("script", "finetune/semisup.py")), "--config", job["config"],
           "--output-dir", str(out), "--overwrite", *job["overrides"]]
    args = _record_key(job)
    if not force and record.is_file() and json.loads(record.read_text()).get("args") == args:
        final = json.loads(record.read_text())["metrics"]
    else:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        res = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
        print(f"  {job['record']}: {time.perf_counter() - t0:.0f} s", flush=True)
        final = json.loads(metrics.read_text())
        if not job.get("quick"):
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"args": args, "threads": threads, "metrics": final}, indent=1) + "\n")
    return {**job, "last": final["last"], "best": final["best"], "time_s": final.get("train_time_s"),
            "selection": final.get("selection")}


def add_table_arguments(ap: argparse.ArgumentParser, methods: tuple[str, ...], runs: str, out: str) -> None:
    """The options every results-table script shares."""
    ap.add_argument("--methods", nargs="+", default=list(methods))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", default=runs, help="run directories (scratch; the records are the results)")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time (each gets cores / parallel threads)")
    ap.add_argument("--threads", type=int, default=None, help="threads per run (default: cores / parallel)")
    ap.add_argument("--quick", action="store_true", help="8 steps per run (smoke test); results not written")
    ap.add_argument("--recorded-only", action="store_true",
                    help="run nothing: write and print the table of the runs recorded so far")
    ap.add_argument("--out", default=None, help=f"results JSON (default {out})")


def ensure_export(config: str, out: Path, data: str, probe_root: str, threads: int = 2,
                  overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """The DINO export of ``config`` (+ ``overrides``) pretrained on ``data`` into ``out`` (made once, with ``threads``
    threads, one process: the same command gives the same weights on this machine, so the records of the 'dino'
    rows, keyed by the export's SHA-256, are reused in a later session). An interrupted pretraining run is resumed.
    Returns ``out/backbone.safetensors``."""
    export = Path(out) / "backbone.safetensors"
    if not export.is_file():
        resume = ["--resume"] if any(Path(out).glob("checkpoints/step_*")) else ["--overwrite"]
        cmd = [sys.executable, str(REPO / "ssl" / "pretrain.py"), "--config", str(REPO / config), "--output-dir",
               str(out), *resume, f"data.root={data}", f"probe.root={probe_root}", "trainer.progress_bar=false",
               *overrides]
        print(f"pretraining the export: {' '.join(cmd)}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        res = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"pretraining failed:\n{res.stderr[-3000:]}")
    print(f"export {export}: content sha256 {weights_digest(export)}", flush=True)
    return export


def run_all(jobs: list[dict], parallel: int, threads: int, recorded_only: bool = False) -> tuple[list[dict], list[str]]:
    """Every job, ``parallel`` at a time; a failed run is reported (its stderr tail) and the others go on.
    ``recorded_only``: run nothing, take the runs that have a matching record (the table so far)."""

    def one(job: dict) -> dict | None:
        if recorded_only and not _has_record(job):
            return None
        try:
            return _run_script(job, threads)
        except RuntimeError as exc:
            print(f"  FAILED {job['out']}: {exc}", flush=True)
            return None

    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(one, jobs))
    missing = [j["out"] for j, r in zip(jobs, results) if r is None]
    if recorded_only:
        print(f"{len(jobs) - len(missing)} of {len(jobs)} runs recorded; the table holds those")
        missing = []
    return [r for r in results if r is not None], missing


def _has_record(job: dict) -> bool:
    record = _record_path(job)
    try:
        return record.is_file() and json.loads(record.read_text()).get("args") == _record_key(job)
    except FileNotFoundError:  # the starting weights of the key do not exist (yet)
        return False


def _jobs(args) -> list[dict]:
    jobs = []
    quick = ["trainer.max_steps=8", "trainer.eval_every=4", "data.batch_size=2", "data.unlabelled_batch_size=2",
             "model.arch=test_resnet", "trainer.checkpoint_every=4", "psmt.warmup_steps=2",
             "mean_teacher.rampup_steps=2", "ael.rampup_steps=2"]
    common = ["trainer.progress_bar=false"] + (quick if args.quick else [])
    if args.suite == "semisup":
        config = str(REPO / "configs" / "finetune" / "demo.yaml")
        root = Path(args.data) / "s2" / "source"
        inits = {"random": []}
        if args.export:
            inits["dino"] = [f"model.weights={args.export}"]
        # the baselines first, then the methods (an interrupted table has its reference rows)
        rows = [(m, m, []) for m in args.methods if m == "supervised"]
        rows.append(("supervised_all", "supervised", ["data.labelled_split=train_all"]))
        rows += [(m, m, []) for m in args.methods if m != "supervised"]
    else:
        config = str(REPO / "configs" / "finetune" / "demo_sar.yaml")
        root = Path(args.data) / "sar"
        inits = {"random": []}
        rows = [(m, m, ["data.labelled_split=labelled_1_8", "data.unlabelled_split=unlabelled_1_8"])
                for m in ("supervised", "ael")]
        rows.append(("supervised_all", "supervised", ["data.labelled_split=train_all"]))
    # seed-major order: an interrupted table already holds every row for its first seeds
    for seed in args.seeds:
        for init, init_over in inits.items():
            for name, method, extra in rows:
                out = Path(args.runs) / args.suite / f"{name}_{init}_s{seed}"
                jobs.append({"name": name, "init": init, "seed": seed, "out": str(out), "config": config,
                             "record": f"{args.suite}/{out.name}", "quick": args.quick,
                             "overrides": [f"data.root={root}", f"method={method}", f"trainer.seed={seed}",
                                           *init_over, *extra, *common]})
    return jobs


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=("semisup", "sar"), default="semisup")
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--export", default=None, help="DINO export (backbone.safetensors) for the 'dino' rows")
    ap.add_argument("--pretrain", default=None, metavar="DIR",
                    help="make the 'dino' rows' export with configs/pretrain/demo.yaml in DIR (once; 2 threads)")
    add_table_arguments(ap, METHODS, "runs/bench_semisup", "bench/results/semisup_<suite>.json")
    args = ap.parse_args(argv)
    if args.pretrain and not args.quick:
        args.export = str(ensure_export("configs/pretrain/demo.yaml", Path(args.pretrain), args.data,
                                        str(Path(args.data) / "s2" / "source")))
    jobs = _jobs(args)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    print(f"{len(jobs)} runs, {args.parallel} at a time, {threads} thread(s) each", flush=True)
    done, failed = run_all(jobs, args.parallel, threads, args.recorded_only)

    key = "mIoU"
    table: dict = {}
    best: dict = {}
    for r in done:
        table.setdefault(r["name"], {}).setdefault(r["init"], {})[str(r["seed"])] = r["last"][key]
        entry = {"step": r["best"]["step"], key: r["best"][key]}
        if args.suite == "sar":
            entry["building_f1"] = r["best"].get("building_f1")
            table[r["name"]][r["init"]][str(r["seed"])] = r["last"][key]
            best.setdefault(r["name"], {}).setdefault(r["init"], {})[str(r["seed"])] = {
                **entry, "last_building_f1": r["last"].get("building_f1"), "last_IoU/building": r["last"].get(
                    "IoU/building")}
        else:
            best.setdefault(r["name"], {}).setdefault(r["init"], {})[str(r["seed"])] = entry
    if not args.quick:
        out = Path(args.out or RESULTS / ("semisup_demo.json" if args.suite == "semisup" else "semisup_sar.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=1) + "\n")
        out.with_name(out.stem + "_best.json").write_text(json.dumps(best, indent=1) + "\n")
        print(f"wrote {out} and {out.with_name(out.stem + '_best.json')}")

    inits = sorted({r["init"] for r in done}, key=lambda i: i != "dino")
    print("\n| method | " + " | ".join(f"{i} last" for i in inits) + " | " + " | ".join(f"{i} best" for i in inits)
          + " |")
    print("|---" * (1 + 2 * len(inits)) + "|")
    for name in dict.fromkeys(r["name"] for r in done):
        lasts = [_fmt(list(table[name].get(i, {}).values())) for i in inits]
        bests = [_fmt([v[key] for v in best[name].get(i, {}).values()]) for i in inits]
        print(f"| {name} | " + " | ".join(lasts) + " | " + " | ".join(bests) + " |")
    if failed:
        print(f"\n{len(failed)} run(s) failed: {failed}")
    if args.suite == "sar":
        print("\n| method | building F1 (last) | IoU building (last) |\n|---|---|---|")
        for name in best:
            f1 = [v["last_building_f1"] for v in best[name]["random"].values() if v["last_building_f1"] is not None]
            iou = [v["last_IoU/building"] for v in best[name]["random"].values() if v["last_IoU/building"] is not None]
            print(f"| {name} | {_fmt(f1)} | {_fmt(iou)} |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
