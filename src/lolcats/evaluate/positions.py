"""Next-token loss by position in the window: where a linearized model's loss departs from its teacher's.

A linearized layer is exact (softmax) over its recent window and approximate (linear attention) beyond it, so
its loss should match the teacher's at the start of a window and drift as the context grows. ``loss_by_position``
measures that: the text is BOS + its tokens (as ``runner.text_perplexity``), cut into non-overlapping windows of
``seq_len`` tokens, every token but a window's first predicted (the ``documents`` protocol of perplexity.py); the
position of a prediction is the index in its window of the token predicted (1 .. seq_len − 1, i.e. how many
tokens of context it has), and the per-position losses are averaged in buckets of positions
``[edges[i], edges[i + 1])``.

The per-position losses come from the decoder's final hidden states and the LM head over chunks of positions
(``next_token.chunk_rows``), like ``perplexity.next_token_nll``, so no positions × vocabulary logits exist; the
token-weighted mean of the bucket losses is that function's nll over the same windows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..next_token import chunk_rows, output_head
from .perplexity import ScoredBatch, Window, scored_hidden_states, window_batches

# Bucket edges before the doubling: 0–64, 64–128, 128–512, then 512–1024, 1024–2048, ... doubling up to seq_len.
FIRST_EDGES = (0, 64, 128, 512)


def default_edges(seq_len: int) -> list[int]:
    """0, 64, 128, 512, 1024, 2048, … (doubling), the last edge ``seq_len``: every position below ``seq_len``
    falls in exactly one bucket."""
    edges = [edge for edge in FIRST_EDGES if edge < seq_len]
    while edges[-1] >= FIRST_EDGES[-1] and 2 * edges[-1] < seq_len:
        edges.append(2 * edges[-1])
    return edges + [seq_len]


def bucket_edges(seq_len: int, edges: Sequence[int] | None = None) -> list[int]:
    """``edges`` (strictly increasing, non-negative; None: ``default_edges``) made to cover 0 .. ``seq_len``:
    0 put first if missing, edges at or past ``seq_len`` dropped and ``seq_len`` put last."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 to predict anything, got {seq_len}")
    if edges is None:
        return default_edges(seq_len)
    edges = [int(edge) for edge in edges]
    if any(b <= a for a, b in zip(edges, edges[1:])) or any(edge < 0 for edge in edges):
        raise ValueError(f"position bucket edges must be non-negative and strictly increasing, got {edges}")
    edges = [edge for edge in edges if edge < seq_len]
    if not edges or edges[0] != 0:
        edges = [0] + edges
    return edges + [seq_len]


def parse_edges(text: str) -> list[int]:
    """``"64,128,512"`` → [64, 128, 512] (the form of ``--position-edges``)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--position-edges takes comma-separated integers (e.g. 64,128,512), got {text!r}") from None


@torch.no_grad()
def next_token_nll_rows(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``targets`` (N,) at each row of ``hidden`` (N, d: final hidden states), fp32 (N,): the
    per-row form of ``next_token.next_token_loss_sum`` (the LM head over ``chunk_rows`` rows at a time, in the
    model's dtype, logits upcast to fp32 and soft-capped as the model does)."""
    head, softcap = output_head(model)
    rows = chunk_rows(head.out_features)
    hidden = hidden.contiguous()
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for begin in range(0, hidden.shape[0], rows):
        end = min(begin + rows, hidden.shape[0])
        logits = head(hidden[begin:end]).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        losses[begin:end] = -torch.log_softmax(logits, dim=-1).gather(1, targets[begin:end, None])[:, 0]
    return losses


@torch.no_grad()
def nll_by_position(model, batches: Iterable[ScoredBatch], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ NLL, count) at each position 0 .. ``length`` − 1 (float64 and int64 tensors of ``length``, on the CPU)
    over the scored tokens of ``batches`` (``perplexity.ScoredBatch``), position t being the index in its row
    of the token predicted."""
    sums = torch.zeros(length, dtype=torch.float64)
    counts = torch.zeros(length, dtype=torch.long)
    for hidden, targets, positions in scored_hidden_states(model, batches):
        if int(positions.max()) >= length:
            raise ValueError(f"a row of {int(positions.max()) + 1} tokens is longer than the {length} positions counted")
        sums.index_add_(0, positions, next_token_nll_rows(model, hidden, targets).double().cpu())
        counts.index_add_(0, positions, torch.ones_like(positions))
    return sums, counts


def position_windows(token_ids: Sequence[int] | torch.Tensor, seq_len: int) -> list[Window]:
    """Non-overlapping windows of ``seq_len`` tokens (the last may be shorter; one of a single token predicts
    nothing and is left out), each with its first token as context only."""
    stream = torch.as_tensor(token_ids, dtype=torch.long)
    return [(stream[begin:begin + seq_len], 1) for begin in range(0, len(stream), seq_len)
            if len(stream[begin:begin + seq_len]) > 1]


def bucket_losses(sums: torch.Tensor, counts: torch.Tensor, edges: Sequence[int]) -> dict:
    """Mean loss and tokens of each bucket [edges[i], edges[i + 1]) of per-position sums and counts (a bucket
    with no token has mean_loss None)."""
    mean_loss, tokens = [], []
    for low, high in zip(edges, edges[1:]):
        total, count = float(sums[low:high].sum()), int(counts[low:high].sum())
        mean_loss.append(total / count if count else None)
        tokens.append(count)
    return {"edges": list(edges), "mean_loss": mean_loss, "tokens": tokens}


def loss_by_position(model, token_ids: Sequence[int] | torch.Tensor, *, seq_len: int,
                     edges: Sequence[int] | None = None, batch_size: int = 4) -> dict:
    """``{"edges", "mean_loss", "tokens", "seq_len", "windows"}`` of ``token_ids`` (BOS included by the caller)
    cut into non-overlapping windows of ``seq_len`` (see the module docstring); ``edges`` as ``bucket_edges``."""
    edges = bucket_edges(seq_len, edges)
    windows = position_windows(token_ids, seq_len)
    if not windows:
        raise ValueError("too little text to score by position")
    sums, counts = nll_by_position(model, window_batches(windows, batch_size), seq_len)
    return {**bucket_losses(sums, counts, edges), "seq_len": seq_len, "windows": len(windows)}
