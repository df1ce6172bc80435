from .base import AttentionFamily


class Llama(AttentionFamily):
    name = "llama"
    model_types = ("llama",)
