#!/usr/bin/env bash
# The train-step settings on the bench-cpu preset, one benchmark run each (about 5 minutes on 2 cores).
#
#   bash benchmarks/cpu_sweep.sh [OUT_DIR]     (default benchmarks/out)
#
# Scan vs unrolled layers, the remat policies, the LM-head/cross-entropy chunking, the attention
# implementations that run on CPU; then the headline comparison with PyTorch. Prints a Markdown table
# (the one in benchmarks/RESULTS.md) and writes OUT_DIR/cpu_sweep.jsonl. Separate processes: on a shared
# host compare step_cpu_s (CPU seconds per step) as well as wall time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-benchmarks/out}"
mkdir -p "$OUT_DIR"
JSONL="$OUT_DIR/cpu_sweep.jsonl"
: > "$JSONL"
STEPS=${STEPS:-5}

SETTINGS=(
  ""  # the preset: scanned layers, no remat, fused chunked cross-entropy (16 positions x 8 rows)
  "--config.model.scan_layers=false"
  "--config.model.remat=full"
  "--config.model.remat=dots_saveable"
  "--config.model.remat=dots_with_no_batch_dims_saveable"
  "--config.model.remat=save_attn_mlp_out"
  "--config.train.loss_chunk_size=0"
  "--config.train.loss_chunk_size=32"
  "--config.train.loss_chunk_size=64"
)

run() {  # $1: label, rest: flags
  local label="$1"; shift
  local last
  last=$(python -m experiments.benchmark --config=bench-cpu --steps="$STEPS" --warmup=2 "$@" 2>/dev/null | tail -n 1)
  if [[ "$last" == \{* ]]; then
    python -c "import json,sys; r=json.loads(sys.argv[1]); r['setting']=sys.argv[2]; print(json.dumps(r))" "$last" "$label" >> "$JSONL"
  else
    echo "failed: $label" >&2
  fi
}

for s in "${SETTINGS[@]}"; do
  # shellcheck disable=SC2086
  run "${s:-preset}" $s
done
run "preset vs torch (default AdamW)" --compare_torch
run "preset vs torch (fused AdamW)" --compare_torch --torch_adamw=fused

python - "$JSONL" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| setting | compile s | step s (wall) | step CPU s | tokens/s | MFU (vs matmul) | torch tokens/s | speedup |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
  torch_tps = f"{r['torch_tokens_per_sec']:,.0f}" if "speedup" in r else ""
  speedup = f"{r['speedup']:.2f}x" if "speedup" in r else ""
  print(f"| `{r['setting']}` | {r['compile_s']:.1f} | {r['step_time_s']:.3f} | {r['step_cpu_s']:.2f} | "
        f"{r['tokens_per_sec']:,.0f} | {r['mfu']:.1%} | {torch_tps} | {speedup} |")
print(f"\nmatmul rate (2048^3 fp32, median per run): {min(r['peak_flops'] for r in rows)/1e9:.0f} to {max(r['peak_flops'] for r in rows)/1e9:.0f} GFLOP/s")
EOF
