"""Evaluation: scoring primitives, task formats and metrics, perplexity windows, fidelity, lm-eval agreement."""

import json
import math

import pytest
import torch
from conftest import SHARED
from typer.testing import CliRunner

import lolcats
from lolcats.cli import app
from lolcats.evaluate.fidelity import fidelity, text_windows
from lolcats.evaluate.scoring import encode_pair, rolling_loglikelihood, score_pairs
from lolcats.evaluate.tasks import TaskFormatError, evaluate_task, load_task

EVAL = SHARED / "data" / "eval"


@pytest.fixture(scope="module")
def stories(stories260k_path):
    return lolcats.load_base_model(str(stories260k_path)), lolcats.load_tokenizer(str(stories260k_path))


@pytest.fixture(scope="module")
def linearized_stories(stories260k_path):
    model = lolcats.convert(lolcats.load_base_model(str(stories260k_path)), window=16)
    generator = torch.Generator().manual_seed(0)
    for layer in lolcats.linearized_layers(model):
        layer.window_logit.data = torch.randn(layer.window_logit.shape, generator=generator)
    return model


def test_encode_pair_moves_trailing_space_to_the_continuation(stories):
    _, tokenizer = stories
    context, continuation = encode_pair(tokenizer, "Question: Who?\nAnswer: ", "Lily")
    same_context, same_continuation = encode_pair(tokenizer, "Question: Who?\nAnswer:", " Lily")
    assert (context, continuation) == (same_context, same_continuation)
    assert context[0] == tokenizer.bos_token_id
    assert tokenizer.decode(continuation).strip() == "Lily"


@pytest.mark.parametrize("which", ["teacher", "linearized"])
def test_batched_scores_equal_one_at_a_time(stories, linearized_stories, which):
    model = stories[0] if which == "teacher" else linearized_stories
    tokenizer = stories[1]
    task = load_task(EVAL / "arc_easy.jsonl")
    pairs = [(c, x) for item in task.items[:6] for c, x in zip(item.contexts, item.continuations)]
    alone = score_pairs(model, tokenizer, pairs, batch_size=1)
    batched = score_pairs(model, tokenizer, pairs, batch_size=7)
    for a, b in zip(alone, batched):
        assert a.tokens == b.tokens and a.is_greedy == b.is_greedy
        assert abs(a.loglikelihood - b.loglikelihood) <= 1e-4 * max(1.0, abs(a.loglikelihood))


def test_metrics_follow_lm_eval_definitions(stories):
    model, tokenizer = stories
    task = load_task(EVAL / "piqa.jsonl")
    result = evaluate_task(model, tokenizer, task, limit=12, batch_size=4)
    correct = correct_norm = 0
    for item in task.items[:12]:
        scores = score_pairs(model, tokenizer, list(zip(item.contexts, item.continuations)), batch_size=1)
        values = [s.loglikelihood for s in scores]
        correct += values.index(max(values)) == item.gold
        normalised = [v / len(choice) for v, choice in zip(values, item.continuations)]  # characters of the choice
        correct_norm += normalised.index(max(normalised)) == item.gold
    assert result == {"acc": correct / 12, "acc_norm": correct_norm / 12, "n": 12, "choices": 24, "truncated": 0}


@pytest.mark.skipif(not EVAL.is_dir(), reason=f"shared eval folder missing: {EVAL}")
def test_task_formats_are_detected_from_fields():
    kinds = {path.stem: load_task(path).kind for path in sorted(EVAL.glob("*.jsonl"))}
    assert kinds == {"arc_challenge": "multiple_choice", "arc_easy": "multiple_choice", "piqa": "multiple_choice",
                     "winogrande": "schema", "lambada_openai": "language_modeling"}
    piqa = load_task(EVAL / "piqa.jsonl").items[0]
    assert piqa.contexts[0].endswith("\n\nAnswer: ") and piqa.contexts[0].startswith("Question: ")


def test_hellaswag_original_form_uses_lm_eval_preprocessing(tmp_path):
    record = {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
              "ctx_b": "then", "ctx": "ignored", "endings": ["stops [title] here [step].", "drives  away."], "label": "1"}
    del record["ctx"]
    path = tmp_path / "hellaswag.jsonl"
    path.write_text(json.dumps(record) + "\n")
    task = load_task(path)
    assert task.kind == "hellaswag"
    item = task.items[0]
    assert item.contexts[0] == "Removing ice from car: Then, the man writes over the snow. Then"
    assert item.continuations == (" stops. here .", " drives away.") and item.gold == 1


def test_malformed_lines_name_file_and_line(tmp_path):
    good = json.dumps({"query": "Question: a?", "choices": ["x", "y"], "gold": 0})
    cases = {
        "not valid JSON": "{oops",
        "unknown task format": json.dumps({"question": "a?"}),
        "gold must be an index": json.dumps({"query": "q", "choices": ["x", "y"], "gold": 5}),
        "a schema line in a multiple_choice file": json.dumps({"context_options": ["a", "b"], "continuation": "c", "gold": 0}),
    }
    for message, bad in cases.items():
        path = tmp_path / "task.jsonl"
        path.write_text(good + "\n\n" + bad + "\n")
        with pytest.raises(TaskFormatError, match=rf"task.jsonl:3: .*{message}"):
            load_task(path)
    result = CliRunner().invoke(app, ["eval", "--model", "unused", "--task-dir", str(tmp_path)])
    assert result.exit_code == 2 and "task.jsonl:3" in result.output and "Traceback" not in result.output


def test_few_shot_prefixes_are_fixed_by_the_seed_and_exclude_the_item(stories):
    from lolcats.evaluate.tasks import _with_shots
    import random

    task = load_task(EVAL / "arc_easy.jsonl")
    first = _with_shots(task, 3, 2, random.Random(5))
    again = _with_shots(task, 3, 2, random.Random(5))
    assert first == again
    shots = first.contexts[0].split("\n\n")
    assert len(shots) == 3 and task.items[3].shot_text not in shots[:2]
    assert all("\nAnswer: " in shot for shot in shots[:2])


def test_rolling_perplexity_predicts_every_token_once(stories):
    model, tokenizer = stories
    ids = [tokenizer.bos_token_id] + tokenizer((SHARED / "data" / "tinystories_valid.txt").read_text()[:3000],
                                               add_special_tokens=False)["input_ids"]
    whole_total, whole_count = rolling_loglikelihood(model, ids, seq_len=len(ids))
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids]), use_cache=False).logits[0, :-1], -1)
    assert whole_count == len(ids) - 1
    assert math.isclose(whole_total, float(log_probs.gather(-1, torch.tensor(ids[1:])[:, None]).sum()), rel_tol=1e-5)
    for seq_len, stride in ((128, None), (128, 32)):
        total, count = rolling_loglikelihood(model, ids, seq_len=seq_len, stride=stride, batch_size=3)
        assert count == len(ids) - 1
        assert total < 0
    with pytest.raises(ValueError, match="stride"):
        rolling_loglikelihood(model, ids, seq_len=64, stride=64)


def test_fidelity_is_zero_when_the_window_covers_the_text(stories260k_path, stories):
    teacher, tokenizer = stories
    windows = text_windows(tokenizer, (SHARED / "data" / "tinystories_valid.txt").read_text(), seq_len=100, max_tokens=300)
    exact = lolcats.convert(lolcats.load_base_model(str(stories260k_path)), attention="sliding", window=100)
    result = fidelity(exact, teacher, windows)
    assert result["kl"] < 1e-6 and all(row["attention_mse"] < 1e-9 for row in result["layers"])
    narrow = lolcats.convert(lolcats.load_base_model(str(stories260k_path)), window=8)
    result = fidelity(narrow, teacher, windows)
    assert result["kl"] > 1e-3 and len(result["layers"]) == 5 and all(row["attention_mse"] > 0 for row in result["layers"])


def test_eval_command_writes_the_documented_json(stories260k_path, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, [
        "eval", "--model", str(stories260k_path), "--text", str(SHARED / "data" / "tinystories_valid.txt"),
        "--task-dir", str(EVAL), "--tasks", "piqa,lambada_openai,winogrande", "--limit", "8", "--seq-len", "256",
        "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["model"] == str(stories260k_path) and data["kind"] == "teacher"
    assert 4 < data["perplexity"]["tinystories_valid.txt"] < 8
    assert set(data["tasks"]) == {"piqa", "lambada_openai", "winogrande"}
    assert data["tasks"]["piqa"]["n"] == 8 and data["tasks"]["winogrande"]["acc_norm"] is None
    assert data["tasks"]["lambada_openai"]["perplexity"] > 1
    assert "piqa acc" in result.output


LM_EVAL_TASK = """task: local_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_scores_the_same_items_identically(stories260k_path, stories, tmp_path):
    """lm-eval's own task pipeline with our model type gives our runner's log-likelihoods and accuracies."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lolcats.evaluate.lm_eval_model import LolcatsLM

    (tmp_path / "arc_easy.yaml").write_text(LM_EVAL_TASK.format(name="arc_easy", path=EVAL / "arc_easy.jsonl"))
    lm = LolcatsLM(pretrained=str(stories260k_path), batch_size=4)
    results = lm_eval.simple_evaluate(model=lm, tasks=["local_arc_easy"], task_manager=TaskManager(include_path=str(tmp_path)),
                                      limit=10, log_samples=True)
    samples = sorted(results["samples"]["local_arc_easy"], key=lambda s: s["doc_id"])
    model, tokenizer = stories
    task = load_task(EVAL / "arc_easy.jsonl")
    for sample, item in zip(samples, task.items[:10]):
        ours = score_pairs(model, tokenizer, list(zip(item.contexts, item.continuations)), batch_size=1)
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        assert [s.loglikelihood for s in ours] == pytest.approx(theirs, rel=1e-5, abs=1e-5)
    ours = evaluate_task(model, tokenizer, task, limit=10)
    metrics = results["results"]["local_arc_easy"]
    assert ours["acc"] == pytest.approx(metrics["acc,none"]) and ours["acc_norm"] == pytest.approx(metrics["acc_norm,none"])


def test_lm_eval_command_runs_the_harness_cli(stories260k_path, tmp_path):
    pytest.importorskip("lm_eval")
    (tmp_path / "piqa.yaml").write_text(LM_EVAL_TASK.format(name="piqa", path=EVAL / "piqa.jsonl"))
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["lm-eval", "--model", str(stories260k_path), "--tasks", "local_piqa",
                                      "--include_path", str(tmp_path), "--limit", "4", "--batch_size", "2",
                                      "--output_path", str(out)])
    assert result.exit_code == 0, result.output
    written = list(out.rglob("results*.json"))
    assert len(written) == 1
    data = json.loads(written[0].read_text())
    assert 0 <= data["results"]["local_piqa"]["acc,none"] <= 1
    refused = CliRunner().invoke(app, ["lm-eval", "--model", str(stories260k_path), "--model_args", "x=1"])
    assert refused.exit_code == 2 and "set by `lolcats lm-eval`" in refused.output


def test_a_continuation_longer_than_the_window_is_scored_by_its_tail_and_counted(stories):
    model, tokenizer = stories
    long_text = " Lily and Tom went to the park to play with the big red ball." * 12
    (score,) = score_pairs(model, tokenizer, [("Once upon a time", long_text)], max_length=64)
    assert score.truncated and score.tokens == 64 and math.isfinite(score.loglikelihood)
