"""The three implementations of hybrid attention (quadratic reference, chunked, recurrent) against the
independent per-query oracle of tests/oracle.py, which shares no code with lolcats.

test_ops.py holds the fast paths to the quadratic reference; the reference itself, and everything the paths
share (window membership, max-subtraction, normalisation, padding offsets, GQA head mapping), is only held
to the definition here.
"""

import pytest
import torch
from oracle import (
    hybrid_attention_oracle,
    in_window,
    linear_attention_oracle,
    recall_cache_oracle,
    softmax_attention_oracle,
)

from lolcats.runtime.ops import (
    Window,
    hybrid_attention_chunked,
    hybrid_attention_recurrent,
    hybrid_attention_reference,
    hybrid_attention_step,
    hybrid_attention_weights,
    linear_attention_chunked,
    linear_attention_recurrent,
    linear_attention_reference,
    recurrent_state_from_prefix,
    softmax_attention,
)
from lolcats.runtime.ops_recall import RecallCache, hybrid_attention_recall, select_recall

RTOL = 1e-5  # fp32 paths against the fp64 oracle, relative to the largest output
FP64_RTOL = 1e-10  # the reference and chunked paths accumulate in fp64 for fp64 inputs
HEAD_DIM, FEATURE_DIM, HEADS = 8, 6, 4


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


def make_inputs(batch, kv_heads, length, seed, large=False, dtype=torch.float32):
    """q, k, v, φ(q), φ(k) and a per-head γ far from 1.

    ``large``: integer-valued q and k (exact in fp32, as are their dot products), so that with scaling 0.5 the
    scores reach ±50…100 without any rounding: a missing or misplaced max-subtraction overflows or reweights.
    """
    generator = torch.Generator().manual_seed(seed)
    if large:
        q = torch.randint(-5, 6, (batch, HEADS, length, HEAD_DIM), generator=generator).float()
        k = torch.randint(-5, 6, (batch, kv_heads, length, HEAD_DIM), generator=generator).float()
    else:
        q = torch.randn(batch, HEADS, length, HEAD_DIM, generator=generator)
        k = torch.randn(batch, kv_heads, length, HEAD_DIM, generator=generator)
    v = torch.randn(batch, kv_heads, length, HEAD_DIM, generator=generator)
    fq = torch.softmax(2 * torch.randn(batch, HEADS, length, FEATURE_DIM, generator=generator), dim=-1)
    fk = torch.softmax(2 * torch.randn(batch, HEADS, length, FEATURE_DIM, generator=generator), dim=-1)
    gamma = torch.tensor([0.9, 0.05, 0.5, 0.2])
    return [x.to(dtype) for x in (q, k, v, fq, fk)] + [gamma]


def starts_for(batch, length):
    """Row 0 unpadded, row 1 left-padded, row 2 (when there is one) all padding but for its last token."""
    return torch.tensor([0, min(5, length - 1), length - 1][:batch])


def window_of(kind, size, sinks=0):
    return Window(kind, size, sinks) if kind != "none" else Window("none")


def assert_all_modes_match_oracle(q, k, v, fq, fk, gamma, *, kind, size, scaling, use_linear, start, chunk_size,
                                  rtol=RTOL, sinks=0):
    expected = hybrid_attention_oracle(q, k, v, fq, fk, kind=kind, size=size, scaling=scaling, gamma=gamma,
                                       use_linear=use_linear, start=start, sinks=sinks)
    assert torch.isfinite(expected).all()
    kwargs = dict(window=window_of(kind, size, sinks), scaling=scaling, gamma=gamma, use_linear=use_linear,
                  start=start)
    if not use_linear:
        fq = fk = None
    outputs = {
        "reference": hybrid_attention_reference(q, k, v, fq, fk, **kwargs),
        "chunked": hybrid_attention_chunked(q, k, v, fq, fk, chunk_size=chunk_size, **kwargs),
        "recurrent": hybrid_attention_recurrent(q, k, v, fq, fk, **kwargs),
    }
    for name, out in outputs.items():
        error = max_relative_error(out, expected)
        assert error <= rtol, f"{name}: relative error {error:.2e}"
    return expected


# (kind, size, length, chunk_size): windows that do and do not divide the length, lengths below the window,
# and lengths that cross many chunks, with chunk sizes equal to, smaller than, larger than and coprime to the window.
SHAPES = [
    ("sliding", 1, 13, 4),
    ("sliding", 3, 29, 4),
    ("sliding", 5, 37, 3),
    ("sliding", 8, 6, 4),  # length < window
    ("sliding", 8, 33, 8),
    ("terrace", 1, 13, 1),
    ("terrace", 3, 29, 5),
    ("terrace", 4, 37, 4),
    ("terrace", 5, 31, 7),
    ("terrace", 8, 5, 8),  # length < window
    ("terrace", 8, 40, 16),
    ("none", 0, 29, 4),
    ("none", 0, 37, 16),
]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("kind,size,length,chunk_size", SHAPES)
def test_hybrid_attention_matches_oracle(kind, size, length, chunk_size, kv_heads):
    q, k, v, fq, fk, gamma = make_inputs(3, kv_heads, length, seed=length * 10 + kv_heads)
    assert_all_modes_match_oracle(q, k, v, fq, fk, gamma, kind=kind, size=size, scaling=HEAD_DIM**-0.5,
                                  use_linear=True, start=starts_for(3, length), chunk_size=chunk_size)


@pytest.mark.parametrize("kind,size,length,chunk_size", [s for s in SHAPES if s[0] != "none"])
def test_softmax_window_without_linear_term_matches_oracle(kind, size, length, chunk_size):
    q, k, v, fq, fk, gamma = make_inputs(2, 2, length, seed=length)
    assert_all_modes_match_oracle(q, k, v, fq, fk, gamma, kind=kind, size=size, scaling=0.4, use_linear=False,
                                  start=starts_for(2, length), chunk_size=chunk_size)


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("kind,size,use_linear", [
    ("sliding", 4, True), ("terrace", 4, True), ("terrace", 3, True), ("none", 0, True),
    ("sliding", 4, False), ("terrace", 4, False), ("terrace", 3, False),
])
def test_large_scores_match_oracle(kind, size, use_linear, kv_heads):
    """Scores of ±50…100 (exact in fp32): the window's max must be subtracted, and only the window's."""
    q, k, v, fq, fk, gamma = make_inputs(2, kv_heads, 27, seed=7 + kv_heads, large=True)
    scores = 0.5 * q @ k.repeat_interleave(HEADS // kv_heads, dim=1).transpose(-1, -2)
    assert scores.abs().max() > 50
    expected = assert_all_modes_match_oracle(q, k, v, fq, fk, gamma, kind=kind, size=size, scaling=0.5,
                                             use_linear=use_linear, start=starts_for(2, 27), chunk_size=4)
    if use_linear and kind != "none":
        # The case discriminates: the linear term carries real weight next to the softmax window.
        window_only = hybrid_attention_oracle(q, k, v, fq, fk, kind=kind, size=size, scaling=0.5, gamma=gamma,
                                              use_linear=False, start=starts_for(2, 27))
        assert max_relative_error(window_only, expected) > 1e-2


@pytest.mark.parametrize("kind,size", [("sliding", 5), ("terrace", 4), ("none", 0)])
def test_fp64_reference_and_chunked_equal_oracle_to_rounding(kind, size):
    """In fp64 the reference and chunked paths accumulate in fp64: any difference left is a semantic one."""
    q, k, v, fq, fk, gamma = make_inputs(3, 2, 26, seed=3, dtype=torch.float64)
    gamma = gamma.double()
    start = starts_for(3, 26)
    kwargs = dict(window=window_of(kind, size), scaling=0.3, gamma=gamma, start=start)
    expected = hybrid_attention_oracle(q, k, v, fq, fk, kind=kind, size=size, scaling=0.3, gamma=gamma, start=start)
    assert max_relative_error(hybrid_attention_reference(q, k, v, fq, fk, **kwargs), expected) <= FP64_RTOL
    for chunk_size in (3, 4, 8):
        chunked = hybrid_attention_chunked(q, k, v, fq, fk, chunk_size=chunk_size, **kwargs)
        assert max_relative_error(chunked, expected) <= FP64_RTOL, chunk_size


@pytest.mark.parametrize("kind,size", [("sliding", 5), ("terrace", 4), ("none", 0)])
def test_attention_weights_match_oracle(kind, size):
    """hybrid_attention_weights (attention cross-entropy, linear-share diagnostics): their products with v give
    the oracle's output, and they sum to 1 over the keys of every real query."""
    q, k, v, fq, fk, gamma = make_inputs(2, 2, 23, seed=4)
    start = starts_for(2, 23)
    softmax_part, linear_part = hybrid_attention_weights(q, k, fq, fk, window=window_of(kind, size), scaling=0.3,
                                                         gamma=gamma, start=start)
    out = (softmax_part + linear_part) @ v.repeat_interleave(2, dim=1)
    expected = hybrid_attention_oracle(q, k, v, fq, fk, kind=kind, size=size, scaling=0.3, gamma=gamma, start=start)
    assert max_relative_error(out, expected) <= RTOL
    real = torch.arange(23)[None, :] >= start[:, None]
    totals = (softmax_part + linear_part).sum(-1)
    torch.testing.assert_close(totals, real[:, None].expand_as(totals).float())


def test_linear_attention_matches_oracle():
    _, _, v, fq, fk, _ = make_inputs(3, 4, 30, seed=5)
    start = starts_for(3, 30)
    expected = linear_attention_oracle(fq, fk, v, start=start)
    assert max_relative_error(linear_attention_reference(fq, fk, v, start=start), expected) <= RTOL
    assert max_relative_error(linear_attention_chunked(fq, fk, v, start=start, chunk_size=4), expected) <= RTOL
    assert max_relative_error(linear_attention_recurrent(fq, fk, v, start=start), expected) <= RTOL


@pytest.mark.parametrize("kind,size", [("none", 0), ("terrace", 3)])
def test_vanishing_relu_features_match_oracle(kind, size):
    """relu features that are all zero for some queries: those attend to nothing in the linear term (output 0
    without a window), and the window alone otherwise."""
    q, k, v, _, _, gamma = make_inputs(2, 2, 21, seed=6)
    generator = torch.Generator().manual_seed(6)
    fq = torch.relu(torch.randn(2, HEADS, 21, 3, generator=generator) - 0.5)
    fk = torch.relu(torch.randn(2, HEADS, 21, 3, generator=generator) - 0.5)
    assert (fq.sum(-1) == 0).any()
    assert_all_modes_match_oracle(q, k, v, fq, fk, gamma, kind=kind, size=size, scaling=0.3, use_linear=True,
                                  start=starts_for(2, 21), chunk_size=4)


def test_all_padding_row_is_zero():
    q, k, v, fq, fk, gamma = make_inputs(2, 2, 12, seed=8)
    start = torch.tensor([3, 12])  # row 1 has no real token
    expected = assert_all_modes_match_oracle(q, k, v, fq, fk, gamma, kind="terrace", size=4, scaling=0.3,
                                             use_linear=True, start=start, chunk_size=4)
    assert expected[1].abs().max() == 0


def phi_of(heads, seed):
    """φ as a function of q (B, H, ·, D) or of grouped keys (B, Hkv, ·, D), per query head: what decode calls."""
    weight = torch.randn(HEAD_DIM, FEATURE_DIM, generator=torch.Generator().manual_seed(seed))

    def phi(x):
        x = x.repeat_interleave(heads // x.shape[1], dim=1)  # query head h reads kv head h // (H / Hkv)
        return torch.softmax(x.float() @ weight, dim=-1)

    return phi


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("kind,size,large,sinks", [
    ("sliding", 3, False, 0), ("sliding", 8, True, 0), ("terrace", 3, False, 0), ("terrace", 4, True, 0),
    ("none", 0, False, 0), ("sliding", 3, True, 2), ("terrace", 3, True, 4), ("terrace", 4, False, 1),
])
@pytest.mark.parametrize("prompt", [1, 3, 7, 12])
def test_prefill_then_steps_match_oracle(kind, size, large, sinks, prompt, kv_heads):
    """recurrent_state_from_prefix over a prompt, then hybrid_attention_step token by token (the decode path,
    φ of keys computed as they leave the window) gives the oracle's outputs at every later position; with sinks,
    the prefix state holds each row's first tokens (rows padded differently) and the steps read them."""
    length = 26
    q, k, v, _, _, gamma = make_inputs(3, kv_heads, length, seed=prompt + kv_heads, large=large)
    phi = phi_of(HEADS, seed=prompt)
    fq, fk = phi(q), phi(k)
    start = torch.tensor([0, min(2, prompt - 1), prompt])  # the last row's first real token comes after the prompt
    window = window_of(kind, size, sinks)
    expected = hybrid_attention_oracle(q, k, v, fq, fk, kind=kind, size=size, scaling=0.5, gamma=gamma, start=start,
                                       sinks=sinks)
    cache = recurrent_state_from_prefix(k[:, :, :prompt], v[:, :, :prompt], fk[:, :, :prompt], window=window,
                                        num_heads=HEADS, start=start.clamp(max=prompt))
    steps = [hybrid_attention_step(cache, q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], t >= start,
                                   window=window, scaling=0.5, gamma=gamma, key_features=phi)
             for t in range(prompt, length)]
    assert max_relative_error(torch.stack(steps, dim=2), expected[:, :, prompt:]) <= RTOL
    if sinks:
        assert cache.sink_keys.shape[2] == sinks  # constant in the context


@pytest.mark.parametrize("sliding_window", [None, 1, 6, 17])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_softmax_attention_matches_oracle(sliding_window, kv_heads):
    """The teacher (exact causal softmax, optionally over the last ``sliding_window`` tokens), padded rows included."""
    q, k, v, *_ = make_inputs(3, kv_heads, 30, seed=9 + kv_heads)
    start = starts_for(3, 30)
    got = softmax_attention(q, k, v, scaling=0.4, sliding_window=sliding_window, start=start)
    expected = softmax_attention_oracle(q, k, v, scaling=0.4, sliding_window=sliding_window, start=start)
    assert max_relative_error(got, expected) <= RTOL


def test_oracle_window_membership():
    """The oracle's own windows, spelled out: a sliding window of 3 and a terrace of 4 blocks."""
    sliding = [[int(in_window("sliding", 3, p, r)) for r in range(p + 1)] for p in range(6)]
    assert sliding == [[1], [1, 1], [1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    terrace = [sum(in_window("terrace", 4, p, r) for r in range(p + 1)) for p in range(16)]
    assert terrace == [1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8]
    assert [r for r in range(10) if in_window("terrace", 4, 9, r)] == [4, 5, 6, 7, 8, 9]


# (kind, size, sinks, length, chunk_size): sinks fewer than, as many as and more than a block or a chunk, chunks
# that hold the sinks in their slice and chunks far past them, and sequences shorter than the sinks.
SINK_SHAPES = [
    ("sliding", 3, 1, 29, 4),
    ("sliding", 4, 4, 37, 3),
    ("sliding", 2, 6, 31, 4),  # more sinks than the window
    ("terrace", 3, 2, 29, 5),
    ("terrace", 4, 4, 37, 4),
    ("terrace", 2, 5, 33, 3),
    ("terrace", 8, 4, 40, 16),
    ("sliding", 3, 9, 7, 4),  # shorter than the sinks
]


@pytest.mark.parametrize("use_linear", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("kind,size,sinks,length,chunk_size", SINK_SHAPES)
def test_sinks_match_oracle(kind, size, sinks, length, chunk_size, kv_heads, use_linear):
    """Attention sinks in all three paths: the first N real tokens of each row are softmax terms for every
    query (padded rows count from their first real token) and never enter the linear term."""
    q, k, v, fq, fk, gamma = make_inputs(3, kv_heads, length, seed=length + sinks + kv_heads)
    start = starts_for(3, length)
    expected = assert_all_modes_match_oracle(q, k, v, fq, fk, gamma, kind=kind, size=size, scaling=HEAD_DIM**-0.5,
                                             use_linear=use_linear, start=start, chunk_size=chunk_size, sinks=sinks)
    if length > sinks + 2 * size:
        # the case discriminates: without sinks the output differs
        without = hybrid_attention_oracle(q, k, v, fq, fk, kind=kind, size=size, scaling=HEAD_DIM**-0.5, gamma=gamma,
                                          use_linear=use_linear, start=start)
        assert max_relative_error(without, expected) > 1e-3


def test_oracle_sink_membership():
    """Sinks join the window of every query; without a window there are none."""
    assert [r for r in range(10) if in_window("sliding", 2, 9, r, sinks=3)] == [0, 1, 2, 8, 9]
    assert [r for r in range(10) if in_window("terrace", 4, 9, r, sinks=1)] == [0, 4, 5, 6, 7, 8, 9]
    assert not in_window("none", 0, 9, 0, sinks=3)



@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("kind,size,sinks,length,chunk_size", [
    ("sliding", 3, 0, 29, 4), ("sliding", 5, 1, 40, 3), ("terrace", 4, 2, 37, 4), ("terrace", 3, 0, 40, 5),
    ("terrace", 8, 0, 40, 16), ("none", 0, 0, 37, 4),
])
@pytest.mark.parametrize("strength", [1e-3, 0.5])
def test_decay_gate_matches_oracle(kind, size, sinks, length, chunk_size, kv_heads, strength):
    """A decay gate on the linear term (every linear weight times Π g_t between key and query) in all three paths,
    padded rows counting from their first real token; at strength 0.5 it changes the output, as it must."""
    q, k, v, fq, fk, gamma = make_inputs(3, kv_heads, length, seed=length + kv_heads)
    log_decay = -strength * torch.rand(3, HEADS, length, generator=torch.Generator().manual_seed(length))
    start = starts_for(3, length)
    settings = dict(kind=kind, size=size, scaling=HEAD_DIM**-0.5, gamma=gamma, start=start, sinks=sinks)
    expected = hybrid_attention_oracle(q, k, v, fq, fk, log_decay=log_decay, **settings)
    window = window_of(kind, size, sinks)
    paths = {
        "reference": hybrid_attention_reference(q, k, v, fq, fk, window=window, scaling=HEAD_DIM**-0.5, gamma=gamma,
                                                start=start, log_decay=log_decay),
        "chunked": hybrid_attention_chunked(q, k, v, fq, fk, window=window, scaling=HEAD_DIM**-0.5, gamma=gamma,
                                            start=start, log_decay=log_decay, chunk_size=chunk_size),
        "recurrent": hybrid_attention_recurrent(q, k, v, fq, fk, window=window, scaling=HEAD_DIM**-0.5, gamma=gamma,
                                                start=start, log_decay=log_decay),
    }
    for name, out in paths.items():
        assert max_relative_error(out, expected) <= RTOL, name
    if strength == 0.5:
        assert max_relative_error(hybrid_attention_oracle(q, k, v, fq, fk, **settings), expected) > 1e-2


@pytest.mark.parametrize("kind,size,sinks", [("sliding", 3, 0), ("terrace", 4, 2), ("none", 0, 0)])
@pytest.mark.parametrize("prompt", [1, 7, 12])
def test_decay_gate_prefill_then_steps_match_oracle(kind, size, sinks, prompt):
    """Decode with a decay gate: the prefix state carries each key's decay to the prompt's end (ring slots too),
    each step decays the state and folds leaving keys with what they have accumulated."""
    length = 26
    q, k, v, _, _, gamma = make_inputs(3, 2, length, seed=prompt)
    phi = phi_of(HEADS, seed=prompt)
    fq, fk = phi(q), phi(k)
    log_decay = -0.4 * torch.rand(3, HEADS, length, generator=torch.Generator().manual_seed(prompt))
    start = torch.tensor([0, min(2, prompt - 1), prompt])
    window = window_of(kind, size, sinks)
    expected = hybrid_attention_oracle(q, k, v, fq, fk, kind=kind, size=size, scaling=0.5, gamma=gamma, start=start,
                                       sinks=sinks, log_decay=log_decay)
    cache = recurrent_state_from_prefix(k[:, :, :prompt], v[:, :, :prompt], fk[:, :, :prompt], window=window,
                                        num_heads=HEADS, start=start.clamp(max=prompt), log_decay=log_decay[:, :, :prompt])
    steps = [hybrid_attention_step(cache, q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], t >= start,
                                   window=window, scaling=0.5, gamma=gamma, key_features=phi,
                                   log_decay=log_decay[:, :, t])
             for t in range(prompt, length)]
    assert max_relative_error(torch.stack(steps, dim=2), expected[:, :, prompt:]) <= RTOL


# (size, sinks, recall, length): caches smaller and larger than a block, with sinks, across many block starts.
RECALL_SHAPES = [(4, 0, 3, 37), (3, 1, 2, 40), (4, 2, 5, 29), (5, 0, 8, 31), (2, 0, 1, 23)]


def with_copies(v: torch.Tensor, period: int = 5) -> torch.Tensor:
    """``v`` whose every position from ``period`` on repeats an earlier value, rescaled (cosine 1, its own error)."""
    scale = 1 + 0.1 * torch.arange(v.shape[2], dtype=v.dtype)
    return v[:, :, torch.arange(v.shape[2]) % period] * scale[:, None]


@pytest.mark.parametrize("copies", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("size,sinks,recall,length", RECALL_SHAPES)
def test_recall_cache_matches_oracle(size, sinks, recall, length, kv_heads, gated, copies):
    """The sparse recall cache, block by block (full forward and prefill) and token by token (decode), against the
    oracle's one-query-at-a-time definition, left-padded rows included, with and without a decay gate, with values
    that repeat (near-duplicates ranked last) or not; it changes the output, as it must."""
    q, k, v, fq, fk, gamma = make_inputs(3, kv_heads, length, seed=length + recall + kv_heads)
    if copies:
        v = with_copies(v)
    start = starts_for(3, length)
    window = Window("terrace", size, sinks)
    log_decay = -0.3 * torch.rand(3, HEADS, length, generator=torch.Generator().manual_seed(length)) if gated else None
    expected = recall_cache_oracle(q, k, v, fq, fk, size=size, recall=recall, scaling=0.35, gamma=gamma, start=start,
                                   sinks=sinks, log_decay=log_decay)
    settings = dict(window=window, scaling=0.35, gamma=gamma, start=start, recall=recall, log_decay=log_decay)
    assert max_relative_error(hybrid_attention_recall(q, k, v, fq, fk, **settings), expected) <= RTOL
    assert max_relative_error(hybrid_attention_recurrent(q, k, v, fq, fk, **settings), expected) <= RTOL
    without = hybrid_attention_oracle(q, k, v, fq, fk, kind="terrace", size=size, scaling=0.35, gamma=gamma,
                                      start=start, sinks=sinks, log_decay=log_decay)
    assert max_relative_error(without, expected) > 1e-2
    if gated:  # the gate reaches the cached keys' terms once they are folded, and the choice itself
        ungated = recall_cache_oracle(q, k, v, fq, fk, size=size, recall=recall, scaling=0.35, gamma=gamma,
                                      start=start, sinks=sinks)
        assert max_relative_error(ungated, expected) > 1e-2


def test_recall_cache_keeps_a_distinct_key_over_copies_of_a_worse_recalled_one():
    """Five copies of a value the state recalls badly and one distinct value it recalls less badly, two slots: LoLA's
    rule (largest error first) would cache two copies; one copy and the distinct key are cached."""
    batch, heads, dim, features = 1, 1, 4, 3
    state = torch.zeros(batch, heads, features, dim)
    state[..., 0] = -10.0 * 50  # fifty keys of value −10·e1 already in the state, φ uniform
    norm = torch.full((batch, heads, features), 50.0)
    cache = RecallCache.empty(batch, heads, 2, dim, dim, features)
    copy, distinct = torch.tensor([10.0, 0, 0, 0]), torch.tensor([0, 3.0, 0, 0])
    values = torch.stack([copy * (1 + 0.01 * n) for n in range(5)] + [distinct])[None, None]
    keys = torch.randn(1, 1, 6, dim, generator=torch.Generator().manual_seed(0))
    uniform = torch.ones(1, 1, 6, features)
    positions = torch.arange(10, 16)[None, None]
    _, _, kept = select_recall(state, norm, cache, keys, values, uniform, positions)
    assert set(kept.positions.flatten().tolist()) == {14, 15}  # the largest copy and the distinct value
    with_state = state + uniform.transpose(-1, -2) @ values
    errors = (values - (uniform @ with_state) / (uniform * (norm + uniform.sum(2))[:, :, None]).sum(-1, keepdim=True))
    assert errors.pow(2).sum(-1)[0, 0, :5].min() > errors.pow(2).sum(-1)[0, 0, 5]  # every copy is worse recalled


def test_recall_cache_with_a_gate_that_forgets_nothing_is_the_ungated_cache():
    """A gate at init (a_t = 0, decay 1) leaves the recall cache exactly as without a gate, in the block-by-block
    and recurrent paths; and the gated oracle with no cache is the gated hybrid oracle."""
    q, k, v, fq, fk, gamma = make_inputs(2, 2, 30, seed=11)
    start = starts_for(2, 30)
    settings = dict(window=Window("terrace", 3, 1), recall=2, gamma=gamma, start=start)
    still = torch.zeros(2, HEADS, 30)
    for attend in (hybrid_attention_recall, hybrid_attention_recurrent):
        assert torch.equal(attend(q, k, v, fq, fk, **settings, log_decay=still), attend(q, k, v, fq, fk, **settings))
    log_decay = -0.5 * torch.rand(2, HEADS, 30, generator=torch.Generator().manual_seed(4))
    zero = recall_cache_oracle(q, k, v, fq, fk, size=3, recall=0, gamma=gamma, start=start, sinks=1,
                               log_decay=log_decay)
    plain = hybrid_attention_oracle(q, k, v, fq, fk, kind="terrace", size=3, gamma=gamma, start=start, sinks=1,
                                    log_decay=log_decay)
    assert max_relative_error(zero, plain) <= 1e-12


def test_recall_cache_of_zero_is_the_hybrid_oracle():
    q, k, v, fq, fk, gamma = make_inputs(2, 2, 30, seed=3)
    start = starts_for(2, 30)
    got = recall_cache_oracle(q, k, v, fq, fk, size=4, recall=0, gamma=gamma, start=start, sinks=1)
    expected = hybrid_attention_oracle(q, k, v, fq, fk, kind="terrace", size=4, gamma=gamma, start=start, sinks=1)
    assert max_relative_error(got, expected) <= 1e-12  # (float64; the sums run in another order)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("size,sinks,recall,length", RECALL_SHAPES[:3])
@pytest.mark.parametrize("prompt", [1, 9, 13])
def test_recall_cache_prefill_then_steps_match_oracle(size, sinks, recall, length, prompt, gated):
    """Prefill (the block-by-block pass hands its state, cache and linear sums to the decode state), then steps that
    re-select at each row's block starts (φ of the leaving block from the ring): the oracle at every later position,
    with a decay gate too (the prefix hands on each cached key's decay so far)."""
    q, k, v, _, _, gamma = make_inputs(3, 2, length, seed=prompt + recall, large=True)
    phi = phi_of(HEADS, seed=prompt)
    fq, fk = phi(q), phi(k)
    start = starts_for(3, length)
    window = Window("terrace", size, sinks)
    log_decay = -0.4 * torch.rand(3, HEADS, length, generator=torch.Generator().manual_seed(prompt)) if gated else None
    expected = recall_cache_oracle(q, k, v, fq, fk, size=size, recall=recall, scaling=0.5, gamma=gamma, start=start,
                                   sinks=sinks, log_decay=log_decay)
    head = start.clamp(max=prompt)
    prefix_decay = None if log_decay is None else log_decay[:, :, :prompt]
    _, state, norm, cache = hybrid_attention_recall(
        q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], fq[:, :, :prompt], fk[:, :, :prompt], window=window,
        recall=recall, scaling=0.5, gamma=gamma, start=head, return_state=True, log_decay=prefix_decay)
    decode = recurrent_state_from_prefix(k[:, :, :prompt], v[:, :, :prompt], fk[:, :, :prompt], window=window,
                                         num_heads=HEADS, start=head, recall_state=(state, norm, cache),
                                         log_decay=prefix_decay)
    steps = [hybrid_attention_step(decode, q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], t >= start,
                                   window=window, scaling=0.5, gamma=gamma, key_features=phi,
                                   log_decay=None if log_decay is None else log_decay[:, :, t])
             for t in range(prompt, length)]
    assert max_relative_error(torch.stack(steps, dim=2), expected[:, :, prompt:]) <= RTOL
    assert decode.recall_keys.shape[2] == recall  # constant in the context
