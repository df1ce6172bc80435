"""Gemma-3-270M on wikitext-2 (shared/data protocol: first 16,384 tokens, 512-token windows, BOS + window):
the teacher, the untrained softmax window with and without 4 sink tokens, and any number of trained runs, same
recipe and budget.
Usage: PYTHONPATH=src python benchmarks/gemma_wikitext.py LABEL=RUN_DIR [LABEL=RUN_DIR ...]
e.g.   lolcats=runs/gemma-default "LoRA only=runs/gemma-lora-only" "linear (no window)=runs/gemma-linear"
GEMMA_WIKITEXT_NAME=NAME writes benchmarks/results/NAME.{md,json} (default gemma3-270m-wikitext2).
"""

import json
import os
import sys
from pathlib import Path

import torch

import lolcats
from lolcats.evaluate import perplexity

torch.set_num_threads(2)
runs = dict(arg.split("=", 1) for arg in sys.argv[1:]) or {"lolcats": "lolcats-out"}
text = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_valid_tok.txt"
tokenizer = lolcats.load_tokenizer("gemma3-270m")
kwargs = dict(seq_len=512, protocol="bos-window", max_tokens=16384, batch_size=2)
rows = {}
teacher = lolcats.load_base_model("gemma3-270m")
rows["teacher"] = perplexity(teacher, tokenizer, text, **kwargs).ppl
window = lolcats.LinearizeConfig().window  # the default student's, which the baselines must match
rows[f"window {window} (untrained, no linear term)"] = perplexity(lolcats.convert(teacher, attention="window", sinks=0), tokenizer, text, **kwargs).ppl
teacher = lolcats.load_base_model("gemma3-270m")  # convert() swapped the layers of the first copy
rows[f"window {window} + 4 sinks (untrained)"] = perplexity(lolcats.convert(teacher, attention="window", sinks=4), tokenizer, text, **kwargs).ppl
del teacher
budgets = {}
for label, run_dir in runs.items():
    manifest = json.loads((Path(run_dir) / "lolcats.json").read_text())
    budgets[label] = {stage: manifest["stages"].get(stage, {}).get("tokens", 0) for stage in ("stage1", "stage2")}
    rows[label] = perplexity(lolcats.load(run_dir), tokenizer, text, **kwargs).ppl
lines = ["| model | stage-1 tokens | stage-2 tokens | wikitext-2 ppl | ratio |", "|---|---|---|---|---|"]
for name, ppl in rows.items():
    budget = budgets.get(name, {"stage1": 0, "stage2": 0})
    lines.append(f"| {name} | {budget['stage1']:,} | {budget['stage2']:,} | {ppl:.2f} | ×{ppl / rows['teacher']:.3f} |")
name = os.environ.get("GEMMA_WIKITEXT_NAME", "gemma3-270m-wikitext2")
Path(f"benchmarks/results/{name}.md").write_text("\n".join(lines) + "\n")
Path(f"benchmarks/results/{name}.json").write_text(json.dumps({"ppl": rows, "budgets": budgets}, indent=2))
print("\n".join(lines))
