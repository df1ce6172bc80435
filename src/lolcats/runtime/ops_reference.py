"""Quadratic ground truth: materialises every (query, key) pair. O(L²) memory; for tests and short inputs."""

from __future__ import annotations

import torch

from .ops_common import (
    Window,
    accumulation_dtype,
    check_inputs,
    check_log_decay,
    cumulative_log_decay,
    expand_heads,
    gamma_per_head,
    normalise,
    row_starts,
    softmax_terms,
)


def hybrid_attention_reference(
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
    log_decay: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over ``window`` plus linear attention over older keys, one normaliser (see ops.common);
    ``log_decay`` (B, H, L) decays the linear terms by exp(A_i − A_j)."""
    check_inputs(q, k, v, fq, fk, window, use_linear)
    check_log_decay(log_decay, fq if use_linear else None)
    batch, _, length, _ = v.shape
    num_heads = (q if q is not None else fq).shape[1]
    device = v.device
    _acc = accumulation_dtype(v.dtype)
    positions = torch.arange(length, device=device)[None, :] - row_starts(start, batch, device)[:, None]
    pos_q = positions[:, None, :, None]
    pos_k = positions[:, None, None, :]
    causal = (pos_k >= 0) & (pos_k <= pos_q)
    in_window = causal & window.contains(pos_q, pos_k)

    weights = torch.zeros(batch, num_heads, length, length, device=device, dtype=_acc)
    if window.kind != "none":
        keys = expand_heads(k.to(_acc), num_heads)
        scores = q.to(_acc) @ keys.transpose(-1, -2) * scaling
        weights = weights + gamma_per_head(gamma, num_heads, device, _acc) * softmax_terms(scores, in_window)
    if use_linear:
        linear = causal & ~in_window
        products = fq.to(_acc) @ fk.to(_acc).transpose(-1, -2)
        if log_decay is not None:
            cumulative = cumulative_log_decay(log_decay, row_starts(start, batch, device))
            products = products * torch.exp((cumulative[..., :, None] - cumulative[..., None, :]).clamp(max=0)).to(_acc)
        weights = weights + products.masked_fill(~linear, 0.0)

    out = normalise(weights @ expand_heads(v.to(_acc), num_heads), weights.sum(-1))
    return out.to(v.dtype)


def hybrid_attention_weights(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    fq: torch.Tensor | None,
    fk: torch.Tensor | None,
    *,
    window: Window,
    scaling: float = 1.0,
    gamma: torch.Tensor | None = None,
    use_linear: bool = True,
    start: torch.Tensor | None = None,
    log_decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised attention weights of hybrid attention, split into (softmax part, linear part).

    Each is (B, H, L, L) and their sum over keys is 1 for every real query. O(L²): for the optional
    attention cross-entropy loss and for diagnostics (the linear term's share of attention mass).
    """
    reference = q if q is not None else fq
    batch, num_heads, length, _ = reference.shape
    device = reference.device
    _acc = accumulation_dtype(reference.dtype)
    positions = torch.arange(length, device=device)[None, :] - row_starts(start, batch, device)[:, None]
    pos_q, pos_k = positions[:, None, :, None], positions[:, None, None, :]
    causal = (pos_k >= 0) & (pos_k <= pos_q)
    in_window = causal & window.contains(pos_q, pos_k)
    softmax_part = torch.zeros(batch, num_heads, length, length, device=device, dtype=_acc)
    linear_part = torch.zeros_like(softmax_part)
    if window.kind != "none":
        scores = q.to(_acc) @ expand_heads(k.to(_acc), num_heads).transpose(-1, -2) * scaling
        softmax_part = gamma_per_head(gamma, num_heads, device, _acc) * softmax_terms(scores, in_window)
    if use_linear:
        products = fq.to(_acc) @ fk.to(_acc).transpose(-1, -2)
        if log_decay is not None:
            cumulative = cumulative_log_decay(log_decay, row_starts(start, batch, device))
            products = products * torch.exp((cumulative[..., :, None] - cumulative[..., None, :]).clamp(max=0)).to(_acc)
        linear_part = products.masked_fill(~(causal & ~in_window), 0.0)
    total = (softmax_part + linear_part).sum(-1, keepdim=True)
    total = torch.where(total > 0, total, torch.ones_like(total))
    return softmax_part / total, linear_part / total


def linear_attention_reference(fq, fk, v, *, start=None) -> torch.Tensor:
    """Causal linear attention φ(q)·φ(k) with its normaliser, quadratic form."""
    return hybrid_attention_reference(None, None, v, fq, fk, window=Window("none"), start=start)
