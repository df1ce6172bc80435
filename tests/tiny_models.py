"""Tiny random models of every supported family (a few hundred kB each, built in milliseconds)."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lolcats

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rope_theta=10000.0,
)

FAMILY_CONFIGS = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2", use_sliding_window=False),
    "qwen3": dict(model_type="qwen3"),
    # Local layers with an 8-token window and one global layer; query_pre_attn_scalar != head_dim on purpose.
    "gemma3_text": dict(
        model_type="gemma3_text",
        num_hidden_layers=4,
        num_key_value_heads=1,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
    ),
}


def tiny_model(family: str, seed: int = 0, **overrides):
    settings = {**COMMON, **FAMILY_CONFIGS[family], **overrides}
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family == "qwen2":
        # Random biases on q/k/v so the test sees them (they initialise to zero).
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model.eval()


def teacher_or_linearized(kind: str):
    """A tiny Llama (``"teacher"``) or the same converted with window 4 and γ far from its initial value
    (``"linearized"``), so that losses and scores go through the linear term."""
    model = tiny_model("llama", seed=1)
    if kind == "linearized":
        model = lolcats.convert(model, window=4)
        generator = torch.Generator().manual_seed(0)
        for layer in lolcats.linearized_layers(model):
            layer.window_logit.data = torch.randn(layer.window_logit.shape, generator=generator)
    return model
