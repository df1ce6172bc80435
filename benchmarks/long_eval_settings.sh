# The settings every long-context row in the README is scored with, sourced by the benchmark scripts so that their
# rows stay comparable (benchmarks/long_eval_row.py holds the same numbers for one row in its own process).
#   long_text:      wikitext-2 validation in 8 windows of 8,192 tokens, loss by position
#   long_retrieval: passkey and multikey prompts at 1k-8k tokens, 5 depths, one prompt each (with --tasks and --task-dir)
#   mmlu_5shot:     MMLU 5-shot (with --tasks mmlu, --task-dir and --limit)
shared=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/shared
long_text=(--seq-len 8192 --text "$shared/data/wikitext2_valid_tok.txt" --max-text-tokens 65536 --position-buckets)
long_retrieval=(--contexts 1024,2048,4096,8192 --depths 0.1,0.3,0.5,0.7,0.9)
mmlu_5shot=(--num-fewshot 5)
