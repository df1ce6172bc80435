#!/usr/bin/env bash
# Issue 17 on Qwen2.5-Coder-0.5B-Instruct (24 layers): which layers to keep as softmax, by measurement.
# 1. `lolcats rank-layers --from BASE` (timed; skipped when runs/qwen-layers/ranking/ranking.json exists): each
#    layer's held-out KL and passkey probe with the stage 1 of the default all-linear run BASE
#    (benchmarks/student_variants.sh's qwen-lizard; the K = 0 row), no training.
# 2. For each count K and placement (ranked: the K costliest layers; uniform: layers (i + 1/2)·24/K), a stage 2 on
#    BASE's stage 1 (`--stage1-from`: stage 1 trains each layer on teacher inputs, so it is the same for any choice),
#    same data, budget and seed; generation-cache bytes at 8k and 32k (`lolcats bench cache`).
# 3. PARTS: "long" = wikitext-2 in 8k windows with loss by position, passkey and multikey at 1k-8k (long_eval.sh's
#    settings, about 40 min of one core a row); "mmlu" = MMLU 5-shot, LIMIT a subject (about 60 min a row). Each
#    part its own JSON, RUN/eval-{long,mmlu}.json, copied to benchmarks/results/softmax-layers-qwen2.5-coder-0.5b/.
#    "sinks" (opt-in) = the training-free counterpart of the row, scored like "long": the same softmax layers and
#    a window of 128 + 4 sinks in every other layer, no linear term (how much of a row's gain the kept layers give
#    alone); RUN/eval-sinks.json and its cache bytes.
# 4. The table of every row measured so far, table.md there (benchmarks/variants_md.py). The teacher, window + sinks
#    and 0-softmax rows are benchmarks/student_variants.sh's, measured with the same settings.
# Usage: bash benchmarks/qwen_softmax_layers.sh [COUNTS] [PLACEMENTS] [PARTS] [LIMIT]
#   (default "3 6", "ranked uniform", "long mmlu", 20); two lanes on 2 cores: one per placement. PARTS "none":
#   only the table.
set -euo pipefail
counts=${1:-3 6}
placements=${2:-ranked uniform}
parts=${3:-long mmlu}
limit=${4:-20}
base=${BASE:-runs/variants/qwen-lizard}
lolcats=${LOLCATS:-.venv/bin/lolcats}
source "$(dirname "$0")/long_eval_settings.sh"
results=benchmarks/results/softmax-layers-qwen2.5-coder-0.5b
ranking=runs/qwen-layers/ranking/ranking.json
{ read -r gguf; read -r train; } < <(bash "$(dirname "$0")/qwen_prepare.sh")
mkdir -p runs/qwen-layers "$results"
if [ ! -f "$ranking" ]; then
  /usr/bin/time -f "rank-layers: %e s wall, %M KB peak RSS" "$lolcats" rank-layers --from "$base" --probe \
    --out runs/qwen-layers/ranking 2>&1 | tee benchmarks/results/qwen2.5-coder-0.5b-ranking.txt
  cp "$ranking" benchmarks/results/qwen2.5-coder-0.5b-ranking.json
fi
[ -f "$results/cache-softmax0.json" ] || \
  "$lolcats" bench cache --model "$base" --contexts 8192,32768 --baselines sinks --json "$results/cache-softmax0.json"
for part in ${parts/none/}; do
  for k in $counts; do
    ranked=$(.venv/bin/python -c "import json; print(','.join(map(str, sorted(json.load(open('$ranking'))['order'][:$k]))))")
    uniform=$(.venv/bin/python -c "print(','.join(str(int((i + 0.5) * 24 / $k)) for i in range($k)))")
    for placement in $placements; do
      layers=$([ "$placement" = ranked ] && echo "$ranked" || echo "$uniform")
      run=runs/qwen-layers/softmax$k-$placement
      if [ ! -f "$run/lolcats.json" ]; then
        "$lolcats" linearize --model "$gguf" --data "$train" --seq-len 1024 --batch-tokens 4096 \
          --stage2-tokens 24576 --stage1-from "$base" --softmax-layers "$layers" --out "$run" --quiet
        cp "$run/lolcats.json" "$results/softmax$k-$placement.lolcats.json"
      fi
      [ -f "$results/cache-softmax$k-$placement.json" ] || \
        "$lolcats" bench cache --model "$run" --contexts 8192,32768 --json "$results/cache-softmax$k-$placement.json"
      case $part in
        long) "$lolcats" eval --model "$run" --task-dir "$shared/data/eval" --tasks passkey,multikey \
                "${long_retrieval[@]}" "${long_text[@]}" --no-fidelity --batch-size 8 --json "$run/eval-long.json" ;;
        mmlu) "$lolcats" eval --model "$run" --task-dir "$shared/data/eval" --tasks mmlu "${mmlu_5shot[@]}" \
                --limit "$limit" --no-fidelity --batch-size 8 --json "$run/eval-mmlu.json" ;;
        sinks) .venv/bin/python benchmarks/long_eval_row.py "$run" sinks text,retrieval "$run/eval-sinks.json"
               "$lolcats" bench cache --model "$run" --contexts 8192,32768 --no-teacher --baselines sinks \
                 --json "$results/cache-softmax$k-$placement-sinks.json" ;;
        *) echo "unknown part $part (long, mmlu, sinks or none)" >&2; exit 2 ;;
      esac
      cp "$run/eval-$part.json" "$results/softmax$k-$placement-$part.json"
    done
  done
done
variants=benchmarks/results/variants-qwen2.5-coder-0.5b
rows=("teacher=benchmarks/results/long-eval-qwen2.5-coder-0.5b.json:teacher,layers=all 24,cache=$results/cache-softmax0.json:teacher"
  "window 128 + 4 sinks (untrained)=$variants/window128-sinks4-untrained.json,$variants/window128-sinks4-untrained-mmlu.json,$variants/default-lizard-retrieval.json:sinks,cache=$results/cache-softmax0.json:sinks"
  "0 softmax layers (default run)=$variants/default-lizard.json,$variants/default-lizard-mmlu.json,$variants/default-lizard-retrieval.json,cache=$results/cache-softmax0.json")
for k in 3 6; do
  for placement in ranked uniform; do
    row="$k $placement=manifest=$results/softmax$k-$placement.lolcats.json,cache=$results/cache-softmax$k-$placement.json"
    for part in long mmlu; do
      if [ -f "$results/softmax$k-$placement-$part.json" ]; then row+=",$results/softmax$k-$placement-$part.json"; fi
    done
    if [ -f "$results/softmax$k-$placement.lolcats.json" ]; then rows+=("$row"); fi
    if [ -f "$results/softmax$k-$placement-sinks.json" ]; then
      rows+=("$k $placement, untrained: window 128 + 4 sinks in the others=manifest=$results/softmax$k-$placement.lolcats.json,$results/softmax$k-$placement-sinks.json,cache=$results/cache-softmax$k-$placement-sinks.json:sinks")
    fi
  done
done
.venv/bin/python benchmarks/variants_md.py "${rows[@]}" > "$results/table.md"
