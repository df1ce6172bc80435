#!/usr/bin/env bash
# Perplexity and loss by position on one text file at several window lengths (multi-document windows: BOS + the
# whole file, so a window spans several documents), for the teacher, the linearized model and the training-free
# window and window + 4 sinks rows: the cheap check of "never worse than its own window" at every length.
# Writes RUN/eval-text-SEQ.json for each length and benchmarks/results/text-eval-NAME.md.
# Usage: bash benchmarks/text_eval.sh RUN NAME TEXT [SEQ_LENS]   (default 512,1024,2048)
# LOLCATS_EVAL_ARGS adds flags to the evaluation (e.g. "--recall-cache 64").
set -euo pipefail
run=$1
name=$2
text=$3
lolcats=${LOLCATS:-.venv/bin/lolcats}
tables=()
for seq in $(echo "${4:-512,1024,2048}" | tr , ' '); do
  # shellcheck disable=SC2086
  "$lolcats" eval --model "$run" --text "$text" --tasks none --seq-len "$seq" --position-buckets --no-fidelity \
    --baselines teacher,window,sinks ${LOLCATS_EVAL_ARGS:-} --json "$run/eval-text-$seq.json" > /dev/null
  tables+=("$name at $seq tokens" "$run/eval-text-$seq.json")
done
mkdir -p benchmarks/results
.venv/bin/python benchmarks/long_eval_md.py "${tables[@]}" > "benchmarks/results/text-eval-$name.md"
