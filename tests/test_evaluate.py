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
                     "winogrande": "schema", "lambada_openai": "language_modeling", "mmlu": "multiple_choice"}
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


def _count_decoder_calls(*models):
    """(calls, remove): calls[i] lists the (batch, length) of every forward of models[i]'s decoder."""
    calls = [[] for _ in models]

    def recorder(seen):
        return lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape))

    handles = [model.get_decoder().register_forward_pre_hook(recorder(seen), with_kwargs=True)
               for model, seen in zip(models, calls)]
    return calls, lambda: [handle.remove() for handle in handles]


def test_fidelity_batches_windows_and_matches_one_at_a_time(stories, linearized_stories):
    """The slow-eval regression: fidelity ran three batch-1 forwards per window (each thousands of small ops in a
    linearized model). Equal-length windows now share forwards, with the same numbers."""
    teacher, tokenizer = stories
    text = (SHARED / "data" / "tinystories_valid.txt").read_text()
    windows = text_windows(tokenizer, text, seq_len=100, max_tokens=900)
    assert sorted(len(w) for w in windows) == [10] + [100] * 9
    calls, remove = _count_decoder_calls(linearized_stories, teacher)
    try:
        batched = fidelity(linearized_stories, teacher, windows, batch_size=8)
        student_calls, teacher_calls = list(calls[0]), list(calls[1])
        for seen in calls:
            seen.clear()
        alone = fidelity(linearized_stories, teacher, windows, batch_size=1)
    finally:
        remove()
    # Batches 8 + 1 windows of 100 tokens and 1 of 10: a distill pass and a student forward each, one teacher forward.
    assert sorted(student_calls) == sorted([(8, 100), (1, 100), (1, 10)] * 2)
    assert sorted(teacher_calls) == [(1, 10), (1, 100), (8, 100)]
    assert len(calls[0]) == 2 * len(windows) and len(calls[1]) == len(windows)
    assert batched["tokens"] == alone["tokens"] == 900
    assert batched["kl"] == pytest.approx(alone["kl"], rel=1e-5)
    for a, b in zip(batched["layers"], alone["layers"]):
        assert a["layer"] == b["layer"] and a["attention_mse"] == pytest.approx(b["attention_mse"], rel=1e-5)


def test_rows_per_forward_keeps_logits_bounded():
    from lolcats.evaluate.scoring import MAX_LOGIT_ELEMENTS, rows_per_forward

    class Head:
        def __init__(self, vocab):
            self.weight = torch.empty(vocab, 0)

    class Model:
        def __init__(self, vocab):
            self.head = Head(vocab)

        def get_output_embeddings(self):
            return self.head

    assert rows_per_forward(Model(512), 1024, 8) == 8  # stories260k: the whole batch
    assert rows_per_forward(Model(262_144), 512, 8) == 1  # Gemma: one window's logits already fill the budget
    assert rows_per_forward(Model(262_144), 1024, 8, least=2) == 2  # never fewer rows than the caller's floor
    assert rows_per_forward(Model(4096), 1024, 64) * 1024 * 4096 <= MAX_LOGIT_ELEMENTS


def test_eval_of_a_long_text_never_runs_attention_over_more_than_a_window(stories260k_path, monkeypatch, tmp_path):
    """Perplexity and fidelity of a text far longer than the window: no forward of the student or the teacher
    (so no attention, exact or linearized) sees more than --seq-len tokens, no L×L attention-weight reference
    is built, the fidelity sample is the stated bound, and the forwards are batched."""
    import lolcats.evaluate.runner
    import lolcats.models
    import lolcats.runtime.attention
    import lolcats.runtime.ops_reference
    from lolcats.evaluate.runner import evaluate_model

    text = tmp_path / "long.txt"
    text.write_text((SHARED / "data" / "tinystories_valid.txt").read_text(encoding="utf-8") * 2, encoding="utf-8")
    tokenizer = lolcats.load_tokenizer(str(stories260k_path))
    text_tokens = len(tokenizer(text.read_text(), add_special_tokens=False, verbose=False)["input_ids"])
    student = lolcats.convert(lolcats.load_base_model(str(stories260k_path)), window=16)
    teacher_lengths = []
    load_base_model = lolcats.models.load_base_model

    def load_teacher(spec):
        teacher = load_base_model(spec)
        teacher.get_decoder().register_forward_pre_hook(
            lambda module, args, kwargs: teacher_lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
        return teacher

    runner = lolcats.evaluate.runner  # the names the runner looks up
    monkeypatch.setattr(runner, "is_linearized_folder", lambda spec: True)
    monkeypatch.setattr(runner, "base_model_spec", lambda spec: str(stories260k_path))
    monkeypatch.setattr(runner, "load_model", lambda spec: student)
    monkeypatch.setattr(runner, "tokenizer_for", lambda spec: tokenizer)
    monkeypatch.setattr(runner, "load_base_model", load_teacher)

    def quadratic(*args, **kwargs):
        raise AssertionError("L×L attention weights built during eval")

    monkeypatch.setattr(lolcats.runtime.attention, "hybrid_attention_weights", quadratic)
    monkeypatch.setattr(lolcats.runtime.ops_reference, "hybrid_attention_weights", quadratic)
    (student_calls,), remove = _count_decoder_calls(student)
    try:
        result = evaluate_model("linearized-run", texts=[text], task_dir=tmp_path, seq_len=128, echo=lambda _: None)
    finally:
        remove()
    assert text_tokens > 8_000 and max(length for _, length in student_calls) <= 128 and max(teacher_lengths) <= 128
    fid = result["fidelity"]
    assert (fid["seq_len"], fid["max_tokens"], fid["tokens"]) == (128, 4096, 4096)
    assert fid["windows"] == math.ceil(4096 / 127)
    # Perplexity: 8 windows per forward (+1 for a short tail); fidelity: two per batch of up to 8 windows (+ tail).
    perplexity_forwards = math.ceil(math.ceil(text_tokens / 127) / 8) + 1
    fidelity_forwards = 2 * (math.ceil(fid["windows"] / 8) + 1)
    assert len(student_calls) <= perplexity_forwards + fidelity_forwards
    assert max(batch for batch, _ in student_calls) == 8


def test_pairs_with_the_same_inputs_share_one_forward():
    """MMLU-style items (one context, single-token choices) cost one row per item, with the scores of pairs scored
    one at a time; pairs whose inputs differ are not merged."""
    from tiny_models import tiny_model

    from lolcats.evaluate.scoring import score_token_pairs

    model = tiny_model("llama", seed=5)
    generator = torch.Generator().manual_seed(0)
    contexts = [torch.randint(3, 96, (n,), generator=generator).tolist() for n in (17, 40, 9)]
    pairs = [(context, [choice]) for context in contexts for choice in (11, 12, 13, 14)]
    pairs.append((contexts[0], [11, 12]))  # a two-token continuation: other inputs, its own row
    rows = []
    original_forward = model.forward

    def counting_forward(*args, **kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return original_forward(*args, **kwargs)

    model.forward = counting_forward
    together = score_token_pairs(model, pairs, batch_size=8)
    assert sum(rows) == 4
    alone = [score_token_pairs(model, [pair])[0] for pair in pairs]
    for a, b in zip(together, alone):
        assert a.tokens == b.tokens and a.is_greedy == b.is_greedy
        assert a.loglikelihood == pytest.approx(b.loglikelihood, rel=1e-5, abs=1e-5)
