"""Markdown table of teacher vs linearized evaluation results (the JSON files `lolcats eval --json` writes).
Usage: python benchmarks/eval_table_md.py NAME TEACHER.json LINEARIZED.json [NAME TEACHER.json LINEARIZED.json ...]"""

import json
import sys
from pathlib import Path

args = sys.argv[1:]
lines = []
for name, teacher_path, student_path in zip(args[::3], args[1::3], args[2::3]):
    teacher, student = (json.loads(Path(p).read_text()) for p in (teacher_path, student_path))
    lines += [f"**{name}**", "", "| | n | teacher | linearized | difference |", "|---|---|---|---|---|"]
    for text, ppl in teacher["perplexity"].items():
        other = student["perplexity"][text]
        lines.append(f"| ppl {text} | | {ppl:.3f} | {other:.3f} | ×{other / ppl:.3f} |")
    for task, scores in teacher["tasks"].items():
        mine = student["tasks"][task]
        for metric in ("acc", "acc_norm"):
            if scores.get(metric) is not None:
                lines.append(f"| {task} {metric} | {scores['n']} | {scores[metric]:.4f} | {mine[metric]:.4f} | "
                             f"{mine[metric] - scores[metric]:+.4f} |")
        if "perplexity" in scores:
            lines.append(f"| {task} perplexity | {scores['n']} | {scores['perplexity']:.1f} | {mine['perplexity']:.1f} | "
                         f"×{mine['perplexity'] / scores['perplexity']:.3f} |")
    speed = [f"{task} {student['tasks'][task]['choices_per_minute']:.0f}" for task in student["tasks"]]
    lines += ["", f"Linearized scoring speed (choices/min): {', '.join(speed)}."]
    if "fidelity" in student:
        fid = student["fidelity"]
        per_layer = ", ".join(f"{row['layer']}: {row['attention_mse']:.4g}" for row in fid["layers"])
        lines.append(f"Fidelity on {fid['text']} ({fid['tokens']:,} tokens): KL(teacher ‖ linearized) "
                     f"{fid['kl']:.4f} nats/token; attention MSE per layer {per_layer}.")
    lines.append("")
print("\n".join(lines))
