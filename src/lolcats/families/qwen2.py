from .base import AttentionFamily


class Qwen2(AttentionFamily):
    """Llama layout with biases on q/k/v (they live inside the projections, so nothing changes here)."""

    name = "qwen2"
    model_types = ("qwen2",)
