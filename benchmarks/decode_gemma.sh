#!/usr/bin/env bash
# Decode benchmark of issue 4 on Gemma-3-270M: the default job's output (RUN_DIR, default runs/gemma-default,
# from `lolcats linearize --out runs/gemma-default`) against its GGUF teacher, 2 threads.
# Usage: bash benchmarks/decode_gemma.sh [RUN_DIR] [CONTEXTS]   (about 10 minutes on 2 cores)
set -euo pipefail
run=${1:-runs/gemma-default}
contexts=${2:-1024,4096,8192}
lolcats=${LOLCATS:-.venv/bin/lolcats}
"$lolcats" bench decode --model "$run" --contexts "$contexts" --threads 2 --new-tokens 8 \
  --json benchmarks/results/decode-gemma3-270m.json --plot benchmarks/results/decode-gemma3-270m.png
