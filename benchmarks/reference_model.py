"""The reference model of DEVELOPERS.md: a random Llama (hidden 512, 8 layers, 8 heads, head_dim 64,
intermediate 1376, vocab 8192, rope theta 5e5; 34M parameters), fp32."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def reference_model(seed: int = 0, max_positions: int = 65536) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         head_dim=64, intermediate_size=1376, vocab_size=8192, rope_theta=5e5,
                         max_position_embeddings=max_positions, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()
