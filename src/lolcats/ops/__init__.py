"""Pure tensor functions for linear and hybrid attention (no nn.Module, fp32 accumulation).

Each function has a quadratic reference beside its fast paths; the tests hold them together.
"""

from .chunked import hybrid_attention_chunked, linear_attention_chunked
from .common import Window, expand_heads
from .recurrent import (
    RecurrentState,
    hybrid_attention_recurrent,
    hybrid_attention_step,
    linear_attention_recurrent,
    recurrent_state_from_prefix,
)
from .reference import hybrid_attention_reference, hybrid_attention_weights, linear_attention_reference
from .softmax import softmax_attention

__all__ = [
    "RecurrentState",
    "Window",
    "expand_heads",
    "hybrid_attention_chunked",
    "hybrid_attention_recurrent",
    "hybrid_attention_reference",
    "hybrid_attention_weights",
    "hybrid_attention_step",
    "linear_attention_chunked",
    "linear_attention_recurrent",
    "linear_attention_reference",
    "recurrent_state_from_prefix",
    "softmax_attention",
]
