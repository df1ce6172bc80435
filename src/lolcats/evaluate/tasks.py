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
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
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


@dataclass
class Task:
    name: str
    kind: TaskKind
    items: list[Item] = field(default_factory=list)


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
            task.items.append(_item(kind, record))
        except (KeyError, TypeError, ValueError) as err:
            raise TaskFormatError(f"{where}: {err}") from None
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
    item = task.items[index]
    if num_fewshot == 0:
        return item
    others = [i for i in range(len(task.items)) if i != index]
    if len(others) < num_fewshot:
        raise ValueError(f"{task.name}: {num_fewshot}-shot needs more than {len(task.items)} examples")
    shots = FEWSHOT_DELIMITER.join(task.items[i].shot_text for i in rng.sample(others, num_fewshot))
    prefix = shots + FEWSHOT_DELIMITER
    return Item(tuple(prefix + c for c in item.contexts), item.continuations, item.gold, item.choice_lengths)


def evaluate_task(model, tokenizer, task: Task, *, limit: int | None = None, num_fewshot: int = 0, seed: int = 1234,
                  batch_size: int = 8, max_length: int | None = None) -> dict:
    """{acc, acc_norm, n[, perplexity]} over the first ``limit`` items (the same items for every model)."""
    rng = random.Random(seed)
    items = [_with_shots(task, i, num_fewshot, rng) for i in range(min(limit or len(task.items), len(task.items)))]
    pairs = [(c, x) for item in items for c, x in zip(item.contexts, item.continuations)]
    all_scores = score_pairs(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length)
    scores = iter(all_scores)
    correct = correct_norm = 0
    loglikelihoods = []
    for item in items:
        item_scores = [next(scores) for _ in item.continuations]
        if item.gold is None:
            correct += item_scores[0].is_greedy
            loglikelihoods.append(item_scores[0].loglikelihood)
            continue
        values = [s.loglikelihood for s in item_scores]
        correct += max(range(len(values)), key=values.__getitem__) == item.gold
        if item.choice_lengths:
            normalised = [v / max(n, 1) for v, n in zip(values, item.choice_lengths)]
            correct_norm += max(range(len(values)), key=normalised.__getitem__) == item.gold
    result = {"acc": correct / len(items), "acc_norm": None, "n": len(items), "choices": len(pairs),
              "truncated": sum(score.truncated for score in all_scores)}
    if task.kind in ("multiple_choice", "hellaswag"):
        result["acc_norm"] = correct_norm / len(items)
    if task.kind == "language_modeling":
        result["perplexity"] = math.exp(-sum(loglikelihoods) / len(loglikelihoods))
    return result
