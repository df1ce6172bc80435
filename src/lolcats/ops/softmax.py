"""Exact causal softmax attention: the teacher inside every converted layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunked import hybrid_attention_chunked
from .common import Window, expand_heads, row_starts, shift_rows, unshift_rows


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
    keys, values = expand_heads(k, num_heads), expand_heads(v, num_heads)
    starts = row_starts(start, batch, q.device)
    if not bool(starts.any()):
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scaling)
    # Left padding becomes right padding, which causal attention never shows to a real query.
    q, keys, values = (shift_rows(x, starts) for x in (q, keys, values))
    out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scaling)
    return unshift_rows(out, starts)
