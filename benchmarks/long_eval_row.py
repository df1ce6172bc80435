"""One baseline row of benchmarks/long_eval.sh for a run, or part of it, in its own process (same code and
settings as the `lolcats eval` of the other rows). Usage: long_eval_row.py SPEC ROW PARTS OUT (PARTS: any of
text,mmlu,retrieval). ROW: teacher, window, sinks, or stage1 (the run with its LoRA dropped: what stage 1 alone
gives, apart from what stage 2's adapters move at every position)"""
import json, sys, time
from pathlib import Path
import lolcats
from lolcats.artifacts import tokenizer_for
from lolcats.convert import merge_lora
from lolcats.evaluate.runner import _evaluate, baseline_model
from lolcats.evaluate.tasks import load_task
spec, name, parts, out = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
shared = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared beside the clone, as long_eval.sh
tokenizer = tokenizer_for(spec)
if name == "stage1":
    model = lolcats.load(spec, merge=False)
    merge_lora(model, merge=False)  # drop the adapters: the base weights and stage 1's φ, γ and gate only
else:
    model = baseline_model(spec, name)
started = time.perf_counter()
row = _evaluate(model, tokenizer, texts=[f"{shared}/wikitext2_valid_tok.txt"] if "text" in parts else [],
                loaded_tasks=[load_task(f"{shared}/eval/mmlu.jsonl")] if "mmlu" in parts else [],
                limit=20, num_fewshot=5, seq_len=8192, stride=None, max_text_tokens=65536, batch_size=8,
                position_edges=[] if "text" in parts else None,
                retrieval={"tasks": ["passkey", "multikey"] if "retrieval" in parts else [],
                           "contexts": [1024, 2048, 4096, 8192], "depths": [0.1, 0.3, 0.5, 0.7, 0.9], "trials": 1,
                           "seed": 0},
                echo=lambda line: print(f"  [{name}]", line, flush=True))
settings = getattr(model, "lolcats_config", None)  # the teacher row is the base model, with no window
attention = {"window": settings.window, "sinks": settings.sinks} if settings is not None else {}
json.dump({**attention, **row, "seconds": time.perf_counter() - started}, open(out, "w"), indent=2)
