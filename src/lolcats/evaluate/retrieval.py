"""Passkey retrieval, generated: can the model read back a number hidden at a given depth of a long prompt?

Each prompt is an instruction, filler sentences that carry no information, a needle at a chosen depth and a
question; the answer is decoded greedily through the model's own ``generate()``, so for a linearized model the
constant-size cache (window ring + linear state) is what gets tested, not a full forward (the passkey test of
Mohtashami & Jaggi 2023, as used by LongLoRA, LoLCATs and LoLA):

  passkey   one needle "The pass key is 71432. Remember it. 71432 is the pass key." and the question
            "What is the pass key? The pass key is"; right when the first number generated is the key.
  multikey  ``MULTIKEY_NEEDLES`` needles "The pass key of Ben is 71432. Remember it." with different names and
            keys, scattered; the one asked for ("What is the pass key of Ben? The pass key of Ben is") sits at
            the depth, the others at seeded random depths, so copying the only number in view cannot pass.

``context`` is the prompt's length in tokens (the tokenizer's count, BOS included): filler sentences are added
until one more would pass it, so a prompt is at most ``context`` tokens and within one sentence of it. ``depth``
d puts the needle after round(d·n) of the n filler sentences: d = 0.1 is near the start (the oldest tokens, the
ones a linear state must remember longest), d = 0.9 near the question. Keys, names and distractor depths come
from an RNG seeded by (seed, task, context, depth, trial), so every model sees the same prompts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

RETRIEVAL_TASKS = ("passkey", "multikey")
DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MULTIKEY_NEEDLES = 4

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about it.\n\n")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NAMES = ("Ben", "Lily", "Tom", "Mia", "Sam", "Anna", "Max", "Zoe", "Jack", "Emma", "Leo", "Ruth")


@dataclass(frozen=True)
class RetrievalPrompt:
    task: str
    context: int  # the requested length in tokens
    depth: float
    trial: int
    prompt: str
    answer: str  # the key, five digits
    tokens: int  # the prompt's length in tokens (<= context)
    needle_token: int  # index of the first token of the asked-for needle in the tokenized prompt


def _length(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])  # with the tokenizer's special tokens, as generate() sees it


def _needle(task: str, key: str, name: str) -> str:
    if task == "passkey":
        return f"The pass key is {key}. Remember it. {key} is the pass key."
    return f"The pass key of {name} is {key}. Remember it."


def _question(task: str, name: str) -> str:
    if task == "passkey":
        return "\n\nWhat is the pass key? The pass key is"
    return f"\n\nWhat is the pass key of {name}? The pass key of {name} is"


def retrieval_prompt(tokenizer, task: str, *, context: int, depth: float, trial: int = 0,
                     seed: int = 0) -> RetrievalPrompt:
    """The prompt of ``task`` for one (context, depth, trial); deterministic for a seed."""
    if task not in RETRIEVAL_TASKS:
        raise ValueError(f"unknown retrieval task {task!r}; known: {', '.join(RETRIEVAL_TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"a depth is a fraction of the prompt between 0 and 1, got {depth}")
    rng = random.Random(f"{seed}/{task}/{context}/{depth}/{trial}")
    needles = 1 if task == "passkey" else MULTIKEY_NEEDLES
    keys = [str(rng.randint(10_000, 99_999)) for _ in range(needles)]
    while len(set(keys)) < needles:
        keys = [str(rng.randint(10_000, 99_999)) for _ in range(needles)]
    names = rng.sample(NAMES, needles)
    texts = [_needle(task, key, name) for key, name in zip(keys, names)]
    question = _question(task, names[0])
    # The other needles' places, as fractions of the filler: drawn once, so every length tried below puts them
    # at the same fractions and the prompt finally built is the one whose length was measured.
    fractions = [rng.random() for _ in texts[1:]]

    def build(sentences: int) -> tuple[str, str]:
        """(prompt, the text before the asked-for needle) with ``sentences`` filler sentences."""
        # Needle i goes before filler sentence slot[i]: the asked-for one at the depth, the others at their fractions.
        slots = [round(depth * sentences)] + [round(fraction * sentences) for fraction in fractions]
        parts, before = [INSTRUCTION], None
        for index in range(sentences + 1):
            for needle, slot in enumerate(slots):
                if slot == index:
                    if needle == 0:
                        before = "".join(parts)
                    parts.append(texts[needle] + " ")
            if index < sentences:
                parts.append(FILLER[index % len(FILLER)] + " ")
        return "".join(parts).rstrip() + question, before

    # Filler sentences: the most that keep the prompt within ``context`` tokens (bisection on the real count).
    low, high = 0, max(1, context)
    if _length(tokenizer, build(0)[0]) > context:
        raise ValueError(f"a {task} prompt needs more than {context} tokens even without filler; use a longer context")
    while low < high:
        middle = (low + high + 1) // 2
        if _length(tokenizer, build(middle)[0]) <= context:
            low = middle
        else:
            high = middle - 1
    prompt, before = build(low)
    # The needle starts a word after a space: its first token is the one after the prefix's tokens.
    needle_token = _length(tokenizer, before.rstrip())
    return RetrievalPrompt(task=task, context=context, depth=depth, trial=trial, prompt=prompt, answer=keys[0],
                           tokens=_length(tokenizer, prompt), needle_token=needle_token)


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of ``prompts`` through ``model.generate`` (left-padded batches)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for begin in range(0, len(prompts), batch_size):
        batch = list(prompts[begin:begin + batch_size])
        encoded = [tokenizer(prompt)["input_ids"] for prompt in batch]
        width = max(map(len, encoded))
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                top_k=None, pad_token_id=pad_id)
        answers += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return answers


def evaluate_retrieval(model, tokenizer, task: str, *, contexts: Sequence[int] = DEFAULT_CONTEXTS,
                       depths: Sequence[float] = DEFAULT_DEPTHS, trials: int = 1, seed: int = 0,
                       batch_size: int = 1, echo: Callable[[str], None] = print) -> dict:
    """Accuracy of ``task`` per context × depth (``trials`` prompts each), greedy decoding through generate().

    Result: ``accuracy`` (a list per context of the accuracy at each depth), ``by_context``, ``mean`` and
    ``items`` (context, depth, trial, answer, generated text, right) for every prompt.
    """
    accuracy, items = [], []
    for context in contexts:
        prompts = [retrieval_prompt(tokenizer, task, context=context, depth=depth, trial=trial, seed=seed)
                   for depth in depths for trial in range(trials)]
        # The answer's tokens plus a few: the key is five digits, which some tokenizers split one per token.
        room = max(_length(tokenizer, " " + p.answer + ".") for p in prompts[:1]) + 2
        generated = generate_answers(model, tokenizer, [p.prompt for p in prompts], max_new_tokens=room,
                                     batch_size=batch_size)
        right = [first_number(text) == p.answer for p, text in zip(prompts, generated)]
        items += [{"context": p.context, "depth": p.depth, "trial": p.trial, "tokens": p.tokens,
                   "answer": p.answer, "generated": text, "right": ok} for p, text, ok in zip(prompts, generated, right)]
        row = [sum(right[i * trials:(i + 1) * trials]) / trials for i in range(len(depths))]
        accuracy.append(row)
        echo(f"{task} {context:>6} tokens: " + " ".join(f"{depth:g}:{value:.2f}" for depth, value in zip(depths, row))
             + f"  mean {sum(row) / len(row):.3f}")
    by_context = {str(context): sum(row) / len(row) for context, row in zip(contexts, accuracy)}
    return {"contexts": list(contexts), "depths": list(depths), "trials": trials, "seed": seed, "accuracy": accuracy,
            "by_context": by_context, "mean": sum(by_context.values()) / len(by_context), "items": items}


def parse_numbers(text: str, kind: type, option: str) -> list:
    """``"1024,2048"`` → [1024, 2048] (the form of ``--contexts`` and ``--depths``)."""
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, got {text!r}") from None
