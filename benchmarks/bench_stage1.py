"""Stage-1 (attention transfer) step throughput and peak memory on the reference model, beside the
teacher's plain forward (with logits), batch 1, on the CPU (2 threads,
fp32 by default) or a GPU (benchmarks/gpu_check.sh runs it on cuda in bf16). Each configuration runs in a
fresh subprocess; the results are rewritten after each, so a run cut short keeps its rows.

Usage: python benchmarks/bench_stage1.py [--lengths 512,2048,4096,16384] [--device cpu|cuda] [--dtype float32|bfloat16]
       [--timeout SECONDS] [--out benchmarks/results/stage1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def child(kind: str, length: int, repeats: int, device: str, dtype: str) -> dict:
    import torch

    import lolcats
    from lolcats.training.transfer import transfer_loss_fn, transfer_parameters
    from reference_model import reference_model
    from steps import median_seconds, peak_memory, random_batch, reset_peak_memory, teacher_forward, training_step

    model = reference_model()
    if kind == "stage1_step":
        lolcats.convert(model)  # φ and γ stay fp32 when the model moves to bf16
    model = model.to(device, getattr(torch, dtype))
    batch = random_batch(8192, 1, length, device)
    if kind == "teacher_forward":
        step = teacher_forward(model, batch)
    else:
        step = training_step(transfer_parameters(model), transfer_loss_fn(model), batch, lr=1e-2)
    reset_peak_memory(device)
    seconds = median_seconds(step, repeats, device)
    return {"kind": kind, "length": length, "device": device, "dtype": dtype, "seconds": seconds,
            "tokens_per_s": length / seconds, **peak_memory(device)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="512,2048,4096,16384")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/stage1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per configuration (its row records the timeout)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.repeats, args.device, args.dtype)))
        return
    rows = []
    for length in map(int, args.lengths.split(",")):
        for kind in ("teacher_forward", "stage1_step"):
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--repeats", str(args.repeats),
                   "--device", args.device, "--dtype", args.dtype, "--child", kind, str(length)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                      env={**os.environ, "PYTHONPATH": os.pathsep.join(["src", os.environ.get("PYTHONPATH", "")])})
            except subprocess.TimeoutExpired:
                rows.append({"kind": kind, "length": length, "error": f"timed out after {args.timeout:.0f} s"})
            else:
                if done.returncode:
                    rows.append({"kind": kind, "length": length, "error": done.stderr.strip().splitlines()[-1]})
                else:
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
            write(args, rows)  # after every row: a run cut short keeps what it measured
    print(write(args, rows))


def write(args, rows: list[dict]) -> str:
    # The official code's numbers were measured here on the CPU in fp32 (README); elsewhere they do not apply.
    official = {512: 1027, 2048: 208} if args.device == "cpu" and args.dtype == "float32" else {}
    memory = "peak_device_gib" if args.device.startswith("cuda") else "peak_rss_gib"
    lines = [f"Stage 1 on the reference model, {args.device}, {args.dtype}, batch 1, median of {args.repeats}.", "",
             "| L | teacher forward tok/s | stage-1 step tok/s | stage-1 / teacher | stage-1 / official (208 tok/s at "
             f"2048, 1027 at 512) | teacher {memory} | stage-1 {memory} |", "|---|---|---|---|---|---|---|"]

    def cell(row, key, fmt):
        return format(row[key], fmt) if row and row.get(key) is not None else row.get("error", "–") if row else "–"
    for length in map(int, args.lengths.split(",")):
        t = next((r for r in rows if r["kind"] == "teacher_forward" and r["length"] == length), None)
        s = next((r for r in rows if r["kind"] == "stage1_step" and r["length"] == length), None)
        measured = t and s and "tokens_per_s" in t and "tokens_per_s" in s
        ratio = f"{s['tokens_per_s'] / t['tokens_per_s']:.2f}" if measured else "–"
        vs_official = f"{s['tokens_per_s'] / official[length]:.1f}×" if length in official and s and "tokens_per_s" in s else "–"
        lines.append(f"| {length} | {cell(t, 'tokens_per_s', '.0f')} | {cell(s, 'tokens_per_s', '.0f')} | {ratio} | "
                     f"{vs_official} | {cell(t, memory, '.2f')} | {cell(s, memory, '.2f')} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"threads": args.threads, "device": args.device, "dtype": args.dtype,
                                                    "rows": rows}, indent=2))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
