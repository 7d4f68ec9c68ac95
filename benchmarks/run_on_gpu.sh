#!/usr/bin/env bash
# The GPU measurements in BENCHMARKS.md, as they were run: on a GPU machine with no network whose Python already has
# torch (CUDA build), accelerate and the scientific stack, but not trl, datasets, liger-kernel or bitsandbytes.
#
#   make wheels WHEEL_PYTHON=3.12 ONLY="trl datasets dill multiprocess transformers peft fsspec"   # on a machine with network
#   make wheels-gpu WHEEL_PYTHON=3.12                                     # (both: make lease-wheels)
#   bash benchmarks/run_on_gpu.sh install env tests bench eval                                       # on the GPU machine
#   bash benchmarks/run_on_gpu.sh lease      # issue 22: all of it in one 8-minute device call, results to $OUT (LEASE.md)
#
# Stages run in the order given; each writes its log to $LOGS (default runs/gpu-logs) and survives the others failing.
# BENCH_SETTINGS picks bench rows (default: the one-GPU preset); bench resumes into the same table (--resume).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
LOGS=${LOGS:-runs/gpu-logs}
PY=${PY:-python3}
MODEL=${MODEL:-qwen2.5-3b}
RESULTS=${RESULTS:-benchmarks/h100-qwen2.5-3b}
BENCH_SETTINGS=${BENCH_SETTINGS:-gpu1}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 WANDB_MODE=disabled
mkdir -p "$LOGS"

for stage in "$@"; do
  started=$(date +%s)
  case "$stage" in
    install)  # the README's offline install, into the machine's own Python
      { $PY -m pip install -q --no-index --find-links "$WHEELHOUSE" -r "$WHEELHOUSE/requirements.txt" &&
        $PY -m pip install -q --no-index --find-links "$WHEELHOUSE/gpu" -r "$WHEELHOUSE/gpu/requirements.txt"; } ||
      { echo "install: a dependency is missing on this machine (above); installing the wheels without the check";
        $PY -m pip install -q --no-index --no-deps "$WHEELHOUSE"/*.whl "$WHEELHOUSE"/gpu/*.whl; }
      $PY -m pip install -q --no-index --no-deps "$WHEELHOUSE"/bfcl_eval-*.whl &&
      $PY -c "import trl, datasets, peft, liger_kernel, bitsandbytes, bfcl_eval, transformers; print('install: ok, trl', trl.__version__, 'transformers', transformers.__version__)"
      ;;
    env)  # device, driver and versions, for BENCHMARKS.md
      { nvidia-smi; uname -r; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))";
        $PY -m pip list 2>/dev/null | grep -iE '^(torch|transformers|trl|accelerate|peft|datasets|bitsandbytes|liger|triton|tokenizers|pyarrow|numpy) '; } > "$LOGS/env.txt" 2>&1
      cat "$LOGS/env.txt"
      ;;
    tests)
      if command -v make >/dev/null; then tests=(make test-gpu PY="$PY"); else tests=($PY -m pytest -q -m gpu -rs tests); fi
      timeout "${TESTS_TIMEOUT:-600}" "${tests[@]}" 2>&1 | tee "$LOGS/test-gpu.log" | tail -25
      ;;
    bench)
      timeout "${BENCH_TIMEOUT:-3000}" $PY bench_fsdp.py --model "$MODEL" --settings "$BENCH_SETTINGS" --rows "${BENCH_ROWS:-1000}" \
        --warmup-steps "${WARMUP:-4}" --steps "${STEPS:-12}" --results "$RESULTS" --resume 2>&1 | tee -a "$LOGS/bench.log" | grep -E '^bench: '
      ;;
    eval)  # every single-turn BFCL prompt through eval_bfcl.py on the random-init model the bench wrote
      timeout "${EVAL_TIMEOUT:-600}" $PY eval_bfcl.py --model "runs/bench/models/$MODEL" --categories all --overwrite \
        --max-new-tokens "${EVAL_MAX_NEW_TOKENS:-128}" --batch-size "${EVAL_BATCH_SIZE:-128}" --output-dir "runs/gpu-eval-$MODEL" \
        2>&1 | tee "$LOGS/eval.log" | grep -vE 'generating|it/s\]' | tail -20
      cp "runs/gpu-eval-$MODEL/generation.json" "$LOGS/eval-generation.json" 2>/dev/null
      ;;
    lease)  # one device call: install, the README's command, bench rows, eval, test-gpu; see benchmarks/LEASE.md
      PY="$PY" WHEELHOUSE="$WHEELHOUSE" bash benchmarks/lease.sh
      ;;
    *) echo "unknown stage $stage (install env tests bench eval lease)"; exit 2 ;;
  esac
  echo "== $stage: $(( $(date +%s) - started ))s"
done
