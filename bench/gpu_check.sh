#!/usr/bin/env bash
# Check the GPU-only paths on a CUDA machine (so far only their CPU fallbacks were tested): bf16 mixed precision
# through Accelerate (trainer.mixed_precision), fused CUDA AdamW / SGD (common/optim.py), torch.compile
# (trainer.compile), pinned + non-blocking host->device copies, and the step-time benchmarks on the GPU.
#
#   bash bench/gpu_check.sh                                   # on the GPU machine, from anywhere in the repo
#   GPU_CHECK_ALLOW_CPU=1 PY=.venv/bin/python bash bench/gpu_check.sh   # dry run on a CPU machine (tiny sizes)
#
# Works on a bare machine without network: the packages it lacks (rasterio and its pure-python dependencies) are
# installed from the wheels in .whl/ into $GPU_CHECK_SITE (default /tmp/site); the project is not installed (the
# ssl/ folder is made importable as eo_ssl through a symlink). Everything is written under $GPU_CHECK_DIR (default
# /tmp/gpu_check); with $OUT set, the log goes to $OUT/gpu_check.log and the benchmark JSONs and the runs' metrics
# to $OUT/. Each section is independent (a failure is reported and the next section runs); a time budget
# (GPU_CHECK_BUDGET_S, default 360 s from the start) skips the sections that would start after it, so that the
# whole script stays under about 6.5 minutes. Exit status: 0 when every section passed.
#
# Environment: PY (python, default python3), GPU_CHECK_ALLOW_CPU=1 (no CUDA assertion, tiny step counts),
# GPU_CHECK_DIR, GPU_CHECK_SITE, GPU_CHECK_BUDGET_S, OMP_NUM_THREADS (default 4), GPU_CHECK_SECTIONS (run only these
# sections, e.g. "f_engine_amp g_compile_pretrain"; d_predict needs c_finetune_bf16's run, which uses b_pretrain_bf16's
# export when it exists; e_bench_devaug, the step benchmarks with augmentation on the GPU, runs only when named here).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

if [ -n "${OUT:-}" ] && [ -z "${GPU_CHECK_TEED:-}" ]; then
  mkdir -p "$OUT"
  export GPU_CHECK_TEED=1
  set +e
  bash "$0" "$@" 2>&1 | tee "$OUT/gpu_check.log"
  rc=${PIPESTATUS[0]}
  exit "$rc"
fi

PY=${PY:-python3}
ALLOW_CPU=${GPU_CHECK_ALLOW_CPU:-0}
WORK=${GPU_CHECK_DIR:-/tmp/gpu_check}
SITE=${GPU_CHECK_SITE:-/tmp/site}
BUDGET=${GPU_CHECK_BUDGET_S:-360}
RESULTS=${OUT:-$WORK/out}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
hdr() { echo; echo "=================================================================================================="; echo "== $* [t=$(elapsed) s]"; echo "=================================================================================================="; }

BG_PIDS=()
cleanup() { for p in "${BG_PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

hdr "setup: wheels, import paths, demo data"
mkdir -p "$WORK" "$RESULTS"
if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    echo "installed $(ls .whl/*.whl | wc -l) wheels into $SITE"
  else
    echo "WARNING: installing .whl/*.whl into $SITE failed (wrong Python version for the wheels, or no pip?)"
    if ! "$PY" -c "import rasterio" 2>/dev/null && "$PY" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))"; then
      echo "unpacking the wheels into $SITE instead (python -m zipfile)"
      mkdir -p "$SITE"; for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" "$SITE"; done
    fi
  fi
else
  echo "no .whl/ folder: using the installed packages"
fi
mkdir -p "$WORK/pkgs"
ln -sfn "$REPO/ssl" "$WORK/pkgs/eo_ssl"   # the project's ssl/ folder under its import name (never `ssl` itself)
export PYTHONPATH="$WORK/pkgs:$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
echo "PY=$PY ($("$PY" --version 2>&1)), PYTHONPATH=$PYTHONPATH, OMP_NUM_THREADS=$OMP_NUM_THREADS, budget ${BUDGET} s"
"$PY" -c "import rasterio, affine, accelerate, timm, cv2, scipy, yaml, safetensors, tensorboard, tqdm; print('imports ok: rasterio', rasterio.__version__)" \
  || { echo "FATAL: a required package is missing (see above)"; exit 2; }

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  CUDA=1; REQ=--require-cuda; SMALL=0
elif [ "$ALLOW_CPU" = 1 ]; then
  CUDA=0; REQ=; SMALL=1
  echo "NOTE: no CUDA; GPU_CHECK_ALLOW_CPU=1: CPU dry run with tiny sizes (CUDA assertions skipped)"
else
  echo "FATAL: torch.cuda.is_available() is False (set GPU_CHECK_ALLOW_CPU=1 for a CPU dry run)"; exit 2
fi

DATA=$WORK/data/demo
BIG=$WORK/data/demo_big
RUNS=$WORK/runs
rm -rf "$RUNS"; mkdir -p "$RUNS"
t0=$(date +%s)
"$PY" -m common.demo_data --out "$DATA" --seed 0
echo "demo data: $(( $(date +%s) - t0 )) s"
selected() { [ -z "${GPU_CHECK_SECTIONS:-}" ] || [[ " ${GPU_CHECK_SECTIONS//,/ } " == *" $1 "* ]]; }
# Background data for the later benchmarks (CPU work, overlapped with the GPU sections).
if [ "$SMALL" = 1 ]; then SCENE_SIZE=256; else SCENE_SIZE=2048; fi
SCENE=$WORK/data/scene$SCENE_SIZE
BG_SCENE=; BG_BIG=
if selected e_bench_predict; then
  ( "$PY" -c "import sys, time; sys.path.insert(0, 'bench'); from pathlib import Path; from bench_predict import make_scene; t = time.time(); make_scene(Path('$SCENE'), $SCENE_SIZE); print('scene $SCENE_SIZE px: %.1f s' % (time.time() - t))" \
    > "$WORK/bg_scene.log" 2>&1 ) &
  BG_SCENE=$!; BG_PIDS+=("$BG_SCENE")
fi
if [ "$SMALL" = 0 ] && { selected e_bench_dino_b128 || selected e_bench_devaug; }; then
  ( "$PY" -m common.demo_data --out "$BIG" --seed 0 --tiles 640 --val-tiles 8 --sar-scenes 2 --sar-val-scenes 1 \
    > "$WORK/bg_big.log" 2>&1 ) &
  BG_BIG=$!; BG_PIDS+=("$BG_BIG")
elif [ "$SMALL" = 1 ]; then
  BIG=$DATA
fi

# ------------------------------------------------------------------------------------------------ section runner
NAMES=(); STATUS=(); SECS=()
run_section() {  # run_section NAME TIMEOUT_S FUNCTION: the function runs in a subshell with set -e
  local name=$1 limit=$2 fn=$3 now left rc t
  selected "$name" || return 0
  now=$(elapsed); left=$(( BUDGET - now ))
  hdr "section $name (limit ${limit} s)"
  if [ "$left" -lt 20 ]; then
    echo "SECTION $name SKIPPED (time budget: ${now} s of ${BUDGET} s used)"
    NAMES+=("$name"); STATUS+=("SKIPPED (budget)"); SECS+=(0); return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  export SECTION_LIMIT=$limit
  t=$(date +%s)
  set +e
  ( set -e; "$fn" ) 2>&1 | tee "$WORK/section_$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  t=$(( $(date +%s) - t ))
  NAMES+=("$name"); SECS+=("$t")
  if [ "$rc" = 0 ]; then STATUS+=("OK"); echo "SECTION $name OK (${t} s)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then STATUS+=("FAILED (timeout ${limit} s)"); echo "SECTION $name FAILED: timeout after ${t} s"
  else STATUS+=("FAILED (rc $rc)"); echo "SECTION $name FAILED (rc $rc, ${t} s)"; fi
  return 0
}
T() { timeout -k 10 "$SECTION_LIMIT" "$@"; }   # every command of a section under the section's limit
LAUNCH=("$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
keep() { mkdir -p "$RESULTS/runs/$1"; for f in config.yaml metrics.json metrics.jsonl backbone.json model.json; do
  [ -f "$RUNS/$1/$f" ] && cp "$RUNS/$1/$f" "$RESULTS/runs/$1/" || true; done; }
wait_bg() {  # wait_bg PID LOG (in the main shell: a section's subshell cannot wait for it)
  [ -n "${1:-}" ] || return 0
  if [ "$(elapsed)" -ge $(( BUDGET - 20 )) ]; then kill "$1" 2>/dev/null || true; return 0; fi
  local t=$SECONDS
  if wait "$1"; then echo "background data ready (waited $(( SECONDS - t )) s): $(tail -n 1 "$2")"
  else echo "WARNING: background data generation failed:"; cat "$2" || true; fi
}

# ------------------------------------------------------------------------------------------------ sections
sec_env() {
  T "$PY" bench/gpu_check.py env $REQ
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv || true
}

sec_optim() { T "$PY" bench/gpu_check.py optim $REQ; }

sec_engine() { T "$PY" bench/gpu_check.py engine $REQ; }

sec_dino_amp() {
  if [ "$SMALL" = 1 ]; then T "$PY" bench/gpu_check.py dino-amp $REQ --data "$DATA" --steps 2 --batch-size 8
  else T "$PY" bench/gpu_check.py dino-amp $REQ --data "$DATA" --steps 6 --batch-size 64 --workers 4; fi
}

PRE_TINY=(trainer.epochs=null trainer.max_steps=4 data.batch_size=8 trainer.eval_every=2 trainer.checkpoint_every=2
          trainer.log_every=2 optim.warmup_epochs=0 trainer.num_workers=1 probe.max_train=32)
sec_pretrain() {
  # The demo's own run (configs/pretrain/demo.yaml: 10 epochs, 130 steps of batch 32, k-NN probe every 50 steps)
  # in bf16 on the GPU, with 4 loader workers (pinned memory, non-blocking copies).
  local extra=(trainer.mixed_precision=bf16 trainer.num_workers=4)
  [ "$SMALL" = 1 ] && extra=(trainer.mixed_precision=bf16 "${PRE_TINY[@]}")
  local rc=0
  T "${LAUNCH[@]}" ssl/pretrain.py --config configs/pretrain/demo.yaml --output-dir "$RUNS/pretrain" \
    data.root="$DATA" probe.root="$DATA/s2/source" trainer.progress_bar=false "${extra[@]}" || rc=$?
  keep pretrain
  echo "--- check (the CPU demo gave: loss 8.255 -> 7.740, teacher entropy 2.833 -> 3.943, k-NN 56.2, 52.1, 52.1 %)"
  T "$PY" bench/gpu_check.py check-pretrain "$RUNS/pretrain" --export --expect-precision bf16
  return $rc
}

sec_finetune() {
  # The demo's fine-tuning (configs/finetune/demo.yaml: 300 steps of batch 8, evaluation every 100) from the export.
  local weights="$RUNS/pretrain/backbone.safetensors"
  if [ ! -f "$weights" ]; then echo "NOTE: no export from the pretraining section: random init"; weights=null; fi
  # num_workers 0: 20 labelled tiles are 2 steps per epoch, and non-persistent workers would restart every 2 steps;
  # batches are still pinned and copied with non_blocking on CUDA.
  local extra=(trainer.mixed_precision=bf16 trainer.num_workers=0)
  [ "$SMALL" = 1 ] && extra=(trainer.mixed_precision=bf16 trainer.max_steps=4 trainer.eval_every=2
                             trainer.checkpoint_every=2 trainer.log_every=2 optim.warmup_steps=0)
  local rc=0
  T "${LAUNCH[@]}" finetune/semisup.py --config configs/finetune/demo.yaml --output-dir "$RUNS/finetune" \
    data.root="$DATA/s2/source" model.weights="$weights" trainer.progress_bar=false "${extra[@]}" || rc=$?
  keep finetune
  echo "--- check (the CPU demo gave: validation mIoU last 51.67 (step 300))"
  T "$PY" bench/gpu_check.py check-finetune "$RUNS/finetune" --expect-precision bf16
  return $rc
}

sec_predict() {
  local n=8; [ "$SMALL" = 1 ] && n=3
  rm -rf "$WORK/pred_in"; mkdir -p "$WORK/pred_in"
  for id in $(head -n "$n" "$DATA/s2/source/splits/val.txt"); do ln -s "$DATA/s2/source/images/$id.tif" "$WORK/pred_in/$id.tif"; done
  # 32 px windows: 3 window rows per 64 px tile, so the GPU run reads ahead (pinned raw DN, conversion on the GPU)
  # and the CPU reference reads in turn (--read-ahead 0): the agreement check spans both paths.
  T "$PY" finetune/predict.py --run "$RUNS/finetune" --input "$WORK/pred_in" --output "$RUNS/pred_gpu" --probabilities \
    --window 32 --read-ahead 2
  echo "--- the same tiles on the CPU (reference)"
  T "$PY" finetune/predict.py --run "$RUNS/finetune" --input "$WORK/pred_in" --output "$RUNS/pred_cpu" --cpu \
    --window 32 --read-ahead 0
  T "$PY" bench/gpu_check.py check-predict --inputs "$WORK/pred_in" --pred "$RUNS/pred_gpu" --cpu-pred "$RUNS/pred_cpu"
}

sec_bench_dino() {
  # The CPU benchmark's setting (resnet18, batch 32, 2 x 48 + 4 x 24 px, workers 0: bare step interleaved), fp32
  # (bench_dino_step.py has no precision option: the demo config's mixed_precision is "no").
  if [ "$SMALL" = 1 ]; then
    T "$PY" bench/bench_dino_step.py --data "$DATA" --batch-size 8 --steps 2 --warmup 1 --bare-batches 2 --opt-steps 1 \
      --threads 2 --json "$RESULTS/bench_dino_step_b32.json"
  else
    T "$PY" bench/bench_dino_step.py --data "$DATA" --batch-size 32 --steps 30 --warmup 5 --threads 4 \
      --json "$RESULTS/bench_dino_step_b32.json"
  fi
}

sec_bench_dino_big() {
  # A GPU-sized batch: 128 tiles per step, 8 loader workers (bare step timed in rounds), 1296 tiles (10 steps/epoch).
  if [ "$SMALL" = 1 ]; then
    T "$PY" bench/bench_dino_step.py --data "$BIG" --batch-size 8 --workers 1 --steps 2 --warmup 1 --bare-batches 2 \
      --opt-steps 1 --threads 2 --json "$RESULTS/bench_dino_step_b128.json"
  else
    T "$PY" bench/bench_dino_step.py --data "$BIG" --batch-size 128 --workers 8 --steps 20 --warmup 5 --threads 4 \
      --json "$RESULTS/bench_dino_step_b128.json"
  fi
}

sec_bench_devaug() {
  # Augmentation on the GPU (augment.device: cuda; the loader workers only decode): DINO as e_bench_dino_b128 (batch
  # 128, 8 workers; the worker path gave full / bare 5.86x on the H200), then the segmentation step as e_bench_seg_bf16
  # (batch 32, workers 0; 2.35x there). ~90 s; runs only when named in GPU_CHECK_SECTIONS (not in a full run).
  if [ "$SMALL" = 1 ]; then
    T "$PY" bench/bench_dino_step.py --data "$BIG" --batch-size 8 --workers 1 --steps 2 --warmup 1 --bare-batches 2 \
      --opt-steps 1 --threads 2 --augment-device cuda --json "$RESULTS/bench_dino_step_b128_devaug.json"
  else
    T "$PY" bench/bench_dino_step.py --data "$BIG" --batch-size 128 --workers 8 --steps 20 --warmup 5 --threads 4 \
      --augment-device cuda --json "$RESULTS/bench_dino_step_b128_devaug.json"
  fi
  # shellcheck disable=SC2046
  T "$PY" bench/bench_segmentation.py $(seg_args) --precision bf16 --skip-predict --augment-device cuda \
    --json "$RESULTS/bench_segmentation_bf16_devaug.json"
}

seg_args() {
  if [ "$SMALL" = 1 ]; then
    echo --data "$DATA" --batch-size 4 --steps 2 --warmup 1 --bare-batches 2 --opt-steps 1 --threads 2 \
      --image-size 128 --window 64 --window-batch 2 --predict-reps 1
  else
    echo --data "$DATA" --batch-size 32 --steps 30 --warmup 5 --threads 4 --image-size 2048 --window 512 \
      --window-batch 16 --predict-reps 3
  fi
}
sec_bench_seg() {  # bf16 (precision auto -> bf16 on the GPU), DeepLab v3+ resnet18 OS16, batch 32, 64 px tiles
  # shellcheck disable=SC2046
  T "$PY" bench/bench_segmentation.py $(seg_args) --precision bf16 --json "$RESULTS/bench_segmentation_bf16.json"
}
sec_bench_seg_fp32() {
  # shellcheck disable=SC2046
  T "$PY" bench/bench_segmentation.py $(seg_args) --precision no --skip-predict --json "$RESULTS/bench_segmentation_fp32.json"
}

sec_bench_predict() {  # predict_raster on a 2048 x 2048 x 12 scene, 512 px windows, overlap 0.5, 16 windows/forward
  # read-ahead on and off (same run, interleaved with the network alone; their class maps compared byte for byte)
  if [ "$SMALL" = 1 ]; then
    T "$PY" bench/bench_predict.py --data "$SCENE" --size "$SCENE_SIZE" --window 128 --batch-size 2 --reps 1 \
      --json "$RESULTS/bench_predict.json"
  else
    T "$PY" bench/bench_predict.py --data "$SCENE" --size "$SCENE_SIZE" --batch-size 16 --reps 3 \
      --json "$RESULTS/bench_predict.json"
  fi
}

sec_compile() {
  # DINO pretraining with trainer.compile=true (student and teacher compiled on CUDA) in bf16, 30 steps, no probe.
  local extra=(trainer.epochs=null trainer.max_steps=30 trainer.log_every=5 trainer.num_workers=4)
  [ "$SMALL" = 1 ] && extra=("${PRE_TINY[@]}")
  local rc=0
  T "${LAUNCH[@]}" ssl/pretrain.py --config configs/pretrain/demo.yaml --output-dir "$RUNS/pretrain_compile" \
    data.root="$DATA" probe.root=null trainer.eval_every=null trainer.progress_bar=false trainer.mixed_precision=bf16 \
    trainer.compile=true "${extra[@]}" || rc=$?
  keep pretrain_compile
  echo "--- check (training and export of the compiled run; steps/s includes the compilation in the first logs)"
  T "$PY" bench/gpu_check.py check-pretrain "$RUNS/pretrain_compile" --export --expect-precision bf16 || rc=$?
  return $rc
}

if [ "$SMALL" = 1 ]; then L=1; else L=0; fi
lim() { if [ "$L" = 1 ]; then echo $(( $1 * 3 )); else echo "$1"; fi; }   # the CPU dry run is slower
run_section a_env             "$(lim 60)"  sec_env
run_section f_optim_fused     "$(lim 90)"  sec_optim
run_section f_engine_amp      "$(lim 150)" sec_engine
run_section f_dino_amp        "$(lim 90)"  sec_dino_amp
run_section b_pretrain_bf16   "$(lim 200)" sec_pretrain
run_section c_finetune_bf16   "$(lim 150)" sec_finetune
run_section d_predict         "$(lim 90)"  sec_predict
run_section e_bench_dino      "$(lim 120)" sec_bench_dino
run_section e_bench_seg_bf16  "$(lim 120)" sec_bench_seg
wait_bg "$BG_SCENE" "$WORK/bg_scene.log"
run_section e_bench_predict   "$(lim 120)" sec_bench_predict
run_section g_compile_pretrain "$(lim 150)" sec_compile
wait_bg "$BG_BIG" "$WORK/bg_big.log"
run_section e_bench_dino_b128 "$(lim 120)" sec_bench_dino_big
# only when selected by name (GPU_CHECK_SECTIONS): a full run's sections take its whole budget
if [ -n "${GPU_CHECK_SECTIONS:-}" ]; then run_section e_bench_devaug "$(lim 150)" sec_bench_devaug; fi
run_section e_bench_seg_fp32  "$(lim 90)"  sec_bench_seg_fp32

# ------------------------------------------------------------------------------------------------ summary
hdr "summary"
for name in "${NAMES[@]}"; do
  [ -f "$WORK/section_$name.log" ] || continue
  echo "-- $name"
  grep -E "^(GPU 0|torch |bf16 supported|CHECK |precision=|  (framework|foreach)|  step time|adamw:|sgd:|steps logged|k-NN probe|steps/s|validation mIoU|CUDA vs CPU|NOTE: |  NOTE|  PROBLEMS|setting:|full step \(engine|bare fwd|ratio full|ratio, median|prediction [0-9]|device=|\[wall time|class maps with|activation dtypes|export backbone|metrics.json:|Traceback|[A-Za-z]*Error)" \
    "$WORK/section_$name.log" | sed 's/^/  /' | cut -c1-300 || true
done
echo
fail=0
printf '  %-22s %-26s %s\n' SECTION STATUS SECONDS
for i in "${!NAMES[@]}"; do
  printf '  %-22s %-26s %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"
  [ "${STATUS[$i]}" = OK ] || fail=1
done
echo "total $(elapsed) s; cuda=$CUDA; results in $RESULTS"
cp "$WORK"/section_*.log "$RESULTS/" 2>/dev/null || true
exit $fail
