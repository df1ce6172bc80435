"""One process vs two CPU processes (torchrun, gloo; DDP and FSDP) on the same global batch: wall time and
loss curves of both stages. Usage: python benchmarks/distributed_stories260k.py [OUT_DIR]  (about 4 minutes)

The one-process run gets both cores (2 threads); each of the two processes gets one.
Writes benchmarks/results/distributed-stories260k.{json,png}.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SETTINGS = {"model": str(SHARED / "models" / "stories260k"), "data": [str(SHARED / "data" / "stories260k_samples.txt")],
            "seq_len": 512, "packing": "stream", "batch_tokens": 2048, "eval_tokens": 8192, "eval_every": 10,
            "checkpoint_every": 10, "held_out": 0.02, "stage1_tokens": 80_000, "stage2_tokens": 24_000,
            "stage1_lr": 0.06, "lr_decay": "cosine", "stage2_lr": 0.001, "stage2_loss": "kl"}


def run(label: str, out: Path, processes: int, extra: dict) -> dict:
    config = out / f"{label}.yaml"
    config.write_text(yaml.safe_dump({**SETTINGS, **extra}))
    lolcats = ["-m", "lolcats.cli", "linearize", "--config", str(config), "--out", str(out / label), "--quiet"]
    if processes == 1:
        command, threads = [sys.executable, *lolcats], "2"
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *lolcats]
        threads = "1"
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": threads}, capture_output=True)
    wall = time.perf_counter() - started
    manifest = json.loads((out / label / "lolcats.json").read_text())
    curves = {stage: [json.loads(line) for line in (out / label / "logs" / f"{stage}.jsonl").read_text().splitlines()]
              for stage in ("stage1", "stage2")}
    return {"label": label, "processes": processes, "wall_s": round(wall, 1),
            "stage_seconds": {s: round(manifest["stages"][s]["seconds"], 1) for s in ("stage1", "stage2")},
            "ppl_ratio_held_out": manifest["metrics"]["perplexity"]["held-out split"]["ratio"],
            "curves": {s: [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows] for s, rows in curves.items()}}


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "runs" / "distributed")
    out.mkdir(parents=True, exist_ok=True)
    results = [run("one-process", out, 1, {}), run("two-processes-ddp", out, 2, {}),
               run("two-processes-fsdp", out, 2, {"parallel": "fsdp"})]
    reference = results[0]["curves"]
    for result in results[1:]:
        worst = 0.0
        for stage in reference:
            for a, b in zip(reference[stage], result["curves"][stage]):
                for x, y in zip(a[1:], b[1:]):
                    if x is not None:
                        worst = max(worst, abs(x - y) / abs(x))
        result["max_relative_loss_difference_vs_one_process"] = worst
    results_dir = ROOT / "benchmarks" / "results"
    (results_dir / "distributed-stories260k.json").write_text(json.dumps({"settings": SETTINGS, "runs": results}, indent=1) + "\n")
    plot(results, results_dir / "distributed-stories260k.png")
    for r in results:
        print(f"{r['label']}: wall {r['wall_s']} s, stage 1 {r['stage_seconds']['stage1']} s, stage 2 "
              f"{r['stage_seconds']['stage2']} s, held-out ppl x{r['ppl_ratio_held_out']:.4f}, max rel loss diff "
              f"{r.get('max_relative_loss_difference_vs_one_process', 0):.2e}")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, stage in zip(axes, ("stage1", "stage2")):
        for r, style in zip(results, ("-", "--", ":")):
            points = [(step, loss) for step, loss, _ in r["curves"][stage] if loss is not None]
            ax.plot(*zip(*points), style, label=f"{r['label']} ({r['wall_s']:.0f} s total)")
        ax.set_title(f"{stage} training loss (global batch 2048 tokens)")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
