"""Recurrent hybrid attention: one token at a time with a constant-size state.

The state holds, per row:
  S = Σ φ(k) vᵀ and z = Σ φ(k) (fp32) over keys that have left the ring below, and
  a ring of the last R keys/values/φ(k) with their relative positions, R = lookback + 1
  (2·size for the terrace, size for a sliding window, 0 without a window).
A key is folded into (S, z) only when its slot is overwritten, R tokens later; until then a key that
has already left the window is counted as a linear term straight from the ring. This reproduces the
window of training exactly, including the terrace's size+1 … 2·size visible keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import Window, check_inputs, gamma_per_head, normalise, row_starts, softmax_terms


@dataclass
class RecurrentState:
    state: torch.Tensor  # (B, H, F, Dv) fp32: Σ φ(k) vᵀ over folded keys
    norm: torch.Tensor  # (B, H, F) fp32: Σ φ(k) over folded keys
    keys: torch.Tensor  # (B, Hkv, R, D) ring of recent keys
    values: torch.Tensor  # (B, Hkv, R, Dv)
    feature_keys: torch.Tensor  # (B, H, R, F)
    slot_positions: torch.Tensor  # (B, R) relative position held by each slot, −1 when empty

    @classmethod
    def empty(
        cls,
        batch: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        value_dim: int,
        feature_dim: int,
        window: Window,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "RecurrentState":
        ring = window.lookback + 1
        return cls(
            state=torch.zeros(batch, num_heads, feature_dim, value_dim, device=device),
            norm=torch.zeros(batch, num_heads, feature_dim, device=device),
            keys=torch.zeros(batch, num_kv_heads, ring, head_dim, dtype=dtype, device=device),
            values=torch.zeros(batch, num_kv_heads, ring, value_dim, dtype=dtype, device=device),
            feature_keys=torch.zeros(batch, num_heads, ring, feature_dim, device=device),
            slot_positions=torch.full((batch, ring), -1, dtype=torch.long, device=device),
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())


def _by_kv_group(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H, ...) -> (B, Hkv, H/Hkv, ...): query heads grouped under the kv head they share."""
    return x.view(x.shape[0], num_kv_heads, x.shape[1] // num_kv_heads, *x.shape[2:])


@torch.no_grad()
def hybrid_attention_step(
    cache: RecurrentState,
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    v: torch.Tensor,
    fq: torch.Tensor | None,
    fk: torch.Tensor | None,
    position: torch.Tensor,
    *,
    window: Window,
    scaling: float = 1.0,
    gamma: torch.Tensor | None = None,
    use_linear: bool = True,
) -> torch.Tensor:
    """Attend one token per row and update ``cache`` in place.

    q (B, H, D), k (B, Hkv, D), v (B, Hkv, Dv), fq/fk (B, H, F); ``position`` (B,) is the token's
    position counted from its row's first real token (negative for padding: no update, zero output).
    """
    batch, num_kv_heads, value_dim = v.shape
    num_heads = cache.state.shape[1]
    rows = torch.arange(batch, device=v.device)
    real = position >= 0
    real_col = real[:, None]

    if window.kind == "none":
        cache.state += (fk.float() * real_col[..., None]).unsqueeze(-1) * _expand(v.float(), num_heads).unsqueeze(-2)
        cache.norm += fk.float() * real_col[..., None]
        num = (fq.float().unsqueeze(-2) @ cache.state).squeeze(-2)
        return normalise(num, (fq.float() * cache.norm).sum(-1)).to(v.dtype)

    ring = cache.slot_positions.shape[1]
    slot = position.clamp(min=0) % ring
    if use_linear:
        # The slot about to be overwritten holds the key from `ring` tokens back: out of every window.
        leaving = real & (cache.slot_positions[rows, slot] >= 0)
        leaving_fk = cache.feature_keys[rows, :, slot] * leaving[:, None, None]  # (B, H, F)
        leaving_v = _expand(cache.values[rows, :, slot].float(), num_heads)  # (B, H, Dv)
        cache.state += leaving_fk.unsqueeze(-1) * leaving_v.unsqueeze(-2)
        cache.norm += leaving_fk
        cache.feature_keys[rows, :, slot] = torch.where(real_col[..., None], fk.float(), cache.feature_keys[rows, :, slot])
    cache.keys[rows, :, slot] = torch.where(real_col[..., None], k.to(cache.keys.dtype), cache.keys[rows, :, slot])
    cache.values[rows, :, slot] = torch.where(real_col[..., None], v.to(cache.values.dtype), cache.values[rows, :, slot])
    cache.slot_positions[rows, slot] = torch.where(real, position, cache.slot_positions[rows, slot])

    pos_q = position[:, None]
    pos_k = cache.slot_positions
    held = real_col & (pos_k >= 0)
    in_window = (held & window.contains(pos_q, pos_k))[:, None, :]  # (B, 1, R)

    grouped_q = _by_kv_group(q.float(), num_kv_heads)  # (B, Hkv, G, D)
    scores = (grouped_q @ cache.keys.float().transpose(-1, -2)).flatten(1, 2) * scaling  # (B, H, R)
    weights = gamma_per_head(gamma, num_heads, v.device).view(1, num_heads, 1) * softmax_terms(scores, in_window)
    if use_linear:
        in_ring_linear = (held[:, None, :] & ~in_window)
        linear = (cache.feature_keys @ fq.float().unsqueeze(-1)).squeeze(-1)  # (B, H, R)
        weights = weights + linear.masked_fill(~in_ring_linear, 0.0)
    num = (_by_kv_group(weights, num_kv_heads) @ cache.values.float()).flatten(1, 2)  # (B, H, Dv)
    den = weights.sum(-1)
    if use_linear:
        num = num + (fq.float().unsqueeze(-2) @ cache.state).squeeze(-2)
        den = den + (fq.float() * cache.norm).sum(-1)
    return normalise(num, den).to(v.dtype)


def _expand(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hkv, X) -> (B, H, X)."""
    groups = num_heads // x.shape[1]
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def hybrid_attention_recurrent(
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
) -> torch.Tensor:
    """Whole sequences through ``hybrid_attention_step``, token by token (the decode path)."""
    check_inputs(q, k, v, fq, fk, window, use_linear)
    batch, num_kv_heads, length, value_dim = v.shape
    num_heads = (q if q is not None else fq).shape[1]
    cache = RecurrentState.empty(
        batch,
        num_heads,
        num_kv_heads,
        k.shape[-1] if k is not None else 1,
        value_dim,
        fq.shape[-1] if fq is not None else 1,
        window,
        dtype=torch.float32,
        device=v.device,
    )
    starts = row_starts(start, batch, v.device)
    outputs = []
    for t in range(length):
        outputs.append(
            hybrid_attention_step(
                cache,
                q[:, :, t] if q is not None else None,
                k[:, :, t] if k is not None else None,
                v[:, :, t],
                fq[:, :, t] if fq is not None else None,
                fk[:, :, t] if fk is not None else None,
                t - starts,
                window=window,
                scaling=scaling,
                gamma=gamma,
                use_linear=use_linear,
            )
        )
    return torch.stack(outputs, dim=2)


def linear_attention_recurrent(fq, fk, v, *, start=None) -> torch.Tensor:
    """Causal linear attention one token at a time with S = Σ φ(k)vᵀ, z = Σ φ(k)."""
    return hybrid_attention_recurrent(None, None, v, fq, fk, window=Window("none"), start=start)
