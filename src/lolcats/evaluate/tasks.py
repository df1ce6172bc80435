"""Zero/few-shot tasks from local jsonl files, in llm-foundry's prompt formats, scored as lm-eval scores them.

The format is detected from the fields of each file (the task's name is the file's stem):

  multiple choice  {query, choices, gold}        context = query + "\\nAnswer: ", continuation = choice
  schema           {context_options, continuation, gold}
                                                 context = option, continuation = " " + continuation
  language model   {context, continuation}       context = context, continuation = " " + continuation
  HellaSwag        {ctx, endings, label}         lm-eval's preprocessing; continuation = " " + ending

Metrics as lm-eval defines them: acc is the choice with the highest summed log-likelihood; acc_norm the
highest log-likelihood per character of the choice (multiple choice and HellaSwag only); language-model
tasks report acc (greedy decoding reproduces every continuation token) and perplexity
exp(−mean continuation log-likelihood). Few-shot examples come from the same file (never the item
itself), drawn with a fixed seed, each written with its gold answer and separated by a blank line.

Categorised tasks (llm-foundry's ``has_categories``): a file whose every line has a string ``category``
(MMLU's subjects, say) is scored per category. An item's few-shot examples are other items of its own category
(never the item, never another category; a file has no dev split, so this is the only pool), drawn with an RNG
seeded by (seed, the item's index in the file), so every model and every ``limit`` sees the same prompt for an
item; a category with no more than ``num_fewshot`` items is an error naming it. ``limit`` takes the first
``limit`` items of each category, in file order (lm-eval's ``--limit`` is likewise per subtask). Results add
``categories: {name: {acc, acc_norm, n}}`` and ``macro_acc``, the unweighted mean of the categories' acc, next
to ``acc``, the mean over all scored items. lm-eval's MMLU headline ("mmlu" acc) is ``acc``: its groups
aggregate with ``weight_by_size: True`` (lm_eval/tasks/mmlu/default/_mmlu.yaml), a mean of subtask accuracies
weighted by their sample counts, which is the mean over all items; ``macro_acc`` is what lm-eval would report
with ``weight_by_size: False``. A file where only some lines have a category is a TaskFormatError.

MMLU's llm-foundry file puts question and lettered options in ``query`` ("Question: ...\nA. ...\nD. ...") and
has choices ["A", "B", "C", "D"]; llm-foundry scores it as a multiple-choice task with continuation delimiter
"\nAnswer: " and no subject preamble (scripts/eval/yamls/tasks_v0.3.yaml), which is the multiple-choice format
above; scoring moves the trailing space to the continuation, so " A" is scored after "Answer:" as in lm-eval.
Two differences remain: shots are joined by a blank line (lm-eval's few-shot delimiter, the same for every task
here; llm-foundry's default example delimiter is one newline); and lm-eval's own MMLU adds "The following are
multiple choice questions (with answers) about {subject}.\n\n", has no "Question: " and takes its shots from
the dev split, which this file does not have.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from ..jsonl import jsonl_objects
from .scoring import score_pairs

TaskKind = Literal["multiple_choice", "schema", "language_modeling", "hellaswag"]
MULTIPLE_CHOICE_DELIMITER = "\nAnswer: "
FEWSHOT_DELIMITER = "\n\n"


class TaskFormatError(ValueError):
    """A task file line that is not one of the supported formats; the message names file and line."""


@dataclass(frozen=True)
class Item:
    """One example: the (context, continuation) pairs to score and what counts as right."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int | None  # None for language-modelling items (one pair, judged by greedy match)
    choice_lengths: tuple[int, ...] = ()  # characters per choice, for acc_norm
    shot_text: str = ""  # the example written with its gold answer, for use as a few-shot example
    category: str | None = None  # the line's `category` (llm-foundry's has_categories), None when the file has none


@dataclass
class Task:
    name: str
    kind: TaskKind
    items: list[Item] = field(default_factory=list)
    # category -> indices of its items in file order (categories in order of first appearance); empty when the
    # file has no categories
    categories: dict[str, list[int]] = field(default_factory=dict)

    @property
    def categorised(self) -> bool:
        return bool(self.categories)


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _detect(record: dict) -> TaskKind | None:
    if {"query", "choices", "gold"} <= record.keys():
        return "multiple_choice"
    if {"context_options", "continuation", "gold"} <= record.keys():
        return "schema"
    if {"endings", "label"} <= record.keys() and ("ctx" in record or "ctx_a" in record):
        return "hellaswag"
    if {"context", "continuation"} <= record.keys():
        return "language_modeling"
    return None


def _gold(record: dict, key: str, count: int) -> int:
    gold = record[key]
    if isinstance(gold, str) and gold.strip().lstrip("-").isdigit():
        gold = int(gold)
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < count:
        raise ValueError(f"{key} must be an index into the {count} choices, got {record[key]!r}")
    return gold


def _strings(record: dict, key: str) -> list[str]:
    values = record[key]
    if not isinstance(values, list) or len(values) < 2 or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{key} must be a list of at least two strings")
    return values


def _item(kind: TaskKind, record: dict) -> Item:
    if kind == "multiple_choice":
        choices = _strings(record, "choices")
        gold = _gold(record, "gold", len(choices))
        context = str(record["query"]) + MULTIPLE_CHOICE_DELIMITER
        return Item((context,) * len(choices), tuple(choices), gold, tuple(len(c) for c in choices),
                    context + choices[gold])
    if kind == "schema":
        options = _strings(record, "context_options")
        gold = _gold(record, "gold", len(options))
        continuation = " " + str(record["continuation"])
        return Item(tuple(options), (continuation,) * len(options), gold, shot_text=options[gold] + continuation)
    if kind == "hellaswag":
        ctx = record["ctx"] if "ctx" in record else record["ctx_a"] + " " + record.get("ctx_b", "").capitalize()
        query = _hellaswag_preprocess(f"{record.get('activity_label', '')}: {ctx}" if "activity_label" in record else ctx)
        choices = [_hellaswag_preprocess(ending) for ending in _strings(record, "endings")]
        gold = _gold(record, "label", len(choices))
        return Item((query,) * len(choices), tuple(" " + c for c in choices), gold, tuple(len(c) for c in choices),
                    query + " " + choices[gold])
    context, continuation = record["context"], record["continuation"]
    if not isinstance(context, str) or not isinstance(continuation, str) or not continuation.strip():
        raise ValueError("context and continuation must be strings, the continuation non-empty")
    return Item((context,), (" " + continuation,), None, shot_text=context + " " + continuation)


def load_task(path: str | Path) -> Task:
    """Read a task file; any line that cannot be read is a TaskFormatError naming file and line."""
    path = Path(path)
    task: Task | None = None
    for where, record in jsonl_objects(path, TaskFormatError):
        kind = _detect(record)
        if kind is None:
            raise TaskFormatError(
                f"{where}: unknown task format with fields {sorted(record)}; expected {{query, choices, gold}}, "
                "{context_options, continuation, gold}, {context, continuation} or {ctx, endings, label}"
            )
        if task is None:
            task = Task(path.stem, kind)
        elif kind != task.kind:
            raise TaskFormatError(f"{where}: a {kind} line in a {task.kind} file")
        try:
            item = _item(kind, record)
        except (KeyError, TypeError, ValueError) as err:
            raise TaskFormatError(f"{where}: {err}") from None
        category = record.get("category")
        if "category" in record and (not isinstance(category, str) or not category):
            raise TaskFormatError(f"{where}: category must be a non-empty string, got {category!r}")
        if task.items and (category is None) != (task.items[0].category is None):
            found = ("no category, but earlier lines have one" if category is None
                     else "a category, but earlier lines have none")
            raise TaskFormatError(f"{where}: {found} (a categorised task needs a category on every line)")
        if category is not None:
            item = replace(item, category=category)
            task.categories.setdefault(category, []).append(len(task.items))
        task.items.append(item)
    if task is None:
        raise TaskFormatError(f"{path}: no examples")
    return task


def task_files(task_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    task_dir = Path(task_dir)
    available = {p.stem: p for p in sorted(task_dir.glob("*.jsonl"))}
    if not names:
        return list(available.values())
    missing = [n for n in names if n not in available]
    if missing:
        raise FileNotFoundError(f"no task file for {missing} in {task_dir} (available: {', '.join(available) or 'none'})")
    return [available[n] for n in names]


def _with_shots(task: Task, index: int, num_fewshot: int, rng: random.Random) -> Item:
    """The item with ``num_fewshot`` other items of the file (of its category, in a categorised task) before it."""
    item = task.items[index]
    if num_fewshot == 0:
        return item
    pool = task.categories[item.category] if item.category is not None else range(len(task.items))
    others = [i for i in pool if i != index]
    if len(others) < num_fewshot:
        where = f"category {item.category!r} of {task.name}" if item.category is not None else task.name
        raise ValueError(f"{where}: {num_fewshot}-shot needs more than {len(others) + 1} examples")
    shots = FEWSHOT_DELIMITER.join(task.items[i].shot_text for i in rng.sample(others, num_fewshot))
    prefix = shots + FEWSHOT_DELIMITER
    return Item(tuple(prefix + c for c in item.contexts), item.continuations, item.gold, item.choice_lengths,
                category=item.category)


def selected_items(task: Task, limit: int | None = None) -> list[int]:
    """Indices of the items scored, in file order: the first ``limit`` of the file, or of each category."""
    if not task.categorised:
        return list(range(min(limit or len(task.items), len(task.items))))
    return sorted(i for indices in task.categories.values() for i in indices[:limit or None])


def prompted_items(task: Task, *, limit: int | None = None, num_fewshot: int = 0, seed: int = 1234) -> list[Item]:
    """The items scored, with their few-shot examples. In a categorised task each item's examples are drawn by
    an RNG seeded with (seed, its index in the file), so they depend on neither ``limit`` nor the other items;
    a category too small for ``num_fewshot`` is an error before anything is scored."""
    indices = selected_items(task, limit)
    if not task.categorised:
        rng = random.Random(seed)
        return [_with_shots(task, i, num_fewshot, rng) for i in indices]
    if num_fewshot:
        small = [name for name, members in task.categories.items() if len(members) <= num_fewshot]
        if small:
            sizes = ", ".join(f"{name!r} has {len(task.categories[name])}" for name in small)
            raise ValueError(f"{task.name}: {num_fewshot}-shot needs at least {num_fewshot + 1} items in every "
                             f"category; category {sizes}")
    return [_with_shots(task, i, num_fewshot, random.Random(f"{seed}:{i}")) for i in indices]


def _accuracy(hits: list[tuple[bool, bool]], normalised: bool) -> dict:
    return {"acc": sum(h for h, _ in hits) / len(hits),
            "acc_norm": sum(h for _, h in hits) / len(hits) if normalised else None, "n": len(hits)}


def evaluate_task(model, tokenizer, task: Task, *, limit: int | None = None, num_fewshot: int = 0, seed: int = 1234,
                  batch_size: int = 8, max_length: int | None = None) -> dict:
    """{acc, acc_norm, n, choices, truncated[, perplexity]} over the first ``limit`` items (the same items and
    prompts for every model); for a categorised task ``limit`` is per category, and the result adds
    ``categories: {name: {acc, acc_norm, n}}`` and ``macro_acc`` (the unweighted mean of the categories' acc;
    ``acc`` is over all items, which is what lm-eval's size-weighted MMLU group reports)."""
    items = prompted_items(task, limit=limit, num_fewshot=num_fewshot, seed=seed)
    pairs = [(c, x) for item in items for c, x in zip(item.contexts, item.continuations)]
    all_scores = score_pairs(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length)
    scores = iter(all_scores)
    hits: list[tuple[bool, bool]] = []  # (acc, acc_norm) per item
    loglikelihoods = []
    for item in items:
        item_scores = [next(scores) for _ in item.continuations]
        if item.gold is None:
            hits.append((item_scores[0].is_greedy, False))
            loglikelihoods.append(item_scores[0].loglikelihood)
            continue
        values = [s.loglikelihood for s in item_scores]
        correct = max(range(len(values)), key=values.__getitem__) == item.gold
        correct_norm = False
        if item.choice_lengths:
            normalised = [v / max(n, 1) for v, n in zip(values, item.choice_lengths)]
            correct_norm = max(range(len(values)), key=normalised.__getitem__) == item.gold
        hits.append((correct, correct_norm))
    with_norm = task.kind in ("multiple_choice", "hellaswag")
    result = {**_accuracy(hits, with_norm), "choices": len(pairs),
              "truncated": sum(score.truncated for score in all_scores)}
    if task.kind == "language_modeling":
        result["perplexity"] = math.exp(-sum(loglikelihoods) / len(loglikelihoods))
    if task.categorised:
        by_category: dict[str, list[tuple[bool, bool]]] = {}
        for item, hit in zip(items, hits):
            by_category.setdefault(item.category, []).append(hit)
        result["categories"] = {name: _accuracy(by_category[name], with_norm) for name in sorted(by_category)}
        result["macro_acc"] = sum(c["acc"] for c in result["categories"].values()) / len(result["categories"])
    return result
