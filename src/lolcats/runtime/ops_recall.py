"""Hybrid attention with a sparse recall cache (LoLA, McDermott et al. 2025): an inference-time, constant-size set of
past keys that stay exact softmax terms because the linear state recalls them worst.

For the terrace window of ``size`` (blocks counted from each row's first real token): when block b ≥ 2 starts, the
keys of block b − 2 leave the window. They and the keys already cached are candidates; each candidate c is scored
by its self-recall error against the linear state that would hold all of them,
    err_c = ‖v_c − S_allᵀφ(k_c) / z_allᵀφ(k_c)‖²,   S_all = S + Σ_cand φ(k)vᵀ,  z_all = z + Σ_cand φ(k),
the ``recall`` candidates with the largest error stay cached (per query head, since φ and S are per query head),
and the others join (S, z) for good. One departure from LoLA, measured: a candidate whose value is a near-duplicate
(cosine > ``NEAR_DUPLICATE_COSINE``) of a candidate with a larger error ranks after every distinct candidate. A
repeated token that φ recalls badly has the same large error at each of its copies: on the passkey prompts' periodic
filler, LoLA's rule fills whole heads with copies of one word ("grass" 157 times out of 256) and drops the needle
(Qwen2.5-0.5B, 4k, needle at depth 0.1: 0/3 with K = 256 and with K = 512; 3/3 with K = 256 and this rule). A
copy adds nothing an exact softmax term of the first does not: duplicates keep the slots that distinct keys leave.
Queries of block b attend with softmax to their window, the sinks and the cache, and linearly to (S, z), in one
normaliser. Sinks never become candidates. ``tests/oracle.py`` spells the
same definition out one query at a time; ``hybrid_attention_recall`` computes it block by block (the full forward and
the prefill), ``select_recall`` is the step both it and the recurrent decode (ops_recurrent) take at a block start.
The cache holds ``recall`` keys, values and features per head whatever the context: memory stays constant.

With a decay gate, (S, z) at a block start is the state its first query i sees (every folded key j carries
d_ij = Π_{t=j+1..i} g_t), and every candidate's φ(k) is weighted by its own d_ij in the scores and when it is folded:
a cached key is an exact softmax term and does not decay, but it keeps the decay since its position (``log_decay``)
for the day it joins the state, so that from then on it weighs what it would have weighed had it never been cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .ops_common import (
    Window,
    accumulation_dtype,
    cumulative_log_decay,
    expand_heads,
    gamma_per_head,
    normalise,
    row_starts,
    shift_rows,
    softmax_terms,
    unshift_rows,
)


# Values closer than this (cosine) count as copies of one another when the cache is chosen. Copies of a token in a
# repeated context sit near 1; distinct tokens, and one token in different contexts, well below.
NEAR_DUPLICATE_COSINE = 0.95


@dataclass
class RecallCache:
    keys: torch.Tensor  # (B, H, K, D) cached keys, per query head
    values: torch.Tensor  # (B, H, K, Dv)
    features: torch.Tensor  # (B, H, K, F) fp32: φ(k) of each cached key (its self-recall error is recomputed)
    positions: torch.Tensor  # (B, H, K) long: relative position of each cached key, −1 for an empty slot
    log_decay: torch.Tensor  # (B, H, K) fp32: Σ a_t since each cached key's position (0 without a gate)

    @classmethod
    def empty(cls, batch, num_heads, recall, head_dim, value_dim, feature_dim, *, dtype=torch.float32,
              device="cpu") -> "RecallCache":
        return cls(keys=torch.zeros(batch, num_heads, recall, head_dim, dtype=dtype, device=device),
                   values=torch.zeros(batch, num_heads, recall, value_dim, dtype=dtype, device=device),
                   features=torch.zeros(batch, num_heads, recall, feature_dim, device=device),
                   positions=torch.full((batch, num_heads, recall), -1, dtype=torch.long, device=device),
                   log_decay=torch.zeros(batch, num_heads, recall, device=device))

    def fields(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.values, self.features, self.positions, self.log_decay


def check_recall(window: Window, recall: int, use_linear: bool) -> None:
    if recall < 0:
        raise ValueError(f"recall_cache must be >= 0, got {recall}")
    if recall and (window.kind != "terrace" or not use_linear):
        raise ValueError("a recall cache chooses among the keys a terrace window hands to the linear term: it needs "
                         f"attention='lolcats', not a {window.kind!r} window" + ("" if use_linear else " without one"))


@torch.no_grad()
def select_recall(state: torch.Tensor, norm: torch.Tensor, cache: RecallCache, keys: torch.Tensor,
                  values: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                  log_decay: torch.Tensor | None = None):
    """One block start: candidates = the cache and the leaving keys (B, H, M, ·) at ``positions`` (B, H, M), −1
    for none, with ``log_decay`` (B, H, M) the decay each leaving key has accumulated up to the block's first query
    (None: no gate); returns the new (state, norm, cache). Accumulation in fp32 (fp64 stays fp64)."""
    acc = state.dtype
    recall = cache.positions.shape[-1]
    if log_decay is None:
        log_decay = torch.zeros(positions.shape, device=positions.device)
    all_keys = torch.cat([cache.keys, keys.to(cache.keys.dtype)], dim=2)
    all_values = torch.cat([cache.values, values.to(cache.values.dtype)], dim=2)
    all_features = torch.cat([cache.features.to(acc), features.to(acc)], dim=2)
    all_positions = torch.cat([cache.positions, positions], dim=2)
    all_log_decay = torch.cat([cache.log_decay, log_decay.to(cache.log_decay.dtype)], dim=2)
    valid = (all_positions >= 0).to(acc)[..., None]
    weighted = all_features * valid * torch.exp(all_log_decay.to(acc))[..., None]
    state_all = state + weighted.transpose(-1, -2) @ all_values.to(acc)
    norm_all = norm + weighted.sum(2)
    predicted = normalise(all_features @ state_all, (all_features * norm_all[:, :, None]).sum(-1))
    errors = (all_values.to(acc) - predicted).pow(2).sum(-1)
    errors = errors.masked_fill(all_positions < 0, -math.inf)
    kept = ranked_by_error_then_distinct(errors, all_values.to(acc), all_positions >= 0)[..., :recall]  # (B, H, K)
    keep_mask = torch.zeros_like(errors, dtype=torch.bool).scatter_(-1, kept, True)
    folded = weighted * (~keep_mask).to(acc)[..., None]
    state = state + folded.transpose(-1, -2) @ all_values.to(acc)
    norm = norm + folded.sum(2)

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x.gather(2, kept[..., None].expand(*kept.shape, x.shape[-1]))

    cache = RecallCache(keys=pick(all_keys), values=pick(all_values), features=pick(all_features).float(),
                        positions=all_positions.gather(2, kept),  # slots given an empty candidate keep −1
                        log_decay=all_log_decay.gather(2, kept))
    return state, norm, cache


def ranked_by_error_then_distinct(errors: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Candidate indices (B, H, C), best first: by decreasing error (ties: earlier candidate first), except that a
    candidate whose value is a near-duplicate of one with a larger error goes after every distinct one, and empty
    candidates (``valid`` false) last."""
    order = errors.sort(dim=-1, descending=True, stable=True).indices
    unit = torch.nn.functional.normalize(values, dim=-1).gather(2, order[..., None].expand(*order.shape, values.shape[-1]))
    count = order.shape[-1]
    earlier = torch.ones(count, count, dtype=torch.bool, device=order.device).tril(-1)  # [i, j]: j before i
    valid_sorted = valid.gather(2, order)
    copies = (unit @ unit.transpose(-1, -2) > NEAR_DUPLICATE_COSINE) & earlier & valid_sorted[..., None, :]
    rank = torch.arange(count, device=order.device).expand_as(order)
    group = torch.where(valid_sorted, copies.any(-1).long(), 2)  # 0 distinct, 1 a near-duplicate, 2 empty
    return order.gather(2, (group * count + rank).argsort(dim=-1))


def where_rows(rows: torch.Tensor, new: tuple, old: tuple) -> tuple:
    """(state, norm, cache) from ``new`` where ``rows`` (B,) is true, else from ``old``."""
    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(rows.view(-1, *[1] * (a.dim() - 1)), a, b)

    (state, norm, cache), (old_state, old_norm, old_cache) = new, old
    return pick(state, old_state), pick(norm, old_norm), RecallCache(
        *(pick(a, b) for a, b in zip(cache.fields(), old_cache.fields())))


def decayed(state: torch.Tensor, norm: torch.Tensor, cache: RecallCache, log_decay: torch.Tensor) -> tuple:
    """(state, norm, cache) after ``log_decay`` (B, H) more of the gate: the sums forget, cached keys count it."""
    held = (cache.positions >= 0).to(cache.log_decay.dtype)
    decay = torch.exp(log_decay).to(state.dtype)
    return (state * decay[..., None, None], norm * decay[..., None],
            RecallCache(cache.keys, cache.values, cache.features, cache.positions,
                        cache.log_decay + log_decay.to(cache.log_decay.dtype)[..., None] * held))


@torch.no_grad()
def hybrid_attention_recall(q, k, v, fq, fk, *, window: Window, recall: int, scaling: float = 1.0, gamma=None,
                            start=None, output_dtype=None, return_state: bool = False, log_decay=None):
    """Hybrid attention of a terrace window with a recall cache of ``recall`` keys per head, block by block;
    ``log_decay`` (B, H, L): the decay gate's a_t, if any. With ``return_state``: (out, state, norm, cache) after
    the last column (the sums as its query sees them), what decoding continues from."""
    check_recall(window, recall, use_linear=True)
    batch, num_kv_heads, length, value_dim = v.shape
    num_heads = q.shape[1]
    acc = accumulation_dtype(v.dtype)
    starts = row_starts(start, batch, v.device)
    lengths = length - starts  # real tokens per row
    shifted = bool(starts.any())
    if shifted:
        q, k, v, fq, fk = (shift_rows(x, starts) for x in (q, k, v, fq, fk))
    # A_t per head, float64, 0 past each row's real tokens (the shifted copies decay nothing).
    cumulative = None
    if log_decay is not None:
        if shifted:
            log_decay = shift_rows(log_decay[..., None], starts)[..., 0]
        real = torch.arange(length, device=v.device)[None, :] < lengths[:, None]
        cumulative = cumulative_log_decay(torch.where(real[:, None], log_decay, 0.0), torch.zeros_like(starts))
    size, sinks = window.size, window.sinks
    keys, values = expand_heads(k.to(acc), num_heads), expand_heads(v.to(acc), num_heads)
    features_q, features_k = fq.to(acc), fk.to(acc)
    feature_dim = features_k.shape[-1]
    state = torch.zeros(batch, num_heads, feature_dim, value_dim, dtype=acc, device=v.device)
    norm = torch.zeros(batch, num_heads, feature_dim, dtype=acc, device=v.device)
    # keys and values cached in the model's dtype (exact copies), as the decode state keeps them
    cache = RecallCache.empty(batch, num_heads, recall, k.shape[-1], value_dim, feature_dim, dtype=v.dtype,
                              device=v.device)
    gammas = gamma_per_head(gamma, num_heads, v.device, acc)
    outputs = []
    for block in range(math.ceil(length / size)):
        begin, end = block * size, min((block + 1) * size, length)
        if cumulative is not None and block >= 1:
            # (S, z) and the cache's decays move on to this block's first query
            state, norm, cache = decayed(state, norm, cache, (cumulative[..., begin] - cumulative[..., begin - size]))
        if block >= 2:
            low = begin - 2 * size
            leaving = torch.arange(low, low + size, device=v.device)
            positions = torch.where(leaving >= sinks, leaving, -1).expand(batch, num_heads, size)
            # Only rows with a real token in this block start it (shifted rows end in copies of their last token).
            positions = torch.where((lengths > begin)[:, None, None], positions, -1)
            leaving_decay = None if cumulative is None else \
                (cumulative[..., begin, None] - cumulative[..., low:low + size]).float()
            selected = select_recall(state, norm, cache, keys[:, :, low:low + size], values[:, :, low:low + size],
                                     features_k[:, :, low:low + size], positions, leaving_decay)
            state, norm, cache = where_rows(lengths > begin, selected, (state, norm, cache))
        local_begin = max(0, begin - size)
        pos_q = torch.arange(begin, end, device=v.device)[:, None]
        pos_local = torch.arange(local_begin, end, device=v.device)[None, :]
        sink_end = min(sinks, local_begin)
        parts_k = [keys[:, :, local_begin:end], keys[:, :, :sink_end], cache.keys.to(acc)]
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
        if cumulative is not None:  # from the block's first query on to each query
            block_q = block_q * torch.exp(cumulative[..., begin:end] - cumulative[..., begin, None]).to(acc)[..., None]
        num = num + block_q @ state
        den = den + (block_q * norm[:, :, None]).sum(-1)
        outputs.append(normalise(num, den))
    out = torch.cat(outputs, dim=2)
    if shifted:
        out = unshift_rows(out, starts)
    out = out.to(output_dtype or v.dtype)
    if not return_state:
        return out
    if cumulative is not None:  # the sums as the last column's query sees them, as a stepped state holds them
        last_begin = (math.ceil(length / size) - 1) * size
        state, norm, cache = decayed(state, norm, cache, cumulative[..., -1] - cumulative[..., last_begin])
    return out, state, norm, cache
