#!/usr/bin/env bash
# Every recall-cache number of the default Qwen2.5-Coder-0.5B run (README "Student variants"): retrieval at 1k-8k,
# passkey at 4k with 3 prompts per depth, MMLU 5-shot (20 items a subject) and loss by position over the first
# 16k tokens of wikitext-2 in 8k windows, each with K = 64 and/or 256 cached keys per head.
# Usage: bash benchmarks/qwen_recall.sh [STEP...]   (steps: retrieval passkey4k mmlu text; default: all)
# One thread each; on 2 CPU cores: retrieval ~40 min, passkey4k ~8, mmlu ~45, text ~30 (run steps side by side).
set -euo pipefail
run=${RUN:-runs/variants/qwen-lizard}  # benchmarks/student_variants.sh trains it
lolcats=${LOLCATS:-.venv/bin/lolcats}
shared=$(cd "$(dirname "$0")/../.." && pwd)/shared
out=benchmarks/results/variants-qwen2.5-coder-0.5b
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
steps=${*:-retrieval passkey4k mmlu text}
for step in $steps; do
  case $step in
    retrieval) for k in 64 256; do
        "$lolcats" eval --model "$run" --tasks passkey,multikey --contexts 1024,2048,4096,8192 \
          --depths 0.1,0.3,0.5,0.7,0.9 --no-fidelity --recall-cache $k --json "$out/default-lizard-recall$k-retrieval.json"
      done ;;
    passkey4k) "$lolcats" eval --model "$run" --tasks passkey --contexts 4096 --depths 0.1,0.3,0.5,0.7,0.9 --trials 3 \
        --no-fidelity --recall-cache 256 --json "$out/default-lizard-recall256-passkey4k-trials3.json" ;;
    mmlu) "$lolcats" eval --model "$run" --task-dir "$shared/data/eval" --tasks mmlu --num-fewshot 5 --limit 20 \
        --no-fidelity --recall-cache 256 --json "$out/default-lizard-recall256-mmlu.json" ;;
    text) for k in 64 256; do
        # the K = 64 run also scores the teacher and window + sinks rows of the README's table
        baselines=$([ $k = 64 ] && echo "--baselines teacher,sinks" || true)
        # shellcheck disable=SC2086
        "$lolcats" eval --model "$run" --tasks none --text "$shared/data/wikitext2_valid_tok.txt" --seq-len 8192 \
          --max-text-tokens 16384 --position-buckets --no-fidelity --recall-cache $k $baselines \
          --json "$out/default-lizard-recall$k-text16k.json"
      done ;;
    *) echo "unknown step $step (retrieval passkey4k mmlu text)" >&2; exit 2 ;;
  esac
done
