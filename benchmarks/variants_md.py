"""One table of student variants from `lolcats eval --json` files: perplexity, loss by position and MMLU per row.
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
        for key in ("perplexity", "tasks"):
            merged.setdefault(key, {}).update(row.get(key) or {})
        if row.get("loss_by_position"):
            merged["loss_by_position"] = row["loss_by_position"]
    return merged


rows = {label: row_of(spec) for label, spec in (arg.split("=", 1) for arg in sys.argv[1:])}
edges = next(row["loss_by_position"]["edges"] for row in rows.values() if row.get("loss_by_position"))
shown = [i for i, low in enumerate(edges[:-1]) if low >= 128]  # the buckets past the window of 64 or 128
header = ["model", "ppl"] + [f"loss {edges[i]}-{edges[i + 1]}" for i in shown] + ["loss ≥128", "MMLU 5-shot"]
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
    lines.append("| " + " | ".join(cells) + " |")
print("\n".join(lines))
