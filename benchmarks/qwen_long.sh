#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B-Instruct (GGUF, built by qwen_prepare.sh): linearize all 24 layers with the default conversion
# on a budget of about 30 minutes of 2 CPU cores, then benchmarks/long_eval.sh (MMLU 5-shot, passkey, loss by
# position; teacher, linearized, window, window + sinks).
# Training text: wikitext-2 articles after the first 320k characters (qwen_prepare.sh), so the evaluation's first
# 65,536 tokens are never trained on and training rows span whole 1,024-token windows.
# Usage: bash benchmarks/qwen_long.sh [RUN] [LIMIT]
set -euo pipefail
run=${1:-runs/qwen2.5-coder-0.5b}
limit=${2:-20}
lolcats=${LOLCATS:-.venv/bin/lolcats}
{ read -r gguf; read -r train; } < <(bash "$(dirname "$0")/qwen_prepare.sh")
"$lolcats" linearize --model "$gguf" --data "$train" --out "$run" --seq-len 1024 --batch-tokens 4096 \
  --stage1-tokens 163840 --stage2-tokens 24576 --quiet
bash "$(dirname "$0")/long_eval.sh" "$run" qwen2.5-coder-0.5b "$limit"
