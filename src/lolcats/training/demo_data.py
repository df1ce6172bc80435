"""Training and held-out text for the embedded default, made by the teacher itself.

No text corpus ships with the default teacher, and `../shared` is not part of an install, so the demo
samples its data from the teacher (self-distillation text: the teacher's own distribution, which is what
attention transfer needs). Train and held-out documents come from disjoint seeds. The files are cached
under ~/.cache/lolcats (or $LOLCATS_CACHE) keyed by the teacher's fingerprint and the sampling settings.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..artifacts import atomic_write_bytes


def cache_dir() -> Path:
    return Path(os.environ.get("LOLCATS_CACHE", Path.home() / ".cache" / "lolcats"))


def _sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Nucleus sampling within the top_k most likely tokens (a full-vocabulary sort per step is what
    makes transformers' generate() slow on a 262k vocabulary on CPU)."""
    values, indices = torch.topk(logits.float() / temperature, top_k, dim=-1)
    probs = torch.softmax(values, dim=-1)
    outside = probs.cumsum(-1) - probs > top_p
    probs = probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1)
    return indices.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def sample_documents(model, tokenizer, *, num_docs: int, max_new_tokens: int, seed: int, batch_size: int = 48,
                     temperature: float = 1.0, top_p: float = 0.95, top_k: int = 64) -> list[str]:
    """``num_docs`` texts sampled from BOS alone, ending at EOS or after ``max_new_tokens`` tokens."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None:
        raise ValueError("sampling demo data needs a tokenizer with a BOS token")
    documents: list[str] = []
    for first in range(0, num_docs, batch_size):
        count = min(batch_size, num_docs - first)
        generator_seed = seed * 100_003 + first
        torch.manual_seed(generator_seed)
        output = model(input_ids=torch.full((count, 1), bos, dtype=torch.long), use_cache=True)
        # transformers renamed the cache argument (past_key_values -> cache) in 5.x.
        cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        finished = torch.zeros(count, dtype=torch.bool)
        rows = []
        for _ in range(max_new_tokens):
            token = _sample(output.logits[:, -1], temperature, top_p, top_k)
            if eos is not None:
                token = torch.where(finished, torch.full_like(token, eos), token)
                finished |= token == eos
            rows.append(token)
            if bool(finished.all()):
                break
            cache = getattr(output, "cache", None) or output.past_key_values
            output = model(input_ids=token[:, None], use_cache=True, **{cache_argument: cache})
        for row in torch.stack(rows, 1):
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            # Blank lines separate documents in our text format: keep each sample one document.
            text = "\n".join(line for line in text.splitlines() if line.strip())
            if text:
                documents.append(text)
    return documents


def default_data(model, tokenizer, fingerprint: str, *, train_docs: int = 96, held_docs: int = 12,
                 max_new_tokens: int = 384, echo: Callable[[str], None] = print) -> tuple[Path, Path]:
    """(train file, held-out file) of teacher samples, sampled once and cached."""
    folder = cache_dir() / f"samples-{fingerprint[:16]}-{train_docs}-{held_docs}-{max_new_tokens}"
    train_path, held_path = folder / "train.txt", folder / "held_out.txt"
    if train_path.is_file() and held_path.is_file():
        echo(f"demo data: teacher samples cached in {folder}")
        return train_path, held_path
    echo(f"demo data: sampling {train_docs} + {held_docs} documents of up to {max_new_tokens} tokens from the teacher "
         "(once; cached)")
    started = time.perf_counter()
    train = sample_documents(model, tokenizer, num_docs=train_docs, max_new_tokens=max_new_tokens, seed=1)
    held = sample_documents(model, tokenizer, num_docs=held_docs, max_new_tokens=max_new_tokens, seed=2)
    atomic_write_bytes(held_path, ("\n\n".join(held) + "\n").encode())
    atomic_write_bytes(train_path, ("\n\n".join(train) + "\n").encode())
    echo(f"demo data: sampled in {time.perf_counter() - started:.0f} s")
    return train_path, held_path
