#!/usr/bin/env bash
# The stories260k quality table of the README: ours against the baselines on the same budget.
# Usage: bash benchmarks/stories260k_table.sh [OUT_DIR]   (about 12 minutes on 2 cores)
set -euo pipefail
out=${1:-runs/stories260k-table}
lolcats=${LOLCATS:-.venv/bin/lolcats}
common=(--config stories260k-cpu --quiet)
"$lolcats" linearize "${common[@]}" --out "$out/lolcats"
"$lolcats" linearize "${common[@]}" --out "$out/lora-only" --stage1-tokens 0
"$lolcats" linearize "${common[@]}" --out "$out/linear" --attention linear
"$lolcats" linearize "${common[@]}" --out "$out/window" --attention window --stage1-tokens 0 --stage2-tokens 0
"$lolcats" linearize "${common[@]}" --out "$out/lolcats-stage1-only" --stage2-tokens 0
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
rows = []
for run in ["lolcats", "lolcats-stage1-only", "lora-only", "linear", "window"]:
    m = json.loads((Path(sys.argv[1]) / run / "lolcats.json").read_text())
    ppl = {Path(k).name: v for k, v in m["metrics"]["perplexity"].items()}
    valid, held = ppl["tinystories_valid.txt"], ppl["held-out split"]
    s1 = m["stages"].get("stage1", {}).get("tokens", 0); s2 = m["stages"].get("stage2", {}).get("tokens", 0)
    rows.append(f"| {run} | {m['conversion']['attention']} | {s1:,} | {s2:,} | {valid['teacher']:.3f} | "
                f"{valid['linearized']:.3f} | ×{valid['ratio']:.4f} | ×{held['ratio']:.4f} |")
table = ["| run | attention | stage-1 tokens | stage-2 tokens | teacher ppl | linearized ppl | ratio | held-out ratio |",
         "|---|---|---|---|---|---|---|---|"] + rows
Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
Path("benchmarks/results/stories260k.md").write_text("\n".join(table) + "\n")
print("\n".join(table))
PY
