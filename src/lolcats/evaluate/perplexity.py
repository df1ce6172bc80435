"""Token-level perplexity on a text file, with the BOS handling stated.

Protocols (``protocol=``):
  documents   each document (blank-line separated) is BOS + its tokens; documents are concatenated and cut
              into windows of ``seq_len`` tokens; every token but a window's first is predicted. This is
              the stories260k protocol of DEVELOPERS.md ("BOS-prefixed stories packed into 512-token
              windows"). Windows may span a story boundary, as in that protocol.
  per-document  each document is scored alone as BOS + its first ``seq_len`` − 1 tokens (the stories260k
              model card's protocol); no window mixes documents.
  bos-window  the file is one token stream (no special tokens; literal "<unk>" stays text); the first
              ``max_tokens`` are cut into windows of ``seq_len``, each scored as BOS + window, so every
              token is predicted. This is the Gemma protocol of shared/data/README.md.
ppl = exp(total NLL / predicted tokens).

Every perplexity in lolcats is computed by ``next_token_nll`` below: these protocols, the rolling windows of
``lolcats eval`` (``rolling_windows``; runner.text_perplexity, scoring.rolling_loglikelihood), the held-out
split of ``lolcats linearize`` (training/linearize.held_out_perplexity) and the ``lolcats convert`` report only
build the windows or batches it scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..data import IGNORE_INDEX, read_documents
from ..next_token import final_hidden, next_token_loss_sum

Protocol = Literal["documents", "per-document", "bos-window"]

# (input_ids, attention_mask or None, labels), each (B, L): labels[b, t] is the token position t − 1 must predict,
# IGNORE_INDEX where nothing is scored (the labels of a causal LM: the input ids where scored; column 0 never is).
# A None mask means no padding, and the model runs without one.
ScoredBatch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]
# A window of tokens and how many of its leading tokens are context only (at least 1: the first predicts nothing).
Window = tuple[Sequence[int] | torch.Tensor, int]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    except TypeError:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def perplexity_windows(tokenizer, path: str | Path, *, seq_len: int, protocol: Protocol = "documents",
                       max_tokens: int | None = None) -> tuple[list[list[int]], int]:
    """The windows to score and how many leading tokens of each are context only (not predicted)."""
    bos = tokenizer.bos_token_id
    if protocol == "documents":
        stream: list[int] = []
        for document in read_documents(path):
            stream += ([bos] if bos is not None else []) + _encode(tokenizer, document.prompt + document.text)
        if max_tokens:
            stream = stream[:max_tokens]
        return [stream[i:i + seq_len] for i in range(0, len(stream), seq_len) if len(stream[i:i + seq_len]) > 1], 1
    if protocol == "per-document":
        prefix = [bos] if bos is not None else []
        windows = [(prefix + _encode(tokenizer, d.prompt + d.text))[:seq_len] for d in read_documents(path)]
        return [w for w in windows if len(w) > 1], 1
    if protocol == "bos-window":
        if bos is None:
            raise ValueError("the bos-window protocol needs a tokenizer with a BOS token")
        stream = _encode(tokenizer, Path(path).read_text())
        if max_tokens:
            stream = stream[:max_tokens]
        return [[bos] + stream[i:i + seq_len] for i in range(0, len(stream), seq_len)], 1
    raise ValueError(f"unknown perplexity protocol {protocol!r}; expected 'documents', 'per-document' or 'bos-window'")


@torch.no_grad()
def next_token_nll(model, batches: Iterable[ScoredBatch]) -> tuple[float, int]:
    """(Σ NLL in nats, tokens) of the scored tokens of ``batches`` (see ``ScoredBatch``), one forward per batch.

    The one perplexity computation: the decoder's final hidden states at the scored positions go through the
    LM head in chunks (next_token.py), so no positions × vocabulary logits tensor exists; each batch's sum is
    accumulated in fp32, the total in float64."""
    total, count = 0.0, 0
    for hidden, targets, _ in scored_hidden_states(model, batches):
        total += float(next_token_loss_sum(model, hidden, targets))
        count += targets.shape[0]
    return total, count


def scored_hidden_states(model, batches: Iterable[ScoredBatch]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch with a scored token: (final hidden states (N, d) at the N positions that predict a scored token,
    the tokens they predict (N,), and the index in its row of each predicted token (N,), on the CPU): one forward
    per batch, and the one place every next-token loss (total, by position) is computed from."""
    device = next(model.parameters()).device
    for input_ids, attention_mask, labels in batches:
        targets = labels[:, 1:].to(device)
        scored = targets != IGNORE_INDEX
        if not bool(scored.any()):
            continue
        mask = None if attention_mask is None else attention_mask.to(device)
        hidden = final_hidden(model, input_ids.to(device), mask)[:, :-1]
        positions = torch.arange(1, labels.shape[1]).expand(labels.shape[0], -1)[scored.cpu()]
        yield hidden[scored], targets[scored], positions


def window_batches(windows: Sequence[Window], batch_size: int) -> Iterator[ScoredBatch]:
    """Windows as ``ScoredBatch``es without padding: windows of one length together, ``batch_size`` at a time
    (shortest length first; a protocol's short tail window runs alone)."""
    for length in sorted({len(tokens) for tokens, _ in windows}):
        same = [window for window in windows if len(window[0]) == length]
        for begin in range(0, len(same), batch_size):
            rows = same[begin:begin + batch_size]
            input_ids = torch.stack([torch.as_tensor(tokens, dtype=torch.long) for tokens, _ in rows])
            labels = input_ids.clone()
            for row, (_, context) in enumerate(rows):
                labels[row, :context] = IGNORE_INDEX
            yield input_ids, None, labels


def rolling_windows(token_ids: Sequence[int] | torch.Tensor, *, seq_len: int, stride: int | None = None) -> list[Window]:
    """Sliding windows over a token stream: each predicts ``stride`` new tokens (default ``seq_len`` − 1: windows
    overlap by the one token that gives the first prediction its context, as lm-eval's rolling windows do) with
    up to ``seq_len`` tokens in all, so every token after the first is predicted exactly once and a smaller
    stride gives each prediction more context. The first token (BOS, when the caller puts one there) is context
    only."""
    stride = stride or seq_len - 1
    if not 0 < stride < seq_len:
        raise ValueError(f"stride must be in 1..seq_len-1 ({seq_len - 1}), got {stride}")
    stream = torch.as_tensor(token_ids, dtype=torch.long)
    windows = []
    predicted_until = 1
    while predicted_until < len(stream):
        end = min(predicted_until + stride, len(stream))
        begin = max(0, end - seq_len)
        windows.append((stream[begin:end], predicted_until - begin))
        predicted_until = end
    return windows


def perplexity(model, tokenizer, path: str | Path, *, seq_len: int = 512, protocol: Protocol = "documents",
               max_tokens: int | None = None, batch_size: int = 4) -> PerplexityResult:
    windows, context = perplexity_windows(tokenizer, path, seq_len=seq_len, protocol=protocol, max_tokens=max_tokens)
    total_nll, total_tokens = next_token_nll(model, window_batches([(w, context) for w in windows], batch_size))
    return PerplexityResult(ppl=math.exp(total_nll / total_tokens), nll=total_nll / total_tokens, tokens=total_tokens)
