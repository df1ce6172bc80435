"""Conversion of real HF models: exactness per family, modes, trainable parameters, errors."""

import pytest
import torch
from tiny_models import FAMILY_CONFIGS, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config

import lolcats
from lolcats import LinearizeConfig, LinearizedAttention, convert, linearized_layers, set_attention_mode

LENGTH = 40  # longer than Gemma's 8-token local window in the tiny config


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture
def ids():
    return torch.randint(0, 96, (2, LENGTH), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("attention", ["lolcats", "sliding"])
def test_window_covering_sequence_reproduces_teacher(family, attention, ids):
    """With a softmax window over the whole sequence no key is left to the linear term: logits equal the original's."""
    teacher = logits(tiny_model(family), ids)
    student = convert(tiny_model(family), attention=attention, window=LENGTH)
    assert all(layer.mode == "linear" for layer in linearized_layers(student))
    assert relative_error(logits(student, ids), teacher) <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_softmax_and_distill_modes_reproduce_teacher(family, ids):
    teacher = logits(tiny_model(family), ids)
    model = convert(tiny_model(family), window=4)
    set_attention_mode(model, "softmax")
    assert relative_error(logits(model, ids), teacher) <= 1e-5
    set_attention_mode(model, "distill")
    out = model(ids, use_cache=False).logits
    assert relative_error(out.detach(), teacher) <= 1e-5
    losses = [layer.distill_loss for layer in linearized_layers(model)]
    assert losses and all(loss is not None and loss.item() > 0 for loss in losses)
    # The distillation loss reaches the feature maps and γ, and nothing else.
    torch.stack(losses).mean().backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("feature_map" in name or "window_logit" in name or "decay_gate" in name for name in grads)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_short_window_uses_the_linear_term(family, ids):
    """A short window changes the output, and the feature maps change it further (the linear term is live)."""
    teacher = logits(tiny_model(family), ids)
    model = convert(tiny_model(family), window=4, local_layers="linearize")
    before = logits(model, ids)
    assert relative_error(before, teacher) > 1e-4
    with torch.no_grad():
        for layer in linearized_layers(model):
            layer.feature_map_k.weight.mul_(3.0)
    assert relative_error(logits(model, ids), before) > 1e-5


def test_only_new_parameters_train():
    model = convert(tiny_model("llama"))
    trainable = lolcats.trainable_parameters(model)
    assert trainable
    assert all(name.endswith(("feature_map_q.weight", "feature_map_k.weight", "window_logit"))
               or ".decay_gate." in name for name in trainable)
    layer = next(linearized_layers(model))
    assert layer.feature_map_q.weight.shape == (4, 16, 64)  # per query head: head_dim × feature_dim
    torch.testing.assert_close(layer.feature_map_q.weight[0, :16, :16], torch.eye(16))
    torch.testing.assert_close(layer.gamma, torch.full((4,), 0.1))
    # Base weights keep their state-dict keys.
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()


def test_window_ablation_has_no_feature_maps():
    model = convert(tiny_model("llama"), attention="window")
    assert not any("feature_map" in name for name, _ in model.named_parameters())


def test_softmax_layers_are_left_alone():
    model = convert(tiny_model("llama"), softmax_layers=(0, 2))
    kinds = [type(layer.self_attn).__name__ for layer in model.model.layers]
    assert kinds == ["LlamaAttention", "LinearizedAttention", "LlamaAttention"]
    with pytest.raises(ValueError, match="out of range"):
        convert(tiny_model("llama"), softmax_layers=(3,))


def test_gemma3_local_layers_keep_their_teacher_window(ids):
    """Default: local layers stay the teacher's exact sliding-window softmax; only global layers convert."""
    model = convert(tiny_model("gemma3_text"))
    converted = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.self_attn, LinearizedAttention)]
    assert converted == [2]
    linearized = convert(tiny_model("gemma3_text"), local_layers="linearize", window=4)
    assert [layer.teacher_window for layer in linearized_layers(linearized)] == [8, 8, None, 8]


def test_left_padding_gives_each_row_its_own_result(ids):
    model = convert(tiny_model("qwen3"), window=8)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    padded = logits(model, ids, attention_mask=mask, position_ids=positions)
    alone = logits(model, ids[1:, 11:])
    assert relative_error(padded[1, 11:], alone[0]) <= 1e-5


def test_mask_with_holes_is_rejected(ids):
    model = convert(tiny_model("llama"))
    mask = torch.ones_like(ids)
    mask[0, 5] = 0
    with pytest.raises(ValueError, match="padding between real tokens"):
        logits(model, ids, attention_mask=mask)


def test_unsupported_architecture_names_supported_ones():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama.*qwen3"):
        convert(model)


def test_converting_twice_is_an_error():
    model = convert(tiny_model("llama"))
    with pytest.raises(ValueError, match="already linearized"):
        convert(model)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="feature_map"):
        LinearizeConfig(feature_map="cosine")
    with pytest.raises(ValueError, match="window"):
        LinearizeConfig(window=0)


def test_stories260k_full_window_is_exact(stories260k_path):
    teacher = lolcats.load_base_model(str(stories260k_path))
    ids = torch.randint(3, 512, (2, 300), generator=torch.Generator().manual_seed(1))
    expected = logits(teacher, ids)
    student = convert(lolcats.load_base_model(str(stories260k_path)), attention="sliding", window=300)
    assert relative_error(logits(student, ids), expected) <= 1e-5
    default = convert(lolcats.load_base_model(str(stories260k_path)))
    assert relative_error(logits(default, ids), expected) > 1e-4  # past 2 windows (256 tokens) the linear term is in play


def test_bf16_model_converts_and_runs(ids):
    model = convert(tiny_model("llama").to(torch.bfloat16))
    out = logits(model, ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    layer = next(linearized_layers(model))
    assert layer.feature_map_q.weight.dtype == torch.float32  # feature maps and γ train in fp32


@pytest.mark.parametrize("attention, length", [("lolcats", 16), ("lolcats", 17), ("sliding", 8), ("sliding", 9)])
def test_short_sequence_fast_path_matches_the_chunked_hybrid(attention, length):
    """Up to 2·window (terrace) or window (sliding) tokens the hybrid is exact softmax and takes SDPA; one token
    longer it takes the chunked path. Both agree with the quadratic reference."""
    from lolcats.runtime.ops import hybrid_attention_reference

    model = convert(tiny_model("llama"), attention=attention, window=8, chunk_size=8)
    layer = next(linearized_layers(model))
    layer.window_logit.data = torch.randn(layer.window_logit.shape, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(length)
    q, k, v = torch.randn(2, 4, length, 16, generator=generator), torch.randn(2, 2, length, 16, generator=generator), torch.randn(2, 2, length, 16, generator=generator)
    start = torch.tensor([0, 3])
    fq, fk = layer.features(q, k)
    expected = hybrid_attention_reference(q, k, v, fq, fk, window=layer.window, scaling=layer.scaling, gamma=layer.gamma, start=start)
    with torch.no_grad():
        got = layer.student(q, k, v, start)
    real = (torch.arange(length)[None, :] >= start[:, None])[:, None, :, None]
    assert relative_error(got * real, expected * real) <= 1e-5
    with torch.no_grad():
        assert layer._window_covers(length) == (length == (16 if attention == "lolcats" else 8))
