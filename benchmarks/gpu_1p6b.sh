#!/usr/bin/env bash
# The full 1.6B model on one H100/H200: seq 4096, micro-batch 6, bf16 compute with fp32 params and AdamW
# state, chunked fused cross-entropy, flash attention. At most ~8 minutes: a few settings, each capped.
#
#   bash benchmarks/gpu_1p6b.sh [OUT_DIR]      (OUT_DIR defaults to $OUT, else benchmarks/out)
#
# Writes OUT_DIR/gpu_1p6b.jsonl (one benchmark JSON per setting that ran) and OUT_DIR/gpu_1p6b.log.
# Needs jax with CUDA, flax, optax and numpy: the benchmark path imports neither grain nor tiktoken.
# Record the best line in benchmarks/RESULTS.md with the command, the GPU and the date.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/out}}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_1p6b.log"
JSONL="$OUT_DIR/gpu_1p6b.jsonl"
: > "$JSONL"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-480}   # the whole script, 8 minutes: a setting starts only if its cap still fits
PER_RUN_S=${PER_RUN_S:-150}  # cap per setting: start-up, compile (~1 min), init, 2 warm-up + 10 timed steps

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: n/a"
  python -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} 2>&1 | tee "$LOG"

# COMMON_ARGS overrides the model and run flags (e.g. a tiny config to try the script on a CPU).
read -r -a COMMON <<< "${COMMON_ARGS:---config=ar_stablelm_2_1_6b --steps=10 --warmup=2 --config.mesh.data=1 --config.data.batch_size=6 --config.optim.grad_accum_steps=1 --config.model.dtype=bfloat16 --config.train.loss_chunk_size=1024}"

# `auto` first (the recipe's choice), then by expected speed on an H200 (141 GB): no remat fits there (~50 GB
# of activations with flash attention) and recomputes nothing; the remat policies are the fallbacks for an 80 GB H100.
SETTINGS=(
  "--config.model.attention=auto --config.model.remat=none"  # the recipe's choice (cudnn for bf16); the JSON names it
  "--config.model.attention=pallas --config.model.remat=none"
  "--config.model.attention=cudnn --config.model.remat=dots_with_no_batch_dims_saveable"
  "--config.model.attention=cudnn --config.model.remat=save_attn_mlp_out"
)

for s in "${SETTINGS[@]}"; do
  elapsed=$(( $(date +%s) - START ))
  if (( elapsed + PER_RUN_S > BUDGET_S )); then
    echo "skipping '$s': ${elapsed}s used of ${BUDGET_S}s" | tee -a "$LOG"
    continue
  fi
  echo "=== $s" | tee -a "$LOG"
  # shellcheck disable=SC2086
  timeout "$PER_RUN_S" python -m experiments.benchmark "${COMMON[@]}" $s > "$OUT_DIR/run.out" 2>> "$LOG"
  rc=$?
  cat "$OUT_DIR/run.out" >> "$LOG"
  last=$(tail -n 1 "$OUT_DIR/run.out")
  if [[ $rc -eq 0 && "$last" == \{* ]]; then
    python -c "import json,sys; r=json.loads(sys.argv[1]); r['setting']=sys.argv[2]; print(json.dumps(r))" "$last" "$s" >> "$JSONL"
    python -c "import json,sys; r=json.loads(sys.argv[1]); print(f\"  attention {r['attention']}  tokens/s {r['tokens_per_sec']:,.0f}  MFU {r['mfu']:.1%}  step {r['step_time_s']:.3f}s  compile {r['compile_s']:.0f}s\")" "$last" | tee -a "$LOG"
  else
    echo "  failed (exit $rc): see $LOG" | tee -a "$LOG"
  fi
done
echo "total $(( $(date +%s) - START ))s; results in $JSONL" | tee -a "$LOG"
