"""Recurrent hybrid attention: one token at a time with a constant-size state (the decode path).

The state holds, per row:
  S = Σ φ(k) vᵀ and z = Σ φ(k) (fp32) over every key that has left the softmax window,
  a ring of the last R columns' keys/values (model dtype) with their relative positions, R = lookback + 1
  (2·size for the terrace, size for a sliding window, 0 without a window), and
  for the terrace only, (S_next, z_next): the same sums over the keys of the previous block that the
  current block has already passed by ``size`` positions; they join (S, z) when the next block starts;
  with attention sinks (``Window.sinks`` = N), the keys/values of each row's first N real tokens, which stay
  softmax terms for every query: a step reads them wherever the ring no longer holds them, and never folds them;
  with a decay gate, per head and ring slot the log-decay accumulated since that slot's key arrived: each step
  multiplies (S, z) and (S_next, z_next) by g_t = exp(a_t) and folds the leaving key with the decay it has
  accumulated, so every linear term carries exp(A_i − A_j) as in the chunked path;
  with a recall cache (ops_recall, terrace only), the K keys per query head the linear state recalls worst: a step
  folds nothing as keys leave; when a row's block starts, the block that left and the cache are re-selected
  (``select_recall``) and the rest folded into (S, z). That step reads φ of a whole block, once per block, and
  asks the host whether any row starts a block (the one synchronisation of this option); with a gate, cached keys
  count the decay they would have had in (S, z), and are folded with it.

Windows only move forward, and a key leaves them ``size`` positions after it could first be folded:
the step for relative position p folds the one key at p − size, exactly once, into
  sliding: (S, z), since it has just left the window (it sits in the slot about to be overwritten);
  terrace: (S_next, z_next), since it leaves with the rest of its block when block(p) + 1 begins.
So φ is computed on one key per row and step, never on the whole ring, and the ring keeps no features.
The ring is indexed by column (slot = column mod R), the same slot for every row of a batch; rows may be
padded on the left only, so a row's relative position and the column differ by a constant and the key
at relative p − size is in slot (column − size) mod R for every row. A padding column writes its slot
with position −1 and changes nothing else. The softmax part reads the slots whose position lies in the
window, which reproduces the window of training exactly, including the terrace's size+1 … 2·size keys.

A step has static shapes and no host synchronisation: the column is also kept as a tensor, slots are
gathered and scattered by tensor index, and block boundaries are per-row masks. Only ``columns`` (a
Python int for the cache's get_seq_length) is bumped on the host; it is never read inside the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops_recall import RecallCache, select_recall, where_rows
from .ops_common import (
    Window,
    check_inputs,
    expand_heads,
    check_log_decay,
    cumulative_log_decay,
    gamma_per_head,
    normalise,
    row_starts,
    softmax_terms,
)


@dataclass
class RecurrentState:
    state: torch.Tensor  # (B, H, F, Dv) fp32: Σ φ(k) vᵀ over keys outside the window
    norm: torch.Tensor  # (B, H, F) fp32: Σ φ(k) over keys outside the window
    keys: torch.Tensor  # (B, Hkv, R, D) ring of recent keys (model dtype)
    values: torch.Tensor  # (B, Hkv, R, Dv)
    slot_positions: torch.Tensor  # (B, R) relative position held by each slot, −1 when empty or padding
    lengths: torch.Tensor  # (B,) real tokens seen per row: the relative position of the next one
    column: torch.Tensor  # (B,) long, equal in every row: the column of the next token (ring slots)
    pending_state: torch.Tensor | None = None  # terrace: (B, H, F, Dv) fp32, S_next
    pending_norm: torch.Tensor | None = None  # terrace: (B, H, F) fp32, z_next
    sink_keys: torch.Tensor | None = None  # sinks: (B, Hkv, N, D), each row's first N real keys
    sink_values: torch.Tensor | None = None  # sinks: (B, Hkv, N, Dv)
    sink_positions: torch.Tensor | None = None  # sinks: (B, N) long, 0 .. N − 1 once written, −1 before
    slot_log_decay: torch.Tensor | None = None  # decay gate: (B, H, R) fp32, Σ a_t since each slot's key arrived
    feature_keys: torch.Tensor | None = None  # (B, Hkv, R, D): what φ reads of each ring key, when that is not the
    # key itself (keys before RoPE, for a linear term without positions)
    recall_keys: torch.Tensor | None = None  # recall cache (ops_recall.RecallCache's fields): (B, H, K, D)
    recall_values: torch.Tensor | None = None  # (B, H, K, Dv)
    recall_features: torch.Tensor | None = None  # (B, H, K, F) fp32
    recall_positions: torch.Tensor | None = None  # (B, H, K) long, −1 for an empty slot
    recall_log_decay: torch.Tensor | None = None  # (B, H, K) fp32, Σ a_t since each cached key's position
    columns: int = 0  # host copy of ``column``, for get_seq_length()

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
        gated: bool = False,
        feature_keys: bool = False,
        recall: int = 0,
    ) -> "RecurrentState":
        ring = window.lookback + 1
        terrace = window.kind == "terrace"
        sinks = window.sinks
        cache = cls(
            state=torch.zeros(batch, num_heads, feature_dim, value_dim, device=device),
            norm=torch.zeros(batch, num_heads, feature_dim, device=device),
            keys=torch.zeros(batch, num_kv_heads, ring, head_dim, dtype=dtype, device=device),
            values=torch.zeros(batch, num_kv_heads, ring, value_dim, dtype=dtype, device=device),
            slot_positions=torch.full((batch, ring), -1, dtype=torch.long, device=device),
            lengths=torch.zeros(batch, dtype=torch.long, device=device),
            column=torch.zeros(batch, dtype=torch.long, device=device),
            pending_state=torch.zeros(batch, num_heads, feature_dim, value_dim, device=device) if terrace else None,
            pending_norm=torch.zeros(batch, num_heads, feature_dim, device=device) if terrace else None,
            sink_keys=torch.zeros(batch, num_kv_heads, sinks, head_dim, dtype=dtype, device=device) if sinks else None,
            sink_values=torch.zeros(batch, num_kv_heads, sinks, value_dim, dtype=dtype, device=device) if sinks else None,
            sink_positions=torch.full((batch, sinks), -1, dtype=torch.long, device=device) if sinks else None,
            slot_log_decay=torch.zeros(batch, num_heads, ring, device=device) if gated else None,
            feature_keys=torch.zeros(batch, num_kv_heads, ring, head_dim, dtype=dtype, device=device)
            if feature_keys else None,
        )
        if recall:
            cache.recall_cache = RecallCache.empty(batch, num_heads, recall, head_dim, value_dim, feature_dim,
                                                   dtype=dtype, device=device)
        return cache

    @property
    def recall_cache(self) -> RecallCache | None:
        if self.recall_positions is None:
            return None
        return RecallCache(self.recall_keys, self.recall_values, self.recall_features, self.recall_positions,
                           self.recall_log_decay)

    @recall_cache.setter
    def recall_cache(self, cache: RecallCache) -> None:
        self.recall_keys, self.recall_values = cache.keys, cache.values
        self.recall_features, self.recall_positions = cache.features, cache.positions
        self.recall_log_decay = cache.log_decay

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


def _slot_index(slot: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
    """(B,) slot per row -> an index into dim 2 of ``ring`` (B, Hkv, R, X) that picks that slot."""
    return slot.view(-1, 1, 1, 1).expand(ring.shape[0], ring.shape[1], 1, ring.shape[3])


def _recall_block_start(cache: RecurrentState, window: Window, position: torch.Tensor, real, key_features) -> None:
    """Where a real row's terrace block b ≥ 2 starts: the keys of block b − 2 (still in the ring, in the slots the
    next ``size`` columns overwrite) and the cache are re-selected; other rows are left as they are."""
    size = window.size
    starting = (position % size == 0) & (position >= 2 * size)
    if real is not None:
        starting = starting & real
    if not bool(starting.any()):
        return
    ring = cache.slot_positions.shape[1]
    slots = (cache.column[:, None] + torch.arange(size, device=position.device)) % ring  # (B, size)
    held = cache.slot_positions.gather(1, slots)
    leaving = torch.where(held >= window.sinks, held, -1)
    source = cache.keys if cache.feature_keys is None else cache.feature_keys

    def gathered(ring_tensor: torch.Tensor) -> torch.Tensor:
        return ring_tensor.gather(2, slots[:, None, :, None].expand(-1, ring_tensor.shape[1], -1, ring_tensor.shape[3]))

    num_heads = cache.state.shape[1]
    features = key_features(gathered(source)).float()  # (B, H, size, F)
    keys, values = (expand_heads(gathered(x), num_heads) for x in (cache.keys, cache.values))
    positions = leaving[:, None, :].expand(-1, num_heads, -1)
    # with a gate, the decay each leaving key has accumulated up to this (block-starting) query
    log_decay = None if cache.slot_log_decay is None else cache.slot_log_decay.gather(2, slots[:, None, :].expand(
        -1, num_heads, -1))
    selected = select_recall(cache.state, cache.norm, cache.recall_cache, keys, values, features, positions,
                             log_decay)
    cache.state, cache.norm, cache.recall_cache = where_rows(starting, selected,
                                                             (cache.state, cache.norm, cache.recall_cache))


def _fold(state: torch.Tensor, norm: torch.Tensor, fk: torch.Tensor, v: torch.Tensor) -> None:
    """state += φ(k) vᵀ, norm += φ(k) in place, for one key per row: fk (B, H, F) fp32, v (B, Hkv, Dv)."""
    num_kv_heads = v.shape[1]
    outer = _by_kv_group(fk, num_kv_heads).unsqueeze(-1) * v.float()[:, :, None, None, :]  # (B, Hkv, G, F, Dv)
    state += outer.flatten(1, 2)
    norm += fk


KeyFeatures = Callable[[torch.Tensor], torch.Tensor]
"""φ of keys: (B, Hkv, 1, D) -> (B, H, 1, F), called once per step on the key that leaves the window."""


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
    log_decay: torch.Tensor | None = None,
    feature_keys: torch.Tensor | None = None,
    recall_state: tuple | None = None,
) -> RecurrentState:
    """The state after a whole prompt, without stepping through it: what ``hybrid_attention_step``
    holds after the prompt's L columns. k (B, Hkv, L, D), v (B, Hkv, L, Dv), fk (B, H, L, F) (None
    without a linear term); ``start`` (B,) is each row's first real token (left padding); ``log_decay`` (B, H, L)
    the decay gate's a_t, if any; ``feature_keys`` (B, Hkv, L, D) what φ was computed from, if not k;
    ``recall_state``: the (state, norm, cache) ``ops_recall.hybrid_attention_recall`` reached over the same prompt,
    which replaces (S, z) and the pending sums (a recall cache folds whole blocks as they start)."""
    batch, num_kv_heads, length, value_dim = v.shape
    feature_dim = fk.shape[-1] if fk is not None else (feature_dim or 1)
    cache = RecurrentState.empty(
        batch, num_heads, num_kv_heads, k.shape[-1] if k is not None else 1, value_dim, feature_dim, window,
        dtype=k.dtype if k is not None else torch.float32, device=v.device, gated=log_decay is not None,
        feature_keys=feature_keys is not None,
    )
    starts = row_starts(start, batch, v.device)
    # Decay from each column to the prompt's end (1 without a gate), per head: exp(A_last − A_j).
    to_end = None
    if log_decay is not None:
        cumulative = cumulative_log_decay(log_decay, starts)
        log_to_end = cumulative[..., -1:] - cumulative  # (B, H, L) float64, A_last − A_j ≤ 0
        to_end = torch.exp(log_to_end).float()
    lengths = (length - starts).clamp(min=0)
    relative = torch.arange(length, device=v.device)[None, :] - starts[:, None]  # (B, L)
    real = relative >= 0
    last = (lengths - 1)[:, None]  # each row's last query (−1 for a row of padding only)
    in_window = real & window.contains(last, relative)
    if fk is not None:
        def sums(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            weights = mask.to(torch.float32)[:, None, :, None]
            if to_end is not None:
                weights = weights * to_end[..., None]
            weighted = _by_kv_group(fk.float() * weights, num_kv_heads)
            state = torch.einsum("bkglf,bkld->bkgfd", weighted, v.float()).flatten(1, 2)
            return state, weighted.sum(3).flatten(1, 2)

        # Keys outside the window of each row's last query are in (S, z) ...
        cache.state, cache.norm = sums(real & ~in_window)
        if window.kind == "terrace":
            # ... and the steps so far have folded the keys up to last − size into (S_next, z_next), sinks aside.
            folded = in_window & (relative <= last - window.size) & (relative >= window.sinks)
            cache.pending_state, cache.pending_norm = sums(folded)
    if window.sinks:
        sink = torch.arange(window.sinks, device=v.device)
        columns = starts[:, None] + sink  # (B, N): where each row's sinks sit
        present = columns < length
        index = columns.clamp(max=length - 1)
        keep = present[:, None, :, None]  # sinks not seen yet stay zero, as in a state stepped to here

        def first_tokens(x: torch.Tensor) -> torch.Tensor:
            picked = x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))
            return torch.where(keep, picked, torch.zeros_like(picked)).to(cache.values.dtype)

        cache.sink_keys, cache.sink_values = first_tokens(k), first_tokens(v)
        cache.sink_positions = torch.where(present, sink, -1)
    ring = window.lookback + 1
    if ring > 0:
        recent = torch.arange(max(0, length - ring), length, device=v.device)
        slots = recent % ring
        cache.keys[:, :, slots] = k[:, :, recent]
        if feature_keys is not None:
            cache.feature_keys[:, :, slots] = feature_keys[:, :, recent].to(cache.feature_keys.dtype)
        cache.values[:, :, slots] = v[:, :, recent].to(cache.values.dtype)
        cache.slot_positions[:, slots] = torch.where(real[:, recent], relative[:, recent], -1)
        if log_decay is not None:
            held = real[:, None, recent]  # slots of padding (or empty) hold no decay, as in a stepped state
            cache.slot_log_decay[:, :, slots] = torch.where(held, log_to_end[:, :, recent], 0.0).float()
    if recall_state is not None:
        cache.state, cache.norm, cache.recall_cache = recall_state[0].float(), recall_state[1].float(), recall_state[2]
        if cache.pending_state is not None:
            cache.pending_state.zero_()
            cache.pending_norm.zero_()
    cache.lengths = lengths
    cache.column.fill_(length)
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
    log_decay: torch.Tensor | None = None,
    feature_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend one new column and update ``cache`` in place.

    q (B, H, D), k (B, Hkv, D), v (B, Hkv, Dv), fq (B, H, F); ``real`` (B,) bool marks rows whose
    token is real (None: all are); a padding token is no key and its output is zero. With a window,
    ``key_features`` computes φ of the one key per row that leaves it (B, Hkv, 1, D) -> (B, H, 1, F);
    without one, ``fk`` (B, H, F) is folded at once. ``log_decay`` (B, H): the decay gate's a_t for this column
    (the cache must have been made with ``gated``). ``feature_key`` (B, Hkv, D): what ``key_features`` will read
    of this column's key when it leaves (a cache made with ``feature_keys``). Static shapes, no host synchronisation.
    """
    num_kv_heads = v.shape[1]
    num_heads = cache.state.shape[1]
    position = cache.lengths
    real_weight = None if real is None else real.to(torch.float32)[:, None, None]

    def only_real(x: torch.Tensor) -> torch.Tensor:
        return x if real_weight is None else x * real_weight

    if (log_decay is not None) != (cache.slot_log_decay is not None):
        raise ValueError("a gated step needs a gated cache (RecurrentState.empty(..., gated=True)) and log_decay")
    if log_decay is not None:
        # The linear state forgets: S ← g_t S (a padding column decays nothing).
        step_decay = only_real(log_decay.float()[..., None])[..., 0]  # (B, H)
        decay = torch.exp(step_decay)
        cache.state *= decay[..., None, None]
        cache.norm *= decay[..., None]
        if cache.pending_state is not None:
            cache.pending_state *= decay[..., None, None]
            cache.pending_norm *= decay[..., None]
        cache.slot_log_decay += step_decay[..., None] * (cache.slot_positions >= 0)[:, None, :]
        if cache.recall_positions is not None:  # cached keys do not decay, but count it for when they are folded
            cache.recall_log_decay += step_decay[..., None] * (cache.recall_positions >= 0)

    if window.kind == "none":
        fq = fq.float()
        _fold(cache.state, cache.norm, only_real(fk.float()), v)
        num = (fq.unsqueeze(-2) @ cache.state).squeeze(-2)
        out = normalise(num, (fq * cache.norm).sum(-1))
    else:
        if use_linear and key_features is None:
            raise ValueError("a windowed recurrent step with a linear term needs key_features")
        ring = cache.slot_positions.shape[1]
        slot = cache.column % ring  # (B,), the same in every row
        if use_linear and cache.recall_positions is not None:
            _recall_block_start(cache, window, position, real, key_features)
        elif use_linear:
            # The key at relative p − size (column − size): it leaves a sliding window now, and a terrace
            # window with the rest of its block when the next block starts. Fold it before its slot is
            # overwritten (a sliding window's ring is exactly ``size`` long).
            leaving = (cache.column - window.size) % ring
            leaving_position = cache.slot_positions.gather(1, leaving[:, None]).squeeze(1)  # (B,)
            weight = leaving_position >= window.sinks  # an empty slot (−1) or a sink is never folded
            if real is not None:
                weight = weight & real
            source = cache.keys if cache.feature_keys is None else cache.feature_keys
            leaving_key = source.gather(2, _slot_index(leaving, source))  # (B, Hkv, 1, D)
            leaving_value = cache.values.gather(2, _slot_index(leaving, cache.values)).squeeze(2)  # (B, Hkv, Dv)
            leaving_fk = key_features(leaving_key).squeeze(2).float() * weight.to(torch.float32)[:, None, None]
            if log_decay is not None:
                # the decay the leaving key has accumulated since it arrived
                accumulated = cache.slot_log_decay.gather(2, leaving.view(-1, 1, 1).expand(-1, num_heads, 1))
                leaving_fk = leaving_fk * torch.exp(accumulated)
            if window.kind == "terrace":
                # A real query that starts a block: the previous block's keys have all left its window.
                boundary = position % window.size == 0
                if real is not None:
                    boundary = boundary & real
                boundary = boundary.to(torch.float32)
                cache.state += cache.pending_state * boundary[:, None, None, None]
                cache.norm += cache.pending_norm * boundary[:, None, None]
                cache.pending_state *= (1 - boundary)[:, None, None, None]
                cache.pending_norm *= (1 - boundary)[:, None, None]
                _fold(cache.pending_state, cache.pending_norm, leaving_fk, leaving_value)
            else:
                _fold(cache.state, cache.norm, leaving_fk, leaving_value)
        cache.keys.scatter_(2, _slot_index(slot, cache.keys), k.to(cache.keys.dtype).unsqueeze(2))
        if (feature_key is not None) != (cache.feature_keys is not None):
            raise ValueError("feature_key goes with a cache made with feature_keys=True, and only with one")
        if feature_key is not None:
            cache.feature_keys.scatter_(2, _slot_index(slot, cache.feature_keys),
                                        feature_key.to(cache.feature_keys.dtype).unsqueeze(2))
        cache.values.scatter_(2, _slot_index(slot, cache.values), v.to(cache.values.dtype).unsqueeze(2))
        held = position if real is None else torch.where(real, position, -1)
        cache.slot_positions.scatter_(1, slot[:, None], held[:, None])
        if log_decay is not None:
            cache.slot_log_decay.scatter_(2, slot.view(-1, 1, 1).expand(-1, num_heads, 1),
                                          torch.zeros_like(cache.slot_log_decay[..., :1]))

        keys, values = cache.keys, cache.values
        held = cache.slot_positions
        in_window = (held >= 0) & window.contains(position[:, None], held)  # (B, R)
        if window.sinks:
            # A row's first N real tokens: written once, as they arrive; read once the ring no longer holds them.
            is_sink = position < window.sinks
            if real is not None:
                is_sink = is_sink & real
            sink_slot = position.clamp(max=window.sinks - 1)
            for buffer, new in ((cache.sink_keys, k), (cache.sink_values, v)):
                old = buffer.gather(2, _slot_index(sink_slot, buffer)).squeeze(2)
                buffer.scatter_(2, _slot_index(sink_slot, buffer),
                                torch.where(is_sink[:, None, None], new.to(buffer.dtype), old).unsqueeze(2))
            old_position = cache.sink_positions.gather(1, sink_slot[:, None]).squeeze(1)
            cache.sink_positions.scatter_(1, sink_slot[:, None], torch.where(is_sink, position, old_position)[:, None])
            sinks_held = cache.sink_positions
            outside_ring = (sinks_held >= 0) & (position[:, None] - sinks_held >= ring)  # (B, N)
            keys = torch.cat([keys, cache.sink_keys], dim=2)
            values = torch.cat([values, cache.sink_values], dim=2)
            in_window = torch.cat([in_window, outside_ring], dim=1)
        grouped_q = _by_kv_group(q.float(), num_kv_heads)  # (B, Hkv, G, D)
        scores = (grouped_q @ keys.float().transpose(-1, -2)).flatten(1, 2) * scaling  # (B, H, R [+ N])
        mask = in_window[:, None, :].expand(-1, num_heads, -1)
        held = 0 if cache.recall_positions is None else cache.recall_positions.shape[-1]
        if held:  # the cached keys, per query head, in the same softmax
            recalled = (q.float().unsqueeze(-2) @ cache.recall_keys.float().transpose(-1, -2)).squeeze(-2) * scaling
            scores = torch.cat([scores, recalled], dim=-1)
            mask = torch.cat([mask, cache.recall_positions >= 0], dim=-1)
        weights = gamma_per_head(gamma, num_heads, v.device).view(1, num_heads, 1) * softmax_terms(scores, mask)
        den = weights.sum(-1)
        weights, recall_weights = weights.split([weights.shape[-1] - held, held], dim=-1)
        num = (_by_kv_group(weights, num_kv_heads) @ values.float()).flatten(1, 2)  # (B, H, Dv)
        if held:
            num = num + (recall_weights.unsqueeze(-2) @ cache.recall_values.float()).squeeze(-2)
        if use_linear:
            fq = fq.float()
            num = num + (fq.unsqueeze(-2) @ cache.state).squeeze(-2)
            den = den + (fq * cache.norm).sum(-1)
        out = normalise(num, den)
    cache.column += 1
    cache.columns += 1
    cache.lengths += 1 if real is None else real.long()
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
    log_decay: torch.Tensor | None = None,
    recall: int = 0,
) -> torch.Tensor:
    """Whole sequences through ``hybrid_attention_step``, token by token.

    φ(k) is given here for every position rather than as a function of k, so the step's ``key_features``
    hands back the given features of the key it asks for: the one at column t − size.
    """
    check_inputs(q, k, v, fq, fk, window, use_linear)
    check_log_decay(log_decay, fq if use_linear else None)
    batch, num_kv_heads, length, value_dim = v.shape
    num_heads = (q if q is not None else fq).shape[1]
    feature_dim = fq.shape[-1] if fq is not None else 1
    cache = RecurrentState.empty(
        batch, num_heads, num_kv_heads, k.shape[-1] if k is not None else 1, value_dim, feature_dim, window,
        dtype=torch.float32, device=v.device, gated=log_decay is not None, recall=recall,
    )
    starts = row_starts(start, batch, v.device)
    no_key = torch.zeros(batch, num_heads, 1, feature_dim, device=v.device)

    def column(x: torch.Tensor | None, t: int) -> torch.Tensor | None:
        return x[:, :, t] if x is not None else None

    def leaving_features(t: int) -> KeyFeatures:
        # Before column ``size`` the leaving slot is empty (its weight is 0): any features will do. A recall cache
        # asks, at a block start, for the block of columns t − 2·size … t − size − 1 at once.
        leaving = t - window.size

        def features(keys: torch.Tensor) -> torch.Tensor:
            if keys.shape[2] > 1:
                return fk[:, :, t - 2 * window.size : t - window.size]
            return fk[:, :, leaving : leaving + 1] if leaving >= 0 else no_key

        return features

    outputs = []
    for t in range(length):
        outputs.append(hybrid_attention_step(
            cache, column(q, t), column(k, t), v[:, :, t], column(fq, t), column(fk, t), t >= starts,
            window=window, scaling=scaling, gamma=gamma, use_linear=use_linear,
            key_features=leaving_features(t), log_decay=None if log_decay is None else log_decay[:, :, t],
        ))
    return torch.stack(outputs, dim=2)


def linear_attention_recurrent(fq, fk, v, *, start=None) -> torch.Tensor:
    """Causal linear attention one token at a time with S = Σ φ(k)vᵀ, z = Σ φ(k)."""
    return hybrid_attention_recurrent(None, None, v, fq, fk, window=Window("none"), start=start)
