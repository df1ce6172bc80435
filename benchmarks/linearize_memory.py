"""Peak RSS of the whole `lolcats linearize` process on the reference model against --seq-len.

The reference model (benchmarks/reference_model.py, random weights) is saved once as a model folder with the
stories260k tokenizer (its 512 ids are valid ids of the 8192-token vocabulary), and `lolcats linearize` runs
on it as a user would, in a fresh process per length, with stream packing so that every row is --seq-len
tokens long; both stages, the end-of-run diagnostics and perplexities included. Peak RSS is the kernel's
high-water mark of that process (GNU time's "Maximum resident set size").

Usage: python benchmarks/linearize_memory.py [--lengths 2048,8192] [--recompute false,true]
       [--out benchmarks/results/linearize-memory]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"
sys.path.insert(0, str(HERE))


def reference_folder(folder: Path) -> Path:
    from transformers import AutoTokenizer

    from reference_model import reference_model

    if not (folder / "config.json").is_file():
        reference_model().save_pretrained(folder)
        AutoTokenizer.from_pretrained(SHARED / "models" / "stories260k").save_pretrained(folder)
    return folder


def run(folder: Path, length: int, out: Path, dtype: str, recompute: bool) -> dict:
    config = out.parent / f"run-{length}.yaml"
    config.write_text(
        f"model: {folder}\ndata: [{SHARED / 'data' / 'tinystories_valid.txt'}]\nout: {out}\nseq_len: {length}\n"
        f"batch_tokens: {length}\npacking: stream\nheld_out: 0.1\nstage1_tokens: {2 * length}\n"
        f"stage2_tokens: {2 * length}\neval_every: 1\neval_tokens: {length}\nwarmup_steps: 1\ndtype: {dtype}\n"
        f"activation_checkpointing: {str(recompute).lower()}\n"
    )
    lolcats = Path(sys.executable).parent / "lolcats"
    done = subprocess.run(["/usr/bin/time", "-v", str(lolcats), "linearize", "--config", str(config), "--quiet"],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-3000:])
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    return {"seq_len": length, "dtype": dtype, "activation_checkpointing": recompute, "peak_rss_gib": peak_kib / 2**20,
            "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="benchmarks/results/linearize-memory")
    parser.add_argument("--recompute", default="false,true",
                        help="activation_checkpointing settings to measure (stage 2 recomputes layers in backward)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = reference_folder(Path(scratch) / "reference")
        for length in map(int, args.lengths.split(",")):
            for recompute in (value == "true" for value in args.recompute.split(",")):
                rows.append(run(folder, length, Path(scratch) / f"out-{length}-{recompute}", args.dtype, recompute))
                print(rows[-1], flush=True)
    lines = ["| seq_len | activation checkpointing | peak RSS of `lolcats linearize` (GiB) | wall |", "|---|---|---|---|"]
    lines += [f"| {r['seq_len']} | {'on' if r['activation_checkpointing'] else 'off'} | {r['peak_rss_gib']:.2f} | {r['wall']} |"
              for r in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"dtype": args.dtype, "rows": rows}, indent=2))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
