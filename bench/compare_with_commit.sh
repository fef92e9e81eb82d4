#!/usr/bin/env bash
# Train the same short DINO pretraining and supervised fine-tuning with this checkout and with an older commit, and
# compare the final weights tensor for tensor: a refactoring of the engine or a method must leave them bit-identical.
# The runs hold the schedules constant (lr without warm-up, weight decay, teacher momentum), so changes to schedule
# formulas between the two commits do not enter; everything else (data order, augmentation, multi-crop, loss,
# center, clipping, last-layer freeze, evaluation, checkpoints) does.
#
#   bash bench/compare_with_commit.sh REV DEMO_DATA_DIR      (e.g. REV=50ca879, the last commit before the platform)
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:?usage: bench/compare_with_commit.sh REV DEMO_DATA_DIR}
DATA=${2:?usage: bench/compare_with_commit.sh REV DEMO_DATA_DIR}
PY=${PYTHON:-$PWD/.venv/bin/python}
WORK=$(mktemp -d)
trap 'git worktree remove --force "$WORK/old" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
git worktree add -q "$WORK/old" "$REV"
mkdir -p "$WORK/path" && ln -s "$WORK/old/ssl" "$WORK/path/eo_ssl"   # the old ssl/ under its import name
cp "$WORK/old/configs/finetune/demo.yaml" "$WORK/finetune.yaml"           # one config file for both commits
cp "$WORK/old/configs/pretrain/demo.yaml" "$WORK/pretrain.yaml"
STATS="$DATA/s2/stats.json"
PRE=(data.root="$DATA" probe.root="$DATA/s2/source" data.stats_file="$STATS" model.arch=resnet10t data.batch_size=8
     trainer.epochs=null trainer.max_steps=9 trainer.log_every=1 trainer.checkpoint_every=3 trainer.eval_every=3
     trainer.progress_bar=false optim.schedule=constant optim.warmup_epochs=0 optim.weight_decay_end=null
     dino.momentum_teacher=1.0 dino.freeze_last_layer=1 dino.out_dim=64 dino.hidden_dim=32 dino.bottleneck_dim=16
     augment.global_size=32 augment.local_size=16)
FT=(data.root="$DATA/s2/source" data.stats_file="$STATS" data.labelled_split=train_all model.arch=resnet10t
    data.batch_size=4 trainer.max_steps=8 trainer.log_every=2 trainer.eval_every=4 trainer.checkpoint_every=4
    trainer.progress_bar=false optim.schedule=constant optim.warmup_steps=0)
run() {  # run NAME ROOT PYTHONPATH
  (cd "$2" && OMP_NUM_THREADS=1 PYTHONPATH="$3" "$PY" ssl/pretrain.py --config "$WORK/pretrain.yaml" \
      --output-dir "$WORK/$1_pre" "${PRE[@]}" > "$WORK/$1_pre.log" 2>&1)
  (cd "$2" && OMP_NUM_THREADS=1 PYTHONPATH="$3" "$PY" finetune/semisup.py --config "$WORK/finetune.yaml" \
      --output-dir "$WORK/$1_ft" "${FT[@]}" > "$WORK/$1_ft.log" 2>&1)
}
run old "$WORK/old" "$WORK/path:$WORK/old"
run new "$PWD" ""
"$PY" - "$WORK" "$REV" <<'PYEOF'
import json, sys
import torch
from safetensors.torch import load_file
work, rev = sys.argv[1:]
ok = True
for stage in ("pre", "ft"):
    a = load_file(f"{work}/old_{stage}/checkpoints/last.safetensors")
    b = load_file(f"{work}/new_{stage}/checkpoints/last.safetensors")
    differ = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
    ok &= a.keys() == b.keys() and not differ
    name = {"pre": "DINO pretraining, 9 steps", "ft": "supervised fine-tuning, 8 steps"}[stage]
    print(f"{name}: {len(a)} tensors, {len(differ)} differ from {rev}"
          + ("" if a.keys() == b.keys() else f", key sets differ: {sorted(set(a) ^ set(b))[:5]}"))
print("bit-identical" if ok else "DIFFERENT")
sys.exit(0 if ok else 1)
PYEOF
