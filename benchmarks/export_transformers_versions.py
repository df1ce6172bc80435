"""Load a lolcats export in other Python environments (other transformers versions, no lolcats) and compare
logits and greedy generation with lolcats.load in this one.

Usage: python benchmarks/export_transformers_versions.py LINEARIZED_DIR PYTHON [PYTHON ...]
e.g. an environment with the lowest supported transformers:
  python3 -m venv /tmp/tf457 && /tmp/tf457/bin/pip install torch==2.13.0 'transformers>=4.57,<4.58'
Writes benchmarks/results/export-transformers-versions.json.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_export import STANDALONE, greedy_by_full_forwards  # noqa: E402

import lolcats  # noqa: E402
from lolcats.export import export  # noqa: E402


def main() -> None:
    directory, pythons = Path(sys.argv[1]), sys.argv[2:]
    work = Path(tempfile.mkdtemp())
    folder = export(directory, work / "hf", echo=lambda _: None)
    ids = torch.randint(3, 500, (2, 300), generator=torch.Generator().manual_seed(0))
    torch.save(ids, work / "ids.pt")
    (work / "standalone.py").write_text(STANDALONE)
    reference = lolcats.load(directory)
    tokenizer = lolcats.artifacts.tokenizer_for(str(directory))
    with torch.no_grad():
        expected = reference(ids).logits
    prompt = tokenizer("Once upon a time, there was a little", return_tensors="pt").input_ids
    greedy = greedy_by_full_forwards(reference, prompt, 80)
    rows = []
    for python in pythons:
        version = subprocess.run([python, "-c", "import transformers, torch; print(transformers.__version__, torch.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.split()
        result = subprocess.run([python, str(work / "standalone.py"), str(folder), str(work / "ids.pt"), str(work / "out.pt")],
                                capture_output=True, text=True, cwd=work)
        row = {"transformers": version[0], "torch": version[1], "loads": result.returncode == 0}
        if result.returncode == 0:
            got = torch.load(work / "out.pt")
            row.update(max_relative_logit_error=float((got["logits"] - expected).abs().max() / expected.abs().max()),
                       greedy_equal=bool(torch.equal(got["greedy"], greedy)), cache=got["cache_class"],
                       lolcats_imported=got["loaded"])
        else:
            row["error"] = result.stderr.strip().splitlines()[-1]
        rows.append(row)
        print(row, flush=True)
    out = Path(__file__).parent / "results" / "export-transformers-versions.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
