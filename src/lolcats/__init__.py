"""lolcats: linearize pretrained causal LMs with learned subquadratic attention (LoLCATs)."""

__version__ = "0.1.0"

from .attention import LinearizedAttention
from .config import LinearizeConfig
from .convert import convert, linearized_layers, set_attention_mode, trainable_parameters
from .models import load_base_model, load_tokenizer
from .pipeline import RunConfig, linearize, load

__all__ = [
    "LinearizeConfig",
    "LinearizedAttention",
    "RunConfig",
    "convert",
    "linearize",
    "linearized_layers",
    "load",
    "load_base_model",
    "load_tokenizer",
    "set_attention_mode",
    "trainable_parameters",
]
