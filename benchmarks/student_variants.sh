#!/usr/bin/env bash
# The student options of issue 16 on one teacher at one token budget: LoLCATs as it is, + sinks, + a wider window,
# + the decay gate, + the linear term without RoPE, and the recall cache at inference; each run evaluated by
# benchmarks/long_eval.sh (MMLU 5-shot, passkey 1k-8k, loss by position to 8k, beside the teacher and the
# training-free window / window + sinks rows). Results: benchmarks/results/long-eval-NAME-VARIANT.{json,md}.
# Usage: bash benchmarks/student_variants.sh NAME [LIMIT] -- LINEARIZE ARGS (model, data, budget)
#   e.g. bash benchmarks/student_variants.sh gemma3-270m 20 -- --config gemma3-270m-cpu
# VARIANT_TEXT=FILE evaluates each run with benchmarks/text_eval.sh on FILE instead (perplexity and loss by
# position at 512/1024/2048 tokens: minutes, not hours), e.g. for stories260k:
#   VARIANT_TEXT=../shared/data/tinystories_valid.txt bash benchmarks/student_variants.sh stories260k 0 -- --config stories260k-cpu
# VARIANT_SEQ_LENS=512,2048,8192 sets its window lengths. VARIANTS="lolcats gate-sinks4" runs only those.
set -euo pipefail
name=$1
limit=${2:-20}
shift 2
[ "${1:-}" = "--" ] && shift
lolcats=${LOLCATS:-.venv/bin/lolcats}
published="--window 64 --sinks 0 --gate none --linear-rope"  # LoLCATs as published; every variant starts from it
declare -A variants=(
  [lolcats]="$published"
  [sinks4]="$published --sinks 4"
  [window128]="$published --window 128"
  [window256]="$published --window 256"
  [window128-sinks4]="$published --window 128 --sinks 4"
  [window256-sinks4]="$published --window 256 --sinks 4"
  [gate-sinks4]="$published --gate scalar --sinks 4"
  [gate-sinks4-norope]="$published --gate scalar --sinks 4 --no-linear-rope"
  [gate]="$published --gate scalar"
  [lizard]=""  # the default student: window 128, 4 sinks, the gate, φ before RoPE (Lizard's configuration)
  [lizard-nosinks]="--sinks 0"  # the default without sinks: for contexts past the teacher's RoPE range
)
evaluate() {  # RUN NAME
  if [ -n "${VARIANT_TEXT:-}" ]; then
    bash "$(dirname "$0")/text_eval.sh" "$1" "$2" "$VARIANT_TEXT" "${VARIANT_SEQ_LENS:-512,1024,2048}"
  else
    bash "$(dirname "$0")/long_eval.sh" "$1" "$2" "$limit"
  fi
}
for variant in ${VARIANTS:-lolcats sinks4 window128 window256 window128-sinks4 window256-sinks4 gate gate-sinks4 gate-sinks4-norope lizard}; do
  run=runs/variants/$name-$variant
  # shellcheck disable=SC2086
  "$lolcats" linearize "$@" ${variants[$variant]} --out "$run" --quiet
  evaluate "$run" "$name-$variant"
done
# the recall cache needs no training: the sinks run again, evaluated with 64 cached keys per head
if [ -d "runs/variants/$name-sinks4" ]; then
  LOLCATS_EVAL_ARGS="--recall-cache 64" evaluate "runs/variants/$name-sinks4" "$name-sinks4-recall64"
fi
