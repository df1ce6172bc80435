"""Categorised tasks (llm-foundry's has_categories, e.g. MMLU): few-shot examples from the item's own category,
``limit`` per category, per-category and macro-averaged accuracy."""

import json
import random

import pytest
import torch
from conftest import SHARED
from tiny_models import tiny_model
from typer.testing import CliRunner

from lolcats.cli import app
from lolcats.evaluate.runner import format_table
from lolcats.evaluate.scoring import score_pairs
from lolcats.evaluate.tasks import (
    FEWSHOT_DELIMITER,
    TaskFormatError,
    _with_shots,
    evaluate_task,
    load_task,
    prompted_items,
    selected_items,
)

MMLU = SHARED / "data" / "eval" / "mmlu.jsonl"
# Interleaved in the file, of different sizes: category -> number of items.
SIZES = {"algebra": 7, "biology": 4, "chemistry": 5}


def _records(sizes=SIZES, with_category=True):
    """Multiple-choice lines whose text says which category and item they are, categories interleaved."""
    records = []
    counts = dict.fromkeys(sizes, 0)
    while any(counts[name] < size for name, size in sizes.items()):
        for name, size in sizes.items():
            if counts[name] < size:
                k = counts[name]
                record = {"query": f"Question: {name} question {k}?\nA. red\nB. blue", "choices": ["A", "B"],
                          "gold": k % 2}
                if with_category:
                    record["category"] = name
                records.append(record)
                counts[name] += 1
    return records


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def task(tmp_path):
    return load_task(_write(tmp_path / "quiz.jsonl", _records()))


def _shots(task, index, prompted):
    """The indices of the items whose shot texts make up an item's few-shot prefix (checking the prefix is
    exactly those shots, each followed by the delimiter, then the item's own context)."""
    item = task.items[index]
    context = prompted.contexts[0]
    assert context.endswith(FEWSHOT_DELIMITER + item.contexts[0])
    parts = context[: -len(item.contexts[0])].split(FEWSHOT_DELIMITER)[:-1]
    by_text = {other.shot_text: i for i, other in enumerate(task.items)}
    assert len(by_text) == len(task.items)  # the synthetic texts are unique
    return [by_text[part] for part in parts]


def test_categories_are_read_in_file_order(task):
    assert task.categorised and list(task.categories) == list(SIZES)
    assert {name: len(indices) for name, indices in task.categories.items()} == SIZES
    for name, indices in task.categories.items():
        assert indices == sorted(indices)
        assert all(task.items[i].category == name and f"{name} question" in task.items[i].contexts[0] for i in indices)
    assert task.items[0].contexts[0].endswith("\nB. blue\nAnswer: ") and task.items[0].continuations == ("A", "B")


def test_few_shot_examples_come_from_the_items_own_category_never_the_item(task):
    items = prompted_items(task, num_fewshot=3, seed=7)
    assert len(items) == len(task.items)
    for index, prompted in enumerate(items):
        shots = _shots(task, index, prompted)
        category = task.items[index].category
        assert len(shots) == 3 and len(set(shots)) == 3 and index not in shots
        assert all(task.items[i].category == category for i in shots)
        assert all(category in part for part in prompted.contexts[0].split(FEWSHOT_DELIMITER))
        assert prompted.category == category and prompted.gold == task.items[index].gold
        assert prompted.continuations == task.items[index].continuations
    # The smallest category (4 items) at 3-shot: every other item of it, in a seeded order.
    biology = task.categories["biology"]
    for index in biology:
        assert sorted(_shots(task, index, items[index])) == [i for i in biology if i != index]


def test_few_shot_prompts_are_fixed_by_the_seed_and_independent_of_limit(task):
    full = prompted_items(task, num_fewshot=2, seed=3)
    assert prompted_items(task, num_fewshot=2, seed=3) == full
    for limit in (1, 2, 5):
        limited = prompted_items(task, limit=limit, num_fewshot=2, seed=3)
        assert limited == [full[i] for i in selected_items(task, limit)]
    other_seed = prompted_items(task, num_fewshot=2, seed=4)
    assert other_seed != full and [i.continuations for i in other_seed] == [i.continuations for i in full]


def test_limit_takes_the_first_items_of_each_category(task):
    assert selected_items(task, None) == list(range(len(task.items)))
    assert selected_items(task, 0) == list(range(len(task.items)))  # 0, like None, is everything (as before)
    for limit in (1, 2, 5, 100):
        chosen = selected_items(task, limit)
        assert chosen == sorted(chosen)
        for name, indices in task.categories.items():
            assert [i for i in chosen if task.items[i].category == name] == indices[:limit]
    assert len(selected_items(task, 5)) == 5 + 4 + 5


def test_a_category_too_small_for_the_shots_is_an_error_naming_it(task):
    with pytest.raises(ValueError, match=r"quiz: 4-shot needs at least 5 items in every category; category 'biology' "
                                         r"has 4"):
        prompted_items(task, num_fewshot=4)
    with pytest.raises(ValueError, match=r"'algebra' has 7, 'biology' has 4, 'chemistry' has 5"):
        prompted_items(task, limit=1, num_fewshot=7)  # checked for every category, whatever the limit
    assert len(prompted_items(task, num_fewshot=3)) == len(task.items)


def test_category_on_only_some_lines_is_an_error_naming_the_line(tmp_path):
    records = _records({"a": 2}, with_category=False)
    path = tmp_path / "task.jsonl"
    # A category from the first line on, then a line without: that line is named (blank lines count).
    path.write_text(json.dumps({**records[0], "category": "a"}) + "\n\n" + json.dumps(records[1]) + "\n")
    with pytest.raises(TaskFormatError, match=r"task.jsonl:3: no category, but earlier lines have one"):
        load_task(path)
    path.write_text(json.dumps(records[0]) + "\n" + json.dumps({**records[1], "category": "a"}) + "\n")
    with pytest.raises(TaskFormatError, match=r"task.jsonl:2: a category, but earlier lines have none"):
        load_task(path)
    for bad in (3, "", None, ["a"]):
        path.write_text(json.dumps({**records[0], "category": bad}) + "\n")
        with pytest.raises(TaskFormatError, match=r"task.jsonl:1: category must be a non-empty string"):
            load_task(path)


def test_a_file_without_categories_behaves_as_before(tmp_path):
    task = load_task(_write(tmp_path / "plain.jsonl", _records(with_category=False)))
    assert not task.categorised and task.categories == {} and all(item.category is None for item in task.items)
    rng = random.Random(11)
    expected = [_with_shots(task, i, 3, rng) for i in range(4)]  # one RNG over the file's first items, as before
    assert prompted_items(task, limit=4, num_fewshot=3, seed=11) == expected
    assert selected_items(task, 4) == [0, 1, 2, 3]
    # Shots may come from any "category" of the text: the whole file is the pool.
    pools = {task.items[i].contexts[0].split()[1] for item_index in range(len(task.items))
             for i in _shots(task, item_index, prompted_items(task, num_fewshot=3, seed=11)[item_index])}
    assert pools == set(SIZES)


class CharTokenizer:
    """One token a character (ids 3..95 of the tiny models' 96), BOS = 1."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False, **_):
        ids = [3 + ord(c) % 93 for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", seed=1)
    model.eval()
    return model, CharTokenizer()


@pytest.mark.parametrize("limit", [None, 3])
def test_per_category_accuracy_macro_and_micro_means(tiny, task, limit):
    model, tokenizer = tiny
    torch.manual_seed(0)
    result = evaluate_task(model, tokenizer, task, limit=limit, num_fewshot=2, seed=5, batch_size=4)
    sizes = {name: min(limit or size, size) for name, size in SIZES.items()}
    assert list(result["categories"]) == sorted(SIZES)
    assert {name: scores["n"] for name, scores in result["categories"].items()} == sizes
    assert result["n"] == sum(sizes.values()) and result["choices"] == 2 * result["n"] and result["truncated"] == 0
    # Each item scored alone gives the same per-category counts.
    prompted = prompted_items(task, limit=limit, num_fewshot=2, seed=5)
    right = {name: [0, 0] for name in SIZES}
    for item in prompted:
        values = [s.loglikelihood for s in score_pairs(model, tokenizer, list(zip(item.contexts, item.continuations)),
                                                        batch_size=1)]
        normalised = [v / n for v, n in zip(values, item.choice_lengths)]
        right[item.category][0] += values.index(max(values)) == item.gold
        right[item.category][1] += normalised.index(max(normalised)) == item.gold
    for name, scores in result["categories"].items():
        assert scores["acc"] == pytest.approx(right[name][0] / sizes[name])
        assert scores["acc_norm"] == pytest.approx(right[name][1] / sizes[name])
    accs = [scores["acc"] for scores in result["categories"].values()]
    assert result["macro_acc"] == pytest.approx(sum(accs) / len(accs))
    assert result["acc"] == pytest.approx(sum(r[0] for r in right.values()) / result["n"])  # micro: over all items
    assert result["acc"] == pytest.approx(sum(s["acc"] * s["n"] for s in result["categories"].values()) / result["n"])
    table = format_table({"model": "tiny", "kind": "teacher", "perplexity": {}, "tasks": {"quiz": result}})
    assert f"{'quiz macro_acc (3 categories)':<32} {result['macro_acc']:>10.4f}" in table
    assert "quiz acc " in table and not any(name in table for name in SIZES)  # per category only in the JSON


def test_a_task_without_categories_reports_no_category_fields(tiny, tmp_path):
    model, tokenizer = tiny
    task = load_task(_write(tmp_path / "plain.jsonl", _records(with_category=False)))
    result = evaluate_task(model, tokenizer, task, limit=4, num_fewshot=1)
    assert set(result) == {"acc", "acc_norm", "n", "choices", "truncated"} and result["n"] == 4
    assert "macro_acc" not in format_table({"model": "tiny", "kind": "teacher", "perplexity": {},
                                            "tasks": {"plain": result}})


def test_eval_command_reports_categories_in_the_json(stories260k_path, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write(tasks / "quiz.jsonl", _records())
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", "--model", str(stories260k_path), "--task-dir", str(tasks),
                                      "--tasks", "quiz", "--num-fewshot", "2", "--limit", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())["tasks"]["quiz"]
    assert scores["n"] == 6 and {name: c["n"] for name, c in scores["categories"].items()} == dict.fromkeys(SIZES, 2)
    assert "quiz macro_acc (3 categories)" in result.output


@pytest.mark.skipif(not MMLU.is_file(), reason=f"shared MMLU file missing: {MMLU}")
def test_mmlu_loads_57_categories_and_5_shot_prompts_stay_in_the_category():
    task = load_task(MMLU)
    assert task.kind == "multiple_choice" and task.categorised
    assert len(task.categories) == 57 and len(task.items) == 14_042
    assert min(len(indices) for indices in task.categories.values()) > 5
    indices = selected_items(task, 2)
    items = prompted_items(task, limit=2, num_fewshot=5)
    assert len(items) == 2 * 57 and {task.items[i].category for i in indices} == set(task.categories)
    for index, prompted in zip(indices, items):
        item = task.items[index]
        assert prompted.continuations == ("A", "B", "C", "D") and len(set(prompted.contexts)) == 1
        assert item.contexts[0].startswith("Question: ") and item.contexts[0].endswith("\nAnswer: ")
        # Peel the five shots off the front: each must be another item of the same category (questions may
        # themselves contain blank lines, so match whole shot texts rather than split).
        candidates = {task.items[i].shot_text for i in task.categories[item.category] if i != index}
        rest = prompted.contexts[0]
        for _ in range(5):
            matches = [c for c in candidates if rest.startswith(c + FEWSHOT_DELIMITER)]
            assert matches, f"a shot of item {index} ({item.category}) is not another item of its category"
            rest = rest[len(max(matches, key=len)) + len(FEWSHOT_DELIMITER):]
        assert rest == item.contexts[0]
