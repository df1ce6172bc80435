"""A trained run's perplexity and loss by position at 8k on wikitext-2 with its LoRA dropped (stage 1 only), in the
settings of benchmarks/long_eval.sh: separates what the linear term gains from what stage 2's adapters move at every
position (including the first 128, where every layer is exact softmax).
Usage: PYTHONPATH=src python benchmarks/stage1_only_row.py RUN OUT.json"""
import json, sys, time
from pathlib import Path
import lolcats
from lolcats.artifacts import tokenizer_for
from lolcats.convert import merge_lora
from lolcats.evaluate.runner import _evaluate
run, out = sys.argv[1], sys.argv[2]
shared = Path(__file__).resolve().parents[2] / "shared" / "data"
model = lolcats.load(run, merge=False)
merge_lora(model, merge=False)  # drop the adapters: the base weights and stage 1's φ, γ and gate only
started = time.perf_counter()
row = _evaluate(model, tokenizer_for(run), texts=[f"{shared}/wikitext2_valid_tok.txt"], loaded_tasks=[], limit=20,
                num_fewshot=5, seq_len=8192, stride=None, max_text_tokens=65536, batch_size=8, position_edges=[],
                retrieval={"tasks": [], "contexts": [], "depths": [], "trials": 1, "seed": 0},
                echo=lambda line: print("  [stage 1 only]", line, flush=True))
json.dump({"run": run, "lora": "dropped", **row, "seconds": time.perf_counter() - started}, open(out, "w"), indent=2)
