#!/usr/bin/env bash
# The whole pipeline on the built-in demo data, on the CPU:
#   demo data -> DINO pretraining (+ export) -> supervised DeepLab fine-tuning from the export at 1/8 of the labels
#   -> the best semi-supervised method on the same labels (+ the unlabelled tiles) -> GeoTIFF prediction
# "Best": the highest mean over seeds in the README's semi-supervised table (bench/semisup_demo.py); SEMISUP_METHOD
# overrides it.
# Usage: bash scripts/demo.sh [DATA_DIR=data/demo] [RUNS_DIR=runs/demo]      (make demo runs exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/demo}
RUNS=${2:-runs/demo}
PY=${PYTHON:-.venv/bin/python}
SEMISUP_METHOD=${SEMISUP_METHOD:-unimatch}
LAUNCH=("$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no
        --dynamo_backend no)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start )) s] $*"; }

stamp "1/6 demo data in $DATA"
"$PY" -m common.demo_data --out "$DATA" --seed 0

# a fresh run each time (the demo's own output folders only)
rm -rf "$RUNS/pretrain" "$RUNS/finetune" "$RUNS/semisup" "$RUNS/predictions"
mkdir -p "$RUNS"

stamp "2/6 DINO pretraining -> $RUNS/pretrain (exports the teacher backbone at the end)"
"${LAUNCH[@]}" ssl/pretrain.py --config configs/pretrain/demo.yaml --output-dir "$RUNS/pretrain" \
    data.root="$DATA" probe.root="$DATA/s2/source" trainer.progress_bar=false

stamp "3/6 export (the CLI; the run already wrote $RUNS/pretrain/backbone.safetensors)"
"$PY" ssl/export.py --run "$RUNS/pretrain" --out "$RUNS/backbone.safetensors"

stamp "4/6 supervised DeepLab v3+ fine-tuning on 1/8 of the labels from the export -> $RUNS/finetune"
"${LAUNCH[@]}" finetune/semisup.py --config configs/finetune/demo.yaml --output-dir "$RUNS/finetune" \
    data.root="$DATA/s2/source" model.weights="$RUNS/backbone.safetensors" trainer.progress_bar=false

stamp "5/6 semi-supervised $SEMISUP_METHOD on the same labels plus the unlabelled tiles -> $RUNS/semisup"
"${LAUNCH[@]}" finetune/semisup.py --config configs/finetune/demo.yaml --output-dir "$RUNS/semisup" \
    data.root="$DATA/s2/source" model.weights="$RUNS/backbone.safetensors" method="$SEMISUP_METHOD" \
    trainer.progress_bar=false

stamp "6/6 prediction GeoTIFFs of the validation tiles -> $RUNS/predictions"
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
PYEOF
stamp "done: runs in $RUNS (TensorBoard: .venv/bin/tensorboard --logdir $RUNS)"
