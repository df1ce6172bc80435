"""Chunked hybrid attention: the O(L) path for training and prefill.

The sequence is cut into chunks of C tokens. Query chunk c looks at a local slice of keys
[cC − P, (c+1)C), where P (a multiple of C) covers the window's lookback; inside that slice the
softmax-window and linear terms are computed exactly with masks. Every key older than the slice is
outside every window of the chunk, so it enters only through the running linear state
S = Σ φ(k) vᵀ, z = Σ φ(k), built with one cumulative sum over per-chunk states.
Memory is O(L·(C + P) + (L/C)·F·Dv): linear in L for a fixed chunk size; no L×L tensor exists.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import (
    Window,
    accumulation_dtype,
    check_inputs,
    expand_heads,
    gamma_per_head,
    normalise,
    row_starts,
    softmax_terms,
)


def _local_slices(x: torch.Tensor, lookback: int, chunk: int) -> torch.Tensor:
    """(B, H, n·C, X) -> (B, H, n, P + C, X): for chunk c, rows [cC − P, (c+1)C), zeros before 0."""
    padded = F.pad(x, (0, 0, lookback, 0))
    return padded.unfold(2, lookback + chunk, chunk).transpose(-1, -2)


def hybrid_attention_chunked(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    v: torch.Tensor,
    fq: torch.Tensor | None,
    fk: torch.Tensor | None,
    *,
    window: Window,
    scaling: float = 1.0,
    gamma: torch.Tensor | None = None,
    use_linear: bool = True,
    start: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Same result as ``hybrid_attention_reference`` without materialising L×L."""
    check_inputs(q, k, v, fq, fk, window, use_linear)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, _, length, value_dim = v.shape
    num_heads = (q if q is not None else fq).shape[1]
    device = v.device
    _acc = accumulation_dtype(v.dtype)
    chunk = chunk_size
    num_chunks = math.ceil(length / chunk)
    padded_length = num_chunks * chunk
    # Keys up to `lookback` behind a query can sit in its window; P rounds that up to whole chunks.
    lookback = math.ceil(max(window.lookback, 0) / chunk) * chunk

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = expand_heads(x.to(_acc), num_heads)
        return F.pad(x, (0, 0, 0, padded_length - length))

    starts = row_starts(start, batch, device)
    positions = torch.arange(padded_length, device=device)[None, :] - starts[:, None]  # (B, nC)
    key_positions = torch.arange(-lookback, padded_length, device=device)[None, :] - starts[:, None]
    pos_q = positions.view(batch, 1, num_chunks, chunk, 1)
    pos_k = key_positions.unfold(1, lookback + chunk, chunk)[:, None, :, None, :]  # (B, 1, n, 1, P + C)
    causal = (pos_k >= 0) & (pos_k <= pos_q)
    in_window = causal & window.contains(pos_q, pos_k)

    values = prepare(v)
    local_values = _local_slices(values, lookback, chunk)
    weights = None
    if window.kind != "none":
        queries = prepare(q).view(batch, num_heads, num_chunks, chunk, -1)
        local_keys = _local_slices(prepare(k), lookback, chunk)
        scores = queries @ local_keys.transpose(-1, -2) * scaling
        gamma_h = gamma_per_head(gamma, num_heads, device, _acc).view(num_heads, 1, 1, 1)
        weights = gamma_h * softmax_terms(scores, in_window)
    if use_linear:
        real = (positions >= 0)[:, None, :, None]
        feature_q = prepare(fq).view(batch, num_heads, num_chunks, chunk, -1)
        feature_k = prepare(fk) * real  # padding keys must not enter the running state
        local_feature_k = _local_slices(feature_k, lookback, chunk)
        linear_weights = (feature_q @ local_feature_k.transpose(-1, -2)).masked_fill(~(causal & ~in_window), 0.0)
        weights = linear_weights if weights is None else weights + linear_weights

    num = weights @ local_values
    den = weights.sum(-1)

    if use_linear:
        chunk_k = feature_k.view(batch, num_heads, num_chunks, chunk, -1)
        chunk_v = values.view(batch, num_heads, num_chunks, chunk, value_dim)
        # Chunk c may use the keys of chunks < c − P/C: those are older than its local slice.
        lag = lookback // chunk + 1
        state = torch.cumsum(chunk_k.transpose(-1, -2) @ chunk_v, dim=2)  # (B, H, n, F, Dv)
        norm = torch.cumsum(chunk_k.sum(3), dim=2)  # (B, H, n, F)
        state = F.pad(state, (0, 0, 0, 0, lag, 0))[:, :, :num_chunks]
        norm = F.pad(norm, (0, 0, lag, 0))[:, :, :num_chunks]
        num = num + feature_q @ state
        den = den + (feature_q @ norm.unsqueeze(-1)).squeeze(-1)

    out = normalise(num, den).reshape(batch, num_heads, padded_length, value_dim)[:, :, :length]
    return out.to(v.dtype)


def linear_attention_chunked(fq, fk, v, *, start=None, chunk_size: int = 64) -> torch.Tensor:
    """Causal linear attention, chunked: intra-chunk masked products plus a running state."""
    return hybrid_attention_chunked(
        None, None, v, fq, fk, window=Window("none"), start=start, chunk_size=chunk_size
    )
