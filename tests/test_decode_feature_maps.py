"""Decode parity for every feature map: greedy model.generate() through the constant-memory cache gives, at
every step, the logits of a full forward over the same tokens.

φ's parameters are randomised (trained maps are far from their identity initialisation, where q and k
features coincide), and so is γ. Decode computes φ of a key only when it leaves the window and folds it
into the state; the full forward computes φ of every key at once in the chunked path: the two agree only
if each map is applied the same way to grouped keys, one key at a time and all together. A 4-token window
and chunk, a 6-token prompt (3 of them left padding in the second row) and 21 new tokens cross 2·window
several times.
"""

import typing

import pytest
import torch
from tiny_models import tiny_model

import lolcats
from lolcats.runtime.feature_maps import FEATURE_MAPS as REGISTERED_FEATURE_MAPS

WINDOW = 4
PROMPT, NEW_TOKENS, PAD = 6, 21, 3
TOL = 1e-4  # relative to the largest logit, fp32
FEATURE_MAPS = typing.get_args(lolcats.LinearizeConfig.model_fields["feature_map"].annotation)


def test_every_feature_map_is_covered():
    assert set(FEATURE_MAPS) == set(REGISTERED_FEATURE_MAPS)


def linearized(feature_map, kv_heads, attention):
    model = lolcats.convert(tiny_model("llama", num_key_value_heads=kv_heads), attention=attention,
                            feature_map=feature_map, feature_dim=8, window=WINDOW, chunk_size=WINDOW)
    generator = torch.Generator().manual_seed(1)
    layers = list(lolcats.linearized_layers(model))
    assert len(layers) == 3
    for layer in layers:
        layer.window_logit.data = torch.randn(layer.window_logit.shape, generator=generator)
        for feature_map_module in (layer.feature_map_q, layer.feature_map_k):
            for parameter in feature_map_module.parameters():
                parameter.data += 0.3 * torch.randn(parameter.shape, generator=generator)
    return model


# Multi-head, grouped-query and multi-query heads with the LoLCATs terrace window; the sliding window on the
# grouped-query model.
HEADS_AND_WINDOWS = [(4, "lolcats"), (2, "lolcats"), (1, "lolcats"), (2, "sliding")]


@pytest.mark.parametrize("kv_heads,attention", HEADS_AND_WINDOWS)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_generate_step_logits_equal_full_forward(feature_map, kv_heads, attention):
    model = linearized(feature_map, kv_heads, attention)
    ids = torch.randint(1, 96, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[1, :PAD], mask[1, :PAD] = 0, 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    sequences = out.sequences
    assert sequences.shape == (2, PROMPT + NEW_TOKENS)
    step_logits = torch.stack(out.logits, dim=1)  # (B, NEW_TOKENS, V): the logits that chose each new token
    full_mask = torch.cat([mask, torch.ones(2, NEW_TOKENS, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        full = model(sequences, attention_mask=full_mask, use_cache=False).logits[:, PROMPT - 1 : -1]
    error = ((step_logits - full).abs().max() / full.abs().max()).item()
    assert error <= TOL, f"decode against full forward: relative error {error:.2e}"
    assert torch.equal(step_logits.argmax(-1), sequences[:, PROMPT:])
    # The padded row decodes as it would alone.
    with torch.no_grad():
        alone = model(sequences[1:, PAD:], use_cache=False).logits[:, PROMPT - PAD - 1 : -1]
    assert ((step_logits[1:] - alone).abs().max() / alone.abs().max()).item() <= TOL
