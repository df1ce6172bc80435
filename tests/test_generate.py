"""Generation with the constant-size cache: parity with full-sequence forwards, padding, HF generate()."""

import pytest
import torch
from tiny_models import FAMILY_CONFIGS, tiny_model
from transformers import DynamicCache

import lolcats
from lolcats import convert, linearized_layers
from lolcats.cache import LinearizedCache, RecurrentLayer

WINDOW = 4  # tiny window and chunk so that 40 tokens cross many block and chunk boundaries


def randomise_gamma(model):
    """Trained models have γ far from its initial value; make every head differ."""
    generator = torch.Generator().manual_seed(0)
    for layer in linearized_layers(model):
        layer.window_logit.data = torch.randn(layer.window_logit.shape, generator=generator)
    return model


def tiny_linearized(family="llama", **overrides):
    settings = dict(window=WINDOW, chunk_size=WINDOW, **overrides)
    return randomise_gamma(convert(tiny_model(family), **settings))


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def incremental_logits(model, ids, prompt, attention_mask=None):
    """Prefill ``prompt`` tokens, then feed the rest one token at a time through the returned cache."""
    with torch.no_grad():
        mask = None if attention_mask is None else attention_mask[:, :prompt]
        out = model(ids[:, :prompt], attention_mask=mask)
        logits, cache = [out.logits], out.cache
        for t in range(prompt, ids.shape[1]):
            mask = None if attention_mask is None else attention_mask[:, : t + 1]
            out = model(ids[:, t : t + 1], attention_mask=mask, cache=cache)
            logits.append(out.logits)
            cache = out.cache
    return torch.cat(logits, dim=1), cache


def full_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("prompt", [1, 3, 4, 5, 9, 17])
def test_decode_matches_full_forward(family, prompt):
    model = tiny_linearized(family)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(prompt))
    logits, cache = incremental_logits(model, ids, prompt)
    assert isinstance(cache, LinearizedCache)
    assert relative_error(logits, full_logits(model, ids)) <= 1e-4


@pytest.mark.parametrize("attention", ["lolcats", "sliding", "linear", "window"])
def test_decode_matches_full_forward_for_every_attention_kind(attention):
    model = tiny_linearized("llama", attention=attention, softmax_layers=(1,))
    ids = torch.randint(0, 96, (1, 33), generator=torch.Generator().manual_seed(1))
    logits, cache = incremental_logits(model, ids, 6)
    assert [type(layer).__name__ for layer in cache.layers] == ["RecurrentLayer", "DynamicLayer", "RecurrentLayer"]
    assert relative_error(logits, full_logits(model, ids)) <= 1e-4


def test_prefill_then_decode_equals_decode_from_scratch():
    model = tiny_linearized("gemma3_text")
    ids = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(2))
    from_scratch, _ = incremental_logits(model, ids, 1)
    for prompt in (4, 11, 29):
        prefilled, _ = incremental_logits(model, ids, prompt)
        assert relative_error(prefilled, from_scratch) <= 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_left_padded_batch_gives_each_row_what_it_gets_alone(family):
    model = tiny_linearized(family)
    generator = torch.Generator().manual_seed(3)
    long, short = torch.randint(1, 96, (1, 23), generator=generator), torch.randint(1, 96, (1, 9), generator=generator)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    # Whole-sequence forward: the padded row equals the row alone (positions count from its first token).
    batch = full_logits(model, ids, mask)
    assert relative_error(batch[1, pad:], full_logits(model, short)[0]) <= 1e-5
    assert relative_error(batch[0], full_logits(model, long)[0]) <= 1e-5
    # generate(): the next-token scores of every step match the row generated alone.
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                    output_scores=True, return_dict_in_generate=True)
    together = model.generate(ids, attention_mask=mask, **settings)
    for row, alone_ids in ((0, long), (1, short)):
        alone = model.generate(alone_ids, **settings)
        assert torch.equal(together.sequences[row, -12:], alone.sequences[0, -12:])
        for step_together, step_alone in zip(together.scores, alone.scores):
            assert relative_error(step_together[row], step_alone[0]) <= 1e-4


def greedy_by_full_forward(model, ids, new_tokens):
    with torch.no_grad():
        for _ in range(new_tokens):
            next_token = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    return ids


def test_stories260k_greedy_generate_equals_full_forward_greedy(stories260k_path):
    """The default 64-token terrace window: 100 new tokens after a 90-token prompt cross blocks at 128 and 192."""
    model = randomise_gamma(convert(lolcats.load_base_model(str(stories260k_path))))
    tokenizer = lolcats.load_tokenizer(str(stories260k_path))
    prompt = tokenizer("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
                       "One day, she saw a big red ball in the park and", return_tensors="pt").input_ids
    prompt = torch.cat([prompt] * 3, dim=1)[:, :90]
    generated = model.generate(prompt, max_new_tokens=100, do_sample=False, eos_token_id=None)
    assert torch.equal(generated, greedy_by_full_forward(model, prompt, 100))
    logits, _ = incremental_logits(model, generated, 90)
    assert relative_error(logits, full_logits(model, generated)) <= 1e-4


def test_cache_size_is_constant_in_context_length():
    model = tiny_linearized("llama")
    ids = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(4))
    sizes = []
    for length in (20, 80, 200):
        _, cache = incremental_logits(model, ids[:, :length], length - 3)
        sizes.append(cache.nbytes())
        assert all(isinstance(layer, RecurrentLayer) and layer.state.state.dtype == torch.float32 for layer in cache.layers)
    assert sizes[0] == sizes[1] == sizes[2] > 0


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_linearized("qwen3")
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    settings = dict(max_new_tokens=10, do_sample=True, top_p=0.9, temperature=0.8, pad_token_id=0)
    torch.manual_seed(7)
    first = model.generate(ids, num_return_sequences=2, **settings)
    torch.manual_seed(7)
    second = model.generate(ids, num_return_sequences=2, **settings)
    assert first.shape == (4, 17) and torch.equal(first, second)


def test_beam_search_with_cache_equals_beam_search_without():
    model = tiny_linearized("llama")
    ids = torch.randint(1, 96, (1, 9), generator=torch.Generator().manual_seed(6))
    settings = dict(max_new_tokens=8, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(ids, use_cache=True, **settings), model.generate(ids, use_cache=False, **settings))


def test_right_padded_prompt_is_refused():
    model = tiny_linearized("llama")
    ids = torch.randint(1, 96, (2, 8), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="padded on the left"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)


def test_foreign_cache_with_tokens_is_refused():
    model = tiny_linearized("llama")
    ids = torch.randint(1, 96, (1, 8), generator=torch.Generator().manual_seed(9))
    foreign = DynamicCache(config=model.config)
    foreign.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), layer_idx=0)
    with pytest.raises(ValueError, match="cannot continue from a DynamicCache"):
        model(ids, cache=foreign)
