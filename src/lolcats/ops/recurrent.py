"""Recurrent hybrid attention: one token at a time with a constant-size state (the decode path).

The state holds, per row:
  S = Σ φ(k) vᵀ and z = Σ φ(k) (fp32) over every key that has left the softmax window, and
  a ring of the last R columns' keys/values with their relative positions, R = lookback + 1
  (2·size for the terrace, size for a sliding window, 0 without a window).
Windows only move forward, so a key that leaves the current query's window never re-enters a later
one: it is folded into (S, z) at that moment and its slot marked empty (relative position −1). Only
then does φ(k) need computing, so the ring keeps no features: a terrace folds a whole block every
``size`` tokens, a sliding window one key per token. The ring is indexed by column (slot = column
mod R), the same slot for every row of a batch; rows may be padded on the left only, and a padding
column leaves its slot empty. This reproduces the window of training exactly, including the
terrace's size+1 … 2·size visible keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .common import Window, check_inputs, gamma_per_head, normalise, row_starts, softmax_terms


@dataclass
class RecurrentState:
    state: torch.Tensor  # (B, H, F, Dv) fp32: Σ φ(k) vᵀ over folded keys
    norm: torch.Tensor  # (B, H, F) fp32: Σ φ(k) over folded keys
    keys: torch.Tensor  # (B, Hkv, R, D) ring of recent keys
    values: torch.Tensor  # (B, Hkv, R, Dv)
    slot_positions: torch.Tensor  # (B, R) relative position held by each slot, −1 when empty
    lengths: torch.Tensor  # (B,) real tokens seen per row: the relative position of the next one
    columns: int = 0  # tokens seen per row, padding included: the column of the next one

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
            slot_positions=torch.full((batch, ring), -1, dtype=torch.long, device=device),
            lengths=torch.zeros(batch, dtype=torch.long, device=device),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: value for name, value in vars(self).items() if isinstance(value, torch.Tensor)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep (or repeat, or reorder) rows in place: beam search and num_return_sequences."""
        for name, tensor in self.tensors().items():
            setattr(self, name, tensor.index_select(0, index.to(tensor.device)))


def _by_kv_group(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H, ...) -> (B, Hkv, H/Hkv, ...): query heads grouped under the kv head they share."""
    return x.view(x.shape[0], num_kv_heads, x.shape[1] // num_kv_heads, *x.shape[2:])


def _expand(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hkv, X) -> (B, H, X)."""
    groups = num_heads // x.shape[1]
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


KeyFeatures = Callable[[torch.Tensor], torch.Tensor]
"""φ of ring keys: (B, Hkv, R, D) -> (B, H, R, F), for keys as they leave the window."""


@torch.no_grad()
def recurrent_state_from_prefix(
    k: torch.Tensor | None,
    v: torch.Tensor,
    fk: torch.Tensor | None,
    *,
    window: Window,
    num_heads: int,
    feature_dim: int | None = None,
    start: torch.Tensor | None = None,
) -> RecurrentState:
    """The state after a whole prompt, without stepping through it: what ``hybrid_attention_step``
    holds after the prompt's L columns. k (B, Hkv, L, D), v (B, Hkv, L, Dv), fk (B, H, L, F) (None
    without a linear term); ``start`` (B,) is each row's first real token (left padding)."""
    batch, num_kv_heads, length, value_dim = v.shape
    feature_dim = fk.shape[-1] if fk is not None else (feature_dim or 1)
    cache = RecurrentState.empty(
        batch, num_heads, num_kv_heads, k.shape[-1] if k is not None else 1, value_dim, feature_dim, window,
        dtype=k.dtype if k is not None else torch.float32, device=v.device,
    )
    starts = row_starts(start, batch, v.device)
    lengths = (length - starts).clamp(min=0)
    relative = torch.arange(length, device=v.device)[None, :] - starts[:, None]  # (B, L)
    real = relative >= 0
    # Keys outside the window of each row's last query have been folded; the rest are in the ring.
    in_window = real & window.contains((lengths - 1)[:, None], relative)
    if fk is not None:
        folded = (real & ~in_window).to(torch.float32)
        folded_fk = _by_kv_group(fk.float() * folded[:, None, :, None], num_kv_heads)  # (B, Hkv, G, L, F)
        cache.state = torch.einsum("bkglf,bkld->bkgfd", folded_fk, v.float()).flatten(1, 2)
        cache.norm = folded_fk.sum(3).flatten(1, 2)
    ring = window.lookback + 1
    if ring > 0:
        recent = torch.arange(max(0, length - ring), length, device=v.device)
        slots = recent % ring
        cache.keys[:, :, slots] = k[:, :, recent]
        cache.values[:, :, slots] = v[:, :, recent].to(cache.values.dtype)
        cache.slot_positions[:, slots] = torch.where(in_window[:, recent], relative[:, recent], -1)
    cache.lengths = lengths
    cache.columns = length
    return cache


@torch.no_grad()
def hybrid_attention_step(
    cache: RecurrentState,
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    v: torch.Tensor,
    fq: torch.Tensor | None,
    fk: torch.Tensor | None = None,
    real: torch.Tensor | None = None,
    *,
    window: Window,
    scaling: float = 1.0,
    gamma: torch.Tensor | None = None,
    use_linear: bool = True,
    key_features: KeyFeatures | None = None,
) -> torch.Tensor:
    """Attend one new column and update ``cache`` in place.

    q (B, H, D), k (B, Hkv, D), v (B, Hkv, Dv), fq (B, H, F); ``real`` (B,) bool marks rows whose
    token is real (None: all are); a padding token is no key and its output is zero. With a window,
    ``key_features`` computes φ of the keys leaving it; without one, ``fk`` (B, H, F) is folded at once.
    """
    num_kv_heads = v.shape[1]
    num_heads = cache.state.shape[1]
    position = cache.lengths
    real_weight = None if real is None else real.to(torch.float32)[:, None, None]

    def only_real(x: torch.Tensor) -> torch.Tensor:
        return x if real_weight is None else x * real_weight

    if window.kind == "none":
        fq, fk = fq.float(), only_real(fk.float())
        cache.state += fk.unsqueeze(-1) * _expand(v.float(), num_heads).unsqueeze(-2)
        cache.norm += fk
        num = (fq.unsqueeze(-2) @ cache.state).squeeze(-2)
        out = normalise(num, (fq * cache.norm).sum(-1))
    else:
        if use_linear and key_features is None:
            raise ValueError("a windowed recurrent step with a linear term needs key_features")
        leaving = (cache.slot_positions >= 0) & ~window.contains(position[:, None], cache.slot_positions)  # (B, R)
        if bool(leaving.any()):
            if use_linear:
                leaving_fk = key_features(cache.keys).float() * leaving[:, None, :, None]  # (B, H, R, F)
                grouped = _by_kv_group(leaving_fk, num_kv_heads)  # (B, Hkv, G, R, F)
                cache.state += torch.einsum("bkgrf,bkrd->bkgfd", grouped, cache.values.float()).flatten(1, 2)
                cache.norm += leaving_fk.sum(2)
            cache.slot_positions.masked_fill_(leaving, -1)
        slot = cache.columns % cache.slot_positions.shape[1]
        cache.keys[:, :, slot] = k
        cache.values[:, :, slot] = v
        cache.slot_positions[:, slot] = position if real is None else torch.where(real, position, -1)

        in_window = (cache.slot_positions >= 0)[:, None, :]  # (B, 1, R): every held key is in the window
        grouped_q = _by_kv_group(q.float(), num_kv_heads)  # (B, Hkv, G, D)
        scores = (grouped_q @ cache.keys.float().transpose(-1, -2)).flatten(1, 2) * scaling  # (B, H, R)
        weights = gamma_per_head(gamma, num_heads, v.device).view(1, num_heads, 1) * softmax_terms(scores, in_window)
        num = (_by_kv_group(weights, num_kv_heads) @ cache.values.float()).flatten(1, 2)  # (B, H, Dv)
        den = weights.sum(-1)
        if use_linear:
            fq = fq.float()
            num = num + (fq.unsqueeze(-2) @ cache.state).squeeze(-2)
            den = den + (fq * cache.norm).sum(-1)
        out = normalise(num, den)
    cache.columns += 1
    cache.lengths = position + (1 if real is None else real.long())
    return only_real(out).to(v.dtype)


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
    """Whole sequences through ``hybrid_attention_step``, token by token.

    φ(k) is given here for every position rather than as a function of k, so the ring's features are
    kept beside the state and handed to the step as its ``key_features``.
    """
    check_inputs(q, k, v, fq, fk, window, use_linear)
    batch, num_kv_heads, length, value_dim = v.shape
    num_heads = (q if q is not None else fq).shape[1]
    feature_dim = fq.shape[-1] if fq is not None else 1
    cache = RecurrentState.empty(
        batch, num_heads, num_kv_heads, k.shape[-1] if k is not None else 1, value_dim, feature_dim, window,
        dtype=torch.float32, device=v.device,
    )
    ring = window.lookback + 1
    ring_features = torch.zeros(batch, num_heads, max(ring, 0), feature_dim, device=v.device)
    starts = row_starts(start, batch, v.device)

    def column(x: torch.Tensor | None, t: int) -> torch.Tensor | None:
        return x[:, :, t] if x is not None else None

    outputs = []
    for t in range(length):
        outputs.append(hybrid_attention_step(
            cache, column(q, t), column(k, t), v[:, :, t], column(fq, t), column(fk, t), t >= starts,
            window=window, scaling=scaling, gamma=gamma, use_linear=use_linear,
            key_features=lambda _keys: ring_features,
        ))
        if ring > 0 and fk is not None:
            ring_features[:, :, t % ring] = fk[:, :, t].float()
    return torch.stack(outputs, dim=2)


def linear_attention_recurrent(fq, fk, v, *, start=None) -> torch.Tensor:
    """Causal linear attention one token at a time with S = Σ φ(k)vᵀ, z = Σ φ(k)."""
    return hybrid_attention_recurrent(None, None, v, fq, fk, window=Window("none"), start=start)
