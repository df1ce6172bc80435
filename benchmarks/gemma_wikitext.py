"""Gemma-3-270M on wikitext-2 (shared/data protocol: first 16,384 tokens, 512-token windows, BOS + window):
teacher, the trained default run (lolcats-out/), and the untrained softmax-window ablation.
Usage: PYTHONPATH=src python benchmarks/gemma_wikitext.py [RUN_DIR]"""

import json
import sys
from pathlib import Path

import torch

import lolcats
from lolcats.evaluate import perplexity

torch.set_num_threads(2)
run_dir = sys.argv[1] if len(sys.argv) > 1 else "lolcats-out"
text = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_valid_tok.txt"
tokenizer = lolcats.load_tokenizer("gemma3-270m")
kwargs = dict(seq_len=512, protocol="bos-window", max_tokens=16384, batch_size=2)
rows = {}
teacher = lolcats.load_base_model("gemma3-270m")
rows["teacher"] = perplexity(teacher, tokenizer, text, **kwargs).ppl
rows["window (untrained, no linear term)"] = perplexity(lolcats.convert(teacher, attention="window"), tokenizer, text, **kwargs).ppl
del teacher
rows[f"lolcats ({run_dir})"] = perplexity(lolcats.load(run_dir), tokenizer, text, **kwargs).ppl
lines = ["| model | wikitext-2 ppl | ratio |", "|---|---|---|"]
lines += [f"| {name} | {ppl:.2f} | ×{ppl / rows['teacher']:.3f} |" for name, ppl in rows.items()]
Path("benchmarks/results/gemma3-270m-wikitext2.md").write_text("\n".join(lines) + "\n")
Path("benchmarks/results/gemma3-270m-wikitext2.json").write_text(json.dumps(rows, indent=2))
print("\n".join(lines))
