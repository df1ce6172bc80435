"""Markdown table of one `lolcats eval --baselines teacher,window,sinks --json` result: a row per measure (perplexity,
categorised tasks, retrieval per context, loss by position bucket, loss beyond the window), a column per model
(teacher, linearized, window, window + sinks), and the verdict against the training-free window + sinks row.
Usage: python benchmarks/long_eval_md.py NAME EVAL.json [NAME EVAL.json ...]"""

import json
import sys
from pathlib import Path

from lolcats.evaluate.verdict import loss_beyond, result_rows, verdict_lines


def cells(rows, pick, spec):
    values = [pick(row) for row in rows.values()]
    return " | ".join("—" if value is None else format(value, spec) for value in values)


def table(name: str, result: dict) -> list[str]:
    rows = result_rows(result)
    window = (result.get("baselines") or {}).get("sinks", {}).get("window")
    lines = [f"**{name}** (`{result['model']}`)", "", "| measure | " + " | ".join(rows) + " |",
             "|---" * (len(rows) + 1) + "|"]
    for text in result["perplexity"]:
        lines.append(f"| perplexity {text} | {cells(rows, lambda r: r['perplexity'].get(text), '.3f')} |")
    for task, scores in result["tasks"].items():
        n = scores.get("n")
        lines.append(f"| {task} acc (n={n}) | {cells(rows, lambda r: r['tasks'].get(task, {}).get('acc'), '.4f')} |")
        if "macro_acc" in scores:
            lines.append(f"| {task} macro acc ({len(scores['categories'])} categories) | "
                         f"{cells(rows, lambda r: r['tasks'].get(task, {}).get('macro_acc'), '.4f')} |")
    for task, scores in (result.get("retrieval") or {}).items():
        for context in scores["by_context"]:
            lines.append(f"| {task} {context} tokens ({len(scores['depths'])} depths x {scores.get('trials', 1)}) | "
                         f"{cells(rows, lambda r: r.get('retrieval', {}).get(task, {}).get('by_context', {}).get(context), '.2f')} |")
    if "loss_by_position" in result:
        curve = result["loss_by_position"]
        for i, (low, high) in enumerate(zip(curve["edges"], curve["edges"][1:])):
            lines.append(f"| loss at positions {low}-{high} | "
                         f"{cells(rows, lambda r: r.get('loss_by_position', {}).get('mean_loss', [None] * 99)[i], '.4f')} |")
        if window:
            lines.append(f"| loss at positions >= {2 * window} | "
                         f"{cells(rows, lambda r: loss_beyond(r['loss_by_position'], 2 * window) if 'loss_by_position' in r else None, '.4f')} |")
    lines += [""] + [f"- {line}" for line in verdict_lines(result)] + [""]
    return lines


args = sys.argv[1:]
out = []
for name, path in zip(args[::2], args[1::2]):
    out += table(name, json.loads(Path(path).read_text()))
print("\n".join(out))
