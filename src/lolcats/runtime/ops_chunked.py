"""Chunked hybrid attention: the O(L) path for training and prefill.

Rows with left padding are first shifted so that every row's first real token sits at position 0;
relative positions then equal absolute ones, terrace blocks line up with chunks, and every mask is
shared by the whole batch. The sequence is cut into chunks of C tokens. Query chunk c looks at a local
slice of keys [cC − P, (c+1)C), where P (a multiple of C) covers the lookback of the chunk's windows
(``Window.chunk_lookback``); inside that slice the softmax-window and linear terms are computed exactly
with masks. Every key older than the slice is outside every window of the chunk, so it enters only
through the running linear state S = Σ φ(k) vᵀ, z = Σ φ(k), built with one cumulative sum over
per-chunk states. With the default terrace window and C equal to its size, the slice is exactly the two
blocks the window covers and no linear product is computed inside it. Sink tokens (``Window.sinks``: a row's
first N real tokens, in every window) older than a chunk's slice join its softmax keys as N extra columns, and
their features are zeroed before any linear product, so no linear term or state ever holds them.
Memory is O(L·(C + P) + (L/C)·F·Dv): linear in L for a fixed chunk size; no L×L tensor exists, and the keys
and values of grouped-query attention are read per kv head, never repeated to the query heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops_common import (
    Window,
    accumulation_dtype,
    check_inputs,
    check_log_decay,
    gamma_per_head,
    normalise,
    row_starts,
    shift_rows,
    softmax_terms,
    unshift_rows,
)


def _local_slices(x: torch.Tensor, lookback: int, chunk: int) -> torch.Tensor:
    """(B, H, n·C, X) -> (B, H, n, P + C, X): for chunk c, rows [cC − P, (c+1)C), zeros before 0."""
    padded = F.pad(x, (0, 0, lookback, 0))
    return padded.unfold(2, lookback + chunk, chunk).transpose(-1, -2)


def _prefix_sum(x: torch.Tensor, block: int = 16) -> torch.Tensor:
    """Inclusive cumulative sum over dim 2 of (B, H, n, X).

    torch.cumsum over a middle dim of a wide tensor is slow on CPU (4–10× a matmul of the same data):
    sum inside blocks of ``block`` rows with a triangular matmul, and cumsum only the block totals.
    """
    batch, heads, n, width = x.shape
    block = min(block, n)
    blocks = math.ceil(n / block)
    x = F.pad(x, (0, 0, 0, blocks * block - n)).view(batch, heads, blocks, block, width)
    lower = torch.ones(block, block, dtype=x.dtype, device=x.device).tril()
    inner = lower @ x
    totals = inner[:, :, :, -1]
    before = torch.cumsum(totals, dim=2) - totals
    return (inner + before[:, :, :, None]).view(batch, heads, blocks * block, width)[:, :, :n]


def _decayed_prefix_sum(x: torch.Tensor, log_decay: torch.Tensor, block: int = 16) -> torch.Tensor:
    """S_c = exp(d_c) S_{c−1} + x_c over dim 2 of (B, H, n, X), with d (B, H, n) ≤ 0 in float64.

    As ``_prefix_sum``: inside blocks of ``block`` rows a (block × block) matrix of decays exp(D_c − D_c'') (D the
    running sum of d inside the block, so no exponent grows with the sequence) does the work in one matmul, and
    only the block totals are carried from block to block.
    """
    batch, heads, n, width = x.shape
    block = min(block, n)
    blocks = math.ceil(n / block)
    x = F.pad(x, (0, 0, 0, blocks * block - n)).view(batch, heads, blocks, block, width)
    within = F.pad(log_decay, (0, blocks * block - n)).view(batch, heads, blocks, block).cumsum(-1)
    lower = torch.ones(block, block, dtype=torch.bool, device=x.device).tril()
    decays = torch.exp((within[..., :, None] - within[..., None, :]).clamp(max=0)).to(x.dtype) * lower
    inner = decays @ x
    carried = torch.exp(within).to(x.dtype)[..., None]  # decay from the end of the previous block to each row
    outputs, carry = [], torch.zeros(batch, heads, 1, width, dtype=x.dtype, device=x.device)
    for index in range(blocks):
        out = inner[:, :, index] + carried[:, :, index] * carry
        outputs.append(out)
        carry = out[:, :, -1:]
    return torch.cat(outputs, dim=2)[:, :, :n]


def hybrid_attention_chunked(
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
    chunk_size: int = 64,
    output_dtype: torch.dtype | None = None,
    return_linear_share: bool = False,
    log_decay: torch.Tensor | None = None,
):
    """Same result as ``hybrid_attention_reference`` without materialising L×L.

    The output is in ``output_dtype`` (default: v's dtype); accumulation is fp32 either way. With
    ``return_linear_share`` it returns ``(out, share)``, share (B, H, L) being each query's attention mass
    on the linear term (0 for padding queries): the diagnostic that ``hybrid_attention_weights`` gives
    at quadratic cost.
    """
    check_inputs(q, k, v, fq, fk, window, use_linear)
    check_log_decay(log_decay, fq if use_linear else None)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    output_dtype = output_dtype or v.dtype
    starts = row_starts(start, v.shape[0], v.device)
    shifted = bool(starts.any())
    decay = None if log_decay is None else log_decay[..., None]
    inputs = [shift_rows(x, starts) for x in (q, k, v, fq, fk, decay)] if shifted else [q, k, v, fq, fk, decay]
    decay = inputs.pop()
    if decay is not None and shifted:
        # the freed end positions repeat the last token; they precede no real query, but keep their decay out
        decay = decay * (torch.arange(decay.shape[2], device=decay.device) < (decay.shape[2] - starts)[:, None])[
            :, None, :, None]
    out, share = _aligned(*inputs, window, scaling, gamma, use_linear, chunk_size, return_linear_share,
                          None if decay is None else decay[..., 0])
    if shifted:
        out = unshift_rows(out, starts)
        share = None if share is None else unshift_rows(share[..., None], starts)[..., 0]
    out = out.to(output_dtype)
    return (out, share) if return_linear_share else out


def _aligned(q, k, v, fq, fk, window: Window, scaling, gamma, use_linear: bool, chunk: int, want_share: bool,
             log_decay: torch.Tensor | None = None):
    """Hybrid attention for rows whose first real token is at position 0.

    Grouped-query heads are never repeated: the G = H/Hkv query heads that share a kv head are stacked
    as G·C rows of one chunk, so every product with keys or values reads the Hkv heads as they are.
    """
    batch, num_kv_heads, length, value_dim = v.shape
    num_heads = (q if q is not None else fq).shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} kv heads evenly")
    groups = num_heads // num_kv_heads
    device = v.device
    acc = accumulation_dtype(v.dtype)
    num_chunks = math.ceil(length / chunk)
    padded_length = num_chunks * chunk
    lookback = math.ceil(window.chunk_lookback(chunk) / chunk) * chunk

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = x.to(acc)
        return x if padded_length == length else F.pad(x, (0, 0, 0, padded_length - length))

    def grouped_rows(x: torch.Tensor) -> torch.Tensor:
        """(B, H, n·C, X) -> (B, Hkv, n, G·C, X): a chunk's queries of every head that shares a kv head."""
        x = x.reshape(batch, num_kv_heads, groups, num_chunks, chunk, x.shape[-1]).transpose(2, 3)
        return x.reshape(batch, num_kv_heads, num_chunks, groups * chunk, -1)

    def per_head(x: torch.Tensor) -> torch.Tensor:
        """Inverse of grouped_rows."""
        x = x.reshape(batch, num_kv_heads, num_chunks, groups, chunk, x.shape[-1]).transpose(2, 3)
        return x.reshape(batch, num_heads, padded_length, -1)

    # Masks depend only on positions, so one (n, G·C, P + C) pattern serves every row and head. The zero
    # padding past `length` needs no mask: only padding queries, whose outputs are dropped, can see it.
    pos_q = torch.arange(padded_length, device=device).view(num_chunks, chunk, 1)
    pos_k = torch.arange(-lookback, padded_length, device=device).unfold(0, lookback + chunk, chunk)[:, None, :]
    causal = (pos_k >= 0) & (pos_k <= pos_q)
    in_window = causal & window.contains(pos_q, pos_k)
    local_linear = causal & ~in_window

    def for_groups(mask: torch.Tensor) -> torch.Tensor:
        return mask[:, None].expand(num_chunks, groups, chunk, mask.shape[-1]).reshape(num_chunks, groups * chunk, -1)

    local_values = _local_slices(prepare(v), lookback, chunk)  # (B, Hkv, n, P + C, Dv)
    sinks = min(window.sinks, length)
    num = den = linear_den = 0.0
    if window.kind != "none":
        # Scaling the queries and applying γ after the value product keeps the (n, G·C, P + C) tensors to
        # the few that the softmax itself needs.
        queries = grouped_rows(prepare(q) * scaling)
        keys, values, softmax_mask = _local_slices(prepare(k), lookback, chunk), local_values, in_window
        if sinks:
            # The sinks that precede a chunk's slice (those inside it are already in `in_window`): the same
            # N key columns for every chunk, masked where the slice holds them or they are not yet causal.
            pos_sink = torch.arange(sinks, device=device)
            slice_start = pos_q[:, :1, :1] - lookback
            sink_mask = (pos_sink <= pos_q) & (pos_sink < slice_start)  # (n, C, N)
            def every_chunk(x: torch.Tensor) -> torch.Tensor:
                return x[:, :, None, :sinks].expand(batch, num_kv_heads, num_chunks, sinks, x.shape[-1])
            keys = torch.cat([keys, every_chunk(prepare(k))], dim=-2)
            values = torch.cat([values, every_chunk(prepare(v))], dim=-2)
            softmax_mask = torch.cat([in_window, sink_mask], dim=-1)
        softmax_weights = softmax_terms(queries @ keys.transpose(-1, -2), for_groups(softmax_mask))
        gamma_rows = gamma_per_head(gamma, num_heads, device, acc).view(num_kv_heads, 1, groups, 1)
        gamma_rows = gamma_rows.expand(num_kv_heads, 1, groups, chunk).reshape(num_kv_heads, 1, groups * chunk)
        num = gamma_rows[..., None] * (softmax_weights @ values)
        den = gamma_rows * softmax_weights.sum(-1)
    if use_linear:
        feature_q = prepare(fq).view(batch, num_heads, num_chunks, chunk, -1)
        feature_k = prepare(fk)
        if sinks:
            is_sink = torch.arange(padded_length, device=device) < sinks
            feature_k = feature_k.masked_fill(is_sink[:, None], 0.0)
        cumulative = None
        if log_decay is not None:
            # A_t = Σ_{u ≤ t} a_u in float64; every decay below is exp of a difference A_i − A_j ≤ 0.
            cumulative = F.pad(log_decay.double(), (0, padded_length - length)).cumsum(-1)  # (B, H, n·C)
        if bool(local_linear.any()):
            local_feature_k = _local_slices(feature_k, lookback, chunk)
            products = feature_q @ local_feature_k.transpose(-1, -2)
            if cumulative is not None:
                query_cumulative = cumulative.view(batch, num_heads, num_chunks, chunk, 1)
                key_cumulative = _local_slices(cumulative[..., None], lookback, chunk).transpose(-1, -2)
                products = products * torch.exp((query_cumulative - key_cumulative).clamp(max=0)).to(acc)
            linear_weights = products.masked_fill(~local_linear, 0.0)
            linear_weights = grouped_rows(linear_weights.flatten(2, 3))
            num = num + linear_weights @ local_values
            linear_den = linear_weights.sum(-1)

        feature_dim = feature_k.shape[-1]
        chunk_k = feature_k.view(batch, num_kv_heads, groups, num_chunks, chunk, feature_dim)
        chunk_v = prepare(v).view(batch, num_kv_heads, num_chunks, chunk, value_dim)
        # Chunk c may use the keys of chunks < c − P/C: those are older than its local slice.
        lag = lookback // chunk + 1
        if lag < num_chunks:
            seen = num_chunks - lag
            later_q = feature_q[:, :, lag:]
            if cumulative is None:
                prefix_sum = _prefix_sum
            else:
                # Each chunk's keys decayed to the chunk's end; the running state decays from chunk end to chunk end;
                # a query reads the state of chunk c − lag decayed from that chunk's end to itself.
                per_chunk = cumulative.view(batch, num_heads, num_chunks, chunk)
                ends = per_chunk[..., -1]  # (B, H, n)
                to_end = torch.exp(ends[..., None] - per_chunk).to(acc)  # (B, H, n, C)
                chunk_k = chunk_k * to_end.view(batch, num_kv_heads, groups, num_chunks, chunk, 1)
                steps = torch.diff(ends, dim=-1, prepend=torch.zeros_like(ends[..., :1]))

                def prefix_sum(x: torch.Tensor) -> torch.Tensor:
                    return _decayed_prefix_sum(x, steps)

                since = (per_chunk[:, :, lag:] - ends[:, :, :seen, None]).clamp(max=0)
                later_q = later_q * torch.exp(since).to(acc)[..., None]
            per_chunk_state = torch.einsum("bkgncf,bkncd->bkgnfd", chunk_k, chunk_v)
            state = prefix_sum(per_chunk_state.reshape(batch, num_heads, num_chunks, -1)).view(
                batch, num_heads, num_chunks, feature_dim, value_dim
            )  # (B, H, n, F, Dv)
            norm = prefix_sum(chunk_k.sum(4).reshape(batch, num_heads, num_chunks, feature_dim))  # (B, H, n, F)
            inter_num = later_q @ state[:, :, :seen]
            inter_den = (later_q @ norm[:, :, :seen, :, None])
            num = num + grouped_rows(F.pad(inter_num, (0, 0, 0, 0, lag, 0)).flatten(2, 3))
            linear_den = linear_den + grouped_rows(F.pad(inter_den, (0, 0, 0, 0, lag, 0)).flatten(2, 3))[..., 0]
        den = den + linear_den

    out = per_head(normalise(num, den))[:, :, :length]
    share = None
    if want_share:
        total = torch.as_tensor(den)
        share = torch.zeros(batch, num_heads, length, device=device, dtype=acc)
        if use_linear and torch.is_tensor(linear_den):
            ratio = linear_den / torch.where(total > 0, total, torch.ones_like(total))
            share = per_head(ratio[..., None])[:, :, :length, 0]
    return out, share


def linear_attention_chunked(fq, fk, v, *, start=None, chunk_size: int = 64) -> torch.Tensor:
    """Causal linear attention, chunked: intra-chunk masked products plus a running state."""
    return hybrid_attention_chunked(
        None, None, v, fq, fk, window=Window("none"), start=start, chunk_size=chunk_size
    )
