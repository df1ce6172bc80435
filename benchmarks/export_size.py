"""Exported folder vs base model: size on disk and load time (fresh process, median of 3).

Usage: python benchmarks/export_size.py LABEL=LINEARIZED_DIR [LABEL=LINEARIZED_DIR ...]
Exports each linearized folder (LoRA merged; fp32 and bf16) into runs/export/<label>-<dtype>, then times
`AutoModelForCausalLM.from_pretrained` of the base (folder or GGUF, as lolcats loads it) and of the export
(trust_remote_code=True). Writes benchmarks/results/export.{json,md}.
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOAD = """
import sys, time, torch
started = time.perf_counter()
from transformers import AutoModelForCausalLM
kind, location = sys.argv[1], sys.argv[2]
if kind == "gguf":
    folder, name = location.rsplit("/", 1)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
elif kind == "export":
    model = AutoModelForCausalLM.from_pretrained(location, trust_remote_code=True)
else:
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
print(time.perf_counter() - started)
"""


def load_seconds(kind: str, location: str) -> float:
    times = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", LOAD, kind, location], check=True, capture_output=True, text=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    from lolcats.artifacts import read_manifest
    from lolcats.export import export
    from lolcats.models import resolve_model_path

    rows = []
    for arg in sys.argv[1:]:
        label, directory = arg.split("=", 1)
        location, gguf = resolve_model_path(read_manifest(Path(directory))["base_model"]["spec"])
        base = Path(location) / gguf if gguf else Path(location)
        row = {"model": label, "base": {"format": "gguf" if gguf else "safetensors folder", "bytes": size(base),
                                        "load_s": round(load_seconds("gguf" if gguf else "folder", str(base)), 2)}}
        for dtype in ("float32", "bfloat16"):
            out = ROOT / "runs" / "export" / f"{label}-{dtype}"
            if not out.exists():
                started = time.perf_counter()
                export(directory, out, dtype=dtype, echo=lambda _: None)
                row[f"export_s_{dtype}"] = round(time.perf_counter() - started, 1)
            row[dtype] = {"bytes": size(out), "load_s": round(load_seconds("export", str(out)), 2)}
        rows.append(row)
        print(row, flush=True)
    results = ROOT / "benchmarks" / "results"
    (results / "export.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = ["| model | base (format) | base size | base load s | export fp32 size | load s | export bf16 size | load s |",
             "|---|---|---|---|---|---|---|---|"]
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    for r in rows:
        table.append(f"| {r['model']} | {r['base']['format']} | {mib(r['base']['bytes'])} | {r['base']['load_s']} | "
                     f"{mib(r['float32']['bytes'])} | {r['float32']['load_s']} | {mib(r['bfloat16']['bytes'])} | "
                     f"{r['bfloat16']['load_s']} |")
    (results / "export.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
