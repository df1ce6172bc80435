"""Teachers with their own sliding window: a converted model in softmax (teacher) mode gives the original HF
model's logits, for Mistral with ``sliding_window`` set, Qwen2 with sliding layers, and Gemma 3's local layers
(kept as HF has them, or converted with the teacher's window), with and without left padding.

Sequences are 40 tokens against an 8-token window, so every layer's window truncates most queries; each test
also checks that the window changes the HF logits, so that ignoring it could not pass.
"""

import pytest
import torch
from tiny_models import tiny_model

import lolcats

WINDOW = 8
LENGTH = 40
TOL = 1e-5  # relative to the largest logit, fp32
PAD = 11

CASES = {
    "mistral": ("mistral", dict(sliding_window=WINDOW), {}),
    # Layers from max_window_layers on are sliding (HF's layer_types); layer 0 stays global.
    "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), {}),
    "gemma3-keep": ("gemma3_text", dict(sliding_window=WINDOW), dict(local_layers="keep")),
    "gemma3-linearize": ("gemma3_text", dict(sliding_window=WINDOW), dict(local_layers="linearize")),
}
WITHOUT_WINDOW = {  # the same models with a window that covers the whole sequence
    "mistral": dict(sliding_window=None),
    "qwen2": dict(use_sliding_window=False),
    "gemma3_text": dict(sliding_window=4 * LENGTH),
}


def inputs(pad):
    ids = torch.randint(1, 96, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def hf_logits(model, ids, mask):
    """The HF model's own logits, positions counted from each row's first real token (as generate() does)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits


def relative_error(actual, expected, real):
    return ((actual - expected)[real].abs().max() / expected[real].abs().max()).item()


@pytest.mark.parametrize("pad", [0, PAD])
@pytest.mark.parametrize("mode", ["softmax", "distill"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_teacher_mode_reproduces_hf_logits(case, attn_implementation, mode, pad):
    family, overrides, convert_settings = CASES[case]
    settings = dict(overrides, attn_implementation=attn_implementation)
    original = tiny_model(family, **settings)
    layer_types = getattr(original.config, "layer_types", None)
    if family == "mistral":  # no layer_types: its sliding_window applies to every layer
        assert layer_types is None and original.config.sliding_window == WINDOW
        layer_types = ["sliding_attention"] * original.config.num_hidden_layers
    assert "sliding_attention" in layer_types
    converted = lolcats.convert(tiny_model(family, **settings), **convert_settings)
    lolcats.set_attention_mode(converted, mode)
    converted_layers = [layer.layer_idx for layer in lolcats.linearized_layers(converted)]
    if convert_settings.get("local_layers") == "keep":
        assert converted_layers == [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    else:
        assert converted_layers == list(range(len(layer_types)))
    windows = {layer.layer_idx: layer.teacher_window for layer in lolcats.linearized_layers(converted)}
    assert windows == {i: WINDOW if layer_types[i] == "sliding_attention" else None for i in converted_layers}

    ids, mask = inputs(pad)
    real = mask.bool()
    expected = hf_logits(original, ids, mask)
    with torch.no_grad():
        # No position ids: lolcats counts a padded row's positions from its first real token itself.
        got = converted(ids, attention_mask=mask if pad else None, use_cache=False).logits
    assert relative_error(got, expected, real) <= TOL
    if pad:
        # The padded row is the row alone.
        alone = hf_logits(original, ids[1:, pad:], mask[1:, pad:])
        assert relative_error(got[1:, pad:], alone, real[1:, pad:]) <= TOL

    without_window = tiny_model(family, **dict(settings, **WITHOUT_WINDOW[family]))
    assert relative_error(hf_logits(without_window, ids, mask), expected, real) > 1e-2
