#!/usr/bin/env bash
# Teacher vs linearized on every shared task (and perplexity), for stories260k (all items) and Gemma-3-270M
# (first LIMIT items of each task: the same items for both models). Results land beside each run's manifest
# (eval.json, eval-teacher.json, read by `lolcats report`) and in benchmarks/results/.
# Usage: bash benchmarks/eval_tables.sh [STORIES_RUN] [GEMMA_RUN] [LIMIT]   (about 25 minutes on 2 cores)
set -euo pipefail
stories_run=${1:-runs/stories260k-table/lolcats}
gemma_run=${2:-runs/gemma-default}
limit=${3:-100}
lolcats=${LOLCATS:-.venv/bin/lolcats}
shared=$(cd "$(dirname "$0")/../.." && pwd)/shared
stories_base=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['base_model']['spec'])" "$stories_run/lolcats.json")
common=(--task-dir "$shared/data/eval" --batch-size 16)
"$lolcats" eval --model "$stories_base" "${common[@]}" --seq-len 512 --text "$shared/data/tinystories_valid.txt" --json "$stories_run/eval-teacher.json"
"$lolcats" eval --model "$stories_run" "${common[@]}" --seq-len 512 --text "$shared/data/tinystories_valid.txt" --json "$stories_run/eval.json"
"$lolcats" eval --model gemma3-270m "${common[@]}" --limit "$limit" --text "$shared/data/wikitext2_valid_tok.txt" --max-text-tokens 16384 --seq-len 512 --json "$gemma_run/eval-teacher.json"
"$lolcats" eval --model "$gemma_run" "${common[@]}" --limit "$limit" --text "$shared/data/wikitext2_valid_tok.txt" --max-text-tokens 16384 --seq-len 512 --json "$gemma_run/eval.json"
mkdir -p benchmarks/results
cp "$stories_run/eval-teacher.json" benchmarks/results/eval-stories260k-teacher.json
cp "$stories_run/eval.json" benchmarks/results/eval-stories260k-lolcats.json
cp "$gemma_run/eval-teacher.json" benchmarks/results/eval-gemma3-270m-teacher.json
cp "$gemma_run/eval.json" benchmarks/results/eval-gemma3-270m-lolcats.json
