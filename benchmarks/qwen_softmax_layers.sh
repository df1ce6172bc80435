#!/usr/bin/env bash
# Issue 17 on Qwen2.5-Coder-0.5B-Instruct (24 layers): which layers to keep as softmax, by measurement.
# 1. `lolcats rank-layers --from BASE` (timed): each layer's held-out KL and passkey probe with the stage 1 of the
#    default all-linear run BASE (benchmarks/student_variants.sh's qwen-lizard; the K = 0 row), no training.
# 2. For K = 3 and 6: the K ranked layers and the same count placed uniformly kept as softmax, each a stage 2 on
#    BASE's stage 1 (`--stage1-from`: stage 1 trains each layer on teacher inputs, so it is the same for any
#    choice), same data, budget and seed; each evaluated by long_eval.sh without baselines (the teacher, window and
#    sinks rows are benchmarks/qwen_long.sh's). 3. Generation-cache bytes at 8k and 32k for each (`lolcats bench cache`).
# Usage: bash benchmarks/qwen_softmax_layers.sh [LIMIT] [COUNTS]   (default 20, "3 6"); BASE=runs/variants/qwen-lizard
set -euo pipefail
limit=${1:-20}
counts=${2:-3 6}
base=${BASE:-runs/variants/qwen-lizard}
lolcats=${LOLCATS:-.venv/bin/lolcats}
{ read -r gguf; read -r train; } < <(bash "$(dirname "$0")/qwen_prepare.sh")
mkdir -p runs/qwen-layers benchmarks/results
/usr/bin/time -f "rank-layers: %e s wall, %M KB peak RSS" "$lolcats" rank-layers --from "$base" --probe \
  --out runs/qwen-layers/ranking 2>&1 | tee benchmarks/results/qwen2.5-coder-0.5b-ranking.txt
cp runs/qwen-layers/ranking/ranking.json benchmarks/results/qwen2.5-coder-0.5b-ranking.json
"$lolcats" bench cache --model "$base" --contexts 8192,32768 --json "benchmarks/results/cache-qwen2.5-coder-0.5b-softmax0.json"
for k in $counts; do
  ranked=$(.venv/bin/python -c "import json; print(','.join(map(str, sorted(json.load(open('runs/qwen-layers/ranking/ranking.json'))['order'][:$k]))))")
  uniform=$(.venv/bin/python -c "print(','.join(str(int((i + 0.5) * 24 / $k)) for i in range($k)))")
  for placement in ranked uniform; do
    layers=$([ "$placement" = ranked ] && echo "$ranked" || echo "$uniform")
    run=runs/qwen-layers/softmax$k-$placement
    "$lolcats" linearize --model "$gguf" --data "$train" --seq-len 1024 --batch-tokens 4096 --stage2-tokens 24576 \
      --stage1-from "$base" --softmax-layers "$layers" --out "$run" --quiet
    LOLCATS_BASELINES=none bash "$(dirname "$0")/long_eval.sh" "$run" "qwen2.5-coder-0.5b-softmax$k-$placement" "$limit"
    "$lolcats" bench cache --model "$run" --contexts 8192,32768 --json "benchmarks/results/cache-qwen2.5-coder-0.5b-softmax$k-$placement.json"
  done
done
