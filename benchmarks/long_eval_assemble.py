"""Combine what `lolcats eval` printed (benchmarks/long_eval.sh on /tmp/qwen-run: linearized and teacher rows, the
window row's retrieval) with the window and window + sinks rows computed apart (same code and settings, one thread
each): their retrieval from one process's log, their perplexity and loss by position from JSON. Their MMLU is not in
these inputs (None); it came later from benchmarks/long_eval_row.py and was merged into the JSON by hand."""
import json, re, sys
log_a, log_b, window_text, sinks_text, out = sys.argv[1:6]
rows = {}

def parse(path, default):
    current = default
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        m = re.match(r"baseline (\w+) \(window (\w+), sinks (\w+)\):", line)
        if m:
            current = m.group(1)
            rows.setdefault(current, {}).update(window=None if m.group(2) == "None" else int(m.group(2)),
                                                sinks=None if m.group(3) == "None" else int(m.group(3)))
            continue
        m = re.match(r"  \[(\w+)\] (.*)$", line)
        name, text = (m.group(1), m.group(2)) if m else (default, line)
        if not m and default != "linearized":
            continue
        row = rows.setdefault(name, {})
        for key in ("perplexity", "tasks", "retrieval"):
            row.setdefault(key, {})
        if m2 := re.match(r"(passkey|multikey)\s+(\d+) tokens: (.*)  mean ([\d.]+)", text):
            task = row["retrieval"].setdefault(m2.group(1), {"contexts": [], "depths": [], "accuracy": [],
                                                             "by_context": {}, "trials": 1})
            pairs = [p.split(":") for p in m2.group(3).split()]
            task["contexts"].append(int(m2.group(2)))
            task["depths"] = [float(d) for d, _ in pairs]
            task["accuracy"].append([float(a) for _, a in pairs])
            task["by_context"][m2.group(2)] = float(m2.group(4))
        elif m2 := re.match(r"perplexity (\S+): ([\d.]+) \(", text):
            row["perplexity"][m2.group(1)] = float(m2.group(2))
        elif m2 := re.match(r"mmlu: acc ([\d.]+), acc_norm ([\d.]+) \(n=(\d+)", text):
            # 20 items in each of the 57 categories: the macro average over categories is the overall accuracy
            row["tasks"]["mmlu"] = {"acc": float(m2.group(1)), "acc_norm": float(m2.group(2)), "n": int(m2.group(3)),
                                    "macro_acc": float(m2.group(1)), "categories": {str(i): None for i in range(57)}}
        elif m2 := re.match(r"loss by position on (\S+): (\d+) windows of (\d+) tokens, (.*)", text):
            buckets = [item.rsplit(" ", 1) for item in m2.group(4).split(", ")]
            edges = [int(b.split("-")[0]) for b, _ in buckets] + [int(buckets[-1][0].split("-")[1])]
            row["loss_by_position"] = {"text": m2.group(1), "edges": edges, "mean_loss": [float(v) for _, v in buckets],
                                       "windows": int(m2.group(2)), "seq_len": int(m2.group(3))}

parse(log_a, "linearized")
parse(log_b, "sinks")
for name, path in (("window", window_text), ("sinks", sinks_text)):
    part = json.load(open(path))
    rows[name]["perplexity"] = part["perplexity"]
    rows[name]["loss_by_position"] = part["loss_by_position"]
    rows[name].update(window=part["window"], sinks=part["sinks"])
tokens = rows["sinks"]["loss_by_position"]["tokens"]
for row in rows.values():
    assert row["loss_by_position"]["edges"] == rows["sinks"]["loss_by_position"]["edges"]
    row["loss_by_position"].setdefault("tokens", tokens)  # same windows and edges: the same tokens per bucket
for row in rows.values():
    for task in row.get("retrieval", {}).values():
        task["mean"] = sum(task["by_context"].values()) / len(task["by_context"])
main = rows.pop("linearized")
result = {"model": "/tmp/qwen-run", "kind": "linearized", **main,
          "baselines": {name: rows[name] for name in ("teacher", "window", "sinks")},
          "assembled": __doc__.replace("\n", " ")}
json.dump(result, open(out, "w"), indent=2)
print({k: v["perplexity"] for k, v in [("linearized", main), *rows.items()]})
