"""One table of student variants from `lolcats eval --json` files: perplexity, loss by position, MMLU and retrieval
(passkey and multikey accuracy per context, "1k/2k/4k/8k") per row.
Usage: python benchmarks/variants_md.py "LABEL=FILE[:ROW][,FILE[:ROW]...]" ...
ROW picks a baseline row of the file (teacher, window, sinks); without it, the file's model row. Several files of
one row merge (e.g. a text eval and an MMLU eval of the same run). Two more kinds of part add a column:
`manifest=RUN/lolcats.json` or `layers=TEXT` (the layers the row keeps as softmax), and `cache=FILE[:ROW]` (a
`lolcats bench cache --json`: generation-cache MiB per context, of its model row or of ROW: teacher, window,
sinks). Cells a row has no measurement for print —."""

import json
import sys

from lolcats.evaluate.verdict import loss_beyond

MIB = 2**20


def row_of(spec: str) -> dict:
    merged: dict = {}
    for part in spec.split(","):
        kind, _, path = part.rpartition("=")
        if kind == "layers":
            merged["softmax_layers"] = path
            continue
        path, _, name = path.partition(":")
        result = json.load(open(path))
        if kind == "manifest":
            layers = result["conversion"]["softmax_layers"]
            merged["softmax_layers"] = ", ".join(map(str, layers)) if layers else "none"
            continue
        if kind == "cache":
            merged["cache"] = dict(zip(result["contexts"], result[name or "model"]))
            continue
        if kind:
            sys.exit(f"unknown part kind {kind!r} in {spec!r} (manifest=, layers= or cache=)")
        row = result["baselines"][name] if name else result
        for key in ("perplexity", "tasks", "retrieval"):
            merged.setdefault(key, {}).update(row.get(key) or {})
        if row.get("loss_by_position"):
            merged["loss_by_position"] = row["loss_by_position"]
    return merged


def contexts_name(contexts) -> str:
    return "/".join(f"{c // 1024}k" for c in contexts)


rows = {label: row_of(spec) for label, spec in (arg.split("=", 1) for arg in sys.argv[1:])}
edges = next(row["loss_by_position"]["edges"] for row in rows.values() if row.get("loss_by_position"))
shown = [i for i, low in enumerate(edges[:-1]) if low >= 128]  # the buckets past the window of 64 or 128
retrieval_tasks = [task for task in ("passkey", "multikey") if any(task in row.get("retrieval", {}) for row in rows.values())]
contexts = sorted({int(c) for row in rows.values() for task in row.get("retrieval", {}).values()
                   for c in task["by_context"]})
with_layers = any("softmax_layers" in row for row in rows.values())
cache_contexts = sorted({c for row in rows.values() for c in row.get("cache", {})})
header = (["model"] + ["softmax layers"] * with_layers + ["ppl"]
          + [f"loss {edges[i]}-{edges[i + 1]}" for i in shown] + ["loss ≥128", "MMLU 5-shot"]
          + [f"{task} {contexts_name(contexts)}" for task in retrieval_tasks]
          + [f"cache {contexts_name(cache_contexts)} (MiB)"] * bool(cache_contexts))
lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
for label, row in rows.items():
    ppl = next(iter(row.get("perplexity", {}).values()), None)
    mmlu = row.get("tasks", {}).get("mmlu", {}).get("acc")
    cells = [label] + [row.get("softmax_layers", "—")] * with_layers + [f"{ppl:.2f}" if ppl else "—"]
    by_position = row.get("loss_by_position")
    losses = ([by_position["mean_loss"][i] for i in shown] + [loss_beyond(by_position, 128)] if by_position
              else [None] * (len(shown) + 1))
    cells += [f"{value:.3f}" if value is not None else "—" for value in losses]
    cells.append(f"{mmlu:.4f}" if mmlu is not None else "—")
    for task in retrieval_tasks:
        by_context = row.get("retrieval", {}).get(task, {}).get("by_context", {})
        cells.append("/".join(f"{by_context[str(c)]:.1f}" if str(c) in by_context else "—" for c in contexts)
                     if by_context else "—")
    if cache_contexts:
        cache = row.get("cache")
        cells.append(" / ".join(f"{cache[c] / MIB:.2f}" for c in cache_contexts) if cache else "—")
    lines.append("| " + " | ".join(cells) + " |")
print("\n".join(lines))
