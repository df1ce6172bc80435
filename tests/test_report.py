"""`lolcats report`: one self-contained HTML page from a fake output folder (no model, no training)."""

import json
import re
import shutil
from pathlib import Path

import pytest

from lolcats.artifacts import ArtifactError
from lolcats.evaluate.report import build_report

DEMO_MANIFEST = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "gemma3-270m-demo.lolcats.json"
PNG = "data:image/png;base64,"


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _stage_log(first_loss: float) -> list[dict]:
    records = [{"step": 0, "tokens": 0, "eval_loss": first_loss}]
    for step in range(1, 6):
        records.append({"step": step, "tokens": 1536 * step, "loss": first_loss / step, "lr": 1e-3,
                        "grad_norm": 1.0, "tokens_per_s": 500.0})
    records.append({"step": 5, "tokens": 1536 * 5, "eval_loss": first_loss / 4})
    return records


@pytest.fixture
def manifest_only(tmp_path: Path) -> Path:
    if not DEMO_MANIFEST.is_file():
        pytest.skip(f"example manifest missing: {DEMO_MANIFEST}")
    shutil.copy(DEMO_MANIFEST, tmp_path / "lolcats.json")
    return tmp_path


@pytest.fixture
def output_folder(manifest_only: Path) -> Path:
    folder = manifest_only
    _write_jsonl(folder / "logs" / "stage1.jsonl", _stage_log(60.0))
    _write_jsonl(folder / "logs" / "stage2.jsonl", _stage_log(0.25))
    (folder / "eval.json").write_text(json.dumps({
        "model": "runs/gemma-default", "kind": "linearized",
        "perplexity": {"wiki.test.txt": 6.2687},
        "tasks": {"piqa": {"acc": 0.6123, "acc_norm": 0.6234, "n": 200},
                  "lambada": {"acc": 0.3111, "acc_norm": None, "n": 200}},
        "fidelity": {"kl": 0.0421, "layers": [{"layer": 5, "attention_mse": 0.012},
                                             {"layer": 11, "attention_mse": 0.034}]},
    }))
    (folder / "eval-teacher.json").write_text(json.dumps({
        "model": "gemma3-270m", "kind": "teacher",
        "perplexity": {"wiki.test.txt": 5.2617},
        "tasks": {"piqa": {"acc": 0.6543, "acc_norm": 0.6611, "n": 200},
                  "lambada": {"acc": 0.4012, "acc_norm": None, "n": 200}},
    }))
    measured = {"ms_per_token": [20.5, 21.0], "cache_bytes": [6 * 2**20, 6 * 2**20],
                "prefill_s": [0.6, 2.4], "peak_rss_bytes": [600 * 2**20, None]}
    (folder / "decode.json").write_text(json.dumps({
        "contexts": [1024, 4096], "new_tokens": 16, "threads": 2,
        "linearized": measured, "teacher": {**measured, "ms_per_token": [23.0, 43.9]},
    }))
    return folder


def test_full_report(output_folder: Path):
    path = build_report(output_folder)
    assert path == output_folder / "report.html"
    page = path.read_text(encoding="utf-8")
    assert "gemma3-270m" in page
    for text in ("piqa", "lambada", "wiki.test.txt", "0.6123", "0.6543", "6.269", "5.262",
                 "1.191×", "-0.0420", "0.0421", "20.50", "43.90"):
        assert text in page, text
    assert "linearized vs teacher" in page
    # Layers (γ and linear share), training curves, attention MSE and the decode plot.
    assert page.count(PNG) >= 4
    assert "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page
    assert [p.name for p in output_folder.iterdir() if p.name.endswith(".tmp")] == []


def test_manifest_only_still_gives_a_report(manifest_only: Path, tmp_path: Path):
    out = build_report(manifest_only, out=tmp_path / "elsewhere" / "page.html")
    page = out.read_text(encoding="utf-8")
    assert "gemma3-270m" in page and "stage1" in page
    assert page.count(PNG) == 1  # the per-layer γ / linear share bars
    assert "Evaluation" not in page and "Decode benchmark" not in page and "Training</h2>" not in page


def test_folder_without_manifest_is_an_artifact_error(tmp_path: Path):
    with pytest.raises(ArtifactError, match=re.escape(str(tmp_path))):
        build_report(tmp_path)


def test_broken_log_line_names_file_and_line(output_folder: Path):
    log = output_folder / "logs" / "stage2.jsonl"
    log.write_text(log.read_text() + '{"step": 6, "tokens": \n')
    with pytest.raises(ValueError, match=r"stage2\.jsonl:8"):
        build_report(output_folder)
    assert not (output_folder / "report.html").exists()


def test_broken_eval_file_names_it(output_folder: Path):
    (output_folder / "eval-teacher.json").write_text('{"kind": "teacher", ')
    with pytest.raises(ValueError, match=r"eval-teacher\.json"):
        build_report(output_folder)


def test_strings_from_files_are_escaped(manifest_only: Path):
    (manifest_only / "eval.json").write_text(json.dumps({
        "model": "<img src=x onerror=alert(1)>", "perplexity": {},
        "tasks": {"<b>bold</b>": {"acc": 0.5, "acc_norm": None, "n": 2}},
    }))
    page = build_report(manifest_only).read_text(encoding="utf-8")
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold" not in page
    assert "<img src=x" not in page
