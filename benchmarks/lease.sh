#!/usr/bin/env bash
# One GPU lease (issue 22): every GPU measurement the project needs, in one device call of at most 8 minutes, each
# result copied to $OUT the moment it exists, so that a call cut short still returns what it measured. A second,
# shorter call runs whatever the first did not finish (stages recorded ok are skipped). Plan and rehearsal:
# benchmarks/LEASE.md.
#
#   bash benchmarks/run_on_gpu.sh lease                         # on the device machine (= bash benchmarks/lease.sh)
#   LEASE_DEVICE=cpu PY=/tmp/lease-venv/bin/python WHEELHOUSE=/tmp/lease-wheels-cpu311 bash benchmarks/lease.sh   # rehearsal
#
# stage     cap  starts if  runs                                               writes to $OUT (besides lease.log, live)
# env        30s    5s left  versions, nvidia-smi, bf16 8192^3 matmul rate       lease.json: env
# install    60s   20s       carried wheels -> the machine's own python3,        lease.json: install plan, imports,
#                            --no-deps, offline; only missing/other versions       pip check
# prep       90s   30s       tiny tokenizer (make_demo_assets.py), random-init   lease.json: prep (row lengths,
#                            Qwen2.5-3B (bf16, built on the GPU), 1,000 xLAM-      BFCL sample)
#                            schema rows, every 8th BFCL single-turn prompt
# train     180s  120s       accelerate launch fsdp_full.yaml (1 process)        train_summary.json; lease.json: tokens/s,
#                            train_sft.py recipes/xlam.yaml, 8 steps; then the     MFU, peak vs estimate_memory.py, checks
#                            saved checkpoint is loaded and generates            (loss falls, bf16 on fp32 masters, loads)
# bench     180s   60s       bench_fsdp.py rows, 3 warm-up + 6 measured steps:   bench_runs.json after every row;
#                            trl_defaults, padding-free flex at the largest        lease.json: bench plan
#                            batch that fits (no checkpointing), liger,
#                            checkpointed padding-free at the largest batch
#                            tried, xlam_recipe (a row cut by the cap is
#                            finished by the next call: --resume)
# eval       90s   50s       eval_bfcl.py on the random-init 3B: 458 of the      eval_generation.json; lease.json:
#                            3,641 prompts, 128 new tokens, batch 64             prompts/s, time for all 3,641
# test-gpu  270s  150s       make test-gpu PY=python3                            test_gpu.log (as it runs); lease.json
# A stage starts only if the call has its "starts if" seconds left, and runs at most min(cap, time left); a stage
# recorded ok (here, or in runs/lease-in/lease.json carried from an earlier call) is skipped. LEASE_BUDGET (default
# 450 s) is the call's own deadline: give the device call timeout_s = LEASE_BUDGET + 30. Expected on an H200 (not yet
# measured): env 10 + install 20 + prep 30 + train 110 + bench 180 + eval 60 = ~410 s in the first call; test-gpu
# (and any row the cap cut) in a second call of ~4 minutes: LEASE_STAGES="env install test-gpu prep eval bench train".
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
export PY=${PY:-python3}
export LEASE_DEVICE=${LEASE_DEVICE:-gpu}
export LEASE_STATE=${LEASE_STATE:-runs/lease}
export LEASE_OUT=${OUT:-${LEASE_OUT:-runs/lease-out}}
export LEASE_IN=${LEASE_IN:-runs/lease-in}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if [ "$LEASE_DEVICE" = cpu ]; then  # the rehearsal: the tiny model, CPU configs, smaller samples, 4x the caps
  export MODEL=${LEASE_MODEL:-tiny} ACCEL_CONFIG=accelerate_configs/cpu_fsdp_full.yaml
  export TRAIN_DEVICE_ARGS="--bf16 false --dtype float32" EVAL_EVERY=${LEASE_EVAL_EVERY:-64}
  export EVAL_MAX_NEW=${LEASE_EVAL_MAX_NEW:-16} EVAL_BATCH=${LEASE_EVAL_BATCH:-16} SCALE=${LEASE_CAP_SCALE:-4}
  export ASSETS=${LEASE_ASSETS:-/tmp/lease_assets} ROW_TIMEOUT=600
else
  export MODEL=${LEASE_MODEL:-qwen2.5-3b} ACCEL_CONFIG=accelerate_configs/fsdp_full.yaml TRAIN_DEVICE_ARGS=""
  export EVAL_EVERY=${LEASE_EVAL_EVERY:-8} EVAL_MAX_NEW=${LEASE_EVAL_MAX_NEW:-128} EVAL_BATCH=${LEASE_EVAL_BATCH:-64}
  export SCALE=${LEASE_CAP_SCALE:-1} ASSETS=${LEASE_ASSETS:-$LEASE_STATE/assets} ROW_TIMEOUT=120
fi
export WHEELHOUSE=${WHEELHOUSE:-wheelhouse} ROWS=${LEASE_ROWS:-1000}
export TRAIN_STEPS=${LEASE_TRAIN_STEPS:-8} TRAIN_WARMUP=${LEASE_TRAIN_WARMUP:-2}
export BENCH_WARMUP=${LEASE_BENCH_WARMUP:-3} BENCH_STEPS=${LEASE_BENCH_STEPS:-6}
mkdir -p "$LEASE_STATE" "$LEASE_OUT"
[ -f "$LEASE_STATE/env.sh" ] && . "$LEASE_STATE/env.sh"  # PYTHONPATH, if install had to use a target folder

# ---- one stage (run as `lease.sh --stage NAME` under timeout, so that its cap ends everything it started) ----------
if [ "${1:-}" = --stage ]; then
  stage=$2
  accelerate_bin() {
    local bin; bin="$(dirname "$($PY -c 'import sys; print(sys.executable)')")/accelerate"
    if [ -x "$bin" ]; then echo "$bin"; else echo "$PY -m accelerate.commands.accelerate_cli"; fi
  }
  quiet() { tr '\r' '\n' | grep -vE 'it/s\]|s/it\]|^\s*$'; }
  case $stage in
    env) $PY benchmarks/lease.py env ;;
    install) $PY benchmarks/lease.py install --wheelhouse "$WHEELHOUSE" ;;
    prep) $PY benchmarks/lease.py prep --model "$MODEL" --rows "$ROWS" --eval-every "$EVAL_EVERY" --assets "$ASSETS" ;;
    train)  # the README's main command on one GPU; flags: the local model/data, a fixed number of steps, no W&B,
            # and test_gpu.py's learning rate (moves a random model visibly in 8 steps; throughput does not depend on it)
      model_dir=$($PY benchmarks/lease.py get prep.model_dir) || exit 2
      rm -rf "$LEASE_STATE/train"
      # shellcheck disable=SC2046,SC2086
      timeout -k 5 $(( LEASE_CAP - 50 )) $(accelerate_bin) launch --config_file "$ACCEL_CONFIG" --num_processes 1 \
        train_sft.py recipes/xlam.yaml --model_name_or_path "$model_dir" --dataset_name "$LEASE_STATE/xlam_rows.jsonl" \
        --output_dir "$LEASE_STATE/train" --max_steps "$TRAIN_STEPS" --logging_steps 1 --save_strategy no \
        --report_to none --learning_rate 1e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 1 \
        $TRAIN_DEVICE_ARGS > "$LEASE_STATE/train.log" 2>&1
      rc=$?
      quiet < "$LEASE_STATE/train.log" | tail -n 12
      [ $rc = 0 ] || { echo "train: accelerate launch exited $rc (log above)"; exit $rc; }
      $PY benchmarks/lease.py train-check --warmup-steps "$TRAIN_WARMUP"
      ;;
    bench)  # bench_runs.json follows every finished row into $OUT
      ( while sleep 10; do [ -f "$LEASE_STATE/bench/runs.json" ] && cp "$LEASE_STATE/bench/runs.json" \
          "$LEASE_OUT/.bench_runs.json.tmp" && mv -f "$LEASE_OUT/.bench_runs.json.tmp" "$LEASE_OUT/bench_runs.json"; done ) &
      copier=$!
      $PY benchmarks/lease.py bench -- --model "$MODEL" --assets "$ASSETS" --num-processes 1 --rows "$ROWS" \
        --warmup-steps "$BENCH_WARMUP" --steps "$BENCH_STEPS" --results "$LEASE_STATE/bench" \
        --work-dir "$LEASE_STATE/benchwork" --resume --timeout "$ROW_TIMEOUT"
      rc=$?; kill "$copier" 2>/dev/null; exit $rc
      ;;
    eval)
      model_dir=$($PY benchmarks/lease.py get prep.model_dir) || exit 2
      $PY eval_bfcl.py --model "$model_dir" --data-dir "$LEASE_STATE/bfcl_sample" --categories all \
        --max-new-tokens "$EVAL_MAX_NEW" --batch-size "$EVAL_BATCH" --output-dir "$LEASE_STATE/eval" --overwrite 2>&1 \
        | quiet | tail -n 25
      [ "${PIPESTATUS[0]}" = 0 ] || exit 1
      $PY benchmarks/lease.py eval-check
      ;;
    test-gpu)
      if command -v make >/dev/null; then tests=(make test-gpu PY="$PY"); else tests=("$PY" -m pytest -q -m gpu -rs tests); fi
      echo "test-gpu: ${tests[*]}"
      "${tests[@]}" 2>&1 | tee "$LEASE_STATE/test_gpu.log" "$LEASE_OUT/test_gpu.log"
      rc=${PIPESTATUS[0]}
      $PY benchmarks/lease.py test-record
      exit "$rc"
      ;;
    *) echo "lease.sh: unknown stage $stage"; exit 2 ;;
  esac
  exit
fi

# ---- the call: stages in order, each under its cap and the call's deadline --------------------------------------
T0=$(date +%s)
BUDGET=${LEASE_BUDGET:-450}
STAGES=${LEASE_STAGES:-env install prep train bench eval test-gpu}
declare -A CAP=([env]=30 [install]=60 [prep]=90 [train]=180 [bench]=180 [eval]=90 [test-gpu]=270)
declare -A MIN=([env]=5 [install]=20 [prep]=30 [train]=120 [bench]=60 [eval]=50 [test-gpu]=150)
main() {
  echo "lease: $(date '+%F %T') device=$LEASE_DEVICE model=$MODEL budget=${BUDGET}s stages: $STAGES (out: $LEASE_OUT)"
  $PY benchmarks/lease.py start --incoming "$LEASE_IN" --budget "$BUDGET" --device "$LEASE_DEVICE" --stages "$STAGES" \
    --cap-scale "$SCALE" || exit 2
  pending() { $PY benchmarks/lease.py pending "$1"; }
  for stage in $STAGES; do
    [ -n "${CAP[$stage]:-}" ] || { echo "lease.sh: unknown stage $stage (${!CAP[*]})"; continue; }
    case $stage in
      env|install) ;;  # every call: the machine may be fresh
      prep)  # only for stages that need the model, data or sample, and cheap when its files are already there
        needed=0; for s in train bench eval; do [[ " $STAGES " == *" $s "* ]] && pending "$s" && needed=1; done
        [ $needed = 1 ] || { echo "== prep: not needed"; continue; } ;;
      *) pending "$stage" || { echo "== $stage: ok in an earlier call, skipped"; continue; } ;;
    esac
    cap=$(( CAP[$stage] * SCALE )); min=$(( MIN[$stage] * SCALE ))
    left=$(( BUDGET - ($(date +%s) - T0) ))
    if (( left < min )); then
      $PY benchmarks/lease.py stage "$stage" "deferred: ${left}s left, needs ${min}s" 0 "$cap"; continue
    fi
    (( cap > left )) && cap=$left
    echo "== $stage: up to ${cap}s ($(( $(date +%s) - T0 ))s into the call)"
    started=$(date +%s)
    LEASE_CAP=$cap timeout -k 10 "$cap" bash "$SELF" --stage "$stage"
    rc=$?
    case $rc in 0) status=ok ;; 124|137) status="timeout after ${cap}s" ;; *) status="failed (exit $rc)" ;; esac
    $PY benchmarks/lease.py stage "$stage" "$status" $(( $(date +%s) - started )) "$cap"
  done
  echo "lease: done in $(( $(date +%s) - T0 ))s of ${BUDGET}s"
  $PY benchmarks/lease.py report
}
main 2>&1 | tee -a "$LEASE_OUT/lease.log"  # everything printed is in $OUT as it happens
