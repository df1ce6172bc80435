"""One table of student variants from `lolcats eval --json` files: perplexity, loss by position, MMLU and retrieval
(passkey and multikey accuracy per context, "1k/2k/4k/8k") per row.
Usage: python benchmarks/variants_md.py "LABEL=FILE[:ROW][,FILE[:ROW]...]" ...
ROW picks a baseline row of the file (teacher, window, sinks); without it, the file's model row. Several files of
one row merge (e.g. a text eval and an MMLU eval of the same run). Cells a row has no measurement for print —."""

import json
import sys

from lolcats.evaluate.verdict import loss_beyond


def row_of(spec: str) -> dict:
    merged: dict = {}
    for part in spec.split(","):
        path, _, name = part.partition(":")
        result = json.load(open(path))
        row = result["baselines"][name] if name else result
        for key in ("perplexity", "tasks", "retrieval"):
            merged.setdefault(key, {}).update(row.get(key) or {})
        if row.get("loss_by_position"):
            merged["loss_by_position"] = row["loss_by_position"]
    return merged


rows = {label: row_of(spec) for label, spec in (arg.split("=", 1) for arg in sys.argv[1:])}
edges = next(row["loss_by_position"]["edges"] for row in rows.values() if row.get("loss_by_position"))
shown = [i for i, low in enumerate(edges[:-1]) if low >= 128]  # the buckets past the window of 64 or 128
retrieval_tasks = [task for task in ("passkey", "multikey") if any(task in row.get("retrieval", {}) for row in rows.values())]
contexts = sorted({int(c) for row in rows.values() for task in row.get("retrieval", {}).values()
                   for c in task["by_context"]})
context_names = "/".join(f"{c // 1024}k" for c in contexts)
header = (["model", "ppl"] + [f"loss {edges[i]}-{edges[i + 1]}" for i in shown] + ["loss ≥128", "MMLU 5-shot"]
          + [f"{task} {context_names}" for task in retrieval_tasks])
lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
for label, row in rows.items():
    ppl = next(iter(row.get("perplexity", {}).values()), None)
    mmlu = row.get("tasks", {}).get("mmlu", {}).get("acc")
    cells = [label, f"{ppl:.2f}" if ppl else "—"]
    by_position = row.get("loss_by_position")
    losses = ([by_position["mean_loss"][i] for i in shown] + [loss_beyond(by_position, 128)] if by_position
              else [None] * (len(shown) + 1))
    cells += [f"{value:.3f}" if value is not None else "—" for value in losses]
    cells.append(f"{mmlu:.4f}" if mmlu is not None else "—")
    for task in retrieval_tasks:
        by_context = row.get("retrieval", {}).get(task, {}).get("by_context", {})
        cells.append("/".join(f"{by_context[str(c)]:.1f}" if str(c) in by_context else "—" for c in contexts)
                     if by_context else "—")
    lines.append("| " + " | ".join(cells) + " |")
print("\n".join(lines))
