"""Peak memory of block-wise stage 1 against block size and model depth.

Random Llamas with the reference model's widths (hidden 512, 8 heads, head_dim 64, intermediate 1376,
vocab 8192) at 8 and 32 layers, saved as safetensors folders. For each depth: collect the block inputs
once (K = 1: every layer boundary), then `lolcats blockwise train --block 0` in a fresh process for
K = 1, 2, 4, 8 and K = depth (one block = joint training), recording the process's peak RSS.
Sequences of 2048 tokens, batch 1, fp32, 2 threads.

Usage: python benchmarks/blockwise_memory.py [WORK_DIR]   (about 6 minutes)
Writes benchmarks/results/blockwise-memory.{json,md}.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); " \
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def random_llama(depth: int, folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, num_hidden_layers=depth, num_attention_heads=8, num_key_value_heads=8,
                         head_dim=64, intermediate_size=1376, vocab_size=8192, rope_theta=5e5,
                         max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SHARED / "models" / "stories260k" / name, folder / name)  # ids < 512 are valid here too


def peak_mib(command: list[str]) -> float:
    output = subprocess.run([sys.executable, "-c", PEAK, *command], check=True, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout
    return int(output.strip().splitlines()[-1]) / 1024


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "runs" / "blockwise-memory")
    work.mkdir(parents=True, exist_ok=True)
    lolcats = [sys.executable, "-m", "lolcats.cli", "blockwise"]
    rows = []
    for depth in (8, 32):
        model = work / f"llama-{depth}"
        if not (model / "config.json").is_file():
            random_llama(depth, model)
        for block_size in sorted({1, 2, 4, 8, depth}):
            config = work / f"run-{depth}-{block_size}.yaml"
            config.write_text(yaml.safe_dump({
                "model": str(model), "data": [str(SHARED / "data" / "stories260k_samples.txt")], "seq_len": 2048,
                "packing": "stream", "batch_tokens": 2048, "eval_tokens": 2048, "eval_every": 100, "held_out": 0.01,
                "stage1_tokens": 8192, "block_size": block_size, "out": str(work / f"out-{depth}-{block_size}"),
                "activations": str(work / f"activations-{depth}-{block_size}")}))
            subprocess.run([*lolcats, "collect", "--config", str(config)], check=True, capture_output=True)
            mib = peak_mib([*lolcats, "train", "--config", str(config), "--block", "0", "--quiet"])
            stored = sum(f.stat().st_size for f in (work / f"activations-{depth}-{block_size}").rglob("shard-*"))
            rows.append({"depth": depth, "block_size": block_size, "peak_rss_mib": round(mib, 1),
                         "activations_bytes": stored})
            print(rows[-1], flush=True)
            shutil.rmtree(work / f"activations-{depth}-{block_size}")
    results = ROOT / "benchmarks" / "results"
    (results / "blockwise-memory.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = ["| layers | block size | peak RSS training block 0 (MiB) | stored block inputs (MiB) |", "|---|---|---|---|"]
    table += [f"| {r['depth']} | {r['block_size']}{' (= joint)' if r['block_size'] == r['depth'] else ''} | "
              f"{r['peak_rss_mib']:,.0f} | {r['activations_bytes'] / 2**20:,.0f} |" for r in rows]
    (results / "blockwise-memory.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
