"""Exact causal softmax attention: the teacher inside every converted layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunked import hybrid_attention_chunked
from .common import Window, expand_heads, row_starts


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
    Padding without a window needs an explicit L×L mask.
    """
    batch, num_heads, length, _ = q.shape
    if sliding_window is not None:
        return hybrid_attention_chunked(
            q, k, v, None, None, window=Window("sliding", sliding_window), scaling=scaling,
            use_linear=False, start=start,
        )
    keys, values = expand_heads(k, num_heads), expand_heads(v, num_heads)
    if start is None or not bool((torch.as_tensor(start) > 0).any()):
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scaling)
    starts = row_starts(start, batch, q.device)
    positions = torch.arange(length, device=q.device)[None, :] - starts[:, None]
    pos_q, pos_k = positions[:, None, :, None], positions[:, None, None, :]
    real_query = pos_q >= 0
    # Padding queries attend to themselves only, to keep SDPA finite; their output is zeroed below.
    allowed = ((pos_k >= 0) & (pos_k <= pos_q)) | (~real_query & (pos_k == pos_q))
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scaling)
    return out * real_query.to(out.dtype)
