#!/usr/bin/env bash
# Block-wise stage 1 against joint stage 1 on stories260k, the stories260k-cpu recipe (300k stage-1 tokens,
# 100k stage-2 tokens): block size 1 and 2 (bf16 stored activations) beside joint training.
# Usage: bash benchmarks/blockwise_stories260k.sh [OUT_DIR]   (about 15 minutes on 2 cores)
set -euo pipefail
out=${1:-runs/blockwise-stories260k}
lolcats=${LOLCATS:-.venv/bin/lolcats}
common=(--config stories260k-cpu --quiet)
for k in 1 2; do
  start=$(date +%s)
  "$lolcats" linearize "${common[@]}" --out "$out/blockwise-$k" --blockwise --block-size "$k"
  echo $(( $(date +%s) - start )) > "$out/blockwise-$k/wall_s"
done
if [ ! -f "$out/joint/lolcats.json" ]; then
  start=$(date +%s)
  "$lolcats" linearize "${common[@]}" --out "$out/joint"
  echo $(( $(date +%s) - start )) > "$out/joint/wall_s"
fi
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for run, label in [("joint", "joint"), ("blockwise-2", "block-wise, K = 2 (3 blocks)"), ("blockwise-1", "block-wise, K = 1 (5 blocks)")]:
    m = json.loads((out / run / "lolcats.json").read_text())
    ppl = {Path(k).name: v for k, v in m["metrics"]["perplexity"].items()}
    valid, held = ppl["tinystories_valid.txt"], ppl["held-out split"]
    stage1 = m["stages"]["stage1"]
    acts = sum(f.stat().st_size for f in (out / run / "blockwise" / "activations").rglob("shard-*")) if run != "joint" else 0
    rows.append(f"| {label} | {stage1['tokens']:,} | {stage1['seconds']:.0f} | {acts / 2**20:,.0f} | "
                f"{int((out / run / 'wall_s').read_text())} | {valid['teacher']:.3f} | {valid['linearized']:.3f} | "
                f"×{valid['ratio']:.4f} | ×{held['ratio']:.4f} |")
table = ["| stage 1 | stage-1 tokens trained (all blocks) | stage-1 s | stored activations (MiB) | total wall s | "
         "teacher ppl | linearized ppl | ratio | held-out ratio |", "|---|---|---|---|---|---|---|---|---|"] + rows
Path("benchmarks/results/blockwise-stories260k.md").write_text("\n".join(table) + "\n")
print("\n".join(table))
PY
