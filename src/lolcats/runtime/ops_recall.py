"""Hybrid attention with a sparse recall cache (LoLA, McDermott et al. 2025): an inference-time, constant-size set of
past keys that stay exact softmax terms because the linear state recalls them worst.

For the terrace window of ``size`` (blocks counted from each row's first real token): when block b ≥ 2 starts, the
keys of block b − 2 leave the window. They and the keys already cached are candidates; each candidate c is scored
by its self-recall error against the linear state that would hold all of them,
    err_c = ‖v_c − S_allᵀφ(k_c) / z_allᵀφ(k_c)‖²,   S_all = S + Σ_cand φ(k)vᵀ,  z_all = z + Σ_cand φ(k),
the ``recall`` candidates with the largest error stay cached (per query head, since φ and S are per query head),
and the others join (S, z) for good. Queries of block b attend with softmax to their window, the sinks and the
cache, and linearly to (S, z), in one normaliser. Sinks never become candidates. ``tests/oracle.py`` spells the
same definition out one query at a time; ``hybrid_attention_recall`` computes it block by block (the full forward and
the prefill), ``select_recall`` is the step both it and the recurrent decode (ops_recurrent) take at a block start.
The cache holds ``recall`` keys, values and features per head whatever the context: memory stays constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .ops_common import (
    Window,
    accumulation_dtype,
    expand_heads,
    gamma_per_head,
    normalise,
    row_starts,
    shift_rows,
    softmax_terms,
    unshift_rows,
)


@dataclass
class RecallCache:
    keys: torch.Tensor  # (B, H, K, D) cached keys, per query head
    values: torch.Tensor  # (B, H, K, Dv)
    features: torch.Tensor  # (B, H, K, F) fp32: φ(k) of each cached key (its self-recall error is recomputed)
    positions: torch.Tensor  # (B, H, K) long: relative position of each cached key, −1 for an empty slot

    @classmethod
    def empty(cls, batch, num_heads, recall, head_dim, value_dim, feature_dim, *, dtype=torch.float32,
              device="cpu") -> "RecallCache":
        return cls(keys=torch.zeros(batch, num_heads, recall, head_dim, dtype=dtype, device=device),
                   values=torch.zeros(batch, num_heads, recall, value_dim, dtype=dtype, device=device),
                   features=torch.zeros(batch, num_heads, recall, feature_dim, device=device),
                   positions=torch.full((batch, num_heads, recall), -1, dtype=torch.long, device=device))


def check_recall(window: Window, recall: int, use_linear: bool) -> None:
    if recall < 0:
        raise ValueError(f"recall_cache must be >= 0, got {recall}")
    if recall and (window.kind != "terrace" or not use_linear):
        raise ValueError("a recall cache chooses among the keys a terrace window hands to the linear term: it needs "
                         f"attention='lolcats', not a {window.kind!r} window" + ("" if use_linear else " without one"))


@torch.no_grad()
def select_recall(state: torch.Tensor, norm: torch.Tensor, cache: RecallCache, keys: torch.Tensor,
                  values: torch.Tensor, features: torch.Tensor, positions: torch.Tensor):
    """One block start: candidates = the cache and the leaving keys (B, H, M, ·) at ``positions`` (B, H, M), −1
    for none; returns the new (state, norm, cache). Accumulation in fp32 (fp64 stays fp64)."""
    acc = state.dtype
    recall = cache.positions.shape[-1]
    all_keys = torch.cat([cache.keys, keys.to(cache.keys.dtype)], dim=2)
    all_values = torch.cat([cache.values, values.to(cache.values.dtype)], dim=2)
    all_features = torch.cat([cache.features.to(acc), features.to(acc)], dim=2)
    all_positions = torch.cat([cache.positions, positions], dim=2)
    valid = (all_positions >= 0).to(acc)[..., None]
    weighted = all_features * valid
    state_all = state + weighted.transpose(-1, -2) @ all_values.to(acc)
    norm_all = norm + weighted.sum(2)
    predicted = normalise(all_features @ state_all, (all_features * norm_all[:, :, None]).sum(-1))
    errors = (all_values.to(acc) - predicted).pow(2).sum(-1)
    errors = errors.masked_fill(all_positions < 0, -math.inf)
    kept = errors.topk(recall, dim=-1).indices  # (B, H, K)
    keep_mask = torch.zeros_like(errors, dtype=torch.bool).scatter_(-1, kept, True)
    folded = weighted * (~keep_mask).to(acc)[..., None]
    state = state + folded.transpose(-1, -2) @ all_values.to(acc)
    norm = norm + folded.sum(2)

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x.gather(2, kept[..., None].expand(*kept.shape, x.shape[-1]))

    chosen = all_positions.gather(2, kept)
    cache = RecallCache(keys=pick(all_keys), values=pick(all_values), features=pick(all_features).float(),
                        positions=chosen)  # slots that got an empty candidate keep position −1
    return state, norm, cache


def where_rows(rows: torch.Tensor, new: tuple, old: tuple) -> tuple:
    """(state, norm, cache) from ``new`` where ``rows`` (B,) is true, else from ``old``."""
    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(rows.view(-1, *[1] * (a.dim() - 1)), a, b)

    (state, norm, cache), (old_state, old_norm, old_cache) = new, old
    return pick(state, old_state), pick(norm, old_norm), RecallCache(
        *(pick(a, b) for a, b in zip((cache.keys, cache.values, cache.features, cache.positions),
                                     (old_cache.keys, old_cache.values, old_cache.features, old_cache.positions))))


@torch.no_grad()
def hybrid_attention_recall(q, k, v, fq, fk, *, window: Window, recall: int, scaling: float = 1.0, gamma=None,
                            start=None, output_dtype=None, return_state: bool = False):
    """Hybrid attention of a terrace window with a recall cache of ``recall`` keys per head, block by block.
    With ``return_state``: (out, state, norm, cache) after the last column, what decoding continues from."""
    check_recall(window, recall, use_linear=True)
    batch, num_kv_heads, length, value_dim = v.shape
    num_heads = q.shape[1]
    acc = accumulation_dtype(v.dtype)
    starts = row_starts(start, batch, v.device)
    lengths = length - starts  # real tokens per row
    shifted = bool(starts.any())
    if shifted:
        q, k, v, fq, fk = (shift_rows(x, starts) for x in (q, k, v, fq, fk))
    size, sinks = window.size, window.sinks
    keys, values = expand_heads(k.to(acc), num_heads), expand_heads(v.to(acc), num_heads)
    features_q, features_k = fq.to(acc), fk.to(acc)
    feature_dim = features_k.shape[-1]
    state = torch.zeros(batch, num_heads, feature_dim, value_dim, dtype=acc, device=v.device)
    norm = torch.zeros(batch, num_heads, feature_dim, dtype=acc, device=v.device)
    cache = RecallCache.empty(batch, num_heads, recall, k.shape[-1], value_dim, feature_dim, dtype=acc, device=v.device)
    gammas = gamma_per_head(gamma, num_heads, v.device, acc)
    outputs = []
    for block in range(math.ceil(length / size)):
        begin, end = block * size, min((block + 1) * size, length)
        if block >= 2:
            low = begin - 2 * size
            leaving = torch.arange(low, low + size, device=v.device)
            positions = torch.where(leaving >= sinks, leaving, -1).expand(batch, num_heads, size)
            # Only rows with a real token in this block start it (shifted rows end in copies of their last token).
            positions = torch.where((lengths > begin)[:, None, None], positions, -1)
            selected = select_recall(state, norm, cache, keys[:, :, low:low + size], values[:, :, low:low + size],
                                     features_k[:, :, low:low + size], positions)
            state, norm, cache = where_rows(lengths > begin, selected, (state, norm, cache))
        local_begin = max(0, begin - size)
        pos_q = torch.arange(begin, end, device=v.device)[:, None]
        pos_local = torch.arange(local_begin, end, device=v.device)[None, :]
        sink_end = min(sinks, local_begin)
        parts_k = [keys[:, :, local_begin:end], keys[:, :, :sink_end], cache.keys]
        parts_v = [values[:, :, local_begin:end], values[:, :, :sink_end], cache.values.to(acc)]
        masks = [(pos_local <= pos_q).expand(batch, num_heads, -1, -1),
                 torch.ones(batch, num_heads, end - begin, sink_end, dtype=torch.bool, device=v.device),
                 (cache.positions >= 0)[:, :, None, :].expand(-1, -1, end - begin, -1)]
        query = q[:, :, begin:end].to(acc) * scaling
        scores = query @ torch.cat(parts_k, dim=2).transpose(-1, -2)
        weights = gammas * softmax_terms(scores, torch.cat(masks, dim=-1))
        num = weights @ torch.cat(parts_v, dim=2)
        den = weights.sum(-1)
        block_q = features_q[:, :, begin:end]
        num = num + block_q @ state
        den = den + (block_q * norm[:, :, None]).sum(-1)
        outputs.append(normalise(num, den))
    out = torch.cat(outputs, dim=2)
    if shifted:
        out = unshift_rows(out, starts)
    out = out.to(output_dtype or v.dtype)
    return (out, state, norm, cache) if return_state else out
