"""lolcats: linearize pretrained causal LMs with learned subquadratic attention (LoLCATs)."""

from .artifacts import load
from .config import LinearizeConfig
from .convert import convert, linearized_layers, set_attention_mode, trainable_parameters
from .models import load_base_model, load_tokenizer
from .runtime import LinearizedAttention
from .training.config import RunConfig
from .training.linearize import linearize
from .version import __version__

__all__ = [
    "__version__",
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
