"""lolcats: linearize pretrained causal LMs with learned subquadratic attention (LoLCATs)."""

from .attention import LinearizedAttention
from .config import LinearizeConfig
from .convert import convert, linearized_layers, set_attention_mode, trainable_parameters
from .models import load_base_model, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "LinearizeConfig",
    "LinearizedAttention",
    "convert",
    "linearized_layers",
    "load_base_model",
    "load_tokenizer",
    "set_attention_mode",
    "trainable_parameters",
]
