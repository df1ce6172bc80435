"""An independent oracle for hybrid attention: one query at a time, its keys listed one by one.

Imports nothing from lolcats (torch and math only), so a bug in lolcats' window membership, GQA head
mapping, padding offsets, max-subtraction or normalisation cannot hide in a shared helper. Written from
the definition (LoLCATs, Zhang et al. 2024, eq. for the hybrid "sliding window + linear" attention):

  for a real query i of row b, with p = i − start[b] its position counted from the row's first real token,
  and every real key j ≤ i at position r = j − start[b]:

    W(i)   = keys inside the softmax window of p
               sliding  r > p − size            (the last ``size`` tokens, the query's own included)
               terrace  r // size ≥ p // size − 1 (the query's block and the one before it)
               none     no key
             and, with ``sinks`` N, every key with r < N (the row's first N real tokens: attention sinks)
    Lin(i) = every other real causal key (only when the linear term is on)

    m_i   = max_{j ∈ W(i)} s_ij,   s_ij = scaling · q_i·k_j       (the window's max only)
    w_ij  = γ_h · exp(s_ij − m_i)        for j ∈ W(i)
          = φ(q_i)·φ(k_j) · d_ij         for j ∈ Lin(i), d_ij = Π_{t=j+1..i} g_t (1 without a decay gate;
                                         g_t = exp(a_t), a = log_decay (B, H, L), per head)
    out_i = Σ_j w_ij v_j / Σ_j w_ij      (0 when the sum is 0, and 0 for padding queries)

The max m_i is not a neutral stabiliser: it sets the scale of the softmax terms (the largest is exactly γ)
against the linear terms. Grouped-query attention: query head h reads kv head h // (H / Hkv); the
features fq, fk are given per query head (B, H, L, F). Everything is computed in float64.
"""

from __future__ import annotations

import math

import torch

from lolcats.runtime.ops_recall import NEAR_DUPLICATE_COSINE  # a threshold, not code: the definition is below


def in_window(kind: str, size: int, query_position: int, key_position: int, sinks: int = 0) -> bool:
    """Whether the key at relative position key_position (≤ query_position) is in the query's softmax window."""
    assert 0 <= key_position <= query_position
    if kind != "none" and key_position < sinks:
        return True
    if kind == "sliding":
        return query_position - key_position < size
    if kind == "terrace":
        return key_position // size >= query_position // size - 1
    if kind == "none":
        return False
    raise ValueError(kind)


def hybrid_attention_oracle(q, k, v, fq, fk, *, kind: str, size: int = 0, scaling: float = 1.0, gamma=None,
                            use_linear: bool = True, start=None, sinks: int = 0, log_decay=None) -> torch.Tensor:
    """(B, H, L, Dv) float64 output of hybrid attention; q (B, H, L, D), k/v (B, Hkv, L, ·), fq/fk (B, H, L, F)."""
    batch, num_kv_heads, length, value_dim = v.shape
    num_heads = (q if q is not None else fq).shape[1]
    assert num_heads % num_kv_heads == 0
    group = num_heads // num_kv_heads
    starts = [0] * batch if start is None else [int(s) for s in start]
    gammas = [1.0] * num_heads if gamma is None else [float(g) for g in gamma]
    q = None if q is None else q.double()
    k = None if k is None else k.double()
    fq = None if fq is None else fq.double()
    fk = None if fk is None else fk.double()
    v = v.double()
    out = torch.zeros(batch, num_heads, length, value_dim, dtype=torch.float64)
    for b in range(batch):
        first = starts[b]
        for h in range(num_heads):
            kv_head = h // group
            for i in range(first, length):
                p = i - first
                window_keys = [j for j in range(first, i + 1) if in_window(kind, size, p, j - first, sinks)]
                linear_keys = [j for j in range(first, i + 1) if j not in window_keys] if use_linear else []
                weights, values = [], []
                if window_keys:
                    scores = [scaling * float(q[b, h, i] @ k[b, kv_head, j]) for j in window_keys]
                    top = max(scores)
                    weights += [gammas[h] * math.exp(s - top) for s in scores]
                    values += [v[b, kv_head, j] for j in window_keys]
                for j in linear_keys:
                    decay = 1.0
                    if log_decay is not None:
                        for t in range(j + 1, i + 1):
                            decay *= math.exp(float(log_decay[b, h, t]))
                    weights.append(float(fq[b, h, i] @ fk[b, h, j]) * decay)
                    values.append(v[b, kv_head, j])
                total = sum(weights)
                if total == 0:
                    continue  # nothing attended to (e.g. relu features that all vanish): output 0
                out[b, h, i] = sum(w * value for w, value in zip(weights, values)) / total
    return out


def softmax_attention_oracle(q, k, v, *, scaling: float, sliding_window: int | None = None, start=None):
    """Exact causal softmax over the last ``sliding_window`` real tokens (every earlier real token when None)."""
    size = v.shape[2] if sliding_window is None else sliding_window
    return hybrid_attention_oracle(q, k, v, None, None, kind="sliding", size=size, scaling=scaling,
                                   use_linear=False, start=start)


def linear_attention_oracle(fq, fk, v, *, start=None):
    """Causal linear attention φ(q)·φ(k) over every earlier real token, with its normaliser."""
    return hybrid_attention_oracle(None, None, v, fq, fk, kind="none", start=start)


def recall_cache_oracle(q, k, v, fq, fk, *, size: int, recall: int, scaling: float = 1.0, gamma=None, start=None,
                        sinks: int = 0, log_decay=None, duplicate: float = NEAR_DUPLICATE_COSINE) -> torch.Tensor:
    """Hybrid attention with a terrace window of ``size`` and a sparse recall cache of ``recall`` keys per head (LoLA,
    McDermott et al. 2025), one query at a time, written from the definition:

    Blocks of ``size`` positions count from the row's first real token. When block b ≥ 2 starts, the keys of block
    b − 2 leave the window (sinks aside) and, with the keys in the cache, are candidates. Each candidate c is scored
    by its self-recall error against the linear state that would hold every candidate besides what the state holds:
        pred_c = Σ_j φ(k_c)·φ(k_j) v_j / Σ_j φ(k_c)·φ(k_j)   over j in the state and the candidates
        err_c  = ‖v_c − pred_c‖²
    the ``recall`` candidates with the largest error stay in the cache (exact softmax terms, in every query's window
    from then on), the others join the linear state for good; but a candidate whose value has cosine > ``duplicate``
    with that of a candidate ranked before it (larger error, or equal error and listed first) ranks after every
    candidate that has none. Everything else is the hybrid attention above.

    With a decay gate (``log_decay``), the state is the one the block's first query i sees: every φ(k_j) in the sums
    above carries its decay d_ij = Π_{t=j+1..i} g_t, candidates included (a key keeps no decay while cached, and
    joins the state with all the decay since its own position); folded keys reach later queries with d_ij as above.
    """
    batch, num_kv_heads, length, value_dim = v.shape
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    starts = [0] * batch if start is None else [int(s) for s in start]
    gammas = [1.0] * num_heads if gamma is None else [float(g) for g in gamma]
    q, k, v, fq, fk = (x.double() for x in (q, k, v, fq, fk))
    out = torch.zeros(batch, num_heads, length, value_dim, dtype=torch.float64)
    for b in range(batch):
        first = starts[b]
        for h in range(num_heads):
            kv_head = h // group

            def decay(j: int, i: int) -> float:
                """Π_{t=j+1..i} g_t: what the gate leaves of key j's term for query i (1 without a gate)."""
                if log_decay is None:
                    return 1.0
                return math.exp(sum(float(log_decay[b, h, t]) for t in range(j + 1, i + 1)))

            cache: list[int] = []  # positions (columns) of cached keys
            folded: list[int] = []  # positions in the linear state
            for i in range(first, length):
                p = i - first
                if p % size == 0 and p // size >= 2:
                    block = p // size - 2
                    leaving = [first + r for r in range(block * size, (block + 1) * size) if r >= sinks]
                    candidates = cache + leaving
                    pool = folded + candidates
                    errors = []
                    for c in candidates:
                        weights = [float(fk[b, h, c] @ fk[b, h, j]) * decay(j, i) for j in pool]
                        pred = sum(w * v[b, kv_head, j] for w, j in zip(weights, pool)) / sum(weights)
                        errors.append(float(((v[b, kv_head, c] - pred) ** 2).sum()))
                    order = sorted(range(len(candidates)), key=lambda n: -errors[n])

                    def copies_one_before(i: int) -> bool:
                        mine = v[b, kv_head, candidates[order[i]]]
                        return any(float(torch.cosine_similarity(mine, v[b, kv_head, candidates[m]], dim=0)) > duplicate
                                   for m in order[:i])

                    copies = [copies_one_before(i) for i in range(len(order))]
                    order = [n for i, n in enumerate(order) if not copies[i]] + [n for i, n in enumerate(order) if copies[i]]
                    cache = [candidates[n] for n in order[:recall]]
                    folded += [candidates[n] for n in order[recall:]]
                window_keys = [j for j in range(first, i + 1) if in_window("terrace", size, p, j - first, sinks)]
                window_keys += [j for j in cache if j not in window_keys]
                scores = [scaling * float(q[b, h, i] @ k[b, kv_head, j]) for j in window_keys]
                top = max(scores)
                weights = [gammas[h] * math.exp(s - top) for s in scores]
                values = [v[b, kv_head, j] for j in window_keys]
                for j in folded:
                    weights.append(float(fq[b, h, i] @ fk[b, h, j]) * decay(j, i))
                    values.append(v[b, kv_head, j])
                out[b, h, i] = sum(w * value for w, value in zip(weights, values)) / sum(weights)
    return out
