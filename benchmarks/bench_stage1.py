"""Stage-1 (attention transfer) step throughput and peak memory on the reference model, beside the
teacher's plain forward, batch 1, fp32, 2 threads. Each configuration runs in a fresh subprocess.

Usage: python benchmarks/bench_stage1.py [--lengths 512,2048,4096,16384] [--out benchmarks/results/stage1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def child(kind: str, length: int, repeats: int) -> dict:
    import torch

    import lolcats
    from lolcats.data import Batch
    from lolcats.stages.transfer import transfer_loss_fn, transfer_parameters
    from reference_model import reference_model

    model = reference_model()
    ids = torch.randint(0, 8192, (1, length), generator=torch.Generator().manual_seed(0))
    if kind == "teacher_forward":
        def step():
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
    else:
        lolcats.convert(model)
        params = transfer_parameters(model)
        optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
        loss_fn = transfer_loss_fn(model)
        batch = Batch(ids, torch.ones_like(ids), ids.clone())

        def step():
            loss = loss_fn(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {"kind": kind, "length": length, "seconds": seconds, "tokens_per_s": length / seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="512,2048,4096,16384")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/stage1")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.repeats)))
        return
    rows = []
    for length in map(int, args.lengths.split(",")):
        for kind in ("teacher_forward", "stage1_step"):
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--repeats", str(args.repeats),
                   "--child", kind, str(length)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"})
            if done.returncode:
                rows.append({"kind": kind, "length": length, "error": done.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = ["| L | teacher forward tok/s | stage-1 step tok/s | stage-1 / official (208 tok/s at 2048, 1027 at 512) | stage-1 peak RSS GiB |",
             "|---|---|---|---|---|"]
    official = {512: 1027, 2048: 208}
    for length in map(int, args.lengths.split(",")):
        t = next(r for r in rows if r["kind"] == "teacher_forward" and r["length"] == length)
        s = next(r for r in rows if r["kind"] == "stage1_step" and r["length"] == length)
        ratio = f"{s['tokens_per_s'] / official[length]:.1f}×" if length in official and "tokens_per_s" in s else "–"
        lines.append(f"| {length} | {t.get('tokens_per_s', 0):.0f} | {s.get('tokens_per_s', 0):.0f} | {ratio} | "
                     f"{s.get('peak_rss_gib', 0):.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
