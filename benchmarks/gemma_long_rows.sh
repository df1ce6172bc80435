#!/usr/bin/env bash
# Issue 16 on Gemma-3-270M: the default student trained on rows longer than one 384-token sample, scored at 8k
# (wikitext-2, 8 windows of 8,192 tokens, loss by position) and at 512 (benchmarks/gemma_wikitext.py), beside the
# default recipe's run and the untrained window 128 (+ 4 sinks) rows.
#   stream1536: the default recipe (teacher samples, 80k stage-1 tokens) with the samples packed into rows of 1,536
#   wiki2048:   wikitext-2 training articles (qwen_prepare.sh; never the evaluation's first 65,536 tokens) in rows of
#               2,048, 163,840 stage-1 tokens (Qwen's budget); also scored with its LoRA dropped (stage 1 only)
#   window128-sinks4-lora-wiki2048: no linear term, the same stage 2 on the same rows (what stage 2 alone gives)
# Usage: bash benchmarks/gemma_long_rows.sh   (about 2 hours on 2 cores; runs/variants/gemma-lizard must exist:
#        VARIANTS=lizard bash benchmarks/student_variants.sh gemma3-270m 20 -- --config gemma3-270m-cpu)
set -euo pipefail
lolcats=${LOLCATS:-.venv/bin/lolcats}
source "$(dirname "$0")/long_eval_settings.sh"
{ read -r _; read -r train; } < <(bash "$(dirname "$0")/qwen_prepare.sh")
recipe=$(mktemp --suffix .yaml)
sed -e 's/^seq_len: 384/seq_len: 1536/' -e 's/^batch_tokens: 1536/batch_tokens: 3072\npacking: stream/' \
  src/lolcats/configs/gemma3-270m-cpu.yaml > "$recipe"
"$lolcats" linearize --config "$recipe" --out runs/variants/gemma-lizard-stream1536 --quiet
"$lolcats" linearize --config gemma3-270m-cpu --data "$train" --seq-len 2048 --batch-tokens 4096 \
  --stage1-tokens 163840 --out runs/variants/gemma-lizard-wiki2048 --quiet
"$lolcats" linearize --config gemma3-270m-cpu --data "$train" --seq-len 2048 --batch-tokens 4096 \
  --attention window --gate none --stage1-tokens 0 --out runs/variants/gemma-window128-sinks4-lora-wiki2048 --quiet
out=benchmarks/results/gemma3-270m-long-rows
mkdir -p "$out"
PYTHONPATH=src .venv/bin/python benchmarks/long_eval_row.py runs/variants/gemma-lizard-wiki2048 stage1 text \
  "$out/gemma-lizard-wiki2048-stage1-only-text8k.json"
for run in gemma-lizard gemma-lizard-stream1536 gemma-lizard-wiki2048 gemma-window128-sinks4-lora-wiki2048; do
  "$lolcats" eval --model "runs/variants/$run" --tasks none "${long_text[@]}" --no-fidelity --batch-size 8 \
    --json "$out/$run-text8k.json"
done
for row in window sinks; do  # the untrained rows at the default's window of 128
  PYTHONPATH=src .venv/bin/python benchmarks/long_eval_row.py runs/variants/gemma-lizard-wiki2048 "$row" text \
    "$out/window128-$row-text8k.json"
done
GEMMA_WIKITEXT_NAME=gemma3-270m-wikitext2-long-rows PYTHONPATH=src .venv/bin/python benchmarks/gemma_wikitext.py \
  "default (384-token samples)=runs/variants/gemma-lizard" \
  "default, samples packed in rows of 1536=runs/variants/gemma-lizard-stream1536" \
  "default, wikitext-2 rows of 2048=runs/variants/gemma-lizard-wiki2048"
GEMMA_WIKITEXT_NAME=gemma3-270m-wikitext2-long-rows-window-lora PYTHONPATH=src .venv/bin/python benchmarks/gemma_wikitext.py \
  "window 128 + 4 sinks + the same stage 2 (no linear term)=runs/variants/gemma-window128-sinks4-lora-wiki2048"
