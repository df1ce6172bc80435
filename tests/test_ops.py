"""Every fast path of lolcats.runtime.ops against its quadratic reference."""

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lolcats.runtime.ops import (
    RecurrentState,
    Window,
    expand_heads,
    hybrid_attention_chunked,
    hybrid_attention_recurrent,
    hybrid_attention_reference,
    hybrid_attention_step,
    linear_attention_chunked,
    linear_attention_recurrent,
    linear_attention_reference,
    recurrent_state_from_prefix,
    softmax_attention,
)

RTOL = 1e-5
# The recurrent (decode) tests run on LOLCATS_TEST_DEVICE with q/k/v in LOLCATS_TEST_DTYPE (default: cpu,
# float32; benchmarks/gpu_check.sh sets cuda, bfloat16). Their references are computed in fp32 on the CPU
# from the same rounded inputs, so in bf16 only the output rounding and accumulation order differ: 2**-7.
TEST_DEVICE = torch.device(os.environ.get("LOLCATS_TEST_DEVICE", "cpu"))
TEST_DTYPE = getattr(torch, os.environ.get("LOLCATS_TEST_DTYPE", "float32"))
STEP_RTOL = RTOL if TEST_DTYPE == torch.float32 else 2**-7


def rounded(*tensors):
    """Inputs as the test dtype would hold them, in fp32 on the CPU (for references)."""
    return [t.to(TEST_DTYPE).float() for t in tensors]


def on_test_device(*tensors, dtype=None):
    return [t.to(TEST_DEVICE, dtype or TEST_DTYPE) for t in tensors]


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


def make_inputs(batch, heads, kv_heads, length, head_dim, feature_dim, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    q = randn(batch, heads, length, head_dim)
    k = randn(batch, kv_heads, length, head_dim)
    v = randn(batch, kv_heads, length, head_dim)
    # Positive features with a spread of magnitudes, like softmax/hedgehog features.
    fq = torch.softmax(randn(batch, heads, length, feature_dim), dim=-1)
    fk = torch.softmax(randn(batch, heads, length, feature_dim), dim=-1)
    gamma = torch.rand(heads, generator=generator) * 0.9 + 0.05
    return q, k, v, fq, fk, gamma


def feature_function(heads, head_dim, feature_dim, seed=0):
    """φ as a function of q or k (per query head), for decode steps that compute φ of keys leaving the window."""
    weight = torch.randn(head_dim, feature_dim, generator=torch.Generator().manual_seed(seed))

    def phi(x):
        return torch.softmax(expand_heads(x, heads).float() @ weight.to(x.device), dim=-1)

    return phi


def real_rows(out: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Zero the padding rows so comparisons only see real queries (all modes give 0 there anyway)."""
    length = out.shape[2]
    real = torch.arange(length)[None, :] >= start[:, None]
    return out * real[:, None, :, None]


window_strategy = st.one_of(
    st.builds(Window, st.just("terrace"), st.integers(1, 9), st.integers(0, 6)),
    st.builds(Window, st.just("sliding"), st.integers(1, 17), st.integers(0, 6)),
    st.just(Window("none")),
)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    groups=st.integers(1, 3),
    length=st.integers(1, 70),
    head_dim=st.sampled_from([4, 8]),
    feature_dim=st.integers(1, 12),
    window=window_strategy,
    use_linear=st.booleans(),
    chunk_size=st.integers(1, 33),
    data=st.data(),
)
def test_hybrid_modes_agree(batch, kv_heads, groups, length, head_dim, feature_dim, window, use_linear, chunk_size, data):
    if window.kind == "none":
        use_linear = True
    heads = kv_heads * groups
    seed = data.draw(st.integers(0, 2**16))
    q, k, v, fq, fk, gamma = make_inputs(batch, heads, kv_heads, length, head_dim, feature_dim, seed)
    start = torch.tensor(data.draw(st.lists(st.integers(0, length - 1), min_size=batch, max_size=batch)))
    kwargs = dict(window=window, scaling=head_dim**-0.5, gamma=gamma, use_linear=use_linear, start=start)
    if use_linear and data.draw(st.booleans()):  # a decay gate, from barely forgetting to forgetting fast
        strength = data.draw(st.sampled_from([1e-3, 0.1, 2.0]))
        kwargs["log_decay"] = -strength * torch.rand(batch, heads, length, generator=torch.Generator().manual_seed(seed))

    expected = real_rows(hybrid_attention_reference(q, k, v, fq, fk, **kwargs), start)
    chunked = real_rows(hybrid_attention_chunked(q, k, v, fq, fk, chunk_size=chunk_size, **kwargs), start)
    recurrent = real_rows(hybrid_attention_recurrent(q, k, v, fq, fk, **kwargs), start)
    assert max_relative_error(chunked, expected) <= RTOL
    assert max_relative_error(recurrent, expected) <= RTOL


@pytest.mark.parametrize("length", [1, 63, 64, 65, 127, 128, 129, 200, 300])
def test_default_terrace_window_across_block_boundaries(length):
    """The LoLCATs default (64-token terrace, chunk 64) at lengths that are and are not multiples of 64."""
    q, k, v, fq, fk, gamma = make_inputs(2, 4, 2, length, 16, 8, seed=length)
    start = torch.tensor([0, min(5, length - 1)])
    kwargs = dict(window=Window("terrace", 64), scaling=0.25, gamma=gamma, start=start)
    expected = real_rows(hybrid_attention_reference(q, k, v, fq, fk, **kwargs), start)
    assert max_relative_error(real_rows(hybrid_attention_chunked(q, k, v, fq, fk, **kwargs), start), expected) <= RTOL
    assert max_relative_error(real_rows(hybrid_attention_recurrent(q, k, v, fq, fk, **kwargs), start), expected) <= RTOL


def test_terrace_counts_blocks_from_first_real_token():
    """With left padding, a row's output equals the same row unpadded: blocks start at its first real token."""
    q, k, v, fq, fk, gamma = make_inputs(1, 2, 2, 150, 8, 8, seed=3)
    pad = 23
    padded = [torch.cat([torch.randn(1, x.shape[1], pad, x.shape[3]), x], dim=2) for x in (q, k, v, fq.log(), fk.log())]
    padded[3], padded[4] = padded[3].exp(), padded[4].exp()
    kwargs = dict(window=Window("terrace", 16), scaling=0.3, gamma=gamma)
    alone = hybrid_attention_chunked(q, k, v, fq, fk, **kwargs)
    with_pad = hybrid_attention_chunked(*padded, start=torch.tensor([pad]), **kwargs)
    assert max_relative_error(with_pad[:, :, pad:], alone) <= RTOL
    assert with_pad[:, :, :pad].abs().max() == 0


def test_terrace_visible_keys():
    """A query in terrace block b softmax-attends to size+1 … 2·size keys (block b−1 and its causal part of b)."""
    window = Window("terrace", 4)
    positions = torch.arange(16)
    in_window = window.contains(positions[:, None], positions[None, :]) & (positions[None, :] <= positions[:, None])
    visible = in_window.sum(1).tolist()
    assert visible == [1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8]


@pytest.mark.parametrize("window", [Window("terrace", 4), Window("terrace", 4, 2), Window("terrace", 4, 4),
                                    Window("terrace", 3, 7), Window("sliding", 4), Window("sliding", 4, 3), Window("none")])
def test_first_linear_query_is_the_first_with_a_key_outside_window_and_sinks(window):
    positions = torch.arange(40)
    causal = positions[None, :] <= positions[:, None]
    outside = causal & ~window.contains(positions[:, None], positions[None, :])
    assert int(outside.any(1).nonzero()[0]) == window.first_linear_query


def test_linear_attention_modes_agree():
    _, _, v, fq, fk, _ = make_inputs(2, 3, 3, 77, 8, 10, seed=11)
    start = torch.tensor([0, 9])
    expected = real_rows(linear_attention_reference(fq, fk, v, start=start), start)
    assert max_relative_error(real_rows(linear_attention_chunked(fq, fk, v, start=start, chunk_size=16), start), expected) <= RTOL
    assert max_relative_error(real_rows(linear_attention_recurrent(fq, fk, v, start=start), start), expected) <= RTOL
    # Against the definition written out directly.
    scores = (fq[1:, :, 9:] @ fk[1:, :, 9:].transpose(-1, -2)).tril()
    direct = (scores @ v[1:, :, 9:]) / scores.sum(-1, keepdim=True)
    assert max_relative_error(expected[1:, :, 9:], direct) <= RTOL


def test_full_window_is_exact_softmax():
    """A sliding window that covers the sequence leaves nothing to the linear term: exact softmax attention."""
    q, k, v, fq, fk, gamma = make_inputs(2, 4, 2, 90, 8, 8, seed=5)
    start = torch.tensor([0, 12])
    hybrid = hybrid_attention_chunked(q, k, v, fq, fk, window=Window("sliding", 90), scaling=0.35, gamma=gamma, start=start)
    exact = softmax_attention(q, k, v, scaling=0.35, start=start)
    assert max_relative_error(real_rows(hybrid, start), real_rows(exact, start)) <= RTOL


@pytest.mark.parametrize("window", [Window("terrace", 8), Window("sliding", 8), Window("none"),
                                    Window("terrace", 8, sinks=4), Window("sliding", 6, sinks=3)])
@pytest.mark.parametrize("gated", [False, True])
def test_chunked_gradients_match_reference(window, gated):
    q, k, v, fq, fk, gamma = make_inputs(2, 4, 2, 45, 8, 6, seed=7, dtype=torch.float64)
    log_decay = -0.3 * torch.rand(2, 4, 45, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    start = torch.tensor([0, 4])
    inputs = [x.clone().requires_grad_(True) for x in (q, k, v, fq, fk, gamma, log_decay)]
    weights = torch.randn(2, 4, 45, 8, dtype=torch.float64)

    def loss(fn, **extra):
        out = fn(*inputs[:5], window=window, scaling=0.3, gamma=inputs[5], start=start,
                 log_decay=inputs[6] if gated else None, **extra)
        return (real_rows(out, start) * weights).sum()

    grads_ref = torch.autograd.grad(loss(hybrid_attention_reference), inputs, allow_unused=True)
    grads_chunked = torch.autograd.grad(loss(hybrid_attention_chunked, chunk_size=8), inputs, allow_unused=True)
    for name, a, b in zip("q k v fq fk gamma log_decay".split(), grads_chunked, grads_ref):
        if b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        assert max_relative_error(a, b) <= 1e-9, name


def test_bf16_inputs_accumulate_in_fp32():
    """bf16 inputs: the result matches the fp32 computation on the same (rounded) inputs to bf16 output precision."""
    q, k, v, fq, fk, gamma = make_inputs(1, 4, 4, 300, 16, 16, seed=8, dtype=torch.bfloat16)
    kwargs = dict(window=Window("terrace", 32), scaling=0.25, gamma=gamma.float())
    out = hybrid_attention_chunked(q, k, v, fq, fk, **kwargs)
    assert out.dtype == torch.bfloat16
    exact = hybrid_attention_reference(*(x.float() for x in (q, k, v, fq, fk)), **kwargs)
    assert max_relative_error(out.float(), exact) <= 2**-7

    phi = feature_function(4, 16, 16)
    fq, fk = phi(q).to(torch.bfloat16), phi(k).to(torch.bfloat16)
    exact = hybrid_attention_reference(*(x.float() for x in (q, k, v, fq, fk)), **kwargs)
    cache = RecurrentState.empty(1, 4, 4, 16, 16, 16, Window("terrace", 32), dtype=torch.bfloat16)
    assert cache.state.dtype == torch.float32 and cache.norm.dtype == torch.float32
    for t in range(300):
        step = hybrid_attention_step(cache, q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], key_features=phi, **kwargs)
    assert max_relative_error(step.float(), exact[:, :, -1]) <= 2**-7


def test_recurrent_state_size_is_constant():
    window = Window("terrace", 64)
    cache = RecurrentState.empty(1, 8, 2, 64, 64, 128, window)
    before = cache.nbytes()
    q, k, v, _, _, gamma = make_inputs(1, 8, 2, 300, 64, 128, seed=9)
    phi = feature_function(8, 64, 128)
    for t in range(300):
        hybrid_attention_step(cache, q[:, :, t], k[:, :, t], v[:, :, t], phi(q[:, :, t]), window=window, gamma=gamma,
                              key_features=phi)
    assert cache.nbytes() == before
    assert cache.keys.shape[2] == 2 * 64


def test_window_without_linear_term_ignores_gamma():
    q, k, v, _, _, gamma = make_inputs(1, 2, 2, 40, 8, 8, seed=10)
    a = hybrid_attention_chunked(q, k, v, None, None, window=Window("terrace", 8), gamma=gamma, use_linear=False)
    b = hybrid_attention_chunked(q, k, v, None, None, window=Window("terrace", 8), gamma=None, use_linear=False)
    assert max_relative_error(a, b) <= RTOL


def test_invalid_arguments_are_named():
    q, k, v, fq, fk, _ = make_inputs(1, 2, 2, 10, 8, 8)
    with pytest.raises(ValueError, match="neither a softmax window nor a linear term"):
        hybrid_attention_chunked(q, k, v, fq, fk, window=Window("none"), use_linear=False)
    with pytest.raises(ValueError, match="unknown window kind"):
        Window("diagonal", 4)
    with pytest.raises(ValueError, match="gamma must have shape"):
        hybrid_attention_chunked(q, k, v, fq, fk, window=Window("terrace", 4), gamma=torch.ones(3))
    with pytest.raises(ValueError, match="cannot share"):
        hybrid_attention_chunked(torch.randn(1, 3, 10, 8), k, v, None, None, window=Window("terrace", 4), use_linear=False)


def test_memory_of_chunked_path_has_no_quadratic_tensor():
    """Largest intermediate of the chunked path grows linearly: probe by tracking tensor sizes in autograd."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    for length in (512, 2048):
        sizes.clear()
        q, k, v, fq, fk, gamma = make_inputs(1, 2, 2, length, 16, 16, seed=1)
        fq.requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hybrid_attention_chunked(q, k, v, fq, fk, window=Window("terrace", 64), gamma=gamma)
        assert max(sizes) < 2 * 2 * length * 3 * 64 * 2, f"a saved tensor of {max(sizes)} elements at L={length}"
    assert math.isfinite(max(sizes))


WINDOWS = [Window("terrace", 8), Window("sliding", 8), Window("none"), Window("terrace", 8, sinks=4),
           Window("sliding", 8, sinks=3)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("prompt", [1, 7, 8, 9, 16, 23, 40])
def test_state_from_prefix_continues_like_stepping(window, prompt):
    """Prefill (state built from the whole prompt at once) then decode equals decoding from scratch."""
    q, k, v, _, _, gamma = make_inputs(2, 4, 2, 50, 8, 6, seed=prompt)
    q, k, v = rounded(q, k, v)
    phi = feature_function(4, 8, 6, seed=prompt)
    fq, fk = phi(q), phi(k)
    start = torch.tensor([0, min(3, prompt - 1)])
    kwargs = dict(window=window, scaling=0.3)
    expected = hybrid_attention_reference(q, k, v, fq, fk, start=start, gamma=gamma, **kwargs)
    q, k, v = on_test_device(q, k, v)
    fq, fk, gamma = on_test_device(fq, fk, gamma, dtype=torch.float32)  # feature maps give fp32
    cache = recurrent_state_from_prefix(k[:, :, :prompt], v[:, :, :prompt], fk[:, :, :prompt], window=window,
                                        num_heads=4, start=start.to(TEST_DEVICE))
    assert cache.columns == prompt and cache.lengths.tolist() == [prompt, prompt - int(start[1])]
    assert cache.keys.dtype == TEST_DTYPE and cache.state.dtype == torch.float32
    steps = [hybrid_attention_step(cache, q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t],
                                   key_features=phi, gamma=gamma, **kwargs)
             for t in range(prompt, 50)]
    assert steps[0].dtype == TEST_DTYPE
    assert max_relative_error(torch.stack(steps, dim=2).float().cpu(), expected[:, :, prompt:]) <= STEP_RTOL


def step_through(cache, q, k, v, fq, fk, start, columns, phi, log_decay=None, **kwargs):
    """hybrid_attention_step over the given columns, with rows starting at ``start`` (left padding)."""
    return [hybrid_attention_step(cache, q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], t >= start,
                                  key_features=phi, log_decay=None if log_decay is None else log_decay[:, :, t],
                                  **kwargs)
            for t in columns]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("prompt", [1, 5, 8, 13, 16, 17, 31])
def test_state_from_prefix_is_the_state_steps_reach(window, prompt, gated):
    """Every tensor of the prefill state (S, z, the terrace's S_next and z_next, ring, positions, counters)
    equals the state after stepping through the same prompt, left-padded rows included."""
    q, k, v, _, _, gamma = make_inputs(3, 4, 2, prompt, 8, 6, seed=prompt)
    q, k, v = on_test_device(q, k, v)
    phi = feature_function(4, 8, 6, seed=prompt)
    fq, fk = phi(q), phi(k)
    gamma = gamma.to(TEST_DEVICE)
    start = torch.tensor([0, min(3, prompt - 1), prompt], device=TEST_DEVICE)  # the last row is all padding
    log_decay = None
    if gated:
        log_decay = -0.3 * torch.rand(3, 4, prompt, generator=torch.Generator().manual_seed(prompt)).to(TEST_DEVICE)
    stepped = RecurrentState.empty(3, 4, 2, 8, 8, 6, window, dtype=TEST_DTYPE, device=TEST_DEVICE, gated=gated)
    step_through(stepped, q, k, v, fq, fk, start, range(prompt), phi, log_decay=log_decay, window=window, gamma=gamma)
    built = recurrent_state_from_prefix(k, v, fk, window=window, num_heads=4, start=start, log_decay=log_decay)
    assert built.columns == stepped.columns == prompt
    assert set(built.tensors()) == set(stepped.tensors())
    for name, tensor in stepped.tensors().items():
        if tensor.is_floating_point():
            assert torch.allclose(built.tensors()[name], tensor, rtol=1e-5, atol=1e-6), name
        else:
            assert torch.equal(built.tensors()[name], tensor), name
    assert (built.pending_state is not None) == (window.kind == "terrace")


@pytest.mark.parametrize("window", [Window("terrace", 8), Window("sliding", 8)])
def test_each_key_passes_through_phi_once(window):
    """Decode computes φ of one key per row and step: the key at p − size, which is leaving the window
    (sliding) or will leave it with its block (terrace); never the whole ring. Over N steps after a prompt,
    the keys through φ are exactly the N per row that left (or are about to leave), each once."""
    batch, size, prompt, steps = 2, window.size, 24, 16
    q, k, v, _, _, gamma = make_inputs(batch, 4, 2, prompt + steps, 8, 6, seed=1)
    q, k, v = rounded(q, k, v)
    phi = feature_function(4, 8, 6)
    fq, fk = phi(q), phi(k)
    start = torch.tensor([0, 3])
    expected = real_rows(hybrid_attention_reference(q, k, v, fq, fk, window=window, gamma=gamma, start=start), start)
    q, k, v = on_test_device(q, k, v)
    fq, fk, gamma, start = (x.to(TEST_DEVICE) for x in (fq, fk, gamma, start))
    through_phi = []

    def counting_phi(keys):
        through_phi.append(keys.clone())
        return phi(keys)

    cache = recurrent_state_from_prefix(k[:, :, :prompt], v[:, :, :prompt], fk[:, :, :prompt], window=window,
                                        num_heads=4, start=start)
    out = step_through(cache, q, k, v, fq, fk, start, range(prompt, prompt + steps), counting_phi,
                       window=window, gamma=gamma)
    passed = torch.cat(through_phi, dim=2)  # (B, Hkv, keys, D)
    assert sum(x.shape[0] * x.shape[2] for x in through_phi) == batch * steps  # R = 2·size or size per step before
    assert torch.equal(passed, k[:, :, prompt - size : prompt + steps - size])
    # The keys that left the window of the last query since the prompt's last query, plus (terrace) those
    # folded ahead into S_next, are exactly these: nothing was folded twice or missed.
    assert max_relative_error(torch.stack(out, dim=2).float().cpu(), expected[:, :, prompt:]) <= STEP_RTOL


def tiny_step_inputs(length=20):
    window = Window("terrace", 4, sinks=2)  # sinks and the decay gate (below): tensor masks and products too
    q, k, v, _, _, gamma = make_inputs(2, 4, 2, length, 8, 6, seed=4)
    q, k, v = on_test_device(q, k, v)
    phi = feature_function(4, 8, 6, seed=4)
    start = torch.tensor([0, 3], device=TEST_DEVICE)
    return window, q, k, v, phi(q), phi(k), gamma.to(TEST_DEVICE), start, phi


def compiled_step_matches_eager(backend):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    window, q, k, v, fq, fk, gamma, start, phi = tiny_step_inputs()
    compiled = torch.compile(hybrid_attention_step, fullgraph=True, backend=backend)  # a graph break raises
    eager_cache, compiled_cache = (RecurrentState.empty(2, 4, 2, 8, 8, 6, window, dtype=TEST_DTYPE, device=TEST_DEVICE,
                                                        gated=True) for _ in range(2))
    kwargs = dict(window=window, scaling=0.3, gamma=gamma, key_features=phi)
    log_decay = -0.2 * torch.rand(2, 4, q.shape[2], generator=torch.Generator().manual_seed(0)).to(TEST_DEVICE)
    for t in range(q.shape[2]):  # across block boundaries (every 4 tokens) and a row's left padding
        args = (q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], None, t >= start)
        expected = hybrid_attention_step(eager_cache, *args, log_decay=log_decay[:, :, t], **kwargs)
        got = compiled(compiled_cache, *args, log_decay=log_decay[:, :, t], **kwargs)
        assert max_relative_error(got.float(), expected.float()) <= STEP_RTOL, t
    for name, tensor in eager_cache.tensors().items():
        assert torch.allclose(compiled_cache.tensors()[name].float(), tensor.float(), rtol=1e-5, atol=1e-6), name
    assert compiled_cache.columns == eager_cache.columns == q.shape[2]
    # One graph, and one more once the host column counter is seen to change (then it is symbolic).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_step_traces_as_one_graph():
    """The decode step has no graph break (no host sync, no data-dependent branch): fullgraph tracing
    through AOT autograd's functionalisation of the in-place state updates, on the CPU in seconds."""
    compiled_step_matches_eager("aot_eager")


@pytest.mark.slow
def test_step_compiles_with_inductor():
    """The same with inductor's code generation (about 80 s on 2 CPU cores, hence slow; on cuda with
    LOLCATS_TEST_DEVICE=cuda, benchmarks/gpu_check.sh runs it)."""
    compiled_step_matches_eager("inductor")
