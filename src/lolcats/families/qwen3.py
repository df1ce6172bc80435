from .base import AttentionFamily


class Qwen3(AttentionFamily):
    """Llama layout plus per-head RMSNorm on q and k before RoPE."""

    name = "qwen3"
    model_types = ("qwen3",)
    qk_norm = True
