"""Stage-1 and stage-2 training-step throughput beside the teacher's plain forward (with logits), measured in
one process per configuration, in fp32 and bf16, on the reference model or a real teacher.

Each row: tokens/s of the teacher forward (no grad, logits for every position, as `model(ids).logits`),
a stage-1 step (attention transfer: distill forward + backward + AdamW) and a stage-2 step (LoRA, CE or KL
to the teacher: forward(s) + backward + AdamW), median of --repeats after one warm-up step.

Usage: python benchmarks/bench_stages.py --model reference|SPEC --seq-len 512 --rows 2 --dtypes float32,bfloat16
       [--threads 2] [--repeats 3] [--recompute] [--out benchmarks/results/stages-NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def child(model_spec: str, dtype_name: str, seq_len: int, rows: int, repeats: int, recompute: bool) -> dict:
    import lolcats
    from lolcats.models import DTYPES
    from lolcats.convert import add_lora, lora_parameters
    from lolcats.training.lora import lm_loss_fn, recompute_layers_in_backward, teacher_kl_loss_fn
    from lolcats.training.transfer import transfer_loss_fn, transfer_parameters
    from steps import median_seconds, random_batch, teacher_forward, training_step

    dtype = DTYPES[dtype_name]
    if model_spec == "reference":
        from reference_model import reference_model

        model = reference_model().to(dtype)
    else:
        model = lolcats.load_base_model(model_spec, dtype=dtype)
    batch = random_batch(model.config.get_text_config(decoder=True).vocab_size, rows, seq_len)

    def timed(step) -> float:
        return rows * seq_len / median_seconds(step, repeats)

    result = {"model": model_spec, "dtype": dtype_name, "seq_len": seq_len, "rows": rows,
              "teacher_forward_tok_s": timed(teacher_forward(model, batch))}
    lolcats.convert(model)
    result["stage1_tok_s"] = timed(training_step(transfer_parameters(model), transfer_loss_fn(model), batch))
    lolcats.set_attention_mode(model, "linear")
    for p in model.parameters():
        p.requires_grad_(False)
    add_lora(model, rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    result["stage2_ce_tok_s"] = timed(training_step(lora_parameters(model), lm_loss_fn(model), batch))
    result["stage2_kl_tok_s"] = timed(training_step(lora_parameters(model), teacher_kl_loss_fn(model), batch))
    keys = ["stage1", "stage2_ce", "stage2_kl"]
    if recompute:  # the same stage-2 steps with activation checkpointing (stages/lora.py)
        recompute_layers_in_backward(model)
        result["stage2_ce_recompute_tok_s"] = timed(training_step(lora_parameters(model), lm_loss_fn(model), batch))
        result["stage2_kl_recompute_tok_s"] = timed(training_step(lora_parameters(model), teacher_kl_loss_fn(model), batch))
        keys += ["stage2_ce_recompute", "stage2_kl_recompute"]
    for key in keys:
        result[f"{key}_vs_forward"] = result[f"{key}_tok_s"] / result["teacher_forward_tok_s"]
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    result["peak_rss_gib"] = peak / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="reference")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--recompute", action="store_true",
                        help="also time stage 2 with activation checkpointing (--activation-checkpointing)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.model, args.dtype, args.seq_len, args.rows, args.repeats, args.recompute)))
        return
    rows = []
    for dtype in args.dtypes.split(","):
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--dtype", dtype, "--seq-len",
               str(args.seq_len), "--rows", str(args.rows), "--threads", str(args.threads), "--repeats", str(args.repeats)] + ["--recompute"] * args.recompute
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"})
        if done.returncode:
            rows.append({"dtype": dtype, "error": done.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [f"Model {Path(args.model).name}, {args.rows}×{args.seq_len} tokens a step, {args.threads} threads "
             f"(median of {args.repeats}).", "",
             "| dtype | teacher forward tok/s | stage 1 tok/s (× fwd) | stage 2 CE tok/s (× fwd) | stage 2 KL tok/s (× fwd) | peak RSS GiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['dtype']} | error: {r['error']} |||||")
            continue
        lines.append(f"| {r['dtype']} | {r['teacher_forward_tok_s']:.0f} | {r['stage1_tok_s']:.0f} ({r['stage1_vs_forward']:.2f}) | "
                     f"{r['stage2_ce_tok_s']:.0f} ({r['stage2_ce_vs_forward']:.2f}) | {r['stage2_kl_tok_s']:.0f} "
                     f"({r['stage2_kl_vs_forward']:.2f}) | {r['peak_rss_gib']:.2f} |")
        if "stage2_ce_recompute_tok_s" in r:
            lines.append(f"| {r['dtype']}, stage 2 with activation checkpointing | | | {r['stage2_ce_recompute_tok_s']:.0f} "
                         f"({r['stage2_ce_recompute_vs_forward']:.2f}) | {r['stage2_kl_recompute_tok_s']:.0f} "
                         f"({r['stage2_kl_recompute_vs_forward']:.2f}) | |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
