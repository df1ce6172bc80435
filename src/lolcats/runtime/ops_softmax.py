"""Exact causal softmax attention: the teacher inside every converted layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops_chunked import hybrid_attention_chunked
from .ops_common import Window, row_starts, shift_rows, unshift_rows


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scaling: float,
    sliding_window: int | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax attention, optionally over the last ``sliding_window`` tokens (HF's convention).

    Without padding this is SDPA's causal kernel (memory linear in L). A sliding window goes through the
    chunked hybrid path with the linear term off, which is exactly a windowed softmax in O(L·window).
    Left-padded rows are shifted so that their padding trails, where causal attention cannot see it.
    """
    batch, num_heads, length, _ = q.shape
    if sliding_window is not None:
        return hybrid_attention_chunked(
            q, k, v, None, None, window=Window("sliding", sliding_window), scaling=scaling,
            use_linear=False, start=start,
        )
    if num_heads % k.shape[1]:
        raise ValueError(f"{num_heads} query heads cannot share {k.shape[1]} kv heads evenly")
    grouped = num_heads != k.shape[1]  # SDPA reads each kv head for its query heads: no repeated K/V
    starts = row_starts(start, batch, q.device)
    if not bool(starts.any()):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=grouped)
    # Left padding becomes right padding, which causal attention never shows to a real query.
    q, k, v = (shift_rows(x, starts) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=grouped)
    return unshift_rows(out, starts)
