#!/usr/bin/env bash
# Issue 17 on Qwen2.5-Coder-0.5B-Instruct (24 layers): which layers to keep as softmax, by measurement.
# 1. `lolcats rank-layers` alone (timed): stage 1 at the qwen_long.sh budget, then each layer's held-out KL and
#    passkey probe. 2. For K = 3 and 6: linearize keeping the K ranked layers (--softmax-layers auto:K) and the
#    same count placed uniformly, same budget and seed; each evaluated by long_eval.sh without baselines (the
#    teacher/window/sinks rows and K = 0 are benchmarks/qwen_long.sh's run). 3. Generation-cache bytes at 8k and
#    32k for each (`lolcats bench cache`).
# Usage: bash benchmarks/qwen_softmax_layers.sh [LIMIT] [COUNTS]   (default 20, "3 6")
set -euo pipefail
limit=${1:-20}
counts=${2:-3 6}
lolcats=${LOLCATS:-.venv/bin/lolcats}
{ read -r gguf; read -r train; } < <(bash "$(dirname "$0")/qwen_prepare.sh")
budget=(--model "$gguf" --data "$train" --seq-len 1024 --batch-tokens 4096 --stage1-tokens 163840 --quiet)
mkdir -p runs/qwen-layers benchmarks/results
/usr/bin/time -f "rank-layers: %e s wall, %M KB peak RSS" "$lolcats" rank-layers "${budget[@]}" --probe \
  --out runs/qwen-layers/ranking 2>&1 | tee benchmarks/results/qwen2.5-coder-0.5b-ranking.txt
cp runs/qwen-layers/ranking/ranking.json benchmarks/results/qwen2.5-coder-0.5b-ranking.json
for k in $counts; do
  uniform=$(.venv/bin/python -c "print(','.join(str(int((i + 0.5) * 24 / $k)) for i in range($k)))")
  for placement in ranked uniform; do
    layers=$([ "$placement" = ranked ] && echo "auto:$k" || echo "$uniform")
    run=runs/qwen-layers/softmax$k-$placement
    "$lolcats" linearize "${budget[@]}" --stage2-tokens 24576 --softmax-layers "$layers" --out "$run"
    LOLCATS_BASELINES=none bash "$(dirname "$0")/long_eval.sh" "$run" "qwen2.5-coder-0.5b-softmax$k-$placement" "$limit"
    "$lolcats" bench cache --model "$run" --contexts 8192,32768 --json "benchmarks/results/cache-qwen2.5-coder-0.5b-softmax$k-$placement.json"
  done
done
