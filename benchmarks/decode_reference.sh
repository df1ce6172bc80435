#!/usr/bin/env bash
# Decode benchmark of issue 4 on the reference model of DEVELOPERS.md (random Llama, 34M parameters, fp32):
# save it as a local folder (with stories260k's tokenizer, for the training data), linearize it with a
# short stage 1, then `lolcats bench decode` against its teacher on 2 threads.
# Usage: bash benchmarks/decode_reference.sh [CONTEXTS]   (about 15 minutes on 2 cores)
set -euo pipefail
contexts=${1:-1024,4096,16384,32768}
python=${PYTHON:-.venv/bin/python}
lolcats=${LOLCATS:-.venv/bin/lolcats}
shared=$(cd "$(dirname "$0")/../.." && pwd)/shared
"$python" - "$shared" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from transformers import AutoTokenizer
from reference_model import reference_model
out = Path("runs/reference-model")
reference_model().save_pretrained(out)
AutoTokenizer.from_pretrained(Path(sys.argv[1]) / "models" / "stories260k").save_pretrained(out)
PY
"$lolcats" linearize --model runs/reference-model --data "$shared/data/stories260k_samples.txt" \
  --out runs/reference-linearized --seq-len 512 --stage1-tokens 16384 --stage2-tokens 0 --quiet
"$lolcats" bench decode --model runs/reference-linearized --contexts "$contexts" --threads 2 --new-tokens 32 \
  --json benchmarks/results/decode-reference.json --plot benchmarks/results/decode-reference.png
