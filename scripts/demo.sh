#!/usr/bin/env bash
# The whole pipeline on the built-in demo data, on the CPU:
#   demo data -> DINO pretraining (+ export) -> supervised DeepLab fine-tuning from the export at 1/8 of the labels
#   -> the best semi-supervised method on the same labels (+ the unlabelled tiles) -> domain adaptation of the S2
#   source region to the target region (source-only, then the best adaptation method) -> GeoTIFF prediction
# "Best": the highest mean over seeds in the README's results tables (bench/semisup_demo.py, bench/uda_demo.py);
# SEMISUP_METHOD / UDA_METHOD override them.
# Usage: bash scripts/demo.sh [DATA_DIR=data/demo] [RUNS_DIR=runs/demo]      (make demo runs exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/demo}
RUNS=${2:-runs/demo}
PY=${PYTHON:-.venv/bin/python}
SEMISUP_METHOD=${SEMISUP_METHOD:-unimatch}
UDA_METHOD=${UDA_METHOD:-selftrain}
LAUNCH=("$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no
        --dynamo_backend no)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start )) s] $*"; }

stamp "1/8 demo data in $DATA"
"$PY" -m common.demo_data --out "$DATA" --seed 0

# a fresh run each time (the demo's own output folders only)
rm -rf "$RUNS/pretrain" "$RUNS/finetune" "$RUNS/semisup" "$RUNS/source_only" "$RUNS/adapted" "$RUNS/predictions"
mkdir -p "$RUNS"

stamp "2/8 DINO pretraining -> $RUNS/pretrain (exports the teacher backbone at the end)"
"${LAUNCH[@]}" ssl/pretrain.py --config configs/pretrain/demo.yaml --output-dir "$RUNS/pretrain" \
    data.root="$DATA" probe.root="$DATA/s2/source" trainer.progress_bar=false

stamp "3/8 export (the CLI; the run already wrote $RUNS/pretrain/backbone.safetensors)"
"$PY" ssl/export.py --run "$RUNS/pretrain" --out "$RUNS/backbone.safetensors"

stamp "4/8 supervised DeepLab v3+ fine-tuning on 1/8 of the labels from the export -> $RUNS/finetune"
"${LAUNCH[@]}" finetune/semisup.py --config configs/finetune/demo.yaml --output-dir "$RUNS/finetune" \
    data.root="$DATA/s2/source" model.weights="$RUNS/backbone.safetensors" trainer.progress_bar=false

stamp "5/8 semi-supervised $SEMISUP_METHOD on the same labels plus the unlabelled tiles -> $RUNS/semisup"
"${LAUNCH[@]}" finetune/semisup.py --config configs/finetune/demo.yaml --output-dir "$RUNS/semisup" \
    data.root="$DATA/s2/source" model.weights="$RUNS/backbone.safetensors" method="$SEMISUP_METHOD" \
    trainer.progress_bar=false

stamp "6/8 domain adaptation baseline: source-only on the labelled source region -> $RUNS/source_only"
"${LAUNCH[@]}" finetune/uda.py --config configs/finetune/demo_uda.yaml --output-dir "$RUNS/source_only" \
    data.root="$DATA/s2/source" model.weights="$RUNS/backbone.safetensors" trainer.progress_bar=false

stamp "7/8 domain adaptation: $UDA_METHOD to the unlabelled target region -> $RUNS/adapted"
if [ "$UDA_METHOD" = proda ]; then init=(model.init_from="$RUNS/source_only"); else
  init=(model.weights="$RUNS/backbone.safetensors"); fi
case "$UDA_METHOD" in adaptsegnet|advent) init+=(model.aux=true) ;; esac  # multi-level by default
"${LAUNCH[@]}" finetune/uda.py --config configs/finetune/demo_uda.yaml --output-dir "$RUNS/adapted" \
    data.root="$DATA/s2/source" method="$UDA_METHOD" "${init[@]}" trainer.progress_bar=false

stamp "8/8 prediction GeoTIFFs of the validation tiles -> $RUNS/predictions"
first_val=$(head -n 4 "$DATA/s2/source/splits/val.txt")
inputs=()
for id in $first_val; do inputs+=("$DATA/s2/source/images/$id.tif"); done
mkdir -p "$RUNS/predictions"
for f in "${inputs[@]}"; do
  "$PY" finetune/predict.py --run "$RUNS/finetune" --input "$f" --output "$RUNS/predictions"
done

"$PY" - "$RUNS" <<'PYEOF'
import json, sys
runs = sys.argv[1]
pre = [json.loads(l) for l in open(f"{runs}/pretrain/metrics.jsonl")]
train = [r for r in pre if "train/loss" in r]
knn = [r["val/knn_top1"] for r in pre if "val/knn_top1" in r]
ft = json.load(open(f"{runs}/finetune/metrics.json"))
print(f"pretraining: loss {train[0]['train/loss']:.3f} -> {train[-1]['train/loss']:.3f}, teacher entropy "
      f"{train[0]['train/teacher_entropy']:.3f} -> {train[-1]['train/teacher_entropy']:.3f} (ln K = "
      f"{train[0]['train/log_k']:.3f}), k-NN probe {', '.join(f'{v:.1f}' for v in knn)} %")
print(f"fine-tuning: validation mIoU last {ft['last']['mIoU']:.2f} (step {ft['last']['step']}), "
      f"best {ft['best']['mIoU']:.2f} (step {ft['best']['step']})")
semi = json.load(open(f"{runs}/semisup/metrics.json"))
print(f"semi-supervised, 1/8 of the labels: supervised {ft['last']['mIoU']:.2f} -> {semi['method']} "
      f"{semi['last']['mIoU']:.2f} validation mIoU (last step)")
src = json.load(open(f"{runs}/source_only/metrics.json"))
ada = json.load(open(f"{runs}/adapted/metrics.json"))
print(f"domain adaptation, target-region mIoU (a report, never used for selection): source-only "
      f"{src['last']['target_val/mIoU']:.2f} -> {ada['method']} {ada['last']['target_val/mIoU']:.2f} (last step)")
PYEOF
stamp "done: runs in $RUNS (TensorBoard: .venv/bin/tensorboard --logdir $RUNS)"
