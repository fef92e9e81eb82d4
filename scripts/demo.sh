#!/usr/bin/env bash
# The whole pipeline on the built-in demo data, on the CPU:
#   demo data -> DINO pretraining (+ export) -> from the export, side by side on one core each:
#     lane A: the best semi-supervised method on 1/8 of the labels + the unlabelled tiles
#     lane B: supervised DeepLab on the same 1/8 of the labels -> GeoTIFF prediction -> domain adaptation
#             (source-only on the labelled source region, then the best adaptation method on the unlabelled
#             target region, started from it as in the README's table; adaptsegnet / advent start from the export)
# "Best": the highest mean over seeds in the README's tables (bench/semisup_demo.py, bench/uda_demo.py);
# SEMISUP_METHOD / UDA_METHOD override them.
# Demo schedules (to fit 15 minutes on 2 cores): semi-supervised and supervised 600 steps (the README's table: 900),
# adaptation 300 + 300 steps (the table: 450 + 450). DEMO_QUICK=1 cuts every run to a few steps (tests/test_demo.py).
# Usage: bash scripts/demo.sh [DATA_DIR=data/demo] [RUNS_DIR=runs/demo]      (make demo runs exactly this)
set -euo pipefail
if (( BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1) )); then
  echo "error: scripts/demo.sh needs bash >= 5.1 (it waits for two parallel lanes with wait -n -p); this is bash" \
       "$BASH_VERSION: install a newer bash (e.g. brew install bash on macOS) and run it with that" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
DATA=${1:-data/demo}
RUNS=${2:-runs/demo}
PY=${PYTHON:-.venv/bin/python}
SEMISUP_METHOD=${SEMISUP_METHOD:-unimatch}
UDA_METHOD=${UDA_METHOD:-selftrain}
case "$UDA_METHOD" in
  adaptsegnet|advent|proda|selftrain) ;;
  *) echo "error: UDA_METHOD=$UDA_METHOD: the demo's adaptation stage runs one of adaptsegnet, advent, proda," \
          "selftrain (source_only always runs before it); set UDA_METHOD to one of those" >&2
     exit 2 ;;
esac
LAUNCH=("$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no
        --dynamo_backend no)
SEMISUP_STEPS=(trainer.max_steps=600)
UDA_STEPS=(trainer.max_steps=300)
PRETRAIN_EXTRA=()
DATA_EXTRA=()
if [[ "${DEMO_QUICK:-0}" == 1 ]]; then  # a smoke run of the script itself: every stage, a few steps each
  PRETRAIN_EXTRA=(trainer.epochs=null trainer.max_steps=4 data.batch_size=8 optim.warmup_steps=0 trainer.eval_every=null
                  trainer.checkpoint_every=4 probe.max_train=32)
  SEMISUP_STEPS=(trainer.max_steps=4 trainer.eval_every=2 trainer.checkpoint_every=4 data.batch_size=4
                 data.unlabelled_batch_size=2 optim.warmup_steps=0)
  UDA_STEPS=("${SEMISUP_STEPS[@]}")
  DATA_EXTRA=(--tiles 32 --val-tiles 8 --sar-scenes 2 --sar-val-scenes 1)
fi
DEMO_T0=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - DEMO_T0 )) s] $*"; }
# run_logged LOG CMD...: the command's output goes to LOG; on failure its last lines are shown and its exit status
# returned. `accelerate launch` reports a failed script with its own traceback and status 1: that traceback is left
# out and the script's status (2 for bad input, after its one-line message) is returned instead.
run_logged() {
  local log=$1 rc=0 tb script_rc; shift
  "$@" >"$log" 2>&1 || rc=$?
  (( rc )) || return 0
  tb=$(grep -n '^Traceback (most recent call last):' "$log" | tail -n 1 | cut -d: -f1 || true)
  script_rc=$(tail -n 1 "$log" | grep -o 'CalledProcessError.*non-zero exit status [0-9]*' | grep -o '[0-9]*$' || true)
  if [[ -n "$tb" && -n "$script_rc" ]]; then
    rc=$script_rc
    echo "---- failed (exit $rc): $* (last lines of $log) ----" >&2
    head -n $(( tb - 1 )) "$log" | tail -n 30 >&2
  else
    echo "---- failed (exit $rc): $* (last lines of $log) ----" >&2
    tail -n 30 "$log" >&2
  fi
  return "$rc"
}

stamp "1/7 demo data in $DATA"
"$PY" -m common.demo_data --out "$DATA" --seed 0 "${DATA_EXTRA[@]}"

# a fresh run each time (the demo's own output folders only)
rm -rf "$RUNS/pretrain" "$RUNS/finetune" "$RUNS/semisup" "$RUNS/predictions" "$RUNS/uda_source_only" \
       "$RUNS/uda_$UDA_METHOD"
mkdir -p "$RUNS"

stamp "2/7 DINO pretraining -> $RUNS/pretrain (exports the teacher backbone at the end)"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} run_logged "$RUNS/pretrain.log" "${LAUNCH[@]}" ssl/pretrain.py \
    --config configs/pretrain/demo.yaml --output-dir "$RUNS/pretrain" data.root="$DATA" probe.root="$DATA/s2/source" \
    trainer.progress_bar=false "${PRETRAIN_EXTRA[@]}"

stamp "3/7 export (the CLI; the run already wrote $RUNS/pretrain/backbone.safetensors)"
run_logged "$RUNS/export.log" "$PY" ssl/export.py --run "$RUNS/pretrain" --out "$RUNS/backbone.safetensors"

# The two lanes are independent runs from the export: one thread each (on 2 cores this is ~1.2x the throughput of
# running them one after the other with two threads). Each run logs to RUNS/<run>.log (and TensorBoard), the
# pretraining and the export too.
export OMP_NUM_THREADS=1
SRC="$DATA/s2/source"
W="model.weights=$RUNS/backbone.safetensors"

lane_a() {
  stamp "4/7 [lane A] semi-supervised $SEMISUP_METHOD, 1/8 of the labels + the unlabelled tiles -> $RUNS/semisup"
  run_logged "$RUNS/semisup.log" "${LAUNCH[@]}" finetune/semisup.py --config configs/finetune/demo.yaml \
      --output-dir "$RUNS/semisup" data.root="$SRC" "$W" method="$SEMISUP_METHOD" trainer.progress_bar=false \
      "${SEMISUP_STEPS[@]}"
  stamp "    [lane A] $SEMISUP_METHOD done"
}

lane_b() {
  stamp "5/7 [lane B] supervised DeepLab v3+ on the same 1/8 of the labels -> $RUNS/finetune"
  run_logged "$RUNS/finetune.log" "${LAUNCH[@]}" finetune/semisup.py --config configs/finetune/demo.yaml \
      --output-dir "$RUNS/finetune" data.root="$SRC" "$W" trainer.progress_bar=false "${SEMISUP_STEPS[@]}"
  stamp "    [lane B] prediction GeoTIFFs of 4 validation tiles -> $RUNS/predictions"
  mkdir -p "$RUNS/predictions"
  for id in $(head -n 4 "$SRC/splits/val.txt"); do
    run_logged "$RUNS/predict.log" "$PY" finetune/predict.py --run "$RUNS/finetune" --input "$SRC/images/$id.tif" \
        --output "$RUNS/predictions"
  done
  stamp "6/7 [lane B] domain adaptation, S2 source region -> target region: source-only -> $RUNS/uda_source_only"
  run_logged "$RUNS/uda_source_only.log" "${LAUNCH[@]}" finetune/uda.py --config configs/finetune/demo_uda.yaml \
      --output-dir "$RUNS/uda_source_only" data.root="$SRC" "$W" trainer.progress_bar=false "${UDA_STEPS[@]}"
  # the table's protocol (bench/uda_demo.py): ProDA and self-training continue from the source-only model, the
  # adversarial methods train from the export with their auxiliary head (multi-level)
  local uda_init=(model.init_from="$RUNS/uda_source_only") from="from the source-only model"
  case "$UDA_METHOD" in
    adaptsegnet|advent) uda_init=("$W" model.aux=true); from="from the export" ;;
  esac
  stamp "7/7 [lane B] $UDA_METHOD $from on the unlabelled target tiles -> $RUNS/uda_$UDA_METHOD"
  run_logged "$RUNS/uda_$UDA_METHOD.log" "${LAUNCH[@]}" finetune/uda.py --config configs/finetune/demo_uda.yaml \
      --output-dir "$RUNS/uda_$UDA_METHOD" data.root="$SRC" method="$UDA_METHOD" "${uda_init[@]}" \
      trainer.progress_bar=false "${UDA_STEPS[@]}"
  stamp "    [lane B] $UDA_METHOD done"
}

# kill_tree PID: the process and everything it started (a failed lane stops the other one)
kill_tree() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$child"; done
  kill "$1" 2>/dev/null || true
}
lane_a & pid_a=$!
lane_b & pid_b=$!
pending=("$pid_a" "$pid_b")
while (( ${#pending[@]} )); do  # the first lane to fail stops the other (wait -n -p: bash >= 5.1)
  rc=0
  wait -n -p finished "${pending[@]}" || rc=$?
  if (( rc )); then
    kill_tree "$pid_a"; kill_tree "$pid_b"; wait 2>/dev/null || true
    echo "demo: a stage failed (see above)" >&2
    exit "$rc"
  fi
  left=()
  for p in "${pending[@]}"; do [[ "$p" != "$finished" ]] && left+=("$p"); done
  pending=("${left[@]}")
done

"$PY" - "$RUNS" "$UDA_METHOD" <<'PYEOF'
import json, sys
runs, uda_method = sys.argv[1:3]
pre = [json.loads(l) for l in open(f"{runs}/pretrain/metrics.jsonl")]
train = [r for r in pre if "train/loss" in r]
knn = [r["val/knn_top1"] for r in pre if "val/knn_top1" in r]
ft = json.load(open(f"{runs}/finetune/metrics.json"))
semi = json.load(open(f"{runs}/semisup/metrics.json"))
so = json.load(open(f"{runs}/uda_source_only/metrics.json"))
ad = json.load(open(f"{runs}/uda_{uda_method}/metrics.json"))
print(f"pretraining: loss {train[0]['train/loss']:.3f} -> {train[-1]['train/loss']:.3f}, teacher entropy "
      f"{train[0]['train/teacher_entropy']:.3f} -> {train[-1]['train/teacher_entropy']:.3f} (ln K = "
      f"{train[0]['train/log_k']:.3f}), k-NN probe {', '.join(f'{v:.1f}' for v in knn)} %")
print(f"fine-tuning: validation mIoU last {ft['last']['mIoU']:.2f} (step {ft['last']['step']}), "
      f"best {ft['best']['mIoU']:.2f} (step {ft['best']['step']})")
print(f"semi-supervised, 1/8 of the labels: supervised {ft['last']['mIoU']:.2f} -> {semi['method']} "
      f"{semi['last']['mIoU']:.2f} validation mIoU (last step)")
print(f"domain adaptation, target-region validation mIoU (a report: no target label was used): source-only "
      f"{so['last']['target_val/mIoU']:.2f} -> {ad['method']} {ad['last']['target_val/mIoU']:.2f} (last step)")
PYEOF
stamp "done: runs in $RUNS (TensorBoard: .venv/bin/tensorboard --logdir $RUNS)"
