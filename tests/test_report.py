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


def _row(acc: float, categories: dict, losses: list, passkey: list, window: int | None = None) -> dict:
    row = {"perplexity": {}, "tasks": {"mmlu": {"acc": acc, "macro_acc": acc - 0.01, "n": 40,
                                                "categories": {c: {"acc": a, "n": 20} for c, a in categories.items()}}},
           "loss_by_position": {"text": "long.txt", "edges": [0, 64, 128, 512, 1024], "mean_loss": losses,
                                "tokens": [64, 64, 384, 511], "seq_len": 1024, "windows": 1},
           "retrieval": {"passkey": {"contexts": [1024, 2048], "depths": [0.1, 0.9], "accuracy": passkey,
                                     "by_context": {"1024": sum(passkey[0]) / 2, "2048": sum(passkey[1]) / 2},
                                     "mean": sum(map(sum, passkey)) / 4}}}
    if window is not None:
        row["window"], row["sinks"] = window, 4
    return row


def _eval_with_baselines(linearized_acc: float, linearized_loss: float) -> dict:
    return {"model": "run", "kind": "linearized",
            **_row(linearized_acc, {"anatomy": 0.3, "virology": linearized_acc}, [2.0, 2.1, linearized_loss, 2.4],
                   [[1, 0], [0, 0]]),
            "baselines": {
                "teacher": _row(0.40, {"anatomy": 0.35, "virology": 0.45}, [2.0, 2.0, 2.0, 2.0], [[1, 1], [1, 1]]),
                "window": {**_row(0.30, {"anatomy": 0.3, "virology": 0.3}, [2.0, 2.1, 2.6, 2.7], [[0, 0], [0, 0]]),
                           "window": 64, "sinks": 0},
                "sinks": _row(0.33, {"anatomy": 0.31, "virology": 0.35}, [2.0, 2.1, 2.3, 2.4], [[0, 0], [0, 0]],
                              window=64)}}


def test_baselines_section_draws_each_row_and_says_plainly_when_the_model_fails(manifest_only: Path):
    from lolcats.evaluate.runner import format_table
    from lolcats.evaluate.verdict import comparisons, loss_beyond

    failing = _eval_with_baselines(linearized_acc=0.32, linearized_loss=2.5)
    (manifest_only / "eval.json").write_text(json.dumps(failing))
    page = build_report(manifest_only).read_text(encoding="utf-8")
    assert "Linearized vs teacher and training-free baselines" in page
    for text in ("anatomy", "virology", "mmlu macro acc", "0.3200", "0.3300"):
        assert text in page, text
    section = page.split("Linearized vs teacher and training-free baselines")[1]
    assert section.count(PNG) == 2  # the passkey heat-maps (4 rows in one figure) and the loss-by-position curve
    assert "FAILED: the linearized model does not beat the training-free window+sinks baseline on mmlu acc, " \
           "loss at positions &gt;= 128" in section
    # loss beyond the window: the token-weighted mean of the buckets from 2·window = 128 on
    assert loss_beyond(failing["loss_by_position"], 128) == pytest.approx((2.5 * 384 + 2.4 * 511) / 895)
    assert [c["beats"] for c in comparisons(failing)] == [False, False, True]  # passkey 0.25 > 0 (not required)
    assert "FAILED" in format_table(failing)

    passing = _eval_with_baselines(linearized_acc=0.36, linearized_loss=2.1)
    (manifest_only / "eval.json").write_text(json.dumps(passing))
    section = build_report(manifest_only).read_text(encoding="utf-8").split("training-free baselines")[1]
    assert "PASSED: the linearized model beats the training-free window+sinks baseline on mmlu acc" in section
    assert "FAILED" not in section
