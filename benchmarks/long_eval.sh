#!/usr/bin/env bash
# Where linearization shows, for one linearized run: MMLU 5-shot (LIMIT items a subject), passkey and multi-key
# retrieval at 1k-8k tokens (5 depths), perplexity and loss by position over 8k-token windows of wikitext-2, for the
# teacher, the linearized model and the training-free window and window + 4 sinks rows, in one `lolcats eval`.
# Writes RUN/eval-long.json (read by `lolcats report`) and benchmarks/results/long-eval-NAME.{json,md}.
# Usage: bash benchmarks/long_eval.sh RUN NAME [LIMIT]   (Gemma-3-270M: about 70 minutes on 2 cores)
# LOLCATS_EVAL_ARGS adds flags to the evaluation (e.g. "--recall-cache 64"); LOLCATS_BASELINES picks the
# baseline rows (default teacher,window,sinks; "none" for the model alone, when another run measured them).
set -euo pipefail
run=$1
name=$2
limit=${3:-20}
lolcats=${LOLCATS:-.venv/bin/lolcats}
source "$(dirname "$0")/long_eval_settings.sh"
baselines="--baselines ${LOLCATS_BASELINES:-teacher,window,sinks}"
[ "${LOLCATS_BASELINES:-}" = none ] && baselines=""
# shellcheck disable=SC2086
"$lolcats" eval --model "$run" --task-dir "$shared/data/eval" --tasks mmlu,passkey,multikey "${mmlu_5shot[@]}" \
  --limit "$limit" "${long_retrieval[@]}" "${long_text[@]}" --no-fidelity $baselines --batch-size 8 ${LOLCATS_EVAL_ARGS:-} \
  --json "$run/eval-long.json"
mkdir -p benchmarks/results
cp "$run/eval-long.json" "benchmarks/results/long-eval-$name.json"
.venv/bin/python benchmarks/long_eval_md.py "$name" "$run/eval-long.json" > "benchmarks/results/long-eval-$name.md"
