from .base import AttentionFamily


class Mistral(AttentionFamily):
    """Llama layout; a configured `sliding_window` is the teacher's window on every layer and is honoured."""

    name = "mistral"
    model_types = ("mistral",)

    def teacher_window(self, attention) -> int | None:
        return getattr(attention.config, "sliding_window", None)
